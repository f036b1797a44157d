"""`livefuse relay`: one feed in, swapped, pushed on; one process, no server.

    livefuse relay --input rtmp://encoder/live/cam --source face.jpg \\
                   --output rtmp://platform/app/STREAM-KEY

The feed is pulled (stream/ingest.py), every frame goes through the process's one frame
engine like a live session's, and the swapped video with the feed's own audio is pushed
on (stream/push.py). A status line says how it goes: fps in and out, frames dropped, the
quality level, the push's bitrate and state. A live input that drops is reconnected, and
so is an output that goes away; a file input that ends ends the relay. Ctrl-C (or
SIGTERM) finishes the push cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from livefuse.engines.backend import BackendUnavailable, select_backend
from livefuse.engines.images import ImageError, read_image
from livefuse.engines.pipeline import NoFaceError
from livefuse.engines.swapper import SourceFace
from livefuse.settings import Settings
from livefuse.stream.engine import FrameEngine
from livefuse.stream.feeds import INGEST_SCHEMES, PUSH_SCHEMES, FeedUrlError, check_url
from livefuse.stream.ingest import Ingest
from livefuse.stream.push import PushOutput
from livefuse.stream.session import StreamSession
from livefuse.stream.startup import load_pipeline, start_engine

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
_STATUS_EVERY_S = 1.0


def _say(message: str) -> None:
    print(f"livefuse relay: {message}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace, settings: Settings) -> int:
    try:
        check_url(args.input, schemes=INGEST_SCHEMES)
        check_url(args.output, schemes=PUSH_SCHEMES)
    except FeedUrlError as error:
        _say(str(error))
        return EXIT_USAGE
    try:
        backend = select_backend(args.backend, threads=settings.threads)
    except BackendUnavailable as error:
        _say(str(error))
        return EXIT_USAGE
    try:
        source_image = read_image(
            args.source, max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels
        )
    except ImageError as error:
        _say(f"source: {error}")
        return EXIT_USAGE
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    pipeline = load_pipeline(settings, backend=backend)
    try:
        try:
            source = pipeline.prepare_source(source_image).face
        except NoFaceError:
            _say(f"source: no face found in {args.source}; use a photo with a clear, visible face")
            return EXIT_USAGE
        engine = start_engine(pipeline, settings)
        try:
            bitrate = args.bitrate or settings.push_bitrate_kbps
            return asyncio.run(_relay(args, engine, source, bitrate))
        finally:
            engine.close()
    finally:
        pipeline.close()


async def _relay(
    args: argparse.Namespace, engine: FrameEngine, source: SourceFace, bitrate: int
) -> int:
    loop = asyncio.get_running_loop()
    ended = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, ended.set)
    session = StreamSession(
        session_id="relay",
        engine=engine,
        loop=loop,
        idle_timeout_s=float("inf"),
        quality=args.quality,
        face_selection=args.faces,
        label=args.label,
    )
    session.engine_session.source = source
    ingest = Ingest(
        url=args.input,
        session=session,
        on_end=lambda _: loop.call_soon_threadsafe(ended.set),
    )
    push = PushOutput(
        output_id="relay", url=args.output, channel=session.channel, loop=loop, bitrate_kbps=bitrate
    )
    push.start()
    ingest.start()
    _say(f"{ingest.shown_url} -> {push.shown_url} (Ctrl-C to stop)")
    status = _StatusLine()
    try:
        deadline = None if args.seconds is None else loop.time() + args.seconds
        while not ended.is_set():
            timeout = _STATUS_EVERY_S
            if deadline is not None:
                timeout = min(timeout, max(0.0, deadline - loop.time()))
            try:
                await asyncio.wait_for(ended.wait(), timeout)
            except TimeoutError:
                pass
            status.show(session, ingest, push)
            if deadline is not None and loop.time() >= deadline:
                break
    finally:
        await asyncio.to_thread(ingest.close)
        # Let the last frames in the engine reach the push before it finishes the FLV.
        await asyncio.sleep(0.3)
        await push.close()
        await session.close()
        status.done(session, ingest, push)
    pushed = push.stats()
    if ingest.frames and pushed.frames_sent:
        return EXIT_OK
    # Nothing went through: say why, and let a script see it in the exit status.
    _say(
        "nothing was relayed: "
        + (
            f"the input gave no frame ({ingest.last_error or 'none came'})"
            if not ingest.frames
            else f"the output took no frame ({pushed.last_error or 'it never connected'})"
        )
    )
    return EXIT_FAILURE


class _StatusLine:
    """One line, rewritten in place on a terminal, a line every few seconds otherwise."""

    def __init__(self) -> None:
        self._tty = sys.stderr.isatty()
        self._shown = 0

    @staticmethod
    def _text(session: StreamSession, ingest: Ingest, push: PushOutput) -> str:
        stats, out = session.stats(), push.stats()
        text = (
            f"in {ingest.state} {stats.fps_in:5.1f} fps | out {out.state} "
            f"{stats.fps_out:5.1f} fps {out.bitrate_kbps:6.0f} kbps | dropped {stats.dropped} "
            f"| latency p95 {stats.latency_ms['p95']:.0f} ms | quality {stats.quality} "
            f"| faces {stats.swapped}/{stats.faces}"
        )
        if "retrying" in (ingest.state, out.state):
            text += f" | {ingest.last_error or out.last_error}"
        return text

    def show(self, session: StreamSession, ingest: Ingest, push: PushOutput) -> None:
        self._shown += 1
        text = self._text(session, ingest, push)
        if self._tty:
            print(f"\r{text[:160]:<160}", end="", file=sys.stderr, flush=True)
        elif self._shown % 5 == 0:
            print(text, file=sys.stderr, flush=True)

    def done(self, session: StreamSession, ingest: Ingest, push: PushOutput) -> None:
        if self._tty:
            print(file=sys.stderr)
        stats, out = session.stats(), push.stats()
        _say(
            f"done: {stats.frames_in} frames in, {out.frames_sent} out "
            f"({out.repeats} repeated), {stats.dropped} dropped, {out.reconnects} reconnects"
        )
