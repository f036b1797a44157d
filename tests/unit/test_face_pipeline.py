"""The face pipeline on real photos with the real embedded models."""

from __future__ import annotations

import numpy as np
import pytest

from livefuse.engines.blend import face_mask
from livefuse.engines.landmarks import FaceRegion
from livefuse.engines.pipeline import FacePipeline, NoFaceError, face_box
from livefuse.engines.raster import rasterize_ids, source_coordinates
from livefuse.engines.store import ModelStore
from livefuse.engines.swapper import eye_open_weights
from livefuse.settings import Settings

# Hand-checked on the photos: centres of each face in t1.jpg (the six people around the
# table) and the astronaut's eyes, in pixels.
T1_FACE_CENTRES = [(114, 332), (322, 211), (518, 340), (796, 412), (956, 133), (1180, 333)]
ASTRONAUT_EYES = [(203, 102), (247, 105)]


@pytest.fixture(scope="module")
def pipeline(settings: Settings) -> FacePipeline:
    return FacePipeline.from_store(ModelStore(settings.models_dir), threads=2)


def test_detector_finds_the_astronaut_with_her_eyes(pipeline, astronaut_bgr):
    detections = pipeline.detector.detect(astronaut_bgr)
    assert len(detections) == 1
    face = detections[0]
    assert face.score > 0.8
    x1, y1, x2, y2 = face.box
    assert 170 < x1 < 195 and 45 < y1 < 75 and 255 < x2 < 285 and 165 < y2 < 195
    for found, expected in zip(face.keypoints[:2], ASTRONAUT_EYES, strict=True):
        assert np.linalg.norm(found - expected) < 6


def test_detector_finds_all_six_people_at_any_size(pipeline, group_bgr):
    for max_side in (320, 640, 1280):
        detections = pipeline.detector.detect(group_bgr, max_side=max_side)
        centres = np.array([(d.box[:2] + d.box[2:]) / 2 for d in detections])
        assert len(detections) == 6, max_side
        for expected in T1_FACE_CENTRES:
            assert np.min(np.linalg.norm(centres - expected, axis=1)) < 25, (max_side, expected)


def test_detector_on_a_faceless_image_finds_nothing(pipeline):
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 255, (360, 480, 3), dtype=np.uint8)
    assert pipeline.detector.detect(noise) == []
    assert pipeline.find_faces(np.full((64, 64, 3), 128, np.uint8)) == []


def test_landmarks_lie_on_each_face(pipeline, group_bgr):
    detections = pipeline.detector.detect(group_bgr)
    meshes = pipeline.landmarker.landmarks(
        group_bgr, [FaceRegion.from_detection(d) for d in detections]
    )
    assert len(meshes) == 6
    for detection, mesh in zip(detections, meshes, strict=True):
        assert mesh.points.shape == (468, 3)
        assert mesh.presence > 0.9
        x1, y1, x2, y2 = detection.box
        margin = 0.15 * detection.width
        xy = mesh.points[:, :2]
        inside = (
            (xy[:, 0] > x1 - margin)
            & (xy[:, 0] < x2 + margin)
            & (xy[:, 1] > y1 - margin)
            & (xy[:, 1] < y2 + margin)
        )
        assert inside.mean() > 0.98
        # The mesh's eye corners agree with the detector's eye keypoints.
        eye_centres = [xy[[33, 133]].mean(axis=0), xy[[362, 263]].mean(axis=0)]
        for eye, keypoint in zip(eye_centres, detection.keypoints[:2], strict=True):
            assert np.linalg.norm(eye - keypoint) < 0.12 * detection.width


def test_landmarks_follow_a_rolled_face(pipeline, astronaut_bgr):
    import cv2

    upright = pipeline.find_faces(astronaut_bgr)[0]
    centre = (256.0, 256.0)
    rotation = cv2.getRotationMatrix2D(centre, 25, 1.0)
    rolled_image = cv2.warpAffine(astronaut_bgr, rotation, (512, 512))
    rolled = pipeline.find_faces(rolled_image)
    assert len(rolled) == 1
    expected = upright.points[:, :2] @ rotation[:, :2].T + rotation[:, 2]
    error = np.linalg.norm(rolled[0].points[:, :2] - expected, axis=1)
    assert np.median(error) < 3.0


