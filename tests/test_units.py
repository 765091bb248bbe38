"""Pure cores: batching, padding, shard assembly, ledger, config, path encoding."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import config as cfgmod
from pipeline import pathcodec
from pipeline.ledger import Ledger
from pipeline.messages import Failure
from pipeline.output import decode_path_line, encode_path_line
from stages.infer import Batcher, pad_batch
from stages.sink import ShardAssembler


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


def test_ledger_reissue_and_crash_accounting():
    led = Ledger(shard_size=4)
    led.on_resolved([0, 1, 5], embedded=3, failed=0)
    assert led.to_reissue(7) == [2, 3, 4, 6]
    led.on_shard_written(0, rows=3, failed=1)
    assert led.to_reissue(7) == [4, 6]
    assert led.record_crash([4]) == [] and led.record_crash([4]) == [4]
    led.listed, led.listing_done = 7, True
    assert led.n_shards == 2 and not led.complete()
    led.on_shard_written(1, rows=3, failed=0)
    assert led.complete() and led.embedded == 6 and led.failed == 1


def test_config_overrides_and_errors():
    cfg = cfgmod.load(None, ["infer.threads=2", 'infer.devices=["cpu:0","cpu:1"]', "output.normalize=false"])
    assert cfg.infer.threads == 2 and cfg.infer.devices == ("cpu:0", "cpu:1") and not cfg.output.normalize
    with pytest.raises(cfgmod.ConfigError, match="infer.thread"):
        cfgmod.load(None, ["infer.thread=2"])
    with pytest.raises(cfgmod.ConfigError, match="output.shard_size: must be >= 1"):
        cfgmod.load(None, ["output.shard_size=0"])
    with pytest.raises(cfgmod.ConfigError, match="preprocess.mode"):
        cfgmod.load(None, ['preprocess.mode="quick"'])
    with pytest.raises(cfgmod.ConfigError, match="section.key=value"):
        cfgmod.load(None, ["threads=2"])


def test_every_config_key_is_documented():
    for key, field in cfgmod.iter_keys():
        assert field.metadata.get("doc"), f"config key {key} has no doc"


@pytest.mark.parametrize("path", [b"/a/b.jpg", b"/a/with space.jpg", b"/a/\xff\xfe.jpg", b"/a/new\nline.jpg",
                                  b'/a/"quoted".jpg', "/a/ünï.jpg".encode()])
def test_path_lines_round_trip(path):
    line = encode_path_line(path)
    assert b"\n" not in line
    line.decode("utf-8")  # strict: always valid UTF-8
    assert pathcodec.decode(decode_path_line(line)) == path
