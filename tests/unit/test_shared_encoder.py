"""The shared H.264 encode on its own: real libx264, real frames, tracks read as aiortc's
sender reads them (`recv()` in a loop). The end-to-end tests with real peers are in
tests/integration/test_shared_encode.py."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
from aiortc.mediastreams import MediaStreamError

from livefuse.stream.clip import render_clip
from livefuse.stream.frames import FrameStats
from livefuse.stream.shared_encode import (
    KEYFRAME_INTERVAL_S,
    MIN_KEYFRAME_SPACING_S,
    SENDER_QUEUE_FRAMES,
    EncodedVideoTrack,
    SharedH264Encoder,
)
from livefuse.stream.tracks import OutputFrame, OutputSlot, to_output_frame
from tests.h264_stream import decode, is_keyframe, problems

FPS = 30
STATS = FrameStats(index=0, latency_ms=1.0, stages_ms={}, faces=0, swapped=0, quality="high")


@pytest.fixture(scope="module")
def clip() -> list[OutputFrame]:
    from skimage import data

    astronaut = np.ascontiguousarray(data.astronaut()[:, :, ::-1])
    frames = render_clip(astronaut, seconds=2.0, fps=FPS, size=(320, 180), seed=1)
    return [
        to_output_frame(frame, pts=i * 90_000 // FPS, stats=STATS) for i, frame in enumerate(frames)
    ]


@dataclass
class Reader:
    """What one sender pulled: (monotonic time, Annex B bytes) per packet."""

    track: EncodedVideoTrack
    packets: list[tuple[float, bytes]] = field(default_factory=list)
    flowing: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.flowing.set()

    async def run(self) -> None:
        while True:
            await self.flowing.wait()
            try:
                packet = await self.track.recv()
            except MediaStreamError:
                return
            self.packets.append((time.monotonic(), bytes(packet)))

    @property
    def frames(self) -> list[bytes]:
        return [data for _, data in self.packets]

    def keyframe_times(self) -> list[float]:
        return [at for at, data in self.packets if is_keyframe(data)]


async def publish(slot: OutputSlot, clip: list[OutputFrame], seconds: float) -> int:
    """Publish the clip (looped) at FPS for `seconds`; how many frames."""
    start = time.monotonic()
    count = 0
    while time.monotonic() - start < seconds:
        source = clip[count % len(clip)]
        slot.publish(
            OutputFrame(
                i420=source.i420,
                width=source.width,
                height=source.height,
                pts=count * 90_000 // FPS,
                stats=STATS,
            )
        )
        count += 1
        await asyncio.sleep(max(0.0, start + count / FPS - time.monotonic()))
    return count


def run(scenario: Callable[[OutputSlot, SharedH264Encoder], Awaitable[None]]) -> None:
    async def main() -> None:
        slot = OutputSlot()
        encoder = SharedH264Encoder(slot, loop=asyncio.get_running_loop(), name="test-h264")
        try:
            await scenario(slot, encoder)
        finally:
            await encoder.close()
        assert [t.name for t in threading.enumerate() if t.name.startswith("test-h264")] == []

    asyncio.run(main())


def start(readers: list[Reader]) -> list[asyncio.Task[None]]:
    return [asyncio.get_running_loop().create_task(r.run()) for r in readers]


def test_every_track_gets_the_one_encode(clip: list[OutputFrame]) -> None:
    async def scenario(slot: OutputSlot, encoder: SharedH264Encoder) -> None:
        readers = [Reader(encoder.track()) for _ in range(3)]
        tasks = start(readers)
        await asyncio.sleep(0.05)  # the tracks join at their first recv()
        published = await publish(slot, clip, seconds=2.0)
        await asyncio.sleep(0.05)
        stats = encoder.stats()
        # One encode per new frame, however many tracks; no keep-alive while frames flow.
        assert published - 2 <= stats.frames <= published, (stats, published)
        assert stats.repeats == 0 and stats.errors == 0
        assert stats.cpu_s > 0
        for reader in readers:
            assert problems(reader.frames) == []
            assert decode(reader.frames) == len(reader.frames) >= stats.frames - 1
        for task in tasks:
            task.cancel()

    run(scenario)


def test_a_track_that_falls_behind_drops_to_the_next_keyframe(clip: list[OutputFrame]) -> None:
    async def scenario(slot: OutputSlot, encoder: SharedH264Encoder) -> None:
        steady, slow = Reader(encoder.track()), Reader(encoder.track())
        tasks = start([steady, slow])
        publishing = asyncio.get_running_loop().create_task(publish(slot, clip, seconds=3.0))
        await asyncio.sleep(0.3)
        slow.flowing.clear()  # its sender stalls (a slow link) for more than the queue holds
        requests = encoder.keyframe_requests
        await asyncio.sleep((SENDER_QUEUE_FRAMES + 10) / FPS)
        assert encoder.keyframe_requests > requests  # the stalled track asked for one
        slow.flowing.set()
        await publishing
        await asyncio.sleep(0.05)
        assert slow.track.dropped > SENDER_QUEUE_FRAMES
        assert steady.track.dropped == 0
        # Both decode throughout: the slow one resumed at a keyframe, not mid-chain.
        for reader in (steady, slow):
            assert problems(reader.frames) == [], reader
            assert decode(reader.frames) == len(reader.frames)
        assert len(slow.keyframe_times()) >= 2
        for task in tasks:
            task.cancel()

    run(scenario)


def test_keyframes_on_request_are_rate_limited(clip: list[OutputFrame]) -> None:
    async def scenario(slot: OutputSlot, encoder: SharedH264Encoder) -> None:
        reader = Reader(encoder.track())
        tasks = start([reader])
        publishing = asyncio.get_running_loop().create_task(publish(slot, clip, seconds=4.0))
        await asyncio.sleep(1.3)  # the joining keyframe is older than the spacing now
        asked = time.monotonic()
        encoder.request_keyframe()
        await asyncio.sleep(0.2)
        first = [t for t in reader.keyframe_times() if t > asked]
        assert first and first[0] - asked < 0.2, first
        encoder.request_keyframe()  # within the spacing: served when it has passed
        await asyncio.sleep(MIN_KEYFRAME_SPACING_S + 0.3)
        later = [t for t in reader.keyframe_times() if t > first[0]]
        assert later, "the second request was never served"
        assert later[0] - first[0] >= MIN_KEYFRAME_SPACING_S - 0.05, later[0] - first[0]
        await publishing
        # Without requests a keyframe still comes every KEYFRAME_INTERVAL_S.
        times = reader.keyframe_times()
        gaps = np.diff(times)
        assert gaps.max() <= KEYFRAME_INTERVAL_S + 0.15, gaps
        assert encoder.forced_keyframes >= 3  # joining, and the two requests
        assert problems(reader.frames) == []
        for task in tasks:
            task.cancel()

    run(scenario)


def test_keep_alive_re_encodes_the_last_frame(clip: list[OutputFrame]) -> None:
    async def scenario(slot: OutputSlot, encoder: SharedH264Encoder) -> None:
        reader = Reader(encoder.track())
        tasks = start([reader])
        await publish(slot, clip, seconds=0.2)
        await asyncio.sleep(0.6)  # the publisher stalls
        assert 3 <= encoder.repeats <= 7, encoder.repeats
        assert problems(reader.frames) == []
        assert len(reader.frames) == encoder.frames + encoder.repeats
        for task in tasks:
            task.cancel()

    run(scenario)


def test_a_failed_encode_is_counted_and_the_stream_goes_on(clip: list[OutputFrame]) -> None:
    async def scenario(slot: OutputSlot, encoder: SharedH264Encoder) -> None:
        reader = Reader(encoder.track())
        tasks = start([reader])
        await publish(slot, clip, seconds=0.3)
        good = clip[0]
        # Planes that cannot be a yuv420p picture: PyAV refuses them inside the encode.
        broken = np.zeros((good.i420.shape[0] + 1, good.i420.shape[1]), np.uint8)
        slot.publish(
            OutputFrame(i420=broken, width=good.width, height=good.height, pts=None, stats=STATS)
        )
        await asyncio.sleep(0.05)
        assert encoder.errors >= 1
        before = len(reader.frames)
        await publish(slot, clip, seconds=0.3)
        await asyncio.sleep(0.05)
        assert len(reader.frames) > before + 5  # not frozen, not black: it goes on
        assert problems(reader.frames) == []
        assert decode(reader.frames) == len(reader.frames)
        for task in tasks:
            task.cancel()

    run(scenario)


def test_close_ends_the_tracks(clip: list[OutputFrame]) -> None:
    async def scenario(slot: OutputSlot, encoder: SharedH264Encoder) -> None:
        reader = Reader(encoder.track())
        task = start([reader])[0]
        await publish(slot, clip, seconds=0.2)
        assert any(t.name.startswith("test-h264") for t in threading.enumerate())
        await encoder.close()
        await asyncio.wait_for(task, 2)  # recv() raised MediaStreamError
        assert reader.track.readyState == "ended"
        with pytest.raises(MediaStreamError):
            await encoder.track().recv()

    run(scenario)
