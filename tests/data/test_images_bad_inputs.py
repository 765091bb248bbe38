"""Bad inputs fail with a reason, unusual valid inputs embed: decoder units and one mixed run."""

from __future__ import annotations

import json
import os

import pytest
from imagegen import encode, photo
from robust_helpers import (
    assert_exact,
    bad_files,
    exif_rotated_jpeg,
    good_corpus,
    run_cli,
    torture_set,
    unusual_files,
)

from pipeline.data import images
from pipeline.data.images import DecodeOptions, crop, decode_bytes, decode_file
from pipeline.wire import pathcodec
from pipeline.wire.messages import ItemError

MODES = ("reference", "fast")
BAD = bad_files()
UNUSUAL = unusual_files()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_file_fails_with_its_reason(tmp_path, name, mode, monkeypatch):
    data, reason = BAD[name]
    p = tmp_path / name
    p.write_bytes(data)
    if reason == "too_large":  # refused from the header, before allocating 900 MP / 3.6 GP: no decoder runs
        import simplejpeg
        from PIL import Image

        def decoder_ran(*_a, **_k):
            raise AssertionError(f"{name}: pixels decoded before the size was refused")

        monkeypatch.setattr(Image.Image, "load", decoder_ran)
        monkeypatch.setattr(simplejpeg, "decode_jpeg", decoder_ran)
    with pytest.raises(ItemError) as err:
        decode_file(os.fsencode(str(p)), DecodeOptions(mode=mode))
    assert err.value.reason == reason
    assert err.value.message
    if reason == "too_large":
        assert "preprocess.max_pixels" in err.value.message


