#!/usr/bin/env python3
"""bf16 (or int8) vs fp32 on the openvino backend: how far it moves the embeddings of YOUR model.

    python3 scripts/bf16_parity.py --model models/clip-vit-b32-synthetic.onnx \\
        --text-model models/clip-text-vit-b32-seed0-quickgelu-synthetic.onnx --json parity.json
    python3 scripts/bf16_parity.py --open-clip-export /tmp/oc    # open_clip's random-init ViT-B-32,
                                                                 # exported as a user would (torch.onnx)

Image tower: every photo of --images (default ../shared/bench/corpus-1k, 1000 JPEGs) is decoded and
cropped once (preprocess.mode "reference"), then embedded by OpenVINO at bf16 and at fp32 and by
onnxruntime fp32 (the cpu backend). Reported per pair: cosine min / mean / 1st percentile over the
photos, and nearest-neighbour top-1 agreement: for each photo, whether its nearest other photo
(cosine, the photo itself excluded) is the same under both engines, i.e. whether search results change.
Text tower (--text-model): the same figures over --prompts prompts "a photo of a <word>." built from
CLIP's vocabulary (deterministic).

--precision int8: the image tower quantised by NNCF as a run with openvino.precision = "int8" does
(the same code and cache), calibrated on --calibration-count photos of --calibration (default: the
--images directory itself, i.e. 300 of the 1000 evaluated photos). When the calibration photos are
among the evaluated ones, the figures are also given over the evaluated photos that were NOT used
for calibration ("held_out"). Text towers are not quantised (int8 refuses --text-model).

    python3 scripts/bf16_parity.py --precision int8 --model models/clip-vit-b32-synthetic.onnx --json int8.json

The weights decide how well bf16 does: synthetic and random-init weights are NOT trained weights.
Run this same command on your trained model before switching a production run to bf16. Accuracy
figures, not timings: a loaded machine changes how long it takes, not the numbers.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

DEFAULT_CORPUS = ROOT.parent / "shared" / "bench" / "corpus-1k"


def crops(images: Path, n: int) -> tuple[np.ndarray, list[str]]:
    from pipeline.data.images import DecodeOptions, crop, decode_file

    files = sorted(p for p in images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:n]
    if not files:
        sys.exit(f"error: no photos in {images} (--images DIR)")
    opts = DecodeOptions()
    return np.stack([crop(decode_file(os.fsencode(f), opts), "reference") for f in files]), [f.name for f in files]


def compare(a: np.ndarray, b: np.ndarray) -> dict:
    """Cosine per row, and leave-one-out nearest-neighbour agreement between two embeddings of the same rows."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    cos = (a * b).sum(1)
    nn, sims = [], []
    for e in (a, b):
        s = e @ e.T
        np.fill_diagonal(s, -np.inf)
        nn.append(s.argmax(1))
        sims.append(s)
    s = sims[1]  # the scale to read the figures against: how close *different* rows are, and the NN margin
    top2 = np.sort(s, axis=1)[:, -2:]
    return {"n": len(a), "cosine_min": round(float(cos.min()), 6), "cosine_mean": round(float(cos.mean()), 6),
            "cosine_p01": round(float(np.percentile(cos, 1)), 6),
            "nn_top1_agreement": round(float((nn[0] == nn[1]).mean()), 4),
            "reference_mean_cosine_between_different_rows": round(float(s[np.isfinite(s)].mean()), 4),
            "reference_median_nn_margin": round(float(np.median(top2[:, 1] - top2[:, 0])), 6)}


def embed_image(model: str, engine: str, pixels: np.ndarray, batch: int, threads: int,
                calibration: dict | None = None) -> tuple[np.ndarray, float]:
    """The photos' embeddings by `engine` ("ort", or an openvino precision) and the seconds they took
    (int8: the quantisation, made once and cached as a run makes it, is not counted)."""
    from pipeline import config
    from pipeline.backends import get_backend

    raw = {"model": {"path": model, "batch_size": batch}, "infer": {"backend": "cpu" if engine == "ort" else "openvino",
                                                                      "threads": threads}}
    if engine != "ort":
        raw["openvino"] = {"precision": engine, **(calibration if engine == "int8" else {})}
    cfg = config.from_dict(raw)
    if engine == "int8":
        from pipeline.backends.openvino import int8_model

        int8_model(cfg, lambda m: print(m, file=sys.stderr))
    dev = get_backend(cfg.infer.backend).open_device(cfg, "cpu:0")
    out = []
    t0 = time.monotonic()
    for i in range(0, len(pixels), batch):
        out.append(dev.embed(pixels[i:i + batch]))
    return np.concatenate(out), time.monotonic() - t0


