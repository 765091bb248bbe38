"""Infer stage (stages/infer.py): batching, padding, groups, and infer.overlap (device calls on one
background thread, the next batch prepared meanwhile), driving InferCore directly (no sockets)."""

from __future__ import annotations

import select
import threading
import time

import numpy as np
import pytest
from conftest import worker_spec

from pipeline import config
from pipeline.backends.base import DeviceError
from pipeline.worker.loop import Slot, WorkerSpec
from stages.infer import Batcher, InferCore, pad_batch

WAIT_S = 10.0


def test_batcher_full_and_timeout():
    b = Batcher(3, timeout_s=0.05)
    assert b.add(0, b"a", None, now=10.0) is None
    assert b.deadline() == pytest.approx(10.05)
    assert b.add(1, b"b", None, now=10.01) is None
    full = b.add(2, b"c", None, now=10.02)
    assert full.ids == [0, 1, 2] and not b.pending
    b.add(3, b"d", None, now=11.0)
    assert not b.due(11.04) and b.due(11.05)
    assert b.take().ids == [3]


def test_pad_batch_zero_pads_and_rejects_oversize():
    x = np.ones((2, 4, 4, 3), np.uint8)
    p = pad_batch(x, 5)
    assert p.shape == (5, 4, 4, 3) and p[:2].all() and not p[2:].any()
    assert pad_batch(x, 2) is x
    with pytest.raises(ValueError):
        pad_batch(x, 1)


def test_infer_groups_fill_batches_across_messages(tmp_path):
    spec = worker_spec("infer", {"infer": {"backend": "fake", "overlap": False}, "model": {"batch_size": 4}})
    core = InferCore(spec, Slot(str(tmp_path / "slot")))
    core.setup()
    px = np.random.default_rng(1).integers(0, 256, (6, 224, 224, 3), dtype=np.uint8)

    def msg(lo, hi):
        return {"t": "pxs", "ids": list(range(lo, hi)), "paths": [b"p%d" % i for i in range(lo, hi)],
                "shape": [hi - lo, 224, 224, 3], "dtype": "|u1"}, [memoryview(np.ascontiguousarray(px[lo:hi]))]

    out = core.handle(*msg(0, 3)) + core.handle(*msg(3, 6))
    embs = [h for _, h, _ in out if h["t"] == "emb"]
    assert [e["ids"] for e in embs] == [[0, 1, 2, 3]]
    rest = core.flush(1e18)  # the partial batch is flushed after the timeout
    assert [h["ids"] for _, h, _ in rest if h["t"] == "emb"] == [[4, 5]]
    whole = core.handle(*msg(0, 4))  # a whole batch in one message goes straight through
    (_, h, (emb,)), = whole
    assert h["ids"] == [0, 1, 2, 3]
    np.testing.assert_allclose(emb, out[0][2][0], rtol=1e-6)


def _core(tmp_path, overlap: bool, batch: int = 4, name: str = "slot", **fake) -> InferCore:
    cfg = config.from_dict({"infer": {"backend": "fake", "overlap": overlap, "batch_timeout_ms": 50},
                            "model": {"batch_size": batch}, "fake": {"dim": 16, **fake}})
    spec = WorkerSpec(role="infer", index=0, cfg=cfg, in_addr=None, next_addrs=(), sink_addr="",
                      control_addr="", device="cpu:0")
    core = InferCore(spec, Slot(str(tmp_path / name)))
    core.setup()
    return core


def _msg(px, lo, hi):
    return ({"t": "pxs", "ids": list(range(lo, hi)), "paths": [b"p%d" % i for i in range(lo, hi)],
             "shape": [hi - lo, *px.shape[1:]], "dtype": "|u1"}, [memoryview(np.ascontiguousarray(px[lo:hi]))])


def _wait_wake(core: InferCore) -> None:
    """Block on the wake fd as the worker loop's poller does (with a timeout) until the in-flight
    batch is done. A wake-up can be stale (written by a batch already collected): that costs the
    loop one empty turn, never a busy loop."""
    t_end = time.monotonic() + WAIT_S
    while True:
        r, _, _ = select.select([core.wake_fd()], [], [], max(0.0, t_end - time.monotonic()))
        assert r, "the in-flight batch did not finish (no wake-up)"
        core.runner.clear_wake()  # first clear, then look (as InferCore.collect does): no lost wake-up
        job = core.runner.inflight
        if job is None or job.done.is_set():
            return


def _drain(core: InferCore) -> list:
    """What the worker loop does until nothing is left: wait for wake-ups / the flush deadline."""
    out: list = []
    t_end = time.monotonic() + WAIT_S
    while core.runner.inflight is not None or core.batcher.pending:
        assert time.monotonic() < t_end
        if core.runner.inflight is not None:
            _wait_wake(core)
        out.extend(core.flush(time.monotonic() + 1.0))  # as if the batch timeout had passed
    return out


def _embs(outputs) -> list[tuple[list[int], np.ndarray]]:
    return [(h["ids"], b[0]) for _, h, b in outputs if h["t"] == "emb"]


@pytest.fixture
def pixels():
    return np.random.default_rng(3).integers(0, 256, (22, 224, 224, 3), dtype=np.uint8)


