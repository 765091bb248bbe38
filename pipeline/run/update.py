"""`clip-pipeline run --update`: embed only the inputs that are new since a finished run.

The finished output is never rewritten: existing shards, rows and ids stay as they are. An update

1. reads every input the output already lists (`listing.jsonl`, then each earlier update's
   listing), walks the inputs of the current config, and splits them into *new* (not listed yet,
   in walk order) and *removed* (listed, gone now);
2. with `output.content_hash` (the run recorded a fast hash per row in `part-NNNNN.hashes`), drops
   the new names whose bytes equal an embedded row (a renamed or copied file): each is recorded as
   an alias of that row instead of being embedded again;
3. embeds the new inputs as an ordinary run over a file list in `OUT/updates/.u-NNNN/` (resumable:
   the same command again continues it);
4. publishes its shards after the existing ones: update shard j becomes `part-(K+j)` where K is one
   past the last existing shard, so its ids are `K*shard_size + j` (the ids between the last old
   input and `K*shard_size` are unused); failure records get those ids; `.npy`, `.paths`,
   `.parquet` and `.hashes` move unchanged, the `.npy` last. The update's record
   (`OUT/updates/u-NNNN.json`: first shard, first id, counts; its listing `u-NNNN.jsonl`, the
   removed inputs `u-NNNN.removed.jsonl`, the aliases `u-NNNN.aliases.jsonl`) is written before the
   first shard moves and marked published after the last: it is the journal of the publish
   (RunDir.publish_update, every step idempotent), so a publish that died is finished by the next
   run over the output, `--update` or not (RunDir.finish_updates);
5. refreshes the run's files (failures.jsonl, the metadata layout, the pickle, the manifest, whose
   counts and shards include every update: RunDir.publish), and adds the update's report to
   report.json's runs.

`load_embeddings`, `iter_shards`, `inspect` and search read every shard, so they see old and new
rows together. `pipeline.output.listed_inputs(out)` gives every listed input with its id.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from pipeline.config import Config, ConfigError
from pipeline.data.inputs import hash_input
from pipeline.data.rundir import RunDir, atomic_write_bytes, atomic_write_json, output_lock, records, shard_name
from pipeline.wire import pathcodec

INPUT_KEYS = {"inputs", "extensions", "recursive", "follow_symlinks", "list", "list_column", "tar"}


def _refuse_other_fingerprint(out: Path, old: dict, new: dict) -> None:
    diff = sorted(k for k in (set(old) | set(new)) - INPUT_KEYS if old.get(k) != new.get(k))
    if diff:
        raise ConfigError(f"output directory {out} was made with a different {', '.join(diff)}: an update would "
                          "mix embeddings. Use the run's own model and preprocessing, or --restart")


@dataclass
class Changes:
    """What changed since the output listed its inputs."""

    new: list[bytes] = field(default_factory=list)  # to embed, in walk order
    removed: list[bytes] = field(default_factory=list)
    aliases: list[dict] = field(default_factory=list)  # new names with the content of an embedded row


def run_update(cfg: Config, *, progress=None, log: Callable[[str], None] = print):
    """Embed what is new since the finished run in cfg.output.dir; returns a RunResult. Holds the
    output's lock throughout (rundir.output_lock)."""
    rd = RunDir(cfg.output.dir)
    if not rd.manifest.is_file():
        raise ConfigError(f"--update needs a finished run in {rd} (no run manifest there): run without --update first "
                          "(config key output.dir / --output)")
    with output_lock(rd.path, "run --update"):
        return _run_update(cfg, rd, progress=progress, log=log)


