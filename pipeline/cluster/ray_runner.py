"""`clip-pipeline run --cluster ray`: a thin driver that schedules planned ranges on a Ray cluster.

Ray only places work: one task per range, each asking for the whole host ({"clip_slot": 1},
num_cpus=0), running `clip-pipeline run-range` (today's local pipeline on all of the host's
devices) in its own process group. Correctness stays with the plan / commit / merge protocol:

- node or worker death: Ray re-runs the task (max_retries); the new attempt writes its own
  directory and the first commit wins;
- a range that fails in the application (e.g. a host without the model file): the driver tries it
  again on another node, up to cluster.max_attempts, and the other ranges go on;
- cluster.range_timeout_s: an attempt running longer is cancelled (force: its process group dies
  with the Ray worker) and tried again;
- stragglers: with a slot free and nothing queued, a range running longer than
  cluster.straggler_factor x the median range time gets a duplicate; the first commit wins and
  the other attempt is cancelled;
- driver death: rerunning the same command skips every committed range.
"""

from __future__ import annotations

import json
import statistics
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import Config, ConfigError
from pipeline.data import rundir
from pipeline.data.rundir import RunDir

EXTRA_HINT = "pip install 'clip-pipeline[cluster]'"
SLOT = "clip_slot"
SLOT_WAIT_S = 30.0  # how long the driver waits for a first node with a clip_slot


def import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError(f"--cluster ray needs Ray, which is not installed: {EXTRA_HINT} "
                          "(or use the Slurm path: clip-pipeline plan / run-range / merge)") from None
    return ray


def _range_task(root: str, out: str, r: int, config_file: str, attempt_tag: str) -> dict[str, Any]:
    """Runs on a node: `clip-pipeline run-range` in its own process group, which dies with this
    Ray worker (PR_SET_PDEATHSIG) or is killed when the task is cancelled."""
    import ctypes
    import os
    import signal
    import socket
    import subprocess
    import sys

    import ray

    node = ray.get_runtime_context().get_node_id()
    env = dict(os.environ)
    env["CLIP_PIPELINE_ENGINE_NODE"] = node
    if root and os.path.isdir(os.path.join(root, "pipeline")):
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    else:
        root = None
    cmd = [sys.executable, "-m", "pipeline.cli", "run-range", "-o", out, "--range", str(r),
           "--config-dict", config_file, "--json", "--attempt",
           f"{socket.gethostname()}-{node[:8]}-{attempt_tag}"]

    def parent_death_signal() -> None:
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass

    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=parent_death_signal)
    try:
        so, se = proc.communicate()
    except BaseException:  # cancelled (TaskCancelledError / KeyboardInterrupt): take the pipeline down
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        raise
    host = socket.gethostname()
    if proc.returncode != 0:
        lines = [ln for ln in se.decode(errors="replace").splitlines() if ln.strip()]
        err = next((ln for ln in reversed(lines) if ln.startswith("error:")), lines[-1] if lines else "")
        return {"ok": False, "range": r, "node": node, "host": host, "exit": proc.returncode,
                "error": err, "wall_s": time.time() - t0}
    res = json.loads(so.decode().strip().splitlines()[-1])
    return {"ok": True, "node": node, "host": host, "wall_s": time.time() - t0, **res}


@dataclass
class Running:
    r: int
    t0: float
    duplicate: bool = False
    tag: str = ""


@dataclass
class DriverStats:
    submitted: int = 0
    duplicates: int = 0
    timeouts: int = 0
    app_failures: int = 0
    lost: int = 0
    skipped: int = 0
    range_wall_s: list[float] = field(default_factory=list)
    range_timings: list[dict] = field(default_factory=list)


