"""Optional finishing steps on a swapped face, each on the face region only:

- `FaceEnhancer`: GFPGAN 1.4 or CodeFormer (ONNX, 512 px, FFHQ alignment) restores
  detail the swap lost (inswapper's 128 px output is soft on a large face);
- `FaceParser`: BiSeNet's 19 CelebAMask-HQ classes on the target before the swap tell
  what covers the face (hands, glasses, hair, a hat), which then stays in front of the
  swapped face.

Both cut the face out with FFHQ's five-point alignment and return what they made to the
frame box with `warp_back`, like the swapped face.
"""

from __future__ import annotations

import cv2
import numpy as np

from livefuse.engines.align import align_crop
from livefuse.engines.identity import warp_back
from livefuse.engines.runtime import Engine

RESTORE_SIZE = 512
PARSE_SIZE = 512
# CelebAMask-HQ classes that are the face itself: skin, brows, eyes, nose, mouth, lips.
# Everything else over the face (glasses 6, hair 17, hat 18, a hand as background or
# cloth) is an occluder.
FACE_CLASSES = (1, 2, 3, 4, 5, 10, 11, 12, 13)
_PARSER_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
_PARSER_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


class FaceEnhancer:
    """GFPGAN 1.4 (one input) or CodeFormer (a second input: fidelity 0..1)."""

    def __init__(self, engine: Engine, *, fidelity: float = 0.7) -> None:
        self._engine = engine
        self._input = engine.inputs[0].name
        self._fidelity_input = engine.inputs[1].name if len(engine.inputs) > 1 else None
        self.fidelity = fidelity

    def enhance_crop(self, crop_bgr: np.ndarray) -> np.ndarray:
        """A 512 px FFHQ-aligned BGR face, restored; uint8 BGR of the same size."""
        rgb = crop_bgr[:, :, ::-1].astype(np.float32) * np.float32(2 / 255) - np.float32(1)
        feeds = {self._input: np.ascontiguousarray(rgb.transpose(2, 0, 1)[None])}
        if self._fidelity_input is not None:
            feeds[self._fidelity_input] = np.array([self.fidelity], dtype=np.float64)
        (restored,) = self._engine.run(feeds)[:1]
        out = (np.clip(restored[0], -1, 1) + 1) * 127.5
        return np.ascontiguousarray(out.transpose(1, 2, 0)[:, :, ::-1].round().astype(np.uint8))

    def enhance(
        self, frame_bgr: np.ndarray, keypoints: np.ndarray, box: tuple[int, int, int, int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """The restored face over the frame box and its 0..1 coverage."""
        crop, matrix = align_crop(frame_bgr, keypoints, RESTORE_SIZE, ffhq=True)
        return warp_back(self.enhance_crop(crop), matrix, box)


class FaceParser:
    """BiSeNet face parsing: per pixel, which of 19 classes."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._input = engine.inputs[0].name

    def classes(self, crop_bgr: np.ndarray) -> np.ndarray:
        """Class ids (512x512 uint8) of a 512 px FFHQ-aligned BGR face."""
        rgb = crop_bgr[:, :, ::-1].astype(np.float32) * np.float32(1 / 255)
        blob = ((rgb - _PARSER_MEAN) / _PARSER_STD).transpose(2, 0, 1)[None]
        logits = self._engine.run({self._input: np.ascontiguousarray(blob)})[0]
        return np.asarray(logits[0].argmax(axis=0), dtype=np.uint8)

    def occluders(
        self, frame_bgr: np.ndarray, keypoints: np.ndarray, box: tuple[int, int, int, int]
    ) -> np.ndarray:
        """0..1 over the frame box: 1 where something that is not the face (a hand,
        glasses, hair, a hat, or the background) lies, as far as the parser saw; 0 where
        the face shows and beyond the parser's crop."""
        crop, matrix = align_crop(frame_bgr, keypoints, PARSE_SIZE, ffhq=True)
        other = (~np.isin(self.classes(crop), FACE_CLASSES)).astype(np.float32)
        # Soften the class edges a little: a hard edge would show in the blend.
        softened = cv2.GaussianBlur(other, (0, 0), 2.0)
        occluding, coverage = warp_back(softened, matrix, box)
        return np.clip(occluding * coverage, 0.0, 1.0).astype(np.float32)
