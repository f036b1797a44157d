"""Inference runtimes behind one small interface.

Every model family (detector, landmarker, ...) holds an `Engine` and calls `run` with
named float32 arrays; which runtime executes the graph is decided once, at set-up.
The CPU implementation is ONNX Runtime tuned for latency: one frame at a time, so a
small intra-op pool, no inter-op parallelism, every graph optimisation on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | str | None, ...]


class Engine(Protocol):
    """A loaded model graph: named arrays in, named arrays out."""

    @property
    def inputs(self) -> tuple[TensorSpec, ...]: ...

    @property
    def outputs(self) -> tuple[TensorSpec, ...]: ...

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...


class OnnxRuntimeEngine:
    """ONNX Runtime on the CPU execution provider."""

    def __init__(self, model_path: Path, *, threads: int = 1) -> None:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        # Spinning threads burn the cores the other pipeline stage needs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        self._session = ort.InferenceSession(
            str(model_path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._inputs = tuple(TensorSpec(i.name, tuple(i.shape)) for i in self._session.get_inputs())
        self._outputs = tuple(
            TensorSpec(o.name, tuple(o.shape)) for o in self._session.get_outputs()
        )
        self._output_names = [o.name for o in self._outputs]

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self._inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self._outputs

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return list(self._session.run(self._output_names, feeds))
