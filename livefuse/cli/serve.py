"""`livefuse serve`: the WebRTC service (WHIP/WHEP, the pages, the API) on aiohttp + uvloop.

It listens only on loopback unless a token is set or `--insecure` says otherwise: a
face-swap service open to a network with no token would let anyone stream through it.
SIGINT/SIGTERM end every session cleanly (their peers get a BYE-equivalent close) before
the process exits.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import signal
import sys
from collections.abc import Callable

from aiohttp import web

from livefuse.engines.backend import Backend, BackendUnavailable, select_backend
from livefuse.settings import Settings
from livefuse.web.app import SERVICE_KEY, create_app
from livefuse.web.peers import parse_peers

EXIT_OK, EXIT_USAGE = 0, 2


def _say(message: str) -> None:
    print(f"livefuse serve: {message}", file=sys.stderr, flush=True)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name other than localhost may resolve to anything


def run(args: argparse.Namespace, settings: Settings) -> int:
    updates = {
        key: value
        for key, value in (
            ("host", args.host),
            ("port", args.port),
            ("token", args.token),
            ("max_sessions", args.max_sessions),
            ("peers", args.peers),
            ("relay_whip", args.relay_whip),
            ("label_default", args.label),
            ("publish_tokens", args.publish_token),
            ("view_tokens", args.view_token),
            ("metrics_port", args.metrics_port),
            ("metrics_host", args.metrics_host),
        )
        if value is not None
    }
    settings = settings.model_copy(update=updates)
    if problem := settings.token_problem():
        _say(f"{problem}: give each --token, --publish-token and --view-token a value of its own")
        return EXIT_USAGE
    try:
        backend = select_backend(args.backend, threads=settings.threads)
    except BackendUnavailable as error:
        _say(str(error))
        return EXIT_USAGE
    if settings.peers is not None:
        try:
            parse_peers(settings.peers)
        except ValueError as error:
            _say(str(error))
            return EXIT_USAGE
    if settings.max_sessions < 1:
        _say("--max-sessions must be at least 1")
        return EXIT_USAGE
    if not is_loopback(settings.host) and not settings.has_tokens and not args.insecure:
        _say(
            f"refusing to listen on {settings.host} without a token: anyone who can reach it "
            "could stream through it. Set --token T (or LIVEFUSE_TOKEN), listen on 127.0.0.1, "
            "or pass --insecure if the network is yours alone."
        )
        return EXIT_USAGE
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
    )
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    return _run_loop(_serve(settings, backend))


def _run_loop(main: object) -> int:
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # uvloop has no Windows build; the default loop works too
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(main)  # type: ignore[arg-type]


async def _serve(settings: Settings, backend: Backend) -> int:
    app = create_app(settings)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=5.0)
    try:
        await runner.setup()  # starts the /metrics listener when metrics_port is set
    except OSError as error:
        await runner.cleanup()
        _say(str(error))
        return EXIT_USAGE
    site = web.TCPSite(runner, settings.host, settings.port)
    try:
        await site.start()
    except OSError as error:
        await runner.cleanup()
        _say(f"cannot listen on {settings.host}:{settings.port}: {error.strerror or error}")
        return EXIT_USAGE
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    port = runner.addresses[0][1] if runner.addresses else settings.port
    shown = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    base = f"http://{shown}:{port}"
    print(f"livefuse is serving at {base}/", flush=True)
    print(f"  models run on the {backend.name} backend", flush=True)
    print(f"  OBS WHIP output: server {base}/whip  (viewers: {base}/watch/SESSION)", flush=True)
    if settings.has_tokens:
        print(
            "  a Bearer token is required on /api, /whip, /whep and /metrics "
            "(publish tokens for WHIP, view tokens for viewers)",
            flush=True,
        )
    if settings.metrics_port is not None:
        print(
            f"  Prometheus: http://{settings.metrics_host}:{settings.metrics_port}/metrics "
            "(no token)",
            flush=True,
        )
    service = app[SERVICE_KEY]
    waiter = asyncio.ensure_future(stop.wait())
    while not stop.is_set() and not service.ready and service.problem == "the models are loading":
        await asyncio.wait([waiter], timeout=0.2)
    if service.ready:
        print("  models loaded and warm: ready", flush=True)
    elif not stop.is_set():
        _say(f"not ready: {service.problem} (the server stays up; /readyz says 503)")
    await waiter
    _say("shutting down: ending every session")
    await runner.cleanup()
    return EXIT_OK
