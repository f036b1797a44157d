"""The on-disk model cache: verify, hand out paths, and write what a pull produced.

Nothing here reaches the network. Fetching the pinned inputs is `livefuse.engines.fetch`;
it hands each fetched member to `convert_member` (see `livefuse.engines.registry` for what
each converter makes) and the result to `ModelStore.commit`, which writes it atomically
beside a sidecar `<file>.json` recording the produced file's sha256 and where it came from.
`path` checks a file against its sidecar before handing it out, and `verify` also checks
the graph's signature.

Every failure is a `ModelError` whose `str()` is one line naming the model and the fix.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import io
import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import onnx
from onnx.tools import update_model_dims

from livefuse import __version__
from livefuse.engines.registry import (
    MODELS,
    ModelSpec,
    OnnxSignature,
    OwnSource,
    PackageSource,
    PathSource,
    Source,
    TopologySignature,
)

ModelState = Literal["ok", "missing", "corrupt"]

_CHUNK = 1 << 20


class ModelError(Exception):
    """A model cannot be used or provisioned. `str()` is one line: what, and the fix."""


class UnknownModelError(ModelError):
    def __init__(self, name: str, known: Iterable[str]) -> None:
        super().__init__(f"unknown model {name!r} (known: {', '.join(sorted(known))})")
        self.name = name


class ModelMissingError(ModelError):
    def __init__(self, name: str, models_dir: Path, *, bring_your_own: bool = False) -> None:
        if bring_your_own:
            super().__init__(
                f"model {name!r} is not registered in {models_dir}: run "
                f"`livefuse models pull {name} --url URL` or `--path FILE` (see the README)"
            )
        else:
            super().__init__(
                f"model {name!r} is missing from {models_dir}: run `livefuse models pull {name}`"
            )
        self.name = name


class ModelCorruptError(ModelError):
    def __init__(self, name: str, path: Path, reason: str) -> None:
        super().__init__(
            f"model {name!r} at {path} is corrupt ({reason}): "
            f"run `livefuse models pull {name}` to replace it"
        )
        self.name = name
        self.reason = reason


class ModelPullError(ModelError):
    def __init__(self, name: str, reason: str) -> None:
        reason = " ".join(reason.split())  # keep the message on one line
        super().__init__(f"could not pull model {name!r}: {reason}")
        self.name = name
        self.reason = reason


@dataclass(frozen=True)
class ModelStatus:
    name: str
    state: ModelState
    path: Path
    detail: str = ""
    """Why the model is not ok (empty when it is)."""

    @property
    def ok(self) -> bool:
        return self.state == "ok"


@dataclass(frozen=True)
class ConvertedModel:
    """A model file made by `convert_member`, not yet in any store."""

    name: str
    path: Path
    versions: Mapping[str, str]
    """The tools the converter used and their versions, for the sidecar."""
    origin: Mapping[str, Any] | None = None
    """Where a bring-your-own file came from (`{"url": ...}` or `{"path": ...}`), for
    the sidecar; None for pinned sources, whose record is the pin itself."""


class ModelStore:
    """The models under one directory, checked against a registry of `ModelSpec`s."""

    def __init__(self, models_dir: Path, *, models: Mapping[str, ModelSpec] = MODELS) -> None:
        self._models_dir = Path(models_dir)
        self._models = models
        # sha256 of files already checked, keyed by what would change if they were rewritten.
        self._hashed: dict[tuple[str, int, int, int], str] = {}

    @property
    def models_dir(self) -> Path:
        return self._models_dir

    @property
    def models(self) -> Mapping[str, ModelSpec]:
        return self._models

    def spec(self, name: str) -> ModelSpec:
        try:
            return self._models[name]
        except KeyError:
            raise UnknownModelError(name, self._models) from None

    def file(self, name: str) -> Path:
        """Where the model lives, whether or not it is there."""
        return self._models_dir / self.spec(name).filename

    def sidecar(self, name: str) -> Path:
        return _sidecar_path(self.file(name))

    def record(self, name: str) -> dict[str, Any] | None:
        """The sidecar written when the model was pulled, or None if there is none."""
        try:
            value = json.loads(self.sidecar(name).read_text())
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    def path(self, name: str) -> Path:
        """The model's file, after checking it is there and matches its sidecar.

        Raises `ModelMissingError` or `ModelCorruptError`; never touches the network.
        """
        spec = self.spec(name)
        self._check_file(spec)
        return self.file(name)

    def status(self, name: str) -> ModelState:
        return self._verify_one(self.spec(name)).state

    def verify(self, names: Iterable[str] | None = None) -> dict[str, ModelStatus]:
        """Full check of each model: file, sha256 against its sidecar, source pins, and the
        produced file's signature (ONNX inputs/outputs, topology sizes)."""
        chosen = tuple(dict.fromkeys(names)) if names else tuple(self._models)
        specs = [self.spec(name) for name in chosen]  # every name checked before any work
        return {spec.name: self._verify_one(spec) for spec in specs}

    def commit(
        self, converted: ConvertedModel, *, sha256: str | None = None, move: bool = False
    ) -> Path:
        """Move a converted model into the store beside its sidecar, atomically.

        Replaces whatever was there; the caller has checked the converted file's signature
        (`convert_member` does). `sha256` saves hashing a large file again when the
        caller has just hashed it; `move` takes the file itself rather than a copy when it
        lies on the same filesystem.
        """
        spec = self.spec(converted.name)
        produced = converted.path
        digest = sha256 or sha256_file(produced)
        source = _source_record(spec.source)
        if isinstance(spec.source, OwnSource):
            source.update(converted.origin or {})
            source["sha256"] = digest
        record = {
            "name": spec.name,
            "file": spec.filename,
            "sha256": digest,
            "size": produced.stat().st_size,
            "source": source,
            "converter": {"name": spec.converter, "versions": dict(converted.versions)},
            "livefuse": __version__,
        }
        self._models_dir.mkdir(parents=True, exist_ok=True)
        target = self._models_dir / spec.filename
        with _staged(target) as staged_model, _staged(_sidecar_path(target)) as staged_record:
            if not (move and _move(produced, staged_model)):
                with open(produced, "rb") as src, open(staged_model, "wb") as dst:
                    while chunk := src.read(_CHUNK):
                        dst.write(chunk)
                    dst.flush()
                    os.fsync(dst.fileno())
            staged_record.write_text(json.dumps(record, indent=2) + "\n")
            for staged in (staged_model, staged_record):
                staged.chmod(0o644)  # mkstemp makes them private; models are not secret
            # The model first: a crash between the two leaves a file its old record (if
            # any) does not match, which reads as corrupt and is pulled again.
            os.replace(staged_model, target)
            os.replace(staged_record, _sidecar_path(target))
        return target

    # -- checking --------------------------------------------------------------------

    def _check_file(self, spec: ModelSpec) -> dict[str, Any]:
        """Existence, sidecar, size, sha256 and source pins; returns the sidecar."""
        path = self._models_dir / spec.filename
        if not path.is_file():
            raise ModelMissingError(
                spec.name, self._models_dir, bring_your_own=isinstance(spec.source, OwnSource)
            )
        record = self.record(spec.name)
        if record is None:
            raise ModelCorruptError(spec.name, path, "its record .json is missing or unreadable")
        stat = path.stat()
        if record.get("size") != stat.st_size:
            raise ModelCorruptError(
                spec.name, path, f"{stat.st_size} bytes, expected {record.get('size')}"
            )
        if (
            not _source_matches(record.get("source"), spec.source)
            or record.get("converter", {}).get("name") != spec.converter
        ):
            raise ModelCorruptError(
                spec.name, path, "it was made from another source than this livefuse pins"
            )
        if self._sha256_cached(path, stat) != record.get("sha256"):
            raise ModelCorruptError(spec.name, path, "sha256 does not match its record")
        return record

    def _sha256_cached(self, path: Path, stat: os.stat_result) -> str:
        key = (str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)
        digest = self._hashed.get(key)
        if digest is None:
            digest = sha256_file(path)
            self._hashed[key] = digest
        return digest

    def _verify_one(self, spec: ModelSpec) -> ModelStatus:
        path = self._models_dir / spec.filename
        try:
            self._check_file(spec)
        except ModelMissingError:
            return ModelStatus(spec.name, "missing", path, "not pulled")
        except ModelCorruptError as error:
            return ModelStatus(spec.name, "corrupt", path, error.reason)
        problem = check_signature(path, spec)
        if problem:
            return ModelStatus(spec.name, "corrupt", path, problem)
        return ModelStatus(spec.name, "ok", path)


