"""Interrupts and resume: SIGINT/SIGTERM mid-run, resume byte-identical, changed settings refused,
full disk and unwritable output directory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
from robust_helpers import (
    assert_exact,
    good_corpus,
    run_cli,
    shards_done,
    start_cli,
    wait_for,
)

N_GOOD = 60
SLOW = {"fake.latency_ms_per_batch": 120, "queues.infer": 2, "queues.decode": 4}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    base = tmp_path_factory.mktemp("resume")
    d = base / "in"
    good = {str(p) for p in good_corpus(d, N_GOOD)}
    (d / "zz_empty.jpg").write_bytes(b"")
    bad = {str(d / "zz_empty.jpg"): "empty"}
    ref = base / "ref"
    r = run_cli(d, ref)
    assert r.returncode == 3, r.stderr
    assert_exact(ref, good, bad)
    return d, good, bad, ref


def compared_files(out: Path) -> dict[str, bytes]:
    """Every output file except the timestamped manifest.json and report.json."""
    files = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    files.pop("manifest.json")
    files.pop("report.json")
    return files


def hidden_files(out: Path) -> list[str]:
    """Hidden files a run left, but the output's lock file (OUT/.lock, empty once released)."""
    return [p.name for p in out.rglob(".*") if p != out / ".lock"]


def assert_valid_shards(out: Path) -> None:
    from pipeline.output import iter_shards

    for s in iter_shards(out):
        assert s.embeddings.shape[0] == len(s.paths)
        assert np.isfinite(np.asarray(s.embeddings)).all()


@pytest.mark.parametrize("sig,code,name,group", [
    (signal.SIGINT, 130, "SIGINT", True),  # Ctrl-C in a terminal: the whole process group
    (signal.SIGTERM, 143, "SIGTERM", True),  # e.g. systemd stopping the service
    pytest.param(signal.SIGTERM, 143, "SIGTERM", False, marks=pytest.mark.slow),  # kill PID
])
def test_interrupt_then_resume_is_byte_identical(corpus, tmp_path, sig, code, name, group):
    d, good, bad, ref = corpus
    out = tmp_path / "out"
    proc = start_cli(d, out, **SLOW)
    try:
        wait_for(lambda: shards_done(out) >= 1, 60, "the first shard")
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == code, stderr
    assert f"Interrupted by {name}" in stderr and "Run the same command again to resume" in stderr
    assert " died " not in stderr  # workers stopped by the signal are not deaths to recover from
    assert hidden_files(out) == []  # no half-written file left visible (or invisible)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "interrupted"
    kept = shards_done(out)
    assert 1 <= kept < shards_done(ref), "the interrupt came too late to test resuming"
    assert_valid_shards(out)
    kept_bytes = {p.name: p.read_bytes() for p in (out / "embeddings").iterdir()}

    r = run_cli(d, out, **SLOW)
    assert r.returncode == 3, r.stderr
    assert f"Resuming the run in {out}: {kept} shards already complete" in r.stderr
    for name_, data in kept_bytes.items():  # completed shards were kept, not redone
        assert (out / "embeddings" / name_).read_bytes() == data
    assert compared_files(out) == compared_files(ref)
    assert_exact(out, good, bad)
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"


@pytest.mark.slow
def test_rerun_of_a_complete_run_changes_nothing(corpus, tmp_path):
    d, _, _, ref = corpus
    out = tmp_path / "out"
    assert run_cli(d, out).returncode == 3
    before = compared_files(out)
    r = run_cli(d, out)
    assert r.returncode == 3, r.stderr
    assert compared_files(out) == before == compared_files(ref)


@pytest.mark.parametrize("change,key", [
    ({"preprocess.mode": "fast"}, "preprocess.mode ('reference' there, 'fast' now)"),
    ({"fake.dim": 32}, "model.path (a model with sha256"),
    ({"preprocess.exif_transpose": True}, "preprocess.exif_transpose (False there, True now)"),
    ({"output.dtype": "float16"}, "output.dtype ('float32' there, 'float16' now)"),
])
def test_changed_model_or_preprocessing_is_refused(corpus, change, key):
    d, _, _, ref = corpus
    before = compared_files(ref)
    r = run_cli(d, ref, **change)
    assert r.returncode == 2, r.stderr
    assert f"holds a run made with a different {key}" in r.stderr and "--restart" in r.stderr
    assert compared_files(ref) == before


