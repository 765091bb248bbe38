"""What a run's start-up and shutdown skip: the model's sha256 remembered per file (models.model_sha256)
and a stage worker's poll woken by SIGTERM (worker.Loop.request_stop)."""

from __future__ import annotations

import hashlib
import os
import select
import time

from pipeline.model.models import model_sha256


def test_model_sha256_is_remembered_until_the_file_changes(tmp_path, monkeypatch):
    from pipeline.model import models

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cache = tmp_path / "cache" / "clip-pipeline" / "model-sha256.json"
    f = tmp_path / "m.onnx"
    f.write_bytes(b"a" * 1000)
    assert model_sha256(f) == hashlib.sha256(b"a" * 1000).hexdigest()
    assert not cache.exists()  # just written: too recent to be remembered (coarse timestamps)
    monkeypatch.setattr(models, "RACY_NS", 0)
    assert model_sha256(f) == hashlib.sha256(b"a" * 1000).hexdigest()
    assert str(f) in cache.read_text()
    st = os.stat(f)
    time.sleep(0.05)  # past the file system's timestamp tick
    f.write_bytes(b"b" * 1000)  # same size, and the mtime put back: the ctime still tells
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert model_sha256(f) == hashlib.sha256(b"b" * 1000).hexdigest()
    cache.write_text("{not json")
    assert model_sha256(f) == hashlib.sha256(b"b" * 1000).hexdigest()  # a broken cache is ignored


def test_request_stop_wakes_the_poll(monkeypatch):
    from pipeline.worker.loop import Loop

    loop = Loop.__new__(Loop)  # only the stop pipe, no sockets
    loop.stopping = False
    loop.stop_r, loop.stop_w = os.pipe()
    os.set_blocking(loop.stop_w, False)
    assert select.select([loop.stop_r], [], [], 0)[0] == []
    loop.request_stop()
    loop.request_stop()  # twice: still one wake-up pending, no error
    assert loop.stopping and select.select([loop.stop_r], [], [], 0)[0] == [loop.stop_r]
