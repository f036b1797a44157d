"""An independent WHIP client: publish a clip sendrecv, time the frames that come back.

Written against the HTTP contract only (aiohttp for HTTP, aiortc for WebRTC, PyAV to read
the clip); it imports nothing from livefuse. For a fair baseline it runs the same client
against a bare aiortc echo server (`--echo`, in this file: WHIP in, the decoded video
re-encoded straight back) in the same invocation.

Every frame sent carries its index as a 16-bit code of black and white blocks in its
top-left corner (the face swap never touches that corner); a frame that comes back is
matched to the one sent by that code, so latency is measured per frame, end to end:
client encode, network, server decode, processing, server encode, client decode.

    python bench/whip_bench.py --clip clip.mp4 --source face.png \\
        --serve '.venv/bin/livefuse serve --port {port}' --seconds 20 \\
        --json bench/results/whip-cpu-2core.json --frames-dir /tmp/returned

Both ends use libx264 `ultrafast`/`zerolatency` and the same bitrate caps: the echo and
livefuse then differ only by what livefuse does to the frames.
"""

from __future__ import annotations

import argparse
import asyncio
import fractions
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import av
import numpy as np
from aiohttp import web
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.codecs import h264
from aiortc.mediastreams import MediaStreamError

CLOCK = 90_000
BLOCK = 24  # px per code bit
BITS = 16
CODE_ROWS = 2


# -- codec settings shared by both ends -----------------------------------------------


def fast_h264() -> None:
    """libx264 ultrafast/zerolatency and 8 Mbit/s caps for every aiortc H.264 encoder here.

    aiortc rebuilds its encoder whenever the target bitrate moves by 10 %, so the whole
    frame method is replaced, not only the first set-up.
    """
    h264.MIN_BITRATE, h264.DEFAULT_BITRATE, h264.MAX_BITRATE = 800_000, 3_000_000, 8_000_000

    def encode(self: Any, frame: av.VideoFrame, force_keyframe: bool) -> Iterator[bytes]:
        if self.codec is not None and (
            frame.width != self.codec.width
            or frame.height != self.codec.height
            or abs(self.target_bitrate - self.codec.bit_rate) / self.codec.bit_rate > 0.1
        ):
            self.buffer_data, self.buffer_pts, self.codec = b"", None, None
        frame.pict_type = (
            av.video.frame.PictureType.I if force_keyframe else av.video.frame.PictureType.NONE
        )
        if self.codec is None:
            self.codec = av.CodecContext.create("libx264", "w")
            self.codec.width, self.codec.height = frame.width, frame.height
            self.codec.bit_rate = self.target_bitrate
            self.codec.pix_fmt = "yuv420p"
            self.codec.framerate = fractions.Fraction(30, 1)
            self.codec.time_base = fractions.Fraction(1, 30)
            self.codec.options = {"level": "40", "tune": "zerolatency", "preset": "ultrafast"}
            self.codec.profile = "Baseline"
        data = b"".join(bytes(packet) for packet in self.codec.encode(frame))
        if data:
            yield from self._split_bitstream(data)

    h264.H264Encoder._encode_frame = encode  # type: ignore[method-assign]


def prefer_h264(pc: RTCPeerConnection) -> None:
    from aiortc import RTCRtpSender

    capabilities = RTCRtpSender.getCapabilities("video").codecs
    ordered = sorted(capabilities, key=lambda c: c.mimeType.lower() != "video/h264")
    for transceiver in pc.getTransceivers():
        if transceiver.kind == "video":
            transceiver.setCodecPreferences(ordered)


# -- the frame code ---------------------------------------------------------------------


