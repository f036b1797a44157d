"""SCRFD (InsightFace's det_10g, det_2.5g, det_500m): boxes, five keypoints and scores.

The graph gives, per stride (8, 16, 32), a score, four distances (left, top, right,
bottom) and five keypoint offsets for each anchor, two anchors per cell, cells in
row-major order; everything is in units of the stride, from the anchor's centre. Decoding
and the NMS follow InsightFace's `model_zoo.scrfd` (the parity tests hold them to it).

The frame is scaled to fit `max_side` (aspect kept) and padded right and bottom with
black to a multiple of 32, or to a `max_side` square as the reference does.

Pre-process (`scrfd_input`, `fill_input`), the batched forward pass and the decoding are
separate steps; `detect_batch` runs the frames that share an input size in one pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from livefuse.engines import ops as cpu_ops
from livefuse.engines.ops_protocol import Ops
from livefuse.engines.runtime import Engine, InputBuffers, fixed_batch
from livefuse.engines.types import Detection

STRIDES = (8, 16, 32)
_ANCHORS_PER_CELL = 2
_ALIGN = 32
_MEAN, _STD = 127.5, 128.0
# What a black padding pixel becomes once normalised.
_PADDING = (np.float32(0) - np.float32(_MEAN)) / np.float32(_STD)


@dataclass(frozen=True)
class ScrfdInput:
    """How a frame becomes SCRFD's input: scaled by `scale` to `scaled` (h, w) in the
    top-left of a `canvas` (h, w), the rest black."""

    scale: float
    scaled: tuple[int, int]
    canvas: tuple[int, int]


def scrfd_input(frame_shape: tuple[int, ...], max_side: int, *, square: bool) -> ScrfdInput:
    """The input plan for a frame of `frame_shape` at detection size `max_side`."""
    height, width = frame_shape[:2]
    side = max(_ALIGN, -(-max_side // _ALIGN) * _ALIGN)
    # As the reference: the longer side fills the canvas, the other is truncated, and
    # the scale is taken from the height actually used.
    if height / width > 1:
        scaled_h, scaled_w = side, max(1, int(side / (height / width)))
    else:
        scaled_w, scaled_h = side, max(1, int(side * (height / width)))
    if square:
        canvas = (side, side)
    else:
        canvas = (-(-scaled_h // _ALIGN) * _ALIGN, -(-scaled_w // _ALIGN) * _ALIGN)
    return ScrfdInput(scale=scaled_h / height, scaled=(scaled_h, scaled_w), canvas=canvas)


def fill_input(
    frame_bgr: np.ndarray, plan: ScrfdInput, out: np.ndarray, *, ops: Ops = cpu_ops
) -> None:
    """Pre-process: the frame scaled into the top-left of `out` (3, H, W) float32 as RGB,
    (x - 127.5) / 128, channels first; the padding as black pixels come out."""
    scaled_h, scaled_w = plan.scaled
    out[:, scaled_h:, :] = _PADDING
    out[:, :scaled_h, scaled_w:] = _PADDING
    resized = ops.resize(frame_bgr, (scaled_w, scaled_h), interpolation="linear")
    ops.blob_from_bgr(resized, out[:, :scaled_h, :scaled_w], mean=_MEAN, std=_STD)


class SCRFDDetector:
    def __init__(
        self,
        engine: Engine,
        *,
        score_threshold: float = 0.5,
        nms_threshold: float = 0.4,
        square: bool = False,
        ops: Ops = cpu_ops,
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
        self.ops = ops
        self._centres: dict[tuple[int, int, int], np.ndarray] = {}
        # Per thread: the tracker and the source preparation may detect at once.
        self._buffers = InputBuffers(ops.xp)

    def detect(self, frame_bgr: np.ndarray, *, max_side: int = 640) -> list[Detection]:
        """Faces in a BGR frame, best score first."""
        return self.detect_batch([frame_bgr], max_side=max_side)[0]

    def detect_batch(
        self, frames_bgr: Sequence[np.ndarray], *, max_side: int = 640
    ) -> list[list[Detection]]:
        """The faces of each frame, best score first; frames with the same input size
        share one forward pass."""
        plans = [scrfd_input(f.shape, max_side, square=self.square) for f in frames_bgr]
        results: list[list[Detection]] = [[] for _ in frames_bgr]
        by_canvas: dict[tuple[int, int], list[int]] = {}
        for index, plan in enumerate(plans):
            by_canvas.setdefault(plan.canvas, []).append(index)
        for (height, width), indices in by_canvas.items():
            blob = self._buffers.batch(self._input_name, len(indices), (3, height, width))
            for row, index in zip(blob, indices, strict=True):
                fill_input(frames_bgr[index], plans[index], row, ops=self.ops)
            outputs = self.forward(blob)
            for row, index in enumerate(indices):
                results[index] = self.decode([o[row] for o in outputs], plans[index])
        return results

    def forward(self, blob: np.ndarray) -> list[np.ndarray]:
        """(N, 3, H, W) input -> the nine outputs (scores, boxes, keypoints per stride),
        each (N, anchors, width). Exports fixed to one frame run a frame at a time. Most
        exports give their outputs without the batch axis, the frames' anchors one after
        the other (InsightFace reshapes to rows of scores, boxes or keypoints)."""
        if fixed_batch(self._engine.inputs[0]) is None:
            outputs = self._engine.run({self._input_name: blob})
            return [o.reshape(len(blob), -1, o.shape[-1]) for o in outputs]
        per_frame = [
            self._engine.run({self._input_name: blob[i : i + 1]}) for i in range(len(blob))
        ]
        return [
            np.stack([o[0] if o.ndim == 3 else o for o in outputs])
            for outputs in zip(*per_frame, strict=True)
        ]

    def decode(self, outputs: list[np.ndarray], plan: ScrfdInput) -> list[Detection]:
        """Post-process one frame's outputs (batch axis taken off): its faces in frame
        pixels, best score first, overlaps suppressed."""
        boxes, scores, keypoints = self._decode(outputs, *plan.canvas)
        if scores.size == 0:
            return []
        boxes /= plan.scale
        keypoints /= plan.scale
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

    def close(self) -> None:
        self._engine.close()

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
            scores, distances, offsets = (
                outputs[index],
                outputs[index + count],
                outputs[index + 2 * count],
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
