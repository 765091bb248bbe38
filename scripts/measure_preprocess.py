#!/usr/bin/env python3
"""How close the project's preprocessing is to CLIP's: per image mode, and fast vs reference on a corpus.

    python3 scripts/measure_preprocess.py                       # mode table + corpus-1k, synthetic ViT-B/32
    python3 scripts/measure_preprocess.py --limit 100 --arch tiny --json out.json

Part 1 (every image mode PIL opens; the images are tests/imagegen.py's `mode_images`):
  * reference vs CLIP: max |difference| after normalisation between the project's reference mode
    (decode -> crop -> normalise) and the tests' independent re-implementation of OpenAI CLIP's
    torchvision transform; for the deep integer modes also vs the README's documented rule;
  * fast vs CLIP: mean and max |difference| of the uint8 crops, in 8-bit levels;
  * with torchvision installed, also the tests' re-implementation vs torchvision itself.
Part 2 (a corpus of JPEGs, default ../shared/bench/corpus-1k): fast vs reference per image, mean
and worst image (mean |difference| in 8-bit levels), and the cosine between the embeddings of the
two crops through an ONNX image tower. The default model is the synthetic-weight ViT-B/32 that
`build-model` writes (random weights: the script also prints the mean cosine between embeddings of
*different* images, the scale a parity figure has to be read against).

These are accuracy figures, not timings: a loaded machine changes how long it takes, not the numbers.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # clip_reference.py (the independent CLIP re-implementation), imagegen.py

import clip_reference as ref
import numpy as np
from imagegen import mode_images
from PIL import Image

from pipeline.data.images import DecodeOptions, crop, decode_bytes, normalize

DEEP_INTEGER = ("I;16", "I")  # modes where the project follows the README's rule, not CLIP


def project_crop(data: bytes, mode: str) -> np.ndarray:
    """The project's preprocessing of one encoded image: uint8 [224,224,3] RGB."""
    return crop(decode_bytes(data, DecodeOptions(mode=mode)), mode)


def measure_modes() -> list[dict]:
    try:
        tv = ref.torchvision_transform()
    except ImportError:
        tv = None
    rows = []
    for name, data in mode_images().items():
        mode = Image.open(io.BytesIO(data)).mode
        clip_u8 = ref.clip_crop_u8(Image.open(io.BytesIO(data)))
        clip_f = ref.to_tensor_normalize(clip_u8)
        ours_ref = project_crop(data, "reference")
        ours_fast = project_crop(data, "fast").astype(np.int16)
        ref_f = normalize(ours_ref[None])[0]
        fast_lv = np.abs(ours_fast - clip_u8.astype(np.int16))
        row = {"image": name, "mode": mode,
               "reference_vs_clip_max_abs": float(np.abs(ref_f - clip_f).max()),
               "reference_vs_clip_values_off_pct": float((ours_ref != clip_u8).mean() * 100),
               "fast_vs_clip_mean_levels": float(fast_lv.mean()),
               "fast_vs_clip_max_levels": int(fast_lv.max())}
        if mode.split(";")[0] in DEEP_INTEGER:
            doc_f = ref.to_tensor_normalize(ref.documented_crop_u8(Image.open(io.BytesIO(data))))
            row["reference_vs_documented_rule_max_abs"] = float(np.abs(ref_f - doc_f).max())
            fast_doc = np.abs(ours_fast - ref.documented_crop_u8(Image.open(io.BytesIO(data))).astype(np.int16))
            row["fast_vs_documented_rule_mean_levels"] = float(fast_doc.mean())
            row["fast_vs_documented_rule_max_levels"] = int(fast_doc.max())
        if tv is not None:
            t = tv(Image.open(io.BytesIO(data))).numpy()
            row["tests_reimplementation_vs_torchvision_max_abs"] = float(np.abs(t - clip_f).max())
        rows.append(row)
    return rows


def _model(args) -> Path:
    if args.model:
        return Path(args.model)
    from pipeline.model.modelgen import build_clip_image_onnx

    path = Path(os.path.expanduser("~/.cache/clip-pipeline/measure")) / f"clip-{args.arch}-synthetic-seed0.onnx"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"building the synthetic {args.arch} model at {path} ...", file=sys.stderr)
        build_clip_image_onnx(path, arch=args.arch, seed=0)
    return path


