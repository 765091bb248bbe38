"""Attempts and range commits: first writer wins, by a record created only if absent.

Each try at a range writes into its own attempt directory (never a shared name), then creates
OUT/ranges/r-RRRRR.json with os.link(tmp, final), which fails with FileExistsError when another
attempt committed first (atomic on local file systems and NFS; O_EXCL where hard links are not
supported). An atomic rename would not do: the last writer would win, across several files.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import uuid
from pathlib import Path
from typing import Any

from pipeline.cluster.plan import Plan
from pipeline.data import rundir
from pipeline.data.rundir import CHECK_SUFFIX, COMPANION_SUFFIXES, FAILURES_SUFFIX, NPY_SUFFIX, PATHS_SUFFIX, RunDir

RANGES_DIR = "ranges"
ATTEMPTS_DIR = "attempts"
RECORD_FORMAT = "clip-pipeline-range/1"
# publish order: the .npy (completion) last


def range_name(r: int) -> str:
    return f"r-{r:05d}"


def record_path(out: str | os.PathLike, r: int) -> Path:
    return Path(out) / RANGES_DIR / f"{range_name(r)}.json"


def attempts_root(out: str | os.PathLike, r: int) -> Path:
    return Path(out) / ATTEMPTS_DIR / range_name(r)


def new_attempt_id() -> str:
    """Unique per try: host, pid and a random part (two tries never share a directory)."""
    host = "".join(c if c.isalnum() or c in "-_." else "_" for c in socket.gethostname()) or "host"
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def sha256_bytes_of(path: Path) -> str:
    from pipeline.model.models import sha256_file

    return sha256_file(path)


def shard_files(d: Path, k: int, companions: tuple[str, ...] = ()) -> dict[str, Path]:
    """Shard k's files in run directory d, by suffix, in publish order: the .npy (the completion
    mark) last. `companions`: the optional per-shard files the run writes (rundir.COMPANION_SUFFIXES:
    output.metadata's .parquet, output.content_hash's .hashes). The names are RunDir's; .check.json
    is the shard's integrity record."""
    rd = RunDir(d)
    return {PATHS_SUFFIX: rd.shard_paths(k), FAILURES_SUFFIX: rd.shard_failures(k),
            **{s: rd.shard_companion(k, s) for s in companions},
            CHECK_SUFFIX: rd.shard_check(k), NPY_SUFFIX: rd.shard_npy(k)}


def recorded_companions(shard: dict[str, Any]) -> tuple[str, ...]:
    """The companion files a commit record lists for one shard (older records list none)."""
    return tuple(s for s in COMPANION_SUFFIXES if s in shard["bytes"])


def describe_shard(run_dir: Path, k: int) -> dict[str, Any]:
    """Rows, failures, sizes and sha256 of shard k's files in a run directory (companions too)."""
    import numpy as np

    companions = tuple(s for s in COMPANION_SUFFIXES if RunDir(run_dir).shard_companion(k, s).exists())
    files = shard_files(run_dir, k, companions)
    rows = int(np.load(files[NPY_SUFFIX], mmap_mode="r").shape[0])
    failed = files[FAILURES_SUFFIX].read_bytes().count(b"\n")
    return {"rows": rows, "failed": failed,
            "bytes": {s: p.stat().st_size for s, p in files.items()},
            "sha256": {s: sha256_bytes_of(p) for s, p in files.items()}}


def build_record(plan: Plan, r: int, attempt: str, attempt_dir: Path, info: dict[str, Any]) -> dict[str, Any]:
    lo, hi = plan.ids(r)
    shards = {str(k): describe_shard(attempt_dir, k) for k in plan.shards(r)}
    return {
        "format": RECORD_FORMAT,
        "run_id": plan.run_id,
        "range": r,
        "ids": [lo, hi],
        "attempt": attempt,
        "dir": str(attempt_dir.relative_to(plan.out)),
        "shards": shards,
        "rows": sum(s["rows"] for s in shards.values()),
        "failed": sum(s["failed"] for s in shards.values()),
        **info,
    }


