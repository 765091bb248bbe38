"""`clip-pipeline merge` and `clip-pipeline status`: verify every committed range, publish its
shards into the normal output layout, write the manifest last.

The merged directory is an ordinary run directory: load_embeddings, inspect --verify and search
read it unchanged, and `clip-pipeline run` with the same config finds it complete.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.cluster import commit as cm
from pipeline.cluster.plan import Plan, load_plan
from pipeline.data import rundir
from pipeline.data.rundir import RunDir


class MergeIncomplete(Exception):
    """Some ranges are not committed yet (the message lists them)."""

    def __init__(self, message: str, missing: list[int]):
        super().__init__(message)
        self.missing = missing


class MergeBroken(Exception):
    """A commit does not verify (checksums, missing files); the message says what to redo."""


@dataclass
class MergeResult:
    embedded: int
    failed: int
    total: int
    shards: int
    ranges: int
    wall_s: float


def missing_ranges(plan: Plan) -> list[int]:
    """Ranges without a commit record that verifies (cheap check: existence and sizes)."""
    return [r for r in range(plan.n_ranges) if cm.check_record(plan, r, cm.read_record(plan.out, r))]


def array_spec(ranges: list[int]) -> str:
    """Comma list with runs collapsed, as sbatch --array takes it: 0-3,7,9-10."""
    parts: list[str] = []
    i = 0
    while i < len(ranges):
        j = i
        while j + 1 < len(ranges) and ranges[j + 1] == ranges[j] + 1:
            j += 1
        parts.append(str(ranges[i]) if i == j else f"{ranges[i]}-{ranges[j]}")
        i = j + 1
    return ",".join(parts)


def merge(out: str | os.PathLike, *, log=print, clean: bool = True) -> MergeResult:
    """Under the output's lock (rundir.output_lock): one merge at a time, never beside a run."""
    with rundir.output_lock(load_plan(out).out, "merge"):
        return _merge(out, log=log, clean=clean)


def _merge(out: str | os.PathLike, *, log=print, clean: bool = True) -> MergeResult:
    t0 = time.monotonic()
    plan = load_plan(out)
    records = _verified_records(plan)
    rd = RunDir(plan.out)
    rd.shards_dir.mkdir(exist_ok=True)
    rundir.remove_temp_files(plan.out)
    for r, rec in records.items():
        for k in plan.shards(r):  # hard links (or copies) of the committed attempt's files, .npy last
            rd.adopt_shard(RunDir(cm.committed_dir(plan, rec, k)), k, k, link=True)
    rundir.fsync_dir(rd.shards_dir)
    rundir.link_or_copy(plan.listing, rd.listing)
    rows = sum(rec["rows"] for rec in records.values())
    cfg_dict = plan.record["config"]
    model = plan.record["model"]
    devices = sorted({f"{rec.get('host')}:{d}" for rec in records.values() for d in rec.get("devices") or []})
    manifest = rd.manifest_of(
        status="complete", created=plan.record["created"], fingerprint=plan.fingerprint, config=cfg_dict,
        devices=devices, model=model, listed=plan.n_inputs, listing_complete=True,
        counts={"embedded": rows, "failed": sum(rec["failed"] for rec in records.values()), "total": plan.n_inputs},
        shards=range(plan.n_shards), shard_size=plan.shard_size,
        cluster={"run_id": plan.run_id, "ranges": plan.n_ranges, "range_size": plan.range_size,
                 "plan": str(Path("plan") / "plan.json")})
    o = cfg_dict.get("output", {})
    # report.json first, the manifest (in publish) last: the run is complete from then on
    rd.write_report(_report(plan, records, rows, devices, model, time.monotonic() - t0))
    n_fail = rd.publish(manifest, metadata=bool(o.get("metadata")), layout=o.get("layout", "native"),
                        pickle=bool(o.get("pickle")))
    if clean:
        remove_stale_attempts(plan, records)
    return MergeResult(rows, n_fail, plan.n_inputs, plan.n_shards, plan.n_ranges, time.monotonic() - t0)


