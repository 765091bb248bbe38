"""Offline builder for CLIP image-tower ONNX models with seeded random (synthetic) weights.

Real CLIP weights cannot be downloaded everywhere, so this writes the *architecture* of OpenAI
CLIP's ``VisionTransformer`` (ViT-B/32, or a tiny variant for tests) with weights drawn from
``numpy.random.default_rng(seed)``, using ``onnx.helper`` directly (no torch).  The embeddings of
such a model carry no meaning; its cost, shapes and numerics are the real model's.

Conventions of the written graph (documented because tests and other tools rely on them):

* Every graph initializer is exactly one CLIP parameter, named after OpenAI CLIP's state_dict key
  (``visual.conv1.weight``, ``visual.transformer.resblocks.3.mlp.c_fc.bias``, ...).  Linear
  weights are stored transposed for ``MatMul`` (``[in, out]``) and their names end in ``.T``
  (``visual.transformer.resblocks.0.attn.in_proj_weight.T`` is the transpose of CLIP's
  ``in_proj_weight``).  ``visual.proj`` is ``[width, output_dim]`` as in CLIP (``x @ proj``).
* Everything that is not a CLIP parameter (reshape shapes, scalars, and in the uint8 model the
  bias that the folded normalisation needs) is a ``Constant`` node, never an initializer.  So
  ``sum(initializer sizes) == param_count(arch)`` for both input kinds.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto, helper, numpy_helper

from pipeline.data.images import CLIP_MEAN, CLIP_STD
from pipeline.data.rundir import atomic_write, atomic_write_bytes

OPSET = 17
# IR 8 is the oldest IR that allows opset 17; a low IR keeps the file loadable by older
# onnxruntime releases and by TPU-MLIR's onnx parser.
IR_VERSION = 8
BUILDER = "clip-pipeline modelgen"
NOTE = "SYNTHETIC random weights: embeddings carry no meaning"
META_PREFIX = "clip_pipeline."

LN_EPS = 1e-5
QUICKGELU_ALPHA = 1.702
CONV1_STD = 0.02
BIAS_STD = 0.02  # linear biases: small random instead of CLIP's zeros, so tests see them


@dataclass(frozen=True)
class VisionSpec:
    """Hyper-parameters of a CLIP VisionTransformer (defaults: ViT-B/32)."""

    image_size: int = 224
    patch_size: int = 32
    width: int = 768
    layers: int = 12
    heads: int = 12
    output_dim: int = 512

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens(self) -> int:
        return self.grid * self.grid + 1

    @property
    def head_dim(self) -> int:
        return self.width // self.heads


ARCHS: dict[str, VisionSpec] = {
    "vit-b32": VisionSpec(width=768, layers=12, heads=12),
    "tiny": VisionSpec(width=64, layers=2, heads=2),
    # a model beyond ViT-B/32's shapes (336x336 input, 768-d embeddings, like ViT-L/14@336), tiny
    # enough for tests: the pipeline must take its crop size and embedding width from the model
    "tiny-336": VisionSpec(image_size=336, patch_size=48, width=64, layers=2, heads=2, output_dim=768),
}

INPUT_KINDS = ("float", "uint8")
#: MLP activation: OpenAI's weights use QuickGELU x*sigmoid(1.702x); most open_clip (LAION) ones GELU
ACTS = ("quickgelu", "gelu")


def _spec(arch: str) -> VisionSpec:
    try:
        return ARCHS[arch]
    except KeyError:
        raise ValueError(f"unknown arch {arch!r}; known: {', '.join(sorted(ARCHS))}") from None


def _parameter_table(spec: VisionSpec) -> list[tuple[str, tuple[int, ...], str, float]]:
    """(initializer name, stored shape, init kind, std) in the order the RNG draws them.

    The order is CLIP's state_dict order; changing it changes every seeded model.
    """
    w, p = spec.width, spec.patch_size
    scale = w**-0.5
    attn_std = w**-0.5
    proj_std = (w**-0.5) * ((2 * spec.layers) ** -0.5)
    fc_std = (2 * w) ** -0.5
    v = "visual."
    table = [
        (v + "conv1.weight", (w, 3, p, p), "normal", CONV1_STD),
        (v + "class_embedding", (w,), "normal", scale),
        (v + "positional_embedding", (spec.tokens, w), "normal", scale),
        (v + "ln_pre.weight", (w,), "ones", 0.0),
        (v + "ln_pre.bias", (w,), "zeros", 0.0),
    ]
    for i in range(spec.layers):
        b = f"{v}transformer.resblocks.{i}."
        table += [
            (b + "attn.in_proj_weight.T", (w, 3 * w), "normal", attn_std),
            (b + "attn.in_proj_bias", (3 * w,), "normal", BIAS_STD),
            (b + "attn.out_proj.weight.T", (w, w), "normal", proj_std),
            (b + "attn.out_proj.bias", (w,), "normal", BIAS_STD),
            (b + "ln_1.weight", (w,), "ones", 0.0),
            (b + "ln_1.bias", (w,), "zeros", 0.0),
            (b + "mlp.c_fc.weight.T", (w, 4 * w), "normal", fc_std),
            (b + "mlp.c_fc.bias", (4 * w,), "normal", BIAS_STD),
            (b + "mlp.c_proj.weight.T", (4 * w, w), "normal", proj_std),
            (b + "mlp.c_proj.bias", (w,), "normal", BIAS_STD),
            (b + "ln_2.weight", (w,), "ones", 0.0),
            (b + "ln_2.bias", (w,), "zeros", 0.0),
        ]
    table += [
        (v + "ln_post.weight", (w,), "ones", 0.0),
        (v + "ln_post.bias", (w,), "zeros", 0.0),
        (v + "proj", (w, spec.output_dim), "normal", scale),
    ]
    return table


def param_count(arch: str) -> int:
    """Number of parameters of the image tower (vit-b32: 87,849,216)."""
    return sum(int(np.prod(shape)) for _, shape, _, _ in _parameter_table(_spec(arch)))


def draw(rng: np.random.Generator, shape: tuple[int, ...], kind: str, std: float) -> np.ndarray:
    if kind == "ones":
        return np.ones(shape, np.float32)
    if kind == "zeros":
        return np.zeros(shape, np.float32)
    arr = rng.standard_normal(shape, dtype=np.float32)
    arr *= np.float32(std)
    return arr


def _fold_normalisation(conv_w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fold ``(x/255 - mean)/std`` into conv1 (stride = kernel, no padding: exact).

    conv(W, (x/255 - m)/s) = conv(W/(255 s), x) - sum_{c,kh,kw} W[o,c,kh,kw] m_c/s_c
    """
    mean = np.asarray(CLIP_MEAN, np.float64)
    std = np.asarray(CLIP_STD, np.float64)
    w64 = conv_w.astype(np.float64)
    folded = (w64 / (255.0 * std)[None, :, None, None]).astype(np.float32)
    bias = -(w64.sum(axis=(2, 3)) * (mean / std)[None, :]).sum(axis=1)
    return folded, bias.astype(np.float32)


