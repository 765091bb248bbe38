"""Issue #27 (trust, round 3): what an outside user and an adversary broke, one regression test each.

Items 7 (clip-retrieval readers) and 4 (byte-identical torture runs) are tested beside their
subjects: tests/data/test_inputs.py, tests/data/test_images_bad_inputs.py.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, cli, cli_env, invoke
from robust_helpers import accounting, good_corpus, output_tree, run_cli, start_cli, wait_for, workers

from pipeline import config as cfgmod
from pipeline.config import ConfigError

# -- item 8: smaller faults -------------------------------------------------------------------


@pytest.mark.parametrize("key", ["run.stall_timeout_s", "preprocess.decode_timeout_s", "run.start_timeout_s"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_timeouts_are_refused(key, value):
    """A NaN stall timeout passed `>= min` (every comparison with NaN is false) and switched the
    watchdog off: a hang."""
    with pytest.raises(ConfigError, match=rf"{key}: must be a finite number"):
        cfgmod.load(None, [f"{key}={value}"])


def test_absurd_worker_count_and_image_size_are_refused_before_work(tmp_path):
    good_corpus(tmp_path / "in", 2)
    for key, value in (("workers.decode", 100000), ("model.image_size", 100000)):
        r = subprocess.run(cli("run", "--dry-run", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "o"),
                               "--set", "infer.backend=\"fake\"", "--set", f"{key}={value}"),
                           cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, (key, r.stdout, r.stderr)
        assert f"config key {key}: must be <= 1024" in r.stderr and "Traceback" not in r.stderr


def test_workers_over_the_open_file_limit_are_refused(tmp_path):
    """workers.decode within the cap but over `ulimit -n`: exit 2 naming the key and the limit,
    not an EMFILE traceback once hundreds of processes are up."""
    good_corpus(tmp_path / "in", 2)

    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    r = subprocess.run(cli("run", "--dry-run", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "o"),
                           "--set", "infer.backend=\"fake\"", "--set", "workers.decode=200"),
                       cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=60, preexec_fn=low_limit)
    assert r.returncode == 2, r.stderr
    assert "workers.decode=200" in r.stderr and "ulimit -n" in r.stderr and "256" in r.stderr


def test_empty_output_is_refused_not_replaced_by_the_config_dir(tmp_path):
    good_corpus(tmp_path / "in", 2)
    r = invoke("run", "-i", tmp_path / "in", "--output", "", "--set", 'infer.backend="fake"', "--progress", "none")
    assert r.exit_code == 2, r.output
    assert "output.dir (--output) is empty" in r.output
    assert not (ROOT / "out").exists() or not (ROOT / "out" / "manifest.json").exists()


def test_missing_relative_input_in_a_config_says_what_it_resolved_against(tmp_path, monkeypatch):
    conf = tmp_path / "conf" / "c.toml"
    conf.parent.mkdir()
    conf.write_text('[input]\npaths = ["images"]\n[infer]\nbackend = "fake"\n')
    monkeypatch.chdir(tmp_path)
    r = invoke("run", "--config", conf, "-o", tmp_path / "o", "--dry-run")
    assert r.exit_code == 2
    assert f"resolves against the current directory, {tmp_path}" in r.output


def test_stale_socket_directories_of_dead_runs_are_removed(tmp_path):
    """kill -9 leaves /tmp/clipp-XXXX behind; the next run removes those whose owner is dead (pid
    and start time), never a live one's or one without an owner record."""
    from pipeline.wire import transport

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    made = []
    for owner in (f"{dead.pid} 1", f"{os.getpid()} {transport.process_start(os.getpid())}",
                  f"{os.getpid()} 1", None):  # dead; alive; pid reused by another process; no record
        d = transport.tempfile.mkdtemp(prefix="clipp-", dir="/tmp")
        if owner is not None:
            with open(os.path.join(d, transport.OWNER), "w") as fh:
                fh.write(owner + "\n")
        made.append(d)
    try:
        removed = transport.remove_stale_roots()
        assert made[0] in removed and made[2] in removed
        assert os.path.isdir(made[1]) and os.path.isdir(made[3])
        ep = transport.Endpoints.create()  # every run records its owner
        assert open(os.path.join(ep.root, transport.OWNER)).read().split()[0] == str(os.getpid())
        ep.cleanup()
    finally:
        for d in made:
            transport.shutil.rmtree(d, ignore_errors=True)


