"""Whether the frame engine's stages work: failures in a row, said loudly once.

A frame that fails in a stage goes out unswapped and is counted per session; that keeps
the stream alive but, alone, is silent. `StageHealth` watches the stages across all
sessions: a stage that fails on `threshold` frames in a row, none of its frames going
through between them, is failing. That is logged as one ERROR with the cause and the
count, is the engine's `problem` (so /readyz says 503 with it: no session can swap), and
is said again (WARNING) once a frame goes through that stage again.

"Goes through": tracking succeeded for any frame tracked; the swap stage only for a
frame that had faces swapped (a frame with no face to swap proves nothing about it).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

log = logging.getLogger(__name__)

# About a second of one 30 fps stream: more than a burst of bad frames, soon enough.
DEFAULT_THRESHOLD = 30


@dataclass
class _StageState:
    failures: int = 0
    """Failures in a row."""
    cause: str = ""
    reported: bool = False


class StageHealth:
    """See the module docstring. Written by the engine's workers, read by anyone."""

    def __init__(self, *, threshold: int = DEFAULT_THRESHOLD) -> None:
        if threshold < 1:
            raise ValueError("threshold must be at least 1")
        self.threshold = threshold
        self._stages: dict[str, _StageState] = {}
        self._lock = threading.Lock()

    def failed(self, stage: str, cause: str) -> None:
        with self._lock:
            state = self._stages.setdefault(stage, _StageState())
            state.failures += 1
            state.cause = cause
            report = state.failures >= self.threshold and not state.reported
            if report:
                state.reported = True
        if report:
            log.error(
                "event=stage_failing stage=%s failures=%d cause=%r: frames pass through "
                "unswapped until it works again",
                stage,
                state.failures,
                cause,
            )

    def succeeded(self, stage: str) -> None:
        with self._lock:
            state = self._stages.get(stage)
            if state is None or state.failures == 0:
                return
            failures, reported = state.failures, state.reported
            self._stages[stage] = _StageState()
        if reported:
            log.warning("event=stage_recovered stage=%s after_failures=%d", stage, failures)

    def failing(self) -> dict[str, str]:
        """The stages failing now, with their last cause."""
        with self._lock:
            return {
                stage: f"failed on the last {state.failures} frames: {state.cause}"
                for stage, state in self._stages.items()
                if state.failures >= self.threshold
            }

    def problem(self) -> str | None:
        """The failing stages in one line, or None."""
        failing = self.failing()
        if not failing:
            return None
        return "; ".join(f"the {stage} stage {what}" for stage, what in sorted(failing.items()))
