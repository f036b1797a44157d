"""Inference runtimes behind one small interface.

Every model family (detector, landmarker, ...) holds an `Engine` and calls `run` with
named float32 arrays; which runtime executes the graph is decided once, at set-up
(`backend.select_backend`). An engine owns its runtime session and frees it on `close`.
The CPU implementation is ONNX Runtime tuned for latency: a small intra-op pool, no
inter-op parallelism, every graph optimisation on.

`run_batched` runs a batch through a graph exported for a fixed smaller batch (many
public exports take exactly one), and `InputBuffers` holds a family's input batches,
allocated once per shape.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

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

    def close(self) -> None:
        """Free the runtime's resources; idempotent. `run` raises EngineClosedError after."""
        ...


class EngineClosedError(RuntimeError):
    """A model graph was run after its engine was closed."""


class OnnxRuntimeEngine:
    """ONNX Runtime on the CPU execution provider."""

    def __init__(self, model_path: Path, *, threads: int = 1) -> None:
        self.model_path = model_path
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        # Spinning threads burn the cores the other pipeline stage needs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        self._session: ort.InferenceSession | None = ort.InferenceSession(
            str(model_path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        session = self._session
        self._inputs = tuple(TensorSpec(i.name, tuple(i.shape)) for i in session.get_inputs())
        self._outputs = tuple(TensorSpec(o.name, tuple(o.shape)) for o in session.get_outputs())
        self._output_names = [o.name for o in self._outputs]

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self._inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self._outputs

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        session = self._session
        if session is None:
            raise EngineClosedError(f"the model {self.model_path.name} was closed")
        return list(session.run(self._output_names, feeds))

    def close(self) -> None:
        # ONNX Runtime frees a session's memory and threads when its last reference goes.
        self._session = None


def fixed_batch(spec: TensorSpec) -> int | None:
    """The batch size a graph input is fixed to, or None when it takes any."""
    size = spec.shape[0] if spec.shape else None
    return size if isinstance(size, int) and size > 0 else None


def run_batched(
    engine: Engine,
    batched: Mapping[str, np.ndarray],
    shared: Mapping[str, np.ndarray] | None = None,
) -> list[np.ndarray]:
    """The graph's outputs for a batch (the `batched` inputs' first axis; the `shared`
    ones are fed whole to every run). A graph fixed to a smaller batch runs it in chunks
    of that size (the last padded with zeros) and its outputs, which must carry the batch
    axis first, are joined; otherwise it is one run."""
    count = len(next(iter(batched.values())))
    specs = {spec.name: spec for spec in engine.inputs}
    sizes = [fixed_batch(specs[name]) for name in batched]
    chunk = min((size for size in sizes if size is not None), default=count)
    if chunk == count:
        return engine.run({**batched, **(shared or {})})
    parts: list[list[np.ndarray]] = []
    for start in range(0, count, chunk):
        feeds = {}
        for name, array in batched.items():
            part = array[start : start + chunk]
            if len(part) < chunk:
                padding = np.zeros((chunk - len(part), *part.shape[1:]), dtype=part.dtype)
                part = np.concatenate([part, padding])
            feeds[name] = part
        parts.append(engine.run({**feeds, **(shared or {})}))
    return [np.concatenate(outputs)[:count] for outputs in zip(*parts, strict=True)]


class InputBuffers:
    """A model family's input batches, allocated once per shape and reused, so per-frame
    work only fills them.

    One set per thread (threading.local): the same model serves the frame engine's worker
    and the thread preparing a new source at once, and a shared buffer would let one
    overwrite the other's batch while it runs. A batch of N is a view of the first N rows
    of a buffer grown to the largest N seen; the most recent few item shapes are kept
    (a detector's input size follows the frame's).
    """

    def __init__(self, xp: ModuleType = np, *, shapes_kept: int = 4) -> None:
        self._xp = xp
        self._shapes_kept = shapes_kept
        self._local = threading.local()

    def batch(
        self, name: str, count: int, item_shape: tuple[int, ...], dtype: Any = np.float32
    ) -> Any:
        """A (count, *item_shape) array of `dtype` for input `name`, contents undefined."""
        buffers: dict[tuple[str, tuple[int, ...], Any], Any] | None = getattr(
            self._local, "buffers", None
        )
        if buffers is None:
            buffers = self._local.buffers = {}
        key = (name, item_shape, np.dtype(dtype))
        buffer = buffers.pop(key, None)
        if buffer is None or len(buffer) < count:
            buffer = self._xp.empty((count, *item_shape), dtype=dtype)
        buffers[key] = buffer  # most recently used last
        while len(buffers) > self._shapes_kept:
            del buffers[next(iter(buffers))]
        return buffer[:count]
