"""Photoreal swap with InsightFace's inswapper_128, driven by an ArcFace embedding.

One small class per model, its pre- and post-processing beside it, as in InsightFace's
`model_zoo` (whose `arcface_onnx` and `inswapper` these follow step for step; the parity
tests hold them to it):

- `ArcFaceEmbedder`: the source face aligned to 112 px, RGB scaled to -1..1, -> a 512-d
  identity embedding;
- `InSwapper`: the embedding, L2-normalised, through `emap` (the graph's last
  initializer) and normalised again is the latent; the target face aligned to 128 px
  (the template shifted 8 px), RGB in 0..1, with the latent -> the swapped face;
- `warp_back` returns the swapped face to the frame box with its coverage, for the same
  mask, colour match and feathered blend as the mesh swapper (`FacePipeline`);
  `paste_back` is the reference's own blend, for callers without a face mesh.

Each model is three steps: a pure pre-process into the model's input batch
(`arcface_input`, `inswapper_input`), a forward pass over a batch of any size, and a pure
post-process (`inswapper_output`); `embed_batch` and `swap_batch` run many faces in one
pass, and the per-face methods are batches of one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from livefuse.engines import ops as cpu_ops
from livefuse.engines.align import align_crop
from livefuse.engines.backend import Backend, select_backend
from livefuse.engines.ops_protocol import Ops
from livefuse.engines.runtime import Engine, InputBuffers, run_batched
from livefuse.engines.swapper import SourceFace

EMBEDDING_SIZE = 512
ARCFACE_SIZE = 112
INSWAPPER_SIZE = 128


def arcface_input(crops_bgr: Sequence[np.ndarray], out: np.ndarray, *, ops: Ops = cpu_ops) -> None:
    """Pre-process: aligned BGR crops as RGB in -1..1, channels first, into `out`
    (N, 3, size, size) float32."""
    for crop, row in zip(crops_bgr, out, strict=True):
        ops.blob_from_bgr(crop, row, mean=127.5, std=127.5)


class ArcFaceEmbedder:
    """ArcFace (w600k_r50 and its kin): a 512-d identity from a 112 px aligned crop."""

    def __init__(self, engine: Engine, *, ops: Ops = cpu_ops) -> None:
        self._engine = engine
        self._input = engine.inputs[0].name
        size = engine.inputs[0].shape[2]
        self.size = size if isinstance(size, int) else ARCFACE_SIZE
        self.ops = ops
        # Per thread: the engine's worker and the source preparation may embed at once.
        self._buffers = InputBuffers(ops.xp)

    def embed(self, image_bgr: np.ndarray, keypoints: np.ndarray) -> np.ndarray:
        """The raw (not normalised) embedding of the face at `keypoints`, float32 (512,)."""
        crop, _ = align_crop(image_bgr, keypoints, self.size, ops=self.ops)
        return self.embed_crop(crop)

    def embed_crop(self, crop_bgr: np.ndarray) -> np.ndarray:
        """The raw embedding of one aligned crop, float32 (512,)."""
        return self.embed_batch([crop_bgr])[0]

    def embed_batch(self, crops_bgr: Sequence[np.ndarray]) -> np.ndarray:
        """The raw embeddings of aligned crops, float32 (N, 512), in one forward pass."""
        blob = self._buffers.batch(self._input, len(crops_bgr), (3, self.size, self.size))
        arcface_input(crops_bgr, blob, ops=self.ops)
        return self.forward(blob)

    def forward(self, blob: np.ndarray) -> np.ndarray:
        """(N, 3, size, size) model input -> (N, 512) float32 embeddings."""
        (embeddings,) = run_batched(self._engine, {self._input: blob})[:1]
        return embeddings.reshape(len(blob), -1).astype(np.float32, copy=False)

    def close(self) -> None:
        self._engine.close()


def read_emap(model_path: Path) -> np.ndarray:
    """inswapper's embedding-to-latent matrix: the graph's last initializer (512x512)."""
    model = onnx.load(str(model_path), load_external_data=False)
    emap = numpy_helper.to_array(model.graph.initializer[-1])
    return np.asarray(emap, dtype=np.float32)


def inswapper_input(
    crops_bgr: Sequence[np.ndarray], out: np.ndarray, *, ops: Ops = cpu_ops
) -> None:
    """Pre-process: aligned 128 px BGR crops as RGB in 0..1, channels first, into `out`
    (N, 3, 128, 128) float32."""
    for crop, row in zip(crops_bgr, out, strict=True):
        ops.blob_from_bgr(crop, row, scale=1 / 255)


def inswapper_output(prediction: np.ndarray) -> list[np.ndarray]:
    """Post-process: the model's (N, 3, 128, 128) RGB in 0..1 -> N uint8 BGR faces."""
    faces = (255 * prediction).clip(0, 255).astype(np.uint8)
    return [face.transpose(1, 2, 0)[:, :, ::-1].copy() for face in faces]


