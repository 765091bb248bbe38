"""Shared helpers of the cluster tests: a small corpus with one bad input, its single-host
reference run, and the byte comparison a merged cluster output must pass."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from robust_helpers import ROOT, env, fake_sets, good_corpus

SHARD = 4
RANGE_SHARDS = 2  # ranges of 8 inputs


def corpus(base: Path, n_good: int = 30) -> Path:
    d = base / "in"
    good_corpus(d / "a", n_good // 2)
    good_corpus(d / "b", n_good - n_good // 2)
    (d / "b" / "zz_bad.jpg").write_bytes(b"not an image at all")
    return d


def sets(**extra: object) -> list[str]:
    return fake_sets(**{"output.shard_size": SHARD, "infer.devices": ["cpu:0", "cpu:1"], **extra})


def cli(*args: str, timeout: float = 120, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, env=env(**(env_extra or {})),
                          capture_output=True, text=True, timeout=timeout, check=False)


def start(*args: str, env_extra: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, env=env(**(env_extra or {})),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def reference(inp: Path, out: Path, **extra: object) -> Path:
    r = cli("run", "-i", str(inp), "-o", str(out), "--progress", "none", *sets(**extra))
    assert r.returncode == 3, r.stderr  # one bad input
    return out


def layout_files(out: Path) -> dict[str, bytes]:
    """The files a single-host run writes, minus the timestamped manifest.json and report.json."""
    names = ["listing.jsonl", "failures.jsonl"] + [f"{d}/{p.name}" for d in ("embeddings", "img_emb", "metadata")
                                                    if (out / d).is_dir() for p in (out / d).iterdir()]
    return {n: (out / n).read_bytes() for n in sorted(names) if not n.split("/")[-1].startswith(".")}


def assert_same_as_reference(merged: Path, ref: Path) -> None:
    from pipeline.output import load_embeddings

    got, want = layout_files(merged), layout_files(ref)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name] == want[name], f"{name} differs from the single-host run"
    pa, ea = load_embeddings(merged)
    pb, eb = load_embeddings(ref)
    assert pa == pb
    assert (ea[:] == eb[:]).all()
    r = cli("inspect", "--verify", str(merged))
    assert r.returncode == 0, r.stdout + r.stderr
    m = json.loads((merged / "manifest.json").read_text())
    assert m["status"] == "complete" and m["counts"]["total"] == len(pa) + m["counts"]["failed"]
