"""SIGINT/SIGTERM during a run (pipeline/run/signals.py): a storm of signals still ends in order."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from robust_helpers import accounting, good_corpus, run_cli, start_cli, wait_for


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_storm_keeps_the_closing_message_and_leaves_no_temp_files(tmp_path, signum):
    """Default handlers came back before finish(): SIGINT every 5 ms printed "interrupted before the
    run started; nothing was processed" with shards on disk; SIGTERM printed nothing and left
    .manifest.json.tmp / .report.json.tmp. Handlers now stay until the manifest is written and a
    second signal only hurries the stop."""
    good = good_corpus(tmp_path / "in", 200)
    out = tmp_path / "out"
    p = start_cli(tmp_path / "in", out, **{"fake.latency_ms_per_batch": 200})
    wait_for(lambda: (out / "embeddings" / "part-00001.npy").exists(), 60, "two shards")
    t0 = time.monotonic()
    while p.poll() is None and time.monotonic() - t0 < 60:
        try:
            os.kill(p.pid, signum)
        except ProcessLookupError:
            break
        time.sleep(0.005)
    _stdout, stderr = p.communicate(timeout=60)
    name = "SIGINT" if signum == signal.SIGINT else "SIGTERM"
    assert p.returncode == (130 if signum == signal.SIGINT else 143), stderr
    assert f"Interrupted by {name}: " in stderr and "complete shard(s) on disk" in stderr, stderr
    assert "before this run started" not in stderr and "Traceback" not in stderr
    assert [str(x) for x in out.rglob("*.tmp")] == []
    assert json.loads((out / "manifest.json").read_text())["status"] == "interrupted"
    r = run_cli(tmp_path / "in", out)
    assert r.returncode == 0, r.stderr
    embedded, failed = accounting(out)
    assert set(embedded) == {str(x) for x in good} and not failed