class InSwapper:
    """inswapper_128: a 128 px aligned target face and an identity latent -> the face
    with that identity, the target's pose, expression and lighting."""

    def __init__(self, engine: Engine, emap: np.ndarray, *, ops: Ops = cpu_ops) -> None:
        if emap.shape != (EMBEDDING_SIZE, EMBEDDING_SIZE):
            raise ValueError(f"emap has shape {emap.shape}, expected (512, 512)")
        self._engine = engine
        self._target_input, self._latent_input = (t.name for t in engine.inputs[:2])
        self._emap = emap.astype(np.float32)
        self.size = INSWAPPER_SIZE
        self.ops = ops
        # Per thread: swaps may run on more than one worker at once.
        self._buffers = InputBuffers(ops.xp)

    def latent(self, embedding: np.ndarray) -> np.ndarray:
        """The (1, 512) latent for an ArcFace embedding."""
        normed = np.asarray(embedding, dtype=np.float32).reshape(1, -1)
        normed = normed / np.linalg.norm(normed)
        latent = normed @ self._emap
        return (latent / np.linalg.norm(latent)).astype(np.float32)

    def swap_crop(self, crop_bgr: np.ndarray, latent: np.ndarray) -> np.ndarray:
        """The swapped face for an aligned 128 px BGR crop, uint8 BGR of the same size."""
        return self.swap_batch([crop_bgr], latent.reshape(1, -1))[0]

    def swap_batch(self, crops_bgr: Sequence[np.ndarray], latents: np.ndarray) -> list[np.ndarray]:
        """The swapped faces for aligned crops, each with its row of `latents` (N, 512),
        in one forward pass."""
        blob = self._buffers.batch(self._target_input, len(crops_bgr), (3, self.size, self.size))
        inswapper_input(crops_bgr, blob, ops=self.ops)
        return inswapper_output(self.forward(blob, latents))

    def forward(self, blob: np.ndarray, latents: np.ndarray) -> np.ndarray:
        """(N, 3, 128, 128) target crops and (N, 512) latents -> (N, 3, 128, 128) RGB 0..1."""
        batched = {self._target_input: blob, self._latent_input: latents}
        (prediction,) = run_batched(self._engine, batched)[:1]
        return prediction

    def swap(
        self, frame_bgr: np.ndarray, keypoints: np.ndarray, latent: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(swapped 128 px face, the aligned crop it came from, the crop's 2x3 matrix)."""
        crop, matrix = align_crop(frame_bgr, keypoints, self.size, ops=self.ops)
        return self.swap_crop(crop, latent), crop, matrix

    def close(self) -> None:
        self._engine.close()


@dataclass(frozen=True)
class IdentityFace(SourceFace):
    """A source prepared for both swappers: the mesh swapper's texture (it is a
    `SourceFace`) plus the identity inswapper needs."""

    embedding: np.ndarray  # (512,) float32, as ArcFace gave it
    latent: np.ndarray  # (1, 512) float32, through emap and normalised


def warp_back(
    face_bgr: np.ndarray,
    matrix: np.ndarray,
    box: tuple[int, int, int, int],
    *,
    ops: Ops = cpu_ops,
) -> tuple[np.ndarray, np.ndarray]:
    """The aligned face put back over the frame box (x1, y1, x2, y2): the BGR patch and
    a 0..1 coverage map, 1 where the crop reaches (the crop's edge pixels excluded)."""
    x1, y1, x2, y2 = box
    inverse = ops.invert_affine(matrix)
    inverse[:, 2] -= (x1, y1)
    size = (x2 - x1, y2 - y1)
    patch = ops.warp_affine(face_bgr, inverse, size, border="replicate")
    inside = ops.xp.zeros(face_bgr.shape[:2], dtype=np.float32)
    inside[2:-2, 2:-2] = 1.0
    coverage = ops.warp_affine(inside, inverse, size, border="constant", border_value=0.0)
    return patch, coverage


def paste_back(
    frame_bgr: np.ndarray,
    face_bgr: np.ndarray,
    crop_bgr: np.ndarray,
    matrix: np.ndarray,
    *,
    ops: Ops = cpu_ops,
) -> np.ndarray:
    """InsightFace's own paste-back of a swapped face (`INSwapper.get`): the crop's
    square warped back, eroded by a tenth of its size and blurred by a twentieth.

    For callers with only keypoints; `FacePipeline` blends with the face mesh's mask and
    colour match instead. Returns a new frame.
    """
    xp = ops.xp
    height, width = frame_bgr.shape[:2]
    inverse = ops.invert_affine(matrix)
    white = xp.full(crop_bgr.shape[:2], 255, dtype=np.float32)
    fake = ops.warp_affine(face_bgr, inverse, (width, height), border_value=0.0)
    mask = ops.warp_affine(white, inverse, (width, height), border_value=0.0)
    mask[mask > 20] = 255
    rows, cols = (ops.to_host(a) for a in xp.nonzero(mask == 255))
    if rows.size == 0:
        return frame_bgr.copy()
    mask_size = int(np.sqrt((rows.max() - rows.min()) * (cols.max() - cols.min())))
    erode = max(mask_size // 10, 10)
    mask = ops.erode(mask, np.ones((erode, erode), np.uint8))
    blur = max(mask_size // 20, 5)
    mask = ops.gaussian_blur(mask, 0, ksize=2 * blur + 1)
    alpha = (mask / 255)[:, :, None]
    merged = alpha * fake + (1 - alpha) * frame_bgr.astype(np.float32)
    return merged.astype(np.uint8)


class IdentitySwapper:
    """ArcFace and inswapper together, as `FacePipeline` uses them: a source identity
    prepared once, then a swapped face rendered over a frame box per target face."""

    def __init__(
        self, *, embedder: ArcFaceEmbedder, swapper: InSwapper, ops: Ops = cpu_ops
    ) -> None:
        self.embedder = embedder
        self.swapper = swapper
        self.ops = ops

    @classmethod
    def from_files(
        cls,
        *,
        embedder: Path,
        swapper: Path,
        threads: int = 1,
        backend: Backend | None = None,
    ) -> IdentitySwapper:
        """Both models loaded by `backend` (default: the CPU's, `threads` per model);
        `close` frees them."""
        backend = backend or select_backend("cpu", threads=threads)
        ops = backend.ops
        embedder_engine = backend.load(embedder)
        try:
            swapper_engine = backend.load(swapper)
        except BaseException:
            embedder_engine.close()
            raise
        return cls(
            embedder=ArcFaceEmbedder(embedder_engine, ops=ops),
            swapper=InSwapper(swapper_engine, read_emap(swapper), ops=ops),
            ops=ops,
        )

    def close(self) -> None:
        """Free both models' engines."""
        self.embedder.close()
        self.swapper.close()

    def prepare(
        self, image_bgr: np.ndarray, keypoints: np.ndarray, texture: SourceFace
    ) -> IdentityFace:
        """The source at `keypoints` in `image_bgr`, on top of its mesh `texture`."""
        embedding = self.embedder.embed(image_bgr, keypoints)
        if not np.isfinite(embedding).all() or np.linalg.norm(embedding) == 0:
            raise ValueError("the embedder gave no usable identity for the source face")
        base = {f.name: getattr(texture, f.name) for f in fields(SourceFace)}
        return IdentityFace(**base, embedding=embedding, latent=self.swapper.latent(embedding))

    def render(
        self,
        frame_bgr: np.ndarray,
        source: IdentityFace,
        keypoints: np.ndarray,
        box: tuple[int, int, int, int],
    ) -> tuple[np.ndarray, np.ndarray]:
        """The swapped face over the frame box and its 0..1 coverage (see `warp_back`)."""
        face, _, matrix = self.swapper.swap(frame_bgr, keypoints, source.latent)
        return warp_back(face, matrix, box, ops=self.ops)
