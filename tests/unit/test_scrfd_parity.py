"""SCRFD post-processing (anchor centres, distance decoding, threshold, NMS, scaling back
to the frame) against InsightFace 2.1's `model_zoo.scrfd` on the same stand-in det_10g
graph and the same photos: the same boxes, scores and keypoints."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from livefuse.engines.runtime import OnnxRuntimeEngine
from livefuse.engines.scrfd import SCRFDDetector, nms
from tests.insightface_ref import load
from tests.own_models import make_scrfd


@pytest.fixture(scope="module")
def det_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # A bias that leaves some hundreds of anchors over the threshold: NMS has work to do.
    return make_scrfd(tmp_path_factory.mktemp("scrfd") / "det_10g.onnx", score_bias=-0.3)


def reference_detect(det_file: Path, image: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    reference = load("model_zoo.scrfd").SCRFD(str(det_file))
    reference.prepare(-1, det_thresh=0.5, nms_thresh=0.4)
    det, kpss = reference.detect(image, input_size=(size, size))
    return det, kpss


@pytest.mark.parametrize(
    ("photo", "size"),
    [("t1.jpg", 640), ("t1.jpg", 320), ("Tom_Hanks_54745.png", 160), ("portrait", 256)],
)
def test_boxes_scores_and_keypoints_match_the_reference(
    det_file: Path, testdata_dir: Path, photo: str, size: int
) -> None:
    if photo == "portrait":  # taller than wide: the other branch of the scaling
        image = cv2.imread(str(testdata_dir / "t1.jpg"))[:, 300:700]
    else:
        image = cv2.imread(str(testdata_dir / photo))
    assert image is not None
    expected, expected_kps = reference_detect(det_file, image, size)
    ours = SCRFDDetector(OnnxRuntimeEngine(det_file), square=True)
    found = ours.detect(image, max_side=size)
    assert len(expected) > 3  # the stand-in fires: the comparison means something
    assert len(found) == len(expected)
    boxes = np.array([d.box for d in found])
    scores = np.array([d.score for d in found])
    keypoints = np.array([d.keypoints for d in found])
    np.testing.assert_allclose(scores, expected[:, 4], rtol=0, atol=1e-5)
    np.testing.assert_allclose(boxes, expected[:, :4], rtol=1e-5, atol=1e-2)
    np.testing.assert_allclose(keypoints, expected_kps, rtol=1e-5, atol=1e-2)


def test_anchor_centres_are_cell_corners_two_per_cell(det_file: Path) -> None:
    ours = SCRFDDetector(OnnxRuntimeEngine(det_file))
    centres = ours.anchor_centres(2, 3, 16)
    expected = [[0, 0], [0, 0], [16, 0], [16, 0], [32, 0], [32, 0]]
    expected += [[0, 16], [0, 16], [16, 16], [16, 16], [32, 16], [32, 16]]
    np.testing.assert_array_equal(centres, expected)
    assert ours.anchor_centres(2, 3, 16) is centres  # cached


def test_nms_matches_the_reference_on_random_boxes() -> None:
    reference = load("model_zoo.scrfd").SCRFD.__new__(load("model_zoo.scrfd").SCRFD)
    reference.nms_thresh = 0.4
    rng = np.random.default_rng(7)
    corners = rng.uniform(0, 200, (300, 2))
    sizes = rng.uniform(5, 60, (300, 2))
    boxes = np.hstack([corners, corners + sizes]).astype(np.float32)
    scores = rng.uniform(0, 1, 300).astype(np.float32)
    expected = reference.nms(np.hstack([boxes, scores[:, None]]))
    assert nms(boxes, scores, 0.4) == [int(i) for i in expected]
    assert 10 < len(expected) < 300


def test_padding_to_32_finds_the_same_faces_away_from_the_edge(
    det_file: Path, testdata_dir: Path
) -> None:
    """The real-time default pads only to a multiple of 32, not a square: away from the
    padding's edge the same anchors fire."""
    image = cv2.imread(str(testdata_dir / "t1.jpg"))
    square = SCRFDDetector(OnnxRuntimeEngine(det_file), square=True).detect(image)
    tight = SCRFDDetector(OnnxRuntimeEngine(det_file)).detect(image)
    limit = image.shape[0] * 0.9
    inner = [d for d in square if d.box[3] < limit]
    inner_tight = [d for d in tight if d.box[3] < limit]
    assert len(inner) == len(inner_tight) > 0
    np.testing.assert_allclose(
        [d.box for d in inner], [d.box for d in inner_tight], rtol=0, atol=1e-3
    )


def test_a_graph_with_other_outputs_is_refused(tmp_path: Path) -> None:
    from tests.own_models import make_arcface

    with pytest.raises(ValueError, match="9 \\(scores, boxes and keypoints"):
        SCRFDDetector(OnnxRuntimeEngine(make_arcface(tmp_path / "a.onnx")))
