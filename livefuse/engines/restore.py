"""Optional finishing steps on a swapped face, each on the face region only:

- `FaceEnhancer`: GFPGAN 1.4 or CodeFormer (ONNX, 512 px, FFHQ alignment) restores
  detail the swap lost (inswapper's 128 px output is soft on a large face);
- `FaceParser`: BiSeNet's 19 CelebAMask-HQ classes on the target before the swap tell
  what covers the face (hands, glasses, hair, a hat), which then stays in front of the
  swapped face.

Both cut the face out with FFHQ's five-point alignment and return what they made to the
frame box with `warp_back`, like the swapped face. Each is a pure pre-process into the
model's input batch (`enhancer_input`, `parser_input`), a forward pass over a batch of
any size, and a pure post-process (`enhancer_output`, `parser_output`); the per-face
methods are batches of one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from livefuse.engines import ops as cpu_ops
from livefuse.engines.align import align_crop
from livefuse.engines.identity import warp_back
from livefuse.engines.ops_protocol import Ops
from livefuse.engines.runtime import Engine, InputBuffers, run_batched

RESTORE_SIZE = 512
PARSE_SIZE = 512
# CelebAMask-HQ classes that are the face itself: skin, brows, eyes, nose, mouth, lips.
# Everything else over the face (glasses 6, hair 17, hat 18, a hand as background or
# cloth) is an occluder.
FACE_CLASSES = (1, 2, 3, 4, 5, 10, 11, 12, 13)
_PARSER_MEAN = (0.485, 0.456, 0.406)
_PARSER_STD = (0.229, 0.224, 0.225)


def enhancer_input(crops_bgr: Sequence[np.ndarray], out: np.ndarray, *, ops: Ops = cpu_ops) -> None:
    """Pre-process: FFHQ-aligned BGR crops as RGB in -1..1, channels first, into `out`
    (N, 3, 512, 512) float32."""
    for crop, row in zip(crops_bgr, out, strict=True):
        ops.blob_from_bgr(crop, row, scale=2 / 255, mean=1.0)


def enhancer_output(restored: np.ndarray) -> list[np.ndarray]:
    """Post-process: the model's (N, 3, 512, 512) RGB in -1..1 -> N uint8 BGR faces."""
    levels = (restored.clip(-1, 1) + 1) * 127.5
    return [
        face.transpose(1, 2, 0)[:, :, ::-1].round().astype(np.uint8, order="C") for face in levels
    ]


class FaceEnhancer:
    """GFPGAN 1.4 (one input) or CodeFormer (a second input: fidelity 0..1)."""

    def __init__(self, engine: Engine, *, fidelity: float = 0.7, ops: Ops = cpu_ops) -> None:
        self._engine = engine
        self._input = engine.inputs[0].name
        self._fidelity_input = engine.inputs[1].name if len(engine.inputs) > 1 else None
        self.fidelity = fidelity
        self.ops = ops
        # Per thread: swaps may run on more than one worker at once.
        self._buffers = InputBuffers(ops.xp)

    def enhance_crop(self, crop_bgr: np.ndarray) -> np.ndarray:
        """A 512 px FFHQ-aligned BGR face, restored; uint8 BGR of the same size."""
        return self.enhance_batch([crop_bgr])[0]

    def enhance_batch(self, crops_bgr: Sequence[np.ndarray]) -> list[np.ndarray]:
        """512 px FFHQ-aligned BGR faces, restored in one forward pass."""
        blob = self._buffers.batch(self._input, len(crops_bgr), (3, RESTORE_SIZE, RESTORE_SIZE))
        enhancer_input(crops_bgr, blob, ops=self.ops)
        return enhancer_output(self.forward(blob))

    def forward(self, blob: np.ndarray) -> np.ndarray:
        """(N, 3, 512, 512) RGB in -1..1 -> (N, 3, 512, 512) restored, RGB in about -1..1."""
        shared = {}
        if self._fidelity_input is not None:
            shared[self._fidelity_input] = np.array([self.fidelity], dtype=np.float64)
        (restored,) = run_batched(self._engine, {self._input: blob}, shared)[:1]
        return restored

    def enhance(
        self, frame_bgr: np.ndarray, keypoints: np.ndarray, box: tuple[int, int, int, int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """The restored face over the frame box and its 0..1 coverage."""
        crop, matrix = align_crop(frame_bgr, keypoints, RESTORE_SIZE, ffhq=True, ops=self.ops)
        return warp_back(self.enhance_crop(crop), matrix, box, ops=self.ops)

    def close(self) -> None:
        self._engine.close()


def parser_input(crops_bgr: Sequence[np.ndarray], out: np.ndarray, *, ops: Ops = cpu_ops) -> None:
    """Pre-process: FFHQ-aligned BGR crops as RGB normalised by ImageNet's mean and
    spread, channels first, into `out` (N, 3, 512, 512) float32."""
    for crop, row in zip(crops_bgr, out, strict=True):
        ops.blob_from_bgr(crop, row, scale=1 / 255, mean=_PARSER_MEAN, std=_PARSER_STD)


def parser_output(logits: np.ndarray) -> np.ndarray:
    """Post-process: the model's (N, 19, H, W) class logits -> (N, H, W) uint8 class ids."""
    return logits.argmax(axis=1).astype(np.uint8)


class FaceParser:
    """BiSeNet face parsing: per pixel, which of 19 classes."""

    def __init__(self, engine: Engine, *, ops: Ops = cpu_ops) -> None:
        self._engine = engine
        self._input = engine.inputs[0].name
        self.ops = ops
        # Per thread: swaps may run on more than one worker at once.
        self._buffers = InputBuffers(ops.xp)

    def classes(self, crop_bgr: np.ndarray) -> np.ndarray:
        """Class ids (512x512 uint8) of a 512 px FFHQ-aligned BGR face."""
        return self.classes_batch([crop_bgr])[0]

    def classes_batch(self, crops_bgr: Sequence[np.ndarray]) -> np.ndarray:
        """Class ids (N, 512, 512) uint8 of FFHQ-aligned BGR faces, in one forward pass."""
        blob = self._buffers.batch(self._input, len(crops_bgr), (3, PARSE_SIZE, PARSE_SIZE))
        parser_input(crops_bgr, blob, ops=self.ops)
        return parser_output(self.forward(blob))

    def forward(self, blob: np.ndarray) -> np.ndarray:
        """(N, 3, 512, 512) normalised RGB -> (N, 19, 512, 512) class logits."""
        return run_batched(self._engine, {self._input: blob})[0]

    def occluders(
        self, frame_bgr: np.ndarray, keypoints: np.ndarray, box: tuple[int, int, int, int]
    ) -> np.ndarray:
        """0..1 over the frame box: 1 where something that is not the face (a hand,
        glasses, hair, a hat, or the background) lies, as far as the parser saw; 0 where
        the face shows and beyond the parser's crop."""
        ops = self.ops
        crop, matrix = align_crop(frame_bgr, keypoints, PARSE_SIZE, ffhq=True, ops=ops)
        other = (~ops.xp.isin(self.classes(crop), FACE_CLASSES)).astype(np.float32)
        # Soften the class edges a little: a hard edge would show in the blend.
        softened = ops.gaussian_blur(other, 2.0)
        occluding, coverage = warp_back(softened, matrix, box, ops=ops)
        return (occluding * coverage).clip(0.0, 1.0).astype(np.float32)

    def close(self) -> None:
        self._engine.close()
