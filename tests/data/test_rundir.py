"""The run directory (pipeline/data/rundir.py): path lines, and damaged or missing metadata (check records,
the listing, the manifest) named and redone, never a traceback; a full disk at the start is exit 4."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest
from conftest import ROOT, cli, cli_env
from robust_helpers import accounting, good_corpus, run_cli, start_cli, wait_for

from pipeline.data.rundir import decode_path_line, encode_path_line
from pipeline.wire import pathcodec


@pytest.mark.parametrize("path", [b"/a/b.jpg", b"/a/with space.jpg", b"/a/\xff\xfe.jpg", b"/a/new\nline.jpg",
                                  b'/a/"quoted".jpg', "/a/ünï.jpg".encode()])
def test_path_lines_round_trip(path):
    line = encode_path_line(path)
    assert b"\n" not in line
    line.decode("utf-8")  # strict: always valid UTF-8
    assert pathcodec.decode(decode_path_line(line)) == path


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
