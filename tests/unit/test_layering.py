"""The layering rule from DESIGN.md, checked on the source: `cli` imports `web` imports
`stream` imports `engines`, never the other way; `engines` has no asyncio and no networking;
`stream` has no HTTP. Every import statement counts, including ones inside functions."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "livefuse"

_HTTP = ("aiohttp", "urllib.request", "http.client", "http.server", "requests", "httpx")
_NETWORK = (*_HTTP, "asyncio", "socket", "subprocess", "urllib3", "aiortc")
# Model downloads (pip, bring-your-own URLs). Only `livefuse models pull` needs them, so only
# the cli layer may import this module; the frame path (engines, stream, web) never does.
_FETCH = "livefuse.engines.fetch"

# Layer -> modules (and their submodules) its files must not import. `stream` runs aiortc
# tracks on asyncio (DESIGN.md), so only HTTP and the layers above it are kept out of it.
# `cli` is the top layer: it may import everything.
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "engines": (*_NETWORK, "livefuse.cli", "livefuse.stream", "livefuse.web", _FETCH),
    "stream": (*_HTTP, "livefuse.cli", "livefuse.web", _FETCH),
    "web": ("livefuse.cli", _FETCH),
}

# File (relative to the package's parent) -> forbidden modules it may import all the same.
# livefuse/engines/fetch.py sits beside the model store it fills, and fetching is its whole
# job: it runs pip and downloads bring-your-own models. It is reached only from
# `livefuse models pull`, never from the frame path (the _FETCH rule above keeps it so).
ALLOWED: dict[str, tuple[str, ...]] = {
    "livefuse/engines/fetch.py": ("subprocess", "urllib.request", "http.client"),
}


def imported_modules(path: Path, root: Path) -> Iterator[tuple[int, list[str]]]:
    """For each import statement in `path` (a file of the package at `root`): its line and
    the dotted names it may import. `from a import b` may mean a or its submodule a.b;
    relative imports are resolved against the file's package."""
    package = list(path.relative_to(root.parent).parent.parts)
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, [alias.name]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, node.module] if node.module else base)
            yield node.lineno, [module, *(f"{module}.{a.name}" for a in node.names)]


def _within(name: str, module: str) -> bool:
    return name == module or name.startswith(module + ".")


def violations(layer: str, root: Path = PACKAGE) -> list[str]:
    found = []
    for path in sorted((root / layer).rglob("*.py")):
        where = path.relative_to(root.parent).as_posix()
        allowed = ALLOWED.get(where, ())
        forbidden = [m for m in FORBIDDEN[layer] if m not in allowed]
        for line, names in imported_modules(path, root):
            bad = next(
                (name for name in names for module in forbidden if _within(name, module)), None
            )
            if bad is not None:
                found.append(f"{where}:{line} imports {bad}")
    return found


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_nothing_it_must_not(layer: str) -> None:
    assert list((PACKAGE / layer).glob("*.py")), f"no sources under {PACKAGE / layer}"
    assert violations(layer) == []


def test_every_exception_names_a_file_that_exists() -> None:
    """A renamed or removed file must not leave its exception behind for another to use."""
    for where in ALLOWED:
        assert (PACKAGE.parent / where).is_file(), where


def test_the_check_sees_every_spelling_of_an_import(tmp_path: Path) -> None:
    """The walker must catch each form, or the test above proves nothing."""
    engines = tmp_path / "livefuse" / "engines"
    engines.mkdir(parents=True)
    (engines / "bad.py").write_text(
        "import os, asyncio\n"
        "import urllib.request as fetch\n"
        "from http import client\n"
        "from socket import create_connection\n"
        "from ..web import app\n"
        "from .. import stream\n"
        "from ..cli import main\n"
        "from . import fetch\n"
        "def later() -> None:\n"
        "    import subprocess\n"
        "import urllib.parse\n"
        "from livefuse.engines import registry\n"
        "from . import store\n"
    )
    assert [v.split(" imports ")[1] for v in violations("engines", tmp_path / "livefuse")] == [
        "asyncio",
        "urllib.request",
        "http.client",
        "socket",
        "livefuse.web",
        "livefuse.stream",
        "livefuse.cli",
        "livefuse.engines.fetch",
        "subprocess",
    ]


def test_the_fetch_exception_is_that_file_and_those_modules_only(tmp_path: Path) -> None:
    """engines/fetch.py may run pip and download, and nothing more; no other file may."""
    engines = tmp_path / "livefuse" / "engines"
    engines.mkdir(parents=True)
    networked = (
        "import subprocess\n"
        "import urllib.request\n"
        "import http.client\n"
        "import urllib.error\n"
        "import asyncio\n"
        "from livefuse.web import app\n"
    )
    (engines / "fetch.py").write_text(networked)
    (engines / "store.py").write_text(networked)
    assert violations("engines", tmp_path / "livefuse") == [
        "livefuse/engines/fetch.py:5 imports asyncio",
        "livefuse/engines/fetch.py:6 imports livefuse.web",
        "livefuse/engines/store.py:1 imports subprocess",
        "livefuse/engines/store.py:2 imports urllib.request",
        "livefuse/engines/store.py:3 imports http.client",
        "livefuse/engines/store.py:5 imports asyncio",
        "livefuse/engines/store.py:6 imports livefuse.web",
    ]


@pytest.mark.parametrize("layer", ["stream", "web"])
def test_only_the_cli_reaches_model_fetching(layer: str, tmp_path: Path) -> None:
    """Each spelling of importing engines.fetch, or the cli, from a layer below the cli."""
    package = tmp_path / "livefuse" / layer
    package.mkdir(parents=True)
    (package / "bad.py").write_text(
        "from livefuse.engines import fetch\n"
        "import livefuse.engines.fetch as pulling\n"
        "from ..engines.fetch import pull\n"
        "from livefuse.engines import store\n"
        "def later() -> None:\n"
        "    from livefuse.cli import models\n"
    )
    assert violations(layer, tmp_path / "livefuse") == [
        f"livefuse/{layer}/bad.py:1 imports livefuse.engines.fetch",
        f"livefuse/{layer}/bad.py:2 imports livefuse.engines.fetch",
        f"livefuse/{layer}/bad.py:3 imports livefuse.engines.fetch",
        f"livefuse/{layer}/bad.py:6 imports livefuse.cli",
    ]
