"""What WHEP viewers cost the server: its CPU time with 0, 1 and 3 viewers of one session.

Runs `livefuse serve` as a subprocess for each version of the code under test (`--code
NAME=DIR`: the DIR goes first on its PYTHONPATH, e.g. a `git worktree` of an older commit),
alternating them round by round (ABBA...), since a shared machine's speed drifts. In each
run one aiortc client publishes a 1280x720 30 fps clip (sendonly: nothing comes back to
it), then 0, 1 and 3 WHEP viewers watch; over `--seconds` in each phase the server's CPU
time (user + system, from /proc, its child processes included) and its session stats
are read. A viewer's cost is the CPU over the 0-viewer phase; the bar is that three
viewers cost at most 1.2x one.

The client is kept cheap and the same for every version: the clip is encoded once up
front (libx264 ultrafast, Baseline) and its packets sent as they are, and the viewers
count the RTP bytes they get without decoding them (so they send no REMB or PLI either:
the server's bitrate stays at its start value in every version). No face source is set
unless `--source` is given: the face tracking still runs, the swap does not, so the
pipeline's load is the same in every phase and the difference is the viewers'.

It imports nothing from livefuse (aiohttp, aiortc, PyAV only).

    .venv/bin/livefuse clip --photo ~/.cache/livefuse/testdata/astronaut.png \\
        --crop 0,0,512,288 --seconds 10 --output /tmp/a.mp4
    git worktree add /tmp/se-before <commit before> && git worktree add /tmp/se-after <commit>
    .venv/bin/python bench/shared_encode.py --clip /tmp/a.mp4 \\
        --code before=/tmp/se-before --code after=/tmp/se-after --rounds 2 \\
        --json bench/results/shared_encode-cpu-2core.json
"""

from __future__ import annotations

import argparse
import asyncio
import fractions
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import av
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.rtp import RtpPacket

CLOCK = 90_000
PHASES = (0, 1, 3)
TICKS = os.sysconf("SC_CLK_TCK")


# -- the clip, encoded once -----------------------------------------------------------------


def encode_clip(path: Path, max_frames: int) -> tuple[list[bytes], float]:
    """The clip's frames as H.264 access units (Baseline, a keyframe each second)."""
    packets: list[bytes] = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or 30)
        codec = av.CodecContext.create("libx264", "w")
        codec.width, codec.height = stream.codec_context.width, stream.codec_context.height
        codec.pix_fmt = "yuv420p"
        codec.bit_rate = 3_000_000
        codec.framerate = fractions.Fraction(round(fps), 1)
        codec.time_base = fractions.Fraction(1, round(fps))
        codec.gop_size = round(fps)
        codec.options = {"preset": "ultrafast", "tune": "zerolatency", "level": "40"}
        codec.profile = "Baseline"
        for index, frame in enumerate(container.decode(stream)):
            if index >= max_frames:
                break
            frame = frame.reformat(format="yuv420p")
            frame.pts, frame.time_base = index, codec.time_base
            packets.extend(bytes(p) for p in codec.encode(frame))
        packets.extend(bytes(p) for p in codec.encode(None))
    return packets, fps


class PacketTrack(MediaStreamTrack):
    """Sends the pre-encoded clip, looped, paced at its frame rate."""

    kind = "video"

    def __init__(self, packets: list[bytes], fps: float) -> None:
        super().__init__()
        self.packets, self.fps = packets, fps
        self.index = 0
        self.start: float | None = None

    async def recv(self) -> av.Packet:
        if self.start is None:
            self.start = time.monotonic()
        delay = self.start + self.index / self.fps - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        packet = av.Packet(self.packets[self.index % len(self.packets)])
        packet.pts = int(self.index * CLOCK / self.fps)
        packet.time_base = fractions.Fraction(1, CLOCK)
        self.index += 1
        return packet


# -- peers ----------------------------------------------------------------------------------


