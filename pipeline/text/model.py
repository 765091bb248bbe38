"""Offline builder for CLIP's text tower as ONNX, with seeded random (synthetic) weights (no torch).

Writes OpenAI CLIP's text transformer exactly (``clip/model.py`` ``CLIP.encode_text``): token
embedding [49408, width] + positional embedding [77, width] -> ``layers`` pre-LN residual blocks
(``width``/``heads``, causal additive mask, MLP 4x with QuickGELU or GELU) -> ``ln_final`` ->
the hidden state at the EOT position (``argmax(ids)``) -> ``@ text_projection`` (no bias).

Two forms (the same weights for the same seed):

* ``projected``: input ``text`` int32 [B,77] -> output ``embedding`` float32 [B,output_dim];
* ``states`` (Sophgo's split, as their ``clip_text_vitb32`` bmodel): input ``text`` int32 [B,77]
  -> output ``states`` float32 [B,77,width] = ``ln_final`` of every position; the projection is
  written beside it as ``<stem>.text_projection.npy`` [width, output_dim] and the host gathers at
  the EOT position and projects (``pipeline.text.embed``), so Sophgo's downloaded
  ``clip_text_vitb32_bm1684x_f16_4b.bmodel`` + ``text_projection_512_512.npy`` work unchanged.

Conventions as ``pipeline.model.modelgen``: each initializer is one CLIP parameter named after OpenAI
CLIP's state_dict key (``token_embedding.weight``, ``transformer.resblocks.0.attn.in_proj_weight.T``
for the transposed ``MatMul`` weight, ``ln_final.weight``, ``text_projection``); everything else
(the causal mask, shapes, scalars) is a Constant node. Layer norms get random weights and biases
(CLIP starts them at 1 and 0) so parity tests would notice a swap.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pipeline.data.rundir import atomic_write
from pipeline.model import modelgen as mg
from pipeline.text.tokenizer import CONTEXT_LENGTH, VOCAB_SIZE

FORMS = ("projected", "states")


@dataclass(frozen=True)
class TextSpec:
    """Hyper-parameters of CLIP's text transformer (defaults: ViT-B/32's)."""

    context_length: int = CONTEXT_LENGTH
    vocab_size: int = VOCAB_SIZE
    width: int = 512
    layers: int = 12
    heads: int = 8
    output_dim: int = 512

    @property
    def head_dim(self) -> int:
        return self.width // self.heads


# output_dim follows the image tower of the same arch (pipeline.model.modelgen.ARCHS), so they pair.
TEXT_ARCHS: dict[str, TextSpec] = {
    "vit-b32": TextSpec(width=512, layers=12, heads=8, output_dim=mg.ARCHS["vit-b32"].output_dim),
    "tiny": TextSpec(width=64, layers=2, heads=2, output_dim=mg.ARCHS["tiny"].output_dim),
    "tiny-336": TextSpec(width=64, layers=2, heads=2, output_dim=mg.ARCHS["tiny-336"].output_dim),
}

TOKEN_STD = 0.02
POS_STD = 0.01
LN_STD = 0.05


def text_spec(arch: str) -> TextSpec:
    try:
        return TEXT_ARCHS[arch]
    except KeyError:
        raise ValueError(f"unknown text arch {arch!r}; known: {', '.join(sorted(TEXT_ARCHS))}") from None


def parameter_table(spec: TextSpec) -> list[tuple[str, tuple[int, ...], str, float]]:
    """(name, stored shape, init kind, std) in draw order; text_projection is drawn last."""
    w = spec.width
    attn_std = w**-0.5
    proj_std = (w**-0.5) * ((2 * spec.layers) ** -0.5)
    fc_std = (2 * w) ** -0.5
    table = [
        ("token_embedding.weight", (spec.vocab_size, w), "normal", TOKEN_STD),
        ("positional_embedding", (spec.context_length, w), "normal", POS_STD),
    ]
    for i in range(spec.layers):
        b = f"transformer.resblocks.{i}."
        table += [
            (b + "attn.in_proj_weight.T", (w, 3 * w), "normal", attn_std),
            (b + "attn.in_proj_bias", (3 * w,), "normal", mg.BIAS_STD),
            (b + "attn.out_proj.weight.T", (w, w), "normal", proj_std),
            (b + "attn.out_proj.bias", (w,), "normal", mg.BIAS_STD),
            (b + "ln_1.weight", (w,), "ln_weight", LN_STD),
            (b + "ln_1.bias", (w,), "normal", LN_STD),
            (b + "mlp.c_fc.weight.T", (w, 4 * w), "normal", fc_std),
            (b + "mlp.c_fc.bias", (4 * w,), "normal", mg.BIAS_STD),
            (b + "mlp.c_proj.weight.T", (4 * w, w), "normal", proj_std),
            (b + "mlp.c_proj.bias", (w,), "normal", mg.BIAS_STD),
            (b + "ln_2.weight", (w,), "ln_weight", LN_STD),
            (b + "ln_2.bias", (w,), "normal", LN_STD),
        ]
    table += [
        ("ln_final.weight", (w,), "ln_weight", LN_STD),
        ("ln_final.bias", (w,), "normal", LN_STD),
        ("text_projection", (w, spec.output_dim), "normal", w**-0.5),
    ]
    return table


def text_param_count(arch: str) -> int:
    """Parameters of the text tower (vit-b32: 63,428,096, as OpenAI CLIP's)."""
    return sum(int(np.prod(s)) for _, s, _, _ in parameter_table(text_spec(arch)))


def _draw(rng: np.random.Generator, shape: tuple[int, ...], kind: str, std: float) -> np.ndarray:
    if kind == "ln_weight":
        arr = rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
        arr += np.float32(1.0)
        return arr
    return mg.draw(rng, shape, kind, std)


def weights(spec: TextSpec, seed: int):
    """Iterator of (name, float32 array) in table order; the text tower's own RNG stream."""
    rng = np.random.default_rng([int(seed), 0x7E47])  # independent of the image tower's stream
    for name, shape, kind, std in parameter_table(spec):
        yield name, _draw(rng, shape, kind, std)


def causal_mask(n: int) -> np.ndarray:
    """CLIP's build_attention_mask: 0 on and below the diagonal, -inf above."""
    mask = np.full((n, n), -np.inf, np.float32)
    return np.triu(mask, 1)


def _graph(spec: TextSpec, form: str, act: str, g: mg.GraphBuilder) -> tuple[str, list]:
    w, h, hd = spec.width, spec.heads, spec.head_dim

    def i64(*xs: int) -> np.ndarray:
        return np.asarray(xs, np.int64)

    x = g.op1("Gather", ["token_embedding.weight", "text"], "token_embed", axis=0)  # [B, T, w]
    x = g.op1("Add", [x, "positional_embedding"], "tokens_pos")
    mask = g.const("causal_mask", causal_mask(spec.context_length))
    qkv_shape = g.const("shape_qkv_heads", i64(0, 0, h, hd))
    merge_shape = g.const("shape_merge_heads", i64(0, 0, w))
    q_scale = g.const("attn_scale", np.asarray(hd**-0.5, np.float32))
    for i in range(spec.layers):
        b = f"transformer.resblocks.{i}."
        t = f"blocks.{i}."
        y = g.op1("LayerNormalization", [x, b + "ln_1.weight", b + "ln_1.bias"], t + "ln_1", axis=-1, epsilon=mg.LN_EPS)
        y = g.op1("MatMul", [y, b + "attn.in_proj_weight.T"], t + "attn.qkv_mm")
        y = g.op1("Add", [y, b + "attn.in_proj_bias"], t + "attn.qkv")
        q, k, vv = g.op("Split", [y], t + "attn.split", n_out=3, axis=-1)
        q = g.op1("Reshape", [q, qkv_shape], t + "attn.q_heads")
        k = g.op1("Reshape", [k, qkv_shape], t + "attn.k_heads")
        vv = g.op1("Reshape", [vv, qkv_shape], t + "attn.v_heads")
        q = g.op1("Transpose", [q], t + "attn.q", perm=[0, 2, 1, 3])  # [B, H, T, hd]
        k = g.op1("Transpose", [k], t + "attn.k_t", perm=[0, 2, 3, 1])  # [B, H, hd, T]
        vv = g.op1("Transpose", [vv], t + "attn.v", perm=[0, 2, 1, 3])
        q = g.op1("Mul", [q, q_scale], t + "attn.q_scaled")
        s = g.op1("MatMul", [q, k], t + "attn.scores")
        s = g.op1("Add", [s, mask], t + "attn.masked")  # causal: a token sees itself and earlier ones
        s = g.op1("Softmax", [s], t + "attn.probs", axis=-1)
        y = g.op1("MatMul", [s, vv], t + "attn.ctx_heads")
        y = g.op1("Transpose", [y], t + "attn.ctx_t", perm=[0, 2, 1, 3])
        y = g.op1("Reshape", [y, merge_shape], t + "attn.ctx")
        y = g.op1("MatMul", [y, b + "attn.out_proj.weight.T"], t + "attn.out_mm")
        y = g.op1("Add", [y, b + "attn.out_proj.bias"], t + "attn.out")
        x = g.op1("Add", [x, y], t + "resid_attn")
        y = g.op1("LayerNormalization", [x, b + "ln_2.weight", b + "ln_2.bias"], t + "ln_2", axis=-1, epsilon=mg.LN_EPS)
        y = g.op1("MatMul", [y, b + "mlp.c_fc.weight.T"], t + "mlp.c_fc_mm")
        y = g.op1("Add", [y, b + "mlp.c_fc.bias"], t + "mlp.c_fc")
        y = mg.activation(g, y, t + "mlp.", act)
        y = g.op1("MatMul", [y, b + "mlp.c_proj.weight.T"], t + "mlp.c_proj_mm")
        y = g.op1("Add", [y, b + "mlp.c_proj.bias"], t + "mlp.c_proj")
        x = g.op1("Add", [x, y], t + "resid_mlp")
    if form == "states":
        g.nodes.append(helper.make_node("LayerNormalization", [x, "ln_final.weight", "ln_final.bias"], ["states"],
                                        name="ln_final", axis=-1, epsilon=mg.LN_EPS))
        return "states", ["batch", spec.context_length, w]
    x = g.op1("LayerNormalization", [x, "ln_final.weight", "ln_final.bias"], "ln_final", axis=-1, epsilon=mg.LN_EPS)
    # x[arange(B), argmax(text)]: eot (49407) is the largest id; argmax takes the first maximum
    eot = g.op1("ArgMax", ["text"], "eot_index", axis=1, keepdims=1)  # [B, 1] int64
    eot = g.op1("Unsqueeze", [eot, g.const("axes_2", i64(2))], "eot_index_3d")  # [B, 1, 1]
    n = g.op1("Shape", ["text"], "batch_size", start=0, end=1)
    shape = g.op1("Concat", [n, g.const("one_width", i64(1, w))], "gather_shape", axis=0)
    eot = g.op1("Expand", [eot, shape], "eot_index_w")  # [B, 1, w]
    x = g.op1("GatherElements", [x, eot], "eot_state", axis=1)  # [B, 1, w]
    x = g.op1("Reshape", [x, g.const("shape_rows_width", i64(-1, w))], "eot_rows")
    g.nodes.append(helper.make_node("MatMul", [x, "text_projection"], ["embedding"], name="text_projection"))
    return "embedding", ["batch", spec.output_dim]


def _skeleton(arch: str, seed: int, form: str, act: str) -> tuple[onnx.ModelProto, str, list]:
    spec = text_spec(arch)
    g = mg.GraphBuilder()
    out_name, out_shape = _graph(spec, form, act, g)
    graph = helper.make_graph(
        g.const_nodes + g.nodes,
        f"clip_text_{arch.replace('-', '')}_{form}_synthetic",
        [helper.make_tensor_value_info("text", TensorProto.INT32, ["batch", spec.context_length])],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, out_shape)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", mg.OPSET)], producer_name=mg.BUILDER,
                              producer_version="1", doc_string=f"CLIP text tower ({arch}, {form}), {mg.NOTE}.")
    model.ir_version = mg.IR_VERSION
    p = mg.META_PREFIX
    helper.set_model_props(model, {
        p + "synthetic": "true", p + "arch": arch, p + "seed": str(seed), p + "builder": mg.BUILDER,
        p + "note": mg.NOTE, p + "tower": "text", p + "text_form": form, p + "act": act,
        p + "clip_model": mg.clip_model_id(arch, seed, act),
    })
    return model, out_name, out_shape


