"""The path codec: every file name as one line of valid UTF-8, losslessly (pipeline/wire/pathcodec.py)."""

from __future__ import annotations

import json
import os

import pytest

from pipeline.wire import pathcodec

# Names a file system can hold (no NUL, no "/") that break naive line/UTF-8/JSON readers.
HOSTILE: list[bytes] = [
    b"latin1\xff\xfename.jpg",                   # not UTF-8
    b"form\x0cfeed.jpg",                          # str.splitlines splits on form feed
    "line\u2028separator.jpg".encode(),          # ... on U+2028
    "next\u0085line.jpg".encode(),               # ... on U+0085 (NEL)
    "para\u2029separator.jpg".encode(),          # ... on U+2029
    b"new\nline.jpg",
    b"carriage\rreturn.jpg",
    b"crlf\r\n.jpg",
    b"back\\slash.jpg",
    b"\xed\xa0\x80lone-high-surrogate.jpg",      # UTF-8 bytes of a lone surrogate (invalid UTF-8)
    b"\xed\xb3\xbflone-low-surrogate.jpg",
    b'"starts-with-quote.jpg',
    b'ends-with-quote".jpg',
    b"tab\there.jpg",
    b"vt\x0bvertical-tab.jpg",
    b"\x1c\x1d\x1e-separators.jpg",
    b"\x1b[31mansi-escape.jpg",
    b"del\x7f.jpg",
    b"\\x41-literal-escape-text.jpg",            # looks like an escape, is not one
    b"\\x41\n-literal-escape-and-newline.jpg",
    b"\x80\x81\x82-continuation-bytes.jpg",
    b"overlong\xc0\xaf.jpg",
    b"truncated-\xe2\x82.jpg",
    b'"',
    b"\\",
    b'"\\n"',
    b"\xff",
    "emoji-\U0001f600.jpg".encode(),
    "combining-e\u0301.jpg".encode(),
    "\ufeffbom.jpg".encode(),
    "nbsp\u00a0.jpg".encode(),
    "日本語の写真.jpg".encode(),
    b"  spaces around  .jpg",
    b"dir/with\nnewline/and\xffbyte.jpg",        # a full path
]


def test_there_are_at_least_twenty_hostile_names():
    assert len(set(HOSTILE)) >= 20


@pytest.mark.parametrize("raw", HOSTILE, ids=[repr(h)[2:40] for h in HOSTILE])
def test_round_trip_is_lossless_and_one_utf8_line(raw):
    text = pathcodec.encode(raw)
    assert pathcodec.decode(text) == raw
    assert pathcodec.encode(os.fsdecode(raw)) == text  # the str a Python program gets from os.listdir
    assert pathcodec.to_fs(text) == os.fsdecode(raw)
    data = text.encode("utf-8")  # strict: no lone surrogates anywhere
    assert data.decode("utf-8") == text
    assert text.splitlines() == [text] and "\n" not in text
    # a strict JSON reader (no lone-surrogate escapes) gets the same text back
    assert not any(0xD800 <= ord(c) <= 0xDFFF for c in text)
    assert json.loads(json.dumps(text)) == text


def test_plain_names_are_written_as_they_are():
    for raw in (b"photo.jpg", "日本語の写真.jpg".encode(), b"back\\slash.jpg", b'ends".jpg', b"a b.png",
                "emoji-\U0001f600.jpg".encode()):
        assert pathcodec.is_plain(raw)
        assert pathcodec.encode(raw) == raw.decode("utf-8")


def test_quoted_form_is_documented_escapes_only():
    assert pathcodec.encode(b"latin1\xff\xfename.jpg") == '"latin1\\xff\\xfename.jpg"'
    assert pathcodec.encode(b"new\nline.jpg") == '"new\\nline.jpg"'
    assert pathcodec.encode("line\u2028sep.jpg".encode()) == '"line\\xe2\\x80\\xa8sep.jpg"'
    assert pathcodec.encode("next\u0085.jpg".encode()) == '"next\\xc2\\x85.jpg"'
    assert pathcodec.encode(b'"q\\.jpg') == '"\\"q\\\\.jpg"'
    assert pathcodec.encode(b"form\x0c.jpg") == '"form\\x0c.jpg"'


def test_a_file_of_encoded_names_reads_back_with_any_utf8_line_reader(tmp_path):
    p = tmp_path / "names.paths"
    p.write_bytes(b"".join(pathcodec.encode(raw).encode("utf-8") + b"\n" for raw in HOSTILE))
    with open(p, encoding="utf-8") as fh:  # strict UTF-8, universal newlines
        lines = fh.read().splitlines()
    assert len(lines) == len(HOSTILE)
    assert [pathcodec.decode(line) for line in lines] == HOSTILE


def test_real_files_with_hostile_names_round_trip(tmp_path):
    """The codec's bytes open the very file the directory listing named."""
    d = os.fsencode(tmp_path)
    names = [h for h in HOSTILE if b"/" not in h]
    for i, raw in enumerate(names):
        with open(os.path.join(d, raw), "wb") as fh:
            fh.write(str(i).encode())
    listed = sorted(os.listdir(d))
    assert listed == sorted(names)
    for raw in listed:
        with open(pathcodec.to_fs(pathcodec.encode(os.path.join(d, raw))), "rb") as fh:
            assert fh.read() == str(names.index(raw)).encode()


@pytest.mark.parametrize("bad", ['"abc', '"', '"a\\qb"', '"a"b"', '"trailing\\"', '"a\\x4"'])
def test_malformed_quoted_forms_are_refused(bad):
    with pytest.raises(ValueError, match="quoted path"):
        pathcodec.decode(bad)
