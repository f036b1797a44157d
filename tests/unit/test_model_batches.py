"""Batched forwards and the engines' resources: a batch of N gives what N batches of one
give, through graphs with a free batch axis and graphs fixed to one frame (most public
exports); engines close once and refuse to run after; input buffers are reused per
shape and kept apart per thread; a pipeline frees the engines it loaded."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from livefuse.engines import ops as cpu_ops
from livefuse.engines.backend import select_backend
from livefuse.engines.detector import CenterFaceDetector
from livefuse.engines.identity import ArcFaceEmbedder, IdentitySwapper, InSwapper, read_emap
from livefuse.engines.landmarks import FaceMeshLandmarker, FaceRegion
from livefuse.engines.pipeline import FacePipeline
from livefuse.engines.restore import FaceEnhancer, FaceParser
from livefuse.engines.runtime import (
    EngineClosedError,
    InputBuffers,
    OnnxRuntimeEngine,
    run_batched,
)
from livefuse.engines.scrfd import SCRFDDetector
from livefuse.engines.store import ModelStore
from livefuse.engines.swapper import MeshSwapper
from livefuse.engines.topology import MeshTopology
from tests.own_models import (
    make_arcface,
    make_codeformer,
    make_enhancer,
    make_face_parser,
    make_inswapper,
    make_scrfd,
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("batches")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(7)


def _crops(rng: np.random.Generator, count: int, size: int) -> list[np.ndarray]:
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(count)]


def test_arcface_embeds_a_batch_as_it_embeds_each_face(
    folder: Path, rng: np.random.Generator
) -> None:
    embedder = ArcFaceEmbedder(OnnxRuntimeEngine(make_arcface(folder / "arcface.onnx")))
    crops = _crops(rng, 3, 112)
    batch = embedder.embed_batch(crops)
    assert batch.shape == (3, 512) and batch.dtype == np.float32
    for crop, row in zip(crops, batch, strict=True):
        np.testing.assert_allclose(row, embedder.embed_crop(crop), rtol=0, atol=1e-5)
    assert np.abs(batch[0] - batch[1]).max() > 1e-3  # not one face three times


def test_graphs_fixed_to_one_frame_take_a_batch(folder: Path, rng: np.random.Generator) -> None:
    inswapper_file = make_inswapper(folder / "inswapper.onnx")
    swapper = InSwapper(OnnxRuntimeEngine(inswapper_file), read_emap(inswapper_file))
    crops = _crops(rng, 3, 128)
    latents = np.concatenate([swapper.latent(rng.standard_normal(512)) for _ in range(3)])
    faces = swapper.swap_batch(crops, latents)
    for crop, latent, face in zip(crops, latents, faces, strict=True):
        assert np.array_equal(face, swapper.swap_crop(crop, latent[None]))
        assert face.flags.c_contiguous

    crops = _crops(rng, 2, 512)
    for enhancer in (
        FaceEnhancer(OnnxRuntimeEngine(make_enhancer(folder / "gfpgan.onnx"))),
        FaceEnhancer(OnnxRuntimeEngine(make_codeformer(folder / "codeformer.onnx"))),
    ):
        restored = enhancer.enhance_batch(crops)
        for crop, face in zip(crops, restored, strict=True):
            assert np.array_equal(face, enhancer.enhance_crop(crop))
            assert face.flags.c_contiguous
    parser = FaceParser(OnnxRuntimeEngine(make_face_parser(folder / "parser.onnx")))
    classes = parser.classes_batch(crops)
    assert classes.shape == (2, 512, 512) and classes.dtype == np.uint8
    for crop, row in zip(crops, classes, strict=True):
        assert np.array_equal(row, parser.classes(crop))


def test_scrfd_detects_a_batch_of_frames_as_each_alone(
    folder: Path, astronaut_bgr: np.ndarray, group_bgr: np.ndarray
) -> None:
    detector = SCRFDDetector(OnnxRuntimeEngine(make_scrfd(folder / "scrfd.onnx")))
    frames = [astronaut_bgr, group_bgr, astronaut_bgr[::-1].copy()]
    batch = detector.detect_batch(frames, max_side=320)
    for frame, found in zip(frames, batch, strict=True):
        alone = detector.detect(frame, max_side=320)
        assert len(found) == len(alone) > 0
        for a, b in zip(found, alone, strict=True):
            assert np.array_equal(a.box, b.box) and a.score == b.score
            assert np.array_equal(a.keypoints, b.keypoints)


def test_scrfd_with_a_free_batch_axis_runs_frames_of_one_size_in_one_pass(
    folder: Path, astronaut_bgr: np.ndarray
) -> None:
    """Exports with a free batch axis still give rows without it, frame after frame."""
    fixed = make_scrfd(folder / "scrfd_fixed.onnx")
    model = onnx.load(str(fixed))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    free = folder / "scrfd_free.onnx"
    onnx.save(model, str(free))
    detector = SCRFDDetector(OnnxRuntimeEngine(free))
    assert detector.forward(np.zeros((2, 3, 64, 64), np.float32))[0].shape[:2] == (2, 128)
    frames = [astronaut_bgr, np.ascontiguousarray(astronaut_bgr[:, ::-1])]
    reference = SCRFDDetector(OnnxRuntimeEngine(fixed))
    for found, frame in zip(detector.detect_batch(frames, max_side=320), frames, strict=True):
        alone = reference.detect(frame, max_side=320)
        assert len(found) == len(alone) > 0
        for a, b in zip(found, alone, strict=True):
            np.testing.assert_allclose(a.box, b.box, atol=1e-3)


def _doubler(path: Path, batch: int) -> Path:
    """x (batch, 3) -> 2x: a graph fixed to `batch` rows."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["y"])],
        "doubler",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])],
        [numpy_helper.from_array(np.float32(2).reshape(()), "two")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_run_batched_chunks_and_pads_for_a_fixed_batch(folder: Path) -> None:
    engine = OnnxRuntimeEngine(_doubler(folder / "doubler.onnx", 2))
    rows = np.arange(15, dtype=np.float32).reshape(5, 3)
    (doubled,) = run_batched(engine, {"x": rows})
    assert np.array_equal(doubled, rows * 2)
    (one,) = run_batched(engine, {"x": rows[:1]})
    assert np.array_equal(one, rows[:1] * 2)


def test_an_engine_closes_once_and_refuses_to_run_after(folder: Path) -> None:
    path = _doubler(folder / "closing.onnx", 1)
    engine = OnnxRuntimeEngine(path)
    engine.close()
    engine.close()  # idempotent
    with pytest.raises(EngineClosedError, match="closing.onnx"):
        engine.run({"x": np.zeros((1, 3), dtype=np.float32)})


def test_input_buffers_are_reused_per_shape_and_kept_apart_per_thread() -> None:
    buffers = InputBuffers(np, shapes_kept=2)
    first = buffers.batch("x", 2, (3, 4))
    assert first.shape == (2, 3, 4) and first.dtype == np.float32
    assert np.shares_memory(buffers.batch("x", 2, (3, 4)), first)
    grown = buffers.batch("x", 5, (3, 4))
    assert grown.shape == (5, 3, 4) and not np.shares_memory(grown, first)
    assert np.shares_memory(buffers.batch("x", 1, (3, 4)), grown)  # the grown one is kept
    assert not np.shares_memory(buffers.batch("x", 2, (3, 8)), grown)
    buffers.batch("y", 1, (3, 4))  # a third shape: the least recently used one goes
    assert not np.shares_memory(buffers.batch("x", 1, (3, 4)), grown)

    mine = buffers.batch("z", 1, (4,))
    theirs: list[np.ndarray] = []
    worker = threading.Thread(target=lambda: theirs.append(buffers.batch("z", 1, (4,))))
    worker.start()
    worker.join()
    assert not np.shares_memory(mine, theirs[0])


def test_a_pipeline_from_the_store_closes_every_engine_it_loaded(
    model_store: ModelStore, astronaut_bgr: np.ndarray
) -> None:
    backend = select_backend("cpu", threads=1)
    pipeline = FacePipeline.from_store(model_store, backend=backend)
    assert pipeline.ops is backend.ops is cpu_ops
    assert pipeline.find_faces(astronaut_bgr)
    region = FaceRegion.from_detection(pipeline.face_detector.detect(astronaut_bgr)[0])
    pipeline.close()
    pipeline.close()  # idempotent
    with pytest.raises(EngineClosedError):
        pipeline.face_detector.detect(astronaut_bgr)
    with pytest.raises(EngineClosedError):
        pipeline.landmarker.landmarks(astronaut_bgr, [region])


def test_a_pipeline_made_from_parts_leaves_their_engines_open(
    model_store: ModelStore, astronaut_bgr: np.ndarray
) -> None:
    detector = CenterFaceDetector(OnnxRuntimeEngine(model_store.path("centerface")))
    pipeline = FacePipeline(
        detector=detector,
        landmarker=FaceMeshLandmarker(OnnxRuntimeEngine(model_store.path("face_landmark"))),
        swapper=MeshSwapper(MeshTopology.load(model_store.path("facemesh_topology"))),
    )
    pipeline.close()
    assert pipeline.find_faces(astronaut_bgr)


def test_the_identity_swapper_loads_through_a_backend_and_closes_both_models(
    folder: Path, rng: np.random.Generator
) -> None:
    identity = IdentitySwapper.from_files(
        embedder=make_arcface(folder / "id_arcface.onnx"),
        swapper=make_inswapper(folder / "id_inswapper.onnx"),
        backend=select_backend("cpu", threads=1),
    )
    crop = _crops(rng, 1, 112)[0]
    assert identity.embedder.embed_crop(crop).shape == (512,)
    identity.close()
    with pytest.raises(EngineClosedError):
        identity.embedder.embed_crop(crop)
    with pytest.raises(EngineClosedError):
        identity.swapper.swap_crop(_crops(rng, 1, 128)[0], np.zeros((1, 512), np.float32))