# -- signature checks -------------------------------------------------------------------


def check_signature(path: Path, spec: ModelSpec) -> str:
    """Why the produced file does not match `spec.signature`, or "" if it does."""
    signature = spec.signature
    try:
        if isinstance(signature, OnnxSignature):
            return _check_onnx(path, signature)
        if isinstance(signature, TopologySignature):
            return _check_topology(path, signature)
    except Exception as error:  # any failure to parse a cached file means it is unusable
        return f"cannot read it: {type(error).__name__}: {error}"
    return ""


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [
        d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
        for d in value.type.tensor_type.shape.dim
    ]


def _check_onnx(path: Path, signature: OnnxSignature) -> str:
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    groups = (
        ("input", [v for v in graph.input if v.name not in initializers], signature.inputs),
        ("output", list(graph.output), signature.outputs),
    )
    for role, actual, expected in groups:
        actual_names = [v.name for v in actual]
        if role == "output" and signature.extra_outputs:
            actual, actual_names = actual[: len(expected)], actual_names[: len(expected)]
        if len(actual) != len(expected) or any(
            t.name is not None and t.name != got
            for t, got in zip(expected, actual_names, strict=True)
        ):
            wanted = [t.name if t.name is not None else _shape_text(t.shape) for t in expected]
            return f"{role}s are {actual_names}, expected {wanted}"
        for value, tensor in zip(actual, expected, strict=True):
            dims = _dims(value)
            fits = len(dims) == tensor.rank and all(
                want is None or (isinstance(want, str) and not isinstance(got, int)) or got == want
                for got, want in zip(dims, tensor.shape, strict=True)
            )
            if not fits:
                return (
                    f"{role} {value.name!r} has shape {dims}, expected {_shape_text(tensor.shape)}"
                )
    if signature.last_initializer is not None:
        last = tuple(graph.initializer[-1].dims) if graph.initializer else None
        if last != signature.last_initializer:
            return (
                f"its last initializer has shape {list(last) if last is not None else None}, "
                f"expected {list(signature.last_initializer)}"
            )
    return ""


