"""The CPU scheduler's swap workers: part of each batch's faces swapped in child processes.

On the CPU backend the swap stage is the engine's heaviest, and much of it is Python
holding the GIL: a second thread of the same process would mostly wait for the first.
A spawned child has an interpreter (and a core) of its own. `SwapPool` is the engine's
stage B helper: it splits a batch's faces into units that touch disjoint pixels (a
frame's faces grouped so that no two groups' swap regions overlap), keeps some units for
the engine's own thread and sends the rest to its children through shared memory: each
unit's box is copied into a frame-sized place there, the child swaps it in frame
coordinates (the same pixels the engine's thread would draw), and the swapped face
regions are copied back.

Only the mesh swapper's faces travel: inswapper, the face enhancer and the occlusion
parser read beyond a face's own surroundings, so batches that use them stay in-thread.
A child that dies, hangs or fails loses only its units of that batch (those faces go out
unswapped, counted as a swap error); a new child is started after a pause that doubles
with each failure in a row. After a few failures in a row (a model file broken on disk,
a child killed at every start) it is given up on, with one ERROR that says why, and its
share of the swaps runs in the engine's own thread from then on. While a child is
starting (loading its models), its share stays here too.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from livefuse.engines.swapper import SourceFace
from livefuse.engines.types import FaceMesh
from livefuse.stream.child_process import NO_REPLY, ChildProcess, SharedFrames, serve
from livefuse.stream.frames import FrameJob, TrackedFace

if TYPE_CHECKING:
    from livefuse.stream.engine import EngineSession

log = logging.getLogger(__name__)

# How far past its landmarks' box one mesh swap reads and writes, in face sizes: the
# reshape ring lies 0.35 of the oval's half-width beyond it, the blend box 0.08 of the
# size, the colour sample and the remap's interpolation a pixel or two more.
SWAP_REACH = 0.35
_REACH_PIXELS = 4
# A batch's swaps take milliseconds; a child this late is stuck, and every session waits
# on it: give up on it (its faces go out unswapped) and start another.
_ANSWER_TIMEOUT_S = 2.0
# Requests a child may have in flight: one being swapped, one being copied back.
_SLOTS_PER_CHILD = 2
# The smallest shared block made (four 720p frames); a block is only address space until
# its pages are written, and only the faces' boxes ever are.
_MIN_SLOT_BYTES = 4 * 1280 * 720 * 3
# Sources a child keeps (a session's source is sent once, then named by its key).
_SOURCES_KEPT = 64
# A child that failed is not started again for this long, doubled with each failure in a
# row up to the cap (a broken model file would otherwise respawn it every batch) ...
RESTART_PAUSE_S = 1.0
_RESTART_PAUSE_CAP_S = 30.0
# ... and not at all after this many failures in a row without a swap answered between.
MAX_FAILURES = 3


@dataclass(frozen=True)
class SwapUnit:
    """Faces of one frame whose swap regions touch no other unit's: swapped together, in
    order, on one worker. `box` (x1, y1, x2, y2) covers all their regions."""

    job: FrameJob
    faces: tuple[TrackedFace, ...]
    regions: tuple[tuple[int, int, int, int], ...]
    box: tuple[int, int, int, int]

    @property
    def cost(self) -> float:
        return float(sum(face.mesh.size**2 for face in self.faces))


def swap_region(mesh: FaceMesh, frame_shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """The pixels one mesh swap of this face may read or write, clipped to the frame."""
    height, width = frame_shape[:2]
    reach = mesh.size * SWAP_REACH + _REACH_PIXELS
    x1, y1, x2, y2 = mesh.box
    return (
        max(0, int(np.floor(x1 - reach))),
        max(0, int(np.floor(y1 - reach))),
        min(width, int(np.ceil(x2 + reach))),
        min(height, int(np.ceil(y2 + reach))),
    )


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def swap_units(job: FrameJob, faces: list[TrackedFace]) -> list[SwapUnit]:
    """`faces` of the job's frame grouped so that no two groups' regions overlap (a face
    joins every group it touches); each group keeps the faces' order."""
    assert job.image is not None
    regions = [swap_region(face.mesh, job.image.shape) for face in faces]
    group_of = list(range(len(faces)))

    def root(index: int) -> int:
        while group_of[index] != index:
            index = group_of[index]
        return index

    for i in range(len(faces)):
        for j in range(i + 1, len(faces)):
            if _overlap(regions[i], regions[j]):
                group_of[root(j)] = root(i)
    groups: dict[int, list[int]] = {}
    for index in range(len(faces)):
        groups.setdefault(root(index), []).append(index)
    units = []
    for members in groups.values():
        boxes = [regions[i] for i in members]
        box = (
            min(b[0] for b in boxes),
            min(b[1] for b in boxes),
            max(b[2] for b in boxes),
            max(b[3] for b in boxes),
        )
        units.append(
            SwapUnit(
                job=job,
                faces=tuple(faces[i] for i in members),
                regions=tuple(boxes),
                box=box,
            )
        )
    return units


