"""Output directory layout, atomic writes, and the Python API to read a run's output.

    OUT/manifest.json                      config, model identity, counts, shards, status
    OUT/listing.jsonl                      the input listing: line i = JSON string of input id i
    OUT/embeddings/part-NNNNN.npy          [rows, dim] float32/float16, sorted by input id
    OUT/embeddings/part-NNNNN.paths        one input path per row (see encode_path_line)
    OUT/embeddings/part-NNNNN.failures.jsonl  failed inputs of the shard's id range
    OUT/failures.jsonl                     all failures, by id (rebuilt at the end of a run)
    OUT/report.json                        throughput, per-stage stats, failures by reason
    OUT/embeddings.pkl                     optional: {'img_path': [...], 'embedding': ndarray}

Shard k holds input ids [k*shard_size, (k+1)*shard_size). A shard is complete iff its .npy
exists: companions are renamed into place first, the .npy last; temporary files are hidden
(dot-prefixed) and removed on the next start.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

EMB_DIR = "embeddings"


def shard_name(k: int) -> str:
    return f"part-{k:05d}"


def encode_path_line(path: bytes) -> bytes:
    """One line of a .paths file: the raw path bytes, or a JSON string if the name needs escaping."""
    if b"\n" in path or b"\r" in path or path.startswith(b'"'):
        return json.dumps(os.fsdecode(path)).encode("ascii")
    return path


def decode_path_line(line: bytes) -> str:
    if line.startswith(b'"'):
        return json.loads(line.decode("ascii"))
    return os.fsdecode(line)


def listing_line(path: bytes) -> bytes:
    return json.dumps(os.fsdecode(path)).encode("ascii") + b"\n"


def parse_listing_line(line: bytes) -> bytes:
    return os.fsencode(json.loads(line))


def fsync_dir(path: str | os.PathLike) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def write_shard(out_dir: str | os.PathLike, k: int, paths: list[bytes], emb: np.ndarray,
                failures: list[dict]) -> None:
    """Write shard k atomically: .paths and .failures.jsonl first, the .npy (completion) last."""
    d = Path(out_dir) / EMB_DIR
    name = shard_name(k)
    tmps: list[tuple[Path, Path]] = []
    try:
        for suffix, data in (
            (".paths", b"".join(encode_path_line(p) + b"\n" for p in paths)),
            (".failures.jsonl", b"".join(json.dumps(f, sort_keys=True).encode() + b"\n" for f in failures)),
            (".npy", npy_bytes(emb)),
        ):
            final = d / f"{name}{suffix}"
            tmp = d / f".{name}{suffix}.tmp"
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            tmps.append((tmp, final))
        for tmp, final in tmps:
            os.replace(tmp, final)
        fsync_dir(d)
    except BaseException:
        for tmp, _ in tmps:
            tmp.unlink(missing_ok=True)
        (d / f".{name}.npy.tmp").unlink(missing_ok=True)
        raise


def completed_shards(out_dir: str | os.PathLike) -> list[int]:
    d = Path(out_dir) / EMB_DIR
    if not d.is_dir():
        return []
    ks = []
    for p in d.glob("part-*.npy"):
        try:
            k = int(p.stem.split("-")[1])
        except (IndexError, ValueError):
            continue
        if (d / f"{p.stem}.paths").exists() and (d / f"{p.stem}.failures.jsonl").exists():
            ks.append(k)
    return sorted(ks)


def remove_temp_files(out_dir: str | os.PathLike) -> None:
    for d in (Path(out_dir), Path(out_dir) / EMB_DIR):
        if d.is_dir():
            for p in d.glob(".*.tmp"):
                p.unlink(missing_ok=True)


def read_manifest(out_dir: str | os.PathLike) -> dict | None:
    p = Path(out_dir) / "manifest.json"
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        return None


# -- reading a run's output -------------------------------------------------------------------

@dataclass(frozen=True)
class Shard:
    index: int
    embeddings: np.ndarray  # memory-mapped [rows, dim]
    paths: list[str]
    failures: list[dict]


def _shard(out_dir: Path, k: int, mmap: bool = True) -> Shard:
    d = out_dir / EMB_DIR
    name = shard_name(k)
    emb = np.load(d / f"{name}.npy", mmap_mode="r" if mmap else None)
    paths = [decode_path_line(line) for line in (d / f"{name}.paths").read_bytes().splitlines()]
    fails = [json.loads(line) for line in (d / f"{name}.failures.jsonl").read_text().splitlines() if line]
    return Shard(k, emb, paths, fails)


def iter_shards(out_dir: str | os.PathLike) -> Iterator[Shard]:
    """Yield the completed shards of a run, in id order (embeddings memory-mapped)."""
    out = Path(out_dir)
    for k in completed_shards(out):
        yield _shard(out, k)


def load_embeddings(out_dir: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """All paths and embeddings of a run: (paths, array [n, dim]).

    With one shard the array is memory-mapped; with several it is concatenated in memory.
    """
    shards = list(iter_shards(out_dir))
    if not shards:
        return [], np.zeros((0, 0), dtype=np.float32)
    paths = [p for s in shards for p in s.paths]
    if len(shards) == 1:
        return paths, shards[0].embeddings
    return paths, np.concatenate([s.embeddings for s in shards])
