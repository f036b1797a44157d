"""The aiohttp application: routes, CORS, Bearer auth and the error shape (DESIGN.md,
"Contracts"). Handlers are thin: the state lives in `Service`, the WebRTC work in
`webrtc`, source uploads in `sources`."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from livefuse.engines.pipeline import FacePipeline
from livefuse.settings import Settings
from livefuse.stream.quality import QUALITY_MODES
from livefuse.web import (
    auth,
    housekeeping,
    http_limits,
    ice,
    pages,
    peer_tasks,
    relay_api,
    tickets,
    webrtc,
)
from livefuse.web import metrics as metrics_module
from livefuse.web import sources as sources_module
from livefuse.web.errors import ApiError, json_error, sdp_error
from livefuse.web.service import LiveSession, Service

log = logging.getLogger("livefuse.http")

STATIC_DIR = Path(__file__).parent / "static"
SERVICE_KEY = web.AppKey("service", Service)
_SDP_PATHS = ("/whip", "/whep")
_CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Headers": "Authorization, Content-Type, If-Match",
    "Access-Control-Expose-Headers": "Location, ETag, Link, Retry-After, Accept-Post",
    "Access-Control-Max-Age": "600",
}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _is_sdp_path(path: str) -> bool:
    return path.startswith(_SDP_PATHS)


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as error:
        content_type, text = error.body()
        return web.Response(
            status=error.status, text=text, content_type=content_type, headers=error.headers
        )
    except web.HTTPException as error:
        if error.status < 400 or not request.path.startswith(("/api/", *_SDP_PATHS)):
            raise
        code = error.reason.lower().replace(" ", "_")
        message = f"{error.reason}: {request.method} {request.path}"
        shaped = (sdp_error if _is_sdp_path(request.path) else json_error)(
            error.status, code, message
        )
        content_type, text = shaped.body()
        headers = {k: v for k, v in error.headers.items() if k.lower() == "allow"}
        return web.Response(
            status=error.status, text=text, content_type=content_type, headers=headers
        )
    except (HttpProcessingError, RecursionError, ConnectionResetError) as error:
        # The client's fault, found while its body is read: a malformed chunked or
        # multipart body (aiohttp's parser errors), JSON nested past the parser's
        # recursion limit, a client gone mid-body. One line, no traceback.
        status, code, message = _client_error(error)
        log.info(
            "event=bad_request method=%s path=%s status=%d reason=%r",
            request.method,
            request.path[:200],
            status,
            message,
        )
        shaped = (sdp_error if _is_sdp_path(request.path) else json_error)(status, code, message)
        content_type, text = shaped.body()
        return web.Response(status=status, text=text, content_type=content_type)
    except Exception as error:
        # A bug, not a bad request: the traceback goes to the log, the client gets the
        # contract's error shape, and the service keeps running.
        log.exception("%s %s failed", request.method, request.path)
        if not request.path.startswith(("/api/", *_SDP_PATHS)):
            raise
        shaped = (sdp_error if _is_sdp_path(request.path) else json_error)(
            500, "internal", f"the server failed on this request ({type(error).__name__})"
        )
        content_type, text = shaped.body()
        return web.Response(status=500, text=text, content_type=content_type)


def _client_error(error: BaseException) -> tuple[int, str, str]:
    """(status, code, one-line message) for a client error raised while reading a body."""
    if isinstance(error, RecursionError):
        return 400, "bad_json", "the body is not JSON this server reads: nested too deeply"
    if isinstance(error, ConnectionResetError):
        return 400, "connection_lost", "the client went away before its request was read"
    assert isinstance(error, HttpProcessingError)
    reason = " ".join(str(error.message).split())[:200] or type(error).__name__
    return 400, "bad_body", f"the request body is malformed: {reason}"


@web.middleware
async def _cors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Any origin may call the API (OBS, a page on another host); the token is the guard."""
    if not request.path.startswith(("/api/", *_SDP_PATHS)):
        return await handler(request)
    if request.method == "OPTIONS":
        headers = {**_CORS_HEADERS, "Access-Control-Allow-Methods": _allowed(request.path)}
        if (
            request.path.rstrip("/") == "/whip"
            or request.path.count("/") == 2
            and (request.path.startswith("/whep/"))
        ):
            headers["Accept-Post"] = webrtc.SDP_TYPE
        return web.Response(status=204, headers=headers)
    response = await handler(request)
    response.headers.update(_CORS_HEADERS)
    return response


