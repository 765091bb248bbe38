"""How a run ends: the closing line, report.json, the manifest's final status, the companions of a
complete run (failures.jsonl, the metadata layout, the pickle), and the exit code with the message
that says what is on disk and what to do next."""

from __future__ import annotations

import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.data.rundir import SYNTHETIC_NOTE, RunDir, remove_temp_files
from pipeline.errors import RunFailure
from pipeline.run import preflight
from pipeline.run.ledger import Ledger
from pipeline.run.telemetry import run_fields

if TYPE_CHECKING:
    from pipeline.run.supervisor import Supervisor

# Exit codes of `clip-pipeline run` (documented in the README).
EXIT_SUCCESS = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_WITH_FAILURES = 3
EXIT_ABORTED = 4
EXIT_SIGINT = 130
EXIT_SIGTERM = 143



class RunAborted(RunFailure):
    """The run cannot go on (no device left, disk full, inputs changed...)."""


@dataclass
class RunResult:
    exit_code: int
    message: str
    counts: dict[str, int] = field(default_factory=dict)
    out_dir: str = ""


def finish_run(sup: Supervisor, wall: float) -> RunResult:
    """The end of a run: closing line, report.json, the manifest's status and, for a complete run,
    failures.jsonl, the metadata layout and the pickle; the exit code and its message."""
    led = sup.ledger
    counts = {"embedded": led.embedded, "failed": led.failed, "total": sup.view.range_total() or led.listed}
    done = led.embedded + led.failed
    # the last line sums up the whole run (the last interval is mostly shutdown)
    line = sup.telemetry.final_line(led)
    sup.progress.close(done, sup.view.range_total(), led.failed, sup.view.rate(), line)
    ending_early = sup.signals.signum is not None or bool(sup.abort_reason) or not led.complete()
    if sup.hold.gone():  # nothing to keep, and nothing must be written into a stranger's directory
        return RunResult(EXIT_ABORTED, f"Run aborted: {sup.hold.reason}; nothing more was written. Run the "
                         "same command again to start over.", counts, str(sup.out))
    if ending_early:
        # every worker is stopped and this process holds the lock: what a killed writer left
        # half-written (.part-*.tmp) goes now, not at the next start
        best_effort(sup.log, sup.out, remove_temp_files, sup.out)
        sync_with_disk(sup.rundir, led)
    report = run_report(sup, wall)
    best_effort(sup.log, sup.out, sup.rundir.write_report, report)
    if sup.signals.signum is not None:
        name = "SIGINT" if sup.signals.signum == signal.SIGINT else "SIGTERM"
        best_effort(sup.log, sup.out, sup.write_manifest, "interrupted")
        msg = (f"Interrupted by {name}: {on_disk(led, sup.view.range_total())} in {sup.out}. "
               "Run the same command again to resume (the rest is redone).")
        return RunResult(EXIT_SIGINT if sup.signals.signum == signal.SIGINT else EXIT_SIGTERM, msg, counts, str(sup.out))
    if ending_early:
        reason = (sup.abort_reason or "the run ended before every input was resolved").rstrip(". ")
        best_effort(sup.log, sup.out, sup.write_manifest, "failed", {"error": reason})
        return RunResult(EXIT_ABORTED, f"Run aborted: {reason}. Kept: {on_disk(led, sup.view.range_total())} in {sup.out}; "
                         "fix the cause and run the same command again to resume.", counts, str(sup.out))
    o = sup.cfg.output
    try:
        manifest = sup.start.manifest("complete", led)
        n_fail = sup.rundir.publish(manifest, metadata=o.metadata, layout=o.layout, pickle=o.pickle)
    except OSError as exc:  # the disk filled up, or OUT was deleted, at the very end: exit 4 as mid-run
        reason = output_failure(sup.out, exc)
        best_effort(sup.log, sup.out, sup.write_manifest, "failed", {"error": reason})
        return RunResult(EXIT_ABORTED, f"Run aborted: {reason}. Kept: {on_disk(led, sup.view.range_total())} in "
                         f"{sup.out}; fix the cause and run the same command again to resume.", counts, str(sup.out))
    if manifest.get("updates"):  # inputs added by run --update count too (RunDir.manifest_of)
        counts = dict(manifest["counts"])
    synthetic = f" ({SYNTHETIC_NOTE})" if sup.model.get("synthetic") else ""
    earlier = (f"; {sup.resumed_count} of the inputs were done by an earlier run of this output, "
               f"{led.embedded + led.failed - sup.resumed_count} by this one") if sup.resumed_count else ""
    msg = (f"Embedded {counts['embedded']} of {counts['total']} images in {wall:.1f}s into {sup.out}{synthetic}"
           f"{earlier}.")
    if sup.start.input_changes:
        msg += " Note: " + preflight.changes_note(sup.start.input_changes, True) + "."
    if n_fail:
        msg += f" Completed with {n_fail} failure{'s' if n_fail != 1 else ''}: see {sup.rundir.failures}."
        return RunResult(EXIT_WITH_FAILURES, msg, counts, str(sup.out))
    return RunResult(EXIT_SUCCESS, msg, counts, str(sup.out))


def run_report(sup: Supervisor, wall: float) -> dict:
    """The content of report.json (Telemetry.report, with what the supervisor knows of the run)."""
    reasons = sup.rundir.failures_by_reason(sup.ledger.written)
    run = run_fields(list(sup.pool), sup.telemetry.stats, sup.cfg, sup.model, sup.devices, sup.errors, sup.warnings)
    return sup.telemetry.report(wall, sup.ledger, sup.resumed_count, reasons, run)


def sync_with_disk(rundir: RunDir, ledger: Ledger, resumed: bool = False) -> None:
    """Count the complete shards on disk the ledger has not seen: after the workers stopped (a
    shard the sink wrote while being stopped is on disk even if its "shard" message never reached
    the supervisor; issue #12: "6 shard(s) complete" while the 7th appeared on disk right
    afterwards; an unreadable one is left out), or after the sink died (`resumed`: the restarted
    sink skips them, so they must count as written here)."""
    for k in rundir.completed_shards():
        if k not in ledger.written:
            try:
                rows, failed = rundir.shard_counts(k)
            except (OSError, ValueError):
                if resumed:
                    raise
                continue
            ledger.on_shard_written(k, rows, failed, resumed=resumed)


def on_disk(led: Ledger, total: int | None) -> str:
    """What an interrupted or aborted run leaves: complete shards and the inputs they hold."""
    of = f"{total}" if total is not None else f"{led.listed} listed so far"
    return (f"{len(led.written)} complete shard(s) on disk holding {led.written_rows + led.written_failed} of "
            f"{of} inputs ({led.written_rows} embedded, {led.written_failed} failed)")


def best_effort(log: Callable[[str], None], out: Path, fn: Callable, *args: Any) -> None:
    """Write run metadata when the run is ending badly anyway (e.g. the disk is full): a failure
    here must not hide the real error. Shards never depend on these files."""
    try:
        fn(*args)
    except OSError as exc:
        log(f"warning: could not update {out}: {exc.strerror or exc}")


def output_failure(out: Path, exc: OSError) -> str:
    """Why writing the output failed, in words (the run's exit-4 reason)."""
    import errno

    if exc.errno == errno.ENOSPC:
        return f"the output disk is full (writing {exc.filename or out}); free space"
    if not out.is_dir():
        return f"the output directory {out} was deleted or moved during the run"
    return f"cannot write {exc.filename or out}: {exc.strerror or exc}"
