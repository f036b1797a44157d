"""What the pages need besides their files: the favicon at the address browsers ask for
it, and a stream's state for the viewer page (`GET /whep/{stream}`).

The viewer page plays a stream over WHEP and tells its watcher what they see: waiting for
the stream to go live, or live without a face chosen yet (the video goes out unswapped).
Its state is read where the viewer's token already reaches (`/whep`), so a page given only
a viewer token needs nothing more; errors answer in text, as on the other WHEP requests.
The publisher page reads its viewer link there too: with a view token in it, never the
publisher's own.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

from aiohttp import web

from livefuse.web.auth import Scope, Tokens
from livefuse.web.errors import sdp_error
from livefuse.web.service import Service

FAVICON = Path(__file__).parent / "static" / "favicon.svg"


async def favicon(request: web.Request) -> web.FileResponse:
    """`GET /favicon.ico`: the SVG icon the pages link to (browsers take it by its type)."""
    return web.FileResponse(
        FAVICON,
        headers={"Content-Type": "image/svg+xml", "Cache-Control": "public, max-age=86400"},
    )


async def stream_state(request: web.Request, service: Service) -> web.Response:
    """`GET /whep/{stream}`: whether the stream (a name or a session id) is live, and if
    so, whether it has a face to swap in and how many faces its latest frame had; for a
    caller who may publish, `watch`, the viewer page's address to hand out. 404 when
    nothing is, or was lately, published there."""
    key = request.match_info["session"]
    broadcast = service.find_broadcast(key)
    if broadcast is None or broadcast.channel.closed:
        raise sdp_error(404, "unknown_stream", f"nothing is published as {key!r}")
    state: dict[str, object] = {"stream": key, "live": False}
    if (watch := _viewer_link(request, service, key)) is not None:
        state["watch"] = watch
    publisher = service.sessions.get(broadcast.publisher or "")
    if publisher is not None:
        stats = publisher.stats()
        state |= {
            "live": True,
            "source": publisher.source is not None,
            "enabled": publisher.stream.engine_session.enabled,
            "faces": stats.faces,
            "swapped": stats.swapped,
        }
    return web.json_response(state)


def _viewer_link(request: web.Request, service: Service, key: str) -> str | None:
    """The viewer page's address for `key`: with the server's first view token when it
    has view tokens (never the caller's own: an admin or publish token in a link that gets
    passed around would let anyone publish), plain otherwise (the page asks for a token
    if one is needed). None for a caller who may only watch: view tokens are not handed
    from one viewer to another."""
    page = "/watch/" + quote(key, safe="")
    settings = service.settings
    if not settings.view_tokens:
        return page
    scope = Tokens(settings).scope_of(request.headers.get("Authorization", ""))
    if scope not in (Scope.ADMIN, Scope.PUBLISH):
        return None
    return f"{page}#token={quote(settings.view_tokens[0], safe='')}"
