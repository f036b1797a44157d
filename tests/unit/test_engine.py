"""The frame engine on real models: sessions share it, each gets its own frames back in
order, a fast session cannot starve a slow one, a failing session stalls nobody, and the
swap processes give the same pixels as the engine's own thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from livefuse.engines.pipeline import FacePipeline
from livefuse.engines.store import ModelStore
from livefuse.engines.swapper import SourceFace
from livefuse.settings import Settings
from livefuse.stream.engine import EngineSession, FrameEngine, _batched
from livefuse.stream.frames import FrameJob, ProcessedFrame
from livefuse.stream.smoothing import OneEuroParams
from livefuse.stream.tracking import FaceTracker
from tests.media import heads_on_grey

CANVAS = (240, 320)  # height, width: small, so the engine keeps up on a busy machine
FPS = 30.0


@pytest.fixture(scope="module")
def faces(settings: Settings) -> Iterator[FacePipeline]:
    pipeline = FacePipeline.from_store(ModelStore(settings.models_dir), threads=1)
    yield pipeline
    pipeline.close()


@pytest.fixture(scope="module")
def astronaut_head() -> np.ndarray:
    """The astronaut's head, about 60 px of face on the small canvas."""
    import cv2
    from skimage import data

    head = np.ascontiguousarray(data.astronaut()[20:230, 130:320, ::-1])
    return cv2.resize(head, (114, 126), interpolation=cv2.INTER_AREA)


@pytest.fixture(scope="module")
def second_head(testdata_dir: Path) -> np.ndarray:
    """A different person from insightface's t1.jpg, on the same scale."""
    import cv2

    image = cv2.imread(str(testdata_dir / "t1.jpg"))
    assert image is not None, "run make install to fetch the test images"
    return cv2.resize(image[230:440, 10:215], (123, 126), interpolation=cv2.INTER_AREA)


@pytest.fixture(scope="module")
def source(faces: FacePipeline, testdata_dir: Path) -> SourceFace:
    import cv2

    image = cv2.imread(str(testdata_dir / "Tom_Hanks_54745.png"))
    assert image is not None
    return faces.prepare_source(image).face


def scene(*heads: tuple[np.ndarray, int]) -> np.ndarray:
    """A grey frame with each head pasted at x (its left edge), 60 px from the top."""
    return heads_on_grey(CANVAS, 60, heads)


class Collector:
    """A session's outputs, as the engine hands them back."""

    def __init__(self) -> None:
        self.outputs: list[ProcessedFrame] = []
        self.changed = threading.Condition()

    def __call__(self, output: ProcessedFrame) -> None:
        with self.changed:
            self.outputs.append(output)
            self.changed.notify_all()

    def wait_for(self, count: int, timeout: float = 60.0) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.outputs) >= count, timeout), (
                f"{len(self.outputs)} of {count} frames came back"
            )


def open_session(
    engine: FrameEngine,
    source: SourceFace | None,
    *,
    detect_in_background: bool = False,
    **options: object,
) -> tuple[EngineSession, Collector]:
    """A session with a collector; detection in the foreground unless asked otherwise, so
    which frame first shows a face does not depend on timing."""
    collector = Collector()
    session = engine.open_session(
        on_output=collector,
        detect_in_background=detect_in_background,
        **options,  # type: ignore[arg-type]
    )
    session.source = source
    return session, collector


def feed(session: EngineSession, frames: list[np.ndarray], *, fps: float | None) -> None:
    """Hand the frames in at `fps` (latest wins), or each once the engine has taken the
    previous one (None: nothing dropped)."""
    started = time.perf_counter()
    for index, frame in enumerate(frames):
        if fps is not None:
            delay = started + index / fps - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        session.submit(frame, timestamp=index / FPS, tag=index, block=fps is None)