def _allowed(path: str) -> str:
    if path.startswith(_SDP_PATHS):
        return "POST, PATCH, DELETE, OPTIONS"
    return "GET, POST, PATCH, DELETE, OPTIONS"


def _auth(settings: Settings) -> Any:
    """Bearer tokens by scope (web/auth.py): 401 without a known token, 403 with one
    whose scope does not cover the request."""
    tokens = auth.Tokens(settings)
    ticket_key = tickets.ticket_key(settings)
    ticket_book = tickets.TicketBook(ticket_key) if ticket_key is not None else None

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not tokens.enabled:
            return await handler(request)
        allowed = auth.required_scopes(request.method, request.path)
        if allowed is None:
            return await handler(request)
        header = request.headers.get("Authorization", "")
        scope = tokens.scope_of(header)
        if scope in allowed:
            return await handler(request)
        ticket = request.query.get("ticket")
        if (
            scope is None
            and ticket is not None
            and ticket_book is not None
            and request.method == "POST"
            and _is_sdp_path(request.path)
            and ticket_book.accept(ticket, request.method, request.path)
        ):
            # A peer redirected this offer here after checking its token (web/tickets.py).
            return await handler(request)
        service = request.app[SERVICE_KEY]
        make = sdp_error if _is_sdp_path(request.path) else json_error
        if scope is None:
            service.metrics.refused.labels(reason="auth").inc()
            raise make(
                401,
                "unauthorized",
                "this server needs an access token: send Authorization: Bearer <token>"
                if not header
                else "the access token is wrong",
                headers={"WWW-Authenticate": 'Bearer realm="livefuse"'},
            )
        service.metrics.refused.labels(reason="scope").inc()
        raise make(
            403,
            "forbidden",
            f"a {scope.value} token may not {request.method} {request.path[:100]}: "
            f"that takes {auth.describe(allowed)}",
        )

    return middleware


# -- handlers ---------------------------------------------------------------------------


async def _page(request: web.Request) -> web.FileResponse:
    name = "index.html" if request.path == "/" else "watch.html"
    return web.FileResponse(STATIC_DIR / name, headers={"Cache-Control": "no-cache"})


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    service = request.app[SERVICE_KEY]
    engine = service.engine
    if not service.ready or engine is None:
        raise json_error(503, "not_ready", f"not ready: {service.problem}")
    # A stage failing on every frame: no session can swap, whatever else works.
    if failing := engine.health.problem():
        raise json_error(503, "not_ready", f"not ready: {failing}")
    body: dict[str, Any] = {"ready": True, "sessions": len(service.sessions)}
    if engine.swap_pool is not None and (degraded := engine.swap_pool.problem()):
        body["degraded"] = degraded  # swapping still works, slower
    return web.json_response(body)


async def _metrics(request: web.Request) -> web.Response:
    service = request.app[SERVICE_KEY]
    response = web.Response(body=service.metrics.render())
    response.headers["Content-Type"] = metrics_module.CONTENT_TYPE
    return response


async def _create_source(request: web.Request) -> web.Response:
    service = request.app[SERVICE_KEY]
    if not service.ready or service.face_pipeline is None:
        raise json_error(
            503, "not_ready", f"not ready: {service.problem}", headers={"Retry-After": "5"}
        )
    return await sources_module.create_source(
        request,
        pipeline=service.face_pipeline,
        store=service.sources,
        preparer=service.preparer,
        max_bytes=service.settings.max_image_bytes,
        max_pixels=service.settings.max_image_pixels,
    )


