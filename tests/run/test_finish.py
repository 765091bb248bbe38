"""How a run ends (pipeline/run/finish.py): exit codes and the closing messages people read."""

from __future__ import annotations

import json

from robust_helpers import accounting, good_corpus, run_cli


def test_disk_full_at_the_final_manifest_is_exit_4_then_resumes(tmp_path):
    good = good_corpus(tmp_path / "in", 20)
    out = tmp_path / "out"
    r = run_cli(tmp_path / "in", out, env_extra={"CLIP_PIPELINE_TEST_ENOSPC_MANIFEST": "complete"})
    assert r.returncode == 4, r.stderr
    assert "the output disk is full" in r.stderr and "Traceback" not in r.stderr
    assert json.loads((out / "manifest.json").read_text())["status"] == "failed"
    r = run_cli(tmp_path / "in", out)
    assert r.returncode == 0, r.stderr
    embedded, _failed = accounting(out)
    assert set(embedded) == {str(x) for x in good}


def test_final_messages_read_right(tmp_path):
    """"Completed with 1 failures", "to resume.. Kept:", a resumed run's "Embedded 20 of 20" that
    did not say most were earlier runs' work, and the added-inputs warning without --update."""
    good = good_corpus(tmp_path / "in", 20)
    (tmp_path / "in" / "bad.jpg").write_bytes(b"not an image at all")
    out = tmp_path / "out"
    r = run_cli(tmp_path / "in", out, env_extra={"CLIP_PIPELINE_TEST_ENOSPC_SHARD": "1"})
    assert r.returncode == 4 and "Run aborted: " in r.stderr and ".. Kept" not in r.stderr, r.stderr
    r = run_cli(tmp_path / "in", out)
    assert r.returncode == 3, r.stderr
    assert "Completed with 1 failure: see" in r.stdout
    assert "of the inputs were done by an earlier run of this output, 13 by this one." in r.stdout, r.stdout
    good_corpus(tmp_path / "more", 1)[0].rename(tmp_path / "in" / "new.jpg")
    r = run_cli(tmp_path / "in", out)
    assert "1 input(s) added" in r.stderr and "--update" in r.stderr, r.stderr
    assert len(good) == 20
