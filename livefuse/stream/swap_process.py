"""A second worker for the swap stage: some of a frame's faces are swapped in a child process.

A frame's latency is its tracking plus its swap, and the swap (about 4 ms a face on this
CPU, mostly Python holding the GIL) is the larger part with several faces in view. Faces
far enough apart touch disjoint pixels, so they can be swapped side by side: the frame is
copied into shared memory, the child swaps its share of the faces there while this
process swaps the rest in the same buffer, and the result is copied out. Threads would
not help (the GIL); a process does.

Only the mesh swapper's faces are split: with inswapper, the enhancer or the occlusion
parser the regions a face reads and writes reach further, and the stage runs as before.
If the child dies or fails, `finish` raises (the scheduler passes the frame through
unswapped and counts it) and the next frame starts a new child.
"""

from __future__ import annotations

import logging
import multiprocessing
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Any

import numpy as np

from livefuse.engines.swapper import SourceFace
from livefuse.engines.types import FaceMesh

log = logging.getLogger(__name__)

_START_TIMEOUT_S = 60.0
_SWAP_TIMEOUT_S = 10.0


class SwapProcess:
    def __init__(self, *, models_dir: Path) -> None:
        self.models_dir = models_dir
        self._context = multiprocessing.get_context("spawn")
        self._process: Any = None
        self._conn: Connection | None = None
        self._memory: SharedMemory | None = None
        self._source_sent: SourceFace | None = None
        self._pending = False
        self._start()

    def frame_buffer(self, shape: tuple[int, ...]) -> np.ndarray:
        """A uint8 array of `shape` in the memory the child swaps in (reused per frame)."""
        size = int(np.prod(shape))
        if self._memory is None or self._memory.size < size:
            self._free_memory()
            self._memory = SharedMemory(create=True, size=size)
        return np.ndarray(shape, dtype=np.uint8, buffer=self._memory.buf)

    def begin(
        self,
        source: SourceFace,
        meshes: list[FaceMesh],
        *,
        shape: tuple[int, ...],
        scale: float,
        shape_transfer: bool,
    ) -> None:
        """Start swapping `meshes` into the frame buffer (of `shape`); `finish` waits."""
        if self._conn is None:
            self._start()
        assert self._conn is not None and self._memory is not None
        try:
            if source is not self._source_sent:
                self._conn.send(("source", source))
                self._source_sent = source
            faces = [(mesh.points, mesh.presence) for mesh in meshes]
            self._conn.send(("swap", self._memory.name, shape, faces, scale, shape_transfer))
        except (OSError, ValueError) as error:
            self._stop_child()
            raise RuntimeError(f"swap process failed: {error}") from None
        self._pending = True

    def finish(self) -> None:
        """Wait until the child has swapped its faces; raises if it could not."""
        if not self._pending:
            return
        self._pending = False
        assert self._conn is not None
        try:
            if not self._conn.poll(_SWAP_TIMEOUT_S):
                raise TimeoutError(f"no answer in {_SWAP_TIMEOUT_S:g} s")
            status, payload = self._conn.recv()
        except (OSError, EOFError, TimeoutError) as error:
            self._stop_child()
            raise RuntimeError(f"swap process failed: {error or type(error).__name__}") from None
        if status == "error":
            raise RuntimeError(f"swap process: {payload}")

    def close(self) -> None:
        """Stop the child and free the shared frame. Safe to call twice."""
        if self._conn is not None:
            try:
                self._conn.send(("close",))
            except (OSError, ValueError):
                pass
        self._stop_child()
        self._free_memory()

    def _start(self) -> None:
        parent_end, child_end = self._context.Pipe()
        process = self._context.Process(
            target=_child_main,
            args=(child_end, str(self.models_dir)),
            name="livefuse-swap",
            daemon=True,
        )
        process.start()
        child_end.close()
        self._process, self._conn = process, parent_end
        self._source_sent = None
        parent_end.send(("ping",))
        self._pending = True
        try:
            if not parent_end.poll(_START_TIMEOUT_S):
                raise TimeoutError("the swap process did not start")
            self._pending = False
            status, payload = parent_end.recv()
        except (OSError, EOFError, TimeoutError) as error:
            self._pending = False
            self._stop_child()
            raise RuntimeError(f"swap process failed to start: {error}") from None
        if status == "error":
            self._stop_child()
            raise RuntimeError(f"swap process: {payload}")

    def _stop_child(self) -> None:
        conn, process = self._conn, self._process
        self._conn = self._process = None
        self._source_sent = None
        self._pending = False
        if conn is not None:
            conn.close()
        if process is not None:
            process.join(timeout=2)
            if process.is_alive():
                process.kill()
                process.join(timeout=2)

    def _free_memory(self) -> None:
        if self._memory is not None:
            self._memory.close()
            self._memory.unlink()
            self._memory = None


def _child_main(conn: Connection, models_dir: str) -> None:
    from livefuse.engines.pipeline import FacePipeline
    from livefuse.engines.store import ModelStore

    try:
        faces = FacePipeline.from_store(ModelStore(Path(models_dir)), threads=1)
    except Exception as error:
        conn.send(("error", f"cannot load the models: {error}"))
        return
    source: SourceFace | None = None
    attached: dict[str, SharedMemory] = {}
    try:
        while True:
            try:
                message = conn.recv()
            except EOFError:
                return
            kind = message[0]
            if kind == "close":
                return
            if kind == "source":  # no reply: the next swap's answer covers it
                source = message[1]
                continue
            try:
                if kind == "swap":
                    _swap(message, faces, source, attached)
                conn.send(("ok", None))
            except Exception as error:
                conn.send(("error", f"{type(error).__name__}: {error}"))
    finally:
        for memory in attached.values():
            memory.close()


def _swap(
    message: tuple[Any, ...],
    faces: Any,
    source: SourceFace | None,
    attached: dict[str, SharedMemory],
) -> None:
    _, name, shape, meshes, scale, shape_transfer = message
    if source is None:
        raise RuntimeError("no source face was sent")
    if name not in attached:
        for old in attached.values():
            old.close()
        attached.clear()
        # The spawned child shares the parent's resource tracker; the parent unlinks.
        attached[name] = SharedMemory(name=name)
    frame = np.ndarray(shape, dtype=np.uint8, buffer=attached[name].buf)
    try:
        for points, presence in meshes:
            faces.swap_face_in_place(
                frame,
                source,
                FaceMesh(points=points, presence=presence),
                scale=scale,
                shape_transfer=shape_transfer,
            )
    finally:
        del frame