def stamp(i420: np.ndarray, width: int, height: int, index: int) -> None:
    """Write `index` into the Y plane's top-left corner (U/V there set to grey)."""
    per_row = BITS // CODE_ROWS
    for bit in range(BITS):
        row, col = divmod(bit, per_row)
        y0, x0 = row * BLOCK, col * BLOCK
        i420[y0 : y0 + BLOCK, x0 : x0 + BLOCK] = 235 if (index >> bit) & 1 else 16
    chroma_rows = CODE_ROWS * BLOCK // 2
    chroma_cols = per_row * BLOCK // 2
    u = i420[height : height + height // 4].reshape(height // 2, width // 2)
    v = i420[height + height // 4 :].reshape(height // 2, width // 2)
    u[:chroma_rows, :chroma_cols] = 128
    v[:chroma_rows, :chroma_cols] = 128


def read_code(gray: np.ndarray, scale: float) -> int:
    per_row = BITS // CODE_ROWS
    value = 0
    for bit in range(BITS):
        row, col = divmod(bit, per_row)
        cy = int((row * BLOCK + BLOCK / 2) * scale)
        cx = int((col * BLOCK + BLOCK / 2) * scale)
        r = max(1, int(BLOCK * scale / 4))
        if gray[cy - r : cy + r, cx - r : cx + r].mean() > 128:
            value |= 1 << bit
    return value


# -- the publisher ----------------------------------------------------------------------


def load_clip(path: Path, max_frames: int) -> tuple[list[np.ndarray], int, int, float]:
    """Up to `max_frames` frames as I420 planes (looped when sent)."""
    frames = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or 30)
        for frame in container.decode(stream):
            frames.append(frame.to_ndarray(format="yuv420p"))
            width, height = frame.width, frame.height
            if len(frames) >= max_frames:
                break
    return frames, width, height, fps


class ClipTrack(MediaStreamTrack):
    kind = "video"

    def __init__(self, frames: list[np.ndarray], width: int, height: int, fps: float) -> None:
        super().__init__()
        self.frames, self.width, self.height, self.fps = frames, width, height, fps
        self.sent: dict[int, float] = {}
        self.index = 0
        self.start: float | None = None

    async def recv(self) -> av.VideoFrame:
        if self.start is None:
            self.start = time.monotonic()
        due = self.start + self.index / self.fps
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        planes = self.frames[self.index % len(self.frames)].copy()
        code = self.index % (1 << BITS)
        stamp(planes, self.width, self.height, code)
        frame = av.VideoFrame.from_ndarray(planes, format="yuv420p")
        frame.pts = int(self.index * CLOCK / self.fps)
        frame.time_base = fractions.Fraction(1, CLOCK)
        self.sent[code] = time.monotonic()
        self.index += 1
        return frame


async def publish(
    base: str,
    clip: tuple[list[np.ndarray], int, int, float],
    *,
    seconds: float,
    source: bytes | None,
    frames_dir: Path | None,
    warmup: float,
    quality: str | None = None,
) -> dict[str, Any]:
    frames, width, height, fps = clip
    async with aiohttp.ClientSession() as http:
        query = ""
        if source is not None:
            async with http.post(
                f"{base}/api/v1/sources",
                data=source,
                headers={"Content-Type": "image/png"},
            ) as response:
                body = await response.json()
                if response.status != 201:
                    raise SystemExit(f"source upload failed: {response.status} {body}")
                query = f"?source={body['id']}"
                if quality:
                    query += f"&quality={quality}"
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        track = ClipTrack(frames, width, height, fps)
        pc.addTransceiver(track, direction="sendrecv")
        prefer_h264(pc)
        returned: list[tuple[int, float, int]] = []  # code, arrival, width
        kept: list[np.ndarray] = []
        done = asyncio.Event()

        async def read_back(remote: MediaStreamTrack) -> None:
            next_save = 0.0
            while not done.is_set():
                try:
                    frame = await remote.recv()
                except MediaStreamError:
                    return
                arrived = time.monotonic()
                gray = frame.to_ndarray(format="gray")
                code = read_code(gray, frame.width / width)
                returned.append((code, arrived, frame.width))
                t0 = track.start or arrived
                if frames_dir is not None and arrived - t0 >= max(warmup, next_save):
                    # Kept in memory and written at the end: a PNG write here would stall
                    # this loop, and with it the client's own RTP.
                    next_save = arrived - t0 + 1.0
                    kept.append(frame.to_ndarray(format="rgb24"))

        readers: list[asyncio.Task[None]] = []

        @pc.on("track")
        def on_track(remote: MediaStreamTrack) -> None:
            if remote.kind == "video":
                readers.append(asyncio.ensure_future(read_back(remote)))

        await pc.setLocalDescription(await pc.createOffer())
        async with http.post(
            f"{base}/whip{query}",
            data=pc.localDescription.sdp,
            headers={"Content-Type": "application/sdp"},
        ) as response:
            text = await response.text()
            if response.status != 201:
                raise SystemExit(f"WHIP POST failed: {response.status} {text}")
            location = response.headers["Location"]
        await pc.setRemoteDescription(RTCSessionDescription(sdp=text, type="answer"))
        await asyncio.sleep(seconds)
        done.set()
        session_stats = None
        if location.startswith("/whip/"):
            async with http.get(f"{base}/api/v1/sessions/{location.split('/')[-1]}") as r:
                if r.status == 200:
                    session_stats = (await r.json()).get("stats")
        async with http.delete(f"{base}{location}"):
            pass
        await pc.close()
        for reader in readers:
            reader.cancel()
    saved = []
    for number, rgb in enumerate(kept):
        path = frames_dir / f"returned_{number:03d}.png"  # type: ignore[operator]
        await asyncio.to_thread(
            av.VideoFrame.from_ndarray(rgb, format="rgb24").to_image().save, path
        )
        saved.append(path.name)
    return summarise(track, returned, warmup, saved, session_stats)


def summarise(
    track: ClipTrack,
    returned: list[tuple[int, float, int]],
    warmup: float,
    saved: list[str],
    session_stats: Any,
) -> dict[str, Any]:
    start = track.start or 0.0
    steady = [(c, t, w) for c, t, w in returned if t - start >= warmup]
    latencies, seen = [], set()
    for code, arrived, _ in steady:
        if code in seen or code not in track.sent:
            continue  # a repeated frame, or a code misread
        seen.add(code)
        latency = (arrived - track.sent[code]) * 1000
        if 0 <= latency < 5000:
            latencies.append(latency)
    span = (steady[-1][1] - steady[0][1]) if len(steady) > 1 else 0.0
    ordered = sorted(latencies)

    def pct(q: float) -> float:
        if not ordered:
            return float("nan")
        return round(ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))], 1)

    return {
        "frames_sent": track.index,
        "frames_returned": len(returned),
        "steady_seconds": round(span, 2),
        "unique_frames_per_s": round(len(seen) / span, 2) if span else 0.0,
        "frames_per_s": round(len(steady) / span, 2) if span else 0.0,
        "latency_ms": {
            "p50": pct(50),
            "p95": pct(95),
            "p99": pct(99),
            "mean": round(statistics.fmean(latencies), 1) if latencies else None,
        },
        "returned_width": steady[-1][2] if steady else None,
        "saved_frames": saved,
        "server_stats": session_stats,
    }