def test_killed_run_leaves_no_socket_directory_behind_the_next(tmp_path):
    good_corpus(tmp_path / "in", 40)
    p = start_cli(tmp_path / "in", tmp_path / "out", **{"fake.latency_ms_per_batch": 200})
    wait_for(lambda: workers(tmp_path / "out").get("infer-0(cpu:0)"), 60, "the workers")
    roots = {d for d in os.listdir("/tmp") if d.startswith("clipp-")
             if _owner(f"/tmp/{d}") == p.pid}
    assert roots, "the run's socket directory records its owner"
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    r = run_cli(tmp_path / "in", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert not any(os.path.exists(f"/tmp/{d}") for d in roots)


def _owner(root: str) -> int | None:
    try:
        return int(open(os.path.join(root, "owner")).read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def test_eval_linear_probe_checks_its_extras_before_embedding(tmp_path, monkeypatch):
    import importlib.util

    from pipeline.commands import evaluate

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "threadpoolctl" else real(name, *a))
    monkeypatch.setattr(evaluate, "features", lambda *a, **k: pytest.fail("embedded before checking the extras"))
    r = invoke("eval", "linear-probe", "--train", tmp_path, "--test", tmp_path)
    assert r.exit_code == 2, r.output
    assert "threadpoolctl" in r.output and "clip-pipeline[eval]" in r.output


def test_search_text_without_the_vocab_is_one_line(tmp_path):
    good_corpus(tmp_path / "in", 3)
    assert run_cli(tmp_path / "in", tmp_path / "out").returncode == 0
    r = subprocess.run(cli("search", str(tmp_path / "out"), "--text", "a dog", "--text-backend", "fake"),
                       cwd=ROOT, env=cli_env(CLIP_PIPELINE_VOCAB=str(tmp_path / "missing.gz")),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "fetch-vocab" in r.stderr


@pytest.mark.slow
def test_source_killed_now_and_then_does_not_abort_the_run(tmp_path):
    """source-0 never sent "ready", so its deaths counted "in a row" for the whole run: 4 kills
    spread over a run aborted it. It now gets ready like every worker."""
    good_corpus(tmp_path / "in", 400)
    out = tmp_path / "out"
    p = start_cli(tmp_path / "in", out, **{"fake.latency_ms_per_batch": 300, "queues.decode": 4,
                                           "workers.items_per_message": 1})
    pid = wait_for(lambda: workers(out).get("source-0"), 60, "source-0")
    for _ in range(5):  # one more than run.max_restarts = 3 allows in a row
        os.kill(pid, signal.SIGKILL)

        def respawned(old=pid):
            assert p.poll() is None, p.communicate()[1]
            now = workers(out).get("source-0")
            return now if now not in (None, old) else None

        pid = wait_for(respawned, 30, "a new source-0")
        time.sleep(3)  # the kills came 2.5 s apart: time for the new source to get ready
    stdout, stderr = p.communicate(timeout=180)
    assert p.returncode == 0, stderr
    embedded, failed = accounting(out)
    assert len(embedded) == 400 and not failed



# -- item 6: nothing the user asked for vanishes silently ----------------------------------------


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


# -- item 1: one process per output directory ----------------------------------------------------


def _refused_beside(p, inp, out, **sets) -> None:
    for extra in ((), ("--restart",), ("--update",)):
        t0 = time.monotonic()
        r = run_cli(inp, out, *extra, timeout=60, **sets)
        assert r.returncode == 2, (extra, r.stderr)
        assert f"pid {p.pid} on host" in r.stderr and "is in use" in r.stderr and "Traceback" not in r.stderr
        assert time.monotonic() - t0 < 30  # at once (generous: a loaded CI machine); scripts/check_output_lock.py times it


def test_second_process_on_one_output_is_refused_at_once(tmp_path):
    """Two runs 0.6 s apart on one OUT interleaved their listings and shards; a --restart beside a
    run deleted its files. Now the second process (run, --restart, --update) exits 2 at once naming
    the holder; inspect reads meanwhile and says who holds it; the first finishes intact."""
    good = good_corpus(tmp_path / "in", 200)
    out = tmp_path / "out"
    slow = {"fake.latency_ms_per_batch": 300}
    p = start_cli(tmp_path / "in", out, **slow)
    wait_for(lambda: workers(out).get("source-0"), 60, "the first run's workers")
    _refused_beside(p, tmp_path / "in", out, **slow)
    r = subprocess.run(cli("inspect", str(out)), cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 3 and f"in use:   clip-pipeline run, pid {p.pid} on host" in r.stdout, r.stdout + r.stderr
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr
    embedded, failed = accounting(out)
    assert set(embedded) == {str(x) for x in good} and not failed


@pytest.mark.slow
def test_refused_process_leaves_a_clean_runs_bytes_and_kill_frees_the_lock(tmp_path):
    good_corpus(tmp_path / "in", 200)
    out = tmp_path / "out"
    slow = {"fake.latency_ms_per_batch": 300}
    p = start_cli(tmp_path / "in", out, **slow)
    wait_for(lambda: workers(out).get("source-0"), 60, "the first run's workers")
    _refused_beside(p, tmp_path / "in", out, **slow)
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr
    first = output_tree(out)
    out.rename(tmp_path / "first")
    assert run_cli(tmp_path / "in", out, **slow).returncode == 0
    assert output_tree(out) == first

    # the lock dies with its holder: kill -9, then the same command resumes to the same bytes
    p = start_cli(tmp_path / "in", out, "--restart", **slow)
    wait_for(lambda: workers(out).get("source-0"), 60, "the third run's workers")
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    r = run_cli(tmp_path / "in", out, **slow)
    assert r.returncode == 0, r.stderr
    assert output_tree(out) == first


def test_lock_is_reentrant_in_one_process_and_exclusive_across(tmp_path):
    from pipeline.data import rundir

    with rundir.output_lock(tmp_path / "o"):
        with rundir.output_lock(tmp_path / "o"):
            pass
        code = ("import sys; from pipeline.data import rundir\n"
                "try:\n  with rundir.output_lock(sys.argv[1]): pass\n"
                "except rundir.ConfigError as e: print(e); sys.exit(2)\n")
        r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "o")], env=cli_env(), capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 2 and f"pid {os.getpid()} on host" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "o")], env=cli_env(), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_merge_never_deletes_a_running_attempts_directory(tmp_path):
    """merge's clean-up of attempt directories no commit refers to spared nothing: a duplicate
    attempt still running lost its files. A directory whose run holds the lock is kept."""
    from types import SimpleNamespace

    from pipeline.cluster import commit as cm
    from pipeline.cluster.merge import remove_stale_attempts

    root = tmp_path / cm.ATTEMPTS_DIR / "r00000"
    running, dead = root / "a-running", root / "a-dead"
    for d in (running, dead):
        d.mkdir(parents=True)
        (root / f"{d.name}.attempt.json").write_text("{}")
    code = ("import sys, time; from pipeline.data import rundir\n"
            "with rundir.output_lock(sys.argv[1], 'run-range'):\n  print('held', flush=True); time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(running)], env=cli_env(), stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert remove_stale_attempts(SimpleNamespace(out=tmp_path), {}) == 1
        assert running.is_dir() and (root / "a-running.attempt.json").exists()
        assert not dead.exists() and not (root / "a-dead.attempt.json").exists()
    finally:
        holder.kill()
        holder.wait()


# -- item 2: damaged metadata is named and redone, never a traceback ----------------------------


def _finished(tmp_path, n=20):
    good = good_corpus(tmp_path / "in", n)
    out = tmp_path / "out"
    r = run_cli(tmp_path / "in", out)
    assert r.returncode == 0, r.stderr
    return good, out


def _flips(data: bytes, stride: int = 1):
    for i in range(0, len(data), stride):
        for bit in range(8):
            yield i, bit, data[:i] + bytes([data[i] ^ (1 << bit)]) + data[i + 1:]


def test_every_single_bit_flip_of_a_check_record_is_damage_or_harmless(tmp_path):
    """52 of 200 single-bit flips of a .check.json crashed run and inspect --verify (KeyError:
    'crc32'); 12 (the "files" key, the "rows" value) silently switched the CRC check off. Every
    flip now either still reads as the same record or is named as damage, never an exception."""
    from pipeline.data import rundir

    _good, out = _finished(tmp_path, 10)
    check = out / "embeddings" / "part-00000.check.json"
    data = check.read_bytes()
    orig = json.loads(data)
    named = 0
    for i, bit, flipped in _flips(data, stride=3):
        check.write_bytes(flipped)
        problem = rundir.verify_shard(out, 0)  # must not raise
        try:
            same = json.loads(flipped) == orig
        except ValueError:
            same = False
        if same:
            assert problem is None, (i, bit, flipped)
        else:
            assert problem, (i, bit, flipped)  # the record, or the file it no longer matches
            named += 1
    assert named > len(data) * 8 // 3 // 2
    check.write_bytes(data)


@pytest.mark.parametrize("edit", ["rows", "files_key", "failures_name"])
def test_damaged_check_record_means_the_shard_is_redone(tmp_path, edit):
    _good, out = _finished(tmp_path)
    check = out / "embeddings" / "part-00001.check.json"
    rec = json.loads(check.read_text())
    if edit == "rows":
        rec["rows"] = 3
    elif edit == "files_key":
        rec["filez"] = rec.pop("files")
    else:
        rec["files"][".failures.jsnnl"] = rec["files"].pop(".failures.jsonl")
    check.write_text(json.dumps(rec))
    before = (out / "embeddings" / "part-00001.npy").read_bytes()
    r = subprocess.run(cli("inspect", str(out), "--verify"), cwd=ROOT, env=cli_env(), capture_output=True, text=True)
    assert r.returncode == 1 and "part-00001.check.json is not a valid integrity record" in r.stdout, r.stdout + r.stderr
    r = run_cli(tmp_path / "in", out)
    assert r.returncode == 0, r.stderr
    assert "shard part-00001 is damaged (part-00001.check.json is not a valid integrity record" in r.stderr
    assert (out / "embeddings" / "part-00001.npy").read_bytes() == before
    assert json.loads(check.read_text())["rows"] == 8


@pytest.mark.parametrize("tail", [b'"/no/such/end', b'{"broken": \n', b"\xff\xfe\n"])
def test_damaged_last_listing_line_is_listed_again(tmp_path, tail):
    """A corrupt or truncated last line of listing.jsonl was a JSONDecodeError in
    preflight.compare_inputs (exit 1), which blocked every resume."""
    good = good_corpus(tmp_path / "in", 20)
    out = tmp_path / "out"
    p = start_cli(tmp_path / "in", out, **{"fake.latency_ms_per_batch": 300})
    wait_for(lambda: (out / "embeddings" / "part-00000.npy").exists(), 60, "the first shard")
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    listing = out / "listing.jsonl"
    lines = listing.read_bytes().splitlines(keepends=True)
    listing.write_bytes(b"".join(lines[:-1]) + tail)
    r = run_cli(tmp_path / "in", out)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    embedded, failed = accounting(out)
    assert set(embedded) == {str(x) for x in good} and not failed


def test_damaged_listing_line_in_the_middle_is_named(tmp_path):
    _good, out = _finished(tmp_path)
    listing = out / "listing.jsonl"
    lines = listing.read_bytes().splitlines(keepends=True)
    lines[5] = b"\x00garbage\n"
    listing.write_bytes(b"".join(lines))
    r = run_cli(tmp_path / "in", out)
    assert r.returncode == 2 and f"{listing} line 6 is damaged" in r.stderr and "--restart" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("how", ["random", "deleted", "not_a_manifest"])
def test_damaged_or_deleted_manifest_says_how_to_recover(tmp_path, how):
    good, out = _finished(tmp_path)
    m = out / "manifest.json"
    if how == "random":
        m.write_bytes(os.urandom(300) + b"\xff")
    elif how == "deleted":
        m.unlink()
    else:
        m.write_text("[1, 2]")
    for args in (["inspect", str(out)], ["search", str(out), "--vectors", str(tmp_path / "q.npy")]):
        r = subprocess.run(cli(*args), cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "--restart" in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    r = run_cli(tmp_path / "in", out)
    assert r.returncode == 2 and "manifest.json" in r.stderr and "--restart" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    r = run_cli(tmp_path / "in", out, "--restart")  # the way out it names
    assert r.returncode == 0, r.stderr
    embedded, _failed = accounting(out)
    assert set(embedded) == {str(x) for x in good}


def test_deleted_check_record_is_recreated(tmp_path):
    _good, out = _finished(tmp_path)
    check = out / "embeddings" / "part-00002.check.json"
    want = check.read_bytes()
    check.unlink()
    r = run_cli(tmp_path / "in", out)
    assert r.returncode == 0, r.stderr
    assert "part-00002.check.json was missing; recreated" in r.stderr
    assert check.read_bytes() == want


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


def test_output_deleted_mid_run_is_exit_4_and_nothing_is_recreated(tmp_path):
    good_corpus(tmp_path / "in", 200)
    out = tmp_path / "out"
    p = start_cli(tmp_path / "in", out, **{"fake.latency_ms_per_batch": 300})
    wait_for(lambda: (out / "embeddings" / "part-00000.npy").exists(), 60, "the first shard")
    import shutil

    shutil.rmtree(out)
    _stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 4, stderr
    assert f"the output directory {out} was deleted or moved during the run" in stderr and "Traceback" not in stderr
    assert not out.exists()


# -- item 3: signals during shutdown -------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_storm_keeps_the_closing_message_and_leaves_no_temp_files(tmp_path, signum):
    """Default handlers came back before finish(): SIGINT every 5 ms printed "interrupted before the
    run started; nothing was processed" with shards on disk; SIGTERM printed nothing and left
    .manifest.json.tmp / .report.json.tmp. Handlers now stay until the manifest is written and a
    second signal only hurries the stop."""
    good = good_corpus(tmp_path / "in", 200)
    out = tmp_path / "out"
    p = start_cli(tmp_path / "in", out, **{"fake.latency_ms_per_batch": 200})
    wait_for(lambda: (out / "embeddings" / "part-00001.npy").exists(), 60, "two shards")
    t0 = time.monotonic()
    while p.poll() is None and time.monotonic() - t0 < 60:
        try:
            os.kill(p.pid, signum)
        except ProcessLookupError:
            break
        time.sleep(0.005)
    _stdout, stderr = p.communicate(timeout=60)
    name = "SIGINT" if signum == signal.SIGINT else "SIGTERM"
    assert p.returncode == (130 if signum == signal.SIGINT else 143), stderr
    assert f"Interrupted by {name}: " in stderr and "complete shard(s) on disk" in stderr, stderr
    assert "before this run started" not in stderr and "Traceback" not in stderr
    assert [str(x) for x in out.rglob("*.tmp")] == []
    assert json.loads((out / "manifest.json").read_text())["status"] == "interrupted"
    r = run_cli(tmp_path / "in", out)
    assert r.returncode == 0, r.stderr
    embedded, failed = accounting(out)
    assert set(embedded) == {str(x) for x in good} and not failed


# -- item 9: messages people read ----------------------------------------------------------------


def test_report_verdict_names_model_start_up():
    """The quick start's report said "input-bound (every stage mostly idle)" when 6.5 of 8 s were
    the model starting."""
    from pipeline.query.report import charts, svg_chart, verdict

    rep = {"run_s": 8.0, "startup_s": 6.5, "per_stage": {"decode": {"busy_fraction": 0.05},
                                                         "infer": {"busy_fraction": 0.1}},
           "timeline": [{"t": 1.0, "done": 0}, {"t": 8.0, "done": 16}]}
    assert verdict(rep).startswith("start-up-bound: the model took 6.5 of 8.0 s to start")
    assert "model start-up" in svg_chart(charts(rep)[0])
    rep["startup_s"] = 1.5
    assert verdict(rep) == "input-bound (every stage mostly idle): infer 10% busy on average (model start-up 1.5 s)"


def test_progress_line_says_starting_while_the_model_loads(tmp_path):
    import time as _time

    from pipeline.run.progress import Progress
    from pipeline.run.start import RunStart
    from pipeline.run.supervisor import Supervisor

    cfg = cfgmod.load(None, ['infer.backend="fake"'], input_paths=[str(tmp_path)], output_dir=str(tmp_path / "o"))
    sup = Supervisor(cfg, progress=Progress("none"))
    sup.devices = ["cpu:0"]
    sup.start = RunStart(cfg, sup.rundir, sup.listing_path, devices=sup.devices)  # what prepare() finds
    sup.plan()
    sup.telemetry.start(_time.monotonic())
    assert sup.view.stage_line().startswith("starting: 1 device(s) loading the model"), sup.view.stage_line()
    sup.telemetry.on_device_ready(_time.monotonic())
    assert not sup.view.stage_line().startswith("starting: ")


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


def test_full_disk_before_a_run_is_exit_4(tmp_path, monkeypatch):
    """A full disk found by the start-up write probe was exit 2 ("not writable"); the README lists
    a full disk under 4."""
    import errno
    from pathlib import Path

    from pipeline.data.rundir import RunDir
    from pipeline.errors import RunFailure

    real = Path.write_bytes

    def full(self, data):
        if self.name == ".write-test.tmp":
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(RunFailure, match="the output disk is full"):
        RunDir(tmp_path / "o").prepare({}, restart=False, on_existing="resume", log=print, refusal=lambda old: "")


def test_readme_says_which_python_and_how_to_make_a_venv():
    text = (ROOT / "README.md").read_text()
    quick = text[text.index("## Quick start"):text.index("## Commands")]
    assert "Python 3.11 or newer" in quick and "python3 -m venv" in quick
    assert "is coming" not in text and "--no-build-isolation" in text
