"""A soak of `livefuse serve`: publishers and viewers at capacity for a long while, the
server's memory, threads and open files sampled throughout, and for a while after the
last session ends (issue 18, "Must show").

    python -m bench.soak --minutes 60 --after-minutes 5 --sample-s 10 \\
        --out bench/results/soak-cpu-2core

starts `livefuse serve` (its own port, a token, `--max-sessions` = the publishers),
waits for /readyz, samples the idle server, uploads a source face, runs a first round of
sessions for `--prime-s` (what a server that has served once holds: codec libraries,
ONNX Runtime's arenas grown to the batch sizes), lets it settle and samples the
pre-soak figure; then starts the publishers (WHIP, sendonly, a looping 720p clip of a
moving face) and one WHEP viewer each, and keeps them streaming; every `--sample-s`
seconds it records the server's RSS (its own and its swap processes'), threads, open
file descriptors and the frames the viewers got, to `<out>.csv` as it goes and to
`<out>.json` at the end with a summary: the RSS slope over the soak after
`--warmup-minutes` (least squares, MB/min), the thread and fd ranges, and the RSS
`--after-minutes` after the last session ended against the pre-soak figure (and the
idle one). The checks of issue 18 (slope <= 0.5 MB/min, threads and fds flat, RSS
within 15 % of pre-soak) are in the summary as `checks`. `--summarize <out>.csv`
prints the summary of a run again.

A session whose viewer stalls is not restarted: a soak is about what the server does
with what it has. The clients run in this process; on a 2-core machine they take part
of the CPU the server would otherwise have (the same for every sample, so the curve is
still the server's).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import fractions
import json
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import av
import cv2
import numpy as np
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from livefuse.stream.clip import render_clip

CLOCK = 90_000
TOKEN = "soak-token-6d1f"
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


# -- what is sampled --------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    t_s: float
    """Seconds since the script started sampling."""
    phase: str
    """"idle" (no session yet), "prime" and "settle" (a first round of sessions and
    the wait after it), "pre" (the pre-soak figure), "soak", or "after" (the last
    session ended)."""
    rss_mb: float
    """The server process's resident memory."""
    children_rss_mb: float
    """Its child processes' (swap processes), together."""
    threads: int
    fds: int
    sessions: int
    frames_seen: int
    """Frames the viewers have received so far, all together."""


def proc_status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def rss_mb(pid: int) -> float:
    # statm's second field: resident pages (cheaper and as exact as status's VmRSS).
    resident = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    return resident * PAGE_KB / 1024.0


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if int(proc_status(int(entry.name)).get("PPid", "0")) == pid:
                found.append(int(entry.name))
        except (OSError, ValueError):
            continue  # gone meanwhile
    return found


def sample(pid: int, *, t_s: float, phase: str, sessions: int, frames_seen: int) -> Sample:
    status = proc_status(pid)
    children = 0.0
    for child in children_of(pid):
        try:
            children += rss_mb(child)
        except OSError:
            pass
    return Sample(
        t_s=round(t_s, 1),
        phase=phase,
        rss_mb=round(rss_mb(pid), 2),
        children_rss_mb=round(children, 2),
        threads=int(status["Threads"]),
        fds=len(os.listdir(f"/proc/{pid}/fd")),
        sessions=sessions,
        frames_seen=frames_seen,
    )


# -- the clients ----------------------------------------------------------------------


class LoopTrack(MediaStreamTrack):
    """Frames looped at `fps`, paced like a camera."""

    kind = "video"

    def __init__(self, frames: list[np.ndarray], fps: float) -> None:
        super().__init__()
        self._frames = [
            av.VideoFrame.from_ndarray(f, format="bgr24").reformat(format="yuv420p") for f in frames
        ]
        self._fps = fps
        self._index = 0
        self._start: float | None = None

    async def recv(self) -> av.VideoFrame:
        if self._start is None:
            self._start = time.monotonic()
        delay = self._start + self._index / self._fps - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        frame = av.VideoFrame.from_ndarray(
            self._frames[self._index % len(self._frames)].to_ndarray(), format="yuv420p"
        )
        frame.pts = int(self._index * CLOCK / self._fps)
        frame.time_base = fractions.Fraction(1, CLOCK)
        self._index += 1
        return frame


@dataclass
class Client:
    pc: RTCPeerConnection
    location: str
    frames: int = 0
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


