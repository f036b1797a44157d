"""livefuse's alignment, ArcFace embedding and inswapper swap against InsightFace 2.1's
own code (`utils.face_align`, `model_zoo.arcface_onnx`, `model_zoo.inswapper`, imported
from the pinned sdist by tests/insightface_ref.py), on the same stand-in model files and
the same keypoints: crops, embeddings, latents, swapped faces and pasted-back frames
agree within 1/255."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from livefuse.engines.align import align_crop, alignment, template
from livefuse.engines.detector import CenterFaceDetector
from livefuse.engines.identity import ArcFaceEmbedder, InSwapper, paste_back, read_emap
from livefuse.engines.runtime import OnnxRuntimeEngine
from livefuse.engines.store import ModelStore
from tests.insightface_ref import load
from tests.own_models import make_arcface, make_inswapper


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("identity")
    return {
        "inswapper": make_inswapper(folder / "inswapper_128.onnx"),
        "arcface": make_arcface(folder / "w600k_r50.onnx"),
    }


@pytest.fixture(scope="module")
def group_faces(model_store: ModelStore, testdata_dir: Path) -> tuple[np.ndarray, list[np.ndarray]]:
    """t1.jpg and the keypoints CenterFace finds on its six faces."""
    import cv2

    image = cv2.imread(str(testdata_dir / "t1.jpg"))
    if image is None:
        pytest.fail("t1.jpg is missing: run `make install`", pytrace=False)
    detector = CenterFaceDetector(OnnxRuntimeEngine(model_store.path("centerface")))
    keypoints = [d.keypoints for d in detector.detect(image, max_side=1280)]
    assert len(keypoints) >= 5
    return image, keypoints


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def test_templates_match_the_reference() -> None:
    face_align = load("utils.face_align")
    np.testing.assert_array_equal(template(112), face_align.arcface_dst)
    # 128 px: the same template, not scaled, shifted 8 px right (centred in the crop).
    expected_128 = face_align.arcface_dst.copy()
    expected_128[:, 0] += 8
    np.testing.assert_allclose(template(128), expected_128, rtol=0, atol=1e-5)
    with pytest.raises(ValueError):
        template(100)


@pytest.mark.parametrize("size", [112, 128, 224, 256, 512])
def test_aligned_crops_match_the_reference(
    group_faces: tuple[np.ndarray, list[np.ndarray]], size: int
) -> None:
    face_align = load("utils.face_align")
    image, keypoints = group_faces
    for kps in keypoints:
        reference_matrix = face_align.estimate_norm(kps, size)
        # skimage solves in float32 where given float32 keypoints: agree to its precision.
        np.testing.assert_allclose(alignment(kps, size), reference_matrix, rtol=1e-6, atol=1e-4)
        crop, _ = align_crop(image, kps, size)
        reference_crop = face_align.norm_crop(image, kps, size)
        assert max_diff(crop, reference_crop) <= 1


def test_embedding_matches_the_reference(
    files: dict[str, Path], group_faces: tuple[np.ndarray, list[np.ndarray]]
) -> None:
    reference = load("model_zoo.arcface_onnx").ArcFaceONNX(str(files["arcface"]))
    ours = ArcFaceEmbedder(OnnxRuntimeEngine(files["arcface"]))
    face_align = load("utils.face_align")
    image, keypoints = group_faces
    embeddings = []
    for kps in keypoints:
        face = SimpleNamespace(kps=kps)
        expected = reference.get(image, face)
        # From the same crop, the same numbers; from our own crop (which may differ by a
        # level where a sample lands on a rounding edge), within 1/255.
        same_crop = ours.embed_crop(face_align.norm_crop(image, kps, 112))
        np.testing.assert_allclose(same_crop, expected, rtol=0, atol=1e-5)
        got = ours.embed(image, kps)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1 / 255)
        embeddings.append(got)
    # Different faces, different identities: the test would pass on a constant otherwise.
    assert np.abs(embeddings[0] - embeddings[1]).max() > 0.1


def test_latent_swap_and_paste_back_match_the_reference(
    files: dict[str, Path], group_faces: tuple[np.ndarray, list[np.ndarray]]
) -> None:
    reference = load("model_zoo.inswapper").INSwapper(str(files["inswapper"]))
    engine = OnnxRuntimeEngine(files["inswapper"])
    ours = InSwapper(engine, read_emap(files["inswapper"]))
    embedder = ArcFaceEmbedder(OnnxRuntimeEngine(files["arcface"]))
    image, keypoints = group_faces
    embedding = embedder.embed(image, keypoints[0])
    source = SimpleNamespace(normed_embedding=embedding / np.linalg.norm(embedding))

    expected_latent = source.normed_embedding.reshape(1, -1) @ reference.emap
    expected_latent /= np.linalg.norm(expected_latent)
    np.testing.assert_allclose(ours.latent(embedding), expected_latent, rtol=0, atol=1e-6)

    latent = ours.latent(embedding)
    for kps in keypoints[1:]:
        target = SimpleNamespace(kps=kps)
        expected_face, expected_matrix = reference.get(image, target, source, paste_back=False)
        face, crop, matrix = ours.swap(image, kps, latent)
        np.testing.assert_allclose(matrix, expected_matrix, rtol=1e-6, atol=1e-4)
        assert max_diff(face, expected_face) <= 1
        expected_frame = reference.get(image, target, source, paste_back=True)
        frame = paste_back(image, face, crop, matrix)
        assert max_diff(frame, expected_frame) <= 1
        assert max_diff(frame, image) > 20  # the face did change


def test_latent_drives_the_swap(files: dict[str, Path]) -> None:
    """Two identities give two different faces on the same target crop."""
    ours = InSwapper(OnnxRuntimeEngine(files["inswapper"]), read_emap(files["inswapper"]))
    rng = np.random.default_rng(5)
    crop = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)
    first = ours.swap_crop(crop, ours.latent(rng.standard_normal(512)))
    second = ours.swap_crop(crop, ours.latent(rng.standard_normal(512)))
    assert max_diff(first, second) > 10
