"""Where a new publisher goes (web/peers.py), from the peers' capacity as polled."""

from __future__ import annotations

import pytest

from livefuse.web.peers import Capacity, PeerSet, parse_peers, publisher_target


def capacity(node: str, sessions: int, *, limit: int = 2, **extra: object) -> Capacity:
    return Capacity(
        node=node,
        sessions=sessions,
        max_sessions=limit,
        starting=0,
        accepting=True,
        engine_load=0.1,
        streams=tuple(extra.get("streams", ())),  # type: ignore[arg-type]
        url=extra.get("url"),  # type: ignore[arg-type]
    )


def peers(*answers: tuple[str, Capacity]) -> PeerSet:
    known = PeerSet(",".join(base for base, _ in answers) or "http://x", own_node="me")
    for base, answer in answers:
        known.record(base, answer)
    return known


def test_stay_while_there_is_room_and_no_peer_beats_it_clearly() -> None:
    own = capacity("me", 1, limit=3)
    assert publisher_target(own, peers(("http://b", capacity("b", 1, limit=3))), name=None) is None
    # A peer with two more free sessions than this node takes the publisher.
    roomy = peers(("http://b", capacity("b", 0, limit=4)))
    assert publisher_target(own, roomy, name=None) == "http://b"


def test_a_full_node_sends_to_the_roomiest_peer_at_its_public_url() -> None:
    own = capacity("me", 2)
    known = peers(
        ("http://10.0.0.2:8080", capacity("b", 1, url="https://b.live.example")),
        ("http://10.0.0.3:8080", capacity("c", 0)),
        ("http://10.0.0.4:8080", capacity("d", 2)),
    )
    assert publisher_target(own, known, name=None) == "http://10.0.0.3:8080"
    full = peers(("http://10.0.0.4:8080", capacity("d", 2)))
    assert publisher_target(own, full, name=None) is None  # all full: 503 here
    only_b = peers(("http://10.0.0.2:8080", capacity("b", 1, url="https://b.live.example")))
    assert publisher_target(own, only_b, name=None) == "https://b.live.example"


def test_a_named_stream_goes_where_it_is_held_and_itself_is_skipped() -> None:
    own = capacity("me", 0)
    known = peers(("http://b", capacity("b", 1, streams=("studio",))), ("http://me", own))
    assert publisher_target(own, known, name="studio") == "http://b"
    assert publisher_target(own, known, name="other") is None
    assert "http://me" not in known.live()


def test_peers_spec_is_checked() -> None:
    assert parse_peers("http://a:8080, dns:livefuse-peers:8080") == [
        "http://a:8080",
        "dns:livefuse-peers:8080",
    ]
    for bad in ("", "ftp://a", "a:8080", "dns:"):
        with pytest.raises(ValueError):
            parse_peers(bad)
    with pytest.raises(ValueError, match="not a capacity"):
        Capacity.from_dict({"node": "x"})
