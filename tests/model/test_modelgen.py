"""Tests of the synthetic CLIP image-tower builder (pipeline/model/modelgen.py)."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from pipeline.model import modelgen
from pipeline.model.modelgen import (
    ARCHS,
    build_clip_image_onnx,
    param_count,
    quantize_int8,
    read_model_info,
)

MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
STD = np.array([0.26862954, 0.26130258, 0.27577711])


def session(path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run(path, x: np.ndarray) -> np.ndarray:
    sess = session(path)
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def initializers(path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def n_initializer_values(path) -> int:
    """Parameters = elements of all graph initializers. The builder keeps every non-parameter
    constant (reshape shapes, scalars, uint8 normalisation bias) in Constant nodes, so nothing
    needs excluding; Constant nodes are not counted."""
    return sum(int(np.prod(t.dims)) for t in onnx.load(str(path)).graph.initializer)


def normalise(pixels: np.ndarray) -> np.ndarray:
    """uint8 NHWC RGB -> CLIP-normalised float32 NCHW."""
    x = (pixels.astype(np.float64) / 255.0 - MEAN) / STD
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)).astype(np.float32)


def random_pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 224, 224, 3), dtype=np.uint8)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


# --- an independent numpy forward pass of OpenAI CLIP's VisionTransformer -----------------------
# Written from CLIP's model.py semantics, in float64, reading weights by their CLIP state_dict
# names (Linear weights are stored transposed, names ending in ".T").


def layer_norm(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def reference_forward(W: dict[str, np.ndarray], image: np.ndarray, heads: int) -> np.ndarray:
    W = {k: v.astype(np.float64) for k, v in W.items()}
    n = image.shape[0]
    conv = W["visual.conv1.weight"]  # [width, 3, p, p]
    width, _, p, _ = conv.shape
    g = image.shape[-1] // p
    # conv with stride = kernel = p is a matmul over non-overlapping patches
    patches = image.astype(np.float64).reshape(n, 3, g, p, g, p).transpose(0, 2, 4, 1, 3, 5)
    x = patches.reshape(n, g * g, 3 * p * p) @ conv.reshape(width, -1).T  # [n, grid^2, width]
    cls = np.broadcast_to(W["visual.class_embedding"], (n, 1, width))
    x = np.concatenate([cls, x], axis=1) + W["visual.positional_embedding"]
    x = layer_norm(x, W["visual.ln_pre.weight"], W["visual.ln_pre.bias"])
    i = 0
    hd = width // heads
    while f"visual.transformer.resblocks.{i}.ln_1.weight" in W:
        b = f"visual.transformer.resblocks.{i}."
        h = layer_norm(x, W[b + "ln_1.weight"], W[b + "ln_1.bias"])
        qkv = h @ W[b + "attn.in_proj_weight.T"] + W[b + "attn.in_proj_bias"]
        q, k, v = np.split(qkv, 3, axis=-1)
        t = x.shape[1]
        q, k, v = (m.reshape(n, t, heads, hd).transpose(0, 2, 1, 3) for m in (q, k, v))
        attn = softmax(q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)) @ v
        attn = attn.transpose(0, 2, 1, 3).reshape(n, t, width)
        x = x + attn @ W[b + "attn.out_proj.weight.T"] + W[b + "attn.out_proj.bias"]
        h = layer_norm(x, W[b + "ln_2.weight"], W[b + "ln_2.bias"])
        h = h @ W[b + "mlp.c_fc.weight.T"] + W[b + "mlp.c_fc.bias"]
        h = h * (1.0 / (1.0 + np.exp(-1.702 * h)))  # QuickGELU
        x = x + h @ W[b + "mlp.c_proj.weight.T"] + W[b + "mlp.c_proj.bias"]
        i += 1
    x = layer_norm(x[:, 0, :], W["visual.ln_post.weight"], W["visual.ln_post.bias"])
    return x @ W["visual.proj"]


def assert_close_rel(actual, expected, rel=1e-4):
    err = np.abs(actual.astype(np.float64) - expected).max() / np.abs(expected).max()
    assert err < rel, f"max abs error {err:.3g} relative to max |output|"


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_float(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.onnx"
    build_clip_image_onnx(path, arch="tiny", seed=0)
    return path


@pytest.fixture(scope="module")
def tiny_uint8(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_u8") / "tiny_u8.onnx"
    build_clip_image_onnx(path, arch="tiny", seed=0, input_kind="uint8")
    return path


# --- parameter counts ------------------------------------------------------------------------


def test_param_count_vit_b32_is_clips():
    assert param_count("vit-b32") == 87_849_216


def test_archs():
    assert ARCHS["vit-b32"] == modelgen.VisionSpec(224, 32, 768, 12, 12, 512)
    tiny = ARCHS["tiny"]
    assert (tiny.width, tiny.layers, tiny.heads, tiny.output_dim) == (64, 2, 2, 512)
    with pytest.raises(ValueError, match="unknown arch"):
        param_count("vit-l14")


def test_tiny_initializers_add_up_to_param_count(tiny_float, tiny_uint8):
    assert n_initializer_values(tiny_float) == param_count("tiny")
    assert n_initializer_values(tiny_uint8) == param_count("tiny")


def test_tiny_model_is_valid_onnx(tiny_float, tiny_uint8):
    for path in (tiny_float, tiny_uint8):
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=True)
        assert model.opset_import[0].version == 17
        props = {p.key: p.value for p in model.metadata_props}
        assert props["clip_pipeline.synthetic"] == "true"
        assert props["clip_pipeline.arch"] == "tiny"
        assert props["clip_pipeline.seed"] == "0"


# --- numerics ----------------------------------------------------------------------------------


def test_tiny_matches_numpy_reference(tiny_float):
    image = np.random.default_rng(1).standard_normal((3, 3, 224, 224)).astype(np.float32)
    out = run(tiny_float, image)
    assert out.shape == (3, 512) and out.dtype == np.float32
    expected = reference_forward(initializers(tiny_float), image, ARCHS["tiny"].heads)
    assert_close_rel(out, expected)
    # not L2-normalised (like CLIP's encode_image)
    assert not np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-3)


def test_graph_wiring_with_every_weight_randomised(tiny_float, tmp_path):
    """CLIP init leaves LayerNorms at 1/0; randomise every initializer so a swapped LN
    weight/bias or a mis-wired tensor would show up against the reference."""
    model = onnx.load(str(tiny_float))
    rng = np.random.default_rng(7)
    weights = {}
    for t in model.graph.initializer:
        arr = numpy_helper.to_array(t)
        if ".ln_" in t.name and t.name.endswith(".weight"):
            new = 1.0 + 0.3 * rng.standard_normal(arr.shape)
        elif t.name.endswith("bias"):
            new = 0.3 * rng.standard_normal(arr.shape)
        else:
            new = arr.std() * rng.standard_normal(arr.shape)
        weights[t.name] = new.astype(np.float32)
        t.CopyFrom(numpy_helper.from_array(weights[t.name], t.name))
    path = tmp_path / "perturbed.onnx"
    onnx.save(model, str(path))
    image = np.random.default_rng(2).standard_normal((3, 3, 224, 224)).astype(np.float32)
    assert_close_rel(run(path, image), reference_forward(weights, image, ARCHS["tiny"].heads))


@pytest.mark.parametrize("n", [1, 2, 5])
def test_dynamic_batch(tiny_float, n):
    sess = session(tiny_float)
    inp = sess.get_inputs()[0]
    assert inp.name == "image" and inp.shape == ["batch", 3, 224, 224]
    assert sess.get_outputs()[0].name == "embedding"
    assert sess.get_outputs()[0].shape == ["batch", 512]
    image = normalise(random_pixels(5, seed=3))
    out = sess.run(None, {"image": image[:n]})[0]
    assert out.shape == (n, 512)
    # each row depends only on its own image (up to float rounding)
    one = sess.run(None, {"image": image[:1]})[0]
    np.testing.assert_allclose(out[:1], one, rtol=1e-4, atol=1e-4)


def test_uint8_model_agrees_with_float_model(tiny_float, tiny_uint8):
    sess = session(tiny_uint8)
    inp = sess.get_inputs()[0]
    assert inp.name == "pixels" and inp.type == "tensor(uint8)"
    assert inp.shape == ["batch", 224, 224, 3]
    pixels = random_pixels(4, seed=4)
    pixels[0] = 0  # extremes
    pixels[1] = 255
    out_u8 = sess.run(None, {"pixels": pixels})[0]
    out_f = run(tiny_float, normalise(pixels))
    diff = np.abs(out_u8 - out_f).max()
    cos = cosine(out_u8, out_f).min()
    print(f"uint8 vs float tiny: max abs diff {diff:.3g}, min cosine {cos:.8f}")
    assert diff < 1e-3 * np.abs(out_f).max()
    assert cos > 0.99999


def test_folded_normalisation_is_exact_in_float64():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 3, 32, 32)).astype(np.float32)
    folded, bias = modelgen._fold_normalisation(w)
    px = rng.integers(0, 256, (3, 32, 32)).astype(np.float64)
    norm = (px / 255.0 - MEAN[:, None, None]) / STD[:, None, None]
    expected = (w.astype(np.float64) * norm).sum(axis=(1, 2, 3))
    got = (folded.astype(np.float64) * px).sum(axis=(1, 2, 3)) + bias
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


# --- determinism ---------------------------------------------------------------------------------


def test_same_seed_same_bytes_different_seed_different_weights(tmp_path, tiny_float):
    a, b, c = tmp_path / "a.onnx", tmp_path / "b.onnx", tmp_path / "c.onnx"
    info_a = build_clip_image_onnx(a, arch="tiny", seed=0)
    build_clip_image_onnx(b, arch="tiny", seed=0)
    build_clip_image_onnx(c, arch="tiny", seed=1)
    assert a.read_bytes() == b.read_bytes() == tiny_float.read_bytes()
    assert info_a["sha256"] == json.loads((tmp_path / "b.onnx.json").read_text())["sha256"]
    wa, wc = initializers(a), initializers(c)
    assert wa.keys() == wc.keys()
    for name in wa:
        if "ln_" in name:  # LayerNorms are initialised to 1 / 0 whatever the seed
            continue
        assert not np.array_equal(wa[name], wc[name]), name


def test_streamed_file_equals_canonical_serialisation(tiny_float, tiny_uint8):
    """The builder writes protobuf by hand, field by field; it must be what onnx would write."""
    for path, kind in ((tiny_float, "float"), (tiny_uint8, "uint8")):
        proto = modelgen.make_model_proto("tiny", seed=0, input_kind=kind)
        assert path.read_bytes() == proto.SerializeToString()


# --- files, sidecar, info ------------------------------------------------------------------------


def test_build_writes_sidecar_and_returns_info(tmp_path):
    path = tmp_path / "sub" / "m.onnx"
    info = build_clip_image_onnx(path, arch="tiny", seed=5, input_kind="uint8")
    expected = {
        "arch": "tiny", "seed": 5, "synthetic": True, "params": param_count("tiny"),
        "input_kind": "uint8", "input_name": "pixels", "input_shape": ["batch", 224, 224, 3],
        "output_name": "embedding", "output_dim": 512, "opset": 17, "format": "onnx",
        "builder": "clip-pipeline modelgen",
        "note": "SYNTHETIC random weights: embeddings carry no meaning",
    }
    assert {k: info[k] for k in expected} == expected
    assert info["file_bytes"] == path.stat().st_size
    assert json.loads((tmp_path / "sub" / "m.onnx.json").read_text()) == info
    assert read_model_info(path) == info
    # no temp files left behind, and an ordinary file mode
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.onnx", "m.onnx.json"]
    assert path.stat().st_mode & 0o777 == 0o644


def test_build_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="input_kind"):
        build_clip_image_onnx(tmp_path / "x.onnx", arch="tiny", input_kind="float16")
    with pytest.raises(ValueError, match="unknown arch"):
        build_clip_image_onnx(tmp_path / "x.onnx", arch="nope")
    assert list(tmp_path.iterdir()) == []


def test_read_model_info_falls_back_to_metadata(tmp_path):
    path = tmp_path / "m.onnx"
    build_clip_image_onnx(path, arch="tiny", seed=3)
    os.remove(tmp_path / "m.onnx.json")
    info = read_model_info(path)
    assert info["synthetic"] is True and info["arch"] == "tiny" and info["seed"] == 3
    assert info["input_name"] == "image" and info["input_shape"] == ["batch", 3, 224, 224]
    assert info["output_name"] == "embedding" and info["output_dim"] == 512
    assert info["params"] == param_count("tiny") and info["opset"] == 17


def foreign_onnx(path):
    """A stand-in for a real (non-synthetic) model: no sidecar, no clip_pipeline metadata."""
    node = helper.make_node("ReduceMean", ["image"], ["output"], axes=[2, 3], keepdims=0)
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, ["n", 3, 224, 224])],
        [helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, ["n", 3])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_read_model_info_of_a_real_model(tmp_path):
    path = tmp_path / "clip_image_vitb32.onnx"
    foreign_onnx(path)
    info = read_model_info(path)
    assert info["synthetic"] is False and info["arch"] == "unknown"
    assert info["input_name"] == "image" and info["output_name"] == "output"
    bm = tmp_path / "clip_image_vitb32_bm1684x_f16_8b.bmodel"
    bm.write_bytes(b"\0" * 64)
    info = read_model_info(bm)
    assert info["synthetic"] is False and info["format"] == "bmodel"
    assert read_model_info(tmp_path / "missing.onnx")["synthetic"] is False
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\xff\xfe not a protobuf" * 8)
    assert read_model_info(junk)["synthetic"] is False


def test_stale_sidecar_is_ignored(tmp_path):
    """A real model copied over a synthetic one must not be reported as synthetic."""
    path = tmp_path / "m.onnx"
    build_clip_image_onnx(path, arch="tiny")
    foreign_onnx(path)
    assert read_model_info(path)["synthetic"] is False


# --- quantisation ---------------------------------------------------------------------------------


def test_quantize_int8_tiny(tiny_float, tmp_path):
    dst = tmp_path / "tiny_int8.onnx"
    info = quantize_int8(tiny_float, dst)
    assert info["quantized"] == "int8-dynamic" and info["synthetic"] is True
    assert info["arch"] == "tiny" and info["input_name"] == "image"
    assert read_model_info(dst) == info
    model = onnx.load(str(dst))
    assert any(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") for n in model.graph.node)
    props = {p.key: p.value for p in model.metadata_props}
    assert props["clip_pipeline.synthetic"] == "true"
    assert props["clip_pipeline.quantized"] == "int8-dynamic"
    image = normalise(random_pixels(8, seed=9))
    ref, q = run(tiny_float, image), run(dst, image)
    cos = cosine(q, ref)
    print(f"int8 vs fp32 tiny: cosine min {cos.min():.6f} mean {cos.mean():.6f}")
    assert cos.min() > 0.99
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny_int8.onnx", "tiny_int8.onnx.json"]


# --- the full-size model ------------------------------------------------------------------------


@pytest.mark.slow
def test_vit_b32_full_size(tmp_path):
    f32, u8 = tmp_path / "b32.onnx", tmp_path / "b32_u8.onnx"
    info = build_clip_image_onnx(f32, arch="vit-b32", seed=0)
    assert info["params"] == 87_849_216
    assert n_initializer_values(f32) == 87_849_216
    assert 340e6 < f32.stat().st_size < 360e6
    build_clip_image_onnx(u8, arch="vit-b32", seed=0, input_kind="uint8")
    pixels = random_pixels(2, seed=11)
    out_f = run(f32, normalise(pixels))
    out_u = run(u8, pixels)
    assert out_f.shape == out_u.shape == (2, 512)
    cos = cosine(out_u, out_f).min()
    diff = np.abs(out_u - out_f).max()
    print(f"uint8 vs float vit-b32: max abs diff {diff:.3g}, min cosine {cos:.8f}")
    assert cos > 0.99999
    assert np.isfinite(out_f).all()
