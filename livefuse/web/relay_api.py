"""The broadcast relay's HTTP surface: pull ingests, RTMP pushes, named streams.

- `POST /api/v1/ingests {"url", "name"?, "source"?, "quality"?, "faces"?, "label"?}` starts a
  session fed by FFmpeg from the URL; `GET /api/v1/ingests[/{id}]`, `DELETE` ends it.
- `POST /api/v1/sessions/{id}/outputs {"url", "bitrate_kbps"?}` pushes a session's
  swapped video and audio to an RTMP(S) ingest; `{id}` may also be a stream name
  (`/api/v1/streams/{name}/outputs` is the same), whose pushes outlive its publishers.
  `GET` lists them, `DELETE .../outputs/{output}` stops one.
- `GET /api/v1/streams`: the named streams, who publishes there, viewers and pushes.
- `GET /api/v1/capacity`: this node's headroom (web/peers.py), with no token: what peers
  and autoscalers poll.

Errors are JSON, like the rest of /api (DESIGN.md, "Contracts").
"""

from __future__ import annotations

import json
from typing import Any, cast

from aiohttp import web

from livefuse.engines.pipeline import FaceSelection
from livefuse.stream.feeds import INGEST_SCHEMES, PUSH_SCHEMES, FeedUrlError, check_url
from livefuse.stream.quality import QUALITY_MODES, QualityMode
from livefuse.web.errors import ApiError, json_error
from livefuse.web.service import NAME_PATTERN, Broadcast, EndedError, LiveSession, Service

_MAX_BODY = 16 * 1024
_FACE_SELECTIONS = ("all", "largest")


async def _json_body(request: web.Request, fields: set[str]) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > _MAX_BODY:
        raise json_error(413, "too_large", f"the request body is larger than {_MAX_BODY} bytes")
    raw = await request.content.read(_MAX_BODY + 1)
    if len(raw) > _MAX_BODY:
        raise json_error(413, "too_large", f"the request body is larger than {_MAX_BODY} bytes")
    try:
        body = json.loads(raw or b"{}")
    except (ValueError, UnicodeDecodeError) as error:
        raise json_error(400, "bad_json", f"the body is not JSON: {error}") from error
    if not isinstance(body, dict):
        raise json_error(400, "bad_json", "the body must be a JSON object")
    unknown = set(body) - fields
    if unknown:
        raise json_error(422, "unknown_field", f"unknown field(s): {', '.join(sorted(unknown))}")
    return body


def _url(body: dict[str, Any], schemes: tuple[str, ...]) -> str:
    url = body.get("url")
    if not isinstance(url, str):
        raise json_error(422, "bad_url", "url must be a string")
    try:
        check_url(url, schemes=schemes)
    except FeedUrlError as error:
        raise json_error(422, "bad_url", str(error)) from error
    return url


def _as_json(error: ApiError) -> ApiError:
    """A service refusal (503 at capacity, 409 name in use) in /api's JSON shape."""
    return json_error(error.status, error.code, error.message, headers=error.headers)


# -- ingests ------------------------------------------------------------------------------


async def ingest_post(request: web.Request, service: Service) -> web.Response:
    body = await _json_body(request, {"url", "name", "source", "quality", "faces", "label"})
    url = _url(body, INGEST_SCHEMES)
    name = body.get("name")
    if name is not None and (not isinstance(name, str) or not NAME_PATTERN.fullmatch(name)):
        raise json_error(422, "bad_name", "name is 1 to 64 letters, digits, '-' or '_'")
    source = None
    if body.get("source") is not None:
        source = service.sources.get(body["source"]) if isinstance(body["source"], str) else None
        if source is None:
            raise json_error(422, "unknown_source", f"no source face with id {body['source']!r}")
    quality = body.get("quality", "auto")
    if quality not in QUALITY_MODES:
        raise json_error(422, "bad_quality", f"quality must be one of {', '.join(QUALITY_MODES)}")
    faces = body.get("faces", "all")
    if faces not in _FACE_SELECTIONS:
        raise json_error(422, "bad_faces", "faces must be all or largest")
    label = body.get("label", service.settings.label_default)
    if not isinstance(label, bool):
        raise json_error(422, "bad_label", "label must be true or false")
    try:
        service.require_ready()
        session = await service.start_ingest(
            url=url,
            name=name,
            source=source,
            quality=cast(QualityMode, quality),
            face_selection=cast(FaceSelection, faces),
            label=label,
        )
    except ApiError as error:
        raise _as_json(error) from error
    return web.json_response(
        session.as_dict(), status=201, headers={"Location": f"/api/v1/ingests/{session.id}"}
    )