async def offer(http: aiohttp.ClientSession, url: str, pc: RTCPeerConnection) -> str:
    await pc.setLocalDescription(await pc.createOffer())
    assert pc.localDescription is not None
    async with http.post(
        url,
        data=pc.localDescription.sdp,
        headers={"Content-Type": "application/sdp", "Authorization": f"Bearer {TOKEN}"},
    ) as response:
        text = await response.text()
        if response.status != 201:
            raise SystemExit(f"{url}: {response.status} {text.strip()}")
        location = response.headers["Location"]
    await pc.setRemoteDescription(RTCSessionDescription(sdp=text, type="answer"))
    # Connected before the next offer: the server takes one pending WHIP offer per
    # client address at a time.
    deadline = time.monotonic() + 20
    while pc.connectionState != "connected":
        if pc.connectionState in ("failed", "closed") or time.monotonic() > deadline:
            raise SystemExit(f"{url}: the connection did not come up ({pc.connectionState})")
        await asyncio.sleep(0.05)
    return location


async def start_publisher(
    http: aiohttp.ClientSession, base: str, frames: list[np.ndarray], fps: float, source: str
) -> Client:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver(LoopTrack(frames, fps), direction="sendonly")
    location = await offer(http, f"{base}/whip?source={source}", pc)
    return Client(pc=pc, location=location)


async def start_viewer(http: aiohttp.ClientSession, base: str, session_id: str) -> Client:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("video", direction="recvonly")
    client = Client(pc=pc, location="")

    async def count(track: MediaStreamTrack) -> None:
        while True:
            try:
                await track.recv()
            except MediaStreamError:
                return
            client.frames += 1

    @pc.on("track")
    def on_track(track: MediaStreamTrack) -> None:
        client.tasks.append(asyncio.ensure_future(count(track)))

    client.location = await offer(http, f"{base}/whep/{session_id}", pc)
    return client


async def end(http: aiohttp.ClientSession, base: str, client: Client) -> None:
    async with http.delete(
        base + client.location, headers={"Authorization": f"Bearer {TOKEN}"}
    ) as response:
        await response.read()
    for task in client.tasks:
        task.cancel()
    await client.pc.close()


# -- the run --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def wait_ready(http: aiohttp.ClientSession, base: str, within_s: float = 180.0) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            async with http.get(base + "/readyz") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.5)
    raise SystemExit(f"{base}/readyz never answered 200")


async def upload_source(http: aiohttp.ClientSession, base: str, path: Path) -> str:
    data = await asyncio.to_thread(path.read_bytes)
    async with http.post(
        f"{base}/api/v1/sources",
        data=data,
        headers={"Content-Type": "application/octet-stream", "Authorization": f"Bearer {TOKEN}"},
    ) as response:
        body = await response.json()
        if response.status != 201:
            raise SystemExit(f"the source face was refused: {body}")
        return str(body["id"])


class Recorder:
    """Samples to the CSV as they come (a long run that dies keeps what it had)."""

    def __init__(self, pid: int, out: Path) -> None:
        self.pid = pid
        self.samples: list[Sample] = []
        self.started = time.monotonic()
        out.parent.mkdir(parents=True, exist_ok=True)
        self._csv = open(out.with_suffix(".csv"), "w", newline="")  # noqa: SIM115
        self._writer = csv.DictWriter(self._csv, fieldnames=list(Sample.__dataclass_fields__))
        self._writer.writeheader()

    def take(self, phase: str, *, sessions: int, frames_seen: int) -> Sample:
        taken = sample(
            self.pid,
            t_s=time.monotonic() - self.started,
            phase=phase,
            sessions=sessions,
            frames_seen=frames_seen,
        )
        self.samples.append(taken)
        self._writer.writerow(asdict(taken))
        self._csv.flush()
        print(
            f"{taken.t_s:8.1f} s  {phase:5}  rss {taken.rss_mb:8.1f} MB  children "
            f"{taken.children_rss_mb:7.1f} MB  threads {taken.threads:3d}  fds {taken.fds:4d}  "
            f"sessions {sessions}  frames {frames_seen}",
            flush=True,
        )
        return taken

    def close(self) -> None:
        self._csv.close()


async def sample_for(
    recorder: Recorder, seconds: float, every_s: float, phase: str, clients: list[Client]
) -> None:
    deadline = time.monotonic() + seconds
    while True:
        live = sum(1 for c in clients if c.pc.connectionState == "connected")
        recorder.take(phase, sessions=live, frames_seen=sum(c.frames for c in clients))
        left = deadline - time.monotonic()
        if left <= 0:
            return
        await asyncio.sleep(min(every_s, left))


