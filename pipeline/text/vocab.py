"""CLIP's BPE vocabulary file: where it is found, how it is checked, how it is fetched.

The tokenizer needs one data file, ``bpe_simple_vocab_16e6.txt.gz`` (MIT, (c) 2021 OpenAI).
It is not kept in this repository: it is taken from a registry package at set-up. The
``open_clip_torch`` wheel carries it as ``open_clip/bpe_simple_vocab_16e6.txt.gz``; the wheel
is fetched with ``pip download --no-deps`` (so torch is never installed), the one member is
extracted and checked against the sha256 below, and written to the package's data directory.

``pip install -e .`` (and a wheel build) does this through ``setup.py``'s build hook;
``clip-pipeline fetch-vocab`` does it by hand (``--wheel FILE`` for an offline machine).

This module is stdlib-only: ``setup.py`` loads it by file path during the build.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

VOCAB_NAME = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
VOCAB_BYTES = 1_356_917
#: the registry package whose wheel carries the file, and the member's path inside the wheel
SOURCE_PACKAGE = "open_clip_torch"
SOURCE_VERSION = "3.3.0"
SOURCE_MEMBER = "open_clip/" + VOCAB_NAME
ENV_VAR = "CLIP_PIPELINE_VOCAB"

PACKAGE_DATA = Path(__file__).resolve().parent / "data" / VOCAB_NAME


def user_cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "clip-pipeline" / VOCAB_NAME


class VocabError(RuntimeError):
    """The vocab file is missing or not the expected one; the message says what to do."""


FIX = (f"run `clip-pipeline fetch-vocab` (pip download --no-deps {SOURCE_PACKAGE}=={SOURCE_VERSION}, "
       f"offline: --wheel FILE) or set {ENV_VAR}=PATH")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_bytes(data: bytes, origin: str) -> bytes:
    digest = sha256_bytes(data)
    if digest != VOCAB_SHA256:
        raise VocabError(f"{origin} is not CLIP's {VOCAB_NAME} (sha256 {digest[:12]}..., expected "
                         f"{VOCAB_SHA256[:12]}..., {len(data):,} bytes, expected {VOCAB_BYTES:,}); {FIX}")
    return data


def _open_clip_copy() -> Path | None:
    """An installed open_clip's copy, found without importing open_clip (which imports torch)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / VOCAB_NAME
        if p.is_file():
            return p
    return None


def candidates() -> list[Path]:
    """Where the file is looked for, in order (the environment variable alone when it is set)."""
    env = os.environ.get(ENV_VAR)
    if env:
        return [Path(env)]
    found = [PACKAGE_DATA, user_cache_path()]
    oc = _open_clip_copy()
    if oc is not None:
        found.append(oc)
    return found


def locate() -> Path:
    """The first existing candidate, or VocabError with a one-line fix."""
    cands = candidates()
    for p in cands:
        if p.is_file():
            return p
    if os.environ.get(ENV_VAR):
        raise VocabError(f"{ENV_VAR}={cands[0]} does not exist; {FIX}")
    raise VocabError(f"CLIP tokenizer vocab {VOCAB_NAME} not found (looked in {', '.join(map(str, cands))}); {FIX}")


def load_checked(path: str | os.PathLike | None = None) -> tuple[bytes, Path]:
    """The gzip bytes of the vocab (sha256-checked) and where they came from."""
    p = Path(path) if path is not None else locate()
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise VocabError(f"cannot read the CLIP vocab {p}: {exc.strerror}; {FIX}") from None
    return check_bytes(data, str(p)), p


def extract_from_wheel(wheel: str | os.PathLike) -> bytes:
    """The vocab member of an open_clip_torch wheel, sha256-checked."""
    try:
        with zipfile.ZipFile(wheel) as z:
            data = z.read(SOURCE_MEMBER)
    except KeyError:
        raise VocabError(f"{wheel} has no member {SOURCE_MEMBER}; use an {SOURCE_PACKAGE} wheel") from None
    except (OSError, zipfile.BadZipFile) as exc:
        raise VocabError(f"{wheel} is not a readable wheel: {exc}") from None
    return check_bytes(data, f"{SOURCE_MEMBER} in {wheel}")


def download_wheel(dest_dir: str | os.PathLike, python: str | None = None) -> Path:
    """``pip download --no-deps`` the source wheel into dest_dir (pip's own index settings apply)."""
    cmd = [python or sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(dest_dir), f"{SOURCE_PACKAGE}=={SOURCE_VERSION}"]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wheels = sorted(Path(dest_dir).glob(f"{SOURCE_PACKAGE}-{SOURCE_VERSION}-*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stdout.strip().splitlines() or ["no output"])[-1]
        raise VocabError(f"pip download {SOURCE_PACKAGE}=={SOURCE_VERSION} failed ({last}); "
                         f"offline, copy that wheel here and run `clip-pipeline fetch-vocab --wheel FILE`")
    return wheels[0]


def write_atomic(path: Path, data: bytes) -> None:
    # A second copy of pipeline/data/rundir.py's atomic_write, on purpose: setup.py loads this module
    # by file path at `pip install` time (to fetch the vocab) before the package is importable, so
    # it may import nothing but the standard library.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def fetch(dest: str | os.PathLike | None = None, wheel: str | os.PathLike | None = None,
          python: str | None = None) -> Path:
    """Put a checked copy of the vocab at ``dest`` (default: the package data directory) and return it.

    An existing file with the right sha256 is kept as it is (no download).
    """
    dest = Path(dest) if dest is not None else PACKAGE_DATA
    if dest.is_file():
        try:
            check_bytes(dest.read_bytes(), str(dest))
            return dest
        except VocabError:
            pass  # replaced below
    if wheel is not None:
        data = extract_from_wheel(wheel)
    else:
        with tempfile.TemporaryDirectory(prefix="clip-vocab-") as tmp:
            data = extract_from_wheel(download_wheel(tmp, python))
    write_atomic(dest, data)
    return dest


def read_gz_text(data: bytes) -> str:
    import gzip

    with gzip.GzipFile(fileobj=io.BytesIO(data)) as g:
        return g.read().decode("utf-8")
