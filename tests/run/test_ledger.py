"""The supervisor's accounting of ids (pipeline/run/ledger.py): re-issue, crashes, completion."""

from __future__ import annotations

from pipeline.run.ledger import Ledger


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
