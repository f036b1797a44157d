"""What the pages need besides their files: the favicon at the address browsers ask for
it, and a stream's state for the viewer page (`GET /whep/{stream}`).

The viewer page plays a stream over WHEP and tells its watcher what they see: waiting for
the stream to go live, or live without a face chosen yet (the video goes out unswapped).
Its state is read where the viewer's token already reaches (`/whep`), so a page given only
a viewer token needs nothing more; errors answer in text, as on the other WHEP requests.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

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
    so, whether it has a face to swap in and how many faces its latest frame had. 404
    when nothing is, or was lately, published there."""
    key = request.match_info["session"]
    broadcast = service.find_broadcast(key)
    if broadcast is None or broadcast.channel.closed:
        raise sdp_error(404, "unknown_stream", f"nothing is published as {key!r}")
    publisher = service.sessions.get(broadcast.publisher or "")
    if publisher is None:
        return web.json_response({"stream": key, "live": False})
    live = publisher.stream.engine_session
    stats = publisher.stats()
    return web.json_response(
        {
            "stream": key,
            "live": True,
            "source": publisher.source is not None,
            "enabled": live.enabled,
            "faces": stats.faces,
            "swapped": stats.swapped,
        }
    )