class _SharedSlot:
    """A shared-memory block for one request's frames, grown when a batch needs more."""

    def __init__(self) -> None:
        self.memory: SharedMemory | None = None

    def array(self, size: int) -> np.ndarray:
        if self.memory is None or self.memory.size < size:
            self.free()
            self.memory = SharedMemory(create=True, size=max(size, _MIN_SLOT_BYTES))
        return np.ndarray((size,), dtype=np.uint8, buffer=self.memory.buf)

    @property
    def name(self) -> str:
        assert self.memory is not None
        return self.memory.name

    def free(self) -> None:
        if self.memory is not None:
            self.memory.close()
            self.memory.unlink()
            self.memory = None


class _FrameLayout:
    """Where each frame of a request lies in its slot: one after another, whole."""

    def __init__(self, units: list[SwapUnit]) -> None:
        self._places: dict[FrameJob, tuple[int, tuple[int, ...]]] = {}
        self.size = 0
        for unit in units:
            if unit.job not in self._places:
                assert unit.job.image is not None
                shape = unit.job.image.shape
                self._places[unit.job] = (self.size, shape)
                self.size += int(np.prod(shape))
        self.size = max(self.size, 1)

    def place(self, job: FrameJob) -> tuple[int, tuple[int, ...]]:
        """(offset, shape) of the job's frame in the slot."""
        return self._places[job]

    def frame(self, memory: np.ndarray, job: FrameJob) -> np.ndarray:
        offset, shape = self._places[job]
        return memory[offset : offset + int(np.prod(shape))].reshape(shape)


@dataclass
class _Request:
    """Units sent to a child in one message, waiting for its answer."""

    child: _SwapChild
    slot: _SharedSlot
    units: list[SwapUnit]
    layout: _FrameLayout
    generation: int
    """The child's start count when sent: a request to a child that has since been
    replaced gets no answer."""


