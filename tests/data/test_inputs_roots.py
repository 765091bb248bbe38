"""Overlapping input roots are listed once; an empty input says what was searched (issue #14)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from pipeline.config import DEFAULT_EXTENSIONS
from stages.source import iter_inputs

ROOT = Path(__file__).resolve().parents[2]


def tree(base: Path) -> Path:
    """trip/ with 3 files and day1/ (2 files) and day2/ (1 file) below it, plus a non-image."""
    trip = base / "photos" / "trip"
    for rel in ("a.jpg", "b.png", "z.jpg", "day1/c.jpg", "day1/d.jpg", "day2/e.jpg", "notes.txt"):
        p = trip / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    return trip


def walk(*roots, recursive=True):
    warnings: list[str] = []
    paths = [os.fsdecode(p) for p in iter_inputs(tuple(str(r) for r in roots), DEFAULT_EXTENSIONS, recursive,
                                                  True, warnings.append)]
    return paths, warnings


def test_a_root_inside_an_earlier_root_is_listed_once(tmp_path):
    trip = tree(tmp_path)
    alone, _ = walk(trip)
    paths, warnings = walk(trip, trip / "day1")
    assert paths == alone and len(paths) == 6
    assert any(f"input {trip / 'day1'} lies inside input {trip}" in w for w in warnings), warnings


def test_a_root_inside_a_later_root_keeps_its_place_and_is_skipped_there(tmp_path):
    trip = tree(tmp_path)
    paths, warnings = walk(trip / "day1", trip)
    assert len(paths) == len(set(paths)) == 6
    assert [Path(p).name for p in paths[:2]] == ["c.jpg", "d.jpg"]  # ids follow input.paths order
    assert any(f"skipped {trip / 'day1'}: it is also input {trip / 'day1'}" in w for w in warnings), warnings


def test_the_same_directory_twice_or_through_a_symlink_is_listed_once(tmp_path):
    trip = tree(tmp_path)
    (tmp_path / "link").symlink_to(trip, target_is_directory=True)
    for roots in ((trip, trip), (trip, tmp_path / "link"), (tmp_path / "link", trip)):
        paths, warnings = walk(*roots)
        assert len(paths) == len(set(paths)) == 6, roots
        assert any("is the same directory as input" in w for w in warnings), warnings


def test_a_file_root_inside_a_directory_root_is_listed_once(tmp_path):
    trip = tree(tmp_path)
    paths, warnings = walk(trip, trip / "day1" / "c.jpg")
    assert len(paths) == 6 and any("lies inside input" in w for w in warnings)
    # a file with a suffix the walk does not list is its own input
    paths, _ = walk(trip, trip / "notes.txt")
    assert len(paths) == 7


def test_non_recursive_roots_do_not_cover_subdirectories(tmp_path):
    trip = tree(tmp_path)
    paths, warnings = walk(trip, trip / "day1", recursive=False)
    assert len(paths) == len(set(paths)) == 5 and not warnings


def test_empty_input_warns_naming_roots_and_extensions(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.txt").write_text("x")
    paths, warnings = walk(tmp_path / "empty", tmp_path / "docs")
    assert paths == []
    [w] = warnings
    assert f"no input files found under {tmp_path / 'empty'}, {tmp_path / 'docs'}" in w
    assert "jpg, jpeg" in w and "input.extensions" in w


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "run", *args, "--set", 'infer.backend="fake"',
                           "--progress", "log"], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=180, check=False)


def test_run_with_overlapping_inputs_embeds_each_file_once(tmp_path):
    from pipeline.output import load_embeddings

    trip = tree(tmp_path)
    for rel in ("day1/c.jpg", "day1/d.jpg", "day2/e.jpg", "a.jpg", "b.png", "z.jpg"):
        (trip / rel).write_bytes((ROOT / "samples" / "images" / sorted(os.listdir(ROOT / "samples" / "images"))[0])
                                 .read_bytes())
    out = tmp_path / "out"
    p = _cli("-i", str(trip), "-i", str(trip / "day1"), "-i", str(trip), "-o", str(out))
    assert p.returncode == 0, p.stderr
    assert "Embedded 6 of 6 images" in p.stdout
    assert f"lies inside input {trip}" in p.stderr and "is the same directory as input" in p.stderr
    paths, emb = load_embeddings(out)
    assert len(paths) == len(set(paths)) == emb.shape[0] == 6
    d = _cli("-i", str(trip), "-i", str(trip / "day1"), "-o", str(tmp_path / "o2"), "--dry-run")
    assert d.returncode == 0 and "inputs: 6 files" in d.stdout, d.stdout + d.stderr


def test_run_on_an_empty_directory_warns(tmp_path):
    (tmp_path / "empty").mkdir()
    p = _cli("-i", str(tmp_path / "empty"), "-o", str(tmp_path / "out"))
    assert p.returncode == 0, p.stderr
    assert f"warning: no input files found under {tmp_path / 'empty'} (extensions searched: jpg" in p.stderr


def test_more_cpu_devices_than_cores_warns_that_it_oversubscribes(tmp_path):
    from pipeline import config
    from pipeline.run.preflight import device_warnings, usable_cores

    cfg = config.from_dict({"infer": {"backend": "cpu", "devices": ["cpu:0", "cpu:1", "cpu:2"], "threads": 2}})
    [over] = device_warnings(cfg, ["cpu:0", "cpu:1", "cpu:2"], cores=4)
    assert "6 inference threads on 4 usable core(s) oversubscribe the CPU" in over and "infer.threads" in over
    [name] = device_warnings(cfg.replace(infer=config.InferConfig(backend="cpu", devices=("cpu:5",))), ["cpu:5"], cores=2)
    assert "cpu:5" in name and "2 usable core(s)" in name and "not a core" in name
    assert device_warnings(cfg, ["cpu:0"], cores=4) == []
    assert device_warnings(config.from_dict({"infer": {"backend": "fake"}}), ["cpu:0"] * 9, cores=1) == []
    # the real command says it, before any model is built (dry run and run alike)
    n = usable_cores()
    devs = [a for i in range(n + 1) for a in ("-d", f"cpu:{i}")]
    p = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "-i", str(ROOT / "samples" / "images"),
                        "-o", str(tmp_path / "o"), *devs, "--set", f'model.path="{tmp_path / "none.onnx"}"',
                        "--set", 'model.build="tiny"', "--dry-run"],
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                       timeout=120, check=False)
    assert p.returncode == 0, p.stderr
    assert f"{n + 1} inference threads on {n} usable core(s) oversubscribe the CPU" in p.stderr


def test_repeating_an_overlapping_input_is_not_a_different_run(tmp_path):
    """The fingerprint holds the roots actually walked: adding --input trip/day1 to a run of trip
    resumes it (nothing to embed) instead of refusing a 'different input.paths'."""
    from robust_helpers import good_corpus, run_cli

    trip = tmp_path / "trip"
    good_corpus(trip / "day1", 3)
    out = tmp_path / "out"
    assert run_cli(trip, out).returncode == 0
    for roots in ([trip, trip / "day1"], [trip, trip]):
        r = run_cli(roots, out)
        assert r.returncode == 0, r.stderr
        assert "Embedded 3 of 3" in r.stdout and "input(s) added" not in r.stdout
    r = run_cli([trip, tmp_path], out)  # a root that adds files is a different run
    assert r.returncode == 2 and "different input.paths" in r.stderr