def measure_corpus(args) -> dict:
    corpus = Path(args.corpus)
    files = sorted(p for p in corpus.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    if args.limit:
        files = files[: args.limit]
    if not files:
        raise SystemExit(f"error: no JPEGs in {corpus} (--corpus)")
    per_image_mean, per_image_max, identical = [], [], []
    refs, fasts = [], []
    for p in files:
        data = p.read_bytes()
        r, f = project_crop(data, "reference"), project_crop(data, "fast")
        d = np.abs(r.astype(np.int16) - f.astype(np.int16))
        per_image_mean.append(float(d.mean()))
        per_image_max.append(int(d.max()))
        identical.append(float((d == 0).mean()))
        refs.append(r)
        fasts.append(f)
    worst = int(np.argmax(per_image_mean))
    out = {"corpus": str(corpus), "images": len(files),
           "fast_vs_reference_mean_levels": float(np.mean(per_image_mean)),
           "fast_vs_reference_worst_image_mean_levels": per_image_mean[worst],
           "fast_vs_reference_worst_image": files[worst].name,
           "fast_vs_reference_max_levels_any_value": int(max(per_image_max)),
           "fast_vs_reference_identical_values_pct": float(np.mean(identical) * 100)}
    if args.no_embeddings:
        return out
    import onnxruntime as ort

    model = _model(args)
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    if inp.type != "tensor(float)":
        raise SystemExit(f"error: {model} takes {inp.type}; give a float-input (CLIP-normalised) model (--model)")

    def embed(crops: list[np.ndarray]) -> np.ndarray:
        outs = []
        for s in range(0, len(crops), 16):
            outs.append(sess.run(None, {inp.name: normalize(np.stack(crops[s:s + 16]))})[0])
        e = np.concatenate(outs).astype(np.float64)
        return e / np.linalg.norm(e, axis=1, keepdims=True)

    er, ef = embed(refs), embed(fasts)
    cos = (er * ef).sum(axis=1)
    others = (er * np.roll(er, 1, axis=0)).sum(axis=1)  # each image against its neighbour in the list
    out.update({"model": str(model), "model_weights": "synthetic (seeded random)" if not args.model else "as given",
                "cosine_fast_vs_reference_mean": float(cos.mean()), "cosine_fast_vs_reference_min": float(cos.min()),
                "cosine_fast_vs_reference_min_image": files[int(np.argmin(cos))].name,
                "cosine_between_different_images_mean": float(others.mean())})
    return out


def _fmt(x: float) -> str:
    return "0" if x == 0 else (f"{x:.1e}" if x < 0.01 else f"{x:.3g}")


def print_tables(rows: list[dict], corpus: dict | None) -> None:
    tv = any("tests_reimplementation_vs_torchvision_max_abs" in r for r in rows)
    print("| image (PIL mode) | reference vs CLIP, max abs after normalisation | fast vs CLIP, mean / max 8-bit levels |"
          + (" tests' CLIP vs torchvision |" if tv else ""))
    print("|---|---|---|" + ("---|" if tv else ""))
    for r in rows:
        refcol = _fmt(r["reference_vs_clip_max_abs"])
        fastcol = f"{r['fast_vs_clip_mean_levels']:.2f} / {r['fast_vs_clip_max_levels']}"
        if "reference_vs_documented_rule_max_abs" in r and r["reference_vs_clip_max_abs"] > 1e-6:
            refcol += f" (documented rule: {_fmt(r['reference_vs_documented_rule_max_abs'])})"
            fastcol += (f" (vs the rule: {r['fast_vs_documented_rule_mean_levels']:.2f} / "
                        f"{r['fast_vs_documented_rule_max_levels']})")
        line = f"| {r['image']} | {refcol} | {fastcol} |"
        if tv:
            line += f" {_fmt(r.get('tests_reimplementation_vs_torchvision_max_abs', float('nan')))} |"
        print(line)
    if corpus:
        print()
        print(f"corpus {corpus['corpus']}: {corpus['images']} JPEGs, fast vs reference: mean "
              f"{corpus['fast_vs_reference_mean_levels']:.2f} levels, worst image "
              f"{corpus['fast_vs_reference_worst_image_mean_levels']:.2f} ({corpus['fast_vs_reference_worst_image']}), "
              f"largest single value {corpus['fast_vs_reference_max_levels_any_value']}, "
              f"{corpus['fast_vs_reference_identical_values_pct']:.1f}% of values identical")
        if "cosine_fast_vs_reference_mean" in corpus:
            print(f"embedding cosine fast vs reference ({Path(corpus['model']).name}, {corpus['model_weights']} weights): "
                  f"mean {corpus['cosine_fast_vs_reference_mean']:.7f}, min {corpus['cosine_fast_vs_reference_min']:.7f} "
                  f"({corpus['cosine_fast_vs_reference_min_image']}); different images: mean "
                  f"{corpus['cosine_between_different_images_mean']:.4f}")


def _default_corpus() -> Path:
    """../shared/bench/corpus-1k from the repository (or from a worktree one level further down)."""
    for up in (ROOT.parent, ROOT.parent.parent):
        if (up / "shared" / "bench" / "corpus-1k").is_dir():
            return up / "shared" / "bench" / "corpus-1k"
    return ROOT.parent / "shared" / "bench" / "corpus-1k"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", default=str(_default_corpus()),
                    help="directory of JPEGs for fast vs reference (default ../shared/bench/corpus-1k)")
    ap.add_argument("--limit", type=int, default=0, help="use only the first N corpus images (0 = all)")
    ap.add_argument("--no-corpus", action="store_true", help="only the per-mode table")
    ap.add_argument("--no-embeddings", action="store_true", help="corpus pixel differences only, no model")
    ap.add_argument("--model", help="a float-input ONNX image tower (default: build the synthetic one, see --arch)")
    ap.add_argument("--arch", default="vit-b32", choices=("vit-b32", "tiny"), help="synthetic model architecture")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime threads (default 1: the machine is shared)")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)
    t0 = time.time()
    rows = measure_modes()
    corpus = None
    if not args.no_corpus:
        if not Path(args.corpus).is_dir():
            print(f"error: corpus directory {args.corpus} not found (--corpus, or --no-corpus)", file=sys.stderr)
            return 2
        corpus = measure_corpus(args)
    print_tables(rows, corpus)
    if args.json:
        import cv2
        import PIL

        meta = {"python": platform.python_version(), "machine": platform.machine(), "pillow": PIL.__version__,
                "numpy": np.__version__, "opencv": cv2.__version__, "seconds": round(time.time() - t0, 1),
                "loadavg_end": os.getloadavg()}
        Path(args.json).write_text(json.dumps({"meta": meta, "modes": rows, "corpus": corpus}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
