"""run_into: a run into another directory than the configured output (an update's or a range's
attempt, a query's work directory) is told that directory; the config's output.dir keeps meaning
the user's output, and no code redirects a run by rewriting it."""

from __future__ import annotations

import ast
import json
from pathlib import Path

from conftest import ROOT
from imagegen import make_images

from pipeline import config as cfgmod
from pipeline.data.rundir import EMB_DIR
from pipeline.run.attempt import run_into
from pipeline.run.plan import plan_run
from pipeline.wire.transport import Endpoints


def test_run_into_writes_the_given_directory_and_leaves_the_configured_one_alone(tmp_path):
    make_images(tmp_path / "imgs", 5)
    configured = tmp_path / "configured"
    cfg = cfgmod.load(None, ['infer.backend="fake"', 'run.progress="none"', "output.shard_size=4"],
                      input_paths=[str(tmp_path / "imgs")], output_dir=str(configured))
    attempt = tmp_path / "attempt"
    result = run_into(cfg, attempt, dtype="float16")
    assert result.exit_code == 0, result.message
    assert not configured.exists()  # nothing went to (or was checked in) the user's output
    assert sorted(p.name for p in (attempt / EMB_DIR).glob("*.npy")) == ["part-00000.npy", "part-00001.npy"]
    manifest = json.loads((attempt / "manifest.json").read_text())
    # the manifest records the directory it describes, and the overrides it was written with
    assert manifest["config"]["output"]["dir"] == str(attempt)
    assert manifest["config"]["output"]["dtype"] == "float16" and manifest["config"]["output"]["pickle"] is False
    assert cfg.output.dir == str(configured) and cfg.output.dtype == "float32"  # the caller's config unchanged
    assert run_into(cfg, attempt, dtype="float16").exit_code == 0  # resumed: it holds this run already


def test_the_plan_gives_the_source_and_the_sink_the_run_directory(tmp_path):
    cfg = cfgmod.from_dict({"input": {"paths": [str(tmp_path)]}, "output": {"dir": str(tmp_path / "configured")},
                            "infer": {"backend": "fake"}})
    ep = Endpoints.create()
    try:
        topo = plan_run(cfg, ["cpu:0"], ep, files_mode=False, tail_pieces=1, out_dir=str(tmp_path / "attempt"),
                        listing_path=str(tmp_path / "attempt" / "listing.jsonl"))
    finally:
        ep.cleanup()
    dirs = {s.role: s.out_dir for s in topo.specs if s.role in ("source", "sink")}
    assert dirs == {"source": str(tmp_path / "attempt"), "sink": str(tmp_path / "attempt")}


def output_dir_rewrites(root: Path = ROOT) -> list[str]:
    """Every `replace(X.output, dir=...)` (dataclasses.replace or Config.replace) in pipeline/,
    stages/ and scripts/, but config.py's own (it makes the user's output.dir absolute on load)."""
    found = []
    for pkg in ("pipeline", "stages", "scripts"):
        for p in sorted((root / pkg).rglob("*.py")):
            rel = p.relative_to(root).as_posix()
            for node in ast.walk(ast.parse(p.read_text())):
                if not (isinstance(node, ast.Call) and any(k.arg == "dir" for k in node.keywords)):
                    continue
                name = getattr(node.func, "attr", None) or getattr(node.func, "id", None)
                first = node.args[0] if node.args else None
                if name == "replace" and isinstance(first, ast.Attribute) and first.attr == "output":
                    found.append(f"{rel}:{node.lineno}")
    return [f for f in found if not f.startswith("pipeline/config.py:")]


def test_the_rewrite_check_can_fail(tmp_path):
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "m.py").write_text("from dataclasses import replace\n"
                                                "def f(cfg):\n    return replace(cfg.output, dir='/x')\n")
    assert output_dir_rewrites(tmp_path) == ["pipeline/m.py:3"]


def test_no_code_redirects_a_run_by_rewriting_output_dir():
    assert output_dir_rewrites() == []
