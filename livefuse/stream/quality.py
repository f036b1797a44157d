"""Adaptive quality: a ladder of levels and a controller that moves along it.

Each level trades picture quality for time: the detector's input size and how often it
runs, how often the landmarks are refitted, the resolution the face is blended at, how
many faces are swapped, the face enhancer (bring-your-own; only the top level runs it) and
the output scale. The controller watches each frame's
processing time against the budget (1 / target fps), steps down at once when frames run
over, and steps back up only after a long quiet spell (hysteresis), so it does not flap.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

QualityMode = Literal["auto", "high", "balanced", "fast"]
QUALITY_MODES: tuple[QualityMode, ...] = ("auto", "high", "balanced", "fast")


@dataclass(frozen=True)
class QualityLevel:
    name: str
    detect_size: int
    """Longer side of the frame as the detector sees it."""
    detect_interval: int
    """Frames between detector runs while every face is tracked."""
    landmark_interval: int
    """Landmarks are refitted every this many frames; between, the last fit is reused."""
    blend_scale: float
    """Resolution of the swap and blend relative to the face's own size in the frame."""
    shape_transfer: bool
    """Reshape the target towards the source's face shape (costly; identity gains)."""
    max_faces: int | None
    """At most this many faces (largest first) are swapped; None: all of them."""
    output_scale: float
    """The output frame's size relative to the input."""
    enhance: bool
    """Run the face enhancer (where one is loaded): the first thing a cheaper level drops."""


LADDER: tuple[QualityLevel, ...] = (
    QualityLevel(
        name="high",
        detect_size=640,
        detect_interval=5,
        landmark_interval=1,
        blend_scale=1.0,
        shape_transfer=True,
        max_faces=None,
        output_scale=1.0,
        enhance=True,
    ),
    QualityLevel(
        name="balanced",
        detect_size=480,
        detect_interval=10,
        landmark_interval=1,
        blend_scale=0.75,
        shape_transfer=True,
        max_faces=None,
        output_scale=1.0,
        enhance=False,
    ),
    QualityLevel(
        name="fast",
        detect_size=320,
        detect_interval=15,
        landmark_interval=2,
        blend_scale=0.5,
        shape_transfer=False,
        max_faces=None,
        output_scale=1.0,
        enhance=False,
    ),
    QualityLevel(
        name="minimal",
        detect_size=320,
        detect_interval=20,
        landmark_interval=3,
        blend_scale=0.4,
        shape_transfer=False,
        max_faces=4,
        output_scale=1.0,
        enhance=False,
    ),
)
LEVELS_BY_NAME = {level.name: level for level in LADDER}
_AUTO_START = "fast"


class QualityController:
    """Chooses the level for the next frame from the times of the last ones.

    Step down when a quarter of the frames of the last 4 frame budgets (133 ms at 30
    fps), and at least 2, overran 90% of the budget (for one stream: 2 of its last 4),
    when one overran it by half again, or when a frame was dropped. Step up after 3 s in
    which every frame took under 55% of it: each climb that does not hold costs a few
    late frames, so climbing is the cautious move. A climb that fails within 3 s doubles
    the quiet spell the next one needs (up to 16 times, about 50 s): where the load only
    just fits one level, the controller stops paying a dropped frame every few seconds to
    find out again. Holding a level for long, or a restart, forgets that. Pinned to a
    level, it only records.

    Windows are in time, not frames: one engine's shared controller hears every frame of
    every stream on `auto`, a single stream's hears 30 a second. Thread-safe: the engine's
    workers record and restart it.
    """

    _DOWN_BUDGETS, _DOWN_MIN_OVER, _DOWN_SHARE, _DOWN_FRACTION = 4, 2, 0.9, 0.25
    _SEVERE_SHARE = 1.5
    _UP_S, _UP_SHARE = 3.0, 0.55
    _MAX_BACKOFF = 16

    def __init__(
        self,
        *,
        mode: QualityMode = "auto",
        target_fps: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.budget_ms = 1000.0 / target_fps
        self._clock = clock
        self._lock = threading.Lock()
        self._recent: deque[tuple[float, bool]] = deque()
        """(time, overran) of the frames in the step-down window."""
        self._quiet_since: float | None = None
        self._index = 0
        self._started = False
        self._backoff = 1
        """The quiet spell a climb needs, in multiples of `_UP_S`."""
        self._climbed_at: float | None = None
        """When the last climb happened, while it may still fail."""
        self.mode: QualityMode = "auto"
        self.set_mode(mode)

    @property
    def level(self) -> QualityLevel:
        return LADDER[self._index]

    def set_mode(self, mode: QualityMode) -> None:
        if mode not in QUALITY_MODES:
            raise ValueError(f"quality must be one of {', '.join(QUALITY_MODES)}, not {mode!r}")
        with self._lock:
            self.mode = mode
            if mode != "auto":
                self._index = LADDER.index(LEVELS_BY_NAME[mode])
            elif not self._started:
                # A stream starts in the middle and climbs: starting at the top and
                # stepping down makes its first frames queue up behind each other (a
                # visible stall).
                self._index = LADDER.index(LEVELS_BY_NAME[_AUTO_START])
            self._forget()
            self._backoff = 1
            self._climbed_at = None

    def restart(self) -> None:
        """Forget the history, as a new stream would start: `auto` goes back to its
        starting level (after a warm-up, or once the frames it judged are long gone)."""
        with self._lock:
            self._started = False
        self.set_mode(self.mode)

    def record(self, frame_ms: float, *, dropped: int = 0) -> None:
        """Feed one frame's processing time and how many inputs were dropped meanwhile."""
        with self._lock:
            self._started = True
            if self.mode == "auto":
                self._judge(frame_ms, dropped, self._clock())

    def _forget(self) -> None:
        self._recent.clear()
        self._quiet_since = None

    def _judge(self, frame_ms: float, dropped: int, now: float) -> None:
        if self._climbed_at is not None and now - self._climbed_at > self._UP_S:
            self._climbed_at = None  # the climb held
            self._backoff = 1
        budget = self.budget_ms
        self._recent.append((now, frame_ms > budget * self._DOWN_SHARE))
        window_s = self._DOWN_BUDGETS * budget / 1000.0
        while self._recent and now - self._recent[0][0] > window_s:
            self._recent.popleft()
        over = sum(1 for _, overran in self._recent if overran)
        overrun = over >= self._DOWN_MIN_OVER and over >= self._DOWN_FRACTION * len(self._recent)
        severe = frame_ms > budget * self._SEVERE_SHARE
        if (overrun or severe or dropped) and self._index < len(LADDER) - 1:
            if self._climbed_at is not None:  # the last climb did not hold
                self._backoff = min(self._backoff * 2, self._MAX_BACKOFF)
                self._climbed_at = None
            self._index += 1
            self._forget()
            return
        if frame_ms >= budget * self._UP_SHARE:
            self._quiet_since = None
            return
        if self._quiet_since is None:
            self._quiet_since = now
        if now - self._quiet_since >= self._UP_S * self._backoff and self._index > 0:
            self._index -= 1
            self._forget()
            self._climbed_at = now