class _SwapChild:
    """One child process, its shared-memory slots and the sources it holds.

    The engine's dispatching thread sends requests and its finishing thread receives the
    answers, in the order sent; two slots let the child work on one batch while the
    other's results are copied back (double buffering). `lock` guards the state both
    threads touch."""

    def __init__(
        self,
        *,
        models_dir: Path,
        index: int,
        restart_pause_s: float,
        max_failures: int,
        on_give_up: Callable[[_SwapChild], None],
    ) -> None:
        self.models_dir = models_dir
        self.index = index
        self.child: ChildProcess | None = None
        self.generation = 0
        self.failed_at = 0.0
        self.failures = 0
        """Failures in a row, without a swap answered between them."""
        self.last_error: str | None = None
        self.given_up = False
        self.stopped = False
        self._restart_pause_s = restart_pause_s
        self._max_failures = max_failures
        self._on_give_up = on_give_up
        self.lock = threading.Condition()
        self._free_slots = [_SharedSlot() for _ in range(_SLOTS_PER_CHILD)]
        self._all_slots = list(self._free_slots)
        self._sources: OrderedDict[int, SourceFace] = OrderedDict()
        self._pending_sources: list[tuple[Any, ...]] = []
        self.outstanding = 0.0
        """The cost of the units sent and not yet answered (read without the lock: a
        stale value only balances a batch a little less well)."""
        self.start()

    def start(self) -> None:
        with self.lock:
            self.child = ChildProcess(
                target=_child_main,
                args=(str(self.models_dir),),
                name=f"swap process {self.index}",
                process_name=f"livefuse-swap-{self.index}",
            )
            self.generation += 1
            self._sources.clear()
            self._pending_sources.clear()

    def available(self) -> bool:
        """Running and ready (models loaded); starts a replacement for a failed child
        once the pause is over. Never waits."""
        with self.lock:
            if self.stopped or self.given_up:
                return False
            if self.child is None or not self.child.running:
                if time.monotonic() - self.failed_at < self._pause():
                    return False
                log.info(
                    "event=swap_process_restart process=%d failures=%d", self.index, self.failures
                )
                self.start()
            assert self.child is not None
            try:
                return self.child.poll_ready()
            except RuntimeError as error:
                self._fail(error)
                return False

    def _pause(self) -> float:
        if self.failures == 0:
            return 0.0
        return min(self._restart_pause_s * 2 ** (self.failures - 1), _RESTART_PAUSE_CAP_S)

    def fail(self, error: BaseException) -> None:
        with self.lock:
            self._fail(error)

    def wait_ready(self) -> None:
        """Wait for a starting child to load its models (one that failed is left to
        `available` to restart)."""
        with self.lock:
            if self.child is None or not self.child.running:
                return
            try:
                self.child.ensure_started()
            except RuntimeError as error:
                self._fail(error)

    def _fail(self, error: BaseException) -> None:
        if self.stopped or self.given_up:  # ended on purpose: whoever waited just hears it
            return
        self.failures += 1
        self.last_error = str(error)
        self.failed_at = time.monotonic()
        if self.child is not None:
            self.child.stop()
        self._sources.clear()
        self._pending_sources.clear()
        self.lock.notify_all()
        if self.failures >= self._max_failures:
            self.given_up = True
            self._on_give_up(self)
        else:
            log.warning(
                "event=swap_process_failed process=%d failures=%d retry_in_s=%.1f error=%r",
                self.index,
                self.failures,
                self._pause(),
                self.last_error,
            )

    def send(self, units: list[SwapUnit], options: list[tuple[Any, ...]]) -> _Request:
        """Copy the units' pixels into a free slot (waiting for one) and send them.
        RuntimeError if the child is gone.

        Each frame gets a frame-sized place in the slot and only its units' boxes are
        copied there: the child swaps in frame coordinates, exactly as the engine's own
        thread would (shifted coordinates would round differently), and the pages of the
        block outside the boxes are never touched."""
        layout = _FrameLayout(units)
        with self.lock:
            while not self._free_slots:
                self.lock.wait()
            slot = self._free_slots.pop()
        try:
            memory = slot.array(layout.size)
            for unit in units:
                x1, y1, x2, y2 = unit.box
                layout.frame(memory, unit.job)[y1:y2, x1:x2] = unit.job.image[y1:y2, x1:x2]  # type: ignore[index]
            del memory
            requests = []
            for unit, unit_options in zip(units, options, strict=True):
                source = unit.job.source
                assert source is not None
                meshes = [(face.points, face.presence) for face in unit.faces]
                requests.append(
                    (layout.place(unit.job), self._source_key(source), meshes, unit_options)
                )
            with self.lock:
                if self.child is None:
                    raise RuntimeError(f"swap process {self.index} is not running")
                for message in self._pending_sources:
                    self.child.send(message)
                self._pending_sources.clear()
                self.child.send(("swap", slot.name, layout.size, requests))
                self.outstanding += sum(unit.cost for unit in units)
                return _Request(self, slot, units, layout, self.generation)
        except BaseException:
            self._release(slot)
            raise

    def receive(self, request: _Request) -> list[str | None]:
        """The child's answer to `request` (the oldest unanswered), its swapped face
        regions copied back into their frames; per unit, None or why it failed."""
        try:
            with self.lock:
                child = self.child
                if child is None or request.generation != self.generation:
                    raise _StaleRequest(f"swap process {self.index} was restarted")
            # Not under the lock: the dispatching thread may send meanwhile.
            errors: list[str | None] = child.receive(timeout=_ANSWER_TIMEOUT_S)
            with self.lock:
                self.failures = 0  # it works: a later failure starts the count afresh
            memory = request.slot.array(request.layout.size)
            for unit, error in zip(request.units, errors, strict=True):
                if error is None:
                    _copy_back(unit, request.layout.frame(memory, unit.job))
            del memory
            return errors
        finally:
            with self.lock:
                self.outstanding = max(0.0, self.outstanding - sum(u.cost for u in request.units))
            self._release(request.slot)

    def _release(self, slot: _SharedSlot) -> None:
        with self.lock:
            self._free_slots.append(slot)
            self.lock.notify_all()

    def _source_key(self, source: SourceFace) -> int:
        """The child's key for `source`, queueing it to be sent first if the child lacks
        it (sent with the request, under the lock)."""
        key = id(source)
        with self.lock:
            if key in self._sources:
                self._sources.move_to_end(key)
                return key
            if len(self._sources) >= _SOURCES_KEPT:
                old, _ = self._sources.popitem(last=False)
                self._pending_sources.append(("forget", old))
            # Held here so its id is not reused for another source while the child has it.
            self._sources[key] = source
            self._pending_sources.append(("source", key, source))
        return key

    def stop(self) -> None:
        """Stop the child for good (whoever waits for its answer hears it end)."""
        with self.lock:
            self.stopped = True
            if self.child is not None:
                self.child.close()

    def free(self) -> None:
        """Free the shared memory, once nothing reads or writes it any more."""
        for slot in self._all_slots:
            slot.free()