def test_swap_changes_the_face_and_nothing_outside_it(pipeline, astronaut_bgr, group_bgr):
    source = pipeline.prepare_source(group_bgr)
    assert source.faces_in_image == 6
    mesh = pipeline.find_faces(astronaut_bgr)[0]
    # With the shape transfer off, the target's pixels only change under the blend mask.
    rigid = FacePipeline(
        detector=pipeline.detector,
        landmarker=pipeline.landmarker,
        swapper=pipeline.swapper,
        shape_strength=0.0,
    )
    swapped = rigid.swap_faces(astronaut_bgr, source.face, [mesh])

    box = face_box(mesh, astronaut_bgr.shape[:2])
    assert box is not None
    x1, y1, x2, y2 = box
    _, coverage = pipeline.swapper.warp(source.face, mesh.points, box)
    region = astronaut_bgr[y1:y2, x1:x2]
    alpha = face_mask(
        mesh.points, pipeline.swapper.topology, coverage, box, mesh.size, target=region
    )

    changed = np.any(swapped != astronaut_bgr, axis=2)
    outside = np.ones(changed.shape, dtype=bool)
    outside[y1:y2, x1:x2] = alpha <= 0
    assert not changed[outside].any(), "pixels outside the mask changed"
    inside = changed[y1:y2, x1:x2][alpha > 0.5]
    assert inside.mean() > 0.9, "the face was barely touched"
    # Never a black or broken face: the swapped face is as bright as the original's.
    face_after = swapped[y1:y2, x1:x2][alpha > 0.5].astype(float).mean()
    face_before = astronaut_bgr[y1:y2, x1:x2][alpha > 0.5].astype(float).mean()
    assert abs(face_after - face_before) < 25


def test_reshaping_stays_inside_the_ring_around_the_face(pipeline, astronaut_bgr, group_bgr):
    import cv2

    source = pipeline.prepare_source(group_bgr).face
    mesh = pipeline.find_faces(astronaut_bgr)[0]
    moved = pipeline.swapper.transfer_shape(source, mesh.points, 1.0)
    assert np.abs(moved - mesh.points).max() > 1.0, "a frontal face should be reshaped"
    reshaped = astronaut_bgr.copy()
    pipeline.swapper.reshape_target(reshaped, mesh.points, moved)

    oval = mesh.points[pipeline.swapper.topology.face_oval, :2]
    centre = oval.mean(axis=0)
    ring = centre + (oval - centre) * 1.4
    inside_ring = np.zeros(astronaut_bgr.shape[:2], np.uint8)
    cv2.fillPoly(inside_ring, [np.round(ring).astype(np.int32)], 1)
    changed = np.any(reshaped != astronaut_bgr, axis=2)
    assert changed.any()
    assert not changed[inside_ring == 0].any(), "reshaping moved pixels far from the face"


def test_a_turned_face_takes_the_source_shape_on_its_near_side_only(
    pipeline, astronaut_bgr, group_bgr
):
    """t1.jpg's fifth person is seen three-quarter (his far cheek hides behind his nose):
    his near side, nose and mouth take the source's shape, his far outline stays put."""
    from livefuse.engines.swapper import face_axes

    source = pipeline.prepare_source(astronaut_bgr).face
    faces = pipeline.find_faces(group_bgr)
    turned = min(faces, key=lambda f: np.linalg.norm(f.points[:, :2].mean(axis=0) - (956, 133)))
    points = turned.points
    topology = pipeline.swapper.topology
    axes = face_axes(points, topology)
    assert abs(axes[2, 0]) > 0.5, "the fixture's fifth person should be turned well away"
    moved = pipeline.swapper.transfer_shape(source, points, 1.0)
    shift = np.linalg.norm((moved - points)[:, :2], axis=1)

    oval = topology.face_oval
    lateral = ((points - points.mean(axis=0)) @ axes.T)[oval, 0]
    # The side turned away is told from depth alone (FaceMesh's z grows away from the
    # camera), not from the swapper's own axes, so a wrong sign there would fail here.
    far_is_positive = points[oval[lateral > 0], 2].mean() > points[oval[lateral < 0], 2].mean()
    lateral *= 1.0 if far_is_positive else -1.0  # positive: the side turned away
    far_edge = oval[lateral > 0.9 * np.abs(lateral).max()]
    near_side = oval[lateral < -0.5 * np.abs(lateral).max()]
    assert shift[near_side].max() > 3.0, "the near side should take the source's shape"
    assert shift[far_edge].max() < 0.25 * shift[near_side].max(), "the far outline moved"