def first_video_codec(sdp: str) -> str:
    video = sdp.split("m=video ", 1)[1]
    first = video.split("\r\n", 1)[0].split()[2]
    return video.split(f"a=rtpmap:{first} ", 1)[1].split("/", 1)[0]


async def negotiate(http: aiohttp.ClientSession, url: str, pc: RTCPeerConnection) -> str:
    """POST the offer; the Location."""
    await pc.setLocalDescription(await pc.createOffer())
    async with http.post(
        url, data=pc.localDescription.sdp, headers={"Content-Type": "application/sdp"}
    ) as response:
        answer = await response.text()
        if response.status != 201:
            raise SystemExit(f"{url}: {response.status} {answer}")
        location = response.headers["Location"]
    if first_video_codec(answer) != "H264":
        raise SystemExit(f"{url}: the answer does not send H.264 first")
    await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
    return location


class Viewer:
    """A WHEP viewer that counts what arrives and decodes nothing."""

    def __init__(self) -> None:
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        transceiver = self.pc.addTransceiver("video", direction="recvonly")
        self.bytes = 0
        self.packets = 0

        async def count(packet: RtpPacket, arrival_time_ms: int) -> None:
            self.bytes += len(packet.payload)
            self.packets += 1

        transceiver.receiver._handle_rtp_packet = count  # type: ignore[method-assign]


def server_cpu_s(pid: int) -> float:
    """User + system CPU seconds of the process and its live descendants."""
    total = 0.0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / TICKS
            for task in Path(f"/proc/{current}/task").iterdir():
                children = (task / "children").read_text().split()
                pending.extend(int(c) for c in children)
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


async def session_stats(http: aiohttp.ClientSession, base: str, session_id: str) -> Any:
    async with http.get(f"{base}/api/v1/sessions/{session_id}") as response:
        return (await response.json())["stats"]


async def measure(
    base: str, pid: int, clip: tuple[list[bytes], float], args: argparse.Namespace
) -> dict[str, Any]:
    phases: dict[str, Any] = {}
    async with aiohttp.ClientSession() as http:
        query = ""
        if args.source is not None:
            async with http.post(
                f"{base}/api/v1/sources",
                data=args.source.read_bytes(),
                headers={"Content-Type": "image/png"},
            ) as response:
                query = f"?source={(await response.json())['id']}"
        publisher = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        publisher.addTransceiver(PacketTrack(*clip), direction="sendonly")
        location = await negotiate(http, f"{base}/whip{query}", publisher)
        session_id = location.rsplit("/", 1)[1]
        viewers: list[Viewer] = []
        try:
            for count in PHASES:
                while len(viewers) < count:
                    viewer = Viewer()
                    await negotiate(http, f"{base}/whep/{session_id}", viewer.pc)
                    viewers.append(viewer)
                await asyncio.sleep(args.warmup)
                cpu0, stats0 = server_cpu_s(pid), await session_stats(http, base, session_id)
                got0 = [v.bytes for v in viewers]
                wall0 = time.monotonic()
                await asyncio.sleep(args.seconds)
                cpu1, stats1 = server_cpu_s(pid), await session_stats(http, base, session_id)
                wall = time.monotonic() - wall0
                frames_out = stats1["frames_out"] - stats0["frames_out"]
                phase: dict[str, Any] = {
                    "viewers": count,
                    "seconds": round(wall, 2),
                    "server_cpu_s": round(cpu1 - cpu0, 2),
                    "frames_out": frames_out,
                    "fps_out": round(frames_out / wall, 2),
                    "viewer_kbit_s": [
                        round((v.bytes - b) * 8 / wall / 1000)
                        for v, b in zip(viewers, got0, strict=True)
                    ],
                }
                encode0, encode1 = stats0.get("encode") or {}, stats1.get("encode") or {}
                if encode1:
                    phase["encode"] = {
                        "frames": encode1["frames"] - encode0.get("frames", 0),
                        "repeats": encode1["repeats"] - encode0.get("repeats", 0),
                        "keyframes": encode1["keyframes"] - encode0.get("keyframes", 0),
                        "cpu_s": round(encode1["cpu_s"] - encode0.get("cpu_s", 0.0), 3),
                        "errors": encode1["errors"],
                    }
                phases[str(count)] = phase
                print(f"  {count} viewers: {phase}", file=sys.stderr)
        finally:
            for viewer in viewers:
                await viewer.pc.close()
            async with http.delete(f"{base}{location}"):
                pass
            await publisher.close()
    return phases


