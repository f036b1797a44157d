"""The bring-your-own models inside `FacePipeline`: inswapper faces aligned by their
mesh's keypoints and blended through the face mask, the enhancer exactly where the swap
blended, and the occlusion mask keeping what covers a face in front of it. Real
detector, landmarks and photos; stand-in graphs for the models nobody may ship."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from livefuse.engines.align import mesh_keypoints
from livefuse.engines.detector import CenterFaceDetector
from livefuse.engines.identity import IdentityFace, IdentitySwapper
from livefuse.engines.landmarks import FaceMeshLandmarker
from livefuse.engines.pipeline import FacePipeline, face_box
from livefuse.engines.restore import FaceEnhancer, FaceParser
from livefuse.engines.runtime import OnnxRuntimeEngine
from livefuse.engines.store import ModelStore
from livefuse.engines.swapper import MeshSwapper, SourceFace
from livefuse.engines.topology import MeshTopology
from tests.own_models import make_arcface, make_enhancer, make_face_parser, make_inswapper


@pytest.fixture(scope="module")
def standins(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("pipeline_standins")
    return {
        "inswapper": make_inswapper(folder / "inswapper_128.onnx"),
        "arcface": make_arcface(folder / "w600k_r50.onnx"),
        "enhancer": make_enhancer(folder / "gfpgan_1.4.onnx"),
        "parser": make_face_parser(folder / "face_parser.onnx"),
    }


def build(
    store: ModelStore,
    standins: dict[str, Path],
    *,
    identity: bool = False,
    enhancer: bool = False,
    parser: bool = False,
) -> FacePipeline:
    return FacePipeline(
        detector=CenterFaceDetector(OnnxRuntimeEngine(store.path("centerface"))),
        landmarker=FaceMeshLandmarker(OnnxRuntimeEngine(store.path("face_landmark"))),
        swapper=MeshSwapper(MeshTopology.load(store.path("facemesh_topology"))),
        identity=IdentitySwapper.from_files(
            embedder=standins["arcface"], swapper=standins["inswapper"], threads=1
        )
        if identity
        else None,
        enhancer=FaceEnhancer(OnnxRuntimeEngine(standins["enhancer"])) if enhancer else None,
        parser=FaceParser(OnnxRuntimeEngine(standins["parser"])) if parser else None,
    )


def test_mesh_keypoints_land_where_the_detector_puts_them(
    model_store: ModelStore, standins: dict[str, Path], group_bgr: np.ndarray
) -> None:
    """The five points taken from a FaceMesh fit are the detector's five, in its order."""
    pipeline = build(model_store, standins)
    detections = pipeline.detector.detect(group_bgr, max_side=1280)
    meshes = pipeline.find_faces(group_bgr)
    assert len(meshes) >= 5
    for mesh in meshes:
        points = mesh_keypoints(mesh.points, pipeline.swapper.topology)
        centre = mesh.points[:, :2].mean(axis=0)
        detection = min(detections, key=lambda d: np.linalg.norm(d.keypoints[2] - centre))
        error = np.linalg.norm(points - detection.keypoints, axis=1)
        assert error.max() < 0.12 * mesh.size, (error, mesh.size)


def test_inswapper_swaps_the_face_region_only(
    model_store: ModelStore,
    standins: dict[str, Path],
    group_bgr: np.ndarray,
    astronaut_bgr: np.ndarray,
) -> None:
    pipeline = build(model_store, standins, identity=True)
    source = pipeline.prepare_source(group_bgr, swapper="inswapper").face
    assert isinstance(source, IdentityFace)
    assert source.latent.shape == (1, 512)
    assert abs(float(np.linalg.norm(source.latent)) - 1) < 1e-5
    meshes = pipeline.find_faces(astronaut_bgr)
    assert len(meshes) == 1
    swapped = pipeline.swap_faces(astronaut_bgr, source, meshes)
    x1, y1, x2, y2 = face_box(meshes[0], astronaut_bgr.shape[:2])  # type: ignore[misc]
    outside = np.ones(astronaut_bgr.shape[:2], dtype=bool)
    outside[y1:y2, x1:x2] = False
    assert np.array_equal(swapped[outside], astronaut_bgr[outside])
    changed = np.abs(swapped.astype(int) - astronaut_bgr).max(axis=2) > 8
    assert changed[y1:y2, x1:x2].mean() > 0.2  # the face itself did change
    # The same source as a mesh source goes through the mesh swapper, unchanged by
    # the inswapper being loaded.
    plain = build(model_store, standins)
    mesh_source = plain.prepare_source(group_bgr).face
    assert type(mesh_source) is SourceFace
    by_mesh = plain.swap_faces(astronaut_bgr, mesh_source, meshes)
    assert np.array_equal(pipeline.swap_faces(astronaut_bgr, mesh_source, meshes), by_mesh)
    assert np.abs(by_mesh.astype(int) - swapped).max() > 20