class GraphBuilder:
    """Collects nodes with deterministic names; constants become Constant nodes."""

    def __init__(self) -> None:
        self.const_nodes: list[onnx.NodeProto] = []
        self.nodes: list[onnx.NodeProto] = []
        self._consts: dict[tuple, str] = {}

    def const(self, name: str, value: np.ndarray) -> str:
        key = (name,)
        if key not in self._consts:
            out = "const." + name
            self.const_nodes.append(
                helper.make_node(
                    "Constant", [], [out], name=out, value=numpy_helper.from_array(value, out)
                )
            )
            self._consts[key] = out
        return self._consts[key]

    def op(self, op_type: str, inputs: list[str], name: str, n_out: int = 1, **attrs) -> list[str]:
        outs = [name] if n_out == 1 else [f"{name}.{k}" for k in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, **attrs))
        return outs

    def op1(self, op_type: str, inputs: list[str], name: str, **attrs) -> str:
        return self.op(op_type, inputs, name, **attrs)[0]


def activation(g: GraphBuilder, y: str, prefix: str, act: str) -> str:
    """The MLP activation: QuickGELU ``x*sigmoid(1.702x)`` or exact (erf) GELU (opset 17 has no Gelu op)."""
    if act == "quickgelu":
        alpha = g.const("quickgelu_alpha", np.asarray(QUICKGELU_ALPHA, np.float32))
        z = g.op1("Mul", [y, alpha], prefix + "gelu_scaled")
        z = g.op1("Sigmoid", [z], prefix + "gelu_gate")
        return g.op1("Mul", [y, z], prefix + "gelu")
    if act == "gelu":
        inv_sqrt2 = g.const("gelu_inv_sqrt2", np.asarray(2.0**-0.5, np.float32))
        one = g.const("gelu_one", np.asarray(1.0, np.float32))
        half = g.const("gelu_half", np.asarray(0.5, np.float32))
        z = g.op1("Mul", [y, inv_sqrt2], prefix + "gelu_scaled")
        z = g.op1("Erf", [z], prefix + "gelu_erf")
        z = g.op1("Add", [z, one], prefix + "gelu_erf1")
        z = g.op1("Mul", [y, z], prefix + "gelu_x")
        return g.op1("Mul", [z, half], prefix + "gelu")
    raise ValueError(f"act must be one of {ACTS}, not {act!r}")


