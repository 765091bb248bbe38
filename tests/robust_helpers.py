"""Shared helpers of the robustness tests: generated bad/unusual inputs and fake-backend runs.

Every file is made here from imagegen's photos (nothing is committed). Runs use the fake backend, so they
need no model and finish in seconds.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
from conftest import cli_env
from imagegen import encode, photo, photo_image
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


# -- images -----------------------------------------------------------------------------------

def jpeg_with_size(w: int, h: int) -> bytes:
    """A small valid JPEG whose SOF header is rewritten to claim w x h pixels."""
    data = bytearray(encode(photo(16, 16)))
    i = 2
    while i < len(data):
        marker = data[i + 1]
        length = struct.unpack(">H", data[i + 2:i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            data[i + 5:i + 9] = struct.pack(">HH", h, w)
            return bytes(data)
        i += 2 + length
    raise AssertionError("no SOF marker")


def png_bomb(side: int = 30000) -> bytes:
    """A ~100 KB 1-bit PNG that decodes to side*side pixels (900 MP by default)."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    row = b"\x00" * (1 + (side + 7) // 8)
    comp = zlib.compressobj(9)
    parts = [comp.compress(row * 1000) for _ in range(side // 1000)]
    parts.append(comp.compress(row * (side % 1000)))
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts))
            + chunk(b"IEND", b""))


def exif_rotated_jpeg(w: int = 64, h: int = 32, orientation: int = 6) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(photo(w, h, 7), exif=exif.tobytes())


