"""Checks made before a run starts its workers, shared by `run` and `run --dry-run`.

Everything here only reads: the dry run calls exactly these checks, so it refuses what the real
run refuses (same message, same exit status) and warns about what the real run warns about.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.data.rundir import LOCK, DamagedRun, RunDir, expected_shards, looks_like_run, manifest_missing
from pipeline.wire import pathcodec

# fingerprint field (manifest.json) -> the config key a user changes to change it
FINGERPRINT_KEYS = {
    "model_sha256": "model.path",
    "backend": "infer.backend",
    "sail_mode": "sail.mode",
    "precision": "openvino.precision",
    "calibration": "openvino.calibration / openvino.calibration_count",
    "preprocess_mode": "preprocess.mode",
    "exif_transpose": "preprocess.exif_transpose",
    "normalize": "output.normalize",
    "dtype": "output.dtype",
    "shard_size": "output.shard_size",
    "inputs": "input.paths",
    "extensions": "input.extensions",
    "recursive": "input.recursive",
    "follow_symlinks": "input.follow_symlinks",
    "list": "input.list",
    "list_column": "input.list_column",
    "tar": "input.tar",
}


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def device_warnings(cfg: Config, devices: list[Any], cores: int | None = None) -> list[str]:
    """The cpu (and openvino) backend runs one inference process per device with infer.threads threads each;
    more threads than usable cores oversubscribe the CPU (slower, not faster). cpu:N names a
    process, not a core (nothing is pinned), so cpu:5 on a 2-core machine is worth a word too."""
    if cfg.infer.backend not in ("cpu", "openvino"):
        return []
    cores = cores or usable_cores()
    out = []
    threads = len(devices) * cfg.infer.threads
    if threads > cores:
        out.append(f"infer.devices lists {len(devices)} cpu device(s) x infer.threads = {cfg.infer.threads}: "
                   f"{threads} inference threads on {cores} usable core(s) oversubscribe the CPU (slower, not faster); "
                   f"use at most {cores} device(s) x threads (infer.devices = \"all\" gives one per core)")
    beyond = [d for d in devices if str(d).startswith("cpu:") and str(d)[4:].isdigit() and int(str(d)[4:]) >= cores]
    if beyond:
        out.append(f"infer.devices names {', '.join(map(str, beyond))} but this machine has {cores} usable core(s) "
                   f"(cpu:0..cpu:{cores - 1}); cpu:N names an inference process, not a core (nothing is pinned)")
    return out


def fingerprint(cfg: Config, model: dict[str, Any]) -> dict[str, Any]:
    """What must not change between an interrupted run and its resume. `inputs` are the roots
    actually walked (overlapping entries of input.paths dropped), so repeating an --input that
    changes nothing is not a different run."""
    from pipeline.backends import get_backend
    from pipeline.data.listing import dedupe_roots

    backend = get_backend(cfg.infer.backend)
    cfg = backend.resolve(cfg)  # e.g. openvino.precision "auto" -> what it means here
    exts = frozenset(e.lower().encode() for e in cfg.input.extensions)
    roots = [os.fsdecode(r) for r in dedupe_roots(cfg.input.paths, exts, cfg.input.recursive)]
    return {
        "model_sha256": model.get("sha256"),
        "backend": cfg.infer.backend,
        "sail_mode": cfg.sail.mode if cfg.infer.backend == "sail" else None,
        # the backend's own (openvino: precision, int8's calibration); none for the others, as before
        **backend.fingerprint_fields(cfg),
        "preprocess_mode": cfg.preprocess.mode,
        "exif_transpose": cfg.preprocess.exif_transpose,
        "normalize": cfg.output.normalize,
        "dtype": cfg.output.dtype,
        "shard_size": cfg.output.shard_size,
        "inputs": roots,
        "extensions": sorted(cfg.input.extensions),
        "recursive": cfg.input.recursive,
        "follow_symlinks": cfg.input.follow_symlinks,
        **({"list": cfg.input.list, "list_column": cfg.input.list_column} if cfg.input.list else {}),
        **({} if cfg.input.tar else {"tar": False}),
    }



# -- an existing run in the output directory ---------------------------------------------------------

def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def fingerprint_refusal(out: str | os.PathLike, old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """The refusal to resume a run whose embeddings would differ, naming config keys; None if equal."""
    if old == new:
        return None
    parts = []
    for name in sorted(set(old) | set(new), key=lambda f: FINGERPRINT_KEYS.get(f, f)):
        was, now = old.get(name), new.get(name)
        if was == now:
            continue
        key = FINGERPRINT_KEYS.get(name, name)
        if name == "model_sha256":
            parts.append(f"{key} (a model with sha256 {str(was)[:12]} there, {str(now)[:12]} now)")
        else:
            parts.append(f"{key} ({_short(was)} there, {_short(now)} now)")
    return (f"output directory {out} holds a run made with a different {'; '.join(parts)}: resuming would mix "
            "embeddings. Pass --restart to delete it and start over, or choose another --output")


def model_refusal_before_build(cfg: Config, out: str | os.PathLike, manifest: dict[str, Any]) -> str | None:
    """A model that does not exist yet and would be built (model.build) is refused *before* it is
    built when the existing run's model cannot be what the build makes (same builder, arch, seed
    and input kind give the same bytes; anything else gives another sha256)."""
    if os.path.exists(cfg.model.path) or not cfg.model.build or cfg.infer.backend in ("sail", "sim", "fake"):
        return None
    from pipeline.model.modelgen import BUILDER

    old = manifest.get("model") or {}
    info = old.get("info") or {}
    same = (info.get("synthetic") and info.get("builder") == BUILDER and info.get("arch") == cfg.model.build
            and info.get("seed") == cfg.model.seed and info.get("input_kind", "float") == "float")
    if same:
        return None
    was = old.get("path") or "?"
    return (f"output directory {out} holds a run made with a different model.path ({was} there, sha256 "
            f"{str(old.get('sha256'))[:12]}; now {cfg.model.path}, which does not exist and would be built as a "
            f"synthetic {cfg.model.build} with seed {cfg.model.seed}): resuming would mix embeddings. Nothing was built. "
            "Pass --restart to delete it and start over, or choose another --output")


def describe_run(manifest: dict[str, Any], done_shards: list[int]) -> str:
    """One line on the state of an existing run: complete or interrupted, shards, inputs."""
    status = manifest.get("status", "?")
    counts = manifest.get("counts") or {}
    inputs = manifest.get("inputs") or {}
    shard_size = manifest.get("shard_size") or (manifest.get("fingerprint") or {}).get("shard_size") or 1
    total = counts.get("total")
    listed = inputs.get("listed", 0)
    complete_listing = bool(inputs.get("listing_complete")) and total is not None
    expected = expected_shards({**manifest, "shard_size": shard_size})  # with every update's shards
    shards = f"{len(done_shards)} of {len(expected)} shards" if expected is not None else f"{len(done_shards)} shard(s)"
    if status == "complete" and expected is not None and set(expected) <= set(done_shards):
        return (f"complete: {shards}, {total} inputs ({counts.get('embedded', 0)} embedded, "
                f"{counts.get('failed', 0)} failed)")
    state = {"running": "interrupted (the process was killed: status was still 'running')",
             "interrupted": "interrupted", "failed": f"aborted ({manifest.get('error', 'see report.json')})"}.get(
                 status, status)
    listing = f"{total} inputs listed" if complete_listing else f"listing not finished ({listed} inputs so far)"
    return f"{state}: {shards} complete, {listing}"


# -- inputs added or removed since a run listed them ------------------------------------------------

@dataclass
class InputChanges:
    added: int = 0
    removed: int = 0
    first_added: list[bytes] = field(default_factory=list)
    first_removed: list[bytes] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.added or self.removed)

    def summary(self) -> str:
        def some(paths: list[bytes], n: int) -> str:
            shown = ", ".join(pathcodec.encode(p) for p in paths)
            return f" ({shown}{', ...' if n > len(paths) else ''})" if paths else ""

        return (f"{self.added} input(s) added{some(self.first_added, self.added)} and {self.removed} removed"
                f"{some(self.first_removed, self.removed)}")


def _root_index(path: bytes, roots: list[bytes]) -> int:
    """Which root a listed path came from (the longest root that prefixes it)."""
    best, best_len = len(roots), -1
    for i, r in enumerate(roots):
        r = r.rstrip(b"/")
        if (path == r or path.startswith(r + b"/")) and len(r) > best_len:
            best, best_len = i, len(r)
    return best


def compare_inputs(listed: Callable[[], Iterable[bytes]], walked: Callable[[], Iterable[bytes]],
                   roots: list[bytes], keep: int = 3) -> InputChanges:
    """Inputs added and removed between a run's listing and a fresh walk of its roots.

    Both are in walk order: roots in input.paths order, each root's files in byte order of their
    full paths (pipeline/data/listing.py), so one merge pass by (root, path) finds the differences in
    constant memory. `listed` and `walked` are callables giving fresh iterators: should either
    sequence turn out not to be in that order (a listing written by an older version), they are
    read again and compared as sets.
    """
    def key(p: bytes) -> tuple[int, bytes]:
        return _root_index(p, roots), p

    ch = InputChanges()

    def add(added: bool, p: bytes) -> None:
        if added:
            ch.added += 1
            if len(ch.first_added) < keep:
                ch.first_added.append(p)
        else:
            ch.removed += 1
            if len(ch.first_removed) < keep:
                ch.first_removed.append(p)

    a_it, b_it = iter(listed()), iter(walked())
    a, b = next(a_it, None), next(b_it, None)
    last_a = last_b = None
    while a is not None or b is not None:
        ka = key(a) if a is not None else None
        kb = key(b) if b is not None else None
        if (ka is not None and last_a is not None and ka <= last_a) or \
                (kb is not None and last_b is not None and kb <= last_b):
            return _compare_sets(listed, walked, keep)
        if kb is None or (ka is not None and ka < kb):
            add(False, a)
            last_a, a = ka, next(a_it, None)
        elif ka is None or kb < ka:
            add(True, b)
            last_b, b = kb, next(b_it, None)
        else:
            last_a, last_b = ka, kb
            a, b = next(a_it, None), next(b_it, None)
    return ch


def _compare_sets(listed: Callable[[], Iterable[bytes]], walked: Callable[[], Iterable[bytes]],
                  keep: int) -> InputChanges:
    old, new = set(listed()), set(walked())
    added, removed = sorted(new - old), sorted(old - new)
    return InputChanges(len(added), len(removed), added[:keep], removed[:keep])


# -- every check before the workers start ---------------------------------------------------------------

@dataclass
class Preflight:
    """What the pre-start checks found (they raise ConfigError for anything the run refuses)."""

    devices: list[Any]
    warnings: list[str]
    manifest: dict[str, Any] | None = None  # the existing run's (None: a new or empty output dir)
    state: str | None = None                # describe_run of the existing run
    changes: InputChanges | None = None     # inputs added/removed since the existing run listed them
    model: dict[str, Any] | None = None     # model identity, when the model exists already
    fingerprint: dict[str, Any] | None = None
    cfg: Config | None = None               # the config with what the backend resolves (Backend.resolve)


def foreign_dir_refusal(out: Path) -> str:
    return (f"output directory {out} is not empty and holds no clip-pipeline run; "
            "choose a new or empty directory (config key output.dir / --output)")


def on_existing_refusal(out: Path) -> str:
    return (f"output directory {out} already holds a run (output.on_existing = 'error'); "
            "choose another --output or pass --restart")


def input_changes(cfg: Config, listing: Path, warn: Callable[[str], None] = lambda m: None) -> InputChanges:
    """Re-walk the input roots and compare with the run's listing (cheap: names only, no reads)."""
    from pipeline.data.listing import config_inputs, dedupe_roots, read_listing
    from pipeline.data.rundir import recorded_inputs, records

    exts = frozenset(e.lower().encode() for e in cfg.input.extensions)
    roots = dedupe_roots(cfg.input.paths, exts, cfg.input.recursive)
    out = listing.parent
    # after run --update: every listing (updates append out of walk order: compared as sets), less
    # the inputs an update already recorded as removed
    listed = (lambda: recorded_inputs(out)) if records(out) else (lambda: read_listing(str(listing)))
    return compare_inputs(listed, lambda: config_inputs(cfg, warn), roots)