def _shape_text(shape: tuple[int | str | None, ...]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _check_topology(path: Path, signature: TopologySignature) -> str:
    data = json.loads(path.read_text())
    triangles = data["triangles"]
    if len(triangles) != signature.triangles:
        return f"{len(triangles)} triangles, expected {signature.triangles}"
    for triangle in triangles:
        if len(triangle) != 3 or len(set(triangle)) != 3:
            return f"triangle {triangle} is not three distinct vertices"
        if not all(isinstance(v, int) and 0 <= v < signature.vertices for v in triangle):
            return f"triangle {triangle} has a vertex outside 0..{signature.vertices - 1}"
    connections = data["connections"]
    for name in signature.connections:
        edges = connections.get(name)
        if not edges:
            return f"connection list {name!r} is missing"
        for edge in edges:
            if len(edge) != 2 or not all(0 <= v < signature.vertices for v in edge):
                return f"connection {name!r} has a bad edge {edge}"
    return ""


# -- converting ------------------------------------------------------------------------


def convert_member(spec: ModelSpec, member: bytes, work: Path) -> ConvertedModel:
    """Run `spec`'s converter on the fetched member's bytes and check what it made.

    `work` is a directory of the caller's for this conversion alone; the produced file is
    left in it. Raises `ModelPullError` when the converter fails or its output does not
    match `spec.signature`.
    """
    produced = work / spec.filename
    try:
        versions = _CONVERTERS[spec.converter](member, produced, work)
    except ModelError:
        raise
    except Exception as error:  # a converter failing on a pinned input is a bug to report
        raise ModelPullError(
            spec.name, f"converter {spec.converter!r} failed: {type(error).__name__}: {error}"
        ) from error
    problem = check_signature(produced, spec)
    if problem:
        raise ModelPullError(spec.name, f"converted file is not as expected: {problem}")
    return ConvertedModel(spec.name, produced, versions)


# -- converters -------------------------------------------------------------------------
# Each takes the member's bytes, writes the produced file at `dst` (scratch space of its
# own in `work`) and returns the versions of the tools it used, for the sidecar.


def _convert_copy(member: bytes, dst: Path, work: Path) -> dict[str, str]:
    dst.write_bytes(member)
    return {}


def _convert_centerface_dynamic(member: bytes, dst: Path, work: Path) -> dict[str, str]:
    """CenterFace as exported is fixed at a 10x3x32x32 input; free batch and size.

    Its initializers are also listed as graph inputs (old exporters did that), which makes
    ONNX Runtime treat every weight as overridable: it warns per weight and cannot fold
    constants. Drop them from the inputs, drop weights no node reads (BatchNorm's
    num_batches_tracked), and drop the value_info recorded for the fixed shape.
    """
    model = onnx.load_from_string(member)
    graph = model.graph
    weights = {i.name for i in graph.initializer}
    _drop_unused_initializers(graph)
    kept_inputs = [v for v in graph.input if v.name not in weights]
    del graph.input[:]
    graph.input.extend(kept_inputs)
    del graph.value_info[:]
    model = update_model_dims.update_inputs_outputs_dims(
        model,
        {"input.1": ["B", 3, "H", "W"]},
        {
            "537": ["B", 1, "h", "w"],
            "538": ["B", 2, "h", "w"],
            "539": ["B", 2, "h", "w"],
            "540": ["B", 10, "h", "w"],
        },
    )
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(dst))
    return {"onnx": onnx.__version__}


