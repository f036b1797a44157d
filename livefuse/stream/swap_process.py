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

from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from livefuse.engines.swapper import SourceFace
from livefuse.engines.types import FaceMesh
from livefuse.stream.child_process import NO_REPLY, ChildProcess, SharedFrames, serve


class SwapProcess:
    def __init__(self, *, models_dir: Path) -> None:
        self.models_dir = models_dir
        self.child = ChildProcess(
            target=_child_main,
            args=(str(models_dir),),
            name="swap process",
            process_name="livefuse-swap",
        )
        self._source_sent: SourceFace | None = None
        self._pending = False

    def frame_buffer(self, shape: tuple[int, ...]) -> np.ndarray:
        """A uint8 array of `shape` in the memory the child swaps in (reused per frame)."""
        if self.child.ensure_started():
            self._source_sent = None
        return self.child.frame_buffer(shape)[0]

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
        if self.child.ensure_started():
            self._source_sent = None
        if source is not self._source_sent:
            self.child.send(("source", source))
            self._source_sent = source
        _, name = self.child.frame_buffer(shape)
        faces = [(mesh.points, mesh.presence) for mesh in meshes]
        self.child.send(("swap", name, shape, faces, scale, shape_transfer))
        self._pending = True

    def finish(self) -> None:
        """Wait until the child has swapped its faces; raises if it could not."""
        if self._pending:
            self._pending = False
            self.child.receive()

    def close(self) -> None:
        """Stop the child and free the shared frame. Safe to call twice."""
        self.child.close()


def _child_main(conn: Connection, models_dir: str) -> None:
    from livefuse.engines.pipeline import FacePipeline
    from livefuse.engines.store import ModelStore

    try:
        faces = FacePipeline.from_store(ModelStore(Path(models_dir)), threads=1)
    except Exception as error:
        serve(conn, lambda message: None, ready_error=f"cannot load the models: {error}")
        return
    frames = SharedFrames()
    current: list[SourceFace] = []

    def handle(message: tuple[Any, ...]) -> Any:
        if message[0] == "source":
            current[:] = [message[1]]
            return NO_REPLY  # the next swap's answer covers it
        _, name, shape, meshes, scale, shape_transfer = message
        if not current:
            raise RuntimeError("no source face was sent")
        frame = frames.frame(name, shape)
        try:
            for points, presence in meshes:
                faces.swap_face_in_place(
                    frame,
                    current[0],
                    FaceMesh(points=points, presence=presence),
                    scale=scale,
                    shape_transfer=shape_transfer,
                )
        finally:
            del frame
        return None

    try:
        serve(conn, handle)
    finally:
        frames.close()
