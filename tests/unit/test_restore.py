"""The face enhancers' and the face parser's pre- and post-processing on stand-in graphs
with the public files' signatures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from livefuse.engines.align import FFHQ_TEMPLATE, alignment
from livefuse.engines.registry import OWN_MODELS
from livefuse.engines.restore import FACE_CLASSES, FaceEnhancer, FaceParser
from livefuse.engines.runtime import OnnxRuntimeEngine
from livefuse.engines.store import check_signature
from tests.own_models import HAIR_CLASS, make_codeformer, make_enhancer, make_face_parser


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("restore")


def test_standins_have_the_public_signatures(folder: Path) -> None:
    for name, maker in (
        ("gfpgan_1.4", make_enhancer),
        ("codeformer", make_codeformer),
        ("face_parser", make_face_parser),
    ):
        assert check_signature(maker(folder / f"{name}.onnx"), OWN_MODELS[name]) == ""


def test_gfpgan_round_trip_keeps_a_face_it_barely_changes(
    folder: Path, astronaut_bgr: np.ndarray
) -> None:
    """The stand-in is nearly tanh(identity): -1..1 in, -1..1 out, RGB order kept."""
    enhancer = FaceEnhancer(OnnxRuntimeEngine(make_enhancer(folder / "g.onnx")))
    crop = np.ascontiguousarray(astronaut_bgr[:512, :512])
    restored = enhancer.enhance_crop(crop)
    assert restored.shape == crop.shape and restored.dtype == np.uint8
    # tanh squeezes the extremes; mid-tones come back within a few levels, channels intact.
    mid = (crop > 60) & (crop < 190)
    assert np.median(np.abs(restored.astype(int) - crop)[mid]) < 12


def test_codeformer_gets_its_fidelity(folder: Path, astronaut_bgr: np.ndarray) -> None:
    engine = OnnxRuntimeEngine(make_codeformer(folder / "c.onnx"))
    crop = np.ascontiguousarray(astronaut_bgr[:512, :512])
    faithful = FaceEnhancer(engine, fidelity=1.0).enhance_crop(crop)
    flat = FaceEnhancer(engine, fidelity=0.0).enhance_crop(crop)
    assert np.abs(flat.astype(int) - 128).max() <= 1  # weight 0: tanh(0) everywhere
    assert np.abs(faithful.astype(int) - 128).max() > 50


def test_parser_classes_and_occluders(folder: Path, astronaut_bgr: np.ndarray) -> None:
    parser = FaceParser(OnnxRuntimeEngine(make_face_parser(folder / "p.onnx")))
    crop = np.ascontiguousarray(astronaut_bgr[:512, :512]).copy()
    crop[100:200, 100:200] = 255
    classes = parser.classes(crop)
    assert classes.shape == (512, 512)
    assert (classes[120:180, 120:180] == HAIR_CLASS).all()
    assert HAIR_CLASS not in FACE_CLASSES
    # Frame keypoints that align the crop onto itself: the occluder map is the card.
    keypoints = FFHQ_TEMPLATE * 512
    assert np.allclose(alignment(keypoints, 512, ffhq=True)[:, :2], np.eye(2), atol=1e-6)
    frame = crop
    occluding = parser.occluders(frame, keypoints, (0, 0, 512, 512))
    assert occluding[120:180, 120:180].min() > 0.95
    # Where the parser saw the face itself, nothing is in front of it.
    skin = classes[300:400, 100:200] != HAIR_CLASS
    assert skin.mean() > 0.5
    assert occluding[300:400, 100:200][skin].mean() < 0.1