def prompts(n: int) -> list[str]:
    from pipeline.text.tokenizer import get_tokenizer

    tok = get_tokenizer()
    words = sorted({w[:-4] for w in tok.encoder if w.endswith("</w>") and w[:-4].isalpha() and len(w) > 6})
    pick = np.random.default_rng(0).choice(len(words), size=min(n, len(words)), replace=False)
    return [f"a photo of a {words[i]}." for i in sorted(pick)]


def embed_text(model: str, engine: str, texts: list[str], threads: int) -> tuple[np.ndarray, float]:
    from pipeline.text.embed import TextEncoder

    enc = TextEncoder(model, backend="cpu" if engine == "ort" else "openvino", threads=threads, precision=engine)
    t0 = time.monotonic()
    emb = enc.embed(texts, normalize=False).embeddings
    return emb, time.monotonic() - t0


def tower_report(emb: dict[str, np.ndarray], secs: dict[str, float], precision: str = "bf16") -> dict:
    return {f"{precision}_vs_fp32": compare(emb[precision], emb["fp32"]),
            f"{precision}_vs_onnxruntime_fp32": compare(emb[precision], emb["ort"]),
            "fp32_vs_onnxruntime_fp32": compare(emb["fp32"], emb["ort"]),
            "seconds": {k: round(v, 2) for k, v in secs.items()}}


def held_out(images: Path, names: list[str], cal: Any, emb: dict[str, np.ndarray], precision: str) -> dict | None:
    """The figures over the evaluated photos that did not calibrate (None when none did)."""
    used = {os.path.realpath(os.path.join(cal.directory, f)) for f in cal.files}
    keep = np.array([os.path.realpath(images / n) not in used for n in names])
    if keep.all():
        return None
    return {"photos": int(keep.sum()), "calibration_photos_among_evaluated": int((~keep).sum()),
            f"{precision}_vs_fp32": compare(emb[precision][keep], emb["fp32"][keep])}


