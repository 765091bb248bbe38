"""Listing the inputs (pipeline/data/listing.py): nothing the user asked for vanishes, nothing is listed twice."""

from __future__ import annotations

import json

from robust_helpers import accounting, good_corpus, run_cli


def test_unreadable_directory_is_a_failed_input_in_the_accounting(tmp_path):
    good = good_corpus(tmp_path / "in", 5)
    good_corpus(tmp_path / "in" / "locked", 3)
    out = tmp_path / "out"
    r = run_cli(tmp_path / "in", out, "--progress", "none",
                env_extra={"CLIP_PIPELINE_TEST_UNREADABLE_DIR": "locked"})
    assert r.returncode == 3, r.stderr
    assert f"unreadable directory {tmp_path / 'in' / 'locked'}" in r.stderr
    embedded, failed = accounting(out)
    assert set(embedded) == {str(p) for p in good}
    assert failed == {str(tmp_path / "in" / "locked"): "unreadable"}
    assert "Completed with 1 failure" in r.stdout


def test_list_and_input_paths_are_both_used_each_file_once(tmp_path):
    """The shipped config has input.paths; --list FILE added its entries after the walk, and a file
    in both was embedded twice without a word."""
    imgs = good_corpus(tmp_path / "in", 4)
    extra = good_corpus(tmp_path / "more", 2)
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join(str(p) for p in [imgs[1], extra[0], imgs[3], extra[1]]) + "\n")
    out = tmp_path / "out"
    r = run_cli(tmp_path / "in", out, "--list", str(lst))
    assert r.returncode == 0, r.stderr
    assert "both input.paths" in r.stderr and "input.list" in r.stderr
    assert "2 entries of input.list" in r.stderr
    embedded, failed = accounting(out)
    assert set(embedded) == {str(p) for p in imgs + extra} and not failed
    assert json.loads((out / "manifest.json").read_text())["counts"]["total"] == 6
