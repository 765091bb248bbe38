"""Inputs people already have: file lists (`input.list`) and webdataset tar shards.

Pure functions plus small readers, shared by the source (listing), decode (reading a member) and
the metadata writer (sidecars). No processes, no sockets.

File lists
    A text file, one path per line, each line UTF-8 in pipeline/wire/pathcodec.py's one-line form
    (plain UTF-8, or the double-quoted escaped form for names that are not UTF-8 or hold line
    breaks); a trailing "\\r" is dropped, blank lines are skipped, relative paths resolve against
    the list file's directory. Or a parquet file (`*.parquet`) with a string column
    (`input.list_column`, default "path"). Entries are taken as they are (no stat: a list of
    millions is listed at read speed); a missing file fails as `vanished` when it is decoded.

Webdataset tar shards
    A `.tar` file in input.paths (or found in a walked directory, or named in a list) is read as a
    webdataset shard (the layout img2dataset writes): members are grouped by *key* (the member name
    up to the first dot of its base name, webdataset's rule), consecutive members with the same
    key form one sample. A sample whose members include an image (`jpg`, `jpeg`, `png`, `webp`,
    case-insensitive; the first one in tar order if several) is one input; its `txt` / `json`
    members are its caption and metadata. Each sample is one input id, in tar order.

    An input that is a tar member is referenced by the path ``TAR + "/" + MEMBER_NAME`` (a path
    through a regular file ending in `.tar`, so it can never name a real file). The reader
    (`TarReader`) scans a tar's headers once (tarfile, headers only: 512 bytes read per member,
    the data is seeked over), keeps the index and an open handle, and reads a member's bytes with
    one seek + one read. Nothing is ever extracted to disk.

    Failures, each a normal failed input with a reason code (pipeline/wire/messages.py REASONS):
      no_image       a sample with no image member (only a caption, or members of other types);
                     its reference is TAR/KEY
      tar_truncated  the tar ends inside this member's data (a download cut short)
      tar_corrupt    a header that is not a tar header: the members after it cannot be found; the
                     failure's reference is TAR/@OFFSET, and every sample before it is embedded
      corrupt / truncated / not_an_image ...: the member's bytes, decoded like any file
"""

from __future__ import annotations

import os
import re
import stat
import tarfile
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from pipeline.errors import ConfigError
from pipeline.wire import pathcodec
from pipeline.wire.messages import ItemError

TAR_SUFFIX = b".tar"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
SIDECAR_EXTS = ("txt", "json")

Warn = Callable[[str], None]


# -- file lists -------------------------------------------------------------------------------

def _line_error(path: str, lineno: int, what: str) -> ConfigError:
    return ConfigError(f"input list {path}, line {lineno}: {what} (config key input.list)")


def iter_list(path: str, column: str = "path") -> Iterator[bytes]:
    """The paths named by a file list, as bytes, in file order. ConfigError naming the file and
    line (or column) for anything that is not a path."""
    if path.lower().endswith(".parquet"):
        yield from _iter_parquet(path, column)
        return
    base = os.fsencode(os.path.dirname(os.path.abspath(path)))
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise ConfigError(f"input list {path} cannot be read: {exc.strerror or exc} (config key input.list)") from None
    with fh:
        for lineno, raw in enumerate(fh, 1):
            line = raw[:-1] if raw.endswith(b"\n") else raw
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line.strip():
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _line_error(path, lineno, f"not valid UTF-8 (byte {exc.start + 1}); write names that are "
                                  "not UTF-8 in the escaped form (README, 'Output format')") from None
            if "\x00" in text:
                raise _line_error(path, lineno, "holds a NUL byte; is this a text file list?")
            try:
                p = pathcodec.decode(text)
            except ValueError as exc:
                raise _line_error(path, lineno, str(exc)) from None
            yield p if p.startswith(b"/") else os.path.normpath(os.path.join(base, p))


def _iter_parquet(path: str, column: str) -> Iterator[bytes]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(f"input list {path} is a parquet file, which needs pyarrow: "
                          "pip install 'clip-pipeline[parquet]' (config key input.list)") from None
    try:
        pf = pq.ParquetFile(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"input list {path} cannot be read as parquet: {exc} (config key input.list)") from None
    names = pf.schema_arrow.names
    if column not in names:
        raise ConfigError(f"input list {path} has no column {column!r} (columns: {', '.join(names)}); "
                          "set input.list_column")
    base = os.fsencode(os.path.dirname(os.path.abspath(path)))
    row = 0
    for batch in pf.iter_batches(columns=[column], batch_size=65536):
        for v in batch.column(0).to_pylist():
            row += 1
            if isinstance(v, str):
                p = os.fsencode(v)
            elif isinstance(v, bytes):
                p = v
            else:
                raise ConfigError(f"input list {path}, row {row}: column {column!r} holds {v!r}, not a path "
                                  "(config key input.list)")
            if not p:
                raise ConfigError(f"input list {path}, row {row}: empty path (config key input.list)")
            yield p if p.startswith(b"/") else os.path.normpath(os.path.join(base, p))


