"""What embed-text and classify write: text embeddings + prompts, zero-shot predictions.

embed-text OUT::

    OUT/manifest.json     kind "text", model identity (sha256, synthetic flag), tokenizer (vocab sha256, ftfy),
                          normalisation, dtype, counts, truncated prompts, pairing with an image run if given
    OUT/embeddings.npy    float32 (or float16) [n, dim], L2-normalised by default, row i = prompt i
    OUT/prompts.jsonl     {"row", "text", "source", "tokens", "truncated"} per prompt, in row order

classify (default DIR = IMAGE_OUT/zeroshot)::

    DIR/manifest.json        image run, text model, pairing, labels, templates, top-k, synthetic flags
    DIR/predictions.csv      path, label_1, prob_1, ..., label_k, prob_k (one row per embedded image)
    DIR/predictions.jsonl    {"path", "top": [{"label", "prob", "logit"}, ...]}
    DIR/class_embeddings.npy float32 [classes, dim], the normalised template-ensembled class embeddings
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.rundir import MANIFEST, SYNTHETIC_NOTE, atomic_write_bytes, atomic_write_json, npy_bytes, software_versions

TEXT_FORMAT = "clip-pipeline-text/1"
ZEROSHOT_FORMAT = "clip-pipeline-zeroshot/1"
LOGIT_SCALE = 100.0  # CLIP ViT-B/32's learned logit scale, exp(4.6052) = 100


def prepare_dir(out: Path, kind: str) -> None:
    """OUT may be new, empty, or a previous output of the same kind (overwritten); never an image run."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"output path {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        m = out / MANIFEST
        try:
            old = json.loads(m.read_text())
        except (OSError, ValueError):
            old = None
        if not isinstance(old, dict) or old.get("kind") != kind:
            raise ValueError(f"output directory {out} is not empty and holds no previous {kind} output; "
                             "choose another --output")
    out.mkdir(parents=True, exist_ok=True)


def write_text_output(out: Path, emb: np.ndarray, prompts: Sequence, tokens, identity: dict, tokenizer_info: dict,
                      normalize: bool, dtype: str, backend: str, pairing: dict | None = None) -> dict:
    prepare_dir(out, "text")
    arr = emb.astype(dtype)
    lines = []
    for i, p in enumerate(prompts):
        lines.append(json.dumps({"row": i, "text": p.text, "source": p.source, "tokens": int(tokens.lengths[i]),
                                 "truncated": bool(tokens.lengths[i] > tokens.context_length)}, ensure_ascii=False))
    atomic_write_bytes(out / "prompts.jsonl", ("\n".join(lines) + "\n").encode())
    atomic_write_bytes(out / "embeddings.npy", npy_bytes(arr))
    synthetic = bool(identity.get("synthetic"))
    m: dict[str, Any] = {
        "format": TEXT_FORMAT, "kind": "text", "status": "complete",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": identity, "synthetic_weights": synthetic, "backend": backend,
        "tokenizer": tokenizer_info, "normalize": normalize, "dtype": dtype,
        "count": len(prompts), "dim": int(arr.shape[1]),
        "truncated": [i for i in range(len(prompts)) if tokens.lengths[i] > tokens.context_length],
        "versions": software_versions(),
    }
    if pairing:
        m["pairing"] = pairing
    if synthetic:
        m["warning"] = SYNTHETIC_NOTE
    atomic_write_json(out / MANIFEST, m)
    return m


def class_embeddings(encode: Callable[[list[str]], np.ndarray], labels: Sequence[str], templates: Sequence[str]) -> np.ndarray:
    """CLIP's prompt ensembling: per class, the mean of its normalised template embeddings, renormalised."""
    texts = [t.replace("{}", c) for c in labels for t in templates]
    emb = encode(texts).reshape(len(labels), len(templates), -1)
    emb = emb / np.maximum(np.linalg.norm(emb, axis=2, keepdims=True), 1e-12)
    cls = emb.mean(axis=1)
    return (cls / np.maximum(np.linalg.norm(cls, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def zero_shot(image_emb, classes: np.ndarray, top_k: int, normalized: bool, chunk: int = 65536):
    """Yield (top indices [m,k], probs [m,k], logits [m,k]) per chunk of image rows.

    logits = 100 * image . class (image rows normalised here when the run did not); probs = softmax over all classes.
    """
    n = len(image_emb)
    k = min(top_k, classes.shape[0])
    for s in range(0, n, chunk):
        x = np.asarray(image_emb[s:s + chunk], dtype=np.float32)
        if not normalized:
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        logits = LOGIT_SCALE * (x @ classes.T)
        z = logits - logits.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        top = np.argsort(-p, axis=1, kind="stable")[:, :k]
        rows = np.arange(len(x))[:, None]
        yield top, p[rows, top], logits[rows, top]


def write_predictions(out: Path, paths: Sequence[str], results, labels: Sequence[str], top_k: int) -> int:
    """Write predictions.csv and predictions.jsonl from zero_shot()'s chunks; returns rows written."""
    k = min(top_k, len(labels))
    csv_tmp = out / ".predictions.csv.tmp"
    jsonl_tmp = out / ".predictions.jsonl.tmp"
    n = 0
    with open(csv_tmp, "w", newline="", encoding="utf-8") as fc, open(jsonl_tmp, "w", encoding="utf-8") as fj:
        w = csv.writer(fc)
        header = ["path"]
        for r in range(1, k + 1):
            header += [f"label_{r}", f"prob_{r}"]
        w.writerow(header)
        for top, prob, logit in results:
            buf = io.StringIO()
            for i in range(len(top)):
                path = paths[n]
                row = [path]
                tops = []
                for j in range(k):
                    lab = labels[int(top[i, j])]
                    row += [lab, f"{prob[i, j]:.6f}"]
                    tops.append({"label": lab, "prob": round(float(prob[i, j]), 6), "logit": round(float(logit[i, j]), 4)})
                w.writerow(row)
                buf.write(json.dumps({"path": path, "top": tops}, ensure_ascii=False) + "\n")
                n += 1
            fj.write(buf.getvalue())
        for f in (fc, fj):
            f.flush()
            os.fsync(f.fileno())
    os.replace(csv_tmp, out / "predictions.csv")
    os.replace(jsonl_tmp, out / "predictions.jsonl")
    return n
