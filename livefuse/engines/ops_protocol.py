"""The interface of a pixel-operations module (`Backend.ops`): what engines/ops.py does
on the CPU and its CuPy twin on the cuda backend, function for function.

A module satisfies it by having these functions (mypy checks a module against a
Protocol); each one's meaning and conventions are documented in engines/ops.py. Code
that does pixel work takes an `ops: Ops` and calls through it, never a library directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType
from typing import Any, Literal, Protocol

import numpy as np

Array = Any
"""An array of the module's namespace (numpy.ndarray on the CPU, cupy.ndarray on cuda)."""

Border = Literal["constant", "replicate"]


class Ops(Protocol):
    xp: ModuleType

    def to_host(self, a: Array) -> np.ndarray: ...

    def from_host(self, a: np.ndarray) -> Array: ...

    def invert_affine(self, matrix: np.ndarray) -> np.ndarray: ...

    def nms_boxes(
        self,
        boxes_xywh: np.ndarray,
        scores: np.ndarray,
        score_threshold: float,
        iou_threshold: float,
    ) -> list[int]: ...

    def warp_affine(
        self,
        image: Array,
        matrix: np.ndarray,
        size: tuple[int, int],
        *,
        border: Border = "constant",
        border_value: float = 0.0,
        inverse_map: bool = False,
    ) -> Array: ...

    def remap(
        self,
        image: Array,
        map_x: Array,
        map_y: Array,
        *,
        border: Border = "replicate",
        border_value: float = 0.0,
    ) -> Array: ...

    def resize(
        self, image: Array, size: tuple[int, int], *, interpolation: Literal["linear", "area"]
    ) -> Array: ...

    def flip_horizontal(self, image: Array) -> Array: ...

    def gaussian_blur(self, image: Array, sigma: float, *, ksize: int = 0) -> Array: ...

    def ellipse_kernel(self, diameter: int) -> np.ndarray: ...

    def erode(self, image: Array, kernel: np.ndarray) -> Array: ...

    def dilate(self, image: Array, kernel: np.ndarray) -> Array: ...

    def close(self, image: Array, kernel: np.ndarray) -> Array: ...

    def distance_transform(self, mask: Array, *, mask_size: Literal[3, 5]) -> Array: ...

    def fill_holes(self, mask: Array) -> Array: ...

    def inpaint(self, image: Array, mask: Array, radius: float) -> Array: ...

    def bgr_to_lab(self, image: Array) -> Array: ...

    def lab_to_bgr(self, lab: Array) -> Array: ...

    def masked_mean_std(self, image: Array, mask: Array) -> tuple[Array, Array]: ...

    def triangle_ids(
        self, xy: np.ndarray, triangles: np.ndarray, order: np.ndarray, shape: tuple[int, int]
    ) -> Array: ...

    def fill_polygon(
        self, mask: Array, polygon: np.ndarray, value: int, *, antialiased: bool = False
    ) -> None: ...

    def fill_convex_hull(self, mask: Array, points: np.ndarray, value: int) -> None: ...

    def alpha_blend(self, region: Array, rendered: Array, alpha: Array) -> None: ...

    def blob_from_bgr(
        self,
        image: Array,
        out: Array,
        *,
        scale: float = 1.0,
        mean: float | Sequence[float] = 0.0,
        std: float | Sequence[float] = 1.0,
        rgb: bool = True,
    ) -> None: ...

    def draw_label(self, image: Array, text: str) -> None: ...
