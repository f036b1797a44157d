"""Measuring the frame engine over a clip, as live streams would drive it.

The clip is decoded into memory first, so decoding never counts. Paced (the default),
frames are handed in at the clip's frame rate the way a camera delivers them, and a frame
that arrives while the pipeline is still busy replaces the waiting one and counts as
dropped; latency is from hand-in to the swapped frame. Unpaced, each frame is handed in
as soon as the engine takes the previous one: the engine's throughput. Several streams
are sessions of one engine, as the service's publishers are.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np

from livefuse.stream.engine import FrameEngine
from livefuse.stream.frames import FrameStats, ProcessedFrame, TrackedFace

# Frames the smoothing needs to settle before a track's jitter is measured.
_JITTER_SETTLE_FRAMES = 15
# Only tracks seen in at least this many frames are measured for jitter.
_JITTER_MIN_FRAMES = 30
# After the last frame is handed in, how long to wait for the pipeline to finish it.
_DRAIN_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Clip:
    frames: list[np.ndarray]
    width: int
    height: int
    fps: float
    truncated: bool = False
    """The video had more frames than were loaded."""


# Decoded frames are kept in memory (so decoding is never timed): 2.7 MB a 720p frame, so
# a long clip stops here rather than exhausting the machine (about 9 minutes of 720p30).
MAX_CLIP_BYTES = 4 * 1024**3


def load_clip(
    path: Path, *, max_frames: int | None = None, max_bytes: int = MAX_CLIP_BYTES
) -> Clip:
    """Decode a video's frames into memory as BGR arrays (at most `max_bytes` of them:
    `Clip.truncated` says when the video was longer)."""
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as error:
        raise ValueError(f"{path}: cannot open the video ({error})") from None
    with container:
        if not container.streams.video:
            raise ValueError(f"{path}: no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        fps = float(stream.average_rate or stream.guessed_rate or 30)
        frames: list[np.ndarray] = []
        size = 0
        truncated = False
        for frame in container.decode(stream):
            if (max_frames is not None and len(frames) >= max_frames) or size >= max_bytes:
                truncated = True
                break
            frames.append(frame.to_ndarray(format="bgr24"))
            size += frames[-1].nbytes
    if not frames:
        raise ValueError(f"{path}: the video has no frames")
    height, width = frames[0].shape[:2]
    return Clip(frames=frames, width=width, height=height, fps=fps, truncated=truncated)


@dataclass(frozen=True)
class FrameRecord:
    """What the bench keeps of a processed frame: its stats and faces, not its pixels.
    Holding every frame's pixels (2.7 MB at 720p) would make each new frame fresh memory
    the kernel must fault in, a cost no live stream pays, which the figures would show."""

    stats: FrameStats
    faces: tuple[TrackedFace, ...]


class BenchStream:
    """One stream of the bench: an engine session and what it handed back."""

    def __init__(self, engine: FrameEngine, **options: Any) -> None:
        self.outputs: list[FrameRecord] = []
        self.output_times: list[float] = []
        self._done = threading.Condition()
        self._on_frame: Callable[[ProcessedFrame], None] | None = None
        self.session = engine.open_session(on_output=self._keep, **options)

    def _keep(self, output: ProcessedFrame) -> None:
        with self._done:
            self.outputs.append(FrameRecord(stats=output.stats, faces=output.faces))
            self.output_times.append(time.perf_counter())
            self._done.notify_all()
        if self._on_frame is not None:
            self._on_frame(output)

    def warm_up(self, clip: Clip, frames: int) -> None:
        """The first frames at the clip's pace, one at a time, then the counts forgotten:
        the runtimes allocate and pick kernels on their first calls, and the swap
        processes load their models, which a live stream pays once at its start."""
        for index, frame in enumerate(clip.frames[:frames]):
            self.session.process(frame, timestamp=index / clip.fps)
            time.sleep(1 / clip.fps)
        self.session.reset()
        with self._done:
            self.outputs.clear()
            self.output_times.clear()

    def drive(self, clip: Clip, *, paced: bool, delay_s: float = 0.0) -> _Run:
        """Hand the clip in (paced at its rate, or as fast as the engine takes it) and
        wait for what comes out. Timestamps continue after the warm-up's."""
        time.sleep(delay_s)
        interval = 1.0 / clip.fps
        first = len(clip.frames)  # media time after any warm-up frames
        session = self.session
        started = time.perf_counter()
        for index, frame in enumerate(clip.frames):
            if paced:
                delay = started + index * interval - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            session.submit(frame, timestamp=(first + index) * interval, tag=index, block=not paced)
        # Every frame handed in either comes out or was replaced (dropped).
        with self._done:
            self._done.wait_for(
                lambda: len(self.outputs) + session.dropped >= session.submitted,
                timeout=_DRAIN_TIMEOUT_S,
            )
        outputs = list(self.outputs)
        elapsed = (self.output_times[-1] - started) if outputs else float("nan")
        return _Run(outputs=outputs, elapsed_s=elapsed, errors=dict(session.errors))


