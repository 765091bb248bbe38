"""File names as one line of UTF-8 text, losslessly: the form every path takes in a run's output.

A POSIX file name is any bytes but NUL. Most are UTF-8 text with no control character and are
written as they are (*plain form*). The others are written in the *quoted form*, a double-quoted
string of UTF-8 text with backslash escapes, in the manner of git's quoted paths:

    plain   when the bytes are valid UTF-8, hold no control character (C0, DEL, C1: every
            character str.splitlines() splits on but U+2028/U+2029 is one), no U+2028 or U+2029,
            and do not start with a double quote;
    quoted  otherwise: '"' + escaped + '"', where escaped is the name with  \\ for a backslash,
            \\" for a double quote, \\n \\r \\t for LF CR TAB, and \\xHH for every other byte that
            is not valid UTF-8 or belongs to a control character, U+2028 or U+2029 (HH: two
            lower-case hex digits of the byte; multi-byte characters give one \\xHH per byte).

So every encoded name is valid UTF-8 on one line, and decode(encode(b)) == b for any bytes b.
A reader in another language: a line that does not start with '"' is the name's UTF-8 text;
one that does is unquoted by the four escapes above. Python code reads them with `decode`
(bytes, for os.open and friends) or `to_fs` (a str for open(), os.fsdecode of those bytes).

This module is pure (no I/O) and stable: `.paths` lines, `listing.jsonl` values (as JSON
strings), failures' `path`, the pickle's `img_path` and file lists given to the CLI all use it.
"""

from __future__ import annotations

import os
import re

QUOTE = '"'

# Characters never left bare: control characters (Unicode category Cc: U+0000-U+001F, U+007F,
# U+0080-U+009F) and the line/paragraph separators. This covers every character str.splitlines()
# splits on (\n \r \x0b \x0c \x1c \x1d \x1e \x85 \u2028 \u2029).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_SHORT = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_ESCAPE = re.compile(r'\\(x[0-9a-fA-F]{2}|["\\nrt])')
_UNESCAPE = {'"': b'"', "\\": b"\\", "n": b"\n", "r": b"\r", "t": b"\t"}


def is_plain(path: bytes) -> bool:
    """True when `path` is written as it is (valid UTF-8, no control character, no U+2028/9, no leading '"')."""
    try:
        text = path.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return not text.startswith(QUOTE) and _UNSAFE.search(text) is None


def encode(path: bytes | str) -> str:
    """The one-line UTF-8 text form of a file name (bytes, or a str as os.fsdecode gives it)."""
    if isinstance(path, str):
        path = os.fsencode(path)
    try:
        text = path.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and not text.startswith(QUOTE) and _UNSAFE.search(text) is None:
        return text
    # surrogateescape maps each byte that is not valid UTF-8 to one lone surrogate U+DC80..U+DCFF
    out = [QUOTE]
    for ch in path.decode("utf-8", "surrogateescape"):
        if ch in _SHORT:
            out.append(_SHORT[ch])
        elif "\udc80" <= ch <= "\udcff":
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        elif _UNSAFE.match(ch):
            out.extend(f"\\x{b:02x}" for b in ch.encode("utf-8"))
        else:
            out.append(ch)
    out.append(QUOTE)
    return "".join(out)


def decode(text: str) -> bytes:
    """The file name's bytes from its text form (plain or quoted); ValueError on a malformed quote."""
    if not text.startswith(QUOTE):
        return text.encode("utf-8", "surrogateescape")
    if len(text) < 2 or not text.endswith(QUOTE):
        raise ValueError(f"quoted path {text!r} does not end with a double quote")
    body = text[1:-1]
    out = bytearray()
    pos = 0
    for m in _ESCAPE.finditer(body):
        chunk = body[pos:m.start()]
        if "\\" in chunk or QUOTE in chunk:
            raise ValueError(f"quoted path {text!r} has a bare backslash or double quote")
        out += chunk.encode("utf-8", "surrogateescape")
        esc = m.group(1)
        out += bytes([int(esc[1:], 16)]) if esc[0] == "x" else _UNESCAPE[esc]
        pos = m.end()
    rest = body[pos:]
    if "\\" in rest or QUOTE in rest:
        raise ValueError(f"quoted path {text!r} has a bare backslash or double quote")
    out += rest.encode("utf-8", "surrogateescape")
    return bytes(out)


def to_fs(text: str) -> str:
    """The str to pass to open() for a name in text form (os.fsdecode of its bytes)."""
    return os.fsdecode(decode(text))