def test_truncated_jpeg_decision_is_the_same_in_both_modes():
    good = encode(photo(64, 64, 3))
    for cut in (len(good) // 3, len(good) // 2, len(good) - 10):
        reasons = set()
        for mode in MODES:
            with pytest.raises(ItemError) as err:
                decode_bytes(good[:cut], DecodeOptions(mode=mode))
            reasons.add(err.value.reason)
        assert reasons == {"truncated"}, cut


def test_pixel_limit_is_configurable():
    data = encode(photo(40, 30))
    assert decode_bytes(data, DecodeOptions(max_pixels=1200)).shape == (30, 40, 3)
    for mode in MODES:
        with pytest.raises(ItemError) as err:
            decode_bytes(data, DecodeOptions(mode=mode, max_pixels=1199))
        assert err.value.reason == "too_large"


def test_file_size_limit(tmp_path):
    p = tmp_path / "a.jpg"
    p.write_bytes(encode(photo(40, 30)))
    with pytest.raises(ItemError) as err:
        decode_file(os.fsencode(str(p)), DecodeOptions(max_file_bytes=100))
    assert err.value.reason == "too_large" and "preprocess.max_file_bytes" in err.value.message


def test_file_that_grows_after_its_size_was_read(tmp_path, monkeypatch):
    """read_bytes reads size + 1 bytes (not max_file_bytes + 1): a file appended to between the
    fstat and the read is still read whole, or refused once it passes the limit."""
    import pipeline.data.images as P

    p = tmp_path / "a.jpg"
    data = encode(photo(40, 30))
    p.write_bytes(data)
    real = os.fstat

    def stale(fd):  # the size the file had "before" the writer appended its second half
        st = real(fd)
        return os.stat_result((st.st_mode, st.st_ino, st.st_dev, st.st_nlink, st.st_uid, st.st_gid,
                               len(data) // 2, st.st_atime, st.st_mtime, st.st_ctime))

    monkeypatch.setattr(P.os, "fstat", stale)
    assert P.read_bytes(os.fsencode(str(p)), 10 * len(data)) == data
    with pytest.raises(ItemError) as err:
        P.read_bytes(os.fsencode(str(p)), len(data) - 1)
    assert err.value.reason == "too_large" and "grew" in err.value.message


def test_file_deleted_after_listing_is_vanished(tmp_path):
    from pipeline.data.listing import iter_inputs

    (tmp_path / "a.jpg").write_bytes(encode(photo(48, 40)))
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    listed = list(iter_inputs((str(tmp_path),), ("jpg",)))
    (tmp_path / "a.jpg").unlink()
    for p in listed:
        with pytest.raises(ItemError) as err:
            decode_file(p, DecodeOptions())
        assert err.value.reason == "vanished"


def test_unreadable_files(tmp_path, monkeypatch):
    (tmp_path / "loop.jpg").symlink_to(tmp_path / "loop.jpg")
    (tmp_path / "dir.jpg").mkdir()
    for name in ("loop.jpg", "dir.jpg"):
        with pytest.raises(ItemError) as err:
            decode_file(os.fsencode(str(tmp_path / name)), DecodeOptions())
        assert err.value.reason == "unreadable"
    locked = tmp_path / "locked.jpg"
    locked.write_bytes(encode(photo(48, 40)))

    def denied(path, mode="r"):  # what open() raises for a chmod 000 file (root ignores modes)
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(images, "open", denied, raising=False)
    with pytest.raises(ItemError) as err:
        decode_file(os.fsencode(str(locked)), DecodeOptions())
    assert err.value.reason == "unreadable" and "Permission denied" in err.value.message


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_real_permissions(tmp_path):
    p = tmp_path / "locked.jpg"
    p.write_bytes(encode(photo(48, 40)))
    p.chmod(0)
    with pytest.raises(ItemError) as err:
        decode_file(os.fsencode(str(p)), DecodeOptions())
    assert err.value.reason == "unreadable"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(UNUSUAL))
def test_unusual_file_decodes_and_crops(name, mode):
    arr = decode_bytes(UNUSUAL[name], DecodeOptions(mode=mode))
    assert arr.ndim == 3 and arr.shape[2] in (1, 3, 4) and arr.dtype.name == "uint8"
    out = crop(arr, mode)
    assert out.shape == (224, 224, 3) and out.dtype.name == "uint8"


def test_png_named_jpg_is_sniffed():
    assert images.sniff(UNUSUAL["png_named.jpg"]) == "png"
    assert images.sniff(UNUSUAL["cmyk.jpg"]) == "jpeg"


@pytest.mark.parametrize("mode", MODES)
def test_exif_orientation_is_an_option(mode):
    data = exif_rotated_jpeg(64, 32, orientation=6)  # stored 64 wide, displayed rotated 90 degrees
    assert decode_bytes(data, DecodeOptions(mode=mode)).shape[:2] == (32, 64)  # CLIP's reference: ignored
    assert decode_bytes(data, DecodeOptions(mode=mode, exif_transpose=True)).shape[:2] == (64, 32)


def test_mixed_corpus_exact_accounting(tmp_path):
    """Every bad and unusual input from the issue, with good ones, in one run of the real CLI."""
    d = tmp_path / "in"
    good, expected_bad = torture_set(d)
    raw = os.path.join(os.fsencode(str(d)), b"latin1-caf\xe9.jpg")

    out = tmp_path / "out"
    r = run_cli(d, out)
    n_bad = len(expected_bad)
    assert r.returncode == 3, r.stderr
    assert f"Embedded {len(good)} of {len(good) + n_bad} images" in r.stdout
    assert f"Completed with {n_bad} failures" in r.stdout
    assert "skipped symlink loop" in r.stderr
    assert_exact(out, good, expected_bad)
    for line in (out / "failures.jsonl").read_text().splitlines():
        rec = json.loads(line)
        assert set(rec) == {"id", "path", "reason", "message", "stage"} and rec["message"]
    report = json.loads((out / "report.json").read_text())
    assert sum(report["failures_by_reason"].values()) == n_bad
    # the non-UTF-8 path reads back as the same bytes
    from pipeline.output import iter_shards

    paths = [p for s in iter_shards(out) for p in s.paths]
    assert raw in {pathcodec.decode(p) for p in paths}


def test_all_good_run_exits_zero(tmp_path):
    d = tmp_path / "in"
    good = {str(p) for p in good_corpus(d, 5)}
    out = tmp_path / "out"
    r = run_cli(d, out)
    assert r.returncode == 0, r.stderr
    assert "failures" not in r.stdout
    assert_exact(out, good, {})
    assert (out / "failures.jsonl").read_bytes() == b""


def _tree_bytes(out) -> dict[str, bytes]:
    return {str(p.relative_to(out)): (p.read_bytes() if not p.is_symlink() else os.readlink(p).encode())
            for p in sorted(out.rglob("*")) if p.is_file() or p.is_symlink()}


def test_torture_set_twice_is_byte_identical(tmp_path):
    """Issue #27 item 4: two clean runs of the same inputs write the same bytes, every file but
    report.json (timings), .lock (the last holder) and the manifest's timestamps (a 0x0 PNG's message held a memory address,
    so failures.jsonl, the shard's .failures.jsonl and its .check.json differed)."""
    d = tmp_path / "in"
    good, expected_bad = torture_set(d)
    out = tmp_path / "out"
    trees = []
    for n in range(2):
        r = run_cli(d, out, **{"output.metadata": True, "output.content_hash": True, "output.pickle": True})
        assert r.returncode == 3, r.stderr
        assert_exact(out, good, expected_bad)
        tree = _tree_bytes(out)
        tree.pop("report.json")
        assert tree[".lock"] == b""  # empty once its holder is done
        manifest = json.loads(tree.pop("manifest.json"))
        assert manifest.pop("created") and manifest.pop("updated")
        trees.append((tree, manifest))
        out.rename(tmp_path / f"run{n}")
    (a, ma), (b, mb) = trees
    assert sorted(a) == sorted(b)
    assert [k for k in a if a[k] != b[k]] == []
    assert ma == mb
    assert any(k.endswith(".parquet") for k in a) and any(k.endswith(".check.json") for k in a)
