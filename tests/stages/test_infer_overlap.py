"""infer.overlap end to end: the whole pipeline on the fake sophon.sail with simulated decode and
inference latencies, serial vs overlapped (InferCore's unit tests: tests/stages/test_infer.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from imagegen import photo, write
from sail_helpers import use_fake_sail, write_fake_bmodel

from pipeline import config

# --- end to end, fake sophon.sail with latencies ----------------------------------------------------

N_IMAGES = 128


@pytest.fixture(scope="module")
def sail_setup(tmp_path_factory, tiny_model):
    d = tmp_path_factory.mktemp("overlap")
    onnx_path = tiny_model
    imgs = d / "imgs"
    imgs.mkdir()
    base = [photo(96 + 8 * i, 120 - 4 * i, i) for i in range(8)]
    for i in range(N_IMAGES):
        write(imgs / f"i{i:03d}.jpg", base[i % 8], quality=80 + i % 15)
    return d, write_fake_bmodel(d / "clip16.bmodel", onnx_path, [16]), imgs


def _sail_run(d: Path, bm: Path, imgs: Path, overlap: bool) -> dict:
    from pipeline.output import load_embeddings
    from pipeline.run.supervisor import run

    out = d / f"out-{overlap}"
    cfg = {"input": {"paths": [str(imgs)]}, "output": {"dir": str(out), "shard_size": 16},
           "model": {"path": str(bm)}, "infer": {"backend": "sail", "devices": [0], "overlap": overlap,
                                                "batch_timeout_ms": 20},
           "run": {"progress": "none"}}
    res = run(config.from_dict(cfg))
    assert res.exit_code == 0, res.message
    paths, emb = load_embeddings(res.out_dir)
    return dict(zip(paths, np.asarray(emb)))


def test_sail_overlap_gives_identical_output(sail_setup, monkeypatch):
    """The overlapped loop (device call on the background thread, next batch decoded meanwhile) gives
    the serial loop's output row for row. Its speed-up is measured by scripts/bench_overlap_sail.py
    (a wall-clock ratio is a benchmark, not a test)."""
    d, bm, imgs = sail_setup
    use_fake_sail(monkeypatch)
    monkeypatch.setenv("FAKE_SAIL_DECODE_MS", "1")  # latencies so that the two phases really overlap
    monkeypatch.setenv("FAKE_SAIL_INFER_MS", "15")
    rows_s = _sail_run(d, bm, imgs, overlap=False)
    rows_o = _sail_run(d, bm, imgs, overlap=True)
    assert len(rows_s) == N_IMAGES and sorted(rows_o) == sorted(rows_s)
    for p, v in rows_s.items():
        np.testing.assert_array_equal(rows_o[p], v)


