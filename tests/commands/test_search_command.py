"""`clip-pipeline search` (pipeline/commands/search.py): its errors are one line that says what to do."""

from __future__ import annotations

import subprocess

from conftest import ROOT, cli, cli_env
from robust_helpers import good_corpus, run_cli


def test_search_text_without_the_vocab_is_one_line(tmp_path):
    good_corpus(tmp_path / "in", 3)
    assert run_cli(tmp_path / "in", tmp_path / "out").returncode == 0
    r = subprocess.run(cli("search", str(tmp_path / "out"), "--text", "a dog", "--text-backend", "fake"),
                       cwd=ROOT, env=cli_env(CLIP_PIPELINE_VOCAB=str(tmp_path / "missing.gz")),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "fetch-vocab" in r.stderr
