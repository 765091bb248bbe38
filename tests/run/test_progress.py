"""The progress display (pipeline/run/progress.py): messages people need get through every mode but --quiet."""

from __future__ import annotations

import subprocess

from conftest import ROOT, cli, cli_env


def test_warnings_print_with_progress_none_unless_quiet(tmp_path):
    """--progress none (cron) dropped every warning: an input without images exited 0 without a word."""
    (tmp_path / "empty").mkdir()
    base = ["run", "-i", str(tmp_path / "empty"), "-o", str(tmp_path / "out"), "--set", 'infer.backend="fake"']
    r = subprocess.run(cli(*base, "--progress", "none"), cwd=ROOT, env=cli_env(), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "warning: no input files found under" in r.stderr, r.stderr
    r = subprocess.run(cli(*base, "--progress", "none", "--quiet"), cwd=ROOT, env=cli_env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stderr == "" and r.stdout == "", (r.stdout, r.stderr)