def _copy_back(unit: SwapUnit, swapped_frame: np.ndarray) -> None:
    """The unit's swapped face regions into its frame. Only the faces' own regions: the
    rest of the unit's box may hold pixels another worker has swapped since."""
    assert unit.job.image is not None
    for x1, y1, x2, y2 in unit.regions:
        unit.job.image[y1:y2, x1:x2] = swapped_frame[y1:y2, x1:x2]


def _child_main(conn: Connection, models_dir: str) -> None:
    import cv2

    from livefuse.engines.pipeline import FacePipeline
    from livefuse.engines.store import ModelStore

    # The pool's parallelism is its processes: OpenCV's own thread pool in each of them
    # would only oversubscribe the cores.
    cv2.setNumThreads(1)

    try:
        faces = FacePipeline.from_store(ModelStore(Path(models_dir)), threads=1)
    except Exception as error:
        serve(conn, lambda message: None, ready_error=f"cannot load the models: {error}")
        return
    frames = SharedFrames()
    sources: dict[int, SourceFace] = {}

    def handle(message: tuple[Any, ...]) -> Any:
        if message[0] == "source":
            _, key, source = message
            sources[key] = source
            return NO_REPLY  # the next swap's answer covers it
        if message[0] == "forget":
            sources.pop(message[1], None)
            return NO_REPLY
        _, name, size, requests = message
        memory = frames.frame(name, (size,))
        errors: list[str | None] = []
        try:
            for (offset, shape), key, meshes, (scale, shape_transfer) in requests:
                frame = memory[offset : offset + int(np.prod(shape))].reshape(shape)
                try:
                    for points, presence in meshes:
                        faces.swap_face_in_place(
                            frame,
                            sources[key],
                            FaceMesh(points=points, presence=presence),
                            scale=scale,
                            shape_transfer=shape_transfer,
                        )
                    errors.append(None)
                except Exception as error:  # this unit's faces go out unswapped
                    errors.append(f"{type(error).__name__}: {error}")
                finally:
                    del frame
        finally:
            del memory
        return errors

    try:
        serve(conn, handle)
    finally:
        frames.close()


class PoolSwaps:
    """A batch's swaps under way: the units sent to the swap processes, and the frames
    whose faces already failed; `wait` collects them."""

    def __init__(self, requests: list[_Request], failed: dict[FrameJob, str] | None = None) -> None:
        self._requests = requests
        self._failed: dict[FrameJob, str] = dict(failed or {})

    def fail(self, job: FrameJob, why: str) -> None:
        """A face of `job` failed (the first reason is kept)."""
        self._failed.setdefault(job, why)

    def wait(self) -> dict[FrameJob, str]:
        """Wait for every child's answer; the frames any of whose faces failed, with why."""
        for request in self._requests:
            try:
                errors = request.child.receive(request)
            except _StaleRequest as error:  # its child was replaced: the new one is fine
                errors = [str(error)] * len(request.units)
            except RuntimeError as error:
                request.child.fail(error)
                errors = [str(error)] * len(request.units)
            for unit, why in zip(request.units, errors, strict=True):
                if why:
                    self.fail(unit.job, why)
        return self._failed


class _StaleRequest(RuntimeError):
    """An answer was awaited from a child that has been replaced since the request."""