def _source_or_404(service: Service, source_id: str) -> sources_module.Source:
    source = service.sources.get(source_id)
    if source is None:
        raise json_error(404, "unknown_source", f"no source face with id {source_id!r}")
    return source


async def _get_source(request: web.Request) -> web.Response:
    service = request.app[SERVICE_KEY]
    return web.json_response(_source_or_404(service, request.match_info["id"]).as_dict())


async def _delete_source(request: web.Request) -> web.Response:
    service = request.app[SERVICE_KEY]
    if not service.sources.remove(request.match_info["id"]):
        raise json_error(
            404, "unknown_source", f"no source face with id {request.match_info['id']!r}"
        )
    return web.Response(status=204)


async def _list_sessions(request: web.Request) -> web.Response:
    service = request.app[SERVICE_KEY]
    return web.json_response({"sessions": [s.as_dict() for s in service.sessions.values()]})


def _session_or_404(service: Service, session_id: str) -> LiveSession:
    session = service.sessions.get(session_id)
    if session is None:
        raise json_error(404, "unknown_session", f"no live session {session_id!r}")
    return session


async def _get_session(request: web.Request) -> web.Response:
    service = request.app[SERVICE_KEY]
    return web.json_response(_session_or_404(service, request.match_info["id"]).as_dict())


async def _patch_session(request: web.Request) -> web.Response:
    """Change a live session's source, quality, on/off, faces or label; applies from the next
    frame, with no renegotiation. All fields are checked before any is applied."""
    service = request.app[SERVICE_KEY]
    session = _session_or_404(service, request.match_info["id"])
    if request.content_length is not None and request.content_length > 64 * 1024:
        raise json_error(413, "too_large", "the request body is larger than 64 KiB")
    try:
        body = json.loads(await request.read() or b"{}")
    except (ValueError, UnicodeDecodeError) as error:
        raise json_error(400, "bad_json", f"the body is not JSON: {error}") from error
    if not isinstance(body, dict):
        raise json_error(400, "bad_json", "the body must be a JSON object")
    unknown = set(body) - {"source", "quality", "enabled", "faces", "label"}
    if unknown:
        raise json_error(422, "unknown_field", f"unknown field(s): {', '.join(sorted(unknown))}")
    source = session.source
    if "source" in body:
        if body["source"] is None:
            source = None
        elif isinstance(body["source"], str):
            source = service.sources.get(body["source"])
            if source is None:
                raise json_error(
                    422, "unknown_source", f"no source face with id {body['source']!r}"
                )
        else:
            raise json_error(422, "bad_source", "source must be a source id or null")
    if "quality" in body and body["quality"] not in QUALITY_MODES:
        raise json_error(422, "bad_quality", f"quality must be one of {', '.join(QUALITY_MODES)}")
    if "enabled" in body and not isinstance(body["enabled"], bool):
        raise json_error(422, "bad_enabled", "enabled must be true or false")
    if "faces" in body and body["faces"] not in webrtc.FACE_SELECTIONS:
        raise json_error(422, "bad_faces", "faces must be all or largest")
    if "label" in body and not isinstance(body["label"], bool):
        raise json_error(422, "bad_label", "label must be true or false")
    live = session.stream.engine_session
    if "source" in body:
        session.source = source
        live.source = source.face if source else None
    if "quality" in body:
        live.quality = body["quality"]
    if "enabled" in body:
        live.enabled = body["enabled"]
    if "faces" in body:
        live.face_selection = body["faces"]
    if "label" in body:
        live.label = body["label"]
    return web.json_response(session.as_dict())


def _with_service(
    handler: Callable[[web.Request, Service], Awaitable[web.StreamResponse]],
) -> Handler:
    async def wrapped(request: web.Request) -> web.StreamResponse:
        return await handler(request, request.app[SERVICE_KEY])

    return wrapped


