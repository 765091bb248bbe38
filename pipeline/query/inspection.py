"""`clip-pipeline inspect OUT`: what a run directory holds, and (--verify) whether it is intact.

Exit status: 0 the run is complete (and, with --verify, every check passed); 3 the run is not
complete (interrupted, aborted or still running: run the same command again to resume it);
1 --verify found a problem (each is listed); 2 OUT is not a clip-pipeline run directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.rundir import (
    DamagedRun,
    RunDir,
    damaged_shards,
    decode_path_line,
    expected_shards,
    listed_inputs,
    lock_holder,
    looks_like_run,
    manifest_missing,
    parse_listing_line,
    shard_name,
)
from pipeline.wire import pathcodec

NORM_TOLERANCE = {"float32": 1e-3, "float16": 5e-3}


class NotARun(Exception):
    """The directory is not a clip-pipeline run (the message says what is there instead)."""


def read_run(out: str | os.PathLike) -> dict[str, Any]:
    """The manifest of the run in `out`, or NotARun naming what is wrong."""
    out = Path(out)
    if not out.exists():
        raise NotARun(f"{out} does not exist: give the output directory of a run (its output.dir / --output)")
    if not out.is_dir():
        raise NotARun(f"{out} is not a directory: give the output directory of a run (its output.dir / --output)")
    try:
        manifest = RunDir(out).read_manifest()
    except DamagedRun as exc:
        raise NotARun(str(exc)) from None
    if manifest is None and looks_like_run(out):
        raise NotARun(str(manifest_missing(out)))
    if manifest is None or not str(manifest.get("format", "")).startswith("clip-pipeline/"):
        raise NotARun(f"{out} holds no clip-pipeline run (no {RunDir(out).manifest.name}): give the output directory "
                      "of a run (its output.dir / --output)")
    return manifest


def summarize(out: str | os.PathLike) -> dict[str, Any]:
    """Counts, shards, failures by reason, model identity and completeness of a run."""
    out = Path(out)
    rd = RunDir(out)
    m = read_run(out)
    shard_size = int(m.get("shard_size") or m.get("config", {}).get("output", {}).get("shard_size", 1))
    total = m.get("counts", {}).get("total")
    done = rd.completed_shards()
    updates = rd.published_updates()  # run --update: their inputs and shards count too
    expected_list = expected_shards({**m, "shard_size": shard_size, "updates": updates})
    if expected_list is not None and updates:
        total = int(m["inputs"]["listed"]) + sum(int(u.get("added", 0)) for u in updates)
    expected = len(expected_list) if expected_list is not None else None
    rows = 0
    dim = None
    for k in done:
        try:
            arr = np.load(rd.shard_npy(k), mmap_mode="r")
            rows += arr.shape[0]
            if arr.ndim == 2 and arr.shape[0]:
                dim = int(arr.shape[1])
        except (OSError, ValueError):
            pass  # --verify reports it
    reasons = rd.failures_by_reason(done)
    failed = sum(reasons.values())
    missing = sorted(set(expected_list) - set(done)) if expected_list is not None else None
    complete = m.get("status") == "complete" and missing == []
    model = m.get("model") or {}
    report = rd.report
    return {
        "dir": str(out),
        "status": m.get("status"),
        "complete": complete,
        "in_use": lock_holder(out),  # a run (or update, merge) holding the output's lock now
        "created": m.get("created"),
        "updated": m.get("updated"),
        "counts": {"listed": m.get("inputs", {}).get("listed"), "total": total,
                   "embedded": rows, "failed": failed, "resolved": rows + failed},
        "shards": {"size": shard_size, "complete": len(done), "expected": expected,
                   "missing": missing[:100] if missing is not None else None},
        "dim": dim,
        "dtype": m.get("config", {}).get("output", {}).get("dtype"),
        "normalized": m.get("config", {}).get("output", {}).get("normalize"),
        "failures_by_reason": dict(sorted(reasons.items())),
        "model": {k: model.get(k) for k in ("path", "arch", "sha256", "bytes") if k in model},
        "synthetic_weights": bool(m.get("synthetic_weights")),
        "backend": m.get("config", {}).get("infer", {}).get("backend"),
        "precision": (model.get("engine") or {}).get("precision"),
        "devices": m.get("devices"),
        "error": m.get("error"),
        "report": str(report) if report.exists() else None,
    }


def verify(out: str | os.PathLike) -> list[str]:
    """Re-read every shard; return the problems found (empty list = intact).

    Checks per shard: sizes and CRC-32s match the integrity record written with it (.check.json);
    the .npy loads and is [rows, dim] of the configured dtype; every value is
    finite; rows are unit-norm when output.normalize; the .paths file has one line per row and
    its paths, with the shard's failures, are exactly the listing's inputs of the shard's id range,
    in order. Across the run: one width, no missing shard, failures.jsonl agrees with the shards.
    """
    out = Path(out)
    m = read_run(out)
    cfg_out = m.get("config", {}).get("output", {})
    shard_size = int(m.get("shard_size") or cfg_out.get("shard_size", 1))
    problems: list[str] = []
    rd = RunDir(out)
    listing, base_total = _listing(rd, problems)
    dims: set[int] = set()
    all_fail_ids: list[int] = []
    for k, problem in damaged_shards(rd.path).items():  # sizes and CRC-32s recorded at write time
        problems.append(f"shard {shard_name(k)}: {problem}")
    for k in rd.completed_shards():
        dim, fail_ids = _check_shard(rd, k, shard_size, cfg_out.get("dtype", "float32"),
                                     bool(cfg_out.get("normalize", True)), listing, problems)
        if dim is not None:
            dims.add(dim)
        all_fail_ids += fail_ids
    if len(dims) > 1:
        problems.append(f"shards have different embedding widths: {sorted(dims)}")
    summary = summarize(out)
    if summary["complete"]:
        _check_run(rd, m, summary, listing is not None, base_total, all_fail_ids, problems)
    return problems


def _listing(rd: RunDir, problems: list[str]) -> tuple[list[str | None] | None, int]:
    """Every listed input's text form by id (the run's listing, then each update's after its id
    gap: None in the gap) and the length of the run's own listing."""
    listing_path = rd.listing
    if not listing_path.exists():
        problems.append(f"{listing_path.name} is missing (the input listing, needed to check paths and to resume)")
        return None, 0
    try:
        listing: list[str | None] = [pathcodec.encode(parse_listing_line(line))  # the text form, as in .paths
                                     for line in listing_path.read_bytes().splitlines() if line]
        base_total = len(listing)
        for i, p in listed_inputs(rd.path):  # inputs added by run --update, after an id gap
            if i >= base_total:
                listing.extend([None] * (i - len(listing)))
                listing.append(pathcodec.encode(p))
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError, as is a bad quoted path
        problems.append(f"{listing_path.name} is not readable JSON lines ({exc})")
        return None, 0
    return listing, base_total