# -- webdataset tar shards --------------------------------------------------------------------

_KEY = re.compile(rb"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's base_plus_ext (first dot of the base name)


def split_key(name: bytes) -> tuple[bytes, bytes]:
    """(key, extension) of a member name, webdataset's rule; no dot -> (name, b"")."""
    m = _KEY.match(name)
    return (m.group(1), m.group(2)) if m else (name, b"")


def is_tar(path: bytes) -> bool:
    return path.lower().endswith(TAR_SUFFIX)


def is_tar_file(path: bytes) -> bool:
    try:
        return is_tar(path) and stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def is_member_ref(path: bytes) -> bool:
    """True when `path` names a sample inside a tar shard (TAR/MEMBER), not a file."""
    return b".tar/" in path.lower() and split_ref(path) is not None


def decode_input(path: bytes, opts, tars: TarReader):
    """One input to pixels (pipeline/data/images.py's contract): a file, or a sample of a tar shard
    (TAR/MEMBER) read through `tars`; ItemError with the reason otherwise. `opts`: DecodeOptions."""
    from pipeline.data.images import decode_bytes, decode_file

    if is_member_ref(path):
        return decode_bytes(tars.read_image(path, opts.max_file_bytes), opts)
    return decode_file(path, opts)


def split_ref(path: bytes) -> tuple[bytes, bytes] | None:
    """(tar path, member name) when `path` is a reference into a tar shard, else None."""
    low = path.lower()
    at = low.find(b".tar/")
    while at >= 0:
        tar = path[:at + 4]
        if is_tar_file(tar):
            return tar, path[at + 5:]
        at = low.find(b".tar/", at + 1)
    return None


@dataclass
class Member:
    name: bytes
    offset: int  # of the data
    size: int


@dataclass
class Sample:
    key: bytes
    members: list[Member] = field(default_factory=list)

    def image(self) -> Member | None:
        for m in self.members:
            if split_key(m.name)[1].lower().decode("latin-1") in IMAGE_EXTS:
                return m
        return None

    def ref_name(self) -> bytes:
        img = self.image()
        return img.name if img is not None else self.key


@dataclass
class TarIndex:
    path: bytes
    size: int
    samples: list[Sample]
    by_name: dict[bytes, tuple[Sample, Member | None]]
    corrupt_at: int | None = None  # offset of a header that is not a tar header
    corrupt_msg: str = ""


def scan_tar(path: bytes) -> TarIndex:
    """Read a tar's headers (not its data) into samples, in tar order. OSError if unreadable."""
    size = os.stat(path).st_size
    samples: list[Sample] = []
    corrupt_at, corrupt_msg = None, ""
    with open(path, "rb") as fh:
        try:
            tf = tarfile.open(fileobj=fh, mode="r:")
        except tarfile.ReadError as exc:
            tf = None
            corrupt_at, corrupt_msg = 0, f"not a tar file ({exc})"
        if tf is not None:
            while True:
                try:
                    info = tf.next()
                except tarfile.ReadError as exc:
                    corrupt_at, corrupt_msg = tf.offset, str(exc)
                    break
                if info is None:
                    break
                if not info.isreg():
                    continue
                name = os.fsencode(info.name)
                key, _ext = split_key(name)
                if not samples or samples[-1].key != key:
                    samples.append(Sample(key))
                samples[-1].members.append(Member(name, info.offset_data, info.size))
            end = tf.offset
            if corrupt_at is None and end < size:
                fh.seek(end)
                block = fh.read(512)
                if block.strip(b"\x00"):
                    corrupt_at = end
                    corrupt_msg = ("tar cut off inside a header" if len(block) < 512
                                   else "invalid tar header (not a tar header: checksum or format)")
    by_name: dict[bytes, tuple[Sample, Member | None]] = {}
    for s in samples:
        by_name.setdefault(s.key, (s, None))
        for m in s.members:
            by_name.setdefault(m.name, (s, m))
    return TarIndex(path, size, samples, by_name, corrupt_at, corrupt_msg)


def iter_tar_refs(path: bytes, warn: Warn = lambda m: None) -> Iterator[bytes]:
    """The inputs of one tar shard, as references, in tar order (one per sample, plus one for a
    corrupt header)."""
    try:
        index = scan_tar(path)
    except OSError as exc:
        warn(f"skipped tar {os.fsdecode(path)}: {exc.strerror or exc}")
        return
    for s in index.samples:
        yield path + b"/" + s.ref_name()
    if index.corrupt_at is not None:
        warn(f"tar {os.fsdecode(path)}: {index.corrupt_msg} at byte {index.corrupt_at}; the members after it "
             "are not read (failed as tar_corrupt)")
        yield path + b"/@" + str(index.corrupt_at).encode()


class TarReader:
    """Reads members of tar shards for decode: one header scan per tar, then one seek + read per
    member. Keeps a few tars open (LRU)."""

    def __init__(self, keep: int = 4):
        self.keep = keep
        self.open: OrderedDict[bytes, tuple[TarIndex, object]] = OrderedDict()

    def _get(self, tar: bytes) -> tuple[TarIndex, object]:
        if tar in self.open:
            self.open.move_to_end(tar)
            return self.open[tar]
        try:
            index = scan_tar(tar)
            fh = open(tar, "rb")  # noqa: SIM115 - kept open, closed on eviction/close()
        except FileNotFoundError:
            raise ItemError("vanished", f"tar {os.fsdecode(tar)} no longer exists") from None
        except OSError as exc:
            raise ItemError("unreadable", f"tar {os.fsdecode(tar)}: {exc.strerror or exc}") from None
        self.open[tar] = (index, fh)
        while len(self.open) > self.keep:
            _t, (_i, old) = self.open.popitem(last=False)
            old.close()
        return index, fh

    def sample(self, path: bytes) -> tuple[TarIndex, Sample, Member | None]:
        ref = split_ref(path)
        if ref is None:
            raise ItemError("vanished", "not a member of a tar shard (the tar is gone)")
        tar, name = ref
        index, _fh = self._get(tar)
        if name.startswith(b"@") and name[1:].isdigit():
            raise ItemError("tar_corrupt", f"{index.corrupt_msg or 'invalid tar header'} at byte {name[1:].decode()}; "
                                           "the members after it cannot be read")
        hit = index.by_name.get(name)
        if hit is None:
            raise ItemError("vanished", f"member {os.fsdecode(name)} is not in tar {os.fsdecode(tar)} (changed since listing?)")
        return index, hit[0], hit[1]

    def read_member(self, index: TarIndex, m: Member, max_bytes: int) -> bytes:
        if m.offset + m.size > index.size:
            raise ItemError("tar_truncated", f"the tar ends inside member {os.fsdecode(m.name)} "
                                             f"({index.size - m.offset} of {m.size} bytes present)")
        if m.size > max_bytes:
            raise ItemError("too_large", f"member is {m.size} bytes, over preprocess.max_file_bytes={max_bytes}")
        _index, fh = self.open[index.path]
        fh.seek(m.offset)
        data = fh.read(m.size)
        if len(data) < m.size:
            raise ItemError("tar_truncated", f"the tar ends inside member {os.fsdecode(m.name)}")
        return data

    def read_image(self, path: bytes, max_bytes: int) -> bytes:
        """The image bytes of the sample `path` refers to; ItemError with the reason otherwise."""
        index, s, m = self.sample(path)
        if m is None:
            m = s.image()
        if m is None or split_key(m.name)[1].lower().decode("latin-1") not in IMAGE_EXTS:
            names = ", ".join(os.fsdecode(x.name) for x in s.members)
            raise ItemError("no_image", f"sample {os.fsdecode(s.key)} has no image member "
                                        f"({', '.join(IMAGE_EXTS)}); members: {names}")
        data = self.read_member(index, m, max_bytes)
        if not data:
            raise ItemError("empty", f"member {os.fsdecode(m.name)} is empty (0 bytes)")
        return data

    def sidecars(self, path: bytes, max_bytes: int = 1 << 20) -> dict[str, bytes]:
        """The txt/json members of the sample (extension -> bytes); {} when none or unreadable."""
        try:
            index, s, _m = self.sample(path)
        except ItemError:
            return {}
        out: dict[str, bytes] = {}
        for m in s.members:
            ext = split_key(m.name)[1].lower().decode("latin-1")
            if ext in SIDECAR_EXTS and ext not in out:
                try:
                    out[ext] = self.read_member(index, m, max_bytes)
                except ItemError:
                    pass
        return out

    def close(self) -> None:
        for _i, fh in self.open.values():
            fh.close()
        self.open.clear()


# -- content hashes (output.content_hash, run --update) -----------------------------------------

def hasher():
    """A fast content hash: xxhash's xxh3_128 when installed, else blake2b (128-bit)."""
    try:
        import xxhash

        return "xxh3_128", xxhash.xxh3_128
    except ImportError:
        import hashlib

        return "blake2b128", lambda data=b"": hashlib.blake2b(data, digest_size=16)


def content_hash(data: bytes) -> str:
    name, fn = hasher()
    return f"{name}:{fn(data).hexdigest()}"


def hash_input(path: bytes, reader: TarReader | None = None) -> str | None:
    """The content hash of an input (a file, or a tar member's bytes); None if unreadable.
    Pass a long-lived `reader` when hashing many members of the same tars."""
    try:
        if b".tar/" in path.lower() and split_ref(path) is not None:
            own = reader is None
            reader = reader or TarReader(keep=1)
            try:
                return content_hash(reader.read_image(path, 1 << 31))
            finally:
                if own:
                    reader.close()
        with open(path, "rb") as fh:
            return content_hash(fh.read())
    except Exception:  # noqa: BLE001 - an unreadable input is simply not matched
        return None
