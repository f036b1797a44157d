"""Running a pipeline's stages side by side, latest frame wins, memory bounded.

`ThreadedScheduler` gives each stage its own worker thread (ONNX Runtime, OpenCV and
NumPy release the GIL in their heavy loops, so two stages use two cores). Frames enter
through a single slot: a frame submitted while the first stage is busy replaces the one
waiting there (the replaced frame is counted as dropped), so a slow pipeline drops frames
instead of falling behind. Between stages sits a one-frame hand-off; a stage that finishes
while the next is busy waits, so at most one frame per stage plus one per slot is alive.

The interface (`submit`, `close`, the counters, `on_output`) is what the GPU path's
CUDA-stream scheduler provides too, so sessions and the bench do not care which runs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

from livefuse.stream.realtime import FrameInput, FrameJob, ProcessedFrame, RealtimePipeline

log = logging.getLogger(__name__)

OutputCallback = Callable[[ProcessedFrame], None]


class Scheduler(Protocol):
    submitted: int
    dropped: int

    def submit(
        self, frame: FrameInput, *, timestamp: float, tag: object = None, block: bool = False
    ) -> None: ...

    def close(self) -> None: ...


class _Slot:
    """Holds at most one job. `put(replace=True)` swaps out a waiting job instead of waiting."""

    def __init__(self) -> None:
        self._job: FrameJob | None = None
        self._closed = False
        self._changed = threading.Condition()

    def put(self, job: FrameJob, *, replace: bool) -> FrameJob | None:
        """Place `job`; returns the job it replaced (replace=True) or waits for room."""
        with self._changed:
            if replace:
                replaced, self._job = self._job, job
                self._changed.notify_all()
                return replaced
            while self._job is not None and not self._closed:
                self._changed.wait()
            self._job = job
            self._changed.notify_all()
            return None

    def wait_empty(self) -> None:
        """Wait until the job here has been taken (or the slot is closed)."""
        with self._changed:
            while self._job is not None and not self._closed:
                self._changed.wait()

    def take(self) -> FrameJob | None:
        """The next job, waiting for one; None once closed."""
        with self._changed:
            while self._job is None and not self._closed:
                self._changed.wait()
            if self._closed:
                return None
            job, self._job = self._job, None
            self._changed.notify_all()
            return job

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()


class ThreadedScheduler:
    def __init__(
        self,
        pipeline: RealtimePipeline,
        *,
        on_output: OutputCallback,
        name: str = "livefuse",
    ) -> None:
        self.pipeline = pipeline
        self._on_output = on_output
        self.submitted = 0
        self.dropped = 0
        self._dropped_since_output = 0
        self._counts_lock = threading.Lock()
        stages = pipeline.stages
        # slots[i] feeds stage i; the first one is where frames arrive (latest wins).
        self._slots = [_Slot() for _ in stages]
        self._workers = [
            threading.Thread(
                target=self._run_stage, args=(i,), name=f"{name}-{stage_name}", daemon=True
            )
            for i, (stage_name, _) in enumerate(stages)
        ]
        self._closed = False
        for worker in self._workers:
            worker.start()

    def submit(
        self, frame: FrameInput, *, timestamp: float, tag: object = None, block: bool = False
    ) -> None:
        """Hand a frame in. A frame still waiting from before is dropped (latest wins).

        `block=True` first waits for the first stage to take the waiting frame, so none
        is dropped: how the bench feeds frames as fast as the pipeline takes them.
        """
        if self._closed:
            raise RuntimeError("the scheduler is closed")
        if block:
            self._slots[0].wait_empty()
        job = self.pipeline.new_job(
            frame, timestamp=timestamp, tag=tag, submitted=time.perf_counter()
        )
        replaced = self._slots[0].put(job, replace=True)
        with self._counts_lock:
            self.submitted += 1
            if replaced is not None:
                self.dropped += 1
                self._dropped_since_output += 1

    def close(self) -> None:
        """Stop the workers; frames in flight are discarded. Safe to call twice."""
        self._closed = True
        for slot in self._slots:
            slot.close()
        for worker in self._workers:
            if worker is not threading.current_thread():
                worker.join(timeout=5)

    def _run_stage(self, position: int) -> None:
        stage_name, stage = self.pipeline.stages[position]
        is_last = position == len(self._slots) - 1
        while True:
            job = self._slots[position].take()
            if job is None:
                return
            try:
                job = stage(job)
            except Exception as error:  # the frame goes on unswapped, counted by stage
                log.debug("stage %s failed on frame %d", stage_name, job.index, exc_info=True)
                self._emit(self.pipeline.passthrough(job, stage_name, error))
                continue
            if is_last:
                self._emit(self._finish(job))
            else:
                self._slots[position + 1].put(job, replace=False)

    def _finish(self, job: FrameJob) -> ProcessedFrame | None:
        with self._counts_lock:
            dropped, self._dropped_since_output = self._dropped_since_output, 0
        try:
            return self.pipeline.finish(job, dropped=dropped)
        except Exception as error:
            return self.pipeline.passthrough(job, "finish", error)

    def _emit(self, output: ProcessedFrame | None) -> None:
        if output is None:
            return
        try:
            self._on_output(output)
        except Exception:  # a consumer's bug must not stop the stream; say it loudly
            log.exception("the output callback failed on frame %d", output.stats.index)
