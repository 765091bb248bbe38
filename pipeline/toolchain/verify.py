"""Compare a bmodel on the BM1684X simulator with onnxruntime (fp32, CPU) on the same inputs."""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .compile import bmodel_info
from .parse import stage_batches
from .preprocess import load_images_u8, normalize_u8, random_token_ids, random_u8_images
from .runner import BmodelRunner


@dataclass
class Comparison:
    label: str
    rows: int
    max_abs_diff: float
    cos_min: float
    cos_mean: float
    sim_seconds: float
    nn_top1_agreement: float | None = None  # images only: same nearest neighbour as onnxruntime's

    def line(self) -> str:
        nn = "" if self.nn_top1_agreement is None else f" nn_top1_agreement={self.nn_top1_agreement:.4f}"
        return (f"{self.label:<24} rows={self.rows:<4} max_abs_diff={self.max_abs_diff:.6g} "
                f"cos_min={self.cos_min:.7f} cos_mean={self.cos_mean:.7f}{nn} sim={self.sim_seconds:.1f}s")


@dataclass
class VerifyResult:
    bmodel: str
    onnx: str
    fused_preprocess: bool
    comparisons: list[Comparison] = field(default_factory=list)
    text: bool = False

    @property
    def cos_min(self) -> float:
        return min(c.cos_min for c in self.comparisons)

    @property
    def max_abs_diff(self) -> float:
        return max(c.max_abs_diff for c in self.comparisons)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(a.shape[0], -1).astype(np.float64)
    b = b.reshape(b.shape[0], -1).astype(np.float64)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.maximum(den, 1e-30)


def compare(label: str, got: np.ndarray, ref: np.ndarray, secs: float = 0.0) -> Comparison:
    cos = cosine_rows(got, ref)
    return Comparison(label, int(got.shape[0]), float(np.abs(got.astype(np.float64) - ref).max()),
                      float(cos.min()), float(cos.mean()), secs)


def nn_top1_agreement(got: np.ndarray, ref: np.ndarray) -> float:
    """Fraction of rows whose nearest neighbour (cosine, itself excluded) among the other rows is
    the same with ``got`` embeddings as with ``ref`` ones -- what a search over these images sees."""
    def top1(e: np.ndarray) -> np.ndarray:
        e = e.reshape(e.shape[0], -1).astype(np.float64)
        e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-30)
        s = e @ e.T
        np.fill_diagonal(s, -np.inf)
        return s.argmax(1)
    if got.shape[0] < 2:
        raise ValueError("nearest-neighbour agreement needs at least two images")
    return float((top1(got) == top1(ref)).mean())


def onnx_for(bmodel) -> str | None:
    """The source ONNX recorded in the bmodel's sidecar, if it still exists."""
    side = Path(str(bmodel) + ".json")
    if side.is_file():
        p = json.loads(side.read_text()).get("onnx", {}).get("path")
        if p and Path(p).is_file():
            return p
    return None