# -- the server -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_ready(base: str, *, within_s: float = 180.0) -> None:
    deadline = time.monotonic() + within_s
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            try:
                async with http.get(f"{base}/readyz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.5)
    raise SystemExit(f"{base} was not ready within {within_s} s")


def run_once(
    name: str, code: Path, clip: tuple[list[bytes], float], args: argparse.Namespace
) -> dict[str, Any]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(code)}
    command = [sys.executable, "-m", "livefuse.cli.main", "serve", "--port", str(port)]
    # cwd too: `python -m` puts the working directory first on sys.path.
    server = subprocess.Popen(
        command, cwd=code, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    base = f"http://127.0.0.1:{port}"
    try:
        asyncio.run(wait_ready(base))
        commit = subprocess.run(
            ["git", "-C", str(code), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        print(f"{name} ({code}, {commit})", file=sys.stderr)
        phases = asyncio.run(measure(base, server.pid, clip, args))
        return {"code": name, "path": str(code), "commit": commit, "phases": phases}
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for name in dict.fromkeys(run["code"] for run in runs):
        mine = [run["phases"] for run in runs if run["code"] == name]
        cpu = {n: statistics.median(p[str(n)]["server_cpu_s"] for p in mine) for n in PHASES}
        one, three = cpu[1] - cpu[0], cpu[3] - cpu[0]
        entry: dict[str, Any] = {
            "runs": len(mine),
            "server_cpu_s_median": {str(n): round(cpu[n], 2) for n in PHASES},
            "fps_out_median": {
                str(n): round(statistics.median(p[str(n)]["fps_out"] for p in mine), 2)
                for n in PHASES
            },
            "viewer_cost_cpu_s": {"1": round(one, 2), "3": round(three, 2)},
            "three_over_one": round(three / one, 2) if one > 0 else None,
        }
        if all("encode" in p["1"] and "encode" in p["3"] for p in mine):
            encode = {
                n: statistics.median(p[str(n)]["encode"]["cpu_s"] for p in mine) for n in (1, 3)
            }
            entry["encode_cpu_s_median"] = {str(n): round(v, 3) for n, v in encode.items()}
            entry["encode_three_over_one"] = round(encode[3] / encode[1], 2)
        summary[name] = entry
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clip", type=Path, required=True)
    parser.add_argument(
        "--code",
        action="append",
        required=True,
        metavar="NAME=DIR",
        help="a version of livefuse to run (DIR first on PYTHONPATH); give two to compare",
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds before each phase")
    parser.add_argument("--loop-frames", type=int, default=150)
    parser.add_argument("--source", type=Path, help="a face photo to swap in (default: none)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    codes = [(name, Path(path)) for name, _, path in (c.partition("=") for c in args.code)]
    clip = encode_clip(args.clip, args.loop_frames)
    runs = []
    for round_index in range(args.rounds):
        order = codes if round_index % 2 == 0 else codes[::-1]
        for name, path in order:
            run = run_once(name, path, clip, args)
            run["round"] = round_index + 1
            runs.append(run)
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        },
        "clip": str(args.clip),
        "command": " ".join(sys.argv),
        "seconds": args.seconds,
        "warmup_s": args.warmup,
        "source": str(args.source) if args.source else None,
        "runs": runs,
        "summary": summarise(runs),
    }
    print(json.dumps(result["summary"], indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
