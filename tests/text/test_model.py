"""CLIP text tower: the ONNX builder (both forms, both activations) against an independent numpy
forward pass and against open_clip; the host gather/projection; fixed batches."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from pipeline.model import modelgen
from pipeline.text.embed import TextEncoder, TextModelError, find_projection
from pipeline.text.model import build_clip_text_onnx, make_text_model_proto, projection_path, state_dict, text_param_count
from pipeline.text.tokenizer import get_tokenizer
from tests.open_clip_helpers import open_clip_module

PROMPTS = ["a photo of a dog.", "Hi there", "", "x " * 100, "an ÆØÅ emoji 🐶 prompt, with punctuation!!"]


@pytest.fixture(scope="module")
def ids() -> np.ndarray:
    return get_tokenizer()(PROMPTS).ids


def _run(model: onnx.ModelProto, ids: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"text": ids})[0]


# -- an independent forward pass in numpy, from the OpenAI-style state_dict ------------------------
def _ln(x, w, b, eps=1e-5):
    m = x.mean(-1, keepdims=True)
    v = ((x - m) ** 2).mean(-1, keepdims=True)
    return (x - m) / np.sqrt(v + eps) * w + b


def _numpy_encode_text(sd: dict, ids: np.ndarray, heads: int, act: str) -> tuple[np.ndarray, np.ndarray]:
    """CLIP.encode_text in float64 numpy; returns (ln_final states [B,T,w], projected [B,out])."""
    sd = {k: v.astype(np.float64) for k, v in sd.items()}
    x = sd["token_embedding.weight"][ids] + sd["positional_embedding"]
    b_, t, w = x.shape
    hd = w // heads
    mask = np.triu(np.full((t, t), -np.inf), 1)
    layers = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
    for i in range(layers):
        p = f"transformer.resblocks.{i}."
        y = _ln(x, sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
        qkv = y @ sd[p + "attn.in_proj_weight"].T + sd[p + "attn.in_proj_bias"]
        q, k, v = np.split(qkv, 3, axis=-1)
        q, k, v = (a.reshape(b_, t, heads, hd).transpose(0, 2, 1, 3) for a in (q, k, v))
        s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        o = (s @ v).transpose(0, 2, 1, 3).reshape(b_, t, w)
        x = x + o @ sd[p + "attn.out_proj.weight"].T + sd[p + "attn.out_proj.bias"]
        y = _ln(x, sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
        h = y @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"]
        if act == "quickgelu":
            h = h / (1 + np.exp(-1.702 * h))
        else:
            from math import erf

            h = 0.5 * h * (1 + np.vectorize(erf)(h / np.sqrt(2)))
        x = x + h @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]
    states = _ln(x, sd["ln_final.weight"], sd["ln_final.bias"])
    return states, states[np.arange(b_), ids.argmax(-1)] @ sd["text_projection"]


@pytest.mark.parametrize("act", ["quickgelu", "gelu"])
def test_text_tower_matches_an_independent_numpy_forward(tmp_path, ids, act):
    info = build_clip_text_onnx(tmp_path / "t.onnx", arch="tiny", seed=3, form="projected", act=act)
    assert info["clip_model"] == modelgen.clip_model_id("tiny", 3, act) and info["synthetic"] is True
    sd = state_dict(tmp_path / "t.onnx")
    assert sd["transformer.resblocks.0.attn.in_proj_weight"].shape == (192, 64)
    states_ref, proj_ref = _numpy_encode_text(sd, ids, heads=2, act=act)
    model, _ = make_text_model_proto("tiny", 3, "projected", act)
    got = _run(model, ids)
    assert got.shape == (len(PROMPTS), 512)
    np.testing.assert_allclose(got, proj_ref, atol=2e-5, rtol=1e-4)
    ms, proj = make_text_model_proto("tiny", 3, "states", act)
    states = _run(ms, ids)
    assert states.shape == (len(PROMPTS), 77, 64)
    np.testing.assert_allclose(states, states_ref, atol=2e-5, rtol=1e-4)
    np.testing.assert_array_equal(proj, sd["text_projection"])


def test_quickgelu_and_gelu_differ_for_both_towers(ids):
    q = _run(make_text_model_proto("tiny", 0, "projected", "quickgelu")[0], ids)
    g = _run(make_text_model_proto("tiny", 0, "projected", "gelu")[0], ids)
    assert np.abs(q - g).max() > 1e-3
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224), dtype=np.float32)
    qi = _run_image(modelgen.make_model_proto("tiny", 0, "float", "quickgelu"), x)
    gi = _run_image(modelgen.make_model_proto("tiny", 0, "float", "gelu"), x)
    assert np.abs(qi - gi).max() > 1e-3


def _run_image(model, x):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]


def test_causal_mask_and_eot_gather(ids):
    model, proj = make_text_model_proto("tiny", 0, "states")
    a = ids[:1].copy()
    b = a.copy()
    b[0, 5] = 999  # change a token after the EOT (position 7 of "a photo of a dog.")
    sa, sb = _run(model, a), _run(model, b)
    np.testing.assert_array_equal(sa[0, :5], sb[0, :5])  # earlier positions cannot see later ones
    assert np.abs(sa[0, 5:] - sb[0, 5:]).max() > 1e-4


def test_streamed_file_equals_the_proto_and_param_count(tmp_path):
    assert text_param_count("vit-b32") == 63_428_096  # OpenAI CLIP ViT-B/32's text tower
    for form in ("projected", "states"):
        info = build_clip_text_onnx(tmp_path / f"{form}.onnx", arch="tiny", seed=1, form=form)
        model, proj = make_text_model_proto("tiny", 1, form)
        assert info["sha256"] == hashlib.sha256(model.SerializeToString()).hexdigest()
        assert sum(int(np.prod(t.dims)) for t in model.graph.initializer) + (proj.size if proj is not None else 0) \
            == text_param_count("tiny")
    np.testing.assert_array_equal(np.load(projection_path(tmp_path / "states.onnx")), make_text_model_proto("tiny", 1, "states")[1])


def test_both_forms_give_the_same_embeddings_through_the_encoder(tmp_path):
    build_clip_text_onnx(tmp_path / "p.onnx", arch="tiny", seed=0, form="projected")
    build_clip_text_onnx(tmp_path / "s.onnx", arch="tiny", seed=0, form="states")
    a = TextEncoder(tmp_path / "p.onnx").embed(PROMPTS)
    b = TextEncoder(tmp_path / "s.onnx", batch_size=2).embed(PROMPTS)
    assert a.embeddings.shape == (5, 512) and b.embeddings.shape == (5, 512)
    np.testing.assert_allclose(a.embeddings, b.embeddings, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(a.embeddings, axis=1), 1.0, atol=1e-6)
    assert a.tokens.truncated == [3]


def test_sophgo_projection_name_and_missing_projection(tmp_path):
    build_clip_text_onnx(tmp_path / "clip_text.onnx", arch="tiny", seed=0, form="states")
    own = projection_path(tmp_path / "clip_text.onnx")
    sophgo = tmp_path / "text_projection_64_512.npy"
    own.rename(sophgo)
    assert find_projection(tmp_path / "clip_text.onnx", 64) == sophgo
    assert TextEncoder(tmp_path / "clip_text.onnx").dim == 512
    sophgo.unlink()
    with pytest.raises(TextModelError, match=r"needs its projection"):
        TextEncoder(tmp_path / "clip_text.onnx")


def test_fixed_batch_model_is_padded_and_trimmed(tmp_path):
    """A text model exported with a static batch of 4 (as a bmodel is) gets zero rows and loses them again."""
    model, _ = make_text_model_proto("tiny", 0, "projected")
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4
    onnx.save(model, tmp_path / "b4.onnx")
    build_clip_text_onnx(tmp_path / "dyn.onnx", arch="tiny", seed=0, form="projected")
    enc = TextEncoder(tmp_path / "b4.onnx", batch_size=32)
    assert enc.batch_size == 4
    got = enc.embed(PROMPTS).embeddings  # 5 prompts: batches of 4 and 1 (+3 zero rows)
    want = TextEncoder(tmp_path / "dyn.onnx").embed(PROMPTS).embeddings
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_an_image_model_is_not_a_text_model(tmp_path, tiny_model):
    with pytest.raises(TextModelError, match="is not a CLIP text model"):
        TextEncoder(tiny_model)


# -- open_clip parity (CI installs torch + open_clip_torch; skipped without them) ---------------------
def _open_clip_model(act: str, arch: str = "tiny"):
    m = open_clip_module("model")
    if arch == "tiny":
        vision = m.CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=32, image_size=224)
        text = m.CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=2, layers=2)
    else:
        vision = m.CLIPVisionCfg(layers=12, width=768, patch_size=32, image_size=224)
        text = m.CLIPTextCfg(context_length=77, vocab_size=49408, width=512, heads=8, layers=12)
    return m.CLIP(embed_dim=512, vision_cfg=vision, text_cfg=text, quick_gelu=(act == "quickgelu")).eval()


@pytest.mark.parametrize("act", ["quickgelu", "gelu"])
def test_open_clip_parity_text_and_image(tmp_path, ids, act):
    """Our weights loaded into open_clip's CLIP (built untrained, as create_model(pretrained=None)):
    encode_text and encode_image agree within 1e-5."""
    model = _open_clip_model(act)
    import torch

    build_clip_text_onnx(tmp_path / "t.onnx", arch="tiny", seed=5, act=act)
    modelgen.build_clip_image_onnx(tmp_path / "i.onnx", arch="tiny", seed=5, act=act)
    sd = {**state_dict(tmp_path / "t.onnx"), **state_dict(tmp_path / "i.onnx")}
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()},
                                                strict=False)
    assert set(missing) <= {"logit_scale"} and not unexpected, (missing, unexpected)
    with torch.no_grad():
        want_t = model.encode_text(torch.from_numpy(ids.astype(np.int64))).numpy()
        x = np.random.default_rng(0).standard_normal((2, 3, 224, 224), dtype=np.float32)
        want_i = model.encode_image(torch.from_numpy(x)).numpy()
    got_t = TextEncoder(tmp_path / "t.onnx").embed(PROMPTS, normalize=False).embeddings
    np.testing.assert_allclose(got_t, want_t, atol=1e-5, rtol=1e-5)
    got_i = ort.InferenceSession(str(tmp_path / "i.onnx")).run(None, {"image": x})[0]
    np.testing.assert_allclose(got_i, want_i, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_open_clip_parity_vitb32_text(tmp_path, ids):
    """The full-size text tower (63.4 M parameters) in open_clip's ViT-B-32 CLIP: within 1e-5."""
    model = _open_clip_model("quickgelu", arch="vit-b32")
    import torch

    build_clip_text_onnx(tmp_path / "t.onnx", arch="vit-b32", seed=0)
    sd = state_dict(tmp_path / "t.onnx")
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=False)
    assert not unexpected and {k for k in missing if not k.startswith("visual.")} <= {"logit_scale"}
    with torch.no_grad():
        want = model.encode_text(torch.from_numpy(ids.astype(np.int64))).numpy()
    got = TextEncoder(tmp_path / "t.onnx").embed(PROMPTS, normalize=False).embeddings
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
