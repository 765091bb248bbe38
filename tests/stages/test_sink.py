"""Sink stage (stages/sink.py): shard assembly (pure) and SinkCore writing shards."""

from __future__ import annotations

import numpy as np

from pipeline.wire.messages import Failure
from stages.sink import ShardAssembler


def test_shard_assembler_dedupes_and_completes_in_id_order():
    asm = ShardAssembler(shard_size=3)
    row = lambda v: np.full(4, v, np.float32)  # noqa: E731
    assert asm.add_row(2, b"c", row(2))
    assert not asm.add_row(2, b"c", row(9))  # duplicate (re-issued id) dropped
    assert asm.add_failure(Failure(0, b"a", "empty", ""))
    assert not asm.add_row(0, b"a", row(0))
    assert asm.complete() == []
    asm.add_row(1, b"b", row(1))
    assert asm.complete() == [0]
    paths, emb, fails = asm.pop(0, 4, "float32")
    assert paths == [b"b", b"c"] and emb[:, 0].tolist() == [1, 2] and [f["id"] for f in fails] == [0]
    assert not asm.add_row(1, b"b", row(1))  # shard already written
    asm.add_row(3, b"d", row(3))
    assert asm.complete() == []  # last shard: size unknown until the total arrives
    asm.total = 4
    assert asm.complete() == [1]


def test_sink_core_writes_a_shard_once_every_id_is_resolved(tmp_path):
    from conftest import worker_spec

    from pipeline.data.rundir import RunDir
    from pipeline.output import iter_shards
    from pipeline.wire import messages
    from stages.sink import SinkCore

    RunDir(tmp_path).shards_dir.mkdir()  # made by the supervisor's RunDir.prepare
    core = SinkCore(worker_spec("sink", {"output": {"dir": str(tmp_path), "shard_size": 3}}))
    core.setup()
    emb = np.arange(8, dtype=np.float32).reshape(2, 4)
    out = core.handle(*messages.embeddings([2, 0], [b"/c.jpg", b"/a.jpg"], emb))
    assert [h["t"] for _, h, _ in out] == ["resolved"] and out[0][1]["ids"] == [2, 0]
    assert core.handle(*messages.embeddings([2], [b"/c.jpg"], emb[:1])) == []  # a duplicate is dropped
    out = core.handle(Failure(1, b"/b.jpg", "corrupt", "bad", "decode").header(), [])
    assert [(t, h["t"]) for t, h, _ in out] == [("control", "resolved"), ("control", "shard")]
    assert out[1][1] == messages.shard(0, 2, 1)
    (shard,) = iter_shards(tmp_path)
    assert shard.paths == ["/a.jpg", "/c.jpg"] and np.array_equal(shard.embeddings, emb[[1, 0]])
    assert shard.failures == [{"id": 1, "path": "/b.jpg", "reason": "corrupt", "message": "bad", "stage": "decode"}]