def _run_update(cfg: Config, rd: RunDir, *, progress=None, log: Callable[[str], None] = print):
    from pipeline.run.finish import EXIT_SUCCESS, EXIT_WITH_FAILURES, RunResult

    manifest = _check_update(cfg, rd, log)
    rd.updates_dir.mkdir(exist_ok=True)
    if rd.finish_updates(manifest, log):  # an interrupted publish: its moves are done, now the run's files
        manifest = _refresh_run(cfg, rd, manifest)
    ch = _changes(cfg, rd, log)
    n = len(records(rd.path)) + 1
    rec = {"update": n, **{k: rd.update_file(n, k).name for k in ("listing", "removed", "aliases", "attempt")},
           "shard_size": cfg.output.shard_size, "added": len(ch.new), "removed_count": len(ch.removed),
           "aliased": len(ch.aliases), "published": False}
    if not ch.new:
        msg = _record_only(rd, rec, ch)
        if rec["published"]:  # removed or aliased inputs recorded: the manifest lists every update
            _refresh_run(cfg, rd, manifest)
        return RunResult(EXIT_SUCCESS, msg, {"embedded": 0, "failed": 0, "total": 0}, str(rd))
    attempt = RunDir(rd.update_file(n, "attempt"))
    result = _embed(cfg, rd, n, ch.new, attempt, progress)
    if result.exit_code not in (EXIT_SUCCESS, EXIT_WITH_FAILURES):
        return RunResult(result.exit_code, f"{result.message} (the update of {rd}; run the same --update again)",
                         result.counts, str(rd))
    k0 = _next_shard(rd)
    rec.update(first_shard=k0, first_id=k0 * cfg.output.shard_size, embedded=result.counts.get("embedded", 0),
               failed=result.counts.get("failed", 0))
    shutil.copyfile(attempt.listing, rd.update_file(n, "listing"))
    _write_changes(rd, rec, ch)
    report = _attempt_report(attempt, n)
    atomic_write_json(rd.update_file(n, "record"), rec)  # the journal: before the first shard moves
    rd.publish_update(rec, attempt)
    _refresh_run(cfg, rd, manifest, report)
    k1 = _next_shard(rd) - 1
    shards = f"shard {shard_name(k0)}" if k1 == k0 else f"shards {shard_name(k0)}..{shard_name(k1)}"
    msg = (f"Updated {rd}: {rec['embedded']} new input(s) embedded into {shards}, {rec['failed']} failed, "
           f"{len(ch.removed)} removed since"
           + (f" (recorded in {rd.update_file(n, 'removed')})" if ch.removed else "")
           + (f", {len(ch.aliases)} skipped as the content of an embedded input" if ch.aliases else "") + ".")
    return RunResult(EXIT_WITH_FAILURES if rec["failed"] else EXIT_SUCCESS, msg,
                     {"embedded": rec["embedded"], "failed": rec["failed"], "total": len(ch.new)}, str(rd))


def _check_update(cfg: Config, rd: RunDir, log: Callable[[str], None]) -> dict:
    """The finished run's manifest, once the config is checked to make the same embeddings
    (ConfigError saying what to do otherwise; the model is built if needed)."""
    from pipeline.backends import get_backend
    from pipeline.config import validate_for_run
    from pipeline.model.models import ensure_model
    from pipeline.run.preflight import fingerprint

    manifest = rd.read_manifest() if rd.path.is_dir() else None
    if manifest is None:
        raise ConfigError(f"--update needs a finished run in {rd} (no run manifest there): run without --update first "
                          "(config key output.dir / --output)")
    if manifest.get("status") != "complete":
        raise ConfigError(f"the run in {rd} is {manifest.get('status')}, not complete: run the same command without "
                          "--update to finish it first, then --update")
    validate_for_run(cfg)
    ensure_model(cfg, log=log)
    model = get_backend(cfg.infer.backend).model_identity(cfg)
    _refuse_other_fingerprint(rd.path, manifest.get("fingerprint") or {}, fingerprint(cfg, model))
    return manifest


def _changes(cfg: Config, rd: RunDir, log: Callable[[str], None]) -> Changes:
    """The config's inputs against every input the output lists (walk order kept)."""
    from pipeline.data.listing import config_inputs
    from pipeline.data.rundir import listed_inputs, recorded_inputs

    warnings: list[str] = []
    listed = {p for _i, p in listed_inputs(rd.path)}
    current: list[bytes] = []
    current_set: set[bytes] = set()
    for p in config_inputs(cfg, warnings.append):
        if p not in current_set:
            current_set.add(p)
            current.append(p)
    for w in warnings:
        log(f"warning: {w}")
    ch = Changes([p for p in current if p not in listed], [p for p in recorded_inputs(rd.path) if p not in current_set])
    if cfg.output.content_hash and ch.new:
        known = _embedded_hashes(rd)
        keep = []
        for p in ch.new:
            h = hash_input(p)
            if h is not None and h in known:
                ch.aliases.append({"path": pathcodec.encode(p), "same_as": known[h], "hash": h})
            else:
                keep.append(p)
        ch.new = keep
    return ch


