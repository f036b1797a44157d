"""The face pipeline on one image: find faces, fit their meshes, swap, blend.

The real-time path (stream/) calls the same pieces stage by stage; this class is the
per-image composition used by `livefuse swap` and as the reference the stream matches.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from livefuse.engines import ops as cpu_ops
from livefuse.engines.align import mesh_keypoints
from livefuse.engines.backend import Backend, select_backend
from livefuse.engines.blend import alpha_blend, face_mask, match_colour
from livefuse.engines.detector import CenterFaceDetector
from livefuse.engines.identity import (
    ArcFaceEmbedder,
    IdentityFace,
    IdentitySwapper,
    InSwapper,
    read_emap,
)
from livefuse.engines.landmarks import FaceMeshLandmarker, FaceRegion
from livefuse.engines.ops_protocol import Ops
from livefuse.engines.registry import KNOWN_MODELS
from livefuse.engines.restore import FaceEnhancer, FaceParser
from livefuse.engines.runtime import Engine
from livefuse.engines.scrfd import SCRFDDetector
from livefuse.engines.store import ModelMissingError, ModelStore
from livefuse.engines.swapper import MeshSwapper, SourceFace
from livefuse.engines.topology import MeshTopology
from livefuse.engines.types import Detection, FaceMesh

FaceSelection = Literal["all", "largest"]
SwapperChoice = Literal["mesh", "inswapper"]
"""`mesh`: the embedded mesh swapper. `inswapper`: InsightFace's inswapper_128 with an
ArcFace embedding (bring your own weights)."""
DetectorChoice = Literal["centerface", "scrfd"]
# Bring-your-own files each choice may use, the first one registered winning.
INSWAPPER_MODELS = ("inswapper_128", "inswapper_128_fp16")
SCRFD_MODELS = ("det_10g", "det_2.5g", "det_500m")
EnhancerChoice = Literal["none", "gfpgan", "codeformer"]
ENHANCER_MODELS = {"gfpgan": "gfpgan_1.4", "codeformer": "codeformer"}
# Faces smaller than this (pixels) carry too little detail to fit a mesh reliably.
MIN_FACE_SIZE = 16
# Margin around the landmark box that the blend may touch, as a fraction of face size.
_BOX_MARGIN = 0.08
# The smallest face size (pixels) a reduced-resolution render may go down to.
_MIN_RENDER_SIZE = 64


class NoFaceError(ValueError):
    """The image has no face the pipeline can use."""


def require_bgr8(frame: np.ndarray) -> None:
    """The pipeline works on 8-bit, 3-channel BGR frames; say so plainly otherwise."""
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(
            f"expected an 8-bit BGR frame (H, W, 3) uint8, got {frame.dtype} {frame.shape}"
        )
    if frame.shape[0] < 1 or frame.shape[1] < 1:
        raise ValueError(f"frame has no pixels ({frame.shape[1]}x{frame.shape[0]})")


# The crops a source's landmarks are fitted from (`_consensus_fit`): shifted by up to this
# fraction of the crop's side along each axis, and scaled by 1 -/+ this.
_SOURCE_FIT_SHIFT = 0.03
_SOURCE_FIT_SCALE = 0.15


class StageTimer:
    """Wall time per named stage of the face work (milliseconds), for the pipeline that
    owns it: written by whichever thread runs a stage (the frame engine's workers, the
    source preparation), so under a lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.totals_ms: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, stage: str, started: float, items: int = 1) -> None:
        elapsed = (time.perf_counter() - started) * 1000
        with self._lock:
            self.totals_ms[stage] += elapsed
            self.counts[stage] += items

    def per_item_ms(self) -> dict[str, float]:
        with self._lock:
            return {k: self.totals_ms[k] / max(1, self.counts[k]) for k in self.totals_ms}


@dataclass(frozen=True, eq=False)
class BlendedRegion:
    """Where a swap was blended into the frame: its box (x1, y1, x2, y2), the 0..1 alpha
    it was blended with over that box, and the face's points as drawn there (moved by
    the shape transfer)."""

    box: tuple[int, int, int, int]
    alpha: np.ndarray
    points: np.ndarray


@dataclass(frozen=True)
class PreparedSource:
    face: SourceFace
    faces_in_image: int


class FaceDetector(Protocol):
    def detect(self, frame_bgr: np.ndarray, *, max_side: int = 640) -> list[Detection]: ...

    def detect_batch(
        self, frames_bgr: Sequence[np.ndarray], *, max_side: int = 640
    ) -> list[list[Detection]]: ...


