"""End to end: the whole pipeline with infer.backend = "sail" on the fake sophon.sail, on 1 and 3
fake chips, compared row by row with the cpu backend (tolerances from test_sail_backend)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from imagegen import mode_images, photo, write
from sail_helpers import use_fake_sail, write_fake_bmodel
from test_sail import DEVICE_MAX_ABS, DEVICE_MIN_COSINE

from pipeline.config import from_dict


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model):
    d = tmp_path_factory.mktemp("e2e")
    onnx_path = tiny_model
    imgs = d / "imgs"
    (imgs / "sub").mkdir(parents=True)
    for i in range(11):
        write(imgs / f"p{i:02d}.jpg", photo(200 + 37 * i, 460 - 23 * i, 100 + i))
    write(imgs / "sub" / "UP.JPG", photo(500, 300, 7))
    write(imgs / "sub" / "odd.Jpeg", photo(300, 300, 8))
    write(imgs / "sub" / "s.png", photo(260, 330, 9))
    # modes decode crops itself (CLIP's order in the opened mode): sail host and device modes must
    # take the same reference path as cpu for them
    modes = mode_images(260, 330, seed=3)
    (imgs / "sub" / "pal_t.png").write_bytes(modes["P+transparency (PNG)"])
    (imgs / "sub" / "grey16.png").write_bytes(modes["I;16 (PNG)"])
    good = (imgs / "p00.jpg").read_bytes()
    (imgs / "broken.jpg").write_bytes(good[: len(good) // 3])
    (imgs / "empty.jpg").write_bytes(b"")
    return d, onnx_path, imgs


def run_pipeline(cfg_dict):
    from pipeline.output import load_embeddings
    from pipeline.run.supervisor import run

    res = run(from_dict(cfg_dict))
    paths, emb = load_embeddings(res.out_dir)
    fails = {}
    fpath = os.path.join(res.out_dir, "failures.jsonl")
    if os.path.exists(fpath):
        with open(fpath, encoding="utf-8") as fh:
            for line in fh:
                rec = json.loads(line)
                fails[os.path.basename(rec["path"])] = rec["reason"]
    return res, dict(zip(paths, np.asarray(emb))), fails


def base_cfg(out, imgs, backend, model, devices, **extra):
    cfg = {"input": {"paths": [str(imgs)]}, "output": {"dir": str(out), "shard_size": 8},
           "model": {"path": str(model)}, "infer": {"backend": backend, "devices": devices, "batch_timeout_ms": 20},
           "run": {"progress": "none", "start_timeout_s": 120, "stall_timeout_s": 60}}
    for k, v in extra.items():
        cfg.setdefault(k, {}).update(v)
    return cfg


@pytest.fixture(scope="module")
def cpu_rows(setup):
    d, onnx_path, imgs = setup
    res, rows, fails = run_pipeline(base_cfg(d / "out-cpu", imgs, "cpu", onnx_path, ["cpu:0"]))
    assert res.exit_code == 3, res.message  # completed with failures
    return rows, fails


@pytest.mark.parametrize("mode,ndev,batch", [("device", 1, 4), ("device", 3, 8), ("host", 3, 4), ("host", 1, 16)])
def test_sail_pipeline_matches_cpu(setup, cpu_rows, monkeypatch, mode, ndev, batch):
    d, onnx_path, imgs = setup
    use_fake_sail(monkeypatch, tpus=ndev)
    bm = write_fake_bmodel(d / f"clip_{batch}b.bmodel", onnx_path, [batch])
    out = d / f"out-sail-{mode}-{ndev}"
    shutil.rmtree(out, ignore_errors=True)
    devices = "all" if ndev > 1 else [0]
    res, rows, fails = run_pipeline(base_cfg(out, imgs, "sail", bm, devices, sail={"mode": mode}))
    assert res.exit_code == 3, res.message
    ref, ref_fails = cpu_rows
    assert fails == ref_fails == {"broken.jpg": "truncated", "empty.jpg": "empty"}
    assert sorted(rows) == sorted(ref)
    a = np.stack([rows[p] for p in sorted(ref)])
    b = np.stack([ref[p] for p in sorted(ref)])
    cos = np.sum(a * b, axis=1)  # both L2-normalised by the pipeline
    if mode == "host":
        np.testing.assert_allclose(a, b, atol=1e-5)
    else:
        max_abs = float(np.abs(a - b).max())
        assert cos.min() >= DEVICE_MIN_COSINE and max_abs <= DEVICE_MAX_ABS, (cos.min(), max_abs)


def test_sail_device_mode_embeds_webdataset_members(setup, cpu_rows, monkeypatch):
    """sail.Decoder opens files by name only, so device mode decodes a tar shard's samples on the
    host CPU and uploads them (as it does any image the hardware decoder does not take): every
    member is embedded within the device tolerances of the cpu run over the same files, and a
    truncated member fails as `truncated`, as the file does."""
    import tarfile

    d, onnx_path, imgs = setup
    names = [f"p{i:02d}.jpg" for i in range(11)] + ["broken.jpg"]
    shards = d / "shards"
    shards.mkdir(exist_ok=True)
    with tarfile.open(shards / "00000.tar", "w") as tf:
        for i, name in enumerate(names):
            tf.add(imgs / name, arcname=f"{i:09d}.jpg")
    use_fake_sail(monkeypatch, tpus=1)
    bm = write_fake_bmodel(d / "clip_4b_tar.bmodel", onnx_path, [4])
    out = d / "out-sail-device-tar"
    shutil.rmtree(out, ignore_errors=True)
    cfg = base_cfg(out, shards, "sail", bm, [0], sail={"mode": "device"})
    res, rows, fails = run_pipeline(cfg)
    assert res.exit_code == 3, res.message
    assert fails == {f"{names.index('broken.jpg'):09d}.jpg": "truncated"}
    ref, _ = cpu_rows
    by_name = {os.path.basename(p): e for p, e in ref.items()}
    assert len(rows) == 11
    for p, e in rows.items():
        assert "/00000.tar/" in p
        want = by_name[names[int(os.path.basename(p)[:9])]]
        assert float(np.dot(e, want)) >= DEVICE_MIN_COSINE and float(np.abs(e - want).max()) <= DEVICE_MAX_ABS, p
