"""TURN REST credentials and how the ICE servers are announced (livefuse/web/ice.py).

coturn's own check of these credentials is in tests/integration/test_turn_and_prometheus.py
(a relay-only viewer through a real coturn); here, the scheme's arithmetic and the shapes
of the Link header and the JSON the pages get."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest
from pydantic import ValidationError

from livefuse.settings import Settings
from livefuse.web.ice import IceServer, ice_servers, link_header, turn_credential


def test_turn_credential_is_the_rest_scheme_coturn_checks() -> None:
    username, password = turn_credential("s3cret", label="viewer", ttl_s=600, now=1_700_000_000.7)
    assert username == "1700000600:viewer"
    expected = hmac.new(b"s3cret", b"1700000600:viewer", hashlib.sha1).digest()
    assert base64.b64decode(password) == expected


def test_turn_urls_get_a_credential_and_plain_servers_none() -> None:
    settings = Settings(
        ice_servers=["stun:stun.example.net:3478"],
        turn_urls=["turn:turn.example.net:3478?transport=udp", "turn:turn.example.net:3478"],
        turn_secret="s3cret",
        turn_ttl_s=3600,
    )
    stun, turn = ice_servers(settings, now=1000.0)
    assert stun == IceServer(urls=("stun:stun.example.net:3478",))
    assert turn.urls == ("turn:turn.example.net:3478?transport=udp", "turn:turn.example.net:3478")
    assert turn.username == "4600:livefuse"
    assert turn.as_dict() == {
        "urls": list(turn.urls),
        "username": "4600:livefuse",
        "credential": turn.credential,
    }
    rtc = turn.rtc()
    assert (rtc.username, rtc.credential) == (turn.username, turn.credential)


def test_turn_urls_without_the_secret_are_not_announced() -> None:
    settings = Settings(turn_urls=["turn:turn.example.net:3478"])
    assert ice_servers(settings) == []
    assert link_header([]) == {}


def test_link_header_has_one_value_per_url_with_rfc9725_parameters() -> None:
    servers = [
        IceServer(urls=("stun:stun.example.net",)),
        IceServer(urls=("turn:t.example.net?transport=udp",), username="9:a", credential="c/+="),
    ]
    header = link_header(servers)["Link"]
    assert header == (
        '<stun:stun.example.net>; rel="ice-server", '
        '<turn:t.example.net?transport=udp>; rel="ice-server"; username="9:a"; '
        'credential="c/+="; credential-type="password"'
    )


def test_a_quote_in_a_label_stays_inside_its_quoted_string() -> None:
    server = IceServer(urls=("turn:t",), username='1:a"b', credential="x")
    assert 'username="1:a\\"b"' in server.link_values()[0]


def test_a_turn_url_aiortc_cannot_use_is_refused_at_start_up() -> None:
    assert Settings(turn_urls=["turns:t.example.net:5349?transport=tcp"]).turn_urls
    for bad in ("stun:t.example.net", "turn:t.example.net:port", "turn:t?transport=tls"):
        with pytest.raises(ValidationError, match="is not a TURN URL"):
            Settings(turn_urls=[bad])