def writable_refusal(out: Path) -> str | None:
    """The run creates OUT (with its parents) and writes into it: refuse now what that would refuse,
    in RunDir.prepare's words, without writing anything."""
    p = out
    while not os.path.lexists(p) and p.parent != p:
        p = p.parent
    if not p.is_dir():
        why = os.strerror(errno.ENOTDIR)
    elif not os.access(p, os.W_OK | os.X_OK):
        why = os.strerror(errno.EACCES)
    else:
        return None
    return f"output directory {out} is not writable: {why} (config key output.dir / --output)"


def check(cfg: Config, *, out: str | os.PathLike | None = None, restart: bool = False,
          compare_inputs_with_listing: bool = True) -> Preflight:
    """Every check `run` makes before it builds a model or starts a worker, on the directory the
    run writes into (`out`; cfg.output.dir, the configured output, unless given); reads only.

    Raises ConfigError (exit 2) with the message the run would give: invalid inputs or devices,
    an output directory that is not a run, output.on_existing = 'error', a model to be built that
    cannot match the existing run's, a fingerprint that differs from the existing run's, an output
    directory that cannot be created or written.
    """
    from pipeline.backends import get_backend
    from pipeline.config import ConfigError, validate_for_run

    out = Path(cfg.output.dir if out is None else out)
    validate_for_run(cfg, out)
    backend = get_backend(cfg.infer.backend)
    devices = backend.resolve_devices(cfg)
    cfg = backend.resolve(cfg)
    pf = Preflight(devices=devices, warnings=device_warnings(cfg, devices), cfg=cfg)
    rd = RunDir(out)
    restarting = restart or cfg.output.on_existing == "restart"
    try:
        manifest = rd.read_manifest() if out.is_dir() else None
    except DamagedRun:
        if not restarting:
            raise
        manifest = None  # --restart deletes it with the rest
    if manifest is None:
        if out.is_dir() and looks_like_run(out) and not restarting:
            raise manifest_missing(out)
        if out.is_dir() and not looks_like_run(out) and any(p.name != LOCK for p in out.iterdir()):
            raise ConfigError(foreign_dir_refusal(out))
        refusal = writable_refusal(out)
        if refusal:
            raise ConfigError(refusal)
        return pf
    pf.manifest = manifest
    pf.state = describe_run(manifest, rd.completed_shards())
    if restart or cfg.output.on_existing == "restart":
        refusal = writable_refusal(out)
        if refusal:
            raise ConfigError(refusal)
        return pf
    if cfg.output.on_existing == "error":
        raise ConfigError(on_existing_refusal(out))
    refusal = model_refusal_before_build(cfg, out, manifest)
    if refusal:
        raise ConfigError(refusal)
    old_fp = manifest.get("fingerprint") or {}
    if cfg.infer.backend == "fake" or os.path.exists(cfg.model.path):
        pf.model = backend.model_identity(cfg)
        pf.fingerprint = fingerprint(cfg, pf.model)
    else:
        # the model is yet to be built, as the run's was (model_refusal_before_build let it through):
        # same bytes, so every other key is compared now, before the build
        pf.fingerprint = fingerprint(cfg, {"sha256": old_fp.get("model_sha256")})
    refusal = fingerprint_refusal(out, old_fp, pf.fingerprint) or writable_refusal(out)
    if refusal:
        raise ConfigError(refusal)
    listing = rd.listing
    if compare_inputs_with_listing and (manifest.get("inputs") or {}).get("listing_complete") and listing.exists():
        pf.changes = input_changes(cfg, listing)
    return pf


def changes_note(changes: InputChanges, complete: bool) -> str:
    """What a re-run says about inputs added or removed since the run listed them."""
    what = "this output" if complete else "this run, which resumes the listing as it was,"
    return (f"since this run listed its inputs, {changes.summary()}: {what} does not include the added ones"
            f"{' and keeps the rows of the removed ones' if complete and changes.removed else ''}. "
            + ("To embed only the new ones: the same command with --update (incremental; the output must be "
               "complete); or --restart (embeds everything again)" if complete else
               "Let this run finish, then run it again with --update to embed only the new ones; or --restart "
               "(embeds everything again)"))