def feed_together(
    feeds: list[tuple[EngineSession, list[np.ndarray], float | None]],
    *,
    meanwhile: Callable[[], None] = lambda: None,
) -> None:
    """Each (session, frames, fps) fed from a thread of its own, all at once, as
    independent cameras would; `meanwhile` runs while they feed."""
    feeders = [
        threading.Thread(target=feed, args=(session, frames), kwargs={"fps": fps})
        for session, frames, fps in feeds
    ]
    for thread in feeders:
        thread.start()
    meanwhile()
    for thread in feeders:
        thread.join()


def test_each_session_gets_its_own_frames_back_in_order_swapped(
    faces: FacePipeline, source: SourceFace, astronaut_head: np.ndarray, second_head: np.ndarray
) -> None:
    engine = FrameEngine(faces=faces)
    try:
        heads = (astronaut_head, second_head, astronaut_head)
        clips = [
            [scene((head, 40 + 3 * i + 20 * n)) for i in range(20)] for n, head in enumerate(heads)
        ]
        sessions = [open_session(engine, source, quality="fast") for _ in clips]
        feed_together(
            [(session, clip, None) for (session, _), clip in zip(sessions, clips, strict=True)]
        )
        for (session, collector), clip in zip(sessions, clips, strict=True):
            collector.wait_for(len(clip))
            outputs = collector.outputs
            assert [o.tag for o in outputs] == list(range(len(clip)))  # all, in order
            assert session.dropped == 0 and session.errors == {}
            for output in outputs:
                assert output.stats.swapped == 1, output.stats
                frame = clip[output.tag]  # type: ignore[index]
                changed = np.abs(output.image.astype(np.int16) - frame).max(axis=2) > 12
                # The face, and only around the face, was redrawn on this session's frame.
                assert 0.02 < changed.mean() < 0.3
                assert not changed[:, :20].any() and not changed[:40].any()
        # The sessions' frames were really processed together.
        assert engine.metrics.snapshot()["largest_batch"] >= 2
    finally:
        engine.close()


def test_a_fast_session_does_not_starve_a_slow_one(
    faces: FacePipeline, source: SourceFace, astronaut_head: np.ndarray, second_head: np.ndarray
) -> None:
    engine = FrameEngine(faces=faces)
    try:
        fast, fast_out = open_session(engine, source, quality="fast")
        slow, slow_out = open_session(engine, source, quality="fast")
        seconds = 3.0
        fast_frames = [scene((astronaut_head, 60 + i % 40)) for i in range(int(60 * seconds))]
        slow_frames = [scene((second_head, 100 - i % 40)) for i in range(int(30 * seconds))]
        feed_together([(fast, fast_frames, 60.0), (slow, slow_frames, 30.0)])
        time.sleep(0.5)
        # The fast one is fed faster than a frame cycle: it loses frames to its own newer
        # ones; the slow one, served every cycle, keeps most of its own, and a larger
        # share than the fast one (relative, so a machine busy with other work, which
        # lengthens every cycle, does not decide it).
        kept = len(slow_out.outputs) / len(slow_frames)
        fast_kept = len(fast_out.outputs) / len(fast_frames)
        assert kept >= 0.8 and kept > fast_kept, (kept, slow.dropped, fast_kept, fast.dropped)
        assert len(fast_out.outputs) > 0
        assert [o.tag for o in slow_out.outputs] == sorted(o.tag for o in slow_out.outputs)
    finally:
        engine.close()


