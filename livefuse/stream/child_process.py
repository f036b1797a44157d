"""A worker process of the CPU scheduler (stream/swap_pool.py): requests over a pipe,
frames in shared memory.

Much of the swap runs in Python with the GIL held, so threads of one process mostly take
turns; a spawned child has an interpreter (and a core) of its own. `ChildProcess` is the
parent's side: it starts the child without waiting for it (children load their models
side by side), says when it is ready, sends requests and turns every failure (the child
died, hung, or raised) into a `RuntimeError`, after which a fresh child can be started.
The frames travel in `SharedMemory` blocks the parent owns (`SharedFrames` is the child's
view of them); `serve` is the child's side.

Spawned, not forked: the parent runs threads (aiortc, the engine's workers) that a fork
would copy mid-flight. Spawn re-imports the main module, so a script that builds a pipeline
with children needs the usual `if __name__ == "__main__":` guard.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import numpy as np

# Loading models in a fresh interpreter takes a second or two; allow for a busy machine.
START_TIMEOUT_S = 60.0

Handler = Callable[[tuple[Any, ...]], Any]


class ChildProcess:
    def __init__(
        self, *, target: Callable[..., None], args: tuple[Any, ...], name: str, process_name: str
    ) -> None:
        self.name = name
        """How errors name it ("tracker process")."""
        self.process_name = process_name
        self._target, self._args = target, args
        self._context = multiprocessing.get_context("spawn")
        self.process: Any = None
        self._conn: Connection | None = None
        self._ready = False
        self.launch()

    @property
    def running(self) -> bool:
        return self._conn is not None

    def launch(self) -> None:
        """Start the child; it says it is ready (models loaded) by answering a ping."""
        parent_end, child_end = self._context.Pipe()
        process = self._context.Process(
            target=self._target,
            args=(child_end, *self._args),
            name=self.process_name,
            daemon=True,
        )
        process.start()
        child_end.close()
        self.process, self._conn, self._ready = process, parent_end, False
        self.send(("ping",))

    def ensure_started(self) -> None:
        """Wait for the child to load its models and answer (RuntimeError if it could
        not). A child that has been stopped is not started again here."""
        if self._conn is None:
            raise RuntimeError(f"{self.name} is not running")
        if not self._ready:
            self.receive(timeout=START_TIMEOUT_S)
            self._ready = True

    def poll_ready(self) -> bool:
        """Whether the child has loaded its models and answered; never waits. Raises
        RuntimeError if it failed to start."""
        if self._conn is None:
            return False
        if not self._ready and self._conn.poll(0):
            self.receive(timeout=0)
            self._ready = True
        return self._ready

    def send(self, message: tuple[Any, ...]) -> None:
        if self._conn is None:
            raise RuntimeError(f"{self.name} is not running")
        try:
            self._conn.send(message)
        except (OSError, ValueError) as error:
            self.stop()
            raise RuntimeError(f"{self.name} failed: {error}") from None

    def receive(self, *, timeout: float) -> Any:
        """The answer to the oldest request within `timeout` seconds; RuntimeError if
        there is none to be had (the child is then stopped: killed at once if it is
        stuck, as a stuck child would only use up the grace a stopping one gets)."""
        if self._conn is None:
            raise RuntimeError(f"{self.name} is not running")
        try:
            if not self._conn.poll(timeout):
                raise TimeoutError(f"no answer in {timeout:g} s")
            status, payload = self._conn.recv()
        except (OSError, EOFError, TimeoutError) as error:
            # Gone or stuck: drop it; the next request starts a new one.
            self.stop(kill=isinstance(error, TimeoutError))
            raise RuntimeError(f"{self.name} failed: {error or type(error).__name__}") from None
        if status == "error":
            raise RuntimeError(f"{self.name}: {payload}")
        return payload

    def stop(self, *, kill: bool = False) -> None:
        """Stop the child: it gets 2 s to exit on its own unless `kill`."""
        conn, process = self._conn, self.process
        self._conn = self.process = None
        self._ready = False
        if conn is not None:
            conn.close()
        if process is not None:
            if kill:
                process.kill()
            process.join(timeout=2)
            if process.is_alive():
                process.kill()
                process.join(timeout=2)

    def close(self) -> None:
        """Stop the child. Safe to call twice."""
        if self._conn is not None:
            try:
                self._conn.send(("close",))
            except (OSError, ValueError):
                pass
        self.stop()


class SharedFrames:
    """The child's view of the parent's shared frame blocks (attached once each; the
    last few are kept, as a parent may take turns between blocks)."""

    _KEPT = 4

    def __init__(self) -> None:
        self._attached: dict[str, SharedMemory] = {}

    def frame(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in self._attached:
            while len(self._attached) >= self._KEPT:
                oldest = next(iter(self._attached))
                self._attached.pop(oldest).close()
            # A spawned child shares the parent's resource tracker, so attaching adds
            # nothing to clean up; the parent unlinks the block.
            self._attached[name] = SharedMemory(name=name)
        return np.ndarray(shape, dtype=np.uint8, buffer=self._attached[name].buf)

    def close(self) -> None:
        for memory in self._attached.values():
            memory.close()
        self._attached.clear()


def serve(conn: Connection, handle: Handler, *, ready_error: str | None = None) -> None:
    """The child's loop: answer each request with ("ok", result) or ("error", text)
    until told to close or the parent goes away. A request whose handler returns
    `NO_REPLY` is answered by the next one's reply instead."""
    if ready_error is not None:
        conn.send(("error", ready_error))
        return
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return  # the parent went away
        kind = message[0]
        if kind == "close":
            return
        try:
            result = None if kind == "ping" else handle(message)
        except Exception as error:  # the parent counts it and passes the frame through
            conn.send(("error", f"{type(error).__name__}: {error}"))
            continue
        if result is not NO_REPLY:
            conn.send(("ok", result))


NO_REPLY = object()
"""What a handler returns for a message that gets no answer of its own."""
