"""Re-running over an existing output: changed inputs are reported, --dry-run tells the truth,
refusals name config keys and come before any model is built (issue #14)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from imagegen import encode, photo
from robust_helpers import good_corpus, run_cli

from pipeline.data import rundir


def _finished(tmp_path: Path, n: int = 3, *extra: str) -> tuple[Path, Path]:
    d = tmp_path / "in"
    good_corpus(d, n)
    out = tmp_path / "out"
    r = run_cli(d, out, *extra)
    assert r.returncode == 0, r.stderr
    return d, out


def test_rerun_of_a_finished_output_reports_added_and_removed_inputs(tmp_path):
    d, out = _finished(tmp_path)
    r = run_cli(d, out)
    assert r.returncode == 0 and "added" not in r.stdout + r.stderr  # nothing changed: nothing said
    names = sorted(p.name for p in d.iterdir())
    (d / "000-sorts-first.jpg").write_bytes(encode(photo(48, 40, 99)))
    (d / names[-1]).unlink()
    r = run_cli(d, out)
    assert r.returncode == 0, r.stderr
    said = r.stdout + r.stderr
    assert "1 input(s) added" in said and "000-sorts-first.jpg" in said and "1 removed" in said, said
    assert "--restart" in said and "--update" in said
    # the message is also in the final line a --quiet-less user reads on stdout
    assert "1 input(s) added" in r.stdout
    r = run_cli(d, out, "--dry-run")
    assert r.returncode == 0 and "1 input(s) added" in r.stdout + r.stderr


def test_resume_with_a_complete_listing_reports_a_file_added_that_sorts_first(tmp_path):
    d, out = _finished(tmp_path, 8, "--set", "output.shard_size=3")
    m = json.loads((out / "manifest.json").read_text())
    m["status"] = "interrupted"
    (out / "manifest.json").write_text(json.dumps(m))
    (out / rundir.EMB_DIR / "part-00002.npy").unlink()  # the last shard is missing: resume writes it
    (d / "000-new.jpg").write_bytes(encode(photo(48, 40, 98)))
    r = run_cli(d, out, "--set", "output.shard_size=3")
    assert r.returncode == 0, r.stderr
    assert "1 input(s) added" in r.stdout + r.stderr and "000-new.jpg" in r.stdout + r.stderr
    assert rundir.completed_shards(out) == [0, 1, 2]


def test_dry_run_refuses_what_the_run_refuses_with_the_same_message(tmp_path):
    d, out = _finished(tmp_path)
    before = sorted(p.name for p in out.rglob("*"))
    change = ["--set", 'preprocess.mode="fast"']
    dry = run_cli(d, out, *change, "--dry-run")
    real = run_cli(d, out, *change)
    assert real.returncode == dry.returncode == 2, (dry.stdout, dry.stderr)
    assert real.stderr.strip().splitlines()[-1] == dry.stderr.strip().splitlines()[-1]
    line = real.stderr.strip().splitlines()[-1]
    assert "different preprocess.mode ('reference' there, 'fast' now)" in line and "preprocess_mode" not in line
    assert sorted(p.name for p in out.rglob("*")) == before  # neither wrote anything


def test_dry_run_reports_the_existing_run(tmp_path):
    d, out = _finished(tmp_path, 7, "--set", "output.shard_size=3")
    r = run_cli(d, out, "--set", "output.shard_size=3", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert f"existing run in {out}: complete: 3 of 3 shards, 7 inputs (7 embedded, 0 failed)" in r.stdout
    m = json.loads((out / "manifest.json").read_text())
    m["status"] = "interrupted"
    (out / "manifest.json").write_text(json.dumps(m))
    (out / rundir.EMB_DIR / "part-00001.npy").unlink()
    r = run_cli(d, out, "--set", "output.shard_size=3", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert f"existing run in {out}: interrupted: 2 of 3 shards complete, 7 inputs listed" in r.stdout
    assert "resumes" in r.stdout
    r = run_cli(d, out, "--set", "output.shard_size=3", "--dry-run", "--restart")
    assert "--restart deletes it" in r.stdout


def test_a_new_model_to_build_is_refused_before_it_is_built(tmp_path, tiny_model):
    d = tmp_path / "in"
    good_corpus(d, 3)
    out = tmp_path / "out"
    cpu = ["--set", 'infer.backend="cpu"', "--set", f'model.path="{tiny_model}"', "-d", "cpu:0"]
    r = run_cli(d, out, *cpu)
    assert r.returncode == 0, r.stderr
    new = tmp_path / "models" / "other.onnx"
    change = ["--set", 'infer.backend="cpu"', "--set", f'model.path="{new}"', "--set", 'model.build="tiny"',
              "--set", "model.seed=7", "-d", "cpu:0"]
    for extra in (["--dry-run"], []):
        r = run_cli(d, out, *change, *extra)
        assert r.returncode == 2, (extra, r.stdout, r.stderr)
        line = r.stderr.strip().splitlines()[-1]
        assert f"different model.path ({tiny_model} there" in line and str(new) in line, line
        assert "Nothing was built" in line
        assert not new.exists() and "Building synthetic" not in r.stderr
    # an existing different model is refused naming model.path too
    other = tmp_path / "other.onnx"
    shutil.copy(tiny_model, other)
    with open(other, "ab") as fh:
        fh.write(b"\0")
    r = run_cli(d, out, "--set", 'infer.backend="cpu"', "--set", f'model.path="{other}"', "-d", "cpu:0")
    assert r.returncode == 2 and "different model.path (a model with sha256" in r.stderr


def test_other_changes_are_refused_before_a_model_is_rebuilt(tmp_path):
    """The run's model was built by model.build and has been deleted since: a changed
    preprocess.mode is refused before the model is built again."""
    d = tmp_path / "in"
    good_corpus(d, 3)
    out = tmp_path / "out"
    model = tmp_path / "models" / "tiny.onnx"
    cpu = ["--set", 'infer.backend="cpu"', "--set", f'model.path="{model}"', "--set", 'model.build="tiny"', "-d", "cpu:0"]
    assert run_cli(d, out, *cpu).returncode == 0
    model.unlink()
    for extra in (["--dry-run"], []):
        r = run_cli(d, out, *cpu, "--set", 'preprocess.mode="fast"', *extra)
        assert r.returncode == 2, (extra, r.stderr)
        assert "different preprocess.mode ('reference' there, 'fast' now)" in r.stderr
        assert not model.exists() and "Building synthetic" not in r.stderr
    r = run_cli(d, out, *cpu)  # unchanged: the same model is rebuilt and the run is resumed as complete
    assert r.returncode == 0, r.stderr
    assert model.exists() and "Embedded 3 of 3" in r.stdout


def test_an_output_that_cannot_be_created_is_refused_by_the_dry_run_too(tmp_path):
    d = tmp_path / "in"
    good_corpus(d, 2)
    (tmp_path / "file.txt").write_text("x")
    out = tmp_path / "file.txt" / "out"
    model = tmp_path / "m" / "new.onnx"
    build = ["--set", 'infer.backend="cpu"', "--set", f'model.path="{model}"', "--set", 'model.build="tiny"', "-d", "cpu:0"]
    dry = run_cli(d, out, *build, "--dry-run")
    real = run_cli(d, out, *build)
    assert dry.returncode == real.returncode == 2, (dry.stdout, dry.stderr, real.stderr)
    line = real.stderr.strip().splitlines()[-1]
    assert line == dry.stderr.strip().splitlines()[-1]
    assert f"output directory {out} is not writable: Not a directory (config key output.dir / --output)" in line
    assert not model.exists()  # refused before the model was built
