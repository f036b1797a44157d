"""Small ONNX graphs with the exact input/output signatures of the bring-your-own models.

No real weights are reachable here, so tests build stand-ins with onnx.helper: random
weights, but the same tensor ranks, sizes and order as the public files, and for
inswapper a real 512x512 `emap` as the graph's last initializer. What livefuse does
around a forward pass (crops, latents, decoding, paste-back) can then be checked against
InsightFace's own code on the same files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

_OPSET = 17
_IR_VERSION = 8


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)])
    model.ir_version = _IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def _weight(
    rng: np.random.Generator, name: str, shape: tuple[int, ...], scale: float
) -> onnx.TensorProto:
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def _const(name: str, values: list[int]) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


def make_inswapper(path: Path, *, seed: int = 0, emap_last: bool = True) -> Path:
    """target (B,3,128,128) RGB 0..1 and source (B,512) latent -> (B,3,128,128) 0..1.

    The output mixes the target (a 3x3 convolution) with a per-channel shift computed from
    the latent, so a wrong crop or a wrong latent both change it.
    """
    rng = np.random.default_rng(seed)
    conv_w = np.zeros((3, 3, 3, 3), dtype=np.float32)
    conv_w[np.arange(3), np.arange(3), 1, 1] = 2.0  # mostly the pixel itself...
    conv_w += rng.standard_normal(conv_w.shape).astype(np.float32) * 0.2  # ...plus some mixing
    initializers = [
        numpy_helper.from_array(conv_w, "conv_w"),
        _weight(rng, "latent_w", (512, 3), 0.5),
        _const("shift_shape", [-1, 3, 1, 1]),
        numpy_helper.from_array(np.float32(-1.0).reshape(()), "minus_one"),
    ]
    emap = numpy_helper.from_array(
        (rng.standard_normal((512, 512)) / np.sqrt(512)).astype(np.float32), "emap"
    )
    initializers = [*initializers, emap] if emap_last else [emap, *initializers]
    nodes = [
        helper.make_node("Conv", ["target", "conv_w"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("MatMul", ["source", "latent_w"], ["shift_flat"]),
        helper.make_node("Reshape", ["shift_flat", "shift_shape"], ["shift"]),
        helper.make_node("Add", ["conv", "shift"], ["mixed"]),
        helper.make_node("Add", ["mixed", "minus_one"], ["centred"]),
        helper.make_node("Sigmoid", ["centred"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes,
        "inswapper_standin",
        [
            helper.make_tensor_value_info("target", TensorProto.FLOAT, [1, 3, 128, 128]),
            helper.make_tensor_value_info("source", TensorProto.FLOAT, [1, 512]),
        ],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3, 128, 128])],
        initializers,
    )
    return _save(graph, path)


def make_arcface(path: Path, *, seed: int = 1) -> Path:
    """(B,3,112,112) RGB normalised to -1..1 -> (B,512) embedding (not normalised)."""
    rng = np.random.default_rng(seed)
    initializers = [
        _weight(rng, "conv_w", (8, 3, 8, 8), 0.1),
        _weight(rng, "fc_w", (8 * 14 * 14, 512), 0.05),
    ]
    nodes = [
        helper.make_node("Conv", ["input.1", "conv_w"], ["conv"], strides=[8, 8]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("Flatten", ["relu"], ["flat"]),
        helper.make_node("MatMul", ["flat", "fc_w"], ["683"]),
    ]
    graph = helper.make_graph(
        nodes,
        "arcface_standin",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["None", 3, 112, 112])],
        [helper.make_tensor_value_info("683", TensorProto.FLOAT, [1, 512])],
        initializers,
    )
    return _save(graph, path)


SCRFD_STRIDES = (8, 16, 32)


def make_scrfd(path: Path, *, seed: int = 2, score_bias: float = -1.0) -> Path:
    """det_10g's layout: (1,3,H,W) BGR-normalised -> for strides 8, 16, 32 the scores
    (N,1), then boxes (N,4), then keypoints (N,10), N = H/s * W/s * 2 anchors, each row
    an anchor, a cell's two anchors side by side, cells in row-major order."""
    rng = np.random.default_rng(seed)
    initializers: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    outputs: dict[str, list[str]] = {"score": [], "bbox": [], "kps": []}
    for stride in SCRFD_STRIDES:
        for head, width in (("score", 1), ("bbox", 4), ("kps", 10)):
            w = f"{head}{stride}_w"
            scale = 1.0 / (stride * np.sqrt(3.0))
            initializers.append(_weight(rng, w, (2 * width, 3, stride, stride), scale))
            initializers.append(_const(f"{head}{stride}_shape", [-1, width]))
            conv, nhwc, flat = (f"{head}{stride}_{k}" for k in ("conv", "nhwc", "flat"))
            nodes.append(helper.make_node("Conv", ["input.1", w], [conv], strides=[stride] * 2))
            nodes.append(helper.make_node("Transpose", [conv], [nhwc], perm=[0, 2, 3, 1]))
            nodes.append(helper.make_node("Reshape", [nhwc, f"{head}{stride}_shape"], [flat]))
            name = f"{head}_{stride}"
            if head == "score":
                initializers.append(
                    numpy_helper.from_array(np.float32(score_bias).reshape(()), f"bias{stride}")
                )
                nodes.append(helper.make_node("Add", [flat, f"bias{stride}"], [f"{flat}_b"]))
                nodes.append(helper.make_node("Sigmoid", [f"{flat}_b"], [name]))
            elif head == "bbox":
                # Distances to the four sides, in strides: positive, about 1..3.
                nodes.append(helper.make_node("Softplus", [flat], [f"{flat}_p"]))
                initializers.append(
                    numpy_helper.from_array(np.float32(1.0).reshape(()), f"one{stride}")
                )
                nodes.append(helper.make_node("Add", [f"{flat}_p", f"one{stride}"], [name]))
            else:
                nodes.append(helper.make_node("Identity", [flat], [name]))
            outputs[head].append(name)
    graph = helper.make_graph(
        nodes,
        "scrfd_standin",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "?", "?"])],
        [
            helper.make_tensor_value_info(name, TensorProto.FLOAT, [f"n{name}", width])
            for head, width in (("score", 1), ("bbox", 4), ("kps", 10))
            for name in outputs[head]
        ],
        initializers,
    )
    return _save(graph, path)


