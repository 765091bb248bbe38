"""Test helper: build a CLIP-style ViT image tower as ONNX with seeded random weights.

A stand-in for ``pipeline.modelgen.build_clip_image_onnx`` (branch ``models``) until that lands;
``build()`` prefers the real builder when it is importable. Same interface: input ``image``
float32 [N,3,224,224], output ``embedding`` [N,512], a ``<onnx>.json`` sidecar with
``"synthetic": true``. Never committed as a model file: tests write into tmp dirs.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

ARCHS = {
    # width, layers, heads
    "tiny": (64, 2, 2),
    "vit-b32": (768, 12, 12),
}
PATCH = 32
IMAGE = 224
EMBED = 512


def build(path, arch: str = "tiny", seed: int = 0) -> dict:
    """Use the project's builder if present, else the local one below."""
    try:
        from pipeline.modelgen import build_clip_image_onnx  # type: ignore
    except ImportError:
        return build_local(path, arch=arch, seed=seed)
    return build_clip_image_onnx(str(path), arch=arch, seed=seed, input_kind="float")


def build_local(path, arch: str = "tiny", seed: int = 0) -> dict:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    width, layers, heads = ARCHS[arch]
    head_dim = width // heads
    grid = IMAGE // PATCH
    tokens = grid * grid + 1
    rng = np.random.default_rng(seed)
    inits: list = []
    nodes: list = []
    n_params = 0

    def param(name, shape, std=None, value=None):
        nonlocal n_params
        if value is not None:
            arr = np.full(shape, value, np.float32)
        else:
            arr = (rng.standard_normal(shape) * std).astype(np.float32)
        n_params += arr.size
        inits.append(numpy_helper.from_array(arr, name))
        return name

    def const(name, arr):
        inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def node(op, ins, outs, **kw):
        nodes.append(helper.make_node(op, ins, outs, name=outs[0] + "_" + op, **kw))
        return outs[0]

    def layernorm(x, prefix):
        g = param(prefix + ".weight", (width,), value=1.0)
        b = param(prefix + ".bias", (width,), value=0.0)
        return node("LayerNormalization", [x, g, b], [prefix + "_out"], axis=-1, epsilon=1e-5)

    def linear(x, prefix, fan_in, fan_out):
        w = param(prefix + ".weight", (fan_in, fan_out), std=fan_in ** -0.5)
        b = param(prefix + ".bias", (fan_out,), std=0.02)
        y = node("MatMul", [x, w], [prefix + "_mm"])
        return node("Add", [y, b], [prefix + "_out"])

    conv_w = param("conv1.weight", (width, 3, PATCH, PATCH), std=(3 * PATCH * PATCH) ** -0.5)
    x = node("Conv", ["image", conv_w], ["patches"], kernel_shape=[PATCH, PATCH],
             strides=[PATCH, PATCH])
    x = node("Reshape", [x, const("shape_nwp", np.array([0, width, -1], np.int64))], ["patches_flat"])
    x = node("Transpose", [x], ["patch_tokens"], perm=[0, 2, 1])
    # class token, broadcast over the (dynamic) batch: Expand to [N,1,width]
    cls = param("class_embedding", (1, 1, width), std=width ** -0.5)
    shp = node("Shape", ["image"], ["image_shape"])
    n = node("Slice", [shp, const("s0", np.array([0], np.int64)), const("s1", np.array([1], np.int64))],
             ["batch_dim"])
    cls_shape = node("Concat", [n, const("one_width", np.array([1, width], np.int64))], ["cls_shape"], axis=0)
    cls_b = node("Expand", [cls, cls_shape], ["cls_tokens"])
    x = node("Concat", [cls_b, x], ["tokens"], axis=1)
    pos = param("positional_embedding", (tokens, width), std=0.01)
    x = node("Add", [x, pos], ["tokens_pos"])
    x = layernorm(x, "ln_pre")

    qkv_shape = const("shape_heads", np.array([0, 0, heads, head_dim], np.int64))
    merge_shape = const("shape_merge", np.array([0, 0, width], np.int64))
    scale = const("attn_scale", np.array(head_dim ** -0.5, np.float32))
    gelu_k = const("quickgelu_k", np.array(1.702, np.float32))
    for i in range(layers):
        p = f"blocks.{i}"
        h = layernorm(x, p + ".ln_1")
        heads_t = []
        for part in ("q", "k", "v"):
            t = linear(h, f"{p}.attn.{part}", width, width)
            t = node("Reshape", [t, qkv_shape], [f"{p}.attn.{part}_split"])
            t = node("Transpose", [t], [f"{p}.attn.{part}_heads"],
                     perm=[0, 2, 3, 1] if part == "k" else [0, 2, 1, 3])
            heads_t.append(t)
        q, k, v = heads_t
        s = node("MatMul", [q, k], [p + ".attn.scores"])
        s = node("Mul", [s, scale], [p + ".attn.scaled"])
        s = node("Softmax", [s], [p + ".attn.probs"], axis=-1)
        o = node("MatMul", [s, v], [p + ".attn.ctx"])
        o = node("Transpose", [o], [p + ".attn.ctx_t"], perm=[0, 2, 1, 3])
        o = node("Reshape", [o, merge_shape], [p + ".attn.ctx_m"])
        o = linear(o, p + ".attn.out_proj", width, width)
        x = node("Add", [x, o], [p + ".res1"])
        h = layernorm(x, p + ".ln_2")
        h = linear(h, p + ".mlp.c_fc", width, 4 * width)
        g = node("Mul", [h, gelu_k], [p + ".mlp.gk"])
        g = node("Sigmoid", [g], [p + ".mlp.gs"])
        h = node("Mul", [h, g], [p + ".mlp.gelu"])
        h = linear(h, p + ".mlp.c_proj", 4 * width, width)
        x = node("Add", [x, h], [p + ".res2"])

    x = node("Gather", [x, const("cls_index", np.array(0, np.int64))], ["cls_out"], axis=1)
    x = layernorm(x, "ln_post")
    proj = param("proj", (width, EMBED), std=width ** -0.5)
    node("MatMul", [x, proj], ["embedding"])

    graph = helper.make_graph(
        nodes, f"clip_{arch}",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, IMAGE, IMAGE])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", EMBED])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = Path(path)
    onnx.save(model, str(path))
    info = {"arch": arch, "seed": seed, "synthetic": True, "params": int(n_params),
            "input": "image", "output": "embedding", "input_kind": "float",
            "builder": "tests/_onnx_vit.py"}
    Path(str(path) + ".json").write_text(json.dumps(info, indent=2))
    return info