def _ingest_or_404(service: Service, session_id: str) -> LiveSession:
    session = service.sessions.get(session_id)
    if session is None or session.ingest is None:
        raise json_error(404, "unknown_ingest", f"no ingest {session_id!r}")
    return session


async def ingest_list(request: web.Request, service: Service) -> web.Response:
    ingests = [s.as_dict() for s in service.sessions.values() if s.ingest is not None]
    return web.json_response({"ingests": ingests})


async def ingest_get(request: web.Request, service: Service) -> web.Response:
    return web.json_response(_ingest_or_404(service, request.match_info["id"]).as_dict())


async def ingest_delete(request: web.Request, service: Service) -> web.Response:
    session = _ingest_or_404(service, request.match_info["id"])
    await service.end_session(session.id, reason="DELETE")
    return web.Response(status=204)


# -- outputs ------------------------------------------------------------------------------


def _broadcast_or_404(service: Service, key: str) -> Broadcast:
    broadcast = service.live_broadcast(key)
    if broadcast is None:
        raise json_error(404, "unknown_stream", f"no live session or named stream {key!r}")
    return broadcast


async def output_post(request: web.Request, service: Service) -> web.Response:
    key = request.match_info["id"]
    broadcast = _broadcast_or_404(service, key)
    body = await _json_body(request, {"url", "bitrate_kbps"})
    url = _url(body, PUSH_SCHEMES)
    bitrate = body.get("bitrate_kbps", service.settings.push_bitrate_kbps)
    if not isinstance(bitrate, int) or isinstance(bitrate, bool) or not 100 <= bitrate <= 50_000:
        raise json_error(422, "bad_bitrate", "bitrate_kbps must be a whole number, 100 to 50000")
    if len(broadcast.outputs) >= service.settings.max_outputs:
        raise json_error(
            409,
            "too_many_outputs",
            f"this stream already pushes to its limit of {service.settings.max_outputs} outputs",
        )
    try:
        output = await service.add_output(broadcast, url=url, bitrate_kbps=bitrate)
    except EndedError as error:
        raise json_error(
            404, "unknown_stream", f"no live session or named stream {key!r}"
        ) from error
    return web.json_response(
        output.stats().as_dict(),
        status=201,
        headers={"Location": f"{request.path.rstrip('/')}/{output.id}"},
    )


async def output_list(request: web.Request, service: Service) -> web.Response:
    broadcast = _broadcast_or_404(service, request.match_info["id"])
    return web.json_response({"outputs": broadcast.outputs_dict()})


async def output_delete(request: web.Request, service: Service) -> web.Response:
    broadcast = _broadcast_or_404(service, request.match_info["id"])
    if not await service.remove_output(broadcast, request.match_info["output"]):
        raise json_error(404, "unknown_output", f"no output {request.match_info['output']!r}")
    return web.Response(status=204)


# -- named streams ------------------------------------------------------------------------


async def stream_list(request: web.Request, service: Service) -> web.Response:
    streams = [
        {
            "name": broadcast.key,
            "publisher": broadcast.publisher,
            "viewers": len(broadcast.viewers),
            "outputs": broadcast.outputs_dict(),
            "whep": f"/whep/{broadcast.key}",
            "watch": f"/watch/{broadcast.key}",
        }
        for broadcast in service.broadcasts.values()
    ]
    return web.json_response({"streams": streams})


# -- capacity ------------------------------------------------------------------------------


async def capacity_get(request: web.Request, service: Service) -> web.Response:
    return web.json_response(service.capacity().as_dict())
