"""The sail backend on SOPHGO's real SAIL on the BM1684X cmodel, end to end (issue #25's figures).

    python3 scripts/check_sail_cmodel.py [--photos 12,41] [--vitb32] [--work DIR]

Needs scripts/setup_tpu_mlir.sh and scripts/setup_sail_cmodel.sh. Compiles the tiny synthetic
CLIP (random weights) to a 4-batch F16 bmodel with `clip-pipeline compile`, then:
  1. `clip-pipeline run --config configs/bm1684x.toml --set sail.runtime="cmodel"` (device mode as
     shipped) on each photo count: exit code, rows, cosine to the cpu backend on the same ONNX;
  2. the same photos in host mode on real SAIL vs the cpu backend (cosine);
  3. with --vitb32: the synthetic ViT-B/32 (random weights) compiled to a 1-batch F16 bmodel, one
     photo through real SAIL in host mode (~70 s of cmodel per image), cosine vs the cpu backend.
Prints one line per figure. Slow (the cmodel is a software chip): for correctness, never speed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def clip_pipeline(*args: str) -> tuple[int, float, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], env=env, capture_output=True, text=True, cwd=ROOT)
    return p.returncode, time.monotonic() - t0, p.stderr


def embeddings(out: Path) -> dict[str, np.ndarray]:
    from pipeline.output import load_embeddings

    paths, emb = load_embeddings(out)
    e = np.asarray(emb, np.float64)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    return dict(zip(paths, e))


def build(w: Path, arch: str, batch: int) -> tuple[Path, Path]:
    """The synthetic CLIP image tower (random weights) as ONNX, compiled to an F16 bmodel."""
    from pipeline.model.modelgen import build_clip_image_onnx
    from pipeline.toolchain.compile import compile_onnx

    onnx = w / f"{arch}.onnx"
    build_clip_image_onnx(onnx, arch=arch, seed=0, input_kind="float")
    t0 = time.monotonic()
    side = compile_onnx(onnx, w / "bm", batches=[batch], log=lambda s: None)[0]
    bm = w / "bm" / side["bmodel"]
    print(f"compiled {bm.name} in {time.monotonic() - t0:.0f} s (synthetic {arch} CLIP, random weights)")
    return onnx, bm


def photos(w: Path, n: int) -> Path:
    from imagegen import make_images

    imgs = w / f"photos{n}"
    if not imgs.is_dir():
        make_images(imgs, n, seed=n)
    return imgs


def compare(a: dict, b: dict) -> str:
    common = sorted(set(a) & set(b))
    cos = np.array([float(a[k] @ b[k]) for k in common])
    return f"{len(common)} common rows, cosine min {cos.min():.6f} mean {cos.mean():.6f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--photos", default="12,41")
    ap.add_argument("--vitb32", action="store_true")
    ap.add_argument("--work", default="/tmp/clip-pipeline-sail-cmodel-check")
    a = ap.parse_args()
    from pipeline.backends.sail import cmodel_python

    cmodel_python()  # ConfigError with the set-up hint when missing
    w = Path(a.work)
    w.mkdir(parents=True, exist_ok=True)
    onnx, bm = build(w, "tiny", 4)
    cfg = str(ROOT / "configs" / "bm1684x.toml")
    for n in (int(x) for x in a.photos.split(",")):
        imgs = photos(w, n)
        cpu_out = w / f"cpu{n}"
        rc, dt, err = clip_pipeline("run", "--config", str(ROOT / "configs" / "cpu.toml"), "-i", str(imgs),
                                    "-o", str(cpu_out), "--restart", "--set", f'model.path="{onnx}"',
                                    "--set", "model.batch_size=4", "--progress", "none")
        assert rc == 0, err[-2000:]
        cpu = embeddings(cpu_out)
        for mode in ("device", "host"):
            out = w / f"{mode}{n}"
            rc, dt, err = clip_pipeline("run", "--config", cfg, "-i", str(imgs), "-o", str(out), "--restart",
                                        "--set", 'sail.runtime="cmodel"', "--set", f'sail.mode="{mode}"',
                                        "--set", f'model.path="{bm}"', "--progress", "none")
            rows = len(embeddings(out)) if rc in (0, 3) else 0
            print(f"{n} photos, sail {mode} mode on real SAIL (cmodel), configs/bm1684x.toml: exit {rc}, {rows} rows, "
                  f"{dt:.0f} s; vs cpu backend: {compare(embeddings(out), cpu) if rows else '-'}")
            if rc != 0:
                print(err[-2000:])
    if a.vitb32:
        onnx, bm = build(w, "vit-b32", 1)
        imgs = photos(w, 1)
        cpu_out, out = w / "vit-cpu", w / "vit-host"
        rc, dt, err = clip_pipeline("run", "--config", str(ROOT / "configs" / "cpu.toml"), "-i", str(imgs), "-o", str(cpu_out),
                                    "--restart", "--set", f'model.path="{onnx}"', "--progress", "none")
        assert rc == 0, err[-2000:]
        rc, dt, err = clip_pipeline("run", "--config", cfg, "-i", str(imgs), "-o", str(out), "--restart",
                                    "--set", 'sail.runtime="cmodel"', "--set", 'sail.mode="host"', "--set", f'model.path="{bm}"',
                                    "--set", "run.stall_timeout_s=900", "--set", "run.start_timeout_s=900", "--progress", "none")
        print(f"ViT-B/32 F16 1-batch bmodel, 1 photo, sail host mode on real SAIL (cmodel): exit {rc}, {dt:.0f} s in all; "
              f"vs cpu backend: {compare(embeddings(out), embeddings(cpu_out)) if rc == 0 else err[-2000:]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
