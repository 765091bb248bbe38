"""The plan: the input listing done once, deterministically, plus a record of what the run is.

Range r covers input ids [r*R, min((r+1)*R, N)) where R = range_shards * shard_size, so a range
is a whole number of shards and every name (shard k, range r) depends only on the listing and
the plan, never on hosts, devices or the engine.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import Config, ConfigError
from pipeline.data import rundir
from pipeline.data.rundir import LISTING, LOCK, RunDir

PLAN_FORMAT = "clip-pipeline-plan/1"
PLAN_DIR = "plan"
PLAN_FILE = "plan.json"
LISTING_FILE = LISTING


@dataclass(frozen=True)
class Plan:
    out: Path
    record: dict[str, Any]

    @property
    def run_id(self) -> str:
        return self.record["run_id"]

    @property
    def n_inputs(self) -> int:
        return int(self.record["inputs"])

    @property
    def shard_size(self) -> int:
        return int(self.record["shard_size"])

    @property
    def range_size(self) -> int:
        return int(self.record["range_size"])

    @property
    def n_ranges(self) -> int:
        return int(self.record["ranges"])

    @property
    def n_shards(self) -> int:
        return -(-self.n_inputs // self.shard_size)

    @property
    def listing(self) -> Path:
        return self.out / PLAN_DIR / LISTING_FILE

    @property
    def fingerprint(self) -> dict[str, Any]:
        return self.record["fingerprint"]

    def ids(self, r: int) -> tuple[int, int]:
        """The input ids [lo, hi) of range r."""
        self.check_range(r)
        lo = r * self.range_size
        return lo, min(lo + self.range_size, self.n_inputs)

    def shards(self, r: int) -> list[int]:
        lo, hi = self.ids(r)
        return list(range(lo // self.shard_size, -(-hi // self.shard_size)))

    def check_range(self, r: int) -> None:
        if not 0 <= r < self.n_ranges:
            raise ConfigError(f"range {r} does not exist: the plan in {self.out} has {self.n_ranges} range(s), "
                              f"0..{self.n_ranges - 1} (--range)")


def plan_path(out: str | os.PathLike) -> Path:
    return Path(out) / PLAN_DIR / PLAN_FILE


def load_plan(out: str | os.PathLike) -> Plan:
    """The plan of a cluster output directory, or ConfigError saying how to make one."""
    import json

    p = plan_path(out)
    try:
        record = json.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{out} holds no cluster plan ({p} is missing): run `clip-pipeline plan` with the same "
                          "config and --output first") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the cluster plan {p}: {exc}") from None
    if record.get("format") != PLAN_FORMAT:
        raise ConfigError(f"{p} is not a clip-pipeline plan (format {record.get('format')!r})")
    return Plan(Path(out), record)


def identity(cfg: Config, log=print) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model identity, fingerprint) of a config on this host: builds a missing synthetic model
    (model.build), raises ConfigError for a missing model file."""
    from pipeline.backends import get_backend
    from pipeline.config import validate_for_run
    from pipeline.model.models import ensure_model
    from pipeline.run.preflight import fingerprint

    validate_for_run(cfg)
    ensure_model(cfg, log=log)
    model = get_backend(cfg.infer.backend).model_identity(cfg)
    return model, fingerprint(cfg, model)


def fingerprint_diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def write_listing(cfg: Config, dst: Path, warn=lambda m: None) -> tuple[int, str]:
    """Walk the inputs (the source stage's order) into dst; return (count, sha256 of the file)."""
    from pipeline.data.listing import config_inputs

    tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:8]}.tmp")
    h = hashlib.sha256()
    n = 0
    try:
        with open(tmp, "wb") as fh:
            buf: list[bytes] = []
            for path in config_inputs(cfg, warn):  # input.paths, input.list, tar shards
                line = rundir.listing_line(path)
                buf.append(line)
                n += 1
                if len(buf) >= 4096:
                    data = b"".join(buf)
                    h.update(data)
                    fh.write(data)
                    buf.clear()
            data = b"".join(buf)
            h.update(data)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, dst)
    return n, h.hexdigest()


def make_plan(cfg: Config, range_shards: int, *, log=print, warn=None) -> tuple[Plan, bool]:
    """Write (or re-check) the plan of cfg's output directory. Returns (plan, created).

    An existing plan is reused when the model, preprocessing, shard size, range size and the
    listing (by sha256) are the same; anything else is refused with one line naming what differs.
    """
    import json

    if range_shards < 1:
        raise ConfigError(f"config key cluster.range_shards must be >= 1, got {range_shards}")
    out = Path(cfg.output.dir)
    model, fp = identity(cfg, log=log)
    shard_size = cfg.output.shard_size
    warn = warn or (lambda m: log(f"warning: {m}"))
    if plan_path(out).exists():
        plan = load_plan(out)
        diff = fingerprint_diff(plan.fingerprint, fp)
        if diff:
            raise ConfigError(f"output directory {out} holds a cluster plan made with a different {', '.join(diff)}; "
                              "mixing them would mix embeddings. Choose another --output, or pass --restart to delete it")
        if int(plan.record["range_shards"]) != range_shards:
            raise ConfigError(f"output directory {out} holds a plan with cluster.range_shards = "
                              f"{plan.record['range_shards']}, not {range_shards}: keep the planned value or pass --restart")
        tmp = out / PLAN_DIR / f".relist-{uuid.uuid4().hex[:8]}.jsonl"
        try:
            n, sha = write_listing(cfg, tmp, warn)
        finally:
            tmp.unlink(missing_ok=True)
        if sha != plan.record["listing_sha256"]:
            raise ConfigError(f"the inputs changed since the plan in {out} was made ({plan.n_inputs} inputs then, {n} now; "
                              "listing sha256 differs): ranges would shift. Restore the inputs, or pass --restart to plan again")
        return plan, False
    if out.exists() and any(p.name != LOCK for p in out.iterdir()):
        what = "a single-host run (manifest.json)" if RunDir(out).manifest.exists() else "other files"
        raise ConfigError(f"output directory {out} is not empty: it holds {what}, not a cluster plan; "
                          "choose a new or empty directory (config key output.dir / --output) or pass --restart")
    try:
        (out / PLAN_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"output directory {out} is not writable: {exc.strerror or exc} "
                          "(config key output.dir / --output)") from None
    t0 = time.monotonic()
    n, sha = write_listing(cfg, out / PLAN_DIR / LISTING_FILE, warn)
    range_size = range_shards * shard_size
    record = {
        "format": PLAN_FORMAT,
        "run_id": uuid.uuid4().hex,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "listing": f"{PLAN_DIR}/{LISTING_FILE}",
        "listing_sha256": sha,
        "inputs": n,
        "shard_size": shard_size,
        "range_shards": range_shards,
        "range_size": range_size,
        "ranges": -(-n // range_size),
        "fingerprint": fp,
        "model": model,
        "preprocess": {"mode": cfg.preprocess.mode, "exif_transpose": cfg.preprocess.exif_transpose,
                       "normalize": cfg.output.normalize, "dtype": cfg.output.dtype},
        "config": cfg.to_dict(),
        "listing_s": round(time.monotonic() - t0, 3),
    }
    rundir.atomic_write_bytes(plan_path(out), (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
    rundir.fsync_dir(out / PLAN_DIR)
    return Plan(out, record), True
