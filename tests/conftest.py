"""Shared fixtures: settings from the environment, the real model cache, real photos.

Images are uint8 BGR arrays as OpenCV reads them; each test gets its own copy. The files
come from `make install` (`python -m tests.fixtures`); a missing one errors the test with
the command that fetches it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

from livefuse.engines.store import ModelStore
from livefuse.settings import Settings
from tests.fixtures import ASTRONAUT, FETCH_COMMAND


@pytest.fixture(scope="session")
def settings() -> Settings:
    return Settings()


@pytest.fixture(scope="session")
def model_store(settings: Settings) -> ModelStore:
    return ModelStore(settings.models_dir)


@pytest.fixture(scope="session")
def testdata_dir(settings: Settings) -> Path:
    return settings.testdata_dir


def _fixture_path(testdata_dir: Path, filename: str) -> Path:
    path = testdata_dir / filename
    if not path.is_file():
        pytest.fail(f"test image {path} is missing: run {FETCH_COMMAND}", pytrace=False)
    return path


@pytest.fixture(scope="session")
def _image_cache(testdata_dir: Path) -> Callable[[str], np.ndarray]:
    cache: dict[str, np.ndarray] = {}

    def load(filename: str) -> np.ndarray:
        if filename not in cache:
            path = _fixture_path(testdata_dir, filename)
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is None:
                pytest.fail(f"cannot decode {path}: run {FETCH_COMMAND}", pytrace=False)
            cache[filename] = image
        return cache[filename]

    return load


@pytest.fixture
def astronaut_path(testdata_dir: Path) -> Path:
    return _fixture_path(testdata_dir, ASTRONAUT)


@pytest.fixture
def group_path(testdata_dir: Path) -> Path:
    return _fixture_path(testdata_dir, "t1.jpg")


@pytest.fixture
def hanks_path(testdata_dir: Path) -> Path:
    return _fixture_path(testdata_dir, "Tom_Hanks_54745.png")


@pytest.fixture
def astronaut_bgr() -> np.ndarray:
    """scikit-image's astronaut (512x512, one face), straight from the installed wheel."""
    from skimage import data

    return np.ascontiguousarray(data.astronaut()[:, :, ::-1])


@pytest.fixture
def group_bgr(_image_cache: Callable[[str], np.ndarray]) -> np.ndarray:
    """insightface's t1.jpg: six people in a row."""
    return _image_cache("t1.jpg").copy()


@pytest.fixture
def hanks_bgr(_image_cache: Callable[[str], np.ndarray]) -> np.ndarray:
    """insightface's Tom_Hanks_54745.png: one face, close up."""
    return _image_cache("Tom_Hanks_54745.png").copy()
