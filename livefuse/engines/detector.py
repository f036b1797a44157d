"""CenterFace: boxes, five keypoints and scores on any input size.

The graph is fully convolutional with a stride-4 output: a centre heatmap, the box size
as log-scale, a sub-cell offset and the keypoints relative to the box. The store makes
its input dims symbolic, so one session serves every detection size; the input only
has to be a multiple of 32 on each side.
"""

from __future__ import annotations

import cv2
import numpy as np

from livefuse.engines.runtime import Engine
from livefuse.engines.types import Detection

_STRIDE = 4
_ALIGN = 32


class CenterFaceDetector:
    def __init__(
        self,
        engine: Engine,
        *,
        score_threshold: float = 0.5,
        nms_threshold: float = 0.3,
    ) -> None:
        self._engine = engine
        self._input_name = engine.inputs[0].name
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold

    def detect(self, frame_bgr: np.ndarray, *, max_side: int = 640) -> list[Detection]:
        """Faces in a BGR frame, best score first.

        `max_side` is the detection resolution: the frame is scaled so its longer side is at
        most this many pixels (never enlarged), then padded to a multiple of 32.
        """
        height, width = frame_bgr.shape[:2]
        scale = min(1.0, max_side / max(height, width))
        scaled_w, scaled_h = max(1, round(width * scale)), max(1, round(height * scale))
        padded_w = -(-scaled_w // _ALIGN) * _ALIGN
        padded_h = -(-scaled_h // _ALIGN) * _ALIGN

        resized = frame_bgr
        if (scaled_w, scaled_h) != (width, height):
            resized = cv2.resize(frame_bgr, (scaled_w, scaled_h), interpolation=cv2.INTER_AREA)
        blob = np.zeros((1, 3, padded_h, padded_w), dtype=np.float32)
        # The graph wants RGB in 0..255, channels first.
        blob[0, :, :scaled_h, :scaled_w] = resized[:, :, ::-1].transpose(2, 0, 1)

        heatmap, log_size, offset, keypoints = self._engine.run({self._input_name: blob})
        detections = self._decode(heatmap[0, 0], log_size[0], offset[0], keypoints[0])
        # Coordinates back to the original frame; the padding only added to the right/bottom.
        return [
            Detection(box=d.box / scale, score=d.score, keypoints=d.keypoints / scale)
            for d in detections
        ]

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

        keep = cv2.dnn.NMSBoxes(
            [[float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])] for b in boxes],
            scores.astype(float).tolist(),
            self.score_threshold,
            self.nms_threshold,
        )
        order = sorted(np.asarray(keep, dtype=int).reshape(-1), key=lambda i: -scores[i])
        return [
            Detection(
                box=boxes[i].astype(np.float32),
                score=float(scores[i]),
                keypoints=kp_xy[i].astype(np.float32),
            )
            for i in order
        ]
