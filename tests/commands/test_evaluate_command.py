"""`clip-pipeline eval` (pipeline/commands/evaluate.py): what it checks before any work."""

from __future__ import annotations

import pytest
from conftest import invoke


def test_eval_linear_probe_checks_its_extras_before_embedding(tmp_path, monkeypatch):
    import importlib.util

    from pipeline.commands import evaluate

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "threadpoolctl" else real(name, *a))
    monkeypatch.setattr(evaluate, "features", lambda *a, **k: pytest.fail("embedded before checking the extras"))
    r = invoke("eval", "linear-probe", "--train", tmp_path, "--test", tmp_path)
    assert r.exit_code == 2, r.output
    assert "threadpoolctl" in r.output and "clip-pipeline[eval]" in r.output