def png_zero_size() -> bytes:
    """A PNG whose header says 0 x 0 pixels (PIL: "cannot identify image file <_io.BytesIO object
    at 0x...>", a message that differed between runs until issue #27)."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 0, 0, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def bad_files() -> dict[str, tuple[bytes, str]]:
    """name -> (content, expected reason). Each must fail with exactly that reason."""
    good = encode(photo(64, 64, 3))
    sof = good.find(b"\xff\xda")  # start of scan: everything before it is "only the header"
    return {
        "empty.jpg": (b"", "empty"),
        "random.jpg": (np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes(), "not_an_image"),
        "text.jpg": (b"this is not a picture, just some text\n" * 20, "not_an_image"),
        "cut_short.jpg": (good[: len(good) * 2 // 3], "truncated"),
        "header_only.jpg": (good[:sof], "truncated"),
        "huge_header.jpg": (jpeg_with_size(60000, 60000), "too_large"),
        "bomb.png": (png_bomb(), "too_large"),
        "zero_by_zero.png": (png_zero_size(), "corrupt"),
    }


def unusual_files() -> dict[str, bytes]:
    """name -> content of valid but unusual images. Each must embed."""
    pal = Image.fromarray(photo(40, 30, 11)).quantize(16)
    pal_t = pal.copy()
    pal_t.info["transparency"] = 0
    g16 = np.asarray(photo_image(40, 30, 15, "L")).astype(np.uint16) * 257
    return {
        "gray.jpg": encode(photo_image(40, 30, 13, "L")),
        "cmyk.jpg": encode(photo_image(40, 30, 12, "CMYK")),
        "progressive.jpg": encode(photo(40, 30, 16), progressive=True),
        "subsampling444.jpg": encode(photo(40, 30, 17), subsampling=0),
        "UPPER.JPG": encode(photo(40, 30, 18)),
        "dotjpeg.jpeg": encode(photo(40, 30, 19)),
        "alpha.png": encode(photo_image(40, 30, 14, "RGBA"), "PNG"),
        "palette.png": encode(pal, "PNG"),
        "palette_transparent.png": encode(pal_t, "PNG", transparency=0),
        "sixteen_bit.png": encode(g16, "PNG"),
        "png_named.jpg": encode(photo(40, 30, 20), "PNG"),
        "one_pixel.jpg": encode(photo(1, 1, 21)),
        "one_pixel.png": encode(photo(1, 1, 22), "PNG"),
        "panorama_wide.jpg": encode(photo(4000, 8, 23)),
        "panorama_tall.png": encode(photo(6, 3000, 24), "PNG"),
        "name with spaces.jpg": encode(photo(40, 30, 25)),
        "naïve café 写真.jpg": encode(photo(40, 30, 26)),
        "exif_rotated.jpg": exif_rotated_jpeg(),
    }


def torture_set(d: Path) -> tuple[set[str], dict[str, str]]:
    """Every bad and unusual input of the robustness issues, with good ones, in d: (paths that
    embed, path -> reason of those that fail)."""
    import os

    from pipeline.wire import pathcodec

    good = {str(p) for p in good_corpus(d, 6)}
    bad = bad_files()
    write(d, {name: data for name, (data, _) in bad.items()})
    unusual = unusual_files()
    write(d, unusual)
    good |= {str(d / n) for n in unusual}
    expected_bad = {str(d / n): reason for n, (_, reason) in bad.items()}
    # listing oddities: a directory named like an image, links, a name that is not UTF-8
    write(d / "folder.jpg", {"inside.jpg": encode(photo(48, 40, 41))})
    good.add(str(d / "folder.jpg" / "inside.jpg"))
    (d / "dangling.jpg").symlink_to(d / "deleted.jpg")
    expected_bad[str(d / "dangling.jpg")] = "vanished"
    (d / "selfloop.jpg").symlink_to(d / "selfloop.jpg")
    expected_bad[str(d / "selfloop.jpg")] = "unreadable"
    (d / "sub").mkdir()
    (d / "sub" / "loop").symlink_to(d)
    raw = os.path.join(os.fsencode(str(d)), b"latin1-caf\xe9.jpg")
    with open(raw, "wb") as fh:
        fh.write(encode(photo(48, 40, 42)))
    good.add(pathcodec.encode(raw))  # the output holds paths in their UTF-8 text form (pipeline/wire/pathcodec.py)
    return good, expected_bad


def write(d: Path, files: dict[str, bytes]) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (d / name).write_bytes(data)


def good_corpus(d: Path, n: int, size: int = 32) -> list[Path]:
    """n small distinct JPEGs in d (img_0000.jpg ...)."""
    d.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = d / f"img_{i:04d}.jpg"
        p.write_bytes(encode(photo(size, size, 1000 + i)))
        out.append(p)
    return out


# -- runs -------------------------------------------------------------------------------------

def fake_sets(**extra: object) -> list[str]:
    sets = {"infer.backend": "fake", "output.shard_size": 8, "model.batch_size": 4,
            "infer.batch_timeout_ms": 5, "fake.dim": 16, "run.log_interval_s": 0.2}
    sets.update(extra)
    args = []
    for k, v in sets.items():
        args += ["--set", f"{k}={json.dumps(v) if not isinstance(v, bool) else str(v).lower()}"]
    return args


def cli_args(inp: Path | list[Path], out: Path, *extra: str, **sets: object) -> list[str]:
    inputs = inp if isinstance(inp, list) else [inp]
    args = [sys.executable, "-m", "pipeline.cli", "run", "-o", str(out), "--progress", "log"]
    for i in inputs:
        args += ["-i", str(i)]
    return args + fake_sets(**sets) + list(extra)


env = cli_env  # the environment of a CLI run from this checkout (conftest)


def run_cli(inp, out, *extra: str, timeout: float = 120, env_extra: dict | None = None, **sets: object):
    return subprocess.run(cli_args(inp, out, *extra, **sets), cwd=ROOT, env=env(**(env_extra or {})),
                          capture_output=True, text=True, timeout=timeout, check=False)


def start_cli(inp, out, *extra: str, env_extra: dict | None = None, **sets: object) -> subprocess.Popen:
    """Start the CLI in its own process group (so a test can signal the group, like a terminal)."""
    return subprocess.Popen(cli_args(inp, out, *extra, **sets), cwd=ROOT, env=env(**(env_extra or {})),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for(cond, timeout: float, what: str, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def workers(out: Path) -> dict[str, int]:
    """The live worker pids the supervisor publishes in OUT/.workers.json (name -> pid)."""
    try:
        return json.loads((out / ".workers.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def shards_done(out: Path) -> int:
    d = out / "embeddings"
    return len(list(d.glob("part-*.npy"))) if d.is_dir() else 0


# -- accounting -------------------------------------------------------------------------------

def accounting(out: Path) -> tuple[dict[str, int], dict[str, str]]:
    """(embedded path -> count, failed path -> reason) from the shards and failures.jsonl.

    Asserts that no path appears twice anywhere and that failures.jsonl equals the shards' failures.
    """
    from pipeline.output import iter_shards

    embedded: dict[str, int] = {}
    failed: dict[str, str] = {}
    shard_fails = []
    ids_seen = []
    for s in iter_shards(out):
        assert s.embeddings.shape[0] == len(s.paths)
        for p in s.paths:
            assert p not in embedded, f"duplicate row for {p!r}"
            embedded[p] = 1
        for f in s.failures:
            assert f["path"] not in failed and f["path"] not in embedded, f"duplicate failure {f}"
            assert f["reason"] and isinstance(f["message"], str)
            failed[f["path"]] = f["reason"]
            ids_seen.append(f["id"])
            shard_fails.append(f)
    lines = [json.loads(x) for x in (out / "failures.jsonl").read_text().splitlines() if x]
    assert lines == shard_fails
    assert len(set(ids_seen)) == len(ids_seen)
    return embedded, failed


def output_tree(out: Path) -> dict[str, bytes]:
    """Every file of an output, for byte comparisons: but report.json (timings) and the manifest's
    created/updated; the lock file must be empty (released)."""
    tree = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    tree.pop("report.json", None)
    assert tree.pop(".lock") == b""  # empty once its holder is done
    m = json.loads(tree.pop("manifest.json"))
    m.pop("created"), m.pop("updated")
    tree["manifest.json"] = json.dumps(m, sort_keys=True).encode()
    return tree


def listing(out: Path) -> list[str]:
    return [json.loads(x) for x in (out / "listing.jsonl").read_text().splitlines()]


def assert_exact(out: Path, good: set[str], bad: dict[str, str]) -> None:
    """Every listed input is accounted for exactly once: `good` embedded, `bad` failed with reasons."""
    embedded, failed = accounting(out)
    assert set(embedded) == good, (sorted(set(embedded) ^ good))[:10]
    assert failed == bad
    lst = listing(out)
    assert len(lst) == len(set(lst)) == len(good) + len(bad)
    assert set(lst) == good | set(bad)
