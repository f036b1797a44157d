"""The layering rule from DESIGN.md, checked on the source: `web` imports `stream` imports
`engines`, never the other way; `engines` has no asyncio and no networking; `stream` has no
HTTP. Every import statement counts, including ones inside functions."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "livefuse"

_HTTP = ("aiohttp", "urllib.request", "http.client", "http.server", "requests", "httpx")
_NETWORK = (*_HTTP, "asyncio", "socket", "subprocess", "urllib3", "aiortc")

# Layer -> modules (and their submodules) its files must not import. `stream` runs aiortc
# tracks on asyncio (DESIGN.md), so only HTTP and the web layer are kept out of it.
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "engines": (*_NETWORK, "livefuse.stream", "livefuse.web"),
    "stream": (*_HTTP, "livefuse.web"),
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


def violations(layer: str, root: Path = PACKAGE) -> list[str]:
    found = []
    for path in sorted((root / layer).rglob("*.py")):
        for line, names in imported_modules(path, root):
            bad = next(
                (
                    name
                    for name in names
                    for forbidden in FORBIDDEN[layer]
                    if name == forbidden or name.startswith(forbidden + ".")
                ),
                None,
            )
            if bad is not None:
                found.append(f"{path.relative_to(root.parent)}:{line} imports {bad}")
    return found


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_nothing_it_must_not(layer: str) -> None:
    assert list((PACKAGE / layer).glob("*.py")), f"no sources under {PACKAGE / layer}"
    assert violations(layer) == []


def test_the_check_sees_every_spelling_of_an_import(tmp_path: Path) -> None:
    """The walker must catch each form, or the test above proves nothing."""
    engines = tmp_path / "livefuse" / "engines"
    engines.mkdir(parents=True)
    (engines / "bad.py").write_text(
        "import os, asyncio\n"
        "import urllib.request as fetch\n"
        "from http import client\n"
        "from socket import create_connection\n"
        "from ..web import cli\n"
        "from .. import stream\n"
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
        "subprocess",
    ]
