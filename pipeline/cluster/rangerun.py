"""`clip-pipeline run-range`: embed one planned id range, idempotently, and commit it.

1. If ranges/r-RRRRR.json exists and verifies, return at once.
2. Otherwise run today's local pipeline (the Supervisor, unchanged, on all of this host's
   devices) over ids [lo, hi) of the planned listing, into attempts/r-RRRRR/ATTEMPT/ (a normal run
   directory: rerunning with the same --attempt resumes it shard by shard).
3. Commit with a record created only if absent; the loser deletes its attempt directory.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.cluster import commit as cm
from pipeline.cluster.plan import Plan, fingerprint_diff, identity, load_plan
from pipeline.config import Config, ConfigError

NODE_ENV = "CLIP_PIPELINE_ENGINE_NODE"  # set by an engine adapter (Ray: the node id), recorded in the commit


class RangeFailed(Exception):
    """The range's local pipeline did not finish (the message names the host)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class RangeOutcome:
    range: int
    status: str  # "committed" (this attempt), "done" (committed before), "lost" (another attempt won)
    record: dict[str, Any]
    attempt: str | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"range": self.range, "status": self.status, "attempt": self.attempt,
                           "committed_attempt": self.record.get("attempt"), "host": self.record.get("host"),
                           "rows": self.record.get("rows"), "failed": self.record.get("failed"),
                           "timings": self.timings}, sort_keys=True)


def host_name() -> str:
    return socket.gethostname()


def _on_host(msg: str) -> str:
    return f"on host {host_name()}: {msg}"


def check_host_config(plan: Plan, cfg: Config, log=print) -> dict[str, Any]:
    """This host's model identity; ConfigError naming the host when it cannot run the plan."""
    try:
        model, fp = identity(cfg, log=log)
    except ConfigError as exc:
        raise ConfigError(_on_host(str(exc))) from None
    diff = fingerprint_diff(plan.fingerprint, fp)
    if diff:
        raise ConfigError(_on_host(f"the config differs from the plan in {plan.out} in {', '.join(diff)} "
                                   "(a different model file or preprocessing would mix embeddings); "
                                   "give every host the planned model and config"))
    return model


def run_range(cfg: Config, r: int, *, attempt: str | None = None, log=print, progress=None) -> RangeOutcome:
    from pipeline.run.attempt import run_into
    from pipeline.run.supervisor import RunAborted

    t0 = time.monotonic()
    plan = load_plan(cfg.output.dir)
    plan.check_range(r)
    rec = cm.read_record(plan.out, r)
    if rec is not None:
        problems = cm.check_record(plan, r, rec)
        if not problems:
            return RangeOutcome(r, "done", rec, None, {"total_s": round(time.monotonic() - t0, 3)})
        moved = cm.set_aside(plan.out, r, "; ".join(problems))
        log(f"range {r}: the commit record does not verify ({problems[0]}); set aside as {moved}, redoing the range")
    check_host_config(plan, cfg, log=log)
    attempt = attempt or cm.new_attempt_id()
    adir = cm.attempts_root(plan.out, r) / attempt
    adir.parent.mkdir(parents=True, exist_ok=True)
    lo, hi = plan.ids(r)
    info = {"host": host_name(), "pid": os.getpid(), "engine_node": os.environ.get(NODE_ENV, ""),
            "attempt": attempt, "range": r, "ids": [lo, hi],
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (adir.parent / f"{attempt}.attempt.json").write_text(json.dumps(info, sort_keys=True) + "\n")
    t_run = time.monotonic()
    try:
        result = run_into(cfg, adir, progress=progress, log=log, supervise={"id_range": (lo, hi), "listing": plan.listing})
    except ConfigError as exc:
        raise ConfigError(_on_host(str(exc))) from None
    except RunAborted as exc:
        raise RangeFailed(_on_host(f"range {r}: {exc}"), 4) from None
    pipeline_s = time.monotonic() - t_run
    if result.exit_code not in (0, 3):
        raise RangeFailed(_on_host(f"range {r}: {result.message}"), result.exit_code)
    t_commit = time.monotonic()
    before = cm.read_record(plan.out, r)
    if before is not None and not cm.check_record(plan, r, before):
        cm.remove_attempt(adir)
        return RangeOutcome(r, "lost", before, attempt, {"pipeline_s": round(pipeline_s, 3)})
    devices = _devices(adir)
    record = cm.build_record(plan, r, attempt, adir, {
        "host": host_name(), "pid": os.getpid(), "engine_node": os.environ.get(NODE_ENV, ""),
        "backend": cfg.infer.backend, "devices": devices,
        "timings": {"pipeline_s": round(pipeline_s, 3), "prepare_s": round(t_run - t0, 3)},
        "started": info["started"], "committed": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })
    won = cm.commit(plan.out, r, record)
    timings = {"prepare_s": round(t_run - t0, 3), "pipeline_s": round(pipeline_s, 3),
               "commit_s": round(time.monotonic() - t_commit, 3), "total_s": round(time.monotonic() - t0, 3)}
    if not won:
        cm.remove_attempt(adir)
        return RangeOutcome(r, "lost", cm.read_record(plan.out, r) or {}, attempt, timings)
    return RangeOutcome(r, "committed", record, attempt, timings)


def _devices(run_dir: Path) -> list:
    from pipeline.data.rundir import RunDir

    m = RunDir(run_dir).read_manifest() or {}
    return list(m.get("devices") or [])