def test_overlap_keeps_order_and_results(tmp_path, pixels):
    serial = _core(tmp_path, overlap=False, name="s")
    over = _core(tmp_path, overlap=True, name="o", latency_ms_per_batch=15)
    assert serial.wake_fd() is None and over.info["overlap"] is True
    ref, got = [], []
    for lo, hi in [(0, 3), (3, 8), (8, 12), (12, 13), (13, 20), (20, 22)]:  # groups cross batches
        ref += serial.handle(*_msg(pixels, lo, hi))
        got += over.handle(*_msg(pixels, lo, hi))
    ref += serial.flush(1e18)
    got += _drain(over)
    assert [i for i, _ in _embs(got)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15],
                                          [16, 17, 18, 19], [20, 21]]
    assert [i for i, _ in _embs(got)] == [i for i, _ in _embs(ref)]
    for (_, a), (_, b) in zip(_embs(got), _embs(ref)):
        np.testing.assert_array_equal(a, b)
    assert over.slot.current_ids() == [] and over.slot.busy_since == 0.0
    over.close()
    serial.close()


def test_slot_holds_in_flight_and_prepared_ids(tmp_path, pixels):
    core = _core(tmp_path, overlap=True)
    gate = threading.Event()
    real_embed = core.device.embed

    def gated(px):
        assert gate.wait(WAIT_S)
        return real_embed(px)

    core.device.embed = gated
    assert core.handle(*_msg(pixels, 0, 4)) == []  # batch A submitted, runs in the background
    assert core.slot.current_ids() == [0, 1, 2, 3]
    since_a = core.slot.busy_since
    assert since_a > 0
    box: list = []
    t = threading.Thread(target=lambda: box.append(core.handle(*_msg(pixels, 4, 8))))
    t.start()  # prepares B, then waits for A: the slot must hold both, busy since A started
    t_end = time.monotonic() + WAIT_S
    while core.slot.current_ids() != list(range(8)):
        assert time.monotonic() < t_end, core.slot.current_ids()
        time.sleep(0.005)
    assert core.slot.busy_since == since_a
    gate.set()
    t.join(WAIT_S)
    assert [i for i, _ in _embs(box[0])] == [[0, 1, 2, 3]]
    assert core.slot.current_ids() == [4, 5, 6, 7] and core.slot.busy_since > since_a
    assert [i for i, _ in _embs(_drain(core))] == [[4, 5, 6, 7]]
    assert core.slot.current_ids() == []
    core.close()


def test_device_error_surfaces_on_the_loop_thread(tmp_path, pixels, monkeypatch):
    monkeypatch.setenv("CLIP_PIPELINE_WORKER_GENERATION", "0")  # fake faults fire in generation 0 only
    core = _core(tmp_path, overlap=True, fail_on_batch=2)
    assert core.handle(*_msg(pixels, 0, 4)) == []
    assert [i for i, _ in _embs(core.handle(*_msg(pixels, 4, 8)))] == [[0, 1, 2, 3]]
    _wait_wake(core)  # batch 2 failed in the background ...
    with pytest.raises(DeviceError, match="injected failure on batch 2"):
        core.flush(time.monotonic())  # ... and the loop thread gets the DeviceError
    # the loop then calls slot.end() and exits EXIT_DEVICE; the failed batch's ids were in the slot
    core.close()

    core = _core(tmp_path, overlap=True, name="slot2", fail_on_batch=1)
    core.handle(*_msg(pixels, 0, 4))
    with pytest.raises(DeviceError):  # also when it surfaces while the next batch is handed over
        core.handle(*_msg(pixels, 4, 8))
    core.close()


def test_partial_batch_flush_and_prompt_wakeup(tmp_path, pixels):
    core = _core(tmp_path, overlap=True, latency_ms_per_batch=30)
    t0 = time.monotonic()
    assert core.handle(*_msg(pixels, 0, 3)) == []
    assert core.deadline() is not None and core.deadline() <= t0 + 0.05 + 1e-3
    out = core.flush(core.deadline())  # the batch timeout: the partial batch goes to the device
    assert out == [] and core.runner.inflight is not None
    assert core.deadline() is None  # nothing pending: the loop sleeps until the wake fd fires
    _wait_wake(core)
    out = core.flush(time.monotonic())
    assert [i for i, _ in _embs(out)] == [[0, 1, 2]]
    assert core.flush(time.monotonic()) == [] and core.deadline() is None and core.runner.inflight is None
    core.close()


def test_default_two_phase_defers_to_embed_files():
    from pipeline.backends.base import Device, FileBatchResult, Prepared
    from pipeline.wire.messages import Failure

    class FilesOnly(Device):
        batch_size, dim = 4, 2

        def embed_files(self, ids, paths):
            return FileBatchResult(ids=list(ids)[1:], embeddings=np.ones((len(ids) - 1, 2), np.float32),
                                   failures=[Failure(ids[0], paths[0], "corrupt", "bad")])

    dev = FilesOnly()
    prep = dev.prepare_files([5, 6, 7], [b"a", b"b", b"c"])
    assert isinstance(prep, Prepared) and prep.ids == [5, 6, 7] and prep.failures == []
    res = dev.run_prepared(prep)
    assert res.ids == [6, 7] and [f.id for f in res.failures] == [5] and res.embeddings.shape == (2, 2)
    # failures found while preparing are kept in front of the device's own
    res = dev.run_prepared(Prepared(ids=[6, 7], paths=[b"b", b"c"], failures=[Failure(5, b"a", "empty", "")]))
    assert [f.id for f in res.failures] == [5, 6]
