"""CenterFace: boxes, five keypoints and scores on any input size.

The graph is fully convolutional with a stride-4 output: a centre heatmap, the box size
as log-scale, a sub-cell offset and the keypoints relative to the box. The store makes
its input dims symbolic, so one session serves every detection size; the input only
has to be a multiple of 32 on each side. Pre-process (`detection_input`, `fill_input`),
the batched forward pass and the decoding are separate steps; `detect_batch` runs the
frames that share an input size in one pass.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from livefuse.engines import ops as cpu_ops
from livefuse.engines.ops_protocol import Ops
from livefuse.engines.runtime import Engine
from livefuse.engines.types import Detection

_STRIDE = 4
_ALIGN = 32
# Input sizes whose blobs are kept: a session's level changes the detection size, and
# the batch holds 1..N frames; beyond this many, start afresh rather than grow forever.
_MAX_KEPT_SHAPES = 16


@dataclass(frozen=True)
class DetectionInput:
    """How a frame becomes the detector's input: scaled by `scale` to `scaled` (h, w),
    then padded on the right and bottom to `padded` (h, w), multiples of 32."""

    scale: float
    scaled: tuple[int, int]
    padded: tuple[int, int]


def detection_input(frame_shape: tuple[int, ...], max_side: int) -> DetectionInput:
    height, width = frame_shape[:2]
    scale = min(1.0, max_side / max(height, width))
    scaled_w, scaled_h = max(1, round(width * scale)), max(1, round(height * scale))
    padded_w = -(-scaled_w // _ALIGN) * _ALIGN
    padded_h = -(-scaled_h // _ALIGN) * _ALIGN
    return DetectionInput(scale=scale, scaled=(scaled_h, scaled_w), padded=(padded_h, padded_w))


def fill_input(
    frame_bgr: np.ndarray, plan: DetectionInput, out: np.ndarray, *, ops: Ops = cpu_ops
) -> None:
    """Pre-process: the frame scaled into the top-left of `out` (3, H, W) as RGB in
    0..255, channels first, and zeros in the padding."""
    scaled_h, scaled_w = plan.scaled
    resized = frame_bgr
    if (scaled_h, scaled_w) != frame_bgr.shape[:2]:
        resized = ops.resize(frame_bgr, (scaled_w, scaled_h), interpolation="area")
    ops.blob_from_bgr(resized, out[:, :scaled_h, :scaled_w])
    out[:, scaled_h:, :] = 0
    out[:, :scaled_h, scaled_w:] = 0


class CenterFaceDetector:
    def __init__(
        self,
        engine: Engine,
        *,
        score_threshold: float = 0.5,
        nms_threshold: float = 0.3,
        ops: Ops = cpu_ops,
    ) -> None:
        self._engine = engine
        self.ops = ops
        self._input_name = engine.inputs[0].name
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold
        # Input blobs by shape, per thread (the engine's worker and the source preparation
        # may detect at the same time): allocated once per shape, then reused.
        self._buffers = threading.local()

    def detect(self, frame_bgr: np.ndarray, *, max_side: int = 640) -> list[Detection]:
        """Faces in a BGR frame, best score first.

        `max_side` is the detection resolution: the frame is scaled so its longer side is at
        most this many pixels (never enlarged), then padded to a multiple of 32.
        """
        return self.detect_batch([frame_bgr], max_side=max_side)[0]

    def detect_batch(
        self, frames_bgr: Sequence[np.ndarray], *, max_side: int = 640
    ) -> list[list[Detection]]:
        """The faces of each frame; frames that pad to the same input size share one
        forward pass (several sessions' frames of one camera size, say)."""
        plans = [detection_input(frame.shape[:2], max_side) for frame in frames_bgr]
        results: list[list[Detection]] = [[] for _ in frames_bgr]
        by_input: dict[tuple[int, int], list[int]] = {}
        for index, plan in enumerate(plans):
            by_input.setdefault(plan.padded, []).append(index)
        for (padded_h, padded_w), indices in by_input.items():
            blob = self._input_blob((len(indices), 3, padded_h, padded_w))
            for row, index in enumerate(indices):
                fill_input(frames_bgr[index], plans[index], blob[row], ops=self.ops)
            heatmap, log_size, offset, keypoints = self._engine.run({self._input_name: blob})
            for row, index in enumerate(indices):
                found = self._decode(heatmap[row, 0], log_size[row], offset[row], keypoints[row])
                # Back to the original frame; the padding only added to the right/bottom.
                scale = plans[index].scale
                results[index] = [
                    Detection(box=d.box / scale, score=d.score, keypoints=d.keypoints / scale)
                    for d in found
                ]
        return results

    def _input_blob(self, shape: tuple[int, int, int, int]) -> np.ndarray:
        blobs: dict[tuple[int, int, int, int], np.ndarray] | None = getattr(
            self._buffers, "blobs", None
        )
        if blobs is None:
            blobs = self._buffers.blobs = {}
        if shape not in blobs:
            if len(blobs) >= _MAX_KEPT_SHAPES:
                blobs.clear()
            blobs[shape] = np.empty(shape, dtype=np.float32)
        return blobs[shape]

    def _decode(
        self,
        heatmap: np.ndarray,
        log_size: np.ndarray,
        offset: np.ndarray,
        keypoints: np.ndarray,
    ) -> list[Detection]:
        rows, cols = np.nonzero(heatmap > self.score_threshold)
        if rows.size == 0:
            return []
        scores = heatmap[rows, cols]
        box_h = np.exp(log_size[0, rows, cols]) * _STRIDE
        box_w = np.exp(log_size[1, rows, cols]) * _STRIDE
        centre_y = (rows + offset[0, rows, cols] + 0.5) * _STRIDE
        centre_x = (cols + offset[1, rows, cols] + 0.5) * _STRIDE
        x1 = centre_x - box_w / 2
        y1 = centre_y - box_h / 2
        boxes = np.stack([x1, y1, x1 + box_w, y1 + box_h], axis=1)
        # Keypoints come as (y, x) pairs relative to the box's top-left, in box units.
        kp = keypoints[:, rows, cols].T.reshape(-1, 5, 2)
        kp_xy = np.stack(
            [
                kp[:, :, 1] * box_w[:, None] + x1[:, None],
                kp[:, :, 0] * box_h[:, None] + y1[:, None],
            ],
            axis=2,
        )

        boxes_xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
        keep = self.ops.nms_boxes(boxes_xywh, scores, self.score_threshold, self.nms_threshold)
        order = sorted(keep, key=lambda i: -scores[i])
        return [
            Detection(
                box=boxes[i].astype(np.float32),
                score=float(scores[i]),
                keypoints=kp_xy[i].astype(np.float32),
            )
            for i in order
        ]