def test_inswapper_needs_its_models(
    model_store: ModelStore, standins: dict[str, Path], group_bgr: np.ndarray
) -> None:
    with pytest.raises(ValueError, match="no inswapper loaded"):
        build(model_store, standins).prepare_source(group_bgr, swapper="inswapper")


def test_enhancer_runs_on_the_face_region_only(
    model_store: ModelStore,
    standins: dict[str, Path],
    group_bgr: np.ndarray,
    astronaut_bgr: np.ndarray,
) -> None:
    plain = build(model_store, standins, identity=True)
    enhanced = build(model_store, standins, identity=True, enhancer=True)
    source = plain.prepare_source(group_bgr, swapper="inswapper").face
    meshes = plain.find_faces(astronaut_bgr)
    before = plain.swap_faces(astronaut_bgr, source, meshes)
    after = enhanced.swap_faces(astronaut_bgr, source, meshes)
    x1, y1, x2, y2 = face_box(meshes[0], astronaut_bgr.shape[:2])  # type: ignore[misc]
    outside = np.ones(astronaut_bgr.shape[:2], dtype=bool)
    outside[y1:y2, x1:x2] = False
    assert np.array_equal(after[outside], before[outside])
    assert np.abs(after.astype(int) - before).max() > 10
    assert enhanced.timer.counts["enhance"] == 1
    # A cheaper quality level turns it off.
    skipped = astronaut_bgr.copy()
    enhanced.swap_face_in_place(skipped, source, meshes[0], enhance=False)
    assert np.array_equal(skipped, before)


def test_occluder_over_the_face_stays_in_front(
    model_store: ModelStore,
    standins: dict[str, Path],
    group_bgr: np.ndarray,
    astronaut_bgr: np.ndarray,
) -> None:
    """A white card held over the cheek (the stand-in parser calls it hair) is kept."""
    plain = build(model_store, standins, identity=True)
    parsed = build(model_store, standins, identity=True, parser=True)
    source = plain.prepare_source(group_bgr, swapper="inswapper").face
    mesh = plain.find_faces(astronaut_bgr)[0]
    cheek = mesh.points[50, :2].astype(int)
    target = astronaut_bgr.copy()
    card = (slice(cheek[1] - 12, cheek[1] + 12), slice(cheek[0] - 12, cheek[0] + 12))
    target[card] = 255
    mesh = plain.find_faces(target)[0]
    over_card = plain.swap_faces(target, source, [mesh])
    kept = parsed.swap_faces(target, source, [mesh])
    assert np.abs(over_card[card].astype(int) - 255).max() > 30  # swapped over the card
    inner = (slice(card[0].start + 4, card[0].stop - 4), slice(card[1].start + 4, card[1].stop - 4))
    assert np.abs(kept[inner].astype(int) - 255).max() <= 2  # the card stays in front
    # Away from the card the face is swapped as before.
    eye = mesh.points[159, :2].astype(int)
    around_eye = (slice(eye[1] - 5, eye[1] + 5), slice(eye[0] - 5, eye[0] + 5))
    assert np.array_equal(kept[around_eye], over_card[around_eye])


def test_enhancer_blends_exactly_where_the_swap_did(
    model_store: ModelStore,
    standins: dict[str, Path],
    group_bgr: np.ndarray,
    astronaut_bgr: np.ndarray,
) -> None:
    """t1.jpg's fifth person is turned three-quarter: the mesh swap reaches past his face
    oval over his nose, and the enhancer must follow it there, and nowhere else."""
    plain = build(model_store, standins)
    enhanced = build(model_store, standins, enhancer=True)
    source = plain.prepare_source(astronaut_bgr).face
    faces = plain.find_faces(group_bgr)
    turned = min(faces, key=lambda f: np.linalg.norm(f.points[:, :2].mean(axis=0) - (956, 133)))
    before = plain.swap_faces(group_bgr, source, [turned])
    after = enhanced.swap_faces(group_bgr, source, [turned])

    left_alone = (before == group_bgr).all(axis=2)
    touched = (after != before).any(axis=2)
    # A swapped pixel may by chance equal the original; a handful, not a region.
    assert np.count_nonzero(touched & left_alone) <= 20
    x, y = np.round(turned.points[1, :2]).astype(int)  # the nose tip, past the oval
    tip = (slice(y - 1, y + 2), slice(x - 1, x + 2))
    assert np.abs(after[tip].astype(int) - before[tip]).mean() > 2, "nose tip not enhanced"
