#!/usr/bin/env python3
"""sha256 of every output file of six representative runs, to show that a refactor changed no byte.

    python3 scripts/output_hashes.py --repo CHECKOUT --work DIR > hashes.txt

Runs `python -m pipeline.cli` of CHECKOUT (PYTHONPATH=CHECKOUT, so any commit can be measured with
this one script: `git worktree add /tmp/old ac3e27c`) over inputs this script generates
deterministically into DIR, then prints `sha256  case/relative/path` for every file the runs
wrote, sorted. Compare two checkouts with `diff`. The cases:

  1. default   `run --config configs/cpu.toml` (its bundled samples, ViT-B/32 synthetic; both copied into DIR)
  2. two-dev   200 generated photos, 2 cpu devices, 64-row shards
  3. tar-list  `--list` of loose files and a webdataset tar (captions, a sample without an image)
  4. retrieval `output.layout = "clip-retrieval"` over loose photos and the tar (metadata parquet)
  5. update    a run, then new files (one a copy of an old one: content_hash alias) and `--update`
  6. cluster   `plan` (1 shard per range), `run-range` for every range (`--attempt a`), `merge`

Left out, because they hold the clock or the machine, not the output: every `report.json` (the
run's own timings) and, in the other JSON files (manifest, plan, range commits, update records),
the values of the keys in VOLATILE_KEYS (timestamps, durations, host, pid, the plan's random
run id), printed as
`<volatile>`. Use the same DIR path for both checkouts: the manifest records the output directory.
The embeddings of the cpu backend are deterministic for a given batch composition; the cases keep
one infer thread per device (as configs/cpu.toml).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

VOLATILE_KEYS = {"created", "updated", "started", "finished", "ended", "committed", "published_at", "time", "at",
                 "elapsed_s", "wall_s", "seconds", "duration_s", "host", "hostname", "pid", "timings", "run_id", "listing_s"}
BASE_TOML = """\
[output]
shard_size = 64
[model]
path = "models/tiny.onnx"
build = "tiny"
batch_size = 8
[preprocess]
mode = "reference"
[workers]
decode = 1
[infer]
backend = "cpu"
devices = ["cpu:0"]
threads = 1
[run]
progress = "none"
"""


def photo_bytes(seed: int, w: int, h: int, fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([x / w * rng.uniform(60, 255), y / h * rng.uniform(60, 255),
                     (x + y) / (w + h) * rng.uniform(60, 255)], axis=2)
    px = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


SIZES = ((64, 48), (48, 64), (80, 80), (100, 60))


def make_photos(d: Path, n: int, seed0: int) -> list[Path]:
    d.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        fmt = "PNG" if i % 7 == 3 else "JPEG"
        p = d / f"img_{i:04d}.{'png' if fmt == 'PNG' else 'jpg'}"
        p.write_bytes(photo_bytes(seed0 + i, w, h, fmt))
        out.append(p)
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")  # a failure record
    return out


def make_tar(path: Path, n: int, seed0: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        def add(name: str, data: bytes) -> None:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime, ti.mode, ti.uname, ti.gname = len(data), 1_700_000_000, 0o644, "u", "g"
            tf.addfile(ti, io.BytesIO(data))
        for i in range(n):
            key = f"{i:09d}"
            if i != 5:  # sample 5 has a caption but no image: no_image
                add(f"{key}.jpg", photo_bytes(10_000 + seed0 + i, *SIZES[i % len(SIZES)]))
            add(f"{key}.txt", f"caption number {i}".encode())
            add(f"{key}.json", json.dumps({"key": key, "i": i}).encode())


def normalise_json(v):
    if isinstance(v, dict):
        return {k: "<volatile>" if k in VOLATILE_KEYS else normalise_json(x) for k, x in v.items()}
    if isinstance(v, list):
        return [normalise_json(x) for x in v]
    return v


def file_digest(p: Path) -> str:
    if p.suffix == ".json":
        try:
            data = json.loads(p.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError):
            pass
        else:
            return hashlib.sha256(json.dumps(normalise_json(data), sort_keys=True).encode()).hexdigest()
    return hashlib.sha256(p.read_bytes()).hexdigest()


def hashes(root: Path, name: str) -> list[str]:
    lines = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != "report.json":
            lines.append(f"{file_digest(p)}  {name}/{p.relative_to(root)}")
    return lines


def cli(repo: Path, cwd: Path, *args: str, ok=(0, 3)) -> None:
    env = {**os.environ, "PYTHONPATH": str(repo)}
    p = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if p.returncode not in ok:
        sys.exit(f"clip-pipeline {' '.join(args)} (cwd {cwd}) exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    print(f"# exit {p.returncode}: clip-pipeline {' '.join(args)}", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", type=Path, required=True, help="checkout whose pipeline runs the cases")
    ap.add_argument("--work", type=Path, required=True, help="work directory (emptied first)")
    ap.add_argument("--cases", default="1,2,3,4,5,6", help="which cases, e.g. 2,3")
    ap.add_argument("--hash-only", action="store_true", help="only print the hashes of the runs already in --work")
    a = ap.parse_args()
    repo, w = a.repo.resolve(), a.work.resolve()
    if a.hash_only:
        print("\n".join(line for d in sorted(w.glob("c[1-6]-*")) for line in hashes(d, d.name)))
        return
    cases = {int(c) for c in a.cases.split(",")}
    shutil.rmtree(w, ignore_errors=True)
    w.mkdir(parents=True)
    (w / "base.toml").write_text(BASE_TOML)
    make_photos(w / "photos200", 200, 0)
    make_photos(w / "photos40", 40, 1000)
    make_tar(w / "shards" / "00000.tar", 24, 0)
    loose = sorted((w / "photos40").iterdir())[:10]
    (w / "list.txt").write_text("".join(f"{p.relative_to(w)}\n" for p in loose) + "shards/00000.tar\n")
    cli(repo, w, "build-model", "models/tiny.onnx", "--arch", "tiny")
    base = ("-c", "base.toml")
    out: list[str] = []
    if 1 in cases:
        # configs/cpu.toml and the samples copied into DIR: the listing holds the inputs' absolute paths
        shutil.copytree(repo / "samples" / "images", w / "samples" / "images")
        (w / "configs").mkdir()
        shutil.copy(repo / "configs" / "cpu.toml", w / "configs" / "cpu.toml")
        cli(repo, w, "run", "--config", "configs/cpu.toml", "-o", "c1-default", "-q")
        out += hashes(w / "c1-default", "c1-default")
    if 2 in cases:
        cli(repo, w, "run", *base, "-i", "photos200", "-o", "c2-two-devices", "-d", "cpu:0", "-d", "cpu:1", "-q")
        out += hashes(w / "c2-two-devices", "c2-two-devices")
    if 3 in cases:
        cli(repo, w, "run", *base, "--list", "list.txt", "-o", "c3-tar-list", "-q")
        out += hashes(w / "c3-tar-list", "c3-tar-list")
    if 4 in cases:
        cli(repo, w, "run", *base, "-i", "shards", "-i", "photos40", "-o", "c4-retrieval",
            "--set", 'output.layout="clip-retrieval"', "-q")
        out += hashes(w / "c4-retrieval", "c4-retrieval")
    if 5 in cases:
        upd = w / "upd"
        upd.mkdir()
        for p in sorted((w / "photos40").iterdir())[:30]:
            shutil.copy(p, upd / p.name)
        hashed = ("--set", "output.content_hash=true")
        cli(repo, w, "run", *base, "-i", "upd", "-o", "c5-update", *hashed, "-q")
        for p in sorted((w / "photos200").iterdir())[:20]:
            shutil.copy(p, upd / f"new_{p.name}")
        shutil.copy(upd / "img_0001.jpg", upd / "renamed_copy.jpg")  # same bytes as an embedded row: an alias
        (upd / "img_0002.jpg").unlink()  # removed since
        cli(repo, w, "run", *base, "-i", "upd", "-o", "c5-update", *hashed, "--update", "-q")
        out += hashes(w / "c5-update", "c5-update")
    if 6 in cases:
        cli(repo, w, "plan", *base, "-i", "photos200", "-o", "c6-cluster", "--range-shards", "1")
        plan = json.loads((w / "c6-cluster" / "plan" / "plan.json").read_text())
        for r in range(int(plan["ranges"])):
            cli(repo, w, "run-range", "-o", "c6-cluster", "--range", str(r), "--attempt", "a", "--progress", "none")
        cli(repo, w, "merge", "c6-cluster")
        out += hashes(w / "c6-cluster", "c6-cluster")
    print("\n".join(out))


if __name__ == "__main__":
    main()