def clip_model_id(arch: str, seed: int, act: str) -> str:
    """What pairs a synthetic image tower with its text tower: same arch, seed and activation."""
    return f"synthetic:{arch}:seed={seed}:act={act}"


def _build_graph(spec: VisionSpec, input_kind: str, g: GraphBuilder, conv_bias: str | None,
                 act: str = "quickgelu") -> str:
    """Adds the forward pass; returns the output tensor name."""
    w, h, hd = spec.width, spec.heads, spec.head_dim
    v = "visual."

    def i64(*xs: int) -> np.ndarray:
        return np.asarray(xs, np.int64)

    if input_kind == "uint8":
        x = g.op1("Cast", ["pixels"], "pixels_f32", to=TensorProto.FLOAT)
        x = g.op1("Transpose", [x], "pixels_nchw", perm=[0, 3, 1, 2])
    else:
        x = "image"
    conv_in = [x, v + "conv1.weight"] + ([conv_bias] if conv_bias else [])
    x = g.op1(
        "Conv", conv_in, "conv1",
        kernel_shape=[spec.patch_size] * 2, strides=[spec.patch_size] * 2, pads=[0, 0, 0, 0],
    )
    x = g.op1("Reshape", [x, g.const("shape_n_w_grid", i64(0, w, -1))], "patches_flat")
    x = g.op1("Transpose", [x], "patches", perm=[0, 2, 1])  # [N, grid^2, width]
    n = g.op1("Shape", [x], "batch_size", start=0, end=1)  # [N]
    cls_shape = g.op1("Concat", [n, g.const("one_width", i64(1, w))], "cls_shape", axis=0)
    cls = g.op1("Expand", [v + "class_embedding", cls_shape], "cls_token")  # [N, 1, width]
    x = g.op1("Concat", [cls, x], "tokens", axis=1)
    x = g.op1("Add", [x, v + "positional_embedding"], "tokens_pos")
    x = g.op1("LayerNormalization", [x, v + "ln_pre.weight", v + "ln_pre.bias"], "ln_pre",
              axis=-1, epsilon=LN_EPS)

    qkv_shape = g.const("shape_qkv_heads", i64(0, 0, h, hd))
    merge_shape = g.const("shape_merge_heads", i64(0, 0, w))
    q_scale = g.const("attn_scale", np.asarray(hd**-0.5, np.float32))
    for i in range(spec.layers):
        b = f"{v}transformer.resblocks.{i}."
        t = f"blocks.{i}."
        # x = x + attn(ln_1(x))
        y = g.op1("LayerNormalization", [x, b + "ln_1.weight", b + "ln_1.bias"], t + "ln_1",
                  axis=-1, epsilon=LN_EPS)
        y = g.op1("MatMul", [y, b + "attn.in_proj_weight.T"], t + "attn.qkv_mm")
        y = g.op1("Add", [y, b + "attn.in_proj_bias"], t + "attn.qkv")
        q, k, vv = g.op("Split", [y], t + "attn.split", n_out=3, axis=-1)
        q = g.op1("Reshape", [q, qkv_shape], t + "attn.q_heads")
        k = g.op1("Reshape", [k, qkv_shape], t + "attn.k_heads")
        vv = g.op1("Reshape", [vv, qkv_shape], t + "attn.v_heads")
        q = g.op1("Transpose", [q], t + "attn.q", perm=[0, 2, 1, 3])  # [N, H, T, hd]
        k = g.op1("Transpose", [k], t + "attn.k_t", perm=[0, 2, 3, 1])  # [N, H, hd, T]
        vv = g.op1("Transpose", [vv], t + "attn.v", perm=[0, 2, 1, 3])  # [N, H, T, hd]
        q = g.op1("Mul", [q, q_scale], t + "attn.q_scaled")
        s = g.op1("MatMul", [q, k], t + "attn.scores")
        s = g.op1("Softmax", [s], t + "attn.probs", axis=-1)
        y = g.op1("MatMul", [s, vv], t + "attn.ctx_heads")
        y = g.op1("Transpose", [y], t + "attn.ctx_t", perm=[0, 2, 1, 3])
        y = g.op1("Reshape", [y, merge_shape], t + "attn.ctx")
        y = g.op1("MatMul", [y, b + "attn.out_proj.weight.T"], t + "attn.out_mm")
        y = g.op1("Add", [y, b + "attn.out_proj.bias"], t + "attn.out")
        x = g.op1("Add", [x, y], t + "resid_attn")
        # x = x + mlp(ln_2(x)), mlp = c_proj(QuickGELU(c_fc(.)))
        y = g.op1("LayerNormalization", [x, b + "ln_2.weight", b + "ln_2.bias"], t + "ln_2",
                  axis=-1, epsilon=LN_EPS)
        y = g.op1("MatMul", [y, b + "mlp.c_fc.weight.T"], t + "mlp.c_fc_mm")
        y = g.op1("Add", [y, b + "mlp.c_fc.bias"], t + "mlp.c_fc")
        y = activation(g, y, t + "mlp.", act)
        y = g.op1("MatMul", [y, b + "mlp.c_proj.weight.T"], t + "mlp.c_proj_mm")
        y = g.op1("Add", [y, b + "mlp.c_proj.bias"], t + "mlp.c_proj")
        x = g.op1("Add", [x, y], t + "resid_mlp")

    x = g.op1("Gather", [x, g.const("index_zero", np.asarray(0, np.int64))], "cls_out", axis=1)
    x = g.op1("LayerNormalization", [x, v + "ln_post.weight", v + "ln_post.bias"], "ln_post",
              axis=-1, epsilon=LN_EPS)
    g.nodes.append(helper.make_node("MatMul", [x, v + "proj"], ["embedding"], name="proj"))
    return "embedding"