def test_a_turned_faces_nose_is_swapped_but_not_the_background_beside_it(
    pipeline, astronaut_bgr, group_bgr
):
    """Seen three-quarter, the fifth person's nose tip stands out past his far cheek's
    outline: the mask follows the drawn mesh, so his own nose does not stay behind, yet
    stops at his real profile."""
    import cv2

    from livefuse.engines.blend import mask_outline

    source = pipeline.prepare_source(astronaut_bgr).face
    faces = pipeline.find_faces(group_bgr)
    turned = min(faces, key=lambda f: np.linalg.norm(f.points[:, :2].mean(axis=0) - (956, 133)))
    outline = mask_outline(turned.points, pipeline.swapper.topology).reshape(-1, 1, 2)
    nose_tip = turned.points[1, :2]
    past_oval = -cv2.pointPolygonTest(outline, tuple(map(float, nose_tip)), True)
    assert past_oval > 3.0, "the fixture's turned face should show its nose past the oval"
    # Shape transfer off: pixels change only where the mask lets the source through.
    rigid = FacePipeline(
        detector=pipeline.detector,
        landmarker=pipeline.landmarker,
        swapper=pipeline.swapper,
        shape_strength=0.0,
    )
    swapped = rigid.swap_faces(group_bgr, source, [turned])
    x, y = np.round(nose_tip).astype(int)
    around_tip = (slice(y - 1, y + 2), slice(x - 1, x + 2))
    change = np.abs(swapped[around_tip].astype(int) - group_bgr[around_tip]).mean()
    assert change > 10, f"the nose tip kept the target's pixels (mean change {change:.1f})"

    # The fitted outline lies a few pixels past his real profile, over the pale blue
    # window behind him: none of that background may turn to skin.
    lab = cv2.cvtColor(group_bgr, cv2.COLOR_BGR2LAB)
    x1, y1, x2, y2 = (int(v) for v in turned.box)
    near = (slice(y1 - 10, y2 + 10), slice(x1 - 10, x2 + 10))
    background = lab[near][..., 2] < 125  # blue, where skin is yellow-red (b > 140)
    assert background.sum() > 200, "the fixture should show the window beside his profile"
    painted = np.abs(swapped[near].astype(int) - group_bgr[near]).sum(axis=2) > 40
    assert painted[background].sum() <= 3, f"{painted[background].sum()} background px swapped"


@pytest.mark.parametrize("photo", ["astronaut_bgr", "hanks_bgr"])
def test_a_source_fit_hardly_depends_on_where_its_crop_starts(pipeline, photo, request):
    image = request.getfixturevalue(photo)
    mesh = pipeline.find_faces(image)[0]
    # One landmark pass from each of four crops a few pixels apart, as a video frame gets
    # it: each fit differs a little, with the crop.
    fits = [
        pipeline.landmarker.landmarks(
            image, [FaceRegion.from_points(mesh.points + np.float32([dx, dy, 0]))]
        )[0]
        for dx, dy in ((0, 0), (4, 0), (0, 4), (-4, -3))
    ]

    def spread(shapes: list[np.ndarray]) -> float:
        """Mean landmark distance (frontal layout, px) of each shape from the first."""
        distances = [np.linalg.norm((s - shapes[0])[:, :2], axis=1).mean() for s in shapes[1:]]
        return float(np.mean(distances))

    as_fitted = [pipeline.swapper.prepare_source(image, fit).frontal for fit in fits]
    # Preparing the source from each fit refits it from many crops and takes the median,
    # so the four prepared sources agree much better than the fits they started from.
    prepared = [pipeline.prepare_source_face(image, fit).frontal for fit in fits]
    assert spread(prepared) < 0.7 * spread(as_fitted), (spread(prepared), spread(as_fitted))