def open_clip_export(dest: Path) -> tuple[str, str]:
    """open_clip's ViT-B-32 CLIP with its own random initialisation (create_model(pretrained=None)'s
    architecture, untrained), both towers exported with torch.onnx as a user exports their model."""
    sys.path.insert(0, str(ROOT / "tests"))
    import torch
    from open_clip_helpers import open_clip_module

    m = open_clip_module("model")
    torch.manual_seed(0)
    model = m.CLIP(embed_dim=512, quick_gelu=True,
                   vision_cfg=m.CLIPVisionCfg(layers=12, width=768, patch_size=32, image_size=224),
                   text_cfg=m.CLIPTextCfg(context_length=77, vocab_size=49408, width=512, heads=8, layers=12)).eval()

    class Tower(torch.nn.Module):  # one of the model's encoders as the module to export
        def __init__(self, encode):
            super().__init__()
            self.m, self.encode = model, encode

        def forward(self, x):
            return self.encode(x)

    # nn.MultiheadAttention's inference fast path is one fused op the ONNX exporter cannot write
    torch.backends.mha.set_fastpath_enabled(False)
    dest.mkdir(parents=True, exist_ok=True)
    img, txt = dest / "open_clip_vitb32_random_image.onnx", dest / "open_clip_vitb32_random_text.onnx"
    with torch.no_grad():
        torch.onnx.export(Tower(model.encode_image), (torch.zeros(2, 3, 224, 224),), str(img), input_names=["image"],
                          output_names=["embedding"], dynamic_axes={"image": {0: "batch"}, "embedding": {0: "batch"}},
                          opset_version=17, dynamo=False)
        torch.onnx.export(Tower(model.encode_text), (torch.zeros(2, 77, dtype=torch.int64),), str(txt), input_names=["text"],
                          output_names=["embedding"], dynamic_axes={"text": {0: "batch"}, "embedding": {0: "batch"}},
                          opset_version=17, dynamo=False)
    return str(img), str(txt)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="image tower ONNX (float or uint8 input)")
    ap.add_argument("--text-model", help="text tower ONNX (either form)")
    ap.add_argument("--open-clip-export", metavar="DIR",
                    help="export open_clip's random-init ViT-B-32 towers to DIR with torch.onnx and use them")
    ap.add_argument("--images", type=Path, default=DEFAULT_CORPUS)
    ap.add_argument("-n", type=int, default=1000, help="photos (default 1000)")
    ap.add_argument("--prompts", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--precision", choices=["bf16", "int8"], default="bf16",
                    help="the precision compared with fp32 (int8: image tower only, calibrated on --calibration)")
    ap.add_argument("--calibration", type=Path, help="int8: the calibration photos' directory (default: --images)")
    ap.add_argument("--calibration-count", type=int, default=300, help="int8: how many of them (default 300)")
    ap.add_argument("--label", default="", help="what the weights are, for the JSON (e.g. 'synthetic')")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    from pipeline.backends.openvino import native_bf16_flags, resolve_precision
    from pipeline.bench.sampler import machine_info

    prec = a.precision
    resolve_precision(prec)  # refuses, with the reason, where bf16 would be emulated
    model, text_model = a.model, a.text_model
    if a.open_clip_export:
        model, text_model = open_clip_export(Path(a.open_clip_export))
        a.label = a.label or "open_clip ViT-B-32, random init (untrained), exported with torch.onnx"
        if prec == "int8":
            text_model = None  # text towers are not quantised
    if not model and not text_model:
        ap.error("give --model, --text-model or --open-clip-export")
    if prec == "int8" and text_model:
        ap.error("--precision int8 quantises the image tower only: drop --text-model")
    res: dict = {"label": a.label, "precision": prec, "machine": machine_info(), "native_bf16": native_bf16_flags(),
                 "threads": a.threads, "batch": a.batch}
    if model:
        pixels, names = crops(a.images, a.n)
        print(f"{len(pixels)} photos from {a.images} cropped (reference preprocessing)", file=sys.stderr)
        calibration = None
        if prec == "int8":
            from pipeline import config
            from pipeline.backends.openvino_int8 import calibration_set, nncf_version

            calibration = {"calibration": str((a.calibration or a.images).resolve()),
                           "calibration_count": a.calibration_count}
            cal = calibration_set(config.from_dict({"openvino": {"precision": "int8", **calibration}}))
            res["calibration"] = {**cal.identity(), "preprocess_mode": "reference", "nncf": nncf_version()}
        emb, secs = {}, {}
        for engine in (prec, "fp32", "ort"):
            emb[engine], secs[engine] = embed_image(model, engine, pixels, a.batch, a.threads, calibration)
        res["image"] = {"model": model, "images": str(a.images), **tower_report(emb, secs, prec)}
        if calibration and (h := held_out(a.images, names, cal, emb, prec)):
            res["image"]["held_out"] = h
    if text_model:
        texts = prompts(a.prompts)
        emb, secs = {}, {}
        for engine in ("bf16", "fp32", "ort"):
            emb[engine], secs[engine] = embed_text(text_model, engine, texts, a.threads)
        res["text"] = {"model": text_model, "prompts": len(texts), **tower_report(emb, secs)}
    for tower in ("image", "text"):
        if tower in res:
            r = res[tower][f"{prec}_vs_fp32"]
            print(f"{tower}: {prec} vs fp32 over {r['n']}: cosine min {r['cosine_min']:.6f} mean {r['cosine_mean']:.6f}, "
                  f"NN top-1 agreement {r['nn_top1_agreement']:.4f}  ({a.label or 'weights unlabelled'})")
    if "held_out" in res.get("image", {}):
        h = res["image"]["held_out"]
        r = h[f"{prec}_vs_fp32"]
        print(f"image, the {h['photos']} photos that did not calibrate: cosine min {r['cosine_min']:.6f} "
              f"mean {r['cosine_mean']:.6f}, NN top-1 agreement {r['nn_top1_agreement']:.4f}")
    if a.json:
        from pipeline.bench import write_results

        write_results(a.json, res)


if __name__ == "__main__":
    main()
