"""Swapping faces through a video file: decode, swap every frame, encode, keep the audio.

The frames go through the frame engine like a live stream's (tracking, landmark
smoothing), only unpaced and pinned to the `high` level, keeping every frame: a face is
followed from frame to frame instead of found afresh in each, so it does not flicker.

Nothing is lost on failure: the video is written to a temporary file beside the output
and moved into place only when it is complete, so an existing file is never truncated
or removed by a run that fails. Audio packets are copied across untouched when the
output container can hold their codec, and re-encoded to AAC when it cannot. Frame
timestamps are kept, so variable-frame-rate video stays in sync with its audio. A
frame whose swap fails is written unswapped and counted: never a black frame.
"""

from __future__ import annotations

import os
import queue
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import av.error
import numpy as np

from livefuse.engines.pipeline import FaceSelection
from livefuse.engines.swapper import SourceFace
from livefuse.stream.engine import FrameEngine
from livefuse.stream.frames import ProcessedFrame

# The largest frame we agree to process (8K UHD); beyond that is a mistake or an attack.
MAX_VIDEO_PIXELS = 7680 * 4320
# H.264 in 4:2:0 needs even sides, so the smallest frame we can write is 2x2.
MIN_VIDEO_SIDE = 2
# After the last frame is handed in, how long to wait for each frame still in the engine.
_LAST_FRAMES_TIMEOUT_S = 30.0


class VideoError(ValueError):
    """A video that cannot be read or written; the message says why."""


@dataclass
class VideoReport:
    frames: int = 0
    frames_with_faces: int = 0
    faces_swapped: int = 0
    failed_frames: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    audio: str = "none"  # "copied", "re-encoded" or "none"


def _frame_count(stream: av.video.stream.VideoStream) -> int | None:
    if stream.frames:
        return int(stream.frames)
    if stream.duration and stream.time_base and stream.average_rate:
        return int(stream.duration * stream.time_base * stream.average_rate)
    return None


def swap_video(
    engine: FrameEngine,
    source: SourceFace,
    input_path: Path,
    output_path: Path,
    *,
    faces: FaceSelection = "all",
    on_frame: Callable[[int, int | None], None] | None = None,
) -> VideoReport:
    """Swap every frame of `input_path` into `output_path`; `on_frame(done, total)` ticks."""
    # Same suffix as the output: the container format is chosen from the file name.
    partial = output_path.with_name(
        f".{output_path.stem}.partial-{os.getpid()}{output_path.suffix}"
    )
    try:
        report = _swap_into(engine, source, input_path, partial, output_path, faces, on_frame)
        os.replace(partial, output_path)
    finally:
        partial.unlink(missing_ok=True)
    return report


def _swap_into(
    engine: FrameEngine,
    source: SourceFace,
    input_path: Path,
    partial: Path,
    output_path: Path,
    faces: FaceSelection,
    on_frame: Callable[[int, int | None], None] | None,
) -> VideoReport:
    try:
        source_container = av.open(str(input_path))
    except (av.error.FFmpegError, OSError) as error:
        raise VideoError(f"{input_path}: not a readable image or video ({error})") from error
    with source_container:
        if not source_container.streams.video:
            raise VideoError(f"{input_path}: has no video stream")
        video_in = source_container.streams.video[0]
        width, height = video_in.codec_context.width, video_in.codec_context.height
        if min(width or 0, height or 0) < MIN_VIDEO_SIDE:
            raise VideoError(f"{input_path}: frames of {width}x{height} are too small")
        if width * height > MAX_VIDEO_PIXELS:
            raise VideoError(f"{input_path}: {width}x{height} frames exceed the 8K limit")
        audio_in = source_container.streams.audio[0] if source_container.streams.audio else None
        report = VideoReport()
        try:
            sink = av.open(str(partial), mode="w")
        except (av.error.FFmpegError, OSError, ValueError) as error:
            raise VideoError(f"{output_path}: cannot write a video here ({error})") from error
        with sink:
            try:
                video_out = sink.add_stream("libx264", rate=video_in.average_rate or Fraction(30))
                video_out.width, video_out.height = width - width % 2, height - height % 2
                video_out.pix_fmt = "yuv420p"
                video_out.time_base = video_in.time_base
                video_out.options = {"crf": "18", "preset": "veryfast"}
                audio_out, audio_encoder = _audio_output(sink, audio_in, report)
                # Write the header now, so a container that cannot hold these streams is
                # reported as an output problem, not as a decoding failure later.
                sink.start_encoding()
            except (av.error.FFmpegError, ValueError, OSError) as error:
                raise VideoError(
                    f"{output_path}: cannot write H.264 video in this format ({error}); "
                    "use .mp4, .mkv or .mov"
                ) from error
            total = _frame_count(video_in)
            streams = [video_in] + ([audio_in] if audio_in is not None else [])
            # The engine hands frames back on its own thread; they are encoded and muxed
            # here, on the thread that owns the containers.
            swapped: queue.Queue[ProcessedFrame | None] = queue.Queue()
            session = engine.open_session(
                on_output=swapped.put,
                quality="high",
                face_selection=faces,
                detect_in_background=False,
            )
            session.source = source
            writer = _FrameWriter(video_out, sink, report, on_frame, total)
            fps = float(video_in.average_rate or 30)
            try:
                for packet in source_container.demux(*streams):
                    if packet.stream is video_in:
                        for frame in packet.decode():
                            assert isinstance(frame, av.VideoFrame)
                            timestamp = (
                                float(frame.time) if frame.time is not None else writer.sent / fps
                            )
                            # Every frame kept: wait for the engine to take the last one.
                            session.submit(frame, timestamp=timestamp, tag=frame, block=True)
                            writer.sent += 1
                            writer.write_ready(swapped)
                    elif audio_out is not None and packet.dts is not None:
                        _write_audio(packet, audio_out, audio_encoder, sink)
                writer.write_rest(swapped, unreadable=lambda: session.errors["to_array"])
            except av.error.FFmpegError as error:
                raise VideoError(f"{input_path}: decoding failed ({error})") from error
            finally:
                session.close()
            for packet in video_out.encode():
                sink.mux(packet)
            if audio_encoder is not None:
                for packet in audio_encoder.encode(None):
                    sink.mux(packet)
    if report.frames == 0:
        raise VideoError(f"{input_path}: no video frames could be decoded")
    return report


