"""Identity checks with dlib's face recogniser: does this face read as that person?

dlib (with the `face_recognition_models` weights) is a test-only dependency. It is an
independent judge of our swaps, so it must never be a model the swapper itself uses.

Descriptors are dlib's 128-d ResNet embeddings; by dlib's convention two faces are the same
person when their euclidean distance is below 0.6 (`SAME_PERSON_THRESHOLD`).

Images are OpenCV's BGR uint8; boxes are `(x1, y1, x2, y2)` in pixels, as in the rest of livefuse.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

import cv2
import dlib  # type: ignore[import-untyped]
import face_recognition_models  # type: ignore[import-untyped]
import numpy as np
import numpy.typing as npt

Box = tuple[float, float, float, float]
Descriptor = npt.NDArray[np.float64]  # shape (128,)
Image = np.ndarray  # uint8, as OpenCV reads it (BGR, BGRA or grey)

SAME_PERSON_THRESHOLD: Final = 0.6

# A detection is "the face at this box" when it overlaps the box at least this much. Loose on
# purpose: HOG, the CNN and a caller's box (another detector's, or a transformed one) each frame
# a face differently.
DEFAULT_MIN_IOU: Final = 0.25

# The CNN costs ~10 s on a 1280x886 frame on two cores. Above this many (upsampled) pixels it is
# skipped, so that a fallback never turns one check into minutes.
_CNN_MAX_PIXELS: Final = 1_200_000


@dataclass(frozen=True)
class _Stage:
    detector: Literal["hog", "cnn"]
    upsample: int

    @property
    def name(self) -> str:
        return f"{self.detector}_up{self.upsample}" if self.upsample else self.detector


# Cheapest first. HOG misses faces under ~80 px (upsampling fixes that) and faces tilted or
# turned much past 20-30 degrees, which the slower CNN (mmod) detector still finds.
_STAGES: Final = (
    _Stage("hog", 0),
    _Stage("hog", 1),
    _Stage("hog", 2),
    _Stage("cnn", 0),
    _Stage("cnn", 1),
)


@dataclass(frozen=True)
class FaceMatch:
    """A face as the recogniser sees it."""

    box: Box
    descriptor: Descriptor
    # The stage that found it ("hog", "hog_up1", "hog_up2", "cnn", "cnn_up1"), or "box" when no
    # detector did and the caller's box was described as it is.
    method: str


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _to_rgb(image: Image) -> Image:
    """BGR, BGRA or grey (OpenCV's layouts) to the contiguous RGB that dlib expects."""
    if image.ndim == 2:
        code = cv2.COLOR_GRAY2RGB
    elif image.shape[2] == 4:
        code = cv2.COLOR_BGRA2RGB
    else:
        code = cv2.COLOR_BGR2RGB
    return np.ascontiguousarray(cv2.cvtColor(image, code), dtype=np.uint8)


def _rect_to_box(rect: dlib.rectangle, dx: int = 0, dy: int = 0) -> Box:
    # dlib rectangles include their right and bottom pixel.
    return (
        float(rect.left() + dx),
        float(rect.top() + dy),
        float(rect.right() + 1 + dx),
        float(rect.bottom() + 1 + dy),
    )


def _box_to_rect(box: Box) -> dlib.rectangle:
    x1, y1, x2, y2 = (round(v) for v in box)
    return dlib.rectangle(x1, y1, max(x1, x2 - 1), max(y1, y2 - 1))


class DlibRecognizer:
    """dlib's HOG and CNN face detectors, 5-point shape predictor and ResNet recogniser.

    Loading takes about a second: build one per test session (a session-scoped fixture).
    """

    def __init__(self, *, use_cnn: bool = True, min_iou: float = DEFAULT_MIN_IOU) -> None:
        models = face_recognition_models
        self._hog = dlib.get_frontal_face_detector()
        self._cnn = (
            dlib.cnn_face_detection_model_v1(models.cnn_face_detector_model_location())
            if use_cnn
            else None
        )
        self._shape = dlib.shape_predictor(models.pose_predictor_five_point_model_location())
        self._encoder = dlib.face_recognition_model_v1(models.face_recognition_model_location())
        self._min_iou = min_iou

    # -- detection -----------------------------------------------------------------------------

    def _stages_for(self, rgb: Image) -> list[_Stage]:
        pixels = rgb.shape[0] * rgb.shape[1]
        return [
            s
            for s in _STAGES
            if s.detector == "hog"
            or (self._cnn is not None and pixels * 4**s.upsample <= _CNN_MAX_PIXELS)
        ]

    def _run(self, stage: _Stage, rgb: Image) -> list[Box]:
        if stage.detector == "cnn" and self._cnn is not None:
            return [_rect_to_box(d.rect) for d in self._cnn(rgb, stage.upsample)]
        rects, _scores, _poses = self._hog.run(rgb, stage.upsample, 0.0)
        return [_rect_to_box(r) for r in rects]

    def detect(self, bgr: Image) -> tuple[list[Box], str]:
        """Face boxes from the first stage that finds any, with that stage's name ("" if none)."""
        rgb = _to_rgb(bgr)
        for stage in self._stages_for(rgb):
            boxes = self._run(stage, rgb)
            if boxes:
                return boxes, stage.name
        return [], ""

    def landmarks(self, bgr: Image, box: Box) -> npt.NDArray[np.float64]:
        """dlib's five points for the face in `box`, shape (5, 2) as (x, y).

        0-1: outer and inner corner of the eye on the image's right; 2-3: outer and inner corner
        of the eye on the image's left; 4: the base of the nose.
        """
        shape = self._shape(_to_rgb(bgr), _box_to_rect(box))
        return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)

    # -- descriptors ---------------------------------------------------------------------------

    def _describe(self, rgb: Image, box: Box) -> Descriptor:
        shape = self._shape(rgb, _box_to_rect(box))
        return np.asarray(self._encoder.compute_face_descriptor(rgb, shape), dtype=np.float64)

    def descriptors(self, bgr: Image) -> list[tuple[Box, Descriptor]]:
        """Every face that the first successful detector stage finds, with its descriptor."""
        rgb = _to_rgb(bgr)
        boxes, _ = self.detect(bgr)
        return [(box, self._describe(rgb, box)) for box in boxes]

    def locate(self, bgr: Image, box: Box) -> FaceMatch | None:
        """The face at `box`: the detection that overlaps it best, else `box` itself.

        Stages run until one finds a face overlapping the box (a face found elsewhere does not
        stop the search). They run on a crop three times the box's size, so that other faces in
        a large frame neither cost time nor compete and the CNN stays affordable; the descriptor
        is computed on the whole image so that dlib's alignment chip keeps its context.
        Returns None only when the box lies off the image.
        """
        rgb = _to_rgb(bgr)
        height, width = rgb.shape[:2]
        x1, y1, x2, y2 = box
        if x2 <= max(x1, 0) or y2 <= max(y1, 0) or x1 >= width or y1 >= height:
            return None
        bw, bh = x2 - x1, y2 - y1
        cx, cy = max(0, int(x1 - bw)), max(0, int(y1 - bh))
        crop = np.ascontiguousarray(
            rgb[cy : min(height, int(y2 + bh) + 1), cx : min(width, int(x2 + bw) + 1)]
        )

        for stage in self._stages_for(crop):
            found = [(b[0] + cx, b[1] + cy, b[2] + cx, b[3] + cy) for b in self._run(stage, crop)]
            overlap, best = max(((iou(b, box), b) for b in found), default=(0.0, box))
            if overlap >= self._min_iou:
                return FaceMatch(box=best, descriptor=self._describe(rgb, best), method=stage.name)
        # No detector agrees there is a face here. Describe what is there anyway, so that a caller
        # can still tell "someone else" from "the person", and can read `method` to know.
        return FaceMatch(box=box, descriptor=self._describe(rgb, box), method="box")

    def descriptor_at(self, bgr: Image, box: Box) -> Descriptor | None:
        """Descriptor of the face at `box` (see `locate`); None if the box is off the image."""
        match = self.locate(bgr, box)
        return None if match is None else match.descriptor

    @staticmethod
    def distance(a: Descriptor, b: Descriptor) -> float:
        """Euclidean distance; below `SAME_PERSON_THRESHOLD` (0.6) reads as the same person."""
        return float(
            np.linalg.norm(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))
        )