def test_swapped_face_reads_as_the_source_to_an_independent_recogniser(
    pipeline, astronaut_bgr, group_bgr
):
    from tests.identity import DlibRecognizer

    recogniser = DlibRecognizer(use_cnn=False)
    source_descriptor = recogniser.descriptors(astronaut_bgr)[0][1]
    source = pipeline.prepare_source(astronaut_bgr).face
    meshes = pipeline.find_faces(group_bgr)
    swapped = pipeline.swap_faces(group_bgr, source, meshes)
    nearer = 0
    for mesh in meshes:
        box = tuple(int(v) for v in mesh.box)
        before = recogniser.descriptor_at(group_bgr, box)
        after = recogniser.descriptor_at(swapped, box)
        assert before is not None and after is not None
        if recogniser.distance(after, source_descriptor) < recogniser.distance(
            before, source_descriptor
        ):
            nearer += 1
    assert nearer == len(meshes)


def test_source_without_a_face_is_refused(pipeline):
    with pytest.raises(NoFaceError):
        pipeline.prepare_source(np.full((240, 320, 3), 200, np.uint8))


def test_blinking_eye_shows_the_targets_own_lids(pipeline, astronaut_bgr):
    mesh = pipeline.find_faces(astronaut_bgr)[0]
    assert np.all(eye_open_weights(mesh.points, pipeline.swapper.topology) == 1.0)
    closed = mesh.points.copy()
    for loop in pipeline.swapper.topology.eye_loops:
        # Collapse each eye opening onto the line between its corners: a blink.
        corners = closed[[loop[1], loop[9]]]
        t = np.linspace(0, 1, len(loop))[:, None]
        closed[loop, :2] = corners[0, :2] * (1 - t) + corners[1, :2] * t
    assert np.all(eye_open_weights(closed, pipeline.swapper.topology) == 0.0)


def test_pixels_map_through_their_triangle():
    rng = np.random.default_rng(1)
    dst = rng.uniform(5, 60, (3, 2)).astype(np.float32)
    src = rng.uniform(0, 100, (3, 2)).astype(np.float32)
    triangle = np.array([[0, 1, 2]], dtype=np.int32)
    ids = rasterize_ids(dst, triangle, np.array([0]), (70, 70))
    map_x, map_y = source_coordinates(ids, dst, src, triangle)
    # An interior pixel lands where the triangle's affine map takes it.
    centroid = np.round(dst.mean(axis=0)).astype(int)
    weights = np.linalg.solve(
        np.vstack([dst.T, np.ones(3)]), np.array([*centroid.astype(float), 1.0])
    )
    expected = weights @ src
    got = (map_x[centroid[1], centroid[0]], map_y[centroid[1], centroid[0]])
    np.testing.assert_allclose(got, expected, atol=1e-3)


def test_nearer_triangle_hides_the_farther_one():
    xy = np.array([[0, 0], [40, 0], [0, 40], [5, 5], [45, 5], [5, 45]], dtype=np.float32)
    triangles = np.array([[0, 1, 2], [3, 4, 5]], dtype=np.int32)
    ids = rasterize_ids(xy, triangles, np.array([1, 0]), (50, 50))
    assert ids[10, 10] == 0  # drawn last: in front
    assert ids[30, 12] == 1  # only the other triangle there
    assert ids[49, 49] == -1
    map_x, map_y = source_coordinates(ids, xy, xy * 2, triangles)
    assert map_x[10, 10] == pytest.approx(20) and map_y[10, 12] == pytest.approx(20)
    assert map_x[49, 49] == -1