async def soak(args: argparse.Namespace, pid: int, base: str) -> dict[str, Any]:
    photo = cv2.imread(str(args.target))
    if photo is None:
        raise SystemExit(f"cannot read {args.target}")
    frames = list(
        render_clip(photo, seconds=4.0, fps=int(args.fps), size=(args.width, args.height), seed=1)
    )
    recorder = Recorder(pid, args.out)
    async with aiohttp.ClientSession() as http:
        await wait_ready(http, base)
        # Models loaded and warm, no session yet.
        await sample_for(recorder, args.idle_s, args.sample_s, "idle", [])
        source = await upload_source(http, base, args.source)
        if args.prime_s > 0:
            # A first round of sessions: what a server that has served once holds (codec
            # libraries mapped, ONNX Runtime's arenas grown to the batch sizes, first-use
            # caches) is not what a soak is about. The figure the server must come back
            # to after the soak is the one it settles at after this round.
            clients = await start_clients(http, base, frames, args, source)
            await sample_for(recorder, args.prime_s, args.sample_s, "prime", clients[0])
            await end_clients(http, base, clients)
            await sample_for(recorder, args.settle_s, args.sample_s, "settle", [])
            await sample_for(recorder, args.idle_s, args.sample_s, "pre", [])
        clients = await start_clients(http, base, frames, args, source)
        soak_started = time.monotonic()
        await sample_for(recorder, args.minutes * 60, args.sample_s, "soak", clients[0])
        soak_s = time.monotonic() - soak_started
        await end_clients(http, base, clients)
        await sample_for(recorder, args.after_minutes * 60, args.sample_s, "after", [])
    recorder.close()
    return summarize(recorder.samples, warmup_minutes=args.warmup_minutes, soak_s=soak_s)


async def start_clients(
    http: aiohttp.ClientSession,
    base: str,
    frames: list[np.ndarray],
    args: argparse.Namespace,
    source: str,
) -> tuple[list[Client], list[Client]]:
    """(viewers, publishers): the publishers, and one viewer each."""
    publishers = [
        await start_publisher(http, base, frames, args.fps, source) for _ in range(args.publishers)
    ]
    viewers = [await start_viewer(http, base, p.location.rsplit("/", 1)[1]) for p in publishers]
    return viewers, publishers


async def end_clients(
    http: aiohttp.ClientSession, base: str, clients: tuple[list[Client], list[Client]]
) -> None:
    viewers, publishers = clients
    for client in viewers + publishers:
        await end(http, base, client)


def slope_mb_per_min(points: list[tuple[float, float]]) -> float:
    if len(points) < 2:
        return 0.0
    times = np.array([t for t, _ in points]) / 60.0
    values = np.array([v for _, v in points])
    return float(np.polyfit(times, values, 1)[0])


