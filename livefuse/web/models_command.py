"""`livefuse models list|pull|verify`."""

from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn
from rich.table import Table

from livefuse.engines.registry import PackageSource
from livefuse.engines.store import ModelStatus, ModelStore
from livefuse.settings import Settings
from livefuse.web.model_pull import PullEvent, pull

_STATE_STYLE = {"ok": "green", "missing": "yellow", "corrupt": "red"}


def run(args: argparse.Namespace, settings: Settings) -> int:
    store = ModelStore(settings.models_dir)
    if args.models_command == "list":
        return list_models(store)
    if args.models_command == "pull":
        return pull_models(store, args.names)
    if args.models_command == "verify":
        return verify_models(store, args.names)
    raise ValueError(f"unknown models command {args.models_command!r}")


def _console(*, stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    # Off a terminal rich assumes 80 columns and would wrap model names mid-word.
    return Console(file=stream, width=None if stream.isatty() else 200, highlight=False)


def list_models(store: ModelStore) -> int:
    table = Table()
    for column in ("name", "kind", "state", "size", "licence", "source"):
        table.add_column(column, no_wrap=True)
    for name, status in store.verify().items():
        spec = store.spec(name)
        size = _human_size(status.path.stat().st_size) if status.path.is_file() else "-"
        source = spec.source.describe()
        if isinstance(spec.source, PackageSource):
            source = f"{source} {spec.source.member}"
        style = _STATE_STYLE[status.state]
        table.add_row(name, spec.kind, f"[{style}]{status.state}[/]", size, spec.licence, source)
    out = _console()
    out.print(f"models in {store.models_dir}", markup=False)
    out.print(table)
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
    statuses = store.verify(names or None)
    out = _console()
    for status in statuses.values():
        out.print(_verify_line(status), markup=False)
    return 0 if all(status.ok for status in statuses.values()) else 1


def _verify_line(status: ModelStatus) -> str:
    if status.ok:
        return f"ok       {status.name}: {status.path}"
    return (
        f"{status.state:<8} {status.name}: {status.detail} "
        f"(run `livefuse models pull {status.name}`)"
    )


def _human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"