def _convert_tflite2onnx(member: bytes, dst: Path, work: Path) -> dict[str, str]:
    """TFLite -> ONNX with tflite2onnx, then a free batch dimension.

    The converted graphs are fixed at batch 1; the only ops that spell the batch out are
    Reshapes to [1, -1, ...], which become [0, -1, ...] (0 copies the input's dimension).
    """
    import tflite2onnx  # heavy, and only needed here

    src = work / "model.tflite"
    src.write_bytes(member)
    converted = work / "converted.onnx"
    with _quiet_logger("tflite2onnx"), contextlib.redirect_stdout(io.StringIO()):
        tflite2onnx.convert(str(src), str(converted))
    model = onnx.load(str(converted))
    _free_batch_dimension(model)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(dst))
    return {
        "tflite2onnx": metadata.version("tflite2onnx"),
        "tflite": metadata.version("tflite"),
        "onnx": onnx.__version__,
    }


def _free_batch_dimension(model: onnx.ModelProto) -> None:
    graph = model.graph
    for value in [*graph.input, *graph.output]:
        dim = value.type.tensor_type.shape.dim[0]
        dim.Clear()
        dim.dim_param = "B"
    initializers = {i.name: i for i in graph.initializer}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    freed: dict[str, str] = {}  # shape initializer -> its batch-free copy
    for node in graph.node:
        if node.op_type != "Reshape" or node.input[1] not in initializers:
            continue
        original = node.input[1]
        if original not in freed:
            shape = onnx.numpy_helper.to_array(initializers[original]).copy()
            if shape.ndim != 1 or shape.size == 0 or shape[0] != 1:
                continue
            shape[0] = 0
            if readers[original] == 1:
                initializers[original].CopyFrom(onnx.numpy_helper.from_array(shape, original))
                continue
            # Other nodes read it too: this and later Reshapes get a copy of their own.
            freed[original] = f"{original}__free_batch"
            graph.initializer.append(onnx.numpy_helper.from_array(shape, freed[original]))
        node.input[1] = freed[original]
    _drop_unused_initializers(graph)
    del graph.value_info[:]


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    """ONNX Runtime warns about each weight no node reads; leave none.

    The rest are sorted by name: tflite2onnx emits them in set order, and a stable order
    makes the produced file the same bytes on every pull.
    """
    used = {name for node in graph.node for name in node.input}
    kept = sorted((i for i in graph.initializer if i.name in used), key=lambda i: i.name)
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _convert_facemesh_topology(member: bytes, dst: Path, work: Path) -> dict[str, str]:
    """MediaPipe's face_mesh_connections.py -> triangles and named contours, as JSON.

    The module is parsed, never imported. FACEMESH_TESSELATION is written as a frozenset
    of a list whose order matters: 852 triangles, each as three edges (a,b),(b,c),(c,a).
    """
    tree = ast.parse(member.decode("utf-8"))
    lists: dict[str, list[tuple[int, int]]] = {}
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1):
            continue
        target, value = node.targets[0], node.value
        if (
            isinstance(target, ast.Name)
            and isinstance(value, ast.Call)
            and isinstance(value.func, ast.Name)
            and value.func.id == "frozenset"
            and len(value.args) == 1
            and isinstance(value.args[0], ast.List)
        ):
            lists[target.id] = [tuple(edge) for edge in ast.literal_eval(value.args[0])]

    edges = lists["FACEMESH_TESSELATION"]
    if len(edges) % 3:
        raise ValueError(f"FACEMESH_TESSELATION has {len(edges)} edges, not a multiple of 3")
    triangles = []
    for i in range(0, len(edges), 3):
        (a, b), (b2, c), (c2, a2) = edges[i : i + 3]
        if (b, c, a) != (b2, c2, a2):
            raise ValueError(f"edges {edges[i : i + 3]} at {i} do not close a triangle")
        triangles.append([a, b, c])

    from livefuse.engines.registry import FACEMESH_CONNECTIONS

    connections = {
        name: [list(edge) for edge in lists[f"FACEMESH_{name.upper()}"]]
        for name in FACEMESH_CONNECTIONS
    }
    payload = {"vertices": 468, "triangles": triangles, "connections": connections}
    dst.write_text(json.dumps(payload, separators=(",", ":")) + "\n")
    return {"python": ".".join(map(str, sys.version_info[:3]))}