# -- the app ----------------------------------------------------------------------------


def create_app(settings: Settings, *, face_pipeline: FacePipeline | None = None) -> web.Application:
    """The app; its models load in the background once it starts (see /readyz)."""
    app = web.Application(
        middlewares=[http_limits.url_limit, _cors, _errors, _auth(settings)],
        client_max_size=settings.max_sdp_bytes,
        handler_args=http_limits.handler_args(),
    )
    service = Service(settings=settings, face_pipeline=face_pipeline)
    app[SERVICE_KEY] = service

    async def start(_: web.Application) -> None:
        peer_tasks.quiet_aborted_connects(asyncio.get_running_loop())
        await service.start()

    async def stop(_: web.Application) -> None:
        await service.stop()

    app.on_startup.append(start)
    app.on_shutdown.append(stop)
    app.cleanup_ctx.append(housekeeping.heap_trimmer(settings.heap_trim_interval_s))
    if settings.metrics_port is not None:
        app.cleanup_ctx.append(
            metrics_module.scrape_listener(
                service.metrics, host=settings.metrics_host, port=settings.metrics_port
            )
        )
    app.router.add_get("/", _page)
    app.router.add_get("/watch/{session}", _page)
    app.router.add_get("/favicon.ico", pages.favicon)
    app.router.add_static("/static/", STATIC_DIR, append_version=True)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    app.router.add_post("/api/v1/sources", _create_source)
    app.router.add_get("/api/v1/sources/{id}", _get_source)
    app.router.add_delete("/api/v1/sources/{id}", _delete_source)
    app.router.add_get("/api/v1/ice-servers", _with_service(ice.ice_servers_get))
    app.router.add_get("/api/v1/sessions", _list_sessions)
    app.router.add_get("/api/v1/sessions/{id}", _get_session)
    app.router.add_patch("/api/v1/sessions/{id}", _patch_session)
    # The broadcast relay (web/relay_api.py): ingests, RTMP pushes, named streams.
    app.router.add_post("/api/v1/ingests", _with_service(relay_api.ingest_post))
    app.router.add_get("/api/v1/ingests", _with_service(relay_api.ingest_list))
    app.router.add_get("/api/v1/ingests/{id}", _with_service(relay_api.ingest_get))
    app.router.add_delete("/api/v1/ingests/{id}", _with_service(relay_api.ingest_delete))
    for outputs in ("/api/v1/sessions/{id}/outputs", "/api/v1/streams/{id}/outputs"):
        app.router.add_post(outputs, _with_service(relay_api.output_post))
        app.router.add_get(outputs, _with_service(relay_api.output_list))
        app.router.add_delete(outputs + "/{output}", _with_service(relay_api.output_delete))
    app.router.add_get("/api/v1/streams", _with_service(relay_api.stream_list))
    app.router.add_get("/api/v1/capacity", _with_service(relay_api.capacity_get))
    # `/whip` and `/whip/` publish a session of its own; `/whip/NAME` a named stream.
    app.router.add_post("/whip", _with_service(webrtc.whip_post))
    app.router.add_post("/whip/", _with_service(webrtc.whip_post))
    app.router.add_post("/whip/{name}", _with_service(webrtc.whip_post))
    app.router.add_patch("/whip/{session}", _with_service(webrtc.whip_patch))
    app.router.add_delete("/whip/{session}", _with_service(webrtc.whip_delete))
    app.router.add_post("/whep/{session}", _with_service(webrtc.whep_post))
    app.router.add_get("/whep/{session}", _with_service(pages.stream_state))  # for /watch
    app.router.add_patch("/whep/{session}/{viewer}", _with_service(webrtc.whep_patch))
    app.router.add_delete("/whep/{session}/{viewer}", _with_service(webrtc.whep_delete))
    return app