def test_a_failing_session_passes_its_frames_through_while_the_others_swap(
    faces: FacePipeline, source: SourceFace, astronaut_head: np.ndarray, second_head: np.ndarray
) -> None:
    engine = FrameEngine(faces=faces)
    try:
        healthy, healthy_out = open_session(engine, source, quality="fast")
        # Its swap raises: the source is not a prepared face.
        bad_swap, bad_swap_out = open_session(engine, source, quality="fast")
        bad_swap.source = "not a prepared face"  # type: ignore[assignment]
        # Its tracking raises from a track's second frame on: a smoothing filter whose
        # speed estimate has no cutoff divides by zero.
        bad_track, bad_track_out = open_session(
            engine, source, quality="fast", smoothing=OneEuroParams(derivative_cutoff=0.0)
        )
        frames = [scene((astronaut_head, 50 + 2 * i), (second_head, 190)) for i in range(12)]
        unreadable = np.zeros((*CANVAS, 3), dtype=np.float32)  # not 8-bit pixels
        feed_together(
            [(session, frames, None) for session in (healthy, bad_swap, bad_track)],
            meanwhile=lambda: bad_track.submit(
                unreadable, timestamp=99.0, tag="unreadable", block=True
            ),
        )
        for collector in (healthy_out, bad_swap_out, bad_track_out):
            collector.wait_for(len(frames))

        assert all(o.stats.error is None for o in healthy_out.outputs)
        assert all(o.stats.swapped == 2 for o in healthy_out.outputs[1:])
        for session, collector, stage in (
            (bad_swap, bad_swap_out, "swap"),
            (bad_track, bad_track_out, "track"),
        ):
            tagged = [o for o in collector.outputs if isinstance(o.tag, int)]
            assert [o.tag for o in tagged] == list(range(len(frames)))
            failed = [o for o in tagged if o.stats.error is not None]
            # A frame that only starts tracks does not smooth yet, so it may get through.
            assert len(failed) >= len(frames) // 2
            for output in failed:
                assert output.stats.error.startswith(stage)  # type: ignore[union-attr]
                # Never black, never half-drawn: the frame exactly as it came in.
                assert np.array_equal(output.image, frames[output.tag])  # type: ignore[index]
            assert session.errors[stage] == len(failed)
        # A frame whose pixels cannot be read has nothing to send: counted, not sent.
        assert bad_track.errors["to_array"] == 1
        assert all(o.tag != "unreadable" for o in bad_track_out.outputs)
    finally:
        engine.close()


def test_batched_tracking_matches_one_tracker_alone(
    faces: FacePipeline, source: SourceFace, astronaut_head: np.ndarray, second_head: np.ndarray
) -> None:
    frames = [scene((astronaut_head, 30 + 4 * i), (second_head, 200 - 2 * i)) for i in range(10)]
    alone = FaceTracker(detector=faces.face_detector, landmarker=faces.landmarker)
    expected = []
    for index, frame in enumerate(frames):
        alone.update(frame, index / FPS, detect_size=320, detect_interval=15, landmark_interval=2)
        expected.append({t.id: t.smoothed.copy() for t in alone.tracks})

    engine = FrameEngine(faces=faces)
    try:
        sessions = [open_session(engine, source, quality="fast") for _ in range(3)]
        feed_together([(session, frames, None) for session, _ in sessions])
        for _, collector in sessions:
            collector.wait_for(len(frames))
            for output, tracks in zip(collector.outputs, expected, strict=True):
                got = {face.track_id: face.points for face in output.faces}
                assert got.keys() == tracks.keys()
                for track_id, points in tracks.items():
                    np.testing.assert_allclose(got[track_id], points, atol=1e-3)
    finally:
        engine.close()


def test_a_live_session_never_waits_for_the_detector(
    faces: FacePipeline, source: SourceFace, astronaut_head: np.ndarray
) -> None:
    """Detection in the background: the first frame goes on without it (no face yet),
    the face is taken up once the detection is in, and swapped from then on."""
    engine = FrameEngine(faces=faces)
    try:
        live, live_out = open_session(engine, source, quality="fast", detect_in_background=True)
        file, file_out = open_session(engine, source, quality="fast")
        frames = [scene((astronaut_head, 60 + i)) for i in range(30)]
        for index, frame in enumerate(frames):
            file.submit(frame, timestamp=index / FPS, tag=index, block=True)
            live.submit(frame, timestamp=index / FPS, tag=index, block=True)
            time.sleep(1 / FPS)
        live_out.wait_for(len(frames))
        file_out.wait_for(len(frames))
        assert live_out.outputs[0].stats.faces == 0  # did not wait for the detector
        assert file_out.outputs[0].stats.faces == 1  # waited: deterministic, for files
        first = next(i for i, o in enumerate(live_out.outputs) if o.stats.swapped)
        assert all(o.stats.swapped == 1 for o in live_out.outputs[first:])
        assert live.errors == {} and file.errors == {}
        assert engine.metrics.snapshot()["busy"]["detect"] > 0  # the detection worker ran
    finally:
        engine.close()


