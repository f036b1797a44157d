"""Swapping faces through a video file: decode, swap frame by frame, encode, keep the audio.

Nothing is lost on failure: the video is written to a temporary file beside the output
and moved into place only when it is complete, so an existing file is never truncated
or removed by a run that fails. Audio packets are copied across untouched when the
output container can hold their codec, and re-encoded to AAC when it cannot. Frame
timestamps are kept, so variable-frame-rate video stays in sync with its audio. A
frame whose swap fails is written unswapped and counted: never a black frame.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import av.error
import numpy as np

from livefuse.engines.pipeline import FacePipeline, FaceSelection
from livefuse.engines.swapper import SourceFace

# The largest frame we agree to process (8K UHD); beyond that is a mistake or an attack.
MAX_VIDEO_PIXELS = 7680 * 4320
# H.264 in 4:2:0 needs even sides, so the smallest frame we can write is 2x2.
MIN_VIDEO_SIDE = 2


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
    pipeline: FacePipeline,
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
        report = _swap_into(pipeline, source, input_path, partial, output_path, faces, on_frame)
        os.replace(partial, output_path)
    finally:
        partial.unlink(missing_ok=True)
    return report


def _swap_into(
    pipeline: FacePipeline,
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
            try:
                for packet in source_container.demux(*streams):
                    if packet.stream is video_in:
                        for frame in packet.decode():
                            assert isinstance(frame, av.VideoFrame)
                            _swap_frame(pipeline, source, frame, video_out, sink, faces, report)
                            if on_frame is not None:
                                on_frame(report.frames, total)
                    elif audio_out is not None and packet.dts is not None:
                        _write_audio(packet, audio_out, audio_encoder, sink)
            except av.error.FFmpegError as error:
                raise VideoError(f"{input_path}: decoding failed ({error})") from error
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


def _swap_frame(
    pipeline: FacePipeline,
    source: SourceFace,
    frame: av.VideoFrame,
    video_out: av.video.stream.VideoStream,
    sink: av.container.OutputContainer,
    faces: FaceSelection,
    report: VideoReport,
) -> None:
    image = frame.to_ndarray(format="bgr24")
    output = image
    try:
        meshes = pipeline.find_faces(image)
        if meshes:
            output = pipeline.swap_faces(image, source, meshes, faces=faces)
            report.frames_with_faces += 1
            report.faces_swapped += 1 if faces == "largest" else len(meshes)
    except Exception as error:  # noqa: BLE001 - the frame edge: any failure is counted
        # The frame goes out unswapped rather than not at all; the error is counted.
        output = image
        report.failed_frames += 1
        name = type(error).__name__
        report.errors[name] = report.errors.get(name, 0) + 1
    report.frames += 1
    even: np.ndarray = np.ascontiguousarray(output[: video_out.height, : video_out.width])
    out_frame = av.VideoFrame.from_ndarray(even.astype(np.uint8, copy=False), format="bgr24")
    # Keep the source's timing: variable frame rates and offsets stay in sync with audio.
    out_frame.pts, out_frame.time_base = frame.pts, frame.time_base
    for packet in video_out.encode(out_frame):
        sink.mux(packet)