def _check_shard(rd: RunDir, k: int, shard_size: int, dtype: str, normalize: bool,
                 listing: list[str | None] | None, problems: list[str]) -> tuple[int | None, list[int]]:
    """One complete shard's problems (appended); returns its width (None: no rows or unreadable)
    and its failed ids."""
    npy, paths_file, fails_file = rd.shard_npy(k), rd.shard_paths(k), rd.shard_failures(k)
    where = f"shard {shard_name(k)}"
    try:
        emb = np.load(npy, mmap_mode="r")
    except (OSError, ValueError) as exc:
        problems.append(f"{where}: {npy.name} cannot be read ({exc})")
        return None, []
    if emb.ndim != 2:
        problems.append(f"{where}: expected a 2-d array [rows, dim], got shape {emb.shape}")
        return None, []
    if emb.dtype != np.dtype(dtype):
        problems.append(f"{where}: dtype {emb.dtype}, the run's output.dtype is {dtype}")
    _check_values(emb, where, dtype, normalize, problems)
    dim = int(emb.shape[1]) if emb.shape[0] else None
    try:
        paths = [decode_path_line(line) for line in paths_file.read_bytes().splitlines()]
    except (OSError, ValueError) as exc:
        problems.append(f"{where}: {paths_file.name} cannot be read ({exc})")
        return dim, []
    if len(paths) != emb.shape[0]:
        problems.append(f"{where}: {len(paths)} paths in {paths_file.name} for {emb.shape[0]} embedding rows")
    fail_ids = []
    for n, line in enumerate(fails_file.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            fail_ids.append(int(rec["id"]))
            if not rec.get("reason"):
                problems.append(f"{where}: failure record on line {n} has no reason")
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            problems.append(f"{where}: {fails_file.name} line {n} is not a failure record")
    lo, hi = k * shard_size, (k + 1) * shard_size
    bad_ids = [i for i in fail_ids if not lo <= i < hi]
    if bad_ids:
        problems.append(f"{where}: failed ids {bad_ids[:5]} are outside its id range [{lo}, {hi})")
    if len(set(fail_ids)) != len(fail_ids):
        problems.append(f"{where}: a failed id is recorded twice")
    if listing is not None:
        fails = set(fail_ids)
        want = [listing[i] for i in range(lo, min(hi, len(listing))) if i not in fails and listing[i] is not None]
        if want != paths:
            first = next((j for j, (a, b) in enumerate(zip(want, paths)) if a != b), min(len(want), len(paths)))
            problems.append(f"{where}: paths do not match the input listing from row {first} "
                            f"({len(paths)} rows + {len(fails)} failures for {len(want) + len(fails)} listed inputs)")
    return dim, fail_ids


def _check_values(emb: np.ndarray, where: str, dtype: str, normalize: bool, problems: list[str]) -> None:
    """Every value finite; rows unit-norm when the run normalises (read in blocks)."""
    finite = np.ones(emb.shape[0], dtype=bool)
    norms = np.ones(emb.shape[0])
    for lo in range(0, emb.shape[0], 65536):
        block = np.asarray(emb[lo:lo + 65536], dtype=np.float64)
        finite[lo:lo + len(block)] = np.isfinite(block).all(axis=1)
        norms[lo:lo + len(block)] = np.linalg.norm(np.nan_to_num(block), axis=1)
    if not finite.all():
        problems.append(f"{where}: {int((~finite).sum())} row(s) with NaN/inf, first row {int(np.flatnonzero(~finite)[0])}")
    if normalize and emb.shape[0]:
        off = np.abs(norms - 1.0) > NORM_TOLERANCE.get(dtype, 1e-3)
        if off.any():
            i = int(np.flatnonzero(off)[0])
            problems.append(f"{where}: {int(off.sum())} row(s) not unit-norm (output.normalize = true), "
                            f"e.g. row {i} has norm {norms[i]:.4f}")


def _check_run(rd: RunDir, m: dict, summary: dict, have_listing: bool, base_total: int, all_fail_ids: list[int],
               problems: list[str]) -> None:
    """A complete run's own files: failures.jsonl agrees with the shards, the listing with the
    manifest, and the shards hold every listed input (the run's and its updates')."""
    fpath = rd.failures
    if not fpath.exists():
        problems.append(f"{fpath.name} is missing (a complete run always writes it, empty if nothing failed)")
    else:
        try:
            ids = [int(json.loads(line)["id"]) for line in fpath.read_text(errors="replace").splitlines() if line.strip()]
            if sorted(ids) != sorted(all_fail_ids):
                problems.append(f"{fpath.name} lists {len(ids)} failures, the shards {len(all_fail_ids)}")
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            problems.append(f"{fpath.name} has a line that is not a failure record")
    listed = (m.get("inputs") or {}).get("listed")  # the run's own listing (the counts include updates)
    if have_listing and listed is not None and base_total != listed:
        problems.append(f"{rd.listing.name} has {base_total} inputs, {rd.manifest.name} says {listed}")
    total = summary["counts"]["total"] or 0
    if summary["counts"]["resolved"] != total:
        problems.append(f"shards hold {summary['counts']['resolved']} inputs, the run listed {total}")


def format_summary(s: dict[str, Any]) -> str:
    c, sh = s["counts"], s["shards"]
    lines = [f"run:      {s['dir']}"]
    state = "complete" if s["complete"] else f"NOT complete (status: {s['status']})"
    lines.append(f"status:   {state}" + (f" — {s['error']}" if s.get("error") else ""))
    tot = c["total"] if c["total"] is not None else f"{c['listed']}+ (listing not finished)"
    lines.append(f"inputs:   {tot} listed, {c['embedded']} embedded, {c['failed']} failed")
    exp = sh["expected"] if sh["expected"] is not None else "?"
    lines.append(f"shards:   {sh['complete']} of {exp} complete ({sh['size']} inputs each)"
                 + (f", missing {sh['missing'][:10]}" if sh["missing"] else ""))
    lines.append(f"vectors:  dim {s['dim']}, {s['dtype']}, " + ("L2-normalised" if s["normalized"] else "not normalised"))
    if s["failures_by_reason"]:
        lines.append("failures: " + ", ".join(f"{r} {n}" for r, n in s["failures_by_reason"].items())
                     + f" (see {RunDir(s['dir']).failures})")
    else:
        lines.append("failures: none")
    mdl = s["model"]
    ident = f"{mdl.get('path') or '-'} ({mdl.get('arch', '?')}, sha256 {str(mdl.get('sha256'))[:12]})"
    synthetic = "  SYNTHETIC random weights: embeddings carry no meaning" if s["synthetic_weights"] else ""
    lines.append(f"model:    {ident}{synthetic}")
    precision = f" ({s['precision']})" if s.get("precision") else ""
    lines.append(f"backend:  {s['backend']}{precision} on {', '.join(map(str, s['devices'] or []))}")
    if s["report"]:
        lines.append(f"report:   {s['report']} (clip-pipeline report {s['dir']} --html)")
    if s.get("in_use"):
        lines.append(f"in use:   {s['in_use']} (going on now; this is a snapshot)")
    elif not s["complete"]:
        lines.append("To finish it, run the same `clip-pipeline run` command again (it resumes).")
    return "\n".join(lines)