def _verified_records(plan: Plan) -> dict[int, dict[str, Any]]:
    """Every range's commit record, each verified (sha256 of every file) and every shard of the plan
    committed exactly once; MergeIncomplete / MergeBroken saying what to run again otherwise."""
    outp = plan.out
    missing = missing_ranges(plan)
    if missing:
        raise MergeIncomplete(f"{len(missing)} of {plan.n_ranges} range(s) are not committed: {array_spec(missing)} "
                              f"(run-range them, e.g. sbatch --array={array_spec(missing)}; "
                              f"`clip-pipeline status {outp} --missing` lists them)", missing)
    records = {r: cm.read_record(outp, r) for r in range(plan.n_ranges)}
    owner: dict[int, int] = {}
    problems: list[str] = []
    for r, rec in records.items():
        problems += cm.check_record(plan, r, rec, deep=True)
        for k in rec["shards"]:
            if int(k) in owner:
                problems.append(f"shard {k} is committed by ranges {owner[int(k)]} and {r}")
            owner[int(k)] = r
    if sorted(owner) != list(range(plan.n_shards)):
        problems.append(f"the commits cover shards {sorted(owner)[:5]}..., the plan 0..{plan.n_shards - 1}")
    if problems:
        bad = sorted({int(p.split()[1].rstrip(":")) for p in problems if p.startswith("range ")})
        hint = (f"; delete {', '.join(str(cm.record_path(outp, r)) for r in bad[:5])} and run-range "
                f"{array_spec(bad)} again") if bad else ""
        raise MergeBroken(f"{problems[0]} ({len(problems)} problem(s) in all){hint}")
    return records


def _report(plan: Plan, records: dict[int, dict[str, Any]], rows: int, devices: list[str], model: dict,
            merge_s: float) -> dict[str, Any]:
    """The merged run's report.json: across hosts, from the first range's start to the last commit."""
    rd = RunDir(plan.out)
    shards = range(plan.n_shards)
    n_fail = sum(rec["failed"] for rec in records.values())
    per_range = [{"range": r, "attempt": rec["attempt"], "host": rec.get("host"), "engine_node": rec.get("engine_node"),
                  "devices": rec.get("devices"), "rows": rec["rows"], "failed": rec["failed"],
                  "timings": rec.get("timings", {})} for r, rec in records.items()]
    span = _span_s(records.values())
    return {
        "format": rundir.FORMAT,
        "wall_s": span,
        "images_per_s": round((rows + n_fail) / span, 3) if span else None,
        "devices": devices,
        "cluster": {"run_id": plan.run_id, "ranges": per_range, "merge_s": round(merge_s, 3)},
        "counts": {"embedded": rows, "failed": n_fail, "listed": plan.n_inputs},
        "failures_by_reason": dict(sorted(rd.failures_by_reason(shards).items())),
        "model": model,
        "backend": plan.record["config"].get("infer", {}).get("backend"),
        "synthetic_weights": bool(model.get("synthetic")),
        "versions": rundir.software_versions(),
    }


def _span_s(records) -> float | None:
    """Seconds from the earliest range start to the latest commit (the records' timestamps)."""
    from datetime import datetime

    try:
        starts = [datetime.strptime(r["started"], "%Y-%m-%dT%H:%M:%S%z") for r in records]
        ends = [datetime.strptime(r["committed"], "%Y-%m-%dT%H:%M:%S%z") for r in records]
    except (KeyError, ValueError):
        return None
    if not starts:
        return None
    return max(1.0, (max(ends) - min(starts)).total_seconds())


def remove_stale_attempts(plan: Plan, records: dict[int, dict[str, Any]]) -> int:
    """Delete attempt directories no commit refers to (losers, dead or cancelled attempts); never
    one whose run still holds its lock (a duplicate still running: it deletes its own when it loses)."""
    keep = {str(plan.out / rec["dir"]) for rec in records.values()}
    n = 0
    root = plan.out / cm.ATTEMPTS_DIR
    if not root.is_dir():
        return 0
    for rdir in root.iterdir():
        if not rdir.is_dir():
            continue
        for a in rdir.iterdir():
            if a.is_dir() and str(a) not in keep and rundir.lock_holder(a) is None:
                cm.remove_attempt(a)
                n += 1
            elif (a.name.endswith(".attempt.json") and str(rdir / a.name.removesuffix(".attempt.json")) not in keep
                  and rundir.lock_holder(rdir / a.name.removesuffix(".attempt.json")) is None):
                a.unlink(missing_ok=True)
    return n


def status(out: str | os.PathLike) -> dict[str, Any]:
    plan = load_plan(out)
    missing = missing_ranges(plan)
    merged = (RunDir(plan.out).read_manifest() or {}).get("status") == "complete"
    attempts_running = []
    for r in missing:
        d = cm.attempts_root(plan.out, r)
        if d.is_dir():
            attempts_running += [f"{r}:{p.name}" for p in d.iterdir() if p.is_dir()]
    return {"dir": str(plan.out), "run_id": plan.run_id, "inputs": plan.n_inputs, "ranges": plan.n_ranges,
            "range_size": plan.range_size, "committed": plan.n_ranges - len(missing), "missing": missing,
            "attempts_without_commit": attempts_running, "merged": merged}