def _audio_output(
    sink: av.container.OutputContainer,
    audio_in: av.audio.stream.AudioStream | None,
    report: VideoReport,
) -> tuple[av.stream.Stream | None, av.audio.stream.AudioStream | None]:
    """(stream to mux into, encoder if re-encoding) for the input's audio."""
    if audio_in is None:
        return None, None
    if audio_in.codec_context.name in sink.supported_codecs:
        report.audio = "copied"
        return sink.add_stream_from_template(audio_in), None
    encoder = sink.add_stream("aac", rate=audio_in.codec_context.sample_rate or 48000)
    report.audio = "re-encoded"
    return encoder, encoder


def _write_audio(
    packet: av.packet.Packet,
    audio_out: av.stream.Stream,
    audio_encoder: av.audio.stream.AudioStream | None,
    sink: av.container.OutputContainer,
) -> None:
    if audio_encoder is None:
        packet.stream = audio_out
        sink.mux(packet)
        return
    for frame in packet.decode():
        if not isinstance(frame, av.AudioFrame):
            continue
        frame.pts = None
        for encoded in audio_encoder.encode(frame):
            sink.mux(encoded)


class _FrameWriter:
    """Encodes the engine's frames in order as they come back."""

    def __init__(
        self,
        video_out: av.video.stream.VideoStream,
        sink: av.container.OutputContainer,
        report: VideoReport,
        on_frame: Callable[[int, int | None], None] | None,
        total: int | None,
    ) -> None:
        self.video_out, self.sink, self.report = video_out, sink, report
        self.on_frame, self.total = on_frame, total
        self.sent = 0

    def write_ready(self, swapped: queue.Queue[ProcessedFrame | None]) -> None:
        while True:
            try:
                self.write(swapped.get_nowait())
            except queue.Empty:
                return

    def write_rest(
        self, swapped: queue.Queue[ProcessedFrame | None], *, unreadable: Callable[[], int]
    ) -> None:
        """Wait for the frames still in the engine; `unreadable()` counts the frames whose
        pixels could not be read, which never come back."""
        while self.report.frames + unreadable() < self.sent:
            try:
                self.write(swapped.get(timeout=_LAST_FRAMES_TIMEOUT_S))
            except queue.Empty:
                raise VideoError(
                    f"the engine did not return {self.sent - self.report.frames} frame(s)"
                ) from None
        lost = unreadable()
        if lost:
            self.report.failed_frames += lost
            self.report.errors["to_array"] = lost

    def write(self, processed: ProcessedFrame | None) -> None:
        assert processed is not None
        report, video_out = self.report, self.video_out
        frame = processed.tag
        assert isinstance(frame, av.VideoFrame)
        stats = processed.stats
        if stats.error is not None:
            # The frame goes out unswapped rather than not at all; the error is counted.
            report.failed_frames += 1
            stage = stats.error.split(":", 1)[0]
            report.errors[stage] = report.errors.get(stage, 0) + 1
        elif stats.swapped:
            report.frames_with_faces += 1
            report.faces_swapped += stats.swapped
        report.frames += 1
        even = np.ascontiguousarray(processed.image[: video_out.height, : video_out.width])
        out_frame = av.VideoFrame.from_ndarray(even, format="bgr24")
        # Keep the source's timing: variable frame rates and offsets stay in sync with audio.
        out_frame.pts, out_frame.time_base = frame.pts, frame.time_base
        for packet in video_out.encode(out_frame):
            self.sink.mux(packet)
        if self.on_frame is not None:
            self.on_frame(report.frames, self.total)
