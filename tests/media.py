"""Pictures for the streaming tests and benches, made from the pinned test photos.

- `widescreen`: a photo centred on a 16:9 canvas filled with a heavily blurred copy of
  itself. `write_clip` covers a 1280x720 frame with its photo, so a square photo (the
  astronaut) would be cropped through the face; on this canvas the clip frames her face at
  about 240 px, like a webcam.
- `portrait`: a square crop twice a face's size around it (how bench/identity_eval
  crops its people), for a source photo with one clear face.
- `heads_on_grey`: head crops pasted side by side on a grey frame, for tracking and engine
  tests that move people about.
"""

from __future__ import annotations

import cv2
import numpy as np


def widescreen(photo: np.ndarray) -> np.ndarray:
    height, width = photo.shape[:2]
    canvas_width = round(height * 16 / 9) // 2 * 2
    fill = cv2.resize(photo, (canvas_width, height), interpolation=cv2.INTER_AREA)
    canvas = cv2.GaussianBlur(fill, (0, 0), sigmaX=25)
    x0 = (canvas_width - width) // 2
    canvas[:, x0 : x0 + width] = photo
    return canvas


def portrait(
    image: np.ndarray, box: tuple[float, float, float, float], size: int = 256
) -> np.ndarray:
    x1, y1, x2, y2 = box
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    side = 2.0 * max(x2 - x1, y2 - y1)
    pad = int(side)
    padded = cv2.copyMakeBorder(image, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
    x0, y0 = round(cx - side / 2) + pad, round(cy - side / 2) + pad
    crop = padded[y0 : y0 + round(side), x0 : x0 + round(side)]
    return cv2.resize(crop, (size, size), interpolation=cv2.INTER_CUBIC)


def heads_on_grey(
    size: tuple[int, int], top: int, heads: tuple[tuple[np.ndarray, int], ...]
) -> np.ndarray:
    """A grey frame of `size` (height, width) with each (head, x) pasted with its left edge
    at x and its top at `top`; parts beyond the frame's sides are cut off."""
    frame = np.full((*size, 3), 110, dtype=np.uint8)
    for head, x in heads:
        h, w = head.shape[:2]
        left, right = max(0, x), min(size[1], x + w)
        if right > left:
            frame[top : top + h, left:right] = head[:, left - x : right - x]
    return frame
