"""The One Euro filter (Casiez, Roussel and Vogel, CHI 2012) over whole landmark meshes.

A low-pass filter whose cutoff rises with speed: at rest it smooths hard, so sensor noise
does not make the swapped face shimmer; in motion it opens up, so the face does not lag.
One filter holds the state for one tracked face; all 468 points are filtered at once.

Speed is measured in face sizes per second (not pixels), so the same parameters work for a
face 50 px wide and one 500 px wide, and the whole face shares one speed: points filtered
at different cutoffs would bend the face's shape while it moves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class OneEuroParams:
    min_cutoff: float = 0.6
    """Cutoff (Hz) at rest: lower is smoother and laggier when still."""
    beta: float = 4.0
    """How fast the cutoff rises with speed (per face size per second)."""
    derivative_cutoff: float = 1.0
    """Cutoff (Hz) for the speed estimate itself."""


# Mean displacement, in face sizes, beyond which a new fit is a jump rather than motion: a
# fast head turn moves about 0.1 face sizes between frames at 30 fps.
_JUMP_FACE_SIZES = 0.3


def _smoothing_factor(cutoff_hz: float, elapsed_s: float) -> float:
    time_constant = 1.0 / (2.0 * math.pi * cutoff_hz)
    return 1.0 / (1.0 + time_constant / elapsed_s)


class OneEuroFilter:
    def __init__(self, params: OneEuroParams | None = None) -> None:
        self.params = params or OneEuroParams()
        self._value: np.ndarray | None = None
        self._velocity: np.ndarray | None = None
        self._speed = 0.0
        self._time = 0.0

    def reset(self) -> None:
        self._value = None
        self._velocity = None
        self._speed = 0.0

    def __call__(self, points: np.ndarray, timestamp: float, scale: float) -> np.ndarray:
        """The filtered points; `scale` is the face size in pixels, `timestamp` in seconds."""
        if self._value is None or self._value.shape != points.shape:
            self._value = points.astype(np.float32, copy=True)
            self._time = timestamp
            return self._value
        elapsed = timestamp - self._time
        if elapsed <= 0:  # a repeated or out-of-order timestamp: assume one 30 fps frame
            elapsed = 1.0 / 30.0
        self._time = timestamp
        params = self.params
        # A jump no head makes in one frame (a cut, a looped clip, a camera switch): start
        # over from the new position rather than glide there over several frames.
        jump = np.linalg.norm(points[:, :2] - self._value[:, :2], axis=1).mean()
        if float(jump) > _JUMP_FACE_SIZES * max(scale, 1.0):
            self._value = points.astype(np.float32, copy=True)
            self._velocity = None
            self._speed = 0.0
            return self._value
        # Each point's velocity is low-passed before its magnitude is taken (as One Euro
        # filters the derivative): sensor noise then cancels out instead of adding up to
        # a speed that would open the filter on a face that is holding still.
        velocity = (points[:, :2] - self._value[:, :2]) / elapsed
        speed_alpha = np.float32(_smoothing_factor(params.derivative_cutoff, elapsed))
        if self._velocity is None or self._velocity.shape != velocity.shape:
            self._velocity = np.zeros_like(velocity)
        self._velocity += speed_alpha * (velocity - self._velocity)
        # In face sizes per second, so one setting suits near and far faces.
        self._speed = float(np.linalg.norm(self._velocity, axis=1).mean()) / max(scale, 1.0)
        cutoff = params.min_cutoff + params.beta * self._speed
        alpha = np.float32(_smoothing_factor(cutoff, elapsed))
        self._value = self._value + alpha * (points - self._value)
        return self._value
