"""Failures are loud (issue 18, item 4): a swap process that cannot start is retried with
a growing pause, given up on after a few tries with one ERROR that says why; a stage
that fails on every frame is one ERROR and the engine's problem; a session's stats say
why its frames pass through. Real models, real child processes, a real model file
broken on disk."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from livefuse.engines.pipeline import FacePipeline
from livefuse.engines.store import ModelStore
from livefuse.settings import Settings
from livefuse.stream.engine import FrameEngine
from livefuse.stream.health import StageHealth
from livefuse.stream.swap_pool import SwapPool


@pytest.fixture
def broken_models(settings: Settings, tmp_path: Path) -> Path:
    """A copy of the model cache whose landmark model was overwritten after the fact
    (a disk fault, a bad sync): what a swap process started later has to load."""
    models = tmp_path / "models"
    shutil.copytree(settings.models_dir, models)
    landmarks = models / "face_landmark.onnx"
    landmarks.write_bytes(b"\0" * landmarks.stat().st_size)
    return models


def test_a_swap_process_that_cannot_start_is_given_up_with_one_error(
    broken_models: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Was: respawned every 5 s for ever (32 children in 12 s before that), a WARNING
    each time and never an ERROR."""
    caplog.set_level(logging.INFO, logger="livefuse.stream.swap_pool")
    pool = SwapPool(models_dir=broken_models, processes=1, restart_pause_s=0.05, max_failures=3)
    try:
        deadline = time.monotonic() + 120
        while pool.problem() is None:
            assert time.monotonic() < deadline, "the swap process was never given up on"
            # What the engine does each batch: ask for ready children (none here).
            pending, leftover = pool.start([], lambda unit: ())
            assert leftover == [] and pending.wait() == {}
            time.sleep(0.05)
        assert pool.starts() == 3
        problem = pool.problem()
        assert problem is not None and "cannot load the models" in problem, problem
        # Given up: however long the engine keeps asking, no child is started again.
        for _ in range(20):
            pool.start([], lambda unit: ())
            time.sleep(0.02)
        assert pool.starts() == 3 and pool.processes() == []
    finally:
        pool.close()
    records = [r for r in caplog.records if r.name == "livefuse.stream.swap_pool"]
    errors = [r for r in records if r.levelno == logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in records]
    message = errors[0].getMessage()
    assert "failures=3" in message and "cannot load the models" in message, message
    warnings = [r for r in records if r.levelno == logging.WARNING]
    assert [("failures=1" in r.getMessage(), "failures=2" in r.getMessage()) for r in warnings] == [
        (True, False),
        (False, True),
    ]


@pytest.fixture(scope="module")
def engine(settings: Settings) -> Iterator[FrameEngine]:
    faces = FacePipeline.from_store(ModelStore(settings.models_dir), threads=1)
    engine = FrameEngine(faces=faces)
    yield engine
    engine.close()
    faces.close()


def test_a_stage_failing_on_every_frame_is_one_error_and_the_engines_problem(
    engine: FrameEngine, caplog: pytest.LogCaptureFixture
) -> None:
    """Was: frames passed through with only a per-session count; nothing logged, and
    /readyz (which reads `health.problem()`) said 200."""
    caplog.set_level(logging.INFO, logger="livefuse.stream.health")
    session = engine.open_session()
    try:
        # A frame the engine cannot read as BGR pixels (one channel): it fails in the
        # engine's first stage and goes out as it came in.
        unreadable = np.full((120, 160), 90, np.uint8)
        for index in range(engine.health.threshold + 5):
            output = session.process(unreadable, timestamp=index / 30)
            assert output is not None and output.stats.error is not None
        assert session.passthrough is not None and session.passthrough.startswith("to_array:")
        problem = engine.health.problem()
        assert problem is not None and "to_array" in problem, problem
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1 and "stage=to_array" in errors[0].getMessage(), errors

        good = np.full((120, 160, 3), 90, np.uint8)
        output = session.process(good, timestamp=1.0)
        assert output is not None and output.stats.error is None
    finally:
        session.close()
    assert session.passthrough is None  # the reason goes with the failures
    assert engine.health.problem() is None
    recovered = [r for r in caplog.records if "stage_recovered" in r.getMessage()]
    assert len(recovered) == 1 and recovered[0].levelno == logging.WARNING


def test_stage_health_counts_failures_in_a_row_only() -> None:
    health = StageHealth(threshold=3)
    for _ in range(2):
        health.failed("swap", "SwapFailed: boom")
    health.succeeded("swap")  # one frame swapped: the count starts again
    health.failed("swap", "SwapFailed: boom")
    assert health.problem() is None
    health.failed("swap", "SwapFailed: boom")
    health.failed("swap", "SwapFailed: bang")
    assert health.failing() == {"swap": "failed on the last 3 frames: SwapFailed: bang"}
    health.succeeded("track")  # another stage's success says nothing of this one
    assert health.problem() is not None
