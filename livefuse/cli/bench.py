"""`livefuse bench`: the real-time pipeline over a clip, timed the way a live stream drives it.

The figures come from `stream.bench.run_bench`; this module prepares the pipeline as the
service does (models loaded once, the source face prepared once, a short warm-up that is
not timed), prints a table and writes DESIGN.md's JSON with what was measured on what.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from livefuse.engines.backend import BackendUnavailable, select_backend
from livefuse.engines.images import ImageError, read_image
from livefuse.engines.pipeline import FacePipeline, NoFaceError
from livefuse.engines.store import ModelStore
from livefuse.settings import Settings
from livefuse.stream.bench import BenchStream, Clip, load_clip, run_bench, run_streams
from livefuse.stream.engine import FrameEngine

EXIT_OK, EXIT_BAD_INPUT = 0, 2
# Frames run through a throwaway pipeline first: the runtimes allocate and pick kernels
# on their first calls, which a live stream pays once at session start, not per frame.
_WARMUP_FRAMES = 30
# One intra-op thread per model: the scheduler already runs its two stages on two threads,
# and more threads per stage than cores only adds contention.
_THREADS_PER_STAGE = 1


def _say(message: str) -> None:
    print(f"livefuse bench: {message}", file=sys.stderr)


def cpu_name() -> str:
    """The CPU's model name as the kernel reports it (platform.processor() is often empty)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_description() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu_name()}, {cores} cores"


def run(args: argparse.Namespace, settings: Settings) -> int:
    try:
        backend = select_backend(args.backend, threads=_THREADS_PER_STAGE)
    except BackendUnavailable as error:
        _say(str(error))
        return EXIT_BAD_INPUT
    limits = {"max_bytes": settings.max_image_bytes, "max_pixels": settings.max_image_pixels}
    try:
        source_image = read_image(args.source, **limits)
    except ImageError as error:
        _say(f"source: {error}")
        return EXIT_BAD_INPUT
    try:
        clip = load_clip(args.video)
    except ValueError as error:
        _say(str(error))
        return EXIT_BAD_INPUT
    if clip.truncated:
        _say(
            f"the video is long: timing its first {len(clip.frames)} frames "
            f"({len(clip.frames) / clip.fps:.0f} s), which fit in memory"
        )

    faces = FacePipeline.from_store(ModelStore(settings.models_dir), threads=_THREADS_PER_STAGE)
    try:
        source = faces.prepare_source(source_image).face
    except NoFaceError:
        _say(f"source: no face found in {args.source}; use a photo with a clear, visible face")
        return EXIT_BAD_INPUT

    # One engine, as the service has: its stage workers serve every stream, and on the CPU
    # its swap processes take part of each batch's faces.
    engine = FrameEngine(
        faces=faces, target_fps=clip.fps, swap_processes=settings.resolved_swap_processes
    )
    try:
        engine.wait_ready()
        streams = []
        for _ in range(args.streams):
            stream = BenchStream(engine, quality=args.quality, face_selection=args.faces)
            stream.session.source = source
            streams.append(stream)
        for stream in streams:
            stream.warm_up(clip, _WARMUP_FRAMES)
        engine.restart_quality()

        mode = "unpaced" if args.unpaced else "paced"
        count = f", {args.streams} streams" if args.streams > 1 else ""
        print(
            f"livefuse bench: {len(clip.frames)} frames of {clip.width}x{clip.height} at "
            f"{clip.fps:g} fps, {mode}, quality {args.quality}{count}",
            file=sys.stderr,
        )
        started = time.time()
        if args.streams == 1:
            figures = run_bench(streams[0], clip, paced=not args.unpaced)
        else:
            figures = run_streams(streams, clip, paced=not args.unpaced)
        figures["engine"] = engine.metrics.snapshot()
    finally:
        engine.close()
        faces.close()
    result: dict[str, Any] = {
        "device": device_description(),
        "backend": backend.name,
        "mode": mode,
        "quality": args.quality,
        "faces": args.faces,
        "source": str(args.source),
        "video_file": str(args.video),
        "command": shlex.join(["livefuse", *sys.argv[1:]]) if sys.argv else "livefuse bench",
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        **figures,
    }
    print_table(result, clip)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"livefuse bench: wrote {args.json}", file=sys.stderr)
    return EXIT_OK


def print_table(result: dict[str, Any], clip: Clip) -> None:
    table = Table(title=f"livefuse bench: {result['device']}, {result['backend']}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    latency = result["latency_ms"]
    table.add_row("video", f"{clip.width}x{clip.height} @ {clip.fps:g} fps, {len(clip.frames)}")
    table.add_row("mode / quality", f"{result['mode']} / {result['quality']}")
    table.add_row("frames out / dropped", f"{result['frames_out']} / {result['dropped_frames']}")
    table.add_row("fps", f"{result['fps']:.1f}")
    if "streams" in result:
        table.add_row(
            "streams / aggregate fps", f"{result['streams']} / {result['aggregate_fps']:.1f}"
        )
    table.add_row(
        "latency p50 / p95 / p99 ms",
        f"{latency['p50']:.1f} / {latency['p95']:.1f} / {latency['p99']:.1f}",
    )
    table.add_row(
        "stages ms (mean)",
        ", ".join(f"{stage} {ms:.1f}" for stage, ms in result["stages_ms"].items()),
    )
    table.add_row(
        "faces / swapped per frame",
        f"{result['faces_per_frame']:.2f} / {result['swapped_faces_per_frame']:.2f}",
    )
    table.add_row(
        "quality levels", ", ".join(f"{k} {v}" for k, v in result["quality_levels"].items())
    )
    jitter = result["landmark_jitter_px"]
    if jitter["smoothed"] is not None:
        table.add_row(
            "landmark jitter px RMS (static clips)",
            f"{jitter['smoothed']} (raw {jitter['raw']})",
        )
    if result["errors"]:
        table.add_row("errors", ", ".join(f"{k} {v}" for k, v in result["errors"].items()))
    Console().print(table)
