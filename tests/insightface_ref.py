"""InsightFace 2.1's own code, as the reference the parity tests hold livefuse to.

The pinned sdist (tests.fixtures.INSIGHTFACE, the one the test images come from) is
unpacked under `$LIVEFUSE_HOME/testdata/insightface-2.1/`, and its modules are imported
from there unmodified. Only the package `__init__`s are skipped: they import the whole
toolkit (apps, GUI, downloads over `requests`), none of which the reference maths needs,
and the sdist's own dependency list would replace our headless OpenCV with the GUI one.
"""

from __future__ import annotations

import importlib
import sys
import tarfile
import tempfile
import types
from pathlib import Path

from livefuse.engines.fetch import fetch_distribution
from livefuse.settings import Settings
from tests.fixtures import INSIGHTFACE

_PACKAGES = ("insightface", "insightface.utils", "insightface.model_zoo")


def source_root(testdata: Path | None = None) -> Path:
    """The unpacked sdist's directory holding the `insightface` package."""
    testdata = testdata or Settings().testdata_dir
    root = testdata / f"insightface-{INSIGHTFACE.version}"
    marker = root / ".sdist-sha256"
    if marker.is_file() and marker.read_text().strip() == INSIGHTFACE.sha256:
        return root
    testdata.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="insightface-", dir=testdata) as scratch:
        archive = fetch_distribution(INSIGHTFACE, Path(scratch))  # checks the sha256
        unpacked = Path(scratch) / "unpacked"
        with tarfile.open(archive) as tar:
            prefix = f"insightface-{INSIGHTFACE.version}/insightface/"
            members = [m for m in tar.getmembers() if m.name.startswith(prefix) and m.isfile()]
            tar.extractall(unpacked, members=members, filter="data")
        (unpacked / f"insightface-{INSIGHTFACE.version}" / ".sdist-sha256").write_text(
            INSIGHTFACE.sha256 + "\n"
        )
        if root.exists():
            import shutil

            shutil.rmtree(root)
        (unpacked / f"insightface-{INSIGHTFACE.version}").rename(root)
    return root


def load(module: str) -> types.ModuleType:
    """Import `insightface.<module>` (e.g. "model_zoo.inswapper") from the pinned sdist."""
    root = source_root()
    for package in _PACKAGES:
        existing = sys.modules.get(package)
        if existing is not None:
            if Path(existing.__path__[0]).resolve() != (root / package.replace(".", "/")).resolve():
                raise RuntimeError(f"another {package} is already imported: {existing}")
            continue
        stub = types.ModuleType(package)
        stub.__path__ = [str(root / package.replace(".", "/"))]
        sys.modules[package] = stub
    return importlib.import_module(f"insightface.{module}")
