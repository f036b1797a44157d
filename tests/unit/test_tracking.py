"""Face tracking on real models (the engine's stage A, one tracker alone), the test
clips, and the bench's clip loader. The engine itself: tests/unit/test_engine.py."""

from __future__ import annotations

import itertools
from pathlib import Path

import av
import numpy as np
import pytest

from livefuse.engines.pipeline import FacePipeline
from livefuse.engines.store import ModelStore
from livefuse.settings import Settings
from livefuse.stream.clip import render_clip, write_clip
from livefuse.stream.tracking import FaceTracker
from tests.media import heads_on_grey

CANVAS = (360, 640)  # height, width
FPS = 30.0


@pytest.fixture(scope="module")
def faces(settings: Settings) -> FacePipeline:
    return FacePipeline.from_store(ModelStore(settings.models_dir), threads=1)


@pytest.fixture(scope="module")
def astronaut_head() -> np.ndarray:
    """The astronaut's head and shoulders, about 100 px of face."""
    from skimage import data

    return np.ascontiguousarray(data.astronaut()[20:230, 130:320, ::-1])


@pytest.fixture(scope="module")
def second_head(group_bgr_module: np.ndarray) -> np.ndarray:
    """A different person from insightface's t1.jpg (face at about 53..171, 270..394)."""
    return np.ascontiguousarray(group_bgr_module[230:440, 10:215])


@pytest.fixture(scope="module")
def group_bgr_module(testdata_dir: Path) -> np.ndarray:
    import cv2

    image = cv2.imread(str(testdata_dir / "t1.jpg"))
    assert image is not None, "run make install to fetch the test images"
    return image


def scene(*heads: tuple[np.ndarray, int]) -> np.ndarray:
    """A grey 640x360 frame with each head pasted at x (left edge), 80 px from the top."""
    return heads_on_grey(CANVAS, 80, heads)


def track_ids(tracker: FaceTracker) -> list[int]:
    return sorted(track.id for track in tracker.tracks)


def test_a_face_keeps_its_id_while_it_moves_and_a_new_face_gets_a_new_one(
    faces: FacePipeline, astronaut_head: np.ndarray, second_head: np.ndarray
) -> None:
    tracker = FaceTracker(detector=faces.detector, landmarker=faces.landmarker)
    seen: list[list[int]] = []
    for index in range(30):
        heads = [(astronaut_head, 40 + 4 * index)]
        if index >= 15:  # a second person steps in from the right
            heads.append((second_head, 420))
        tracker.update(scene(*heads), index / FPS, detect_size=480, detect_interval=5)
        seen.append(track_ids(tracker))
    first = seen[2]
    assert len(first) == 1
    assert all(ids == first for ids in seen[2:15]), seen
    # The newcomer is found within one detection interval and the first id survives.
    assert len(seen[-1]) == 2 and first[0] in seen[-1], seen
    # Then the first person leaves: the track goes, the other stays.
    for index in range(30, 36):
        tracker.update(scene((second_head, 420)), index / FPS, detect_size=480, detect_interval=5)
    assert len(tracker.tracks) == 1 and first[0] not in track_ids(tracker)


def test_faces_crossing_keep_the_front_face_and_both_are_tracked_after(
    faces: FacePipeline, astronaut_head: np.ndarray, second_head: np.ndarray
) -> None:
    tracker = FaceTracker(detector=faces.detector, landmarker=faces.landmarker)
    front_ids = []
    for index in range(40):
        # The astronaut walks right, in front; the other person walks left, behind.
        astronaut_x = 20 + 9 * index
        frame = scene((second_head, 430 - 9 * index), (astronaut_head, astronaut_x))
        tracker.update(frame, index / FPS, detect_size=480, detect_interval=5)
        ids = track_ids(tracker)
        assert len(ids) == len(set(ids)) <= 2
        # The track on the astronaut's face (about 48..142 px into the crop).
        front = [
            t.id
            for t in tracker.tracks
            if abs(float(t.raw.box[0]) - (astronaut_x + 48)) < 25 and t.raw.box[1] < 170
        ]
        front_ids.append(front)
    assert len(tracker.tracks) == 2
    # The face in front is never lost or renamed by the one passing behind it.
    assert all(ids == front_ids[2] for ids in front_ids[2:]) and len(front_ids[2]) == 1, front_ids


def test_faces_take_turns_for_their_landmark_refits(
    faces: FacePipeline, astronaut_head: np.ndarray, second_head: np.ndarray
) -> None:
    tracker = FaceTracker(detector=faces.detector, landmarker=faces.landmarker)
    frame = scene((astronaut_head, 60), (second_head, 400))
    fits = []
    for index in range(12):
        counts = tracker.update(
            frame, index / FPS, detect_size=480, detect_interval=100, landmark_interval=2
        )
        fits.append(counts.landmark_fits)
    assert len(tracker.tracks) == 2
    # Once both are tracked, one face is refitted per frame, never both on one frame.
    assert fits[2:] == [1] * 10, fits


