"""Starting the process's one frame engine with the models the settings name, warmed up.

`livefuse serve` and `livefuse relay` both start here: the first inference of each model
allocates and plans, and the swap processes load their models, so both are paid for
before the first viewer would notice.
"""

from __future__ import annotations

import numpy as np

from livefuse.engines.backend import Backend
from livefuse.engines.pipeline import FacePipeline
from livefuse.engines.store import ModelStore
from livefuse.settings import Settings
from livefuse.stream.engine import FrameEngine


def load_pipeline(settings: Settings, *, backend: Backend) -> FacePipeline:
    """The face models the settings name (ModelError when one is missing or damaged)."""
    return FacePipeline.from_store(
        ModelStore(settings.models_dir),
        backend=backend,
        swapper=settings.swapper,
        detector=settings.detector,
        enhancer=settings.enhancer,
        occlusion=settings.occlusion,
    )


def start_engine(pipeline: FacePipeline, settings: Settings) -> FrameEngine:
    """A running engine over `pipeline`, warmed up; closed again if the warm-up fails."""
    engine = FrameEngine(faces=pipeline, swap_processes=settings.resolved_swap_processes)
    try:
        frame = np.full((720, 1280, 3), 128, np.uint8)
        warm_up = engine.open_session(detect_in_background=False)
        try:
            warm_up.process(frame, timestamp=0.0)
        finally:
            warm_up.close()
        pipeline.find_faces(frame)
        engine.wait_ready()
        engine.restart_quality()
    except BaseException:
        engine.close()  # its threads and swap processes, not left behind
        raise
    return engine