def test_auto_sessions_step_down_together_and_a_pinned_one_keeps_its_level(
    faces: FacePipeline, source: SourceFace, astronaut_head: np.ndarray
) -> None:
    engine = FrameEngine(faces=faces, target_fps=1000.0)  # a 1 ms budget: always over
    try:
        auto_a, out_a = open_session(engine, source)
        auto_b, out_b = open_session(engine, source)
        pinned, out_pinned = open_session(engine, source, quality="balanced")
        frames = [scene((astronaut_head, 60 + i)) for i in range(10)]
        for index, frame in enumerate(frames):
            for session in (auto_a, auto_b, pinned):
                session.submit(frame, timestamp=index / FPS, tag=index, block=True)
        for collector in (out_a, out_b, out_pinned):
            collector.wait_for(len(frames))
        assert engine.governor.level.name == "minimal"
        assert out_a.outputs[-1].stats.quality == out_b.outputs[-1].stats.quality == "minimal"
        assert {o.stats.quality for o in out_pinned.outputs} == {"balanced"}
    finally:
        engine.close()


def test_a_closed_session_gets_nothing_more_and_the_others_go_on(
    faces: FacePipeline, source: SourceFace, astronaut_head: np.ndarray
) -> None:
    engine = FrameEngine(faces=faces)
    try:
        staying, staying_out = open_session(engine, source, quality="fast")
        leaving, leaving_out = open_session(engine, source, quality="fast")
        frames = [scene((astronaut_head, 60 + i)) for i in range(16)]
        for index, frame in enumerate(frames):
            staying.submit(frame, timestamp=index / FPS, tag=index, block=True)
            if index < 8:
                leaving.submit(frame, timestamp=index / FPS, tag=index, block=True)
            elif index == 8:
                leaving.close()
                seen = len(leaving_out.outputs)
        staying_out.wait_for(len(frames))
        assert len(leaving_out.outputs) <= seen + 1  # at most the frame in flight
        assert engine.sessions == [staying]
        with pytest.raises(RuntimeError, match="closed"):
            leaving.submit(frames[0], timestamp=9.0)
    finally:
        engine.close()


def test_process_returns_one_frame_and_an_engine_closes_cleanly(
    faces: FacePipeline, source: SourceFace, astronaut_head: np.ndarray
) -> None:
    engine = FrameEngine(faces=faces)
    session = engine.open_session(quality="fast", detect_in_background=False)
    session.source = source
    outputs = [session.process(scene((astronaut_head, 60)), timestamp=i / FPS) for i in range(3)]
    assert all(o is not None and o.stats.swapped == 1 for o in outputs[1:])
    engine.close()
    engine.close()  # twice is fine
    assert not any(worker.is_alive() for worker in engine._workers)
    with pytest.raises(RuntimeError, match="closed"):
        engine.open_session()


def test_a_batch_that_raises_is_retried_one_request_at_a_time() -> None:
    jobs = [object() for _ in range(4)]

    def run(requests: list[int]) -> list[int]:
        if 2 in requests:
            raise ValueError("request 2 breaks the forward pass")
        return [r * 10 for r in requests]

    answered = dict(_batched(list(zip(jobs, range(4), strict=True)), run))  # type: ignore[arg-type]
    assert [answered[job] for job in jobs[:2]] == [0, 10]
    assert isinstance(answered[jobs[2]], ValueError)
    assert answered[jobs[3]] == 30
    alone = _batched([(jobs[0], 2)], run)  # type: ignore[list-item]
    assert isinstance(alone[0][1], ValueError)