def _io(spec: VisionSpec, input_kind: str) -> tuple[str, list]:
    s = spec.image_size
    if input_kind == "float":
        return "image", ["batch", 3, s, s]
    return "pixels", ["batch", s, s, 3]


def _weights(spec: VisionSpec, seed: int, input_kind: str):
    """(conv1 folding bias or None, iterator of (name, float32 array)) in table order.

    Arrays are drawn lazily, so a caller that consumes them one at a time holds one tensor.
    """
    rng = np.random.default_rng(seed)
    table = _parameter_table(spec)
    name, shape, kind, std = table[0]
    assert name == "visual.conv1.weight"  # drawn first: the uint8 graph needs its folded bias
    conv_w = draw(rng, shape, kind, std)
    conv_bias = None
    if input_kind == "uint8":
        conv_w, conv_bias = _fold_normalisation(conv_w)

    def gen():
        yield name, conv_w
        for n, shp, k, sd in table[1:]:
            yield n, draw(rng, shp, k, sd)

    return conv_bias, gen()


def _skeleton(arch: str, seed: int, input_kind: str, conv_bias: np.ndarray | None,
              act: str = "quickgelu") -> onnx.ModelProto:
    """The whole model except the initializers' data (they are listed as graph inputs nowhere)."""
    spec = _spec(arch)
    g = GraphBuilder()
    bias_name = g.const("conv1.norm_bias", conv_bias) if conv_bias is not None else None
    output = _build_graph(spec, input_kind, g, bias_name, act)
    in_name, in_shape = _io(spec, input_kind)
    elem = TensorProto.FLOAT if input_kind == "float" else TensorProto.UINT8
    graph = helper.make_graph(
        g.const_nodes + g.nodes,
        f"clip_image_{arch.replace('-', '')}_synthetic",
        [helper.make_tensor_value_info(in_name, elem, in_shape)],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["batch", spec.output_dim])],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name=BUILDER,
        producer_version="1",
        doc_string=f"CLIP image tower ({arch}), {NOTE}.",
    )
    model.ir_version = IR_VERSION
    helper.set_model_props(
        model,
        {
            META_PREFIX + "synthetic": "true",
            META_PREFIX + "arch": arch,
            META_PREFIX + "seed": str(seed),
            META_PREFIX + "input_kind": input_kind,
            META_PREFIX + "builder": BUILDER,
            META_PREFIX + "note": NOTE,
            META_PREFIX + "act": act,
            META_PREFIX + "clip_model": clip_model_id(arch, seed, act),
        },
    )
    return model


