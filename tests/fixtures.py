"""Test images, pinned like the models: `python -m tests.fixtures` puts them in
`$LIVEFUSE_HOME/testdata/` (default ~/.cache/livefuse/testdata).

- t1.jpg (six people) and Tom_Hanks_54745.png from the insightface 2.1 sdist, checked by
  the sdist's sha256 and each image's own;
- astronaut.png, scikit-image's `astronaut()` (it ships in the wheel), for commands that
  want a file.

Files already present with the right sha256 are kept, so a second run touches no network.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from livefuse.engines.fetch import fetch_distribution
from livefuse.engines.registry import Distribution
from livefuse.engines.store import ModelError, sha256_file
from livefuse.settings import Settings

INSIGHTFACE = Distribution(
    package="insightface",
    version="2.1",
    filename="insightface-2.1.tar.gz",
    sha256="776cbd36b70f5f2ae1a026101cfb80387f0b2280a0dbaf073f8d3ed69f554e01",
    size=1_105_440,
    pip_args=("--no-binary=:all:",),
)


@dataclass(frozen=True)
class ImageFixture:
    filename: str
    member: str
    sha256: str


INSIGHTFACE_IMAGES = (
    ImageFixture(
        filename="t1.jpg",
        member="insightface-2.1/insightface/data/images/t1.jpg",
        sha256="47f682e945b659f93a9e490b9c9c4a2a864abe64dace9e1a2893845ddfd69489",
    ),
    ImageFixture(
        filename="Tom_Hanks_54745.png",
        member="insightface-2.1/insightface/data/images/Tom_Hanks_54745.png",
        sha256="8545da294e8c7c79911169c3915fed8528f1960cd0ed99b92453788ca4275083",
    ),
)
ASTRONAUT = "astronaut.png"
FETCH_COMMAND = "`make install` (or `.venv/bin/python -m tests.fixtures`)"


def _present(path: Path, sha256: str) -> bool:
    return path.is_file() and sha256_file(path) == sha256


def _write_atomic(path: Path, data: bytes) -> None:
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(name, 0o644)
        os.replace(name, path)
    finally:
        Path(name).unlink(missing_ok=True)


def fetch_images(
    distribution: Distribution, images: tuple[ImageFixture, ...], dest: Path
) -> list[Path]:
    """`images` from the pinned `distribution`, checked by sha256, into `dest`; those already
    there with the right sha256 are kept without touching the network."""
    dest.mkdir(parents=True, exist_ok=True)
    wanted = [image for image in images if not _present(dest / image.filename, image.sha256)]
    if wanted:
        with tempfile.TemporaryDirectory(prefix="livefuse-fixtures-") as scratch:
            archive = fetch_distribution(distribution, Path(scratch))
            with tarfile.open(archive) as tar:
                for image in wanted:
                    member = tar.extractfile(image.member)
                    if member is None:
                        raise ModelError(f"{archive.name} has no file {image.member}")
                    data = member.read()
                    actual = hashlib.sha256(data).hexdigest()
                    if actual != image.sha256:
                        raise ModelError(
                            f"{image.member} has sha256 {actual}, expected {image.sha256}"
                        )
                    _write_atomic(dest / image.filename, data)
    return [dest / image.filename for image in images]


def fetch_insightface_images(testdata: Path) -> list[Path]:
    return fetch_images(INSIGHTFACE, INSIGHTFACE_IMAGES, testdata)


def write_astronaut(testdata: Path) -> Path:
    import cv2
    from skimage import data

    path = testdata / ASTRONAUT
    if not path.is_file():
        testdata.mkdir(parents=True, exist_ok=True)
        ok, encoded = cv2.imencode(".png", data.astronaut()[:, :, ::-1])
        if not ok:
            raise RuntimeError("could not encode the astronaut image")
        _write_atomic(path, encoded.tobytes())
    return path


def main() -> int:
    testdata = Settings().testdata_dir
    try:
        paths = [*fetch_insightface_images(testdata), write_astronaut(testdata)]
    except ModelError as error:
        print(f"test fixtures: {error}", file=sys.stderr)
        return 2
    for path in paths:
        print(f"fixture {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
