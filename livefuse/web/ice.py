"""The STUN/TURN servers livefuse announces and uses, with short-lived TURN credentials.

TURN credentials follow the shared-secret REST scheme coturn checks with `use-auth-secret`
and `static-auth-secret` (draft-uberti-behave-turn-rest): the username is
`<expiry unix time>:<label>` and the password is base64(HMAC-SHA1(secret, username)). The
TURN server needs no list of users, and a credential stops working at its expiry, so one
handed to a page or to OBS is worth little once it leaks.

The same servers go three ways: into the server's own peer connections (so it has relay
candidates a client on another network can reach), into RFC 9725 `Link: rel="ice-server"`
headers on WHIP/WHEP answers (OBS reads them), and to the pages as JSON in the shape of the
browser's `RTCIceServer` (`GET /api/v1/ice-servers`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiortc import RTCIceServer

from livefuse.settings import Settings

if TYPE_CHECKING:
    from livefuse.web.service import Service

DEFAULT_LABEL = "livefuse"


@dataclass(frozen=True)
class IceServer:
    """One entry of an ICE configuration: its URLs and, for TURN, the credential."""

    urls: tuple[str, ...]
    username: str | None = None
    credential: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The browser's `RTCIceServer` shape."""
        entry: dict[str, Any] = {"urls": list(self.urls)}
        if self.username is not None and self.credential is not None:
            entry.update(username=self.username, credential=self.credential)
        return entry

    def link_values(self) -> list[str]:
        """RFC 9725 section 4.6: one `Link` value per URL, credentials as parameters."""
        values = []
        for url in self.urls:
            value = f'<{url}>; rel="ice-server"'
            if self.username is not None and self.credential is not None:
                value += (
                    f'; username="{_quoted(self.username)}"'
                    f'; credential="{_quoted(self.credential)}"'
                    '; credential-type="password"'
                )
            values.append(value)
        return values

    def rtc(self) -> RTCIceServer:
        return RTCIceServer(
            urls=list(self.urls), username=self.username, credential=self.credential
        )


def _quoted(text: str) -> str:
    # A quoted-string (RFC 9110 5.6.4); base64 and our labels never need it, a
    # configured label might.
    return text.replace("\\", "\\\\").replace('"', '\\"')


def turn_credential(secret: str, *, label: str, ttl_s: int, now: float) -> tuple[str, str]:
    """(username, password) valid until `now + ttl_s` on a TURN server sharing `secret`."""
    username = f"{int(now) + ttl_s}:{label}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode("ascii")


def ice_servers(
    settings: Settings, *, label: str = DEFAULT_LABEL, now: float | None = None
) -> list[IceServer]:
    """The configured servers: the plain ones (`ice_servers`, STUN or TURN without a
    credential) and the TURN ones with a fresh credential for `label`."""
    servers = [IceServer(urls=(url,)) for url in settings.ice_servers]
    if settings.turn_urls and settings.turn_secret:
        username, password = turn_credential(
            settings.turn_secret,
            label=label,
            ttl_s=settings.turn_ttl_s,
            now=time.time() if now is None else now,
        )
        servers.append(
            IceServer(urls=tuple(settings.turn_urls), username=username, credential=password)
        )
    return servers


def link_header(servers: list[IceServer]) -> dict[str, str]:
    """The `Link` header for a WHIP/WHEP answer (none without servers). One header with
    comma-separated values is the same field as several headers (RFC 9110 5.3)."""
    values = [value for server in servers for value in server.link_values()]
    return {"Link": ", ".join(values)} if values else {}


async def ice_servers_get(request: web.Request, service: Service) -> web.Response:
    """`GET /api/v1/ice-servers`: what a page passes to `new RTCPeerConnection`."""
    servers = ice_servers(service.settings)
    return web.json_response(
        {"iceServers": [server.as_dict() for server in servers]},
        headers={"Cache-Control": "no-store"},
    )
