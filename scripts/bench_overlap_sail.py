"""infer.overlap on the fake sophon.sail (device mode), serial vs overlapped, interleaved run by run.

    PYTHONPATH=$PWD python3 scripts/bench_overlap_sail.py [--images 512] [--decode-ms 4] [--infer-ms 60]

The fake (tests/fake_sail) sleeps FAKE_SAIL_DECODE_MS per Decoder.read and FAKE_SAIL_INFER_MS per
EngineImagePreProcess batch, both releasing the GIL as the real SAIL calls do. Throughput is taken
between the first and the last shard write (one shard per batch, one chip: ids arrive in order),
so start-up and shutdown are excluded. Nothing here says anything about real BM1684X hardware.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "fake_sail")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--decode-ms", type=float, default=4.0)
    ap.add_argument("--infer-ms", type=float, default=60.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests" / "fake_sail"), str(ROOT),
                                                os.environ.get("PYTHONPATH", "")])
    os.environ["FAKE_SAIL_TPUS"] = "1"
    os.environ["FAKE_SAIL_DECODE_MS"] = str(a.decode_ms)
    os.environ["FAKE_SAIL_INFER_MS"] = str(a.infer_ms)
    from imagegen import photo, write
    from sail_helpers import write_fake_bmodel

    from pipeline import config
    from pipeline.data.rundir import EMB_DIR, shard_name
    from pipeline.model.modelgen import build_clip_image_onnx
    from pipeline.run.supervisor import run

    work = Path(tempfile.mkdtemp(prefix="clipp-overlap-"))
    try:
        build_clip_image_onnx(work / "tiny.onnx", arch="tiny", seed=0, input_kind="float")
        bm = write_fake_bmodel(work / "clip.bmodel", work / "tiny.onnx", [a.batch])
        imgs = work / "imgs"
        imgs.mkdir()
        base = [photo(320 + 16 * i, 240 + 8 * i, i) for i in range(8)]
        for i in range(a.images):
            write(imgs / f"i{i:05d}.jpg", base[i % 8], quality=80 + i % 15)
        nshards = a.images // a.batch
        res: dict = {"serial": [], "overlap": []}
        for rep in range(a.repeats):
            for overlap in (False, True):
                out = work / "out"
                shutil.rmtree(out, ignore_errors=True)
                cfg = {"input": {"paths": [str(imgs)]}, "output": {"dir": str(out), "shard_size": a.batch},
                       "model": {"path": str(bm)}, "run": {"progress": "none"},
                       "infer": {"backend": "sail", "devices": [0], "overlap": overlap, "batch_timeout_ms": 20}}
                r = run(config.from_dict(cfg))
                assert r.exit_code == 0, r.message
                m = [(out / EMB_DIR / f"{shard_name(k)}.npy").stat().st_mtime_ns for k in range(nshards)]
                ips = (nshards - 1) * a.batch / ((max(m) - min(m)) / 1e9)
                res["overlap" if overlap else "serial"].append(ips)
                print(f"rep {rep + 1} overlap={overlap}: {ips:.1f} images/s", file=sys.stderr)
        med = {k: statistics.median(v) for k, v in res.items()}
        summary = {"setup": vars(a), "images_per_s": res, "median": med,
                   "overlap/serial": round(med["overlap"] / med["serial"], 3),
                   "ideal_serial": round(a.batch * 1000 / (a.batch * a.decode_ms + a.infer_ms), 1),
                   "ideal_overlap": round(a.batch * 1000 / max(a.batch * a.decode_ms, a.infer_ms), 1),
                   "load_end": os.getloadavg()}
        print(json.dumps(summary, indent=1))
        if a.json:
            Path(a.json).write_text(json.dumps(summary, indent=1) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