def run_bench(
    stream: BenchStream,
    clip: Clip,
    *,
    paced: bool = True,
    on_frame: Callable[[ProcessedFrame], None] | None = None,
) -> dict[str, object]:
    """One stream over the clip; the figures of DESIGN.md's bench JSON."""
    stream._on_frame = on_frame
    run = stream.drive(clip, paced=paced)
    return summarise(
        run.outputs,
        clip=clip,
        elapsed_s=run.elapsed_s,
        dropped=len(clip.frames) - len(run.outputs),
        errors=run.errors,
    )


def run_streams(streams: list[BenchStream], clip: Clip, *, paced: bool = True) -> dict[str, object]:
    """The clip as N concurrent streams on one engine, started a fraction of a frame
    apart as independent cameras would be. Latency percentiles are over every frame of
    every stream; `aggregate_fps` is all frames out over the longest stream's time."""
    runs: list[_Run | None] = [None] * len(streams)
    stagger = 1.0 / clip.fps / max(1, len(streams))

    def drive(index: int) -> None:
        runs[index] = streams[index].drive(clip, paced=paced, delay_s=index * stagger)

    threads = [
        threading.Thread(target=drive, args=(i,), name=f"bench-stream-{i}")
        for i in range(len(streams))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done = [run for run in runs if run is not None]
    if len(done) != len(streams):
        raise RuntimeError("a bench stream failed; see the log")
    outputs = [output for run in done for output in run.outputs]
    elapsed = max(run.elapsed_s for run in done)
    errors: Counter[str] = Counter()
    for run in done:
        errors.update(run.errors)
    figures = summarise(
        outputs,
        clip=clip,
        elapsed_s=elapsed,
        dropped=len(clip.frames) * len(streams) - len(outputs),
        errors=dict(errors),
    )
    per_stream = [
        {
            "frames_out": len(run.outputs),
            "dropped_frames": len(clip.frames) - len(run.outputs),
            "fps": round(len(run.outputs) / run.elapsed_s, 2) if run.elapsed_s > 0 else 0.0,
            "latency_ms": _percentiles([o.stats.latency_ms for o in run.outputs]),
        }
        for run in done
    ]
    return {
        **figures,
        "streams": len(streams),
        "aggregate_fps": figures["fps"],
        "fps": round(float(np.mean([stream["fps"] for stream in per_stream])), 2),
        "per_stream": per_stream,
    }


@dataclass
class _Run:
    outputs: list[FrameRecord]
    elapsed_s: float
    errors: dict[str, int]


def summarise(
    outputs: list[FrameRecord],
    *,
    clip: Clip,
    elapsed_s: float,
    dropped: int,
    errors: dict[str, int],
) -> dict[str, object]:
    latencies = [o.stats.latency_ms for o in outputs]
    stage_totals: dict[str, list[float]] = defaultdict(list)
    for output in outputs:
        for stage, ms in output.stats.stages_ms.items():
            stage_totals[stage].append(ms)
    return {
        "video": {
            "width": clip.width,
            "height": clip.height,
            "fps": round(clip.fps, 3),
            "frames": len(clip.frames),
        },
        "frames_out": len(outputs),
        "fps": round(len(outputs) / elapsed_s, 2) if outputs and elapsed_s > 0 else 0.0,
        "dropped_frames": dropped,
        "latency_ms": _percentiles(list(latencies)),
        "stages_ms": {
            stage: round(float(np.mean(values)), 2) for stage, values in stage_totals.items()
        },
        "faces_per_frame": _mean([o.stats.faces for o in outputs]),
        "swapped_faces_per_frame": _mean([o.stats.swapped for o in outputs]),
        "quality_levels": dict(Counter(o.stats.quality for o in outputs)),
        "errors": errors,
        "landmark_jitter_px": landmark_jitter(outputs),
    }


def landmark_jitter(outputs: list[FrameRecord]) -> dict[str, float | None]:
    """RMS distance (px) of each landmark from its own mean position, per track.

    On a static clip every movement of a landmark is jitter: this is the figure that
    shows the smoothing at work (`raw` is the landmark model's own fit, unsmoothed). On a
    moving clip it measures the motion, not the jitter.
    """
    smoothed: dict[int, list[np.ndarray]] = defaultdict(list)
    raw: dict[int, list[np.ndarray]] = defaultdict(list)
    for output in outputs:
        for face in output.faces:
            smoothed[face.track_id].append(face.points[:, :2])
            raw[face.track_id].append(face.raw_points[:, :2])

    def rms(per_track: dict[int, list[np.ndarray]]) -> float | None:
        squares, count = 0.0, 0
        for series in per_track.values():
            if len(series) < _JITTER_MIN_FRAMES:
                continue
            points = np.stack(series[_JITTER_SETTLE_FRAMES:])  # (frames, 468, 2)
            deviation = points - points.mean(axis=0)
            squares += float((deviation**2).sum(axis=2).sum())
            count += deviation.shape[0] * deviation.shape[1]
        return round(float(np.sqrt(squares / count)), 3) if count else None

    return {"smoothed": rms(smoothed), "raw": rms(raw)}


def _percentiles(latencies: list[float]) -> dict[str, float]:
    values = np.array(latencies) if latencies else np.zeros(1)
    return {f"p{p}": round(float(np.percentile(values, p)), 2) for p in (50, 95, 99)}


def _mean(values: list[int]) -> float:
    return round(float(np.mean(values)), 3) if values else 0.0
