"""Pure cores: batching, padding, shard assembly, ledger, config, path encoding."""

from __future__ import annotations

import pytest

from pipeline import config as cfgmod
from pipeline.data.rundir import decode_path_line, encode_path_line
from pipeline.run.ledger import Ledger
from pipeline.wire import pathcodec


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


@pytest.mark.parametrize("path", [b"/a/b.jpg", b"/a/with space.jpg", b"/a/\xff\xfe.jpg", b"/a/new\nline.jpg",
                                  b'/a/"quoted".jpg', "/a/ünï.jpg".encode()])
def test_path_lines_round_trip(path):
    line = encode_path_line(path)
    assert b"\n" not in line
    line.decode("utf-8")  # strict: always valid UTF-8
    assert pathcodec.decode(decode_path_line(line)) == path