def first_registered(store: ModelStore, names: tuple[str, ...]) -> str:
    """The first of `names` present in the cache (`store.path` checks it); a
    ModelMissingError naming the first when none is."""
    for name in names:
        if store.file(name).is_file():
            return name
    raise ModelMissingError(names[0], store.models_dir, bring_your_own=True)


class FacePipeline:
    @classmethod
    def from_store(
        cls,
        store: ModelStore,
        *,
        threads: int = 1,
        backend: Backend | None = None,
        swapper: SwapperChoice = "mesh",
        detector: DetectorChoice = "centerface",
        enhancer: EnhancerChoice = "none",
        occlusion: bool = False,
        **options: object,
    ) -> FacePipeline:
        """The embedded default models from the cache, plus the bring-your-own ones the
        choices need, loaded by `backend` (default: the CPU's, `threads` per model);
        ModelError if one is missing. `close` frees them.

        With `swapper="inswapper"` the pipeline runs both swappers: which one a face gets
        follows its source (`prepare_source(..., swapper=...)`).
        """
        backend = backend or select_backend("cpu", threads=threads)
        ops = backend.ops
        known = ModelStore(store.models_dir, models=KNOWN_MODELS)
        loaded: list[Engine] = []

        def load(path: Path) -> Engine:
            engine = backend.load(path)
            loaded.append(engine)
            return engine

        try:
            centerface = CenterFaceDetector(load(store.path("centerface")), ops=ops)
            face_detector: FaceDetector = centerface
            if detector == "scrfd":
                name = first_registered(known, SCRFD_MODELS)
                face_detector = SCRFDDetector(load(known.path(name)), ops=ops)
            landmarker = FaceMeshLandmarker(load(store.path("face_landmark")), ops=ops)
            topology = MeshTopology.load(store.path("facemesh_topology"))
            mesh_swapper = MeshSwapper(topology, ops=ops)
            identity = None
            if swapper == "inswapper":
                embedder = load(known.path("w600k_r50"))
                inswapper = known.path(first_registered(known, INSWAPPER_MODELS))
                identity = IdentitySwapper(
                    embedder=ArcFaceEmbedder(embedder, ops=ops),
                    swapper=InSwapper(load(inswapper), read_emap(inswapper), ops=ops),
                    ops=ops,
                )
            face_enhancer = None
            if enhancer != "none":
                name = ENHANCER_MODELS[enhancer]
                face_enhancer = FaceEnhancer(load(known.path(name)), ops=ops)
            parser = None
            if occlusion:
                parser = FaceParser(load(known.path("face_parser")), ops=ops)
            pipeline = cls(
                detector=centerface,
                face_detector=face_detector,
                enhancer=face_enhancer,
                parser=parser,
                landmarker=landmarker,
                swapper=mesh_swapper,
                identity=identity,
                default_swapper=swapper,
                ops=ops,
                **options,  # type: ignore[arg-type]
            )
        except BaseException:
            for engine in loaded:
                engine.close()
            raise
        pipeline.models_dir = store.models_dir
        pipeline.detector_choice = detector
        pipeline._loaded = loaded
        return pipeline

    def __init__(
        self,
        *,
        detector: CenterFaceDetector,
        landmarker: FaceMeshLandmarker,
        swapper: MeshSwapper,
        face_detector: FaceDetector | None = None,
        identity: IdentitySwapper | None = None,
        enhancer: FaceEnhancer | None = None,
        parser: FaceParser | None = None,
        default_swapper: SwapperChoice = "mesh",
        detection_size: int = 640,
        shape_strength: float = 1.0,
        timer: StageTimer | None = None,
        ops: Ops = cpu_ops,
    ) -> None:
        """`ops` is the module the pipeline's own pixel work (masks, colour, blending) goes
        through: the backend's that the models were made with."""
        if default_swapper == "inswapper" and identity is None:
            raise ValueError("default_swapper='inswapper' needs an IdentitySwapper")
        self.detector = detector
        self.face_detector: FaceDetector = face_detector or detector
        """What `find_faces` and the real-time tracker detect with: `detector`, or SCRFD
        when chosen."""
        self.landmarker = landmarker
        self.swapper = swapper
        self.identity = identity
        """ArcFace + inswapper when loaded: faces whose source is an `IdentityFace` get it."""
        self.enhancer = enhancer
        """GFPGAN or CodeFormer when loaded: run on every swapped face (`enhance=`)."""
        self.parser = parser
        """BiSeNet when loaded: what covers a face stays in front of it (`occlusion=`)."""
        self.default_swapper = default_swapper
        self.detection_size = detection_size
        self.shape_strength = shape_strength
        self.timer = timer or StageTimer()
        self.models_dir: Path | None = None
        """Where the models came from (`from_store`): a child process loads the same."""
        self.detector_choice: DetectorChoice = (
            "scrfd" if isinstance(self.face_detector, SCRFDDetector) else "centerface"
        )
        self.ops = ops
        # The engines `from_store` loaded, which `close` frees; a pipeline assembled from
        # parts leaves them to whoever made them.
        self._loaded: list[Engine] = []

    def close(self) -> None:
        """Free every model engine this pipeline loaded (`from_store`); idempotent. The
        pipeline cannot run models after."""
        loaded, self._loaded = self._loaded, []
        for engine in loaded:
            engine.close()

    def find_faces(self, image_bgr: np.ndarray) -> list[FaceMesh]:
        """Meshes of the faces in a still image, largest first.

        The detector's box only roughly frames a face the way FaceMesh expects, so the
        mesh is fitted twice: once from the detection, once from its own first estimate
        (what tracking does frame to frame in a video).
        """
        require_bgr8(image_bgr)
        started = time.perf_counter()
        detections = self.face_detector.detect(image_bgr, max_side=self.detection_size)
        detections = [d for d in detections if max(d.width, d.height) >= MIN_FACE_SIZE]
        self.timer.add("detect", started)
        if not detections:
            return []
        started = time.perf_counter()
        regions = [FaceRegion.from_detection(d) for d in detections]
        meshes = self.landmarker.landmarks(image_bgr, regions)
        meshes = self.landmarker.landmarks(
            image_bgr, [FaceRegion.from_points(m.points) for m in meshes]
        )
        self.timer.add("landmarks", started, len(meshes))
        kept = [
            m
            for m in meshes
            if m.presence >= self.landmarker.presence_threshold
            and np.isfinite(m.points).all()
            and m.size >= MIN_FACE_SIZE
        ]
        return sorted(kept, key=lambda m: -m.size)

    def prepare_source(
        self, image_bgr: np.ndarray, *, swapper: SwapperChoice | None = None
    ) -> PreparedSource:
        meshes = self.find_faces(image_bgr)
        if not meshes:
            raise NoFaceError("no face found in the source image")
        face = self.prepare_source_face(image_bgr, meshes[0], swapper=swapper)
        return PreparedSource(face=face, faces_in_image=len(meshes))

    def prepare_source_face(
        self, image_bgr: np.ndarray, mesh: FaceMesh, *, swapper: SwapperChoice | None = None
    ) -> SourceFace:
        """The source face for `swapper` (default: the pipeline's). An inswapper source
        (`IdentityFace`) is also a mesh source, so a session may switch swappers."""
        started = time.perf_counter()
        mesh = self._consensus_fit(image_bgr, mesh)
        face = self.swapper.prepare_source(image_bgr, mesh)
        if (swapper or self.default_swapper) == "inswapper":
            if self.identity is None:
                raise ValueError("this pipeline has no inswapper loaded")
            keypoints = mesh_keypoints(mesh.points, self.swapper.topology)
            face = self.identity.prepare(image_bgr, keypoints, face)
        self.timer.add("prepare_source", started)
        return face

    def _consensus_fit(self, image_bgr: np.ndarray, mesh: FaceMesh) -> FaceMesh:
        """The source's landmarks as the median of fits from crops shifted and scaled
        around its own: every later frame is drawn from this one fit, and a single fit
        of a still photo can be off by a few pixels (a mouth read as open, an eye corner
        misplaced) in a way that moves with the crop. Once per source, so its 27 fits
        cost nothing a stream notices; measured with dlib over 392 swaps, 321 -> 342
        read as the source (BENCHMARKS.md)."""
        base = FaceRegion.from_points(mesh.points)
        shift = base.side * _SOURCE_FIT_SHIFT
        regions = [
            replace(
                base,
                centre=(base.centre[0] + dx * shift, base.centre[1] + dy * shift),
                side=base.side * (1 + ds * _SOURCE_FIT_SCALE),
            )
            for ds in (-1, 0, 1)
            for dx in (-1, 0, 1)
            for dy in (-1, 0, 1)
        ]
        fits = [
            fit.points
            for fit in self.landmarker.landmarks(image_bgr, regions)
            if np.isfinite(fit.points).all()
        ]
        if not fits:
            return mesh
        points = np.median(np.stack(fits), axis=0).astype(np.float32)
        return FaceMesh(points=points, presence=mesh.presence)

    def swap_faces(
        self,
        frame_bgr: np.ndarray,
        source: SourceFace,
        meshes: list[FaceMesh],
        *,
        faces: FaceSelection = "all",
    ) -> np.ndarray:
        """A copy of the frame with the given faces replaced by the source."""
        require_bgr8(frame_bgr)
        output = frame_bgr.copy()
        chosen = meshes if faces == "all" else sorted(meshes, key=lambda m: -m.size)[:1]
        for mesh in chosen:
            self.swap_face_in_place(output, source, mesh)
        return output

    def swap_face_in_place(
        self,
        frame_bgr: np.ndarray,
        source: SourceFace,
        mesh: FaceMesh,
        *,
        scale: float = 1.0,
        shape_transfer: bool = True,
        enhance: bool = True,
        occlusion: bool = True,
    ) -> None:
        """Replace one face in the frame.

        The real-time path's cheaper levels trade detail for time: `scale` < 1 renders,
        masks and colour-matches the face at that fraction of its size and blends the
        upscaled result; `shape_transfer=False` keeps the target's face shape (no reshape
        of the target's pixels, the costliest step after the landmarks). An `IdentityFace`
        source is swapped by inswapper instead (where loaded). `enhance` and `occlusion`
        run the face enhancer and the occlusion mask where loaded; the enhancer is the
        first thing a cheaper level drops.
        """
        if not np.isfinite(mesh.points).all():
            return  # a broken fit: leave the face as it is
        kept = self._find_occluders(frame_bgr, mesh) if occlusion else None
        swapped: BlendedRegion | None
        if isinstance(source, IdentityFace) and self.identity is not None:
            swapped = self._swap_identity_in_place(frame_bgr, source, mesh)
        else:
            swapped = self._swap_mesh_in_place(
                frame_bgr, source, mesh, scale=scale, shape_transfer=shape_transfer
            )
        if enhance and self.enhancer is not None and swapped is not None:
            self._enhance_in_place(frame_bgr, swapped)
        if kept is not None:
            box, original, occluding = kept
            x1, y1, x2, y2 = box
            alpha_blend(frame_bgr[y1:y2, x1:x2], original, occluding, ops=self.ops)

    def _swap_mesh_in_place(
        self,
        frame_bgr: np.ndarray,
        source: SourceFace,
        mesh: FaceMesh,
        *,
        scale: float,
        shape_transfer: bool,
    ) -> BlendedRegion | None:
        """The mesh swap, blended in place; where it blended, or None if off-frame."""
        started = time.perf_counter()
        strength = self.shape_strength if shape_transfer else 0.0
        points = self.swapper.transfer_shape(source, mesh.points, strength)
        box = face_box(FaceMesh(points=points, presence=mesh.presence), frame_bgr.shape[:2])
        if box is None:
            return None
        x1, y1, x2, y2 = box
        raster = None
        if points is not mesh.points:  # transfer_shape hands back the same array when off
            raster = self.swapper.reshape_target(frame_bgr, mesh.points, points)
        region = frame_bgr[y1:y2, x1:x2]
        width, height = x2 - x1, y2 - y1
        # Below this face size a reduced render loses the eyes; render at full size then.
        scale = min(1.0, max(scale, _MIN_RENDER_SIZE / max(mesh.size, 1.0)))
        small = (max(2, round(width * scale)), max(2, round(height * scale)))
        if small != (width, height):
            factors = np.array([small[0] / width, small[1] / height, scale], dtype=np.float32)
            local = (points - (x1, y1, 0)) * factors
            rendered, coverage = self.swapper.warp(source, local, (0, 0, *small))
            target = self.ops.resize(region, small, interpolation="area")
            face_size = mesh.size * scale
            mask_points, mask_box = local, (0, 0, *small)
        else:
            rendered, coverage = self.swapper.warp(source, points, box, raster=raster)
            target, face_size = region, mesh.size
            mask_points, mask_box = points, box
        self.timer.add("swap", started)
        started = time.perf_counter()
        # The mesh's coverage is its own silhouette: past the oval it is kept over the
        # target's skin (see `face_mask`).
        ops = self.ops
        alpha = face_mask(
            mask_points,
            self.swapper.topology,
            coverage,
            mask_box,
            face_size,
            target=target,
            ops=ops,
        )
        rendered = match_colour(rendered, target, alpha, face_size, ops=ops)
        if small != (width, height):
            rendered = ops.resize(rendered, (width, height), interpolation="linear")
            alpha = ops.resize(alpha, (width, height), interpolation="linear")
        alpha_blend(region, rendered, alpha, ops=ops)
        self.timer.add("blend", started)
        return BlendedRegion(box, alpha, points)

    def _swap_identity_in_place(
        self, frame_bgr: np.ndarray, source: IdentityFace, mesh: FaceMesh
    ) -> BlendedRegion | None:
        """inswapper on the face aligned by its mesh's five keypoints, blended through
        the same face mask (clipped to the oval: its patch is a square), colour match
        and feather."""
        assert self.identity is not None
        box = face_box(mesh, frame_bgr.shape[:2])
        if box is None:
            return None
        started = time.perf_counter()
        keypoints = mesh_keypoints(mesh.points, self.swapper.topology)
        rendered, coverage = self.identity.render(frame_bgr, source, keypoints, box)
        self.timer.add("swap", started)
        started = time.perf_counter()
        x1, y1, x2, y2 = box
        region = frame_bgr[y1:y2, x1:x2]
        ops = self.ops
        alpha = face_mask(mesh.points, self.swapper.topology, coverage, box, mesh.size, ops=ops)
        rendered = match_colour(rendered, region, alpha, mesh.size, ops=ops)
        alpha_blend(region, rendered, alpha, ops=ops)
        self.timer.add("blend", started)
        return BlendedRegion(box, alpha, mesh.points)

    def _enhance_in_place(self, frame_bgr: np.ndarray, swapped: BlendedRegion) -> None:
        """Restore the swapped face's detail, through the swap's own mask: exactly what
        was swapped is enhanced (a turned face's nose past the oval included), nothing
        around it."""
        assert self.enhancer is not None
        started = time.perf_counter()
        # Aligned by the face as it now is: the shape transfer moved its eyes and mouth.
        keypoints = mesh_keypoints(swapped.points, self.swapper.topology)
        restored, coverage = self.enhancer.enhance(frame_bgr, keypoints, swapped.box)
        x1, y1, x2, y2 = swapped.box
        alpha_blend(frame_bgr[y1:y2, x1:x2], restored, coverage * swapped.alpha, ops=self.ops)
        self.timer.add("enhance", started)

    def _find_occluders(
        self, frame_bgr: np.ndarray, mesh: FaceMesh
    ) -> tuple[tuple[int, int, int, int], np.ndarray, np.ndarray] | None:
        """What covers the face before it is swapped: (box, the box's pixels now, 0..1
        where they are to stay in front), or None without a parser or a box."""
        if self.parser is None:
            return None
        box = face_box(mesh, frame_bgr.shape[:2])
        if box is None:
            return None
        started = time.perf_counter()
        keypoints = mesh_keypoints(mesh.points, self.swapper.topology)
        occluding = self.parser.occluders(frame_bgr, keypoints, box)
        # Only over the face: around it, the swap's own mask already keeps the target. The
        # mesh's hull, not its oval: a turned face's swapped nose stands out past the oval.
        x1, y1, x2, y2 = box
        inside = self.ops.xp.zeros((y2 - y1, x2 - x1), dtype=np.uint8)
        self.ops.fill_convex_hull(inside, mesh.points[:, :2] - (x1, y1), 1)
        occluding *= inside
        self.timer.add("occlusion", started)
        if not self.ops.to_host(occluding.any()):
            return None
        return box, frame_bgr[y1:y2, x1:x2].copy(), occluding


def face_box(mesh: FaceMesh, frame_shape: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """The mesh's pixel box plus a margin, clipped to the frame; None if off-frame."""
    height, width = frame_shape
    margin = mesh.size * _BOX_MARGIN
    x1, y1, x2, y2 = mesh.box
    bx1, by1 = max(0, int(np.floor(x1 - margin))), max(0, int(np.floor(y1 - margin)))
    bx2, by2 = min(width, int(np.ceil(x2 + margin))), min(height, int(np.ceil(y2 + margin)))
    if bx2 - bx1 < 2 or by2 - by1 < 2:
        return None
    return bx1, by1, bx2, by2