class RayDriver:
    def __init__(self, cfg: Config, ray, log=print, poll_s: float = 0.25):
        self.cfg = cfg
        self.ray = ray
        self.log = log
        self.poll_s = poll_s
        self.c = cfg.cluster
        self.stats = DriverStats()

    def slots(self) -> int:
        return int(self.ray.cluster_resources().get(SLOT, 0))

    def slot_nodes(self) -> list[str]:
        return [n["NodeID"] for n in self.ray.nodes() if n.get("Alive") and n.get("Resources", {}).get(SLOT)]

    def node_of_attempt(self, plan, a: Running) -> str | None:
        """The Ray node an attempt ran on (from its attempt record), once it got that far."""
        from pipeline.cluster import commit as cm

        for p in cm.attempts_root(plan.out, a.r).glob(f"*-{a.tag}.attempt.json"):
            try:
                return json.loads(p.read_text()).get("engine_node") or None
            except (OSError, ValueError):
                return None
        return None

    def run(self, plan, todo: list[int], config_file: str) -> dict[int, str]:
        """Schedule the ranges in todo until each is committed or out of attempts.
        Returns {range: last error} for the ranges that could not be done."""
        ray = self.ray
        root = str(Path(__file__).resolve().parents[2])
        remote = ray.remote(num_cpus=0, resources={SLOT: 1}, max_retries=3, retry_exceptions=False)(_range_task)
        self.wait_for_slots()
        s = _Schedule(plan, todo, lambda r, tag, opts: (remote.options(**opts) if opts else remote).remote(
            root, str(plan.out), r, config_file, tag))
        while s.queue or s.inflight:
            free = self.fill_slots(s)
            if not s.queue and free > 0 and self.c.straggler_factor and self.stats.range_wall_s:
                self.launch_duplicates(s, free)
            ready, _ = ray.wait(list(s.inflight), num_returns=1, timeout=self.poll_s) if s.inflight else ([], [])
            for ref in ready:
                self.collect(s, ref)
            if self.c.range_timeout_s:
                self.cancel_overdue(s)
        return s.failed

    def wait_for_slots(self) -> None:
        """Wait up to SLOT_WAIT_S for a first node with a clip_slot (nodes that are still joining)."""
        deadline = time.monotonic() + SLOT_WAIT_S
        while self.slots() == 0 and time.monotonic() < deadline:
            time.sleep(1.0)
        if self.slots() == 0:
            raise ConfigError(f"no node of the Ray cluster offers the {SLOT} resource: start every node with "
                              f"ray start ... --resources='{{\"{SLOT}\": 1}}' (docs/cluster.md)")

    def submit(self, s: _Schedule, r: int, duplicate: bool = False) -> None:
        """Start an attempt at range r, on another node than those where it already failed."""
        opts: dict[str, Any] = {}
        avoid = s.bad_nodes[r]
        if avoid:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            good = [n for n in self.slot_nodes() if n not in avoid]
            if good:  # another node than those where this range already failed
                pick = good[(s.tries[r] + len(avoid)) % len(good)]
                opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(pick, soft=False)
        tag = f"{s.tries[r]}{'d' if duplicate else ''}-{uuid.uuid4().hex[:6]}"
        ref = s.launch(r, tag, opts)
        s.inflight[ref] = Running(r, time.monotonic(), duplicate, tag)
        s.by_range[r].add(ref)
        self.stats.submitted += 1
        self.stats.duplicates += duplicate

    def give_up_or_retry(self, s: _Schedule, r: int, why: str) -> None:
        s.tries[r] += 1
        s.last_error[r] = why
        if s.by_range[r] or r in s.done:
            return  # another attempt of r is still running
        if s.tries[r] >= self.c.max_attempts:
            s.failed[r] = why
            self.log(f"range {r}: giving up after {s.tries[r]} attempt(s): {why}")
        else:
            self.log(f"range {r}: {why}; trying again ({s.tries[r]} of {self.c.max_attempts} attempts used)")
            s.queue.append(r)

    def fill_slots(self, s: _Schedule) -> int:
        """Submit queued ranges while slots are free; returns the slots still free."""
        free = self.slots() - len(s.inflight)
        while s.queue and free > 0:
            r = s.queue.popleft()
            if r not in s.done and r not in s.failed:
                self.submit(s, r)
                free -= 1
        return free

    def launch_duplicates(self, s: _Schedule, free: int) -> None:
        """Stragglers: a duplicate of each range running longer than cluster.straggler_factor x the
        median range time, while slots are free (the first commit wins)."""
        now = time.monotonic()
        bound = max(self.c.straggler_min_s, self.c.straggler_factor * statistics.median(self.stats.range_wall_s))
        for _ref, a in sorted(s.inflight.items(), key=lambda kv: kv[1].t0):
            if free <= 0:
                break
            if len(s.by_range[a.r]) == 1 and not a.duplicate and now - a.t0 > bound:
                self.log(f"range {a.r} has run {now - a.t0:.0f}s (> {bound:.0f}s); launching a duplicate")
                self.submit(s, a.r, duplicate=True)
                free -= 1

    def collect(self, s: _Schedule, ref: Any) -> None:
        """A finished attempt: a range done (its duplicates cancelled), or another try."""
        a = s.inflight.pop(ref)
        s.by_range[a.r].discard(ref)
        try:
            res = self.ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - Ray's retries exhausted, or cancelled by us
            if a.r in s.done or type(exc).__name__ == "TaskCancelledError":
                return
            self.give_up_or_retry(s, a.r, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            return
        if a.r in s.done:
            return
        if not res.get("ok"):
            self.stats.app_failures += 1
            s.bad_nodes[a.r].add(res["node"])
            self.give_up_or_retry(s, a.r, f"failed on {res['host']} (node {res['node'][:8]}): {res['error']}")
            return
        s.done.add(a.r)
        if res["status"] == "lost":
            self.stats.lost += 1
        wall = time.monotonic() - a.t0
        if res["status"] == "committed":
            self.stats.range_wall_s.append(wall)
            self.stats.range_timings.append({"range": a.r, "driver_wall_s": round(wall, 3),
                                             "task_wall_s": round(res["wall_s"], 3), **res.get("timings", {})})
        self.log(f"range {a.r}: {res['status']} on {res['host']} ({len(s.done)} of {len(s.todo)} done)")
        for other in list(s.by_range[a.r]):  # the first commit wins: cancel the duplicate
            self.ray.cancel(other, force=True)
            s.inflight.pop(other, None)
        s.by_range[a.r].clear()

    def cancel_overdue(self, s: _Schedule) -> None:
        """cluster.range_timeout_s: cancel an attempt running longer, and try its range again."""
        now = time.monotonic()
        for ref, a in list(s.inflight.items()):
            if now - a.t0 > self.c.range_timeout_s:
                self.ray.cancel(ref, force=True)
                s.inflight.pop(ref)
                s.by_range[a.r].discard(ref)
                self.stats.timeouts += 1
                node = self.node_of_attempt(s.plan, a)
                if node:
                    s.bad_nodes[a.r].add(node)
                self.give_up_or_retry(s, a.r, f"attempt timed out after {self.c.range_timeout_s:g}s "
                                              "(cluster.range_timeout_s)")


@dataclass
class _Schedule:
    """The state of one RayDriver.run: the queue, the attempts in flight, what is done or failed."""

    plan: Any
    todo: list[int]
    launch: Callable[[int, str, dict[str, Any]], Any]  # (range, attempt tag, Ray options) -> object ref
    queue: deque[int] = field(init=False)
    inflight: dict[Any, Running] = field(default_factory=dict)
    by_range: dict[int, set] = field(default_factory=lambda: defaultdict(set))
    tries: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    bad_nodes: dict[int, set[str]] = field(default_factory=lambda: defaultdict(set))
    done: set[int] = field(default_factory=set)
    failed: dict[int, str] = field(default_factory=dict)
    last_error: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.queue = deque(self.todo)


def run_on_ray(cfg: Config, *, address: str | None = None, restart: bool = False, log=print,
               init_kwargs: dict | None = None) -> tuple[int, str]:
    """Plan (or re-check the plan), run every uncommitted range on the Ray cluster, merge.
    Returns (exit code, message) like `clip-pipeline run`."""
    import shutil

    from pipeline.cluster.merge import MergeBroken, MergeIncomplete, merge, missing_ranges
    from pipeline.cluster.plan import make_plan

    ray = import_ray()
    t0 = time.monotonic()
    out = Path(cfg.output.dir)
    if restart and out.exists():
        log(f"Deleting {out} (--restart).")
        shutil.rmtree(out)
    plan, created = make_plan(cfg, cfg.cluster.range_shards, log=log)
    plan_s = time.monotonic() - t0
    todo = missing_ranges(plan)
    log(f"{'Planned' if created else 'Plan found:'} {plan.n_inputs} inputs, {plan.n_ranges} range(s) of "
        f"{plan.range_size}; {len(todo)} to run, {plan.n_ranges - len(todo)} already committed.")
    config_file = plan.out / "plan" / f".config-{uuid.uuid4().hex[:8]}.json"
    rundir.atomic_write_bytes(config_file, json.dumps(cfg.to_dict(), sort_keys=True).encode())
    connected_here = False
    driver = RayDriver(cfg, ray, log=log)
    t_ranges = time.monotonic()
    try:
        if todo:
            if not ray.is_initialized():
                addr = address or cfg.cluster.address
                ray.init(address=addr, log_to_driver=False, **(init_kwargs or {}))
                connected_here = True
            failed = driver.run(plan, todo, str(config_file))
        else:
            failed = {}
    finally:
        config_file.unlink(missing_ok=True)
        if connected_here:
            ray.shutdown()
    ranges_s = time.monotonic() - t_ranges
    driver.stats.skipped = plan.n_ranges - len(todo)
    if failed:
        first = next(iter(sorted(failed.items())))
        return 4, (f"{len(failed)} range(s) could not be done ({', '.join(map(str, sorted(failed)))}); "
                   f"range {first[0]}: {first[1]}. Committed ranges are kept: fix the cause and run the same command again.")
    try:
        res = merge(out, log=log)
    except (MergeIncomplete, MergeBroken) as exc:
        return 4, str(exc)
    _driver_report(out, driver.stats, plan_s, ranges_s)
    msg = (f"Embedded {res.embedded} of {res.total} images on the Ray cluster in {time.monotonic() - t0:.1f}s "
           f"({plan.n_ranges} ranges, {len(todo)} run now) into {out}.")
    if res.failed:
        return 3, msg + f" Completed with {res.failed} failure{'s' if res.failed != 1 else ''}: see {RunDir(out).failures}."
    return 0, msg


def _driver_report(out: Path, s: DriverStats, plan_s: float, ranges_s: float) -> None:
    """Add the driver's figures to the merged report.json (cluster.driver)."""
    p = RunDir(out).report
    try:
        rep = json.loads(p.read_text())
    except (OSError, ValueError):
        return
    rep.setdefault("cluster", {})["driver"] = {
        "plan_s": round(plan_s, 3), "ranges_s": round(ranges_s, 3), "submitted": s.submitted,
        "duplicates": s.duplicates, "timeouts": s.timeouts, "app_failures": s.app_failures, "lost": s.lost,
        "skipped_committed": s.skipped, "ranges": s.range_timings}
    rundir.atomic_write_json(p, rep)