def test_restart_starts_over(corpus, tmp_path):
    import shutil

    d, good, bad, ref = corpus
    out = tmp_path / "out"
    shutil.copytree(ref, out)
    r = run_cli(d, out, "--restart", **{"preprocess.mode": "fast"})
    assert r.returncode == 3, r.stderr
    assert "Deleting the previous run" in r.stderr
    assert json.loads((out / "manifest.json").read_text())["fingerprint"]["preprocess_mode"] == "fast"
    assert_exact(out, good, bad)


def test_file_deleted_before_resume_fails_as_vanished(corpus, tmp_path):
    """The listing is saved: a resume replays it, so a file deleted meanwhile is a failed input."""
    inp = tmp_path / "in"
    files = good_corpus(inp, 30)
    out = tmp_path / "out"
    proc = start_cli(inp, out, **SLOW)
    try:
        wait_for(lambda: shards_done(out) >= 1, 60, "the first shard")
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert shards_done(out) < 4
    files[-1].unlink()
    r = run_cli(inp, out)
    assert r.returncode == 3, r.stderr
    assert_exact(out, {str(p) for p in files[:-1]}, {str(files[-1]): "vanished"})


def _mount_tmpfs(path: Path, opts: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, check=False)
    return r.returncode == 0


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def _check_disk_full_then_resume(d, good, bad, ref, out, r, free_space) -> None:
    assert r.returncode == 4, r.stderr
    assert "the output disk is full" in r.stderr
    assert "run the same command again to resume" in r.stderr
    assert [n for n in hidden_files(out) if n != ".workers.json"] == []
    assert_valid_shards(out)
    assert shards_done(out) < shards_done(ref)
    free_space()
    r = run_cli(d, out)
    assert r.returncode == 3, r.stderr
    assert compared_files(out) == compared_files(ref)
    assert_exact(out, good, bad)


def test_full_disk_on_a_tiny_tmpfs(corpus, tmp_path):
    d, good, bad, ref = corpus
    mnt = tmp_path / "mnt"
    if not _mount_tmpfs(mnt, "size=48k"):
        pytest.skip("cannot mount a tmpfs here (not root?); test_full_disk_hook covers the path")
    try:
        out = mnt / "out"
        r = run_cli(d, out)

        def grow():
            subprocess.run(["mount", "-o", "remount,size=8m", str(mnt)], check=True)

        _check_disk_full_then_resume(d, good, bad, ref, out, r, grow)
    finally:
        _umount(mnt)


def test_full_disk_hook(corpus, tmp_path):
    d, good, bad, ref = corpus
    out = tmp_path / "out"
    r = run_cli(d, out, env_extra={"CLIP_PIPELINE_TEST_ENOSPC_SHARD": "3"})
    # the hook raised OSError(ENOSPC) while the sink wrote shard 3 ("the output disk is full" is
    # only said for ENOSPC: _check_disk_full_then_resume asserts it)
    assert "cannot write shard part-00003" in r.stderr, r.stderr
    assert not (out / "embeddings" / "part-00003.npy").exists()
    _check_disk_full_then_resume(d, good, bad, ref, out, r, lambda: None)


def test_unwritable_output_directory(corpus, tmp_path):
    d, _, _, _ = corpus
    if os.geteuid() != 0:
        out = tmp_path / "ro"
        out.mkdir()
        out.chmod(0o500)
    else:  # root ignores permission bits: use a read-only file system instead
        out = tmp_path / "ro"
        if not _mount_tmpfs(out, "ro,size=1m"):
            pytest.skip("root cannot mount a read-only tmpfs here")
    try:
        r = run_cli(d, out)
        assert r.returncode == 2, r.stderr
        assert f"output directory {out} is not writable" in r.stderr
    finally:
        if os.geteuid() == 0:
            _umount(out)
        else:
            out.chmod(0o700)
