"""The end of a run (issue #20): the last inputs travel as small "tail" pieces that a device runs at
once and that go only to a device about to run dry, so no device idles at the end while another
still holds a whole window of queued work. Counts and order only; nothing here is timed."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import worker_spec

from pipeline import config
from pipeline.backends import get_backend
from pipeline.run.plan import run_tail
from pipeline.wire.dispatch import Credits, tail_cap, tail_images, tail_piece
from pipeline.worker.loop import Slot
from stages import source
from stages.infer import InferCore
from stages.source import split_tail


def test_tail_sizes():
    assert tail_piece(16) == 4 and tail_piece(3) == 1 and tail_piece(1) == 1
    assert tail_cap(16) == 20
    assert tail_images(16, 1, 2) == 64  # what both devices' windows hold
    assert tail_images(16, 1, 1) == 0  # one device: nothing to balance


def test_split_tail_keeps_order_and_marks_the_last_inputs():
    todo = [(i, b"p%d" % i) for i in range(150)]
    msgs = list(split_tail(todo, 16, 64, 4))
    assert [x for part, _ in msgs for x in part] == todo  # every input once, in order
    main = [part for part, tail in msgs if not tail]
    tail = [part for part, t in msgs if t]
    assert all(len(p) == 16 for p in main) and sum(map(len, main)) == 80  # whole groups only
    assert sum(map(len, tail)) == 70 and all(len(p) == 4 for p in tail[:-1]) and len(tail[-1]) == 2
    assert [t for _, t in msgs] == [False] * len(main) + [True] * len(tail)  # the tail is the end
    assert [t for _, t in split_tail(todo, 16, 0, 4)] == [False] * 10


def test_credits_give_tail_pieces_only_to_a_device_about_to_run_dry():
    c = Credits(2)
    for d in (0, 1):
        c.on_credit({"peer": d, "gen": 0, "w": 32, "n": 0})
    c.on_sent(0, 32)  # device 0: running one batch, one more queued
    c.on_sent(1, 17)
    assert c.choose(cap=20, n=4) is None  # neither would stay within one batch plus the piece
    assert c.choose() == 1  # an ordinary group still fits device 1's window
    c.on_credit({"peer": 0, "gen": 0, "w": 32, "n": 16})  # device 0 finished a batch: 16 held
    assert c.choose(cap=20, n=4) == 0
    c.on_sent(0, 4)
    assert c.choose(cap=20, n=4) is None  # 20 held: full for tail pieces


def test_infer_runs_a_tail_piece_at_once(tmp_path):
    spec = worker_spec("infer", {"infer": {"backend": "fake", "overlap": False, "batch_timeout_ms": 60000},
                                 "model": {"batch_size": 16}, "fake": {"dim": 8}})
    core = InferCore(spec, Slot(str(tmp_path / "slot")))
    core.setup()
    px = np.zeros((3, 224, 224, 3), np.uint8)

    def msg(ids, **extra):
        return ({"t": "pxs", "ids": ids, "paths": [b"p%d" % i for i in ids], "shape": [len(ids), 224, 224, 3],
                 "dtype": "|u1", **extra}, [memoryview(px[:len(ids)])])

    assert core.handle(*msg([0, 1, 2])) == []  # an ordinary partial group waits for its batch
    out = core.handle(*msg([3, 4], tail=20))  # a tail piece runs now, with what was pending
    assert [h["ids"] for _, h, _ in out if h["t"] == "emb"] == [[0, 1, 2, 3, 4]]
    assert not core.batcher.pending
    core.close()


class _Done(Exception):
    pass


class _RecLoop:
    """What run_source needs of the worker loop; records what it sends, stops once all is listed."""

    def __init__(self):
        self.sent: list[dict] = []
        self.done = False

    def send(self, target, header, buffers=()):
        if target == "next":
            self.sent.append(header)
        elif header.get("t") == "listed" and header.get("done"):
            self.done = True

    def check_alive(self):
        if self.done:
            raise _Done()

    def report_stats(self, force=False):
        pass


@pytest.mark.parametrize("backend,dispatch", [("cpu", "credit"), ("cpu", "round_robin"), ("fake", "credit")])
def test_source_sends_the_last_inputs_as_tail_pieces(tmp_path, backend, dispatch):
    imgs = tmp_path / "in"
    imgs.mkdir()
    n = 150  # more than two of the source's chunks: the tail is held back across chunks
    for i in range(n):
        (imgs / f"{i:04d}.jpg").write_bytes(b"x")
    raw = {"input": {"paths": [str(imgs)]}, "infer": {"backend": backend, "devices": ["cpu:0", "cpu:1"]},
           "model": {"batch_size": 16}, "workers": {"items_per_message": 16}, "queues": {"dispatch": dispatch}}
    cfg = config.from_dict(raw)
    tail_n, piece, cap = run_tail(cfg, 2, get_backend(backend).tail_pieces(cfg))  # as the run plan decides it
    spec = worker_spec("source", raw, listing_path=str(tmp_path / "listing.jsonl"), tail_n=tail_n, tail_piece=piece,
                       tail_cap=cap)
    loop, slot = _RecLoop(), Slot(str(tmp_path / "slot"))
    with pytest.raises(_Done):
        source.run_source(spec, slot, loop)
    ids = [i for h in loop.sent for i in (h["ids"] if "ids" in h else [h["id"]])]
    assert ids == list(range(n))  # every input once, in listing order
    assert slot.sent_upto == n
    tails = [h for h in loop.sent if h.get("tail")]
    if dispatch == "round_robin" or backend == "fake":  # the fake's latency is per batch: no pieces
        assert tail_n == 0 and tails == []
        return
    assert (tail_n, piece, cap) == (64, 4, 20)
    assert {h["tail"] for h in tails} == {20}
    assert sum(len(h["ids"]) for h in tails) >= tail_n and all(len(h["ids"]) <= piece for h in tails)
    assert all(not h.get("tail") for h in loop.sent[:-len(tails)])  # the pieces are the last messages
    assert all(len(h["ids"]) == 16 for h in loop.sent[:-len(tails)])


def test_two_cpu_devices_with_tail_pieces_write_what_one_device_writes(tmp_path, tiny_model):
    """End to end on the cpu backend, fused decode: 2 devices (the last 16 inputs as tail pieces of
    one image) write byte for byte the shards of 1 device (no tail), one input failing on the way."""
    from imagegen import make_images
    from test_supervisor_e2e import _output_files, run_pipeline

    make_images(tmp_path / "imgs", 37, seed=5)
    (tmp_path / "imgs" / "zz-broken.jpg").write_bytes(b"not an image")  # inside the tail
    sets = {"model.batch_size": "4", "workers.items_per_message": "4", "output.shard_size": "16"}
    one = run_pipeline([tmp_path / "imgs"], tmp_path / "one", tiny_model, **sets)
    two = run_pipeline([tmp_path / "imgs"], tmp_path / "two", tiny_model,
                       **{**sets, "infer.devices": '["cpu:0", "cpu:1"]'})
    assert one.exit_code == two.exit_code == 3  # completed with one failure
    a, b = _output_files(tmp_path / "one"), _output_files(tmp_path / "two")
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name] == b[name], f"{name} differs between 1 and 2 devices"
