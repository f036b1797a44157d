"""`livefuse swap` with bring-your-own models: registered stand-ins with the public
files' signatures in a LIVEFUSE_HOME of their own, real photos, the real command."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import pytest

from livefuse.cli.main import main
from livefuse.engines import pipeline as pipeline_module
from livefuse.engines.fetch import register
from livefuse.engines.pipeline import FacePipeline, StageTimer
from livefuse.engines.registry import KNOWN_MODELS, MODELS, KnownFile, OwnSource
from livefuse.engines.scrfd import SCRFDDetector
from livefuse.engines.store import ModelStore
from livefuse.engines.types import Detection
from livefuse.stream.engine import FrameEngine
from tests.own_models import (
    make_arcface,
    make_enhancer,
    make_face_parser,
    make_inswapper,
    make_scrfd,
)

_MAKERS = {
    "inswapper_128": make_inswapper,
    "w600k_r50": make_arcface,
    "det_10g": make_scrfd,
    "gfpgan_1.4": make_enhancer,
    "face_parser": make_face_parser,
}


@pytest.fixture
def home(model_store: ModelStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A LIVEFUSE_HOME with the embedded models copied in and nothing of one's own.

    inswapper_128 is pinned to the public file's sha256, which no stand-in has: here it
    is accepted by signature, like the models that pin none.
    """
    home = tmp_path / "home"
    models = home / "models"
    models.mkdir(parents=True)
    for name in MODELS:
        shutil.copy2(model_store.path(name), models)
        shutil.copy2(model_store.sidecar(name), models)
    monkeypatch.setenv("LIVEFUSE_HOME", str(home))
    spec = KNOWN_MODELS["inswapper_128"]
    unpinned = dataclasses.replace(spec, source=OwnSource(known=(KnownFile(spec.filename),)))
    monkeypatch.setattr(
        pipeline_module, "KNOWN_MODELS", {**KNOWN_MODELS, "inswapper_128": unpinned}
    )
    return home


def bring(home: Path, *names: str) -> None:
    store = ModelStore(home / "models", models=pipeline_module.KNOWN_MODELS)
    for name in names:
        file = _MAKERS[name](home.parent / "brought" / f"{name}.onnx")
        register(store, name, path=file, downloads=home / "downloads")


def swap(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    code = main(["swap", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_swap_with_inswapper_enhancer_and_occlusion(
    capsys: pytest.CaptureFixture[str], home: Path, group_path: Path, astronaut_path: Path
) -> None:
    bring(home, "inswapper_128", "w600k_r50", "gfpgan_1.4", "face_parser")
    outputs = {}
    for label, extra in {
        "mesh": [],
        "inswapper": ["--swapper", "inswapper"],
        "everything": ["--swapper", "inswapper", "--enhancer", "gfpgan", "--occlusion"],
    }.items():
        output = home.parent / f"{label}.png"
        code, out, err = swap(
            capsys, "--source", group_path, "--target", astronaut_path, "--output", output, *extra
        )
        assert code == 0, err
        assert "swapped 1 face(s) in 1 image(s)" in out
        outputs[label] = cv2.imread(str(output)).astype(int)
    original = cv2.imread(str(astronaut_path)).astype(int)
    for label, result in outputs.items():
        assert np.abs(result - original).max() > 30, label
    assert np.abs(outputs["inswapper"] - outputs["mesh"]).max() > 30
    assert np.abs(outputs["everything"] - outputs["inswapper"]).max() > 10


def test_swap_with_an_unregistered_model_says_how_to_bring_it(
    capsys: pytest.CaptureFixture[str], home: Path, group_path: Path, astronaut_path: Path
) -> None:
    output = home.parent / "out.png"
    code, _, err = swap(
        capsys,
        "--source",
        group_path,
        "--target",
        astronaut_path,
        "--output",
        output,
        "--swapper",
        "inswapper",
    )
    assert code == 2
    assert err.count("\n") == 1
    assert "'w600k_r50' is not registered" in err
    assert "livefuse models pull w600k_r50 --url URL" in err
    assert not output.exists()


def test_scrfd_is_loaded_when_chosen(home: Path) -> None:
    bring(home, "det_10g")
    store = ModelStore(home / "models")
    pipeline = FacePipeline.from_store(store, threads=1, detector="scrfd")
    assert isinstance(pipeline.face_detector, SCRFDDetector)
    assert pipeline.detector is not pipeline.face_detector


def test_the_engine_runs_the_enhancer_only_at_the_top_level_and_in_its_own_thread(
    home: Path, hanks_bgr: np.ndarray, astronaut_bgr: np.ndarray
) -> None:
    bring(home, "gfpgan_1.4")
    faces = FacePipeline.from_store(ModelStore(home / "models"), threads=1, enhancer="gfpgan")
    source = faces.prepare_source(hanks_bgr).face
    # The enhancer reaches beyond a face's surroundings: its faces never go to the swap
    # processes, and the frames come out enhanced all the same.
    engine = FrameEngine(faces=faces, swap_processes=1)
    try:
        for quality, enhanced in (("high", True), ("fast", False)):
            faces.timer = StageTimer()
            session = engine.open_session(quality=quality, detect_in_background=False)
            session.source = source
            for index in range(3):
                output = session.process(astronaut_bgr, timestamp=index / 30)
                assert output is not None and output.stats.swapped == 1
            session.close()
            assert ("enhance" in faces.timer.counts) is enhanced, quality
    finally:
        engine.close()
        faces.close()


def test_the_engine_tracks_with_scrfd_when_chosen(
    home: Path, hanks_bgr: np.ndarray, astronaut_bgr: np.ndarray, model_store: ModelStore
) -> None:
    bring(home, "det_10g")
    faces = FacePipeline.from_store(ModelStore(home / "models"), threads=1, detector="scrfd")
    assert faces.detector_choice == "scrfd"
    # The stand-in SCRFD finds no real face: the source comes from the embedded detector.
    embedded = FacePipeline.from_store(model_store, threads=1)
    source = embedded.prepare_source(hanks_bgr).face
    embedded.close()
    calls = []
    detect_batch = faces.face_detector.detect_batch

    def counted(frames: Sequence[np.ndarray], *, max_side: int = 640) -> list[list[Detection]]:
        calls.append(len(frames))
        return detect_batch(frames, max_side=max_side)

    faces.face_detector.detect_batch = counted  # type: ignore[method-assign]
    engine = FrameEngine(faces=faces)
    try:
        for background in (False, True):
            session = engine.open_session(quality="fast", detect_in_background=background)
            session.source = source
            for index in range(3):
                output = session.process(astronaut_bgr, timestamp=index / 30)
                assert output is not None and output.stats.error is None
            session.close()
        # SCRFD ran on the engine's frames, in the foreground and in the background.
        assert len(calls) >= 2
    finally:
        engine.close()
        faces.close()


def test_the_service_prepares_uploaded_faces_for_inswapper_when_configured(
    home: Path, hanks_path: Path
) -> None:
    import json
    import urllib.request

    from livefuse.engines.identity import IdentityFace
    from livefuse.settings import Settings
    from tests.webrtc_peers import live_server

    bring(home, "inswapper_128", "w600k_r50")
    settings = Settings(home=home, swapper="inswapper")
    with live_server(settings) as live:
        request = urllib.request.Request(
            f"{live.base}/api/v1/sources",
            data=hanks_path.read_bytes(),
            headers={"Content-Type": "image/png"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 201
            source_id = json.loads(response.read())["id"]
        source = live.service.sources.get(source_id)
        assert source is not None and isinstance(source.face, IdentityFace)