def _check(arch: str, form: str, act: str) -> None:
    text_spec(arch)
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, not {form!r}")
    if act not in mg.ACTS:
        raise ValueError(f"act must be one of {mg.ACTS}, not {act!r}")


def _onnx_params(spec: TextSpec, form: str) -> list[tuple[str, tuple[int, ...]]]:
    table = [(n, s) for n, s, _, _ in parameter_table(spec)]
    return table if form == "projected" else table[:-1]


def make_text_model_proto(arch: str = "tiny", seed: int = 0, form: str = "projected",
                          act: str = "quickgelu") -> tuple[onnx.ModelProto, np.ndarray | None]:
    """In memory: (the model build_clip_text_onnx writes, the projection for the states form or None)."""
    _check(arch, form, act)
    model, _, _ = _skeleton(arch, seed, form, act)
    ws = dict(weights(text_spec(arch), seed))
    proj = ws.pop("text_projection") if form == "states" else None
    model.graph.initializer.extend(numpy_helper.from_array(a, n) for n, a in ws.items())
    return model, proj


def projection_path(path: str | os.PathLike) -> Path:
    """Where the states form's projection lies: ``<stem>.text_projection.npy`` beside the model."""
    p = Path(path)
    return p.with_name(p.stem + ".text_projection.npy")


