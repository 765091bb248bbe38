#!/usr/bin/env python3
"""Measure how far the sail device-mode preprocessing is from CLIP's reference transform.

Device mode (pipeline/backends/sail.py) crops the centre square of side min(w, h) and resizes it
to 224 with EngineImagePreProcess's resize (on a BM1684X the VPP: linear, the default, or nearest;
there is no bicubic); CLIP resizes the shorter side with PIL's antialiased bicubic, then
centre-crops. Without hardware, the VPP kernels are modelled by the fake (tests/fake_sail) as
OpenCV INTER_LINEAR / INTER_NEAREST without antialiasing: that this matches the chip's numerics is
UNCONFIRMED on hardware.

Reports, per image and overall: pixel differences of the 224x224 crops (0..255 units), and the
cosine / max-abs difference of the embeddings from the model(s) given (ONNX, float input),
computed through the real backend code running on the fake sail.

    PYTHONPATH=tests/fake_sail python3 scripts/measure_sail_resize.py --onnx m.onnx IMG_OR_DIR...
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "fake_sail"))

from pipeline.data.images import DecodeOptions, decode_file, normalize, reference_crop

EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
MODES = (("linear", cv2.INTER_LINEAR), ("nearest", cv2.INTER_NEAREST))  # sail.resize values


def device_crop(rgb: np.ndarray, inter: int) -> np.ndarray:
    if rgb.shape[2] == 1:
        rgb = np.repeat(rgb, 3, axis=2)
    rgb = rgb[:, :, :3]
    h, w = rgb.shape[:2]
    s = min(w, h)
    sq = rgb[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    return cv2.resize(np.ascontiguousarray(sq), (224, 224), interpolation=inter)


def list_images(args) -> list[Path]:
    out = []
    for a in args:
        p = Path(a)
        out += sorted(q for q in p.rglob("*") if q.suffix.lower() in EXTS) if p.is_dir() else [p]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("images", nargs="+")
    ap.add_argument("--onnx", action="append", default=[], help="float-input CLIP image ONNX (repeatable)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--every", type=int, default=1, help="take every N-th image of the (sorted) list")
    args = ap.parse_args()
    paths = list_images(args.images)[::args.every]
    # JPEG copies named .jpg so the device path takes the hardware-decoder branch for all of them
    tmp = Path(tempfile.mkdtemp(prefix="sail-resize-"))
    files = []
    for i, p in enumerate(paths):
        rgb = decode_file(os.fsencode(p), DecodeOptions())
        if rgb.shape[2] != 3:
            rgb = np.repeat(rgb, 3, axis=2) if rgb.shape[2] == 1 else rgb[:, :, :3]
        q = tmp / f"{i:03d}_{p.stem}.jpg"
        cv2.imwrite(str(q), np.ascontiguousarray(rgb[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 95])
        files.append(q)
    result = {"images": [], "models": {}}
    for q in files:
        rgb = decode_file(os.fsencode(q), DecodeOptions())
        ref = reference_crop(rgb).astype(np.float32)
        row = {"image": q.name, "size": [rgb.shape[1], rgb.shape[0]], "downscale": round(min(rgb.shape[:2]) / 224, 2)}
        for name, inter in MODES:
            d = np.abs(device_crop(rgb, inter).astype(np.float32) - ref)
            row[f"pixel_mean_abs_{name}"] = round(float(d.mean()), 3)
            row[f"pixel_max_abs_{name}"] = int(d.max())
        result["images"].append(row)

    if args.onnx:
        os.environ["FAKE_SAIL_TPUS"] = "1"
        import onnxruntime as ort

        from pipeline.backends.sail import SailBackend
        from pipeline.config import from_dict

        for onnx_path in args.onnx:
            bm = tmp / "m.bmodel"
            bm.write_text(json.dumps({"fake_bmodel": True, "onnx": str(Path(onnx_path).resolve()), "batch_sizes": [4]}))
            so = ort.SessionOptions()
            sess = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
            crops = np.stack([reference_crop(decode_file(os.fsencode(q), DecodeOptions())) for q in files])
            ref = np.concatenate([sess.run(None, {sess.get_inputs()[0].name: normalize(crops[i:i + 4])})[0]
                                  for i in range(0, len(crops), 4)])
            per = {}
            for resize, _ in MODES:
                cfg = from_dict({"model": {"path": str(bm)}, "infer": {"backend": "sail", "devices": [0]},
                                 "sail": {"mode": "device", "resize": resize}})
                dev = SailBackend.open_device(cfg, "sail:0")
                got = dev.embed_files(list(range(len(files))), [os.fsencode(q) for q in files]).embeddings
                cos = np.sum(got * ref, 1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
                gn = got / np.linalg.norm(got, axis=1, keepdims=True)
                rn = ref / np.linalg.norm(ref, axis=1, keepdims=True)
                per[resize] = {"cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()),
                               "max_abs_l2normed": float(np.abs(gn - rn).max()),
                               "max_abs_fraction_raw": float((np.abs(got - ref).max(1) / np.abs(ref).max(1)).max()),
                               "per_image_cosine": [round(float(c), 5) for c in cos]}
                dev.close()
            result["models"][Path(onnx_path).name] = per

    for row in result["images"]:
        print(f"{row['image']:<32} {row['size'][0]:>5}x{row['size'][1]:<5} x{row['downscale']:<5} "
              + "   ".join(f"{n} mean|max {row[f'pixel_mean_abs_{n}']:6.2f} | {row[f'pixel_max_abs_{n}']:3d}"
                           for n, _ in MODES))
    for n, _ in MODES:
        means = np.array([r[f"pixel_mean_abs_{n}"] for r in result["images"]])
        maxes = np.array([r[f"pixel_max_abs_{n}"] for r in result["images"]])
        print(f"{n}: {len(means)} images, pixel mean abs per image {means.min():.2f} - {means.max():.2f} "
              f"(median {np.median(means):.2f}), max abs {maxes.min()} - {maxes.max()}")
    for m, per in result["models"].items():
        for resize, r in per.items():
            print(f"{m} {resize}: cosine min {r['cosine_min']:.5f} mean {r['cosine_mean']:.5f}; "
                  f"max abs (L2-normalised) {r['max_abs_l2normed']:.5f}; max abs / row max (raw) {r['max_abs_fraction_raw']:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