_CONVERTERS: dict[str, Callable[[bytes, Path, Path], dict[str, str]]] = {
    "copy": _convert_copy,
    "centerface_dynamic": _convert_centerface_dynamic,
    "tflite2onnx": _convert_tflite2onnx,
    "facemesh_topology": _convert_facemesh_topology,
}


# -- helpers ----------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _sidecar_path(model_file: Path) -> Path:
    return model_file.with_name(model_file.name + ".json")


def _source_record(source: Source) -> dict[str, Any]:
    if isinstance(source, PackageSource):
        dist = source.distribution
        return {
            "kind": "package",
            "package": dist.package,
            "version": dist.version,
            "filename": dist.filename,
            "sha256": dist.sha256,
            "member": source.member,
            "member_sha256": source.member_sha256,
        }
    if isinstance(source, PathSource):
        return {"kind": "path", "path": str(source.path), "sha256": source.sha256}
    if isinstance(source, OwnSource):
        return {"kind": "own"}
    return {"kind": "url", "url": source.url, "sha256": source.sha256}


def _source_matches(recorded: object, source: Source) -> bool:
    """Whether a sidecar's source record is one this build accepts for `source`.

    A pinned source must be recorded exactly; a bring-your-own file may have come from
    anywhere, but where public files are pinned its sha256 must be one of theirs.
    """
    if not isinstance(source, OwnSource):
        return recorded == _source_record(source)
    if not isinstance(recorded, dict) or recorded.get("kind") != "own":
        return False
    return not source.pinned_sha256 or recorded.get("sha256") in source.pinned_sha256


def _move(src: Path, dst: Path) -> bool:
    """Rename `src` onto `dst`; False (and nothing moved) across filesystems."""
    try:
        os.replace(src, dst)
    except OSError:
        return False
    return True


@contextlib.contextmanager
def _staged(target: Path) -> Iterator[Path]:
    """A temp path beside `target` (same filesystem, so os.replace is atomic), removed
    unless it was moved into place."""
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    os.close(fd)
    staged = Path(name)
    try:
        yield staged
    finally:
        staged.unlink(missing_ok=True)


@contextlib.contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