def build_clip_text_onnx(path: str | os.PathLike, arch: str = "vit-b32", seed: int = 0, form: str = "projected",
                         act: str = "quickgelu") -> dict:
    """Write CLIP's text tower with seeded random weights to ``path`` (+ ``<path>.json``; the states form
    also ``<stem>.text_projection.npy``). Same arguments -> same bytes; the weights are those of
    the image tower of the same arch/seed/act's partner (recorded as ``clip_model``)."""
    _check(arch, form, act)
    seed = int(seed)
    spec = text_spec(arch)
    path = Path(path)
    skel, out_name, out_shape = _skeleton(arch, seed, form, act)
    skel_bytes = skel.SerializeToString()
    proj: list[np.ndarray] = []

    def onnx_weights():
        for name, arr in weights(spec, seed):
            if name == "text_projection" and form == "states":
                proj.append(arr)
                continue
            yield name, arr

    result: list = []
    gen = onnx_weights()

    def write(f) -> None:
        result.append(mg.stream_with_initializers(f, skel_bytes, _onnx_params(spec, form), gen))
        for _ in gen:  # the states form's projection is drawn after the last ONNX initializer
            pass

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write)
    (file_bytes, sha256), = result
    info = {
        "arch": arch, "seed": seed, "synthetic": True, "tower": "text", "text_form": form, "act": act,
        "clip_model": mg.clip_model_id(arch, seed, act), "params": text_param_count(arch),
        "input_kind": "int32", "input_name": "text", "input_shape": ["batch", spec.context_length],
        "output_name": out_name, "output_shape": out_shape, "output_dim": spec.output_dim, "width": spec.width,
        "opset": mg.OPSET, "format": "onnx", "builder": mg.BUILDER, "note": mg.NOTE,
        "file_bytes": file_bytes, "sha256": sha256,
    }
    if form == "states":
        ppath = projection_path(path)
        atomic_write(ppath, lambda f: np.save(f, proj[0]))
        info["projection"] = ppath.name
    mg.write_sidecar(path, info)
    return info


def state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """OpenAI-CLIP-style state_dict of one of our ONNX towers (``.T`` weights transposed back;
    a states-form text model's projection read from its .npy)."""
    model = onnx.load(str(path))
    out: dict[str, np.ndarray] = {}
    for t in model.graph.initializer:
        arr = numpy_helper.to_array(t)
        if t.name.endswith(".T"):
            out[t.name[:-2]] = np.ascontiguousarray(arr.T)
        else:
            out[t.name] = arr
    pp = projection_path(path)
    if "text_projection" not in out and "token_embedding.weight" in out and pp.is_file():
        out["text_projection"] = np.load(pp)
    return out