def test_swap_processes_give_the_same_pixels_and_a_dead_one_costs_only_its_frames(
    faces: FacePipeline, source: SourceFace, astronaut_head: np.ndarray, second_head: np.ndarray
) -> None:
    # Apart, the two faces are two units (one may go to each worker); overlapping, one.
    frames = [scene((astronaut_head, 10 + i), (second_head, 190 - i)) for i in range(6)]
    frames += [scene((astronaut_head, 70 + i), (second_head, 120)) for i in range(6)]
    results: dict[int, list[ProcessedFrame]] = {}
    for processes in (0, 1):
        engine = FrameEngine(faces=faces, swap_processes=processes)
        try:
            engine.wait_ready()
            session, collector = open_session(engine, source, quality="high")
            feed(session, frames, fps=None)
            collector.wait_for(len(frames))
            results[processes] = collector.outputs
            if processes:
                pool = engine.swap_pool
                assert pool is not None
                child = pool._children[0].child
                assert child is not None
                child.process.kill()  # dies mid-stream
                child.process.join()
                for index in range(4):
                    frame = frames[-1]  # the faces stay where they were: still tracked
                    after = session.process(frame, timestamp=1.0 + index / FPS)
                    assert after is not None
                    # Its faces are swapped here instead, or the frame passes through
                    # whole: never half-drawn, never lost.
                    if after.stats.error is None:
                        assert after.stats.swapped == after.stats.faces >= 1
                    else:
                        assert np.array_equal(after.image, frame)
        finally:
            engine.close()
    for alone, shared in zip(results[0], results[1], strict=True):
        assert alone.stats.swapped == shared.stats.swapped >= 1
        assert np.array_equal(alone.image, shared.image)
    assert sum(o.stats.swapped == 2 for o in results[1]) >= 6  # the apart faces: two units


def test_frame_jobs_hash_by_identity() -> None:
    """The engine keys its per-round bookkeeping by job: two equal-looking jobs of one
    session must stay two keys."""
    a = FrameJob(frame=np.zeros(1), index=0, timestamp=0.0, submitted=0.0, session=None)  # type: ignore[arg-type]
    b = FrameJob(frame=np.zeros(1), index=0, timestamp=0.0, submitted=0.0, session=None)  # type: ignore[arg-type]
    assert len({a: 1, b: 2}) == 2


def test_a_frame_whose_first_face_fails_goes_out_whole_and_its_input_is_untouched(
    faces: FacePipeline, source: SourceFace, astronaut_head: np.ndarray, second_head: np.ndarray
) -> None:
    """Fault injection: the first face of every frame raises in the swap, the second is
    swapped. The frame must go out exactly as it came in, and the caller's array (a
    bench's clip frame, reused) must not be drawn on."""
    swap_face = faces.swap_face_in_place
    calls = {"count": 0}

    def every_other_face_fails(frame: np.ndarray, *args: object, **kwargs: object) -> None:
        calls["count"] += 1
        if calls["count"] % 2 == 1:
            raise RuntimeError("injected: this face's swap fails")
        swap_face(frame, *args, **kwargs)  # type: ignore[arg-type]

    frame = scene((astronaut_head, 10), (second_head, 190))
    pristine = frame.copy()
    engine = FrameEngine(faces=faces)  # in-thread swaps: the injected fault applies
    try:
        session, _ = open_session(engine, source, quality="fast")
        session.process(frame, timestamp=0.0)  # tracks the two faces
        faces.swap_face_in_place = every_other_face_fails  # type: ignore[method-assign]
        output = session.process(frame, timestamp=1 / FPS)
    finally:
        faces.swap_face_in_place = swap_face  # type: ignore[method-assign]
        engine.close()
    assert output is not None and output.stats.faces == 2
    assert output.stats.error is not None and "injected" in output.stats.error
    assert np.array_equal(output.image, pristine)
    assert np.array_equal(frame, pristine)  # nothing drew on the caller's array


