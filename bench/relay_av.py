"""The broadcast relay measured end to end: RTMP in -> `livefuse relay` -> RTMP out, through
a real nginx-rtmp, as an encoder and a platform would see it.

    .venv/bin/python -m bench.relay_av --seconds 60 --json bench/results/relay-cpu-2core.json

- The feed: a clip of a face (the astronaut, 1280x720 at 30 fps by default), encoded once
  beforehand (H.264 + AAC, as an encoder on another machine would) and sent in real time
  in a loop. Every frame carries its number in a barcode in the top-left corner (away
  from the face), and every 2 s a flash (a white band along the bottom) comes on the same
  frame as a 1 kHz beep.
- The relay: `livefuse relay --input rtmp://.../in --output rtmp://.../out`, a process of
  its own, as a user runs it.
- The reader plays rtmp://.../out and records, for each frame, when it arrived and its
  barcode; and where the flashes and the beeps are on the output's timeline.

Reported: frames per second out (distinct frames, and with repeats), the in-to-out delay
(from the feed sending a frame to the reader decoding it: p50/p95), the A/V offset at each
flash (audio onset minus flash, ms: the relay keeps them together if it stays within
+-40 ms), and whether the audio lasted as long as the video.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

from bench.rtmp_server import nginx_rtmp, nginx_rtmp_missing

FPS = 30
AUDIO_RATE = 48_000
MARK_EVERY_FRAMES = 60
"""A flash and a beep every 2 s."""
MARK_FRAMES = 3
"""The flash lasts 3 frames and the beep as long (100 ms)."""
BEEP_HZ = 1000.0
_BITS = 12
_CELL = 20
"""Barcode: 12 cells of 20x20 px, white = 1, between two white guard cells."""


def draw_barcode(frame: np.ndarray, number: int) -> None:
    for bit in range(_BITS + 2):
        on = bit in (0, _BITS + 1) or (number >> (bit - 1)) & 1
        x = bit * _CELL
        frame[0:_CELL, x : x + _CELL] = 255 if on else 0


def read_barcode(gray: np.ndarray) -> int | None:
    cells = [
        float(gray[4 : _CELL - 4, b * _CELL + 4 : (b + 1) * _CELL - 4].mean())
        for b in range(_BITS + 2)
    ]
    if cells[0] < 160 or cells[-1] < 160:
        return None
    return sum(1 << (b - 1) for b in range(1, _BITS + 1) if cells[b] > 128)


def has_flash(gray: np.ndarray) -> bool:
    return float(gray[-gray.shape[0] // 10 :, :].mean()) > 200


@dataclass
class EncodedFeed:
    """A clip encoded once, as an FLV file in memory, ready to be sent in a loop."""

    flv: bytes
    width: int
    height: int
    frames: int

    @property
    def seconds(self) -> float:
        return self.frames / FPS


def encode_feed(
    photo: np.ndarray, *, seconds: float = 10.0, size: tuple[int, int] = (1280, 720)
) -> EncodedFeed:
    """The marked clip (see the module's docstring) as H.264 + AAC in FLV."""
    from livefuse.stream.clip import render_clip

    width, height = size
    frames = round(seconds * FPS)
    buffer = io.BytesIO()
    container = av.open(buffer, "w", format="flv")
    video = container.add_stream("libx264", rate=FPS)
    video.width, video.height, video.pix_fmt = width, height, "yuv420p"
    video.bit_rate = 4_000_000
    # An encoder's usual live settings: a keyframe a second, no B-frames.
    video.options = {"preset": "veryfast", "tune": "zerolatency", "g": str(FPS), "bf": "0"}
    audio = container.add_stream("aac", rate=AUDIO_RATE)
    audio.layout = "stereo"
    audio.bit_rate = 128_000
    rendered = render_clip(photo, seconds=seconds, fps=FPS, size=size, noise=0.0)
    for index, image in enumerate(rendered):
        image = image.copy()
        draw_barcode(image, index)
        if index % MARK_EVERY_FRAMES < MARK_FRAMES:
            image[-height // 10 :, :] = 255
        frame = av.VideoFrame.from_ndarray(image, format="bgr24")
        frame.pts = index
        frame.time_base = Fraction(1, FPS)
        container.mux(video.encode(frame))
    container.mux(video.encode(None))
    samples = round(seconds * AUDIO_RATE)
    t = np.arange(samples) / AUDIO_RATE
    wave = np.zeros(samples, np.float32)
    for start_frame in range(0, frames, MARK_EVERY_FRAMES):
        start = round(start_frame / FPS * AUDIO_RATE)
        stop = start + round(MARK_FRAMES / FPS * AUDIO_RATE)
        wave[start:stop] = 0.5 * np.sin(2 * np.pi * BEEP_HZ * t[start:stop])
    for start in range(0, samples - 1024 + 1, 1024):
        chunk = np.stack([wave[start : start + 1024]] * 2)
        sound = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="stereo")
        sound.sample_rate = AUDIO_RATE
        sound.pts = start
        sound.time_base = Fraction(1, AUDIO_RATE)
        container.mux(audio.encode(sound))
    container.mux(audio.encode(None))
    container.close()
    return EncodedFeed(flv=buffer.getvalue(), width=width, height=height, frames=frames)


@dataclass
class Publisher:
    """Sends an `EncodedFeed` to an RTMP URL in real time, looping, until stopped."""

    url: str
    feed: EncodedFeed
    sent_at: dict[int, list[float]] = field(default_factory=dict)
    """Frame number (within the loop) -> the wall times it was sent."""
    error: str | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        try:
            self._send()
        except (av.error.FFmpegError, OSError) as error:
            self.error = f"{type(error).__name__}: {error}"

    def _send(self) -> None:
        source = av.open(io.BytesIO(self.feed.flv), "r", format="flv")
        container = av.open(self.url, "w", format="flv")
        try:
            outputs = {s.index: container.add_stream_from_template(s) for s in source.streams}
            # (time in s, data, pts, stream index, keyframe) in the file's order.
            packets = [
                (float(p.pts * p.time_base), bytes(p), p.pts, p.stream.index, p.is_keyframe)
                for p in source.demux()
                if p.pts is not None
            ]
            bases = {s.index: s.time_base for s in source.streams}
            video_index = source.streams.video[0].index
            start = time.monotonic()
            for lap in range(1_000_000):
                for at, data, pts, index, key in packets:
                    due = start + lap * self.feed.seconds + at
                    if self._stop.wait(max(0.0, due - time.monotonic())):
                        return
                    packet = av.Packet(data)
                    shift = round(lap * self.feed.seconds / bases[index])
                    packet.pts = packet.dts = pts + shift
                    packet.time_base = bases[index]
                    packet.stream = outputs[index]
                    packet.is_keyframe = key
                    if index == video_index:
                        number = round(at * FPS)
                        self.sent_at.setdefault(number, []).append(time.time())
                    container.mux(packet)
        finally:
            container.close()
            source.close()


@dataclass
class Playback:
    """Plays an RTMP URL and keeps what the measures need (not the pictures)."""

    url: str
    keep_every: int = 0
    """Keep every Nth decoded picture (BGR) in `pictures` (0: none)."""
    arrivals: list[tuple[float, int | None, float]] = field(default_factory=list)
    """(wall time decoded, barcode number, pts in s) per video frame."""
    flashes: list[float] = field(default_factory=list)
    """pts (s) of the first frame of each flash."""
    audio_level: list[tuple[float, float]] = field(default_factory=list)
    """(pts in s, RMS) per 5 ms of audio."""
    pictures: list[np.ndarray] = field(default_factory=list)
    keyframes: list[float] = field(default_factory=list)
    """pts (s) of the keyframes."""
    audio_seconds: float = 0.0
    error: str | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="playback", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(15)

    def _run(self) -> None:
        deadline = time.monotonic() + 60
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                self._play()
                return
            except (av.error.FFmpegError, OSError) as error:  # not published yet: again
                self.error = f"{type(error).__name__}: {error}"
                self._stop.wait(0.5)

    def _play(self) -> None:
        container = av.open(self.url, options={"rtmp_live": "live"}, timeout=(5.0, 5.0))
        self.error = None
        try:
            streams = [*container.streams.video[:1], *container.streams.audio[:1]]
            flash_on = False
            count = 0
            for packet in container.demux(*streams):
                if self._stop.is_set():
                    return
                for frame in packet.decode():
                    if isinstance(frame, av.VideoFrame):
                        count += 1
                        gray = frame.to_ndarray(format="gray")
                        pts = float(frame.time or 0.0)
                        self.arrivals.append((time.time(), read_barcode(gray), pts))
                        if frame.key_frame:
                            self.keyframes.append(pts)
                        flash = has_flash(gray)
                        if flash and not flash_on:
                            self.flashes.append(pts)
                        flash_on = flash
                        if self.keep_every and count % self.keep_every == 0:
                            self.pictures.append(frame.to_ndarray(format="bgr24"))
                    elif isinstance(frame, av.AudioFrame):
                        samples = frame.to_ndarray().astype(np.float32)
                        mono = (
                            samples.reshape(-1) if frame.format.is_planar is False else samples[0]
                        )
                        rate = frame.sample_rate
                        self.audio_seconds += frame.samples / rate
                        step = rate // 200
                        start = float(frame.time or 0.0)
                        for i in range(0, len(mono) - step + 1, step):
                            level = float(np.sqrt(np.mean(mono[i : i + step] ** 2)))
                            self.audio_level.append((start + i / rate, level))
        finally:
            container.close()


def beep_onsets(levels: list[tuple[float, float]]) -> list[float]:
    if not levels:
        return []
    peak = max(level for _, level in levels)
    threshold = peak * 0.3
    onsets, on = [], False
    for at, level in levels:
        if level > threshold and not on:
            onsets.append(at)
        on = level > threshold
    return onsets


def av_offsets_ms(flashes: list[float], beeps: list[float]) -> list[float]:
    """Audio onset minus flash, for each flash with a beep within half a second."""
    offsets = []
    for flash in flashes:
        near = [b for b in beeps if abs(b - flash) < 0.5]
        if near:
            beep = min(near, key=lambda b: abs(b - flash))
            offsets.append((beep - flash) * 1000)
    return offsets


def delays_ms(publisher: Publisher, playback: Playback) -> list[float]:
    """For each frame read back with its barcode: decoded minus last sent, in ms."""
    delays = []
    for arrived, number, _ in playback.arrivals:
        if number is None:
            continue
        sends = [t for t in publisher.sent_at.get(number, []) if t <= arrived]
        if sends:
            delays.append((arrived - sends[-1]) * 1000)
    return delays


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def summarise(publisher: Publisher, playback: Playback, seconds: float) -> dict[str, object]:
    arrivals = playback.arrivals
    span = (arrivals[-1][0] - arrivals[0][0]) if len(arrivals) > 1 else 0.0
    numbers = [n for _, n, _ in arrivals if n is not None]
    distinct = sum(1 for a, b in zip(numbers, numbers[1:], strict=False) if a != b) + bool(numbers)
    delays = delays_ms(publisher, playback)
    offsets = av_offsets_ms(playback.flashes, beep_onsets(playback.audio_level))
    video_seconds = (arrivals[-1][2] - arrivals[0][2]) if len(arrivals) > 1 else 0.0
    return {
        "seconds": seconds,
        "frames_out": len(arrivals),
        "fps_out": round((len(arrivals) - 1) / span, 2) if span else 0.0,
        "distinct_fps_out": round((distinct - 1) / span, 2) if span else 0.0,
        "delay_ms": {
            "p50": round(percentile(delays, 50), 1),
            "p95": round(percentile(delays, 95), 1),
        },
        "av_offset_ms": {
            "markers": len(offsets),
            "flashes": len(playback.flashes),
            "median": round(percentile(offsets, 50), 1),
            "min": round(min(offsets), 1) if offsets else None,
            "max": round(max(offsets), 1) if offsets else None,
        },
        "audio_seconds": round(playback.audio_seconds, 2),
        "video_seconds": round(video_seconds, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--size", default="1280x720")
    parser.add_argument("--quality", default="auto")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--machine", default="cpu-2core")
    args = parser.parse_args()
    if (why := nginx_rtmp_missing()) is not None:
        print(f"relay_av: {why}", file=sys.stderr)
        return 2
    from livefuse.settings import Settings

    testdata = Settings().testdata_dir
    photo = cv2.imread(str(testdata / "astronaut.png"))[0:288, 0:512]
    source = testdata / "Tom_Hanks_54745.png"
    width, height = (int(v) for v in args.size.split("x"))
    print("relay_av: encoding the feed ...", file=sys.stderr)
    feed = encode_feed(photo, seconds=10.0, size=(width, height))
    with nginx_rtmp() as server:
        publisher = Publisher(server.url("in"), feed)
        publisher.start()
        relay = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "livefuse.cli.main",
                "relay",
                "--input",
                server.url("in"),
                "--source",
                str(source),
                "--output",
                server.url("out"),
                "--quality",
                args.quality,
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        playback = Playback(server.url("out"))
        playback.start()
        try:
            # The relay loads its models first: measure from the first frame out.
            deadline = time.monotonic() + 120
            while not playback.arrivals and time.monotonic() < deadline and relay.poll() is None:
                time.sleep(0.2)
            time.sleep(2.0)  # settle (the quality controller's first steps)
            playback.arrivals.clear()
            playback.flashes.clear()
            playback.audio_level.clear()
            playback.audio_seconds = 0.0
            time.sleep(args.seconds)
        finally:
            playback.stop()
            relay.terminate()
            _, relay_log = relay.communicate(timeout=30)
            publisher.stop()
    result = {
        "machine": args.machine,
        "feed": {"width": width, "height": height, "fps": FPS},
        "relay": summarise(publisher, playback, args.seconds),
        # The relay's own status lines (every 5 s: fps, drops, the quality level in force).
        "relay_status": [
            line for line in relay_log.splitlines() if line.startswith(("in ", "livefuse relay:"))
        ],
        "publisher_error": publisher.error,
        "playback_error": playback.error,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