def make_model_proto(arch: str = "tiny", seed: int = 0, input_kind: str = "float",
                     act: str = "quickgelu") -> onnx.ModelProto:
    """The same model as build_clip_image_onnx writes, in memory (meant for small archs/tests)."""
    _check_args(arch, input_kind, act)
    conv_bias, weights = _weights(_spec(arch), seed, input_kind)
    model = _skeleton(arch, seed, input_kind, conv_bias, act)
    model.graph.initializer.extend(numpy_helper.from_array(a, n) for n, a in weights)
    return model


# --- streaming serialisation ------------------------------------------------------------------
# Serialising a 351 MB ModelProto needs the proto *and* its byte string in memory (plus the numpy
# arrays while building). Instead the file is written field by field in protobuf's canonical order
# (fields by number), one initializer at a time: the output is byte-identical to
# ``make_model_proto(...).SerializeToString()`` (tested on the tiny model) and the builder holds
# about one tensor of weights at a time.

_MODEL_GRAPH_FIELD = 7  # ModelProto.graph
_GRAPH_INITIALIZER_FIELD = 5  # GraphProto.initializer
_TENSOR_RAW_DATA_FIELD = 9  # TensorProto.raw_data


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _top_level_fields(buf: bytes) -> list[tuple[int, int, int, int]]:
    """(field number, start of tag, start of payload, end) for each top-level field."""
    fields, pos = [], 0
    while pos < len(buf):
        start = pos
        tag, pos = _read_varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            _, pos = _read_varint(buf, pos)
            payload = start
        elif wire == 1:
            payload, pos = pos, pos + 8
        elif wire == 2:
            length, pos = _read_varint(buf, pos)
            payload, pos = pos, pos + length
        elif wire == 5:
            payload, pos = pos, pos + 4
        else:
            raise ValueError(f"unexpected protobuf wire type {wire}")
        fields.append((number, start, payload, pos))
    return fields


def _len_delimited(field: int, length: int) -> bytes:
    return _varint((field << 3) | 2) + _varint(length)


def _tensor_head(name: str, shape: tuple[int, ...]) -> bytes:
    """A float32 TensorProto's bytes up to and including the raw_data tag + length."""
    head = TensorProto(name=name, dims=shape, data_type=TensorProto.FLOAT).SerializeToString()
    return head + _len_delimited(_TENSOR_RAW_DATA_FIELD, 4 * int(np.prod(shape)))


def _stream_model(f, arch: str, seed: int, input_kind: str, act: str = "quickgelu") -> tuple[int, str]:
    """Write the model to the binary file ``f``; returns (bytes written, sha256 hex)."""
    spec = _spec(arch)
    conv_bias, weights = _weights(spec, seed, input_kind)
    skel = _skeleton(arch, seed, input_kind, conv_bias, act).SerializeToString()
    shapes = [(n, shape) for n, shape, _, _ in _parameter_table(spec)]
    return stream_with_initializers(f, skel, shapes, weights)