def _write_changes(rd: RunDir, rec: dict, ch: Changes) -> None:
    """The update's removed and aliases files (its listing comes from its run)."""
    n = rec["update"]
    atomic_write_bytes(rd.update_file(n, "removed"), b"".join(pathcodec.encode(p).encode() + b"\n" for p in ch.removed))
    atomic_write_bytes(rd.update_file(n, "aliases"), b"".join(json.dumps(a).encode() + b"\n" for a in ch.aliases))


def _record_only(rd: RunDir, rec: dict, ch: Changes) -> str:
    """Nothing to embed: record what was removed or aliased, if anything; the message."""
    n = rec["update"]
    if ch.removed or ch.aliases:
        _write_changes(rd, rec, ch)
        atomic_write_bytes(rd.update_file(n, "listing"), b"")
        k = _next_shard(rd)
        rec.update(first_shard=k, first_id=k * rec["shard_size"], embedded=0, failed=0, published=True)
        atomic_write_json(rd.update_file(n, "record"), rec)
    return (f"Nothing new to embed in {rd}: {len(ch.removed)} input(s) removed since"
            + (f" (recorded in {rd.update_file(n, 'removed')})" if ch.removed else "")
            + (f", {len(ch.aliases)} new name(s) with the content of an embedded input" if ch.aliases else "") + ".")


def _embed(cfg: Config, rd: RunDir, n: int, new: list[bytes], attempt: RunDir, progress):
    """The new inputs as an ordinary, resumable run over a file list, in the update's attempt
    directory (started over if it holds an interrupted update of other inputs)."""
    from pipeline.run.attempt import run_into

    list_file = rd.update_file(n, "list")
    lines = b"".join(pathcodec.encode(p).encode() + b"\n" for p in new)
    if attempt.path.exists() and (not list_file.exists() or list_file.read_bytes() != lines):
        shutil.rmtree(attempt.path)
    atomic_write_bytes(list_file, lines)
    inputs = replace(cfg.input, paths=(), list=str(list_file), list_column="path")
    return run_into(cfg, attempt.path, inputs=inputs, layout="native", progress=progress)


def _attempt_report(attempt: RunDir, n: int) -> dict | None:
    """The update run's report.json (its last run), marked as update n, for the output's report."""
    try:
        rep = json.loads(attempt.report.read_text())
    except (OSError, ValueError):
        return None
    return {**{k: v for k, v in rep.items() if k != "history"}, "update": n}


def _next_shard(rd: RunDir) -> int:
    done = rd.completed_shards()
    return done[-1] + 1 if done else 0


def _embedded_hashes(rd: RunDir) -> dict[str, str]:
    """content hash -> the path (text form) of the embedded row that has it, over every shard."""
    from pipeline.data.rundir import HASHES_SUFFIX, decode_path_line

    known: dict[str, str] = {}
    for k in rd.completed_shards():
        h = rd.shard_companion(k, HASHES_SUFFIX)
        if not h.exists():
            continue
        for line, p in zip(h.read_text().splitlines(), rd.shard_paths(k).read_bytes().splitlines()):
            if line:
                known.setdefault(line, decode_path_line(p))
    return known


def _refresh_run(cfg: Config, rd: RunDir, manifest: dict, report: dict | None = None) -> dict:
    """The run-level files after new shards (RunDir.publish: failures, metadata layout, pickle, the
    manifest with the updates' counts and shards), and the update's report among the runs."""
    if report is not None:
        rd.write_report(report)
    updated = rd.update_shards()
    own = [k for k in rd.completed_shards() if k not in updated]
    rows = sum(rd.shard_counts(k)[0] for k in own)
    failed = sum(rd.shard_counts(k)[1] for k in own)
    new = rd.manifest_of(
        status="complete", created=manifest.get("created"), fingerprint=manifest.get("fingerprint"),
        config=manifest.get("config"), devices=manifest.get("devices"), model=manifest.get("model") or {},
        listed=manifest.get("inputs", {}).get("listed"), listing_complete=True,
        counts={"embedded": rows, "failed": failed, "total": rows + failed}, shards=own,
        shard_size=manifest.get("shard_size"), **{k: manifest[k] for k in ("range", "cluster") if k in manifest})
    o = cfg.output
    rd.publish(new, metadata=o.metadata, layout=o.layout, pickle=o.pickle)
    return new
