"""A moving 720p clip made from one still photo, for tests, benches and the browser tests.

A real camera never holds still: the picture pans, zooms, rolls a little, the light
drifts and the sensor adds noise. `render_clip` animates a photo that way (smooth,
seeded, so a clip can be made again identically), and `write_clip` stores it as mp4
(H.264, for the bench and the WHIP clients) or y4m (raw, what Chromium's fake camera
reads). `static=True` keeps only the noise: the clip the landmark-jitter check uses.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import cast

import av
import cv2
import numpy as np
from av.video.stream import VideoStream

_SUFFIX_FORMATS = {".mp4": ("mp4", "libx264"), ".y4m": ("yuv4mpegpipe", "rawvideo")}


def render_clip(
    photo_bgr: np.ndarray,
    *,
    seconds: float = 10.0,
    fps: int = 30,
    size: tuple[int, int] = (1280, 720),
    seed: int = 0,
    noise: float = 2.0,
    static: bool = False,
) -> Iterator[np.ndarray]:
    """BGR frames of `size` (width, height). `noise` is the sensor noise's sigma in levels."""
    width, height = size
    rng = np.random.default_rng(seed)
    # Cover the frame with the photo, with room to pan and zoom without showing an edge.
    photo_h, photo_w = photo_bgr.shape[:2]
    cover = max(width / photo_w, height / photo_h) * (1.0 if static else 1.12)
    # Slow, incommensurate periods so the motion does not visibly repeat.
    phases = rng.uniform(0, 2 * math.pi, size=5)
    for index in range(round(seconds * fps)):
        t = index / fps
        if static:
            pan_x = pan_y = roll = 0.0
            zoom = light = 1.0
        else:
            pan_x = 0.04 * width * math.sin(2 * math.pi * t / 7.0 + phases[0])
            pan_y = 0.03 * height * math.sin(2 * math.pi * t / 5.3 + phases[1])
            zoom = 1.0 + 0.05 * math.sin(2 * math.pi * t / 9.1 + phases[2])
            roll = 4.0 * math.sin(2 * math.pi * t / 6.2 + phases[3])
            light = 1.0 - 0.12 * (0.5 + 0.5 * math.sin(2 * math.pi * t / 8.3 + phases[4]))
        # Photo pixels -> frame pixels: scale about the photo centre, roll, then centre
        # the photo in the frame shifted by the pan.
        affine = cv2.getRotationMatrix2D((photo_w / 2, photo_h / 2), roll, cover * zoom)
        affine[:, 2] += (width / 2 - photo_w / 2 + pan_x, height / 2 - photo_h / 2 + pan_y)
        frame = cv2.warpAffine(
            photo_bgr,
            affine,
            (width, height),
            flags=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_REFLECT,
        )
        if light != 1.0 or noise > 0:
            shaded = frame.astype(np.float32) * np.float32(light)
            if noise > 0:
                shaded += rng.normal(0.0, noise, size=shaded.shape).astype(np.float32)
            frame = np.clip(shaded, 0, 255).astype(np.uint8)
        yield frame


def write_clip(
    photo_bgr: np.ndarray,
    path: Path,
    *,
    seconds: float = 10.0,
    fps: int = 30,
    size: tuple[int, int] = (1280, 720),
    seed: int = 0,
    noise: float = 2.0,
    static: bool = False,
) -> Path:
    """Write the clip to `path`: .mp4 (H.264) or .y4m (raw 4:2:0), by suffix."""
    suffix = path.suffix.lower()
    if suffix not in _SUFFIX_FORMATS:
        raise ValueError(f"clip must end in .mp4 or .y4m, not {path.name!r}")
    container_format, codec = _SUFFIX_FORMATS[suffix]
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format=container_format) as container:
        stream = cast(VideoStream, container.add_stream(codec, rate=Fraction(fps)))
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            # High quality so the bench measures the pipeline, not compression artefacts.
            stream.options = {"crf": "16", "preset": "fast"}
        frames = render_clip(
            photo_bgr,
            seconds=seconds,
            fps=fps,
            size=size,
            seed=seed,
            noise=noise,
            static=static,
        )
        for image in frames:
            frame = av.VideoFrame.from_ndarray(image, format="bgr24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