def make_enhancer(path: Path, *, seed: int = 3) -> Path:
    """GFPGAN 1.4's layout: (1,3,512,512) RGB in -1..1 -> (1,3,512,512) in -1..1."""
    rng = np.random.default_rng(seed)
    conv_w = np.zeros((3, 3, 3, 3), dtype=np.float32)
    conv_w[np.arange(3), np.arange(3), 1, 1] = 1.0
    conv_w += rng.standard_normal(conv_w.shape).astype(np.float32) * 0.05
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["input", "conv_w"], ["conv"], pads=[1, 1, 1, 1]),
            helper.make_node("Tanh", ["conv"], ["output"]),
        ],
        "gfpgan_standin",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 512, 512])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3, 512, 512])],
        [numpy_helper.from_array(conv_w, "conv_w")],
    )
    return _save(graph, path)


HAIR_CLASS, SKIN_CLASS = 17, 1


def make_face_parser(path: Path) -> Path:
    """BiSeNet's layout: (1,3,512,512) normalised RGB -> (1,19,512,512) class logits, and
    the two auxiliary heads the exports keep. It calls near-white pixels hair (class 17)
    and everything else skin (class 1), so a test can hold a white card over a face and
    know what a real parser would say of a hand there."""
    weights = np.zeros((19, 3, 1, 1), dtype=np.float32)
    bias = np.full(19, -20.0, dtype=np.float32)
    bias[SKIN_CLASS] = 0.0
    # Normalised with ImageNet's mean and spread, white is about 2.2..2.6 per channel
    # and skin well under 2: hair where the channel mean passes 2.
    weights[HAIR_CLASS, :, 0, 0] = 10.0 / 3
    bias[HAIR_CLASS] = -20.0
    initializers = [
        numpy_helper.from_array(weights, "conv_w"),
        numpy_helper.from_array(bias, "conv_b"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "conv_w", "conv_b"], ["out"]),
        helper.make_node("Identity", ["out"], ["aux16"]),
        helper.make_node("Identity", ["out"], ["aux32"]),
    ]
    graph = helper.make_graph(
        nodes,
        "bisenet_standin",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 512, 512])],
        [
            helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 19, 512, 512])
            for name in ("out", "aux16", "aux32")
        ],
        initializers,
    )
    return _save(graph, path)


def make_codeformer(path: Path, *, seed: int = 5) -> Path:
    """CodeFormer's layout: (1,3,512,512) RGB in -1..1 and a float64 fidelity weight (1,)
    -> (1,3,512,512) in -1..1; here the weight blends the input with a darker copy."""
    rng = np.random.default_rng(seed)
    conv_w = np.zeros((3, 3, 3, 3), dtype=np.float32)
    conv_w[np.arange(3), np.arange(3), 1, 1] = 1.0
    conv_w += rng.standard_normal(conv_w.shape).astype(np.float32) * 0.05
    nodes = [
        helper.make_node("Conv", ["input", "conv_w"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Cast", ["weight"], ["weight_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["conv", "weight_f"], ["scaled"]),
        helper.make_node("Tanh", ["scaled"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes,
        "codeformer_standin",
        [
            helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 512, 512]),
            helper.make_tensor_value_info("weight", TensorProto.DOUBLE, [1]),
        ],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3, 512, 512])],
        [numpy_helper.from_array(conv_w, "conv_w")],
    )
    return _save(graph, path)
