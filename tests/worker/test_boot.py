"""Infer workers launched as plain subprocesses (`python -m pipeline.worker.boot`), as the simulator
device does under TPU-MLIR's Python 3.10, speak the same protocol and give the same output."""

from __future__ import annotations

import sys

import numpy as np
from imagegen import make_images

from pipeline import config as cfgmod
from pipeline.backends.fake import FakeBackend
from pipeline.output import load_embeddings
from pipeline.run.progress import Progress
from pipeline.run.supervisor import ForeignProcess, Supervisor


def _run(inputs, out):
    cfg = cfgmod.load(None, ['infer.backend="fake"', 'infer.devices=["cpu:0","cpu:1"]', "model.batch_size=4",
                             "output.shard_size=5", "infer.batch_timeout_ms=10"],
                      input_paths=[str(inputs)], output_dir=str(out))
    sup = Supervisor(cfg, progress=Progress("none"))
    return sup, sup.run()


def test_foreign_interpreter_workers_match_spawned_ones(tmp_path, monkeypatch):
    make_images(tmp_path / "imgs", 13)
    _, spawned = _run(tmp_path / "imgs", tmp_path / "a")
    monkeypatch.setattr(FakeBackend, "worker_python", classmethod(lambda cls, cfg: sys.executable))
    sup, foreign = _run(tmp_path / "imgs", tmp_path / "b")
    assert spawned.exit_code == foreign.exit_code == 0, foreign.message
    infer = [w for w in sup.workers.values() if w.role == "infer"]
    assert len(infer) == 2 and all(isinstance(w.proc, ForeignProcess) for w in infer)  # a live or finished process each
    pa, ea = load_embeddings(tmp_path / "a")
    pb, eb = load_embeddings(tmp_path / "b")
    assert pa == pb and len(pa) == 13
    assert np.asarray(ea).tobytes() == np.asarray(eb).tobytes()