# -- the bare echo server ---------------------------------------------------------------


def run_echo_server(port: int) -> None:
    fast_h264()
    peers: set[RTCPeerConnection] = set()

    async def whip(request: web.Request) -> web.Response:
        offer = await request.text()
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        peers.add(pc)

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind == "video":
                pc.addTrack(track)  # the decoded frames, straight back to the encoder

        await pc.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        return web.Response(
            status=201,
            text=pc.localDescription.sdp,
            content_type="application/sdp",
            headers={"Location": f"/echo/{id(pc)}"},
        )

    async def delete(request: web.Request) -> web.Response:
        for pc in list(peers):
            if str(id(pc)) == request.match_info["id"]:
                peers.discard(pc)
                await pc.close()
        return web.Response(status=200)

    async def ready(request: web.Request) -> web.Response:
        return web.Response(text="echo\n")

    app = web.Application()
    app.router.add_get("/", ready)
    app.router.add_post("/whip", whip)
    app.router.add_delete("/echo/{id}", delete)
    web.run_app(app, host="127.0.0.1", port=port, print=None)


# -- orchestration ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_ready(base: str, path: str, *, within_s: float = 120.0) -> None:
    deadline = time.monotonic() + within_s
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            try:
                async with http.get(base + path) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.5)
    raise SystemExit(f"{base}{path} never answered 200")


def run_against(
    command: list[str], ready_path: str, port: int, args: argparse.Namespace, **kwargs: Any
) -> dict[str, Any]:
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        asyncio.run(wait_ready(base, ready_path))
        clip = load_clip(args.clip, args.loop_frames)
        return asyncio.run(publish(base, clip, seconds=args.seconds, warmup=args.warmup, **kwargs))
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clip", type=Path, required=True)
    parser.add_argument("--source", type=Path, required=True)
    parser.add_argument(
        "--serve",
        default=f"{sys.executable} -m livefuse.cli.main serve --port {{port}}",
        help="command that starts the server under test; {port} is filled in",
    )
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds not counted")
    parser.add_argument("--loop-frames", type=int, default=150)
    parser.add_argument("--quality", help="livefuse's quality mode (default: its own, auto)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--frames-dir", type=Path)
    parser.add_argument("--echo-server", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo_server:
        run_echo_server(args.echo_server)
        return 0
    fast_h264()
    if args.frames_dir:
        args.frames_dir.mkdir(parents=True, exist_ok=True)

    port = free_port()
    print("echo server run", file=sys.stderr)
    echo = run_against(
        [
            sys.executable,
            os.path.abspath(__file__),
            "--clip",
            str(args.clip),
            "--source",
            str(args.source),
            "--echo-server",
            str(port),
        ],
        "/",
        port,
        args,
        source=None,
        frames_dir=None,
    )
    port = free_port()
    print(json.dumps(echo), file=sys.stderr)
    print("livefuse run", file=sys.stderr)
    livefuse = run_against(
        shlex.split(args.serve.format(port=port)),
        "/readyz",
        port,
        args,
        source=args.source.read_bytes(),
        frames_dir=args.frames_dir,
        quality=args.quality,
    )
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "processor": platform.processor(),
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        },
        "clip": str(args.clip),
        "command": " ".join(sys.argv),
        "seconds": args.seconds,
        "warmup_s": args.warmup,
        "echo": echo,
        "livefuse": livefuse,
        "added_latency_p95_ms": round(livefuse["latency_ms"]["p95"] - echo["latency_ms"]["p95"], 1),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
