"""SCRFD (InsightFace's det_10g, det_2.5g, det_500m): boxes, five keypoints and scores.

The graph gives, per stride (8, 16, 32), a score, four distances (left, top, right,
bottom) and five keypoint offsets for each anchor, two anchors per cell, cells in
row-major order; everything is in units of the stride, from the anchor's centre. Decoding
and the NMS follow InsightFace's `model_zoo.scrfd` (the parity tests hold them to it).

The frame is scaled to fit `max_side` (aspect kept) and padded right and bottom with
black to a multiple of 32, or to a `max_side` square as the reference does.
"""

from __future__ import annotations

import cv2
import numpy as np

from livefuse.engines.runtime import Engine
from livefuse.engines.types import Detection

STRIDES = (8, 16, 32)
_ANCHORS_PER_CELL = 2
_ALIGN = 32
_MEAN, _STD = 127.5, 128.0


class SCRFDDetector:
    def __init__(
        self,
        engine: Engine,
        *,
        score_threshold: float = 0.5,
        nms_threshold: float = 0.4,
        square: bool = False,
    ) -> None:
        outputs = len(engine.outputs)
        if outputs != 3 * len(STRIDES):
            raise ValueError(
                f"SCRFD graph has {outputs} outputs; expected 9 (scores, boxes and "
                "keypoints for strides 8, 16, 32)"
            )
        self._engine = engine
        self._input_name = engine.inputs[0].name
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold
        self.square = square
        self._centres: dict[tuple[int, int, int], np.ndarray] = {}

    def detect(self, frame_bgr: np.ndarray, *, max_side: int = 640) -> list[Detection]:
        """Faces in a BGR frame, best score first."""
        height, width = frame_bgr.shape[:2]
        side = max(_ALIGN, -(-max_side // _ALIGN) * _ALIGN)
        # As the reference: the longer side fills the canvas, the other is truncated, and
        # the scale is taken from the height actually used.
        if height / width > 1:
            scaled_h, scaled_w = side, max(1, int(side / (height / width)))
        else:
            scaled_w, scaled_h = side, max(1, int(side * (height / width)))
        scale = scaled_h / height
        if self.square:
            canvas_w = canvas_h = side
        else:
            canvas_w = -(-scaled_w // _ALIGN) * _ALIGN
            canvas_h = -(-scaled_h // _ALIGN) * _ALIGN
        canvas = np.zeros((canvas_h, canvas_w, 3), dtype=np.uint8)
        canvas[:scaled_h, :scaled_w] = cv2.resize(frame_bgr, (scaled_w, scaled_h))
        blob = (canvas[:, :, ::-1].astype(np.float32) - np.float32(_MEAN)) / np.float32(_STD)
        blob = np.ascontiguousarray(blob.transpose(2, 0, 1)[None])
        outputs = self._engine.run({self._input_name: blob})
        boxes, scores, keypoints = self._decode(outputs, canvas_h, canvas_w)
        if scores.size == 0:
            return []
        boxes /= scale
        keypoints /= scale
        order = np.argsort(-scores, kind="stable")
        boxes, scores, keypoints = boxes[order], scores[order], keypoints[order]
        keep = nms(boxes, scores, self.nms_threshold)
        return [
            Detection(
                box=boxes[i].astype(np.float32),
                score=float(scores[i]),
                keypoints=keypoints[i].astype(np.float32),
            )
            for i in keep
        ]

    def anchor_centres(self, rows: int, cols: int, stride: int) -> np.ndarray:
        """(rows * cols * 2, 2) anchor centres in canvas pixels, cached per grid."""
        key = (rows, cols, stride)
        centres = self._centres.get(key)
        if centres is None:
            ys, xs = np.mgrid[:rows, :cols]
            grid = np.stack([xs, ys], axis=-1).astype(np.float32)
            centres = np.repeat((grid * stride).reshape(-1, 2), _ANCHORS_PER_CELL, axis=0)
            self._centres[key] = centres
        return centres

    def _decode(
        self, outputs: list[np.ndarray], height: int, width: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        count = len(STRIDES)
        all_boxes, all_scores, all_keypoints = [], [], []
        for index, stride in enumerate(STRIDES):
            # Batched exports carry a leading batch dimension: take the one frame.
            scores, distances, offsets = (
                o[0] if o.ndim == 3 else o
                for o in (outputs[index], outputs[index + count], outputs[index + 2 * count])
            )
            centres = self.anchor_centres(height // stride, width // stride, stride)
            chosen = np.nonzero(scores.reshape(-1) >= self.score_threshold)[0]
            if chosen.size == 0:
                continue
            centre = centres[chosen]
            distance = distances[chosen] * stride
            boxes = np.concatenate([centre - distance[:, :2], centre + distance[:, 2:]], axis=1)
            points = centre[:, None, :] + (offsets[chosen] * stride).reshape(-1, 5, 2)
            all_boxes.append(boxes)
            all_scores.append(scores.reshape(-1)[chosen])
            all_keypoints.append(points)
        if not all_scores:
            return np.empty((0, 4), np.float32), np.empty(0, np.float32), np.empty((0, 5, 2))
        return (
            np.concatenate(all_boxes).astype(np.float32),
            np.concatenate(all_scores).astype(np.float32),
            np.concatenate(all_keypoints).astype(np.float32),
        )


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    """Greedy non-maximum suppression, boxes taken best score first (ties in order);
    overlap as the reference measures it, with its +1 pixel on widths and heights."""
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(int(best))
        w = np.maximum(0.0, np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest]) + 1)
        overlap = w * h / (areas[best] + areas[rest] - w * h)
        order = rest[overlap <= threshold]
    return keep
