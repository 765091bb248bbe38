"""The walk of the inputs (pipeline/data/listing.py) and the source stage that lists them (run_source):
odd directory entries, deterministic byte order, streaming."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from pipeline.data import listing
from pipeline.data.listing import iter_inputs
from stages import source

EXTS = ("jpg", "jpeg", "png")


def walk(root: Path, **kw) -> tuple[list[bytes], list[str]]:
    warnings: list[str] = []
    paths = list(iter_inputs((str(root),), EXTS, warn=warnings.append, **kw))
    return paths, warnings


def rel(root: Path, paths: list[bytes]) -> list[bytes]:
    prefix = os.fsencode(str(root)) + b"/"
    return [p[len(prefix):] for p in paths]


def touch(p: Path) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"x")


def test_order_is_byte_order_of_full_paths_whatever_the_creation_order(tmp_path):
    names = ["a.jpg", "a-b.jpg", "a/z.jpg", "a/b/c.png", "B.JPG", "b.jpeg", "ab/x.jpg", "a/a.jpg",
             "zz.txt", "Z.png", "a.b/x.jpg", "space name.jpg", "é.jpg", "e.jpg"]
    for seed in (0, 1):
        root = tmp_path / f"t{seed}"
        shuffled = names[:]
        random.Random(seed).shuffle(shuffled)
        for n in shuffled:
            touch(root / n)
        paths, warnings = walk(root)
        assert warnings == []
        got = rel(root, paths)
        # a directory sorts as "name/", so the whole listing is sorted by full path bytes
        expected = sorted(os.fsencode(n) for n in names if not n.endswith(".txt"))
        assert got == expected
    assert rel(tmp_path / "t0", walk(tmp_path / "t0")[0]) == rel(tmp_path / "t1", walk(tmp_path / "t1")[0])


def test_directory_named_like_an_image_is_walked_not_listed(tmp_path):
    touch(tmp_path / "x.jpg" / "inner.jpg")
    touch(tmp_path / "y.png" / "deeper.jpeg" / "img.png")
    touch(tmp_path / "plain.jpg")
    paths, warnings = walk(tmp_path)
    assert rel(tmp_path, paths) == [b"plain.jpg", b"x.jpg/inner.jpg", b"y.png/deeper.jpeg/img.png"]
    assert warnings == []
    assert rel(tmp_path, walk(tmp_path, recursive=False)[0]) == [b"plain.jpg"]


def test_dangling_symlinks_are_listed_and_loops_skipped(tmp_path):
    touch(tmp_path / "a.jpg")
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (tmp_path / "selfloop.jpg").symlink_to(tmp_path / "selfloop.jpg")
    touch(tmp_path / "sub" / "b.jpg")
    (tmp_path / "sub" / "up").symlink_to(tmp_path)  # directory loop
    (tmp_path / "sub" / "again").symlink_to(tmp_path / "sub")  # loop onto its own parent
    paths, warnings = walk(tmp_path)
    assert rel(tmp_path, paths) == [b"a.jpg", b"dangling.jpg", b"selfloop.jpg", b"sub/b.jpg"]
    assert sorted(w.split(" at ")[0] for w in warnings) == ["skipped symlink loop"] * 2
    # without following symlinks, no link is listed nor walked
    paths, warnings = walk(tmp_path, follow_symlinks=False)
    assert rel(tmp_path, paths) == [b"a.jpg", b"sub/b.jpg"]
    assert warnings == []


def test_symlinked_directory_outside_is_followed_once(tmp_path):
    touch(tmp_path / "elsewhere" / "e.jpg")
    root = tmp_path / "root"
    touch(root / "a.jpg")
    (root / "link").symlink_to(tmp_path / "elsewhere")
    assert rel(root, walk(root)[0]) == [b"a.jpg", b"link/e.jpg"]


def test_unreadable_subdirectory_is_listed_to_fail_with_a_warning(tmp_path, monkeypatch):
    """Issue #27: its images must not vanish with only a warning: the directory is listed as one
    input (decode fails it as unreadable), in walk order, and the warning says so."""
    touch(tmp_path / "a.jpg")
    touch(tmp_path / "locked" / "secret.jpg")
    touch(tmp_path / "z.jpg")
    real = os.scandir
    locked = os.fsencode(str(tmp_path / "locked"))

    def scandir(path):
        if path == locked:
            raise PermissionError(13, "Permission denied")
        return real(path)

    monkeypatch.setattr(listing.os, "scandir", scandir)
    paths, warnings = walk(tmp_path)
    assert rel(tmp_path, paths) == [b"a.jpg", b"locked", b"z.jpg"]
    assert warnings == [f"unreadable directory {tmp_path / 'locked'} (Permission denied): listed as one failed "
                        "input; the images in it are not embedded"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads directories whatever their mode")
def test_unreadable_subdirectory_real_permissions(tmp_path):
    touch(tmp_path / "a.jpg")
    touch(tmp_path / "locked" / "secret.jpg")
    (tmp_path / "locked").chmod(0)
    try:
        paths, warnings = walk(tmp_path)
    finally:
        (tmp_path / "locked").chmod(0o700)
    assert rel(tmp_path, paths) == [b"a.jpg", b"locked"]
    assert len(warnings) == 1 and "locked" in warnings[0]


def test_names_that_are_not_utf8_are_listed_as_bytes(tmp_path):
    root = os.fsencode(str(tmp_path))
    for name in (b"caf\xe9.jpg", b"ok.jpg", b"\xff\xfe.png", "写真.jpg".encode()):
        with open(os.path.join(root, name), "wb") as fh:
            fh.write(b"x")
    paths, warnings = walk(tmp_path)
    assert rel(tmp_path, paths) == sorted([b"caf\xe9.jpg", b"ok.jpg", b"\xff\xfe.png", "写真.jpg".encode()])
    assert warnings == []
    # the listing file round-trips them exactly
    from pipeline.data import rundir

    assert [rundir.parse_listing_line(rundir.listing_line(p)) for p in paths] == paths


def test_listing_streams(tmp_path, monkeypatch):
    """The first input comes out after scanning only the directories on the way to it."""
    for i in range(5):
        touch(tmp_path / f"d{i}" / "img.jpg")
    scanned: list[bytes] = []
    real = os.scandir

    def scandir(path):
        scanned.append(path)
        return real(path)

    monkeypatch.setattr(listing.os, "scandir", scandir)
    it = iter_inputs((str(tmp_path),), EXTS)
    first = next(it)
    assert first.endswith(b"d0/img.jpg")
    assert len(scanned) == 2  # the root and d0, not the other four
    assert len(list(it)) == 4 and len(scanned) == 6


def test_explicit_file_and_missing_root(tmp_path):
    touch(tmp_path / "notes.txt")
    warnings: list[str] = []
    got = list(iter_inputs((str(tmp_path / "notes.txt"), str(tmp_path / "missing")), EXTS, warn=warnings.append))
    assert got == [os.fsencode(str(tmp_path / "notes.txt"))]  # named explicitly: listed whatever the suffix
    assert len(warnings) == 1 and "missing" in warnings[0]


def test_huge_directory_is_sorted_in_spilled_runs(tmp_path, monkeypatch):
    names = [f"img_{i:03d}.jpg" for i in range(37)] + ["m/a.jpg", "m.jpg", "z/q.png", "\u00e9.jpg"]
    random.Random(3).shuffle(names)
    for n in names:
        touch(tmp_path / n)
    whole = rel(tmp_path, walk(tmp_path)[0])
    monkeypatch.setattr(listing, "SPILL_ENTRIES", 4)
    spilled = rel(tmp_path, walk(tmp_path)[0])
    assert spilled == whole == sorted(os.fsencode(n) for n in names)


# -- run_source: the worker itself, driven with an in-process loop (no sockets) -------------------

class _Stop(Exception):
    """Raised by the fake loop once the source has said its listing is done (it then idles forever)."""


class _Loop:
    def __init__(self, listing: Path):
        self.listing = listing
        self.sent: list[dict] = []  # to the first stage
        self.control: list[dict] = []

    def send(self, to: str, header: dict, *_frames) -> None:
        if to == "next":  # every id the source sends is already in the listing on disk
            listed = self.listing.read_bytes().count(b"\n") if self.listing.exists() else 0
            ids = header.get("ids") or [header["id"]]
            assert max(ids) < listed, (ids, listed)
            self.sent.append(header)
        else:
            self.control.append(header)
            if header.get("t") == "listed" and header.get("done"):
                raise _Stop

    def check_alive(self) -> None:
        pass

    def report_stats(self) -> None:
        pass


class _Slot:
    sent_upto = 0


def _drive(tmp_path: Path, root: Path, **fields) -> tuple[_Loop, _Slot]:
    from conftest import worker_spec

    listing = tmp_path / "listing.jsonl"
    raw = {"input": {"paths": [str(root)]}, "output": {"dir": str(tmp_path), "shard_size": 4},
           "workers": {"items_per_message": 3}, "infer": {"backend": "fake", "devices": ["cpu:0"]}}
    spec = worker_spec("source", raw, listing_path=str(listing), **fields)
    loop, slot = _Loop(listing), _Slot()
    with pytest.raises(_Stop):
        source.run_source(spec, slot, loop)
    return loop, slot


def _sent_ids(loop: _Loop) -> list[int]:
    return [i for h in loop.sent for i in (h.get("ids") or [h["id"]])]


def test_run_source_lists_every_input_then_sends_it_in_groups(tmp_path):
    root = tmp_path / "in"
    for i in range(10):
        touch(root / f"img_{i:02d}.jpg")
    loop, slot = _drive(tmp_path, root)
    lines = (tmp_path / "listing.jsonl").read_bytes().splitlines()
    assert len(lines) == 10 and lines[0].endswith(b'img_00.jpg"') and lines[9].endswith(b'img_09.jpg"')
    assert _sent_ids(loop) == list(range(10))
    assert [len(h.get("ids") or [h["id"]]) for h in loop.sent] == [3, 3, 3, 1]  # workers.items_per_message
    assert loop.control[-1] == {"t": "listed", "n": 10, "done": True} and slot.sent_upto == 10


def test_run_source_resumes_without_the_complete_shards_and_refuses_changed_inputs(tmp_path):
    root = tmp_path / "in"
    for i in range(10):
        touch(root / f"img_{i:02d}.jpg")
    _drive(tmp_path, root)
    before = (tmp_path / "listing.jsonl").read_bytes()
    # a resume with shard 1 (ids 4..7) complete replays the listing and skips its ids
    loop, _ = _drive(tmp_path, root, listing_complete=True, done_shards=(1,))
    assert _sent_ids(loop) == [0, 1, 2, 3, 8, 9]
    assert (tmp_path / "listing.jsonl").read_bytes() == before
    # an interrupted listing (4 lines) is continued by walking again; an input that changed is refused
    (tmp_path / "listing.jsonl").write_bytes(b"".join(before.splitlines(keepends=True)[:4]))
    loop, _ = _drive(tmp_path, root)
    assert (tmp_path / "listing.jsonl").read_bytes() == before and _sent_ids(loop) == list(range(10))
    (tmp_path / "listing.jsonl").write_bytes(b"".join(before.splitlines(keepends=True)[:4]))
    (root / "img_01.jpg").rename(root / "img_01b.jpg")
    from stages.base import FatalError

    with pytest.raises(FatalError, match="input #1 was"):
        _drive(tmp_path, root)