def _grew(values: list[int], tolerance: int) -> bool:
    """Whether the last third's highest is above the first third's by more than
    `tolerance`: thread pools and sockets come and go, a leak only comes."""
    third = max(1, len(values) // 3)
    return max(values[-third:], default=0) > max(values[:third], default=0) + tolerance


def summarize(samples: list[Sample], *, warmup_minutes: float, soak_s: float) -> dict[str, Any]:
    by_phase: dict[str, list[Sample]] = {}
    for taken in samples:
        by_phase.setdefault(taken.phase, []).append(taken)
    idle, pre = by_phase.get("idle", []), by_phase.get("pre", [])
    during, after = by_phase.get("soak", []), by_phase.get("after", [])
    start = during[0].t_s if during else 0.0
    warm = [s for s in during if s.t_s - start >= warmup_minutes * 60] or during
    idle_rss = float(np.median([s.rss_mb for s in idle])) if idle else 0.0
    # Without a priming round, the idle server's figure is the only one there is.
    pre_rss = float(np.median([s.rss_mb for s in pre])) if pre else idle_rss
    final = after[-1].rss_mb if after else 0.0
    slope = slope_mb_per_min([(s.t_s, s.rss_mb) for s in warm])
    fps = (
        (during[-1].frames_seen - during[0].frames_seen) / max(during[-1].t_s - during[0].t_s, 1e-9)
        if len(during) > 1
        else 0.0
    )
    threads = [s.threads for s in warm]
    fds = [s.fds for s in warm]
    summary = {
        "idle_rss_mb": round(idle_rss, 1),
        "pre_soak_rss_mb": round(pre_rss, 1),
        "soak_minutes": round(soak_s / 60.0, 2),
        "rss_mb_soak": {
            "min": min((s.rss_mb for s in during), default=0.0),
            "max": max((s.rss_mb for s in during), default=0.0),
            "end": during[-1].rss_mb if during else 0.0,
        },
        "rss_slope_mb_per_min_after_warmup": round(slope, 3),
        "children_rss_slope_mb_per_min_after_warmup": round(
            slope_mb_per_min([(s.t_s, s.children_rss_mb) for s in warm]), 3
        ),
        "threads_soak": [min(threads, default=0), max(threads, default=0)],
        "fds_soak": [min(fds, default=0), max(fds, default=0)],
        "viewer_fps_total": round(fps, 2),
        "rss_mb_after": final,
        "rss_after_vs_pre": round(final / pre_rss, 3) if pre_rss else None,
        "rss_after_vs_idle": round(final / idle_rss, 3) if idle_rss else None,
        "threads_after": after[-1].threads if after else None,
        "fds_after": after[-1].fds if after else None,
    }
    summary["checks"] = {
        "rss_slope_at_most_0.5_mb_per_min": slope <= 0.5,
        "threads_flat": not _grew(threads, tolerance=2),
        "fds_flat": not _grew(fds, tolerance=2),
        "rss_after_within_15_percent_of_pre": bool(pre_rss)
        and abs(final - pre_rss) <= 0.15 * pre_rss,
    }
    return summary


def read_samples(path: Path) -> list[Sample]:
    with open(path, newline="") as rows:
        return [
            Sample(
                t_s=float(row["t_s"]),
                phase=row["phase"],
                rss_mb=float(row["rss_mb"]),
                children_rss_mb=float(row["children_rss_mb"]),
                threads=int(row["threads"]),
                fds=int(row["fds"]),
                sessions=int(row["sessions"]),
                frames_seen=int(row["frames_seen"]),
            )
            for row in csv.DictReader(rows)
        ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    testdata = Path.home() / ".cache" / "livefuse" / "testdata"
    parser.add_argument("--minutes", type=float, default=60.0, help="the soak, at capacity")
    parser.add_argument("--warmup-minutes", type=float, default=5.0, help="left out of the slope")
    parser.add_argument(
        "--after-minutes", type=float, default=5.0, help="sampling after the last session"
    )
    parser.add_argument(
        "--idle-s", type=float, default=30.0, help="sampling of the idle server (and pre-soak)"
    )
    parser.add_argument(
        "--prime-s", type=float, default=60.0, help="a first round of sessions (0: none)"
    )
    parser.add_argument(
        "--settle-s",
        type=float,
        default=90.0,
        help="after the first round, before the pre-soak figure (past the heap trim interval)",
    )
    parser.add_argument(
        "--summarize",
        type=Path,
        default=None,
        metavar="CSV",
        help="only print the summary of an earlier run's CSV",
    )
    parser.add_argument("--sample-s", type=float, default=10.0)
    parser.add_argument("--publishers", type=int, default=2, help="also --max-sessions")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--source", type=Path, default=testdata / "Tom_Hanks_54745.png")
    parser.add_argument("--target", type=Path, default=testdata / "astronaut.png")
    parser.add_argument(
        "--serve",
        default=f"{sys.executable} -m livefuse.cli.main serve",
        help="the server command; --port, --token and --max-sessions are added",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/soak"))
    args = parser.parse_args()
    if args.summarize is not None:
        samples = read_samples(args.summarize)
        soaked = [s for s in samples if s.phase == "soak"]
        soak_s = soaked[-1].t_s - soaked[0].t_s if len(soaked) > 1 else 0.0
        summary = summarize(samples, warmup_minutes=args.warmup_minutes, soak_s=soak_s)
        print(json.dumps(summary, indent=1))
        return

    port = free_port()
    command = shlex.split(args.serve) + [
        "--port",
        str(port),
        "--token",
        TOKEN,
        "--max-sessions",
        str(args.publishers),
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    log = open(args.out.with_suffix(".server.log"), "w")  # noqa: SIM115
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    started = time.time()
    try:
        summary = asyncio.run(soak(args, server.pid, f"http://127.0.0.1:{port}"))
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    samples = list(csv.DictReader(open(args.out.with_suffix(".csv"))))  # noqa: SIM115
    report = {
        "machine": {
            "platform": platform.platform(),
            "cpus": len(os.sched_getaffinity(0)),
            "python": platform.python_version(),
        },
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "command": command,
        "settings": {
            "publishers": args.publishers,
            "viewers": args.publishers,
            "size": [args.width, args.height],
            "fps": args.fps,
            "sample_s": args.sample_s,
            "warmup_minutes": args.warmup_minutes,
            "prime_s": args.prime_s,
            "settle_s": args.settle_s,
            "after_minutes": args.after_minutes,
        },
        "summary": summary,
        "samples": samples,
    }
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