def test_the_source_switched_off_and_on_mid_stream_stops_nothing(
    faces: FacePipeline, source: SourceFace, astronaut_head: np.ndarray, second_head: np.ndarray
) -> None:
    """The user turns the source off and on as fast as requests come (PATCH), while the
    swap processes work: every frame still comes back, and the engine goes on serving."""
    engine = FrameEngine(faces=faces, swap_processes=1)
    try:
        engine.wait_ready()
        toggled, toggled_out = open_session(engine, source, quality="fast")
        other, other_out = open_session(engine, source, quality="fast")
        frames = [scene((astronaut_head, 10 + i), (second_head, 190 - i)) for i in range(40)]
        stop = threading.Event()

        def toggle() -> None:
            while not stop.is_set():
                toggled.source = None
                toggled.source = source

        switcher = threading.Thread(target=toggle)
        switcher.start()
        try:
            feed_together([(toggled, frames, None), (other, frames, None)])
        finally:
            stop.set()
            switcher.join()
        for collector in (toggled_out, other_out):
            collector.wait_for(len(frames))
            assert [o.tag for o in collector.outputs] == list(range(len(frames)))
        assert all(o.stats.error is None for o in other_out.outputs)
        after = other.process(frames[-1], timestamp=5.0)
        assert after is not None and after.stats.swapped == 2  # the engine still runs
    finally:
        engine.close()


def test_a_session_without_a_source_still_counts_its_faces_and_swaps_once_given_one(
    faces: FacePipeline, source: SourceFace, astronaut_head: np.ndarray, second_head: np.ndarray
) -> None:
    """No source yet (or swapping off): the faces are tracked and counted, nothing is
    drawn; a source set later swaps from the next frame on, the faces already followed."""
    engine = FrameEngine(faces=faces)
    try:
        session, collector = open_session(engine, None, quality="fast")
        frames = [scene((astronaut_head, 10 + i), (second_head, 190 - i)) for i in range(12)]
        feed(session, frames[:6], fps=None)
        collector.wait_for(6)
        for output in collector.outputs:
            frame = frames[output.tag]  # type: ignore[index]
            assert output.stats.faces == 2 and output.stats.swapped == 0, output.stats
            assert np.array_equal(output.image, frame)  # counted, not drawn on
        session.enabled = False
        session.source = source
        off = session.process(frames[6], timestamp=6 / FPS)
        assert off is not None and (off.stats.faces, off.stats.swapped) == (2, 0)
        session.enabled = True
        on = session.process(frames[7], timestamp=7 / FPS)
        assert on is not None and (on.stats.faces, on.stats.swapped) == (2, 2)
        assert not np.array_equal(on.image, frames[7])
        assert session.errors == {}
    finally:
        engine.close()


def test_a_labelled_session_carries_the_label_on_every_frame_swapped_or_not(
    faces: FacePipeline, source: SourceFace, astronaut_head: np.ndarray
) -> None:
    """The disclosure label is burnt into the top right corner of whatever goes out of a
    labelled session: swapped frames, frames without a source, frames that fail; the
    caller's own array is never drawn on, and an unlabelled session is left alone."""
    engine = FrameEngine(faces=faces)
    try:
        session = engine.open_session(quality="fast", detect_in_background=False)
        frame = scene((astronaut_head, 40))
        pristine = frame.copy()
        plain = session.process(frame, timestamp=0.0)
        assert plain is not None and np.array_equal(plain.image, frame)
        session.label = True
        unswapped = session.process(frame, timestamp=1 / FPS)
        session.source = source
        swapped = session.process(frame, timestamp=2 / FPS)
        session.source = "not a prepared face"  # type: ignore[assignment]
        failed = session.process(frame, timestamp=3 / FPS)
        assert unswapped is not None and swapped is not None and failed is not None
        assert unswapped.stats.swapped == 0 and swapped.stats.swapped == 1
        assert failed.stats.error is not None and failed.stats.error.startswith("swap")
        height, width = frame.shape[:2]
        for output in (unswapped, swapped, failed):
            corner = output.image[: height // 6, width // 2 :]
            assert not np.array_equal(corner, frame[: height // 6, width // 2 :])
        # Without a swap, the label is all that changed.
        changed = (unswapped.image != frame).any(axis=2)
        assert not changed[height // 6 :].any() and not changed[:, : width // 2].any()
        assert np.array_equal(frame, pristine)
    finally:
        engine.close()