def commit(out: str | os.PathLike, r: int, record: dict[str, Any]) -> bool:
    """Create ranges/r-RRRRR.json only if absent. True: this attempt won; False: another did."""
    final = record_path(out, r)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{record['attempt']}.tmp")
    data = (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    try:
        try:
            os.link(tmp, final)
        except FileExistsError:
            return False
        except OSError as exc:  # no hard links here (some FUSE/SMB mounts): O_EXCL create instead
            import errno

            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                raise
            try:
                fd = os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        rundir.fsync_dir(final.parent)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def read_record(out: str | os.PathLike, r: int) -> dict[str, Any] | None:
    """The commit record of range r, None if absent. A record still being written through the
    O_EXCL fallback may read as incomplete JSON: that is reported as {"unreadable": ...}."""
    p = record_path(out, r)
    try:
        return json.loads(p.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        return {"unreadable": str(exc)}


def committed_files(plan: Plan, record: dict[str, Any], k: int) -> dict[str, Path]:
    """Where shard k of a committed range lies: its attempt directory, or (after a merge that
    cleaned the attempts) the published layout."""
    companions = recorded_companions(record["shards"][str(k)])
    files = shard_files(plan.out / record["dir"], k, companions)
    if all(p.exists() for p in files.values()):
        return files
    return shard_files(plan.out, k, companions)


def committed_dir(plan: Plan, record: dict[str, Any], k: int) -> Path:
    """The run directory that holds shard k of a committed range (see committed_files)."""
    return committed_files(plan, record, k)[NPY_SUFFIX].parent.parent


def check_record(plan: Plan, r: int, record: dict[str, Any] | None, deep: bool = False) -> list[str]:
    """Problems with range r's commit record (empty = it verifies). deep: also the sha256 of every
    file (the merge does that); otherwise existence and sizes only (cheap, for run-range)."""
    if record is None:
        return [f"range {r} is not committed"]
    if "unreadable" in record:
        return [f"range {r}: commit record {record_path(plan.out, r)} is unreadable ({record['unreadable']})"]
    if record.get("run_id") != plan.run_id:
        return [f"range {r}: commit record belongs to another plan (run id {record.get('run_id')}, plan {plan.run_id})"]
    if record.get("format") != RECORD_FORMAT or record.get("ids") != list(plan.ids(r)):
        return [f"range {r}: commit record does not match the plan (ids {record.get('ids')}, plan {list(plan.ids(r))})"]
    problems = []
    if sorted(int(k) for k in record.get("shards", {})) != plan.shards(r):
        problems.append(f"range {r}: commit record lists shards {sorted(record.get('shards', {}))}, "
                        f"the plan {plan.shards(r)}")
        return problems
    for k in plan.shards(r):
        want = record["shards"][str(k)]
        for suffix, path in committed_files(plan, record, k).items():
            if not path.exists():
                problems.append(f"range {r}: {path} is missing")
            elif path.stat().st_size != want["bytes"][suffix]:
                problems.append(f"range {r}: {path} has {path.stat().st_size} bytes, the commit says {want['bytes'][suffix]}")
            elif deep and sha256_bytes_of(path) != want["sha256"][suffix]:
                problems.append(f"range {r}: {path} does not match its sha256 in the commit record")
    return problems


def set_aside(out: str | os.PathLike, r: int, why: str) -> Path | None:
    """Move a commit record that does not verify out of the way (atomic rename; a concurrent
    mover just loses the race), so the range can be committed again."""
    src = record_path(out, r)
    dst = src.with_name(f".{src.name}.bad-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(src, dst)
    except FileNotFoundError:
        return None
    try:
        dst.with_suffix(dst.suffix + ".why").write_text(why + "\n")
    except OSError:
        pass
    return dst


def remove_attempt(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