def verify(bmodel, onnx_path=None, seed: int = 0, images_dir=None, max_images: int | None = 64,
           batches: Sequence[int] | None = None, venv=None,
           log: Callable[[str], None] = print, texts_file=None, max_texts: int | None = 64) -> VerifyResult:
    """Run ``bmodel`` on the simulator and onnxruntime on the same inputs; one comparison per stage
    (seeded random uint8 images, CLIP-normalised unless the bmodel fuses preprocessing), plus one
    over real images from ``images_dir`` if given (reference preprocessing, padded to the batch).

    A text encoder: seeded rows shaped like token ids per stage, plus, with ``texts_file``, its
    first ``max_texts`` captions (project tokenizer, padded with zero rows to the batch), compared
    as the embedding the pipeline uses: the states at the end token (argmax of the ids) times the
    projection beside the bmodel for a states-form model; a projected model's output as it is."""
    import onnxruntime as ort

    bmodel = Path(bmodel)
    if not bmodel.is_file():
        raise FileNotFoundError(f"bmodel not found: {bmodel}")
    onnx_path = onnx_path or onnx_for(bmodel)
    if not onnx_path:
        raise ValueError("no --onnx given and the bmodel's sidecar names no existing ONNX")
    info = bmodel_info(bmodel, venv)
    stages = stage_batches(info)
    inp = info["networks"][0]["stages"][0]["inputs"][0]
    fused = inp["dtype"] == "uint8"
    size = inp["shape"][-1]
    text = len(inp["shape"]) == 2  # a text encoder: token ids [B, 77]
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    in_name = sess.get_inputs()[0].name
    result = VerifyResult(str(bmodel), str(onnx_path), fused, text=text)
    if text and images_dir:
        raise ValueError(f"--images is for image encoders; {bmodel.name} takes token ids: use --texts FILE")
    if texts_file and not text:
        raise ValueError(f"--texts is for text encoders; {bmodel.name} takes images: use --images DIR")
    log(f"[verify] {bmodel.name}: network {info['networks'][0]['name']}, stages (batch) {stages}, "
        f"input {inp['name']} {inp['dtype']}{' (fused CLIP preprocessing)' if fused else ''}")
    todo = [b for b in stages if not batches or b in batches]
    if not todo:
        raise ValueError(f"none of the batches {list(batches)} is a stage of {bmodel.name} ({stages})")

    with BmodelRunner(bmodel, venv=venv) as runner:
        def run(u8: np.ndarray) -> tuple[np.ndarray, float]:
            x = u8 if fused else normalize_u8(u8)
            (y,) = runner.forward([x])
            return y, runner.last_seconds or 0.0

        for k, b in enumerate(todo):
            if text:
                ids = random_token_ids(b, size, seed=seed + k)
                t0 = runner.last_seconds
                (y,) = runner.forward([ids])
                ref = sess.run(None, {in_name: ids.astype(_ort_int(sess))})[0]
                c = compare(f"token ids seed={seed + k} b={b}", y, ref, runner.last_seconds or t0 or 0.0)
                result.comparisons.append(c)
                log("[verify] " + c.line())
                continue
            u8 = random_u8_images(b, seed=seed + k, size=size)
            y, secs = run(u8)
            ref = sess.run(None, {in_name: normalize_u8(u8)})[0]
            c = compare(f"random seed={seed + k} b={b}", y, ref, secs)
            result.comparisons.append(c)
            log("[verify] " + c.line())
        if texts_file:
            result.comparisons.append(_compare_texts(runner, sess, bmodel, texts_file, max_texts, size, max(todo), log))
        if images_dir and not text:
            paths, u8 = load_images_u8(images_dir, size=size, limit=max_images)
            if not len(paths):
                raise ValueError(f"no images found under {images_dir}")
            b = max(todo)
            ys, secs = [], 0.0
            for s in range(0, len(u8), b):
                chunk = u8[s:s + b]
                n = len(chunk)
                if n < b:  # pad with copies of the last image to the static batch
                    chunk = np.concatenate([chunk, np.repeat(chunk[-1:], b - n, axis=0)])
                y, t = run(chunk)
                ys.append(y[:n])
                secs += t
            ref = np.concatenate([sess.run(None, {in_name: normalize_u8(u8[s:s + b])})[0]
                                  for s in range(0, len(u8), b)])
            got = np.concatenate(ys)
            c = compare(f"images n={len(paths)} b={b}", got, ref, secs)
            if len(paths) >= 2:
                c.nn_top1_agreement = nn_top1_agreement(got, ref)
            result.comparisons.append(c)
            log("[verify] " + c.line())
    return result


def _compare_texts(runner, sess, bmodel: Path, texts_file, max_texts: int | None, context: int, b: int,
                   log: Callable[[str], None]) -> Comparison:
    """Captions through the bmodel (simulator) and onnxruntime; the embeddings the pipeline uses."""
    from .compile import read_captions, tokenize_captions

    caps = read_captions(texts_file, max_texts)
    if not caps:
        raise ValueError(f"--texts {texts_file}: no captions (one per line, UTF-8)")
    ids = tokenize_captions(caps, context)
    proj = _projection_of(bmodel)
    in_name = sess.get_inputs()[0].name
    ys, secs = [], 0.0
    for s in range(0, len(ids), b):
        chunk = ids[s:s + b]
        n = len(chunk)
        if n < b:  # zero rows to the static batch, as embed-text does
            chunk = np.concatenate([chunk, np.zeros((b - n, context), np.int32)])
        (y,) = runner.forward([chunk])
        ys.append(y[:n])
        secs += runner.last_seconds or 0.0
    got = np.concatenate(ys)
    ref = np.concatenate([sess.run(None, {in_name: ids[s:s + b].astype(_ort_int(sess))})[0]
                          for s in range(0, len(ids), b)])
    eot = ids.argmax(1)
    if got.ndim == 3:  # states form: the end token's state, projected as the host does
        got, ref = got[np.arange(len(ids)), eot], ref[np.arange(len(ids)), eot]
        if proj is not None:
            got, ref = got @ proj, ref @ proj
    c = compare(f"texts n={len(caps)} b={b}" + (" (eot state @ projection)" if proj is not None else ""),
                got, ref, secs)
    if len(caps) >= 2:
        c.nn_top1_agreement = nn_top1_agreement(got, ref)
    log("[verify] " + c.line())
    return c


def _projection_of(bmodel: Path):
    """A states-form text bmodel's projection (``<stem>.text_projection.npy`` beside it), or None."""
    p = bmodel.with_name(bmodel.stem + ".text_projection.npy")
    return np.load(p).astype(np.float64) if p.is_file() else None


def _ort_int(sess) -> type:
    return np.int64 if sess.get_inputs()[0].type == "tensor(int64)" else np.int32