def stream_with_initializers(f, skel: bytes, shapes: list[tuple[str, tuple[int, ...]]], weights) -> tuple[int, str]:
    """Write the serialised model ``skel`` (no initializers) with float32 initializers ``shapes``
    filled from the iterator ``weights`` of (name, array), one at a time; returns (bytes, sha256)."""
    model_fields = _top_level_fields(skel)
    (g_field,) = [fld for fld in model_fields if fld[0] == _MODEL_GRAPH_FIELD]
    graph = skel[g_field[2]:g_field[3]]
    graph_fields = _top_level_fields(graph)
    assert all(fld[0] != _GRAPH_INITIALIZER_FIELD for fld in graph_fields)
    split = next((fld[1] for fld in graph_fields if fld[0] > _GRAPH_INITIALIZER_FIELD), len(graph))

    heads = [(n, _tensor_head(n, shape)) for n, shape in shapes]
    init_sizes = [len(h) + 4 * int(np.prod(shape)) for (_, h), (_, shape) in zip(heads, shapes)]
    graph_len = len(graph) + sum(len(_len_delimited(_GRAPH_INITIALIZER_FIELD, s)) + s
                                 for s in init_sizes)

    digest = hashlib.sha256()
    written = 0

    def put(chunk) -> None:
        nonlocal written
        f.write(chunk)
        digest.update(chunk)
        written += len(chunk)

    put(skel[:g_field[1]])
    put(_len_delimited(_MODEL_GRAPH_FIELD, graph_len))
    put(graph[:split])
    for (name, head), size, (w_name, arr) in zip(heads, init_sizes, weights):
        assert name == w_name and arr.dtype == np.float32
        put(_len_delimited(_GRAPH_INITIALIZER_FIELD, size))
        put(head)
        put(memoryview(np.ascontiguousarray(arr, dtype="<f4")).cast("B"))
        del arr
    put(graph[split:])
    put(skel[g_field[3]:])
    return written, digest.hexdigest()


def _check_args(arch: str, input_kind: str, act: str = "quickgelu") -> None:
    _spec(arch)
    if input_kind not in INPUT_KINDS:
        raise ValueError(f"input_kind must be one of {INPUT_KINDS}, not {input_kind!r}")
    if act not in ACTS:
        raise ValueError(f"act must be one of {ACTS}, not {act!r}")


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def write_sidecar(path: Path, info: dict) -> None:
    """A model's `<file>.json` sidecar (read back by read_model_info), written atomically."""
    text = json.dumps(info, indent=2, sort_keys=True) + "\n"
    atomic_write_bytes(sidecar_path(path), text.encode())


def build_clip_image_onnx(
    path: str | os.PathLike, arch: str = "vit-b32", seed: int = 0, input_kind: str = "float",
    act: str = "quickgelu",
) -> dict:
    """Write a CLIP image tower with seeded random weights to ``path`` (+ ``<path>.json``).

    ``input_kind="float"``: input ``image`` float32 [N,3,224,224], CLIP-normalised RGB.
    ``input_kind="uint8"``: input ``pixels`` uint8 [N,224,224,3] RGB 0..255; the normalisation
    is folded into conv1 (same seed -> same model as the float one, up to float rounding).
    Output ``embedding`` float32 [N,512], not L2-normalised.  Same arguments -> same bytes.
    ``act``: the MLP activation (quickgelu: OpenAI CLIP; gelu: most open_clip checkpoints).
    Both files are written atomically (temp name + rename); the sidecar is written last.
    """
    _check_args(arch, input_kind, act)
    seed = int(seed)
    spec = _spec(arch)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    result: list = []
    atomic_write(path, lambda f: result.append(_stream_model(f, arch, seed, input_kind, act)))
    (file_bytes, sha256), = result
    in_name, in_shape = _io(spec, input_kind)
    info = {
        "arch": arch,
        "seed": seed,
        "synthetic": True,
        "params": param_count(arch),
        "input_kind": input_kind,
        "input_name": in_name,
        "input_shape": in_shape,
        "output_name": "embedding",
        "output_dim": spec.output_dim,
        "opset": OPSET,
        "format": "onnx",
        "builder": BUILDER,
        "note": NOTE,
        "file_bytes": file_bytes,
        "sha256": sha256,
        "tower": "image",
        "act": act,
        "clip_model": clip_model_id(arch, seed, act),
    }
    write_sidecar(path, info)
    return info


