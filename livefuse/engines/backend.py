"""Backends: which runtime runs the model graphs and which array library does the pixel work.

`select_backend("auto" | "cpu" | "cuda")` is the one factory every command and the
service go through (`--backend`). A `Backend` loads a model file into an inference
`Engine` (engines/runtime.py) and names the `ops` module its pixel work goes through
(engines/ops.py on the CPU). The CUDA backend is not built yet: asking for it fails with
`BackendUnavailable`, one line a person can act on; `auto` picks the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from livefuse.engines import ops as cpu_ops
from livefuse.engines.ops_protocol import Ops
from livefuse.engines.runtime import Engine, OnnxRuntimeEngine

BackendChoice = Literal["auto", "cpu", "cuda"]
BACKEND_CHOICES: tuple[BackendChoice, ...] = get_args(BackendChoice)


class BackendUnavailable(RuntimeError):
    """The backend asked for cannot run here; the message says why and what to use."""


@dataclass(frozen=True)
class Backend:
    name: Literal["cpu", "cuda"]
    threads: int = 1
    """Intra-op threads per loaded model."""

    def load(self, model_path: Path) -> Engine:
        """The model graph at `model_path`, ready to run batches; the caller closes it."""
        return OnnxRuntimeEngine(model_path, threads=self.threads)

    @property
    def ops(self) -> Ops:
        """The module the pixel work goes through, over arrays this backend's models take
        (engines/ops.py: OpenCV and NumPy)."""
        return cpu_ops


def select_backend(choice: str, *, threads: int = 1) -> Backend:
    """The backend for `--backend CHOICE`; BackendUnavailable when it cannot run here."""
    if choice not in BACKEND_CHOICES:
        raise BackendUnavailable(
            f"unknown backend {choice!r}: use one of {', '.join(BACKEND_CHOICES)}"
        )
    if choice == "cuda":
        raise BackendUnavailable(
            "the cuda backend is not available in this build yet; use --backend cpu (or auto)"
        )
    return Backend(name="cpu", threads=threads)