def test_a_sliver_never_sends_pixels_far_away():
    # Nearly collinear: the rasteriser paints pixels beside it that lie outside it.
    dst = np.array([[2, 10], [60, 10.3], [31, 10.1]], dtype=np.float32)
    src = np.array([[0, 0], [100, 0], [50, 80]], dtype=np.float32)
    triangle = np.array([[0, 1, 2]], dtype=np.int32)
    ids = rasterize_ids(dst, triangle, np.array([0]), (20, 64))
    map_x, map_y = source_coordinates(ids, dst, src, triangle)
    covered = ids >= 0
    assert covered.any()
    # Clamped to the triangle, every pixel maps inside the source triangle's bounds.
    assert map_x[covered].min() >= -1e-3 and map_x[covered].max() <= 100 + 1e-3
    assert map_y[covered].min() >= -1e-3 and map_y[covered].max() <= 80 + 1e-3


def test_broken_meshes_and_frames_are_refused_or_skipped(pipeline, astronaut_bgr):
    from livefuse.engines.types import FaceMesh

    source = pipeline.prepare_source(astronaut_bgr).face
    mesh = pipeline.find_faces(astronaut_bgr)[0]
    for broken_points in (
        np.where(np.arange(468)[:, None] == 5, np.nan, mesh.points),
        np.full_like(mesh.points, np.inf),
        np.zeros_like(mesh.points),
    ):
        broken = FaceMesh(points=broken_points.astype(np.float32), presence=1.0)
        result = pipeline.swap_faces(astronaut_bgr, source, [broken])
        assert result.shape == astronaut_bgr.shape  # the frame comes through, untouched
    with pytest.raises(ValueError, match="8-bit BGR"):
        pipeline.find_faces(astronaut_bgr.astype(np.uint16))
    with pytest.raises(ValueError, match="8-bit BGR"):
        pipeline.find_faces(astronaut_bgr[:, :, 0])
    with pytest.raises(ValueError, match="no pixels"):
        pipeline.find_faces(np.zeros((0, 10, 3), np.uint8))


def test_reshape_ring_constant_matches_the_test(pipeline):
    from livefuse.engines import swapper

    # The ring test above allows 1.4x the oval; the swapper's ring must lie inside it.
    assert swapper._RESHAPE_RING < 1.4


def test_no_seam_where_the_mask_crosses_the_face_oval(pipeline, group_bgr):
    """Past the oval the mask keeps the target's skin; where it crosses the oval's own
    (anti-aliased) edge it must not dip, or a faint line shows across a turned nose."""
    from livefuse.engines.blend import face_mask, mask_outline

    faces = pipeline.find_faces(group_bgr)
    turned = min(faces, key=lambda f: np.linalg.norm(f.points[:, :2].mean(axis=0) - (956, 133)))
    box = face_box(turned, group_bgr.shape[:2])
    assert box is not None
    x1, y1, x2, y2 = box
    width, height = x2 - x1, y2 - y1
    # Everything covered, and every pixel the same skin: nothing past the oval is refused.
    coverage = np.ones((height, width), dtype=np.float32)
    skin = np.empty((height, width, 3), dtype=np.uint8)
    skin[:] = (120, 150, 200)
    topology = pipeline.swapper.topology
    alpha = face_mask(turned.points, topology, coverage, box, turned.size, target=skin)
    # The oval's outline from the brows down, well inside the box.
    outline = mask_outline(turned.points, topology) - (x1, y1)
    brow_row = float(turned.points[topology.brows, 1].max()) - y1
    margin = 0.15 * turned.size
    on_line = [
        (x, y)
        for x, y in np.round(outline).astype(int)
        if y > brow_row and margin < x < width - margin and margin < y < height - margin
    ]
    assert len(on_line) > 5
    values = np.array([alpha[y, x] for x, y in on_line])
    assert values.min() > 0.95, f"the mask dips to {values.min():.2f} on the oval's line"
