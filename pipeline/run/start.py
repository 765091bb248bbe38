"""What a run starts from: the pre-start checks, the model, the prepared output directory, the
resume state, and the run's manifest (built by RunDir.manifest_of, written through the RunDir).

`RunStart.prepare` makes every refusal before a model is built (the same checks as `run
--dry-run`, pipeline/run/preflight.py), builds the model if asked, resolves the crop size once,
prepares (or resumes) the output directory and writes the manifest as "running".
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.data.rundir import LOCK, RunDir, now_iso, output_lock, shard_name
from pipeline.model.models import ensure_model, resolve_image_size
from pipeline.run import preflight
from pipeline.run.ledger import Ledger


@dataclass
class RunStart:
    cfg: Config  # with model.image_size resolved
    rundir: RunDir
    listing_path: Path
    id_range: tuple[int, int] | None = None
    devices: list[str] = field(default_factory=list)
    model: dict[str, Any] = field(default_factory=dict)
    fp: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    resumed: bool = False
    listing_complete: bool = False
    done_shards: list[int] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    input_changes: preflight.InputChanges | None = None  # inputs added/removed since an existing run listed them

    @classmethod
    def prepare(cls, cfg: Config, backend: Any, rundir: RunDir, ledger: Ledger, *, restart: bool, log: Callable,
                listing_path: Path, id_range: tuple[int, int] | None = None,
                after_checks: Callable[[], None] = lambda: None) -> RunStart:
        """Checks, model, output directory; the ledger is seeded with the shards already done.
        `after_checks` runs after the read-only checks, before anything is built or written (the
        supervisor takes the output's lock there)."""
        # every refusal comes from here, before a model is built (run --dry-run makes the same checks)
        pf = preflight.check(cfg, out=rundir.path, restart=restart)
        after_checks()
        cfg = pf.cfg  # with what the backend resolved once before start (openvino.precision)
        s = cls(cfg, rundir, listing_path, id_range, devices=pf.devices, input_changes=pf.changes)
        for w in pf.warnings:
            log(f"warning: {w}")
            s.warnings.append(w)
        if pf.changes:
            note = preflight.changes_note(pf.changes, pf.manifest.get("status") == "complete")
            log(f"warning: {note}")
            s.warnings.append(note)
        ensure_model(cfg, log=log)
        # the crop size every worker uses comes from the model (model.image_size = 0), resolved once here
        s.cfg = cfg.replace(model=replace(cfg.model, image_size=resolve_image_size(cfg)))
        backend.prepare(s.cfg, log)  # e.g. openvino int8: the quantised model, made once before the workers
        s.model = pf.model or backend.model_identity(s.cfg)
        s.fp = preflight.fingerprint(s.cfg, s.model)
        prior = rundir.prepare(s.fp, restart=restart, on_existing=cfg.output.on_existing, log=log,
                               refusal=lambda old: preflight.fingerprint_refusal(rundir.path, old, s.fp))
        s.resumed, s.listing_complete, s.done_shards = prior.resumed, prior.listing_complete, prior.done_shards
        s.warnings += [f"shard {shard_name(k)} is damaged ({why}); redone" for k, why in prior.damaged.items()]
        if id_range is not None:
            s.listing_complete = True  # the planned listing, replayed
        for k in s.done_shards:
            rows, failed = rundir.shard_counts(k)
            ledger.on_shard_written(k, rows, failed, resumed=True)
        s.created = prior.manifest.get("created") if prior.manifest else now_iso()
        s.write_manifest("running", ledger)
        if s.resumed and s.done_shards:
            log(f"Resuming the run in {rundir.path}: {len(s.done_shards)} shards already complete.")
        return s

    @property
    def synthetic(self) -> bool:
        return bool(self.model.get("synthetic"))

    def manifest(self, status: str, ledger: Ledger, extra: dict | None = None) -> dict[str, Any]:
        """This run's manifest.json (built by RunDir.manifest_of, with any published updates). Its
        config's output.dir is the directory it describes: the configured output, or the attempt or
        work directory a run into another directory wrote (pipeline/run/attempt.py)."""
        extra = dict(extra or {})
        config = self.cfg.to_dict()
        config["output"]["dir"] = os.fspath(self.rundir.path)
        if self.id_range is not None:
            extra["range"] = {"ids": list(self.id_range), "listing": str(self.listing_path)}
        return self.rundir.manifest_of(
            status=status, created=self.created, fingerprint=self.fp, config=config,
            devices=self.devices, model=self.model, listed=ledger.listed,
            listing_complete=ledger.listing_done or self.listing_complete,
            counts={"embedded": ledger.embedded, "failed": ledger.failed, "total": ledger.total},
            shards=ledger.written, shard_size=self.cfg.output.shard_size, **extra)

    def write_manifest(self, status: str, ledger: Ledger, extra: dict | None = None) -> None:
        self.rundir.write_manifest(self.manifest(status, ledger, extra))


class OutputHold:
    """The output directory's lock, held for a run (rundir.output_lock): taken after the read-only
    checks, which create nothing, and before anything is built or written, so a second process on
    OUT stops there (exit 2); and whether OUT was deleted or replaced under the run."""

    def __init__(self, out: Path, kind: str):
        self.out, self.kind = out, kind
        self.ident: tuple[int, int] | None = None  # (dev, inode) of OUT/.lock while this run holds it

    def take(self, stack: contextlib.ExitStack) -> None:
        stack.enter_context(output_lock(self.out, self.kind))
        st = os.stat(self.out / LOCK)
        self.ident = (st.st_dev, st.st_ino)

    def gone(self) -> bool:
        """Whether OUT was deleted or replaced under the run (`rm -rf OUT`): its lock file is not
        the one this run holds. Writing on would scatter the run's files into a new directory."""
        if self.ident is None:
            return False
        try:
            st = os.stat(self.out / LOCK)
        except OSError:
            return True
        return (st.st_dev, st.st_ino) != self.ident

    @property
    def reason(self) -> str:
        return f"the output directory {self.out} was deleted or moved during the run"
