"""The real-time pipeline's control parts: One Euro smoothing and the quality controller."""

from __future__ import annotations

import numpy as np
import pytest

from livefuse.stream.quality import LADDER, QualityController
from livefuse.stream.smoothing import OneEuroFilter, OneEuroParams

FPS = 30.0
FACE_SIZE = 100.0


def run_filter(filter_: OneEuroFilter, positions: np.ndarray) -> np.ndarray:
    """Filter a (frames, points, 3) sequence of landmark sets at 30 fps."""
    return np.stack(
        [filter_(points, index / FPS, FACE_SIZE) for index, points in enumerate(positions)]
    )


def test_one_euro_removes_most_of_the_jitter_of_a_still_face() -> None:
    rng = np.random.default_rng(1)
    rest = rng.uniform(0, 200, size=(468, 3)).astype(np.float32)
    noisy = rest + rng.normal(0, 1.0, size=(90, 468, 3)).astype(np.float32)

    smoothed = run_filter(OneEuroFilter(), noisy)

    raw_rms = np.sqrt(((noisy[15:, :, :2] - rest[:, :2]) ** 2).sum(axis=2).mean())
    smooth_rms = np.sqrt(((smoothed[15:, :, :2] - rest[:, :2]) ** 2).sum(axis=2).mean())
    assert smooth_rms < 0.35 * raw_rms


def test_one_euro_follows_a_moving_face_closely() -> None:
    # One face size per second to the right: a brisk head movement.
    start = np.zeros((468, 3), dtype=np.float32)
    steps = np.arange(60, dtype=np.float32)[:, None, None] * np.array(
        [FACE_SIZE / FPS, 0, 0], dtype=np.float32
    )
    moving = start + steps

    smoothed = run_filter(OneEuroFilter(), moving)

    lag_px = float(np.abs(moving[30:, :, 0] - smoothed[30:, :, 0]).max())
    assert lag_px < 0.1 * FACE_SIZE  # under two frames' worth of motion
    # Less smoothing (a higher resting cutoff) lags less still: the parameters are live.
    looser = run_filter(OneEuroFilter(OneEuroParams(min_cutoff=3.0)), moving)
    assert float(np.abs(moving[30:, :, 0] - looser[30:, :, 0]).max()) < lag_px


class FrameClock:
    """The controller's clock in a test: a frame every 1/32 s (exact in binary, so 96
    frames are exactly 3 s), moved on by `tick`."""

    PERIOD = 1 / 32

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def tick(self, frames: int = 1) -> None:
        self.now += frames * self.PERIOD


def controller_at(mode: str = "auto") -> tuple[QualityController, FrameClock]:
    clock = FrameClock()
    controller = QualityController(mode=mode, target_fps=32.0, clock=clock)  # type: ignore[arg-type]
    return controller, clock


def feed(controller: QualityController, clock: FrameClock, frame_ms: float, **kw: int) -> None:
    clock.tick()
    controller.record(frame_ms, **kw)


def frames_to_climb(controller: QualityController, clock: FrameClock, frame_ms: float = 5.0) -> int:
    level = controller.level.name
    for count in range(1, 5000):
        feed(controller, clock, frame_ms)
        if controller.level.name != level:
            return count
    raise AssertionError("never climbed")


def test_controller_starts_in_the_middle_climbs_slowly_and_steps_down_fast() -> None:
    controller, clock = controller_at()  # a 31.25 ms budget
    assert controller.level.name == "fast"
    # 3 s of quiet frames: from the first quiet frame, 96 frames later.
    assert frames_to_climb(controller, clock, 10.0) == 97
    assert controller.level.name == "balanced"
    assert frames_to_climb(controller, clock, 10.0) == 97
    assert controller.level.name == "high"
    feed(controller, clock, 40.0)
    assert controller.level.name == "high"  # one frame over 90%: not yet
    feed(controller, clock, 40.0)  # half of the recent frames over 90% of the budget
    assert controller.level.name == "balanced"
    feed(controller, clock, 60.0)  # one frame at nearly twice the budget is enough alone
    assert controller.level.name == "fast"
    # Pinned and back to auto mid-stream: auto carries on from where it is.
    controller.set_mode("high")
    controller.set_mode("auto")
    assert controller.level.name == "high"


def test_the_controller_judges_time_not_frames() -> None:
    """Ten streams' frames arrive ten times as often: the climb still takes 3 s, and
    one stream's slow frame among nine quick ones does not step down."""
    controller, clock = controller_at()
    for _ in range(40):
        for stream in range(10):
            controller.record(40.0 if stream == 9 else 10.0)  # all within one frame time
        clock.tick()
    assert controller.level.name == "fast"  # 1 in 10 over: no step down
    climbed = None
    for frame in range(200):
        for _ in range(10):
            controller.record(5.0)
        if controller.level.name != "fast":
            climbed = frame
            break
        clock.tick()
    assert climbed == 96  # 3 s of frame times, not 90 records


def test_controller_steps_down_on_a_dropped_frame_and_stops_at_the_bottom() -> None:
    controller, clock = controller_at()
    for _ in range(len(LADDER) + 2):
        feed(controller, clock, 5.0, dropped=1)
    assert controller.level is LADDER[-1]


def test_a_pinned_level_holds_whatever_the_frame_times() -> None:
    controller, clock = controller_at("high")
    for _ in range(10):
        feed(controller, clock, 100.0, dropped=1)
    assert controller.level.name == "high"
    controller.set_mode("fast")
    assert controller.level.name == "fast"
    with pytest.raises(ValueError, match="quality must be one of"):
        controller.set_mode("ultra")  # type: ignore[arg-type]


def test_one_euro_snaps_to_a_jump_instead_of_gliding() -> None:
    filter_ = OneEuroFilter()
    still = np.zeros((468, 3), dtype=np.float32)
    for index in range(10):
        filter_(still, index / FPS, FACE_SIZE)
    jumped = still + np.array([2 * FACE_SIZE, 0, 0], dtype=np.float32)  # a cut in the video
    np.testing.assert_allclose(filter_(jumped, 10 / FPS, FACE_SIZE), jumped)
    # And it smooths again from there.
    wobble = jumped + np.array([1.0, 0, 0], dtype=np.float32)
    assert float(filter_(wobble, 11 / FPS, FACE_SIZE)[0, 0]) < float(wobble[0, 0])


def test_controller_restarts_at_the_starting_level_and_a_pinned_one_stays() -> None:
    controller, clock = controller_at()
    for _ in range(8):
        feed(controller, clock, 100.0)  # far over: all the way down
    assert controller.level.name == "minimal"
    controller.restart()
    assert controller.level.name == "fast"
    pinned, _ = controller_at("high")
    pinned.restart()
    assert pinned.level.name == "high"


def test_a_climb_that_fails_makes_the_next_one_wait_longer() -> None:
    controller, clock = controller_at()  # starts at fast
    assert frames_to_climb(controller, clock) == 97  # fast -> balanced after 3 s
    feed(controller, clock, 100.0)  # the climb fails at once: back to fast
    assert controller.level.name == "fast"
    assert frames_to_climb(controller, clock) == 193  # twice the wait
    feed(controller, clock, 100.0)
    assert frames_to_climb(controller, clock) == 385
    # This time the climb holds: the next one needs the usual wait again.
    for _ in range(97):
        feed(controller, clock, 20.0)  # neither quiet nor over
    assert controller.level.name == "balanced"
    assert frames_to_climb(controller, clock) == 97