def test_refits_are_spread_evenly_whatever_the_track_ids(
    faces: FacePipeline, group_bgr_module: np.ndarray
) -> None:
    tracker = FaceTracker(detector=faces.detector, landmarker=faces.landmarker)
    options = {"detect_size": 640, "detect_interval": 1000}
    for index in range(4):  # new faces start a few per frame
        tracker.update(group_bgr_module, index / FPS, **options)
    assert len(tracker.tracks) >= 5
    tracker.tracks = tracker.tracks[:5]
    # Ids with gaps, as tracks lost and merged leave them: taking turns by id alone would
    # refit 2, 3 and 0 faces on three frames in a row here.
    for track, new_id in zip(tracker.tracks, (1, 3, 4, 6, 7), strict=True):
        track.id = new_id
    first = 4
    fits, refitted_on = [], {track.id: [] for track in tracker.tracks}
    for index in range(first, first + 12):
        fitted_before = {track.id: track.last_fit for track in tracker.tracks}
        counts = tracker.update(group_bgr_module, index / FPS, **options, landmark_interval=3)
        fits.append(counts.landmark_fits)
        for track in tracker.tracks:
            if track.last_fit != fitted_before[track.id]:
                refitted_on[track.id].append(index)
    assert len(tracker.tracks) == 5
    # Five faces every three frames: two, two and one, never three on one frame.
    assert sorted(fits[3:]) == sorted([2, 2, 1] * 3), fits
    for track_id, frames in refitted_on.items():
        assert len(frames) == 4, (track_id, frames)
        assert all(b - a == 3 for a, b in itertools.pairwise(frames)), (track_id, frames)


def test_a_shorter_refit_interval_does_not_crowd_one_frame(
    faces: FacePipeline, group_bgr_module: np.ndarray
) -> None:
    tracker = FaceTracker(detector=faces.detector, landmarker=faces.landmarker)
    options = {"detect_size": 640, "detect_interval": 1000}
    for index in range(4):
        tracker.update(group_bgr_module, index / FPS, **options)
    assert len(tracker.tracks) == 6
    for index in range(4, 13):  # every 3 frames: 2 fits a frame
        tracker.update(group_bgr_module, index / FPS, **options, landmark_interval=3)
    fits = []
    for index in range(13, 21):  # the level climbs: every 2 frames, 3 fits a frame
        counts = tracker.update(group_bgr_module, index / FPS, **options, landmark_interval=2)
        fits.append(counts.landmark_fits)
    assert len(tracker.tracks) == 6
    # Tracks fitted under the old interval fall due by it, not all on the first frame.
    assert max(fits) <= 3, fits
    assert sum(fits) == 3 * len(fits), fits


def test_clip_maker_writes_mp4_and_y4m_that_decode_to_the_asked_size(
    tmp_path: Path, astronaut_head: np.ndarray
) -> None:
    for suffix in (".mp4", ".y4m"):
        path = write_clip(astronaut_head, tmp_path / f"clip{suffix}", seconds=0.5, size=(320, 240))
        with av.open(str(path)) as container:
            decoded = [f.to_ndarray(format="bgr24") for f in container.decode(video=0)]
        assert len(decoded) == 15
        assert decoded[0].shape == (240, 320, 3)
    with pytest.raises(ValueError, match=r"\.mp4 or \.y4m"):
        write_clip(astronaut_head, tmp_path / "clip.avi", seconds=0.1)


def test_a_static_clip_only_has_noise_and_a_moving_one_moves(astronaut_head: np.ndarray) -> None:
    def change(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.abs(a.astype(np.int16) - b).mean())

    options = {"seconds": 1.0, "size": (320, 240), "noise": 2.0}
    still = list(render_clip(astronaut_head, static=True, **options))  # type: ignore[arg-type]
    moving = list(render_clip(astronaut_head, **options))  # type: ignore[arg-type]
    assert change(still[0], still[-1]) < 3.0  # noise of sigma 2: |a - b| averages about 2.3
    assert change(moving[0], moving[-1]) > change(still[0], still[-1]) + 5.0
    # Seeded: the same clip again, frame for frame.
    again = list(render_clip(astronaut_head, **options))  # type: ignore[arg-type]
    assert all(np.array_equal(a, b) for a, b in zip(moving, again, strict=True))


def test_a_clip_too_long_for_memory_is_cut_and_says_so(
    tmp_path: Path, astronaut_head: np.ndarray
) -> None:
    from livefuse.stream.bench import load_clip

    path = write_clip(astronaut_head, tmp_path / "clip.mp4", seconds=0.5, size=(320, 240))
    whole = load_clip(path)
    assert len(whole.frames) == 15 and not whole.truncated and whole.fps == 30
    frame_bytes = whole.frames[0].nbytes
    cut = load_clip(path, max_bytes=5 * frame_bytes)
    assert len(cut.frames) == 5 and cut.truncated
    assert all(np.array_equal(a, b) for a, b in zip(cut.frames, whole.frames[:5], strict=True))


def test_a_tracker_detecting_in_the_background_takes_faces_up_a_frame_later(
    faces: FacePipeline, astronaut_head: np.ndarray
) -> None:
    tracker = FaceTracker(
        detector=faces.face_detector, landmarker=faces.landmarker, detect_in_background=True
    )
    options = {"detect_size": 480, "detect_interval": 5}
    first = tracker.update(scene((astronaut_head, 100)), 0.0, **options)
    # The detection was asked for, not waited on: nothing is tracked on its frame.
    assert first.detected and tracker.tracks == []
    tracker.update(scene((astronaut_head, 102)), 1 / FPS, **options)
    assert len(tracker.tracks) == 1