def quantize_int8(src: str | os.PathLike, dst: str | os.PathLike) -> dict:
    """Dynamic int8 quantisation of MatMul/Gemm weights (onnxruntime), written atomically."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp.onnx")
    os.close(fd)
    try:
        quantize_dynamic(src, tmp, op_types_to_quantize=["MatMul", "Gemm"],
                         weight_type=QuantType.QInt8)
        model = onnx.load(tmp)
        props = {p.key: p.value for p in model.metadata_props}
        props[META_PREFIX + "quantized"] = "int8-dynamic"
        del model.metadata_props[:]
        helper.set_model_props(model, props)
        data = model.SerializeToString()
        del model
        atomic_write_bytes(dst, data)
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
    info = dict(read_model_info(src))
    info.update(
        quantized="int8-dynamic",
        source=src.name,
        file_bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )
    write_sidecar(dst, info)
    return info


def _format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    return {".onnx": "onnx", ".bmodel": "bmodel"}.get(suffix, suffix.lstrip(".") or "unknown")


def read_model_info(path: str | os.PathLike) -> dict:
    """What is known about a model file.

    1. the sidecar ``<path>.json`` if present and its ``file_bytes`` (when recorded) matches the
       file (so a real model copied over a synthetic one is not mistaken for it);
    2. else the ONNX ``metadata_props`` written by this builder (``clip_pipeline.*``), plus
       input/output names and shapes read from the graph;
    3. else ``{"synthetic": False, "arch": "unknown", ...}``.
    """
    path = Path(path)
    sidecar = sidecar_path(path)
    if sidecar.is_file():
        try:
            info = json.loads(sidecar.read_text())
        except (OSError, ValueError):
            info = None
        if isinstance(info, dict):
            size = info.get("file_bytes")
            try:
                if size is None or path.stat().st_size == size:
                    return info
            except FileNotFoundError:
                return info

    info: dict = {
        "arch": "unknown",
        "seed": None,
        "synthetic": False,
        "params": None,
        "input_kind": "unknown",
        "input_name": None,
        "input_shape": None,
        "output_name": None,
        "output_dim": None,
        "opset": None,
        "format": _format_of(path),
        "builder": "unknown",
    }
    if info["format"] != "onnx" or not path.is_file():
        return info
    try:
        model = onnx.load(path, load_external_data=False)
    except (OSError, ValueError, DecodeError):  # not parseable as ONNX: report what we know
        return info
    props = {p.key: p.value for p in model.metadata_props}
    init_names = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in init_names]

    def dims(vi: onnx.ValueInfoProto) -> list:
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]

    if inputs:
        info["input_name"] = inputs[0].name
        info["input_shape"] = dims(inputs[0])
        elem = inputs[0].type.tensor_type.elem_type
        info["input_kind"] = {TensorProto.FLOAT: "float", TensorProto.UINT8: "uint8"}.get(
            elem, "unknown")
    if model.graph.output:
        out = model.graph.output[0]
        info["output_name"] = out.name
        out_dims = dims(out)
        if out_dims and isinstance(out_dims[-1], int) and out_dims[-1] > 0:
            info["output_dim"] = out_dims[-1]
    info["opset"] = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
                         None)
    if props.get(META_PREFIX + "synthetic") == "true":
        arch = props.get(META_PREFIX + "arch", "unknown")
        info.update(
            arch=arch,
            synthetic=True,
            params=param_count(arch) if arch in ARCHS else None,
            builder=props.get(META_PREFIX + "builder", BUILDER),
            note=props.get(META_PREFIX + "note", NOTE),
        )
        seed = props.get(META_PREFIX + "seed")
        info["seed"] = int(seed) if seed is not None and seed.lstrip("-").isdigit() else None
        if META_PREFIX + "quantized" in props:
            info["quantized"] = props[META_PREFIX + "quantized"]
        for key in ("act", "clip_model", "tower"):
            if META_PREFIX + key in props:
                info[key] = props[META_PREFIX + key]
    return info