class SwapPool:
    """Child processes that swap part of each batch (see the module docstring)."""

    def __init__(
        self,
        *,
        models_dir: Path,
        processes: int,
        restart_pause_s: float = RESTART_PAUSE_S,
        max_failures: int = MAX_FAILURES,
    ) -> None:
        """`restart_pause_s` after a child's first failure (doubling with each one in a
        row), given up on after `max_failures` in a row."""
        if processes < 1:
            raise ValueError("a swap pool needs at least one process")
        self._given_up_lock = threading.Lock()
        self._reported = False
        self._children = [
            _SwapChild(
                models_dir=models_dir,
                index=i,
                restart_pause_s=restart_pause_s,
                max_failures=max_failures,
                on_give_up=self._gave_up,
            )
            for i in range(processes)
        ]
        # The child that last swapped each session's faces: sent there again when that
        # keeps the load even, its renders between landmark refits are at hand there
        # (MeshSwapper.warp keeps them).
        self._last_child: weakref.WeakKeyDictionary[EngineSession, int] = (
            weakref.WeakKeyDictionary()
        )

    def _gave_up(self, child: _SwapChild) -> None:
        """A child failed too often: said loudly once (the cause is nearly always the
        same for every child), then quietly for the others."""
        with self._given_up_lock:
            first, self._reported = not self._reported, True
        given_up = sum(1 for c in self._children if c.given_up)
        (log.error if first else log.warning)(
            "event=swap_process_given_up process=%d failures=%d given_up=%d/%d cause=%r: "
            "not started again; its share of the swaps runs in the engine's own thread",
            child.index,
            child.failures,
            given_up,
            len(self._children),
            child.last_error,
        )

    def problem(self) -> str | None:
        """What is wrong with the pool in words (children given up on), or None."""
        given_up = [child for child in self._children if child.given_up]
        if not given_up:
            return None
        return (
            f"{len(given_up)} of {len(self._children)} swap processes given up after "
            f"{given_up[0].failures} failures in a row ({given_up[0].last_error}); "
            "their swaps run in the engine's thread"
        )

    def starts(self) -> int:
        """Child processes started so far, restarts included."""
        return sum(child.generation for child in self._children)

    def processes(self) -> list[Any]:
        """The child processes running now (multiprocessing.Process objects)."""
        return [
            child.child.process
            for child in self._children
            if child.child is not None and child.child.process is not None
        ]

    def wait_ready(self) -> None:
        """Wait until every child has loaded its models (a bench's or a service's start,
        so the first frames are not all swapped in the engine's thread); a child that
        fails is logged and left to restart later."""
        for child in self._children:
            child.wait_ready()

    def start(
        self, units: list[SwapUnit], options: Callable[[SwapUnit], tuple[Any, ...]]
    ) -> tuple[PoolSwaps, list[SwapUnit]]:
        """Send the units to the ready children, shared by cost; returns the pending
        swaps and the units no child could take (none ready), for the caller to swap."""
        ready = [child for child in self._children if child.available()]
        if not ready:
            return PoolSwaps([]), units
        requests: list[_Request] = []
        leftover: list[SwapUnit] = []
        positions = {child.index: position for position, child in enumerate(ready)}
        preferred = [positions.get(self._last_child.get(unit.job.session, -1)) for unit in units]
        shares = balance(units, loads=[child.outstanding for child in ready], preferred=preferred)
        for child, share in zip(ready, shares, strict=True):
            for unit in share:
                self._last_child[unit.job.session] = child.index
            if not share:
                continue
            try:
                requests.append(child.send(share, [options(unit) for unit in share]))
            except Exception as error:  # the child, its memory or the message: do them here
                child.fail(error)
                leftover.extend(share)
        return PoolSwaps(requests), leftover

    def stop(self) -> None:
        """Stop every child; the shared memory stays until `close`."""
        for child in self._children:
            child.stop()

    def close(self) -> None:
        """Stop every child and free the shared memory. Safe to call twice."""
        self.stop()
        for child in self._children:
            child.free()


def balance(
    units: list[SwapUnit], *, loads: list[float], preferred: list[int | None]
) -> list[list[SwapUnit]]:
    """Units shared among workers by cost (face area), largest first to the least loaded,
    each worker starting from `loads` (the work it still has from earlier batches). A
    unit goes to its `preferred` worker instead when that one is behind the least loaded
    by less than the unit's own cost."""
    loads = list(loads)
    shares: list[list[SwapUnit]] = [[] for _ in loads]
    order = sorted(range(len(units)), key=lambda i: -units[i].cost)
    for index in order:
        unit, favourite = units[index], preferred[index]
        target = min(range(len(loads)), key=lambda w: loads[w])
        if favourite is not None and loads[favourite] <= loads[target] + unit.cost:
            target = favourite
        shares[target].append(unit)
        loads[target] += unit.cost
    return shares
