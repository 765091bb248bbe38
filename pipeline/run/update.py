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
   first shard moves and marked published after the last, so an interrupted publish is finished by
   the next `--update`.

`load_embeddings`, `iter_shards`, `inspect` and search read every shard, so they see old and new
rows together. `output.listed_inputs(out)` gives every listed input with its id.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from pipeline import output
from pipeline.config import Config, ConfigError
from pipeline.data import rundir
from pipeline.data.inputs import hash_input
from pipeline.data.rundir import HASHES_SUFFIX, PARQUET_SUFFIX, UPDATES, listed_inputs, records, update_files
from pipeline.wire import pathcodec

INPUT_KEYS = {"inputs", "extensions", "recursive", "follow_symlinks", "list", "list_column", "tar"}


def _refuse_other_fingerprint(out: Path, old: dict, new: dict) -> None:
    diff = sorted(k for k in (set(old) | set(new)) - INPUT_KEYS if old.get(k) != new.get(k))
    if diff:
        raise ConfigError(f"output directory {out} was made with a different {', '.join(diff)}: an update would "
                          "mix embeddings. Use the run's own model and preprocessing, or --restart")


def _write_lines(path: Path, lines: list[bytes]) -> None:
    output.atomic_write_bytes(path, b"".join(lines))


def _move(src: Path, dst: Path) -> None:
    if src.exists():
        os.replace(src, dst)


def _publish(out: Path, attempt: Path, rec: dict) -> None:
    """Move the attempt's shards after the existing ones (idempotent: a re-run finishes it)."""
    src, dst = attempt / output.EMB_DIR, out / output.EMB_DIR
    k0, first_id, size = rec["first_shard"], rec["first_id"], rec["shard_size"]
    for j in output.completed_shards(attempt) if attempt.exists() else []:
        a, b = output.shard_name(j), output.shard_name(k0 + j)
        fails = (src / f"{a}{rundir.FAILURES_SUFFIX}").read_text().splitlines()
        shifted = []
        for line in fails:
            if line:
                f = json.loads(line)
                f["id"] += first_id
                shifted.append(json.dumps(f, sort_keys=True).encode() + b"\n")
        data = b"".join(shifted)
        output.atomic_write_bytes(dst / f"{b}{rundir.FAILURES_SUFFIX}", data)
        check = src / f"{a}{rundir.CHECK_SUFFIX}"
        if check.exists():  # the integrity record follows the rewritten failures file
            rec_check = json.loads(check.read_text())
            rec_check.setdefault("files", {})[rundir.FAILURES_SUFFIX] = rundir.file_check(data)
            output.atomic_write_bytes(check, (json.dumps(rec_check, sort_keys=True) + "\n").encode())
        for suffix in (rundir.PATHS_SUFFIX, PARQUET_SUFFIX, HASHES_SUFFIX, rundir.CHECK_SUFFIX):
            _move(src / f"{a}{suffix}", dst / f"{b}{suffix}")
        _move(src / f"{a}{rundir.NPY_SUFFIX}", dst / f"{b}{rundir.NPY_SUFFIX}")  # last: the shard is complete from here
        assert first_id + j * size == (k0 + j) * size
    output.fsync_dir(dst)


def next_shard(out: Path) -> int:
    done = output.completed_shards(out)
    return done[-1] + 1 if done else 0


def run_update(cfg: Config, *, progress=None, log: Callable[[str], None] = print):
    """Embed what is new since the finished run in cfg.output.dir; returns a RunResult. Holds the
    output's lock throughout (rundir.output_lock)."""
    out = Path(cfg.output.dir)
    if not (out / rundir.MANIFEST).is_file():
        raise ConfigError(f"--update needs a finished run in {out} (no run manifest there): run without --update first "
                          "(config key output.dir / --output)")
    with rundir.output_lock(out, "run --update"):
        return _run_update(cfg, progress=progress, log=log)


def _run_update(cfg: Config, *, progress=None, log: Callable[[str], None] = print):
    from pipeline.backends import get_backend
    from pipeline.model.models import ensure_model
    from pipeline.run.preflight import fingerprint
    from pipeline.run.supervisor import EXIT_SUCCESS, EXIT_WITH_FAILURES, RunResult, Supervisor
    from stages.source import config_inputs

    out = Path(cfg.output.dir)
    manifest = output.read_manifest(out) if out.is_dir() else None
    if manifest is None:
        raise ConfigError(f"--update needs a finished run in {out} (no run manifest there): run without --update first "
                          "(config key output.dir / --output)")
    if manifest.get("status") != "complete":
        raise ConfigError(f"the run in {out} is {manifest.get('status')}, not complete: run the same command without "
                          "--update to finish it first, then --update")
    from pipeline.config import validate_for_run

    validate_for_run(cfg)
    ensure_model(cfg, log=log)
    model = get_backend(cfg.infer.backend).model_identity(cfg)
    fp = fingerprint(cfg, model)
    _refuse_other_fingerprint(out, manifest.get("fingerprint") or {}, fp)
    size = cfg.output.shard_size
    (out / UPDATES).mkdir(exist_ok=True)

    pending = [r for r in records(out) if not r.get("published")]
    if pending:  # an interrupted publish: finish it first
        rec = pending[0]
        _publish(out, out / UPDATES / rec["attempt"], rec)
        _finish_record(out, rec)

    warnings: list[str] = []
    listed = {p for _i, p in listed_inputs(out)}
    current: list[bytes] = []
    current_set: set[bytes] = set()
    for p in config_inputs(cfg, warnings.append):
        if p not in current_set:
            current_set.add(p)
            current.append(p)
    for w in warnings:
        log(f"warning: {w}")
    new = [p for p in current if p not in listed]
    removed = [p for p in output.recorded_inputs(out) if p not in current_set]

    aliases: list[dict] = []
    if cfg.output.content_hash and new:
        known = _embedded_hashes(out)
        keep = []
        for p in new:
            h = hash_input(p)
            if h is not None and h in known:
                aliases.append({"path": pathcodec.encode(p), "same_as": known[h], "hash": h})
            else:
                keep.append(p)
        new = keep

    n = len(records(out)) + 1
    files = update_files(n)
    rec = {"update": n, "listing": files["listing"], "removed": files["removed"],
           "aliases": files["aliases"], "attempt": files["attempt"], "shard_size": size,
           "added": len(new), "removed_count": len(removed), "aliased": len(aliases), "published": False}
    if not new:
        if removed or aliases:
            _write_lines(out / UPDATES / rec["removed"], [pathcodec.encode(p).encode() + b"\n" for p in removed])
            _write_lines(out / UPDATES / rec["aliases"], [json.dumps(a).encode() + b"\n" for a in aliases])
            _write_lines(out / UPDATES / rec["listing"], [])
            rec.update(first_shard=next_shard(out), first_id=next_shard(out) * size, embedded=0, failed=0,
                       published=True)
            output.atomic_write_json(out / UPDATES / files["record"], rec)
        msg = (f"Nothing new to embed in {out}: {len(removed)} input(s) removed since"
               + (f" (recorded in {out / UPDATES / rec['removed']})" if removed else "")
               + (f", {len(aliases)} new name(s) with the content of an embedded input" if aliases else "") + ".")
        return RunResult(EXIT_SUCCESS, msg, {"embedded": 0, "failed": 0, "total": 0}, str(out))

    attempt = out / UPDATES / rec["attempt"]
    list_file = out / UPDATES / files["list"]
    lines = [pathcodec.encode(p).encode() + b"\n" for p in new]
    if attempt.exists() and (not list_file.exists() or list_file.read_bytes() != b"".join(lines)):
        shutil.rmtree(attempt)  # an earlier, interrupted update of other inputs: start it over
    _write_lines(list_file, lines)
    sub = cfg.replace(
        input=replace(cfg.input, paths=(), list=str(list_file), list_column="path"),
        output=replace(cfg.output, dir=str(attempt), layout="native", pickle=False, on_existing="resume"),
    )
    result = Supervisor(sub, progress=progress).run()
    if result.exit_code not in (EXIT_SUCCESS, EXIT_WITH_FAILURES):
        return RunResult(result.exit_code, f"{result.message} (the update of {out}; run the same --update again)",
                         result.counts, str(out))
    k0 = next_shard(out)
    rec.update(first_shard=k0, first_id=k0 * size, embedded=result.counts.get("embedded", 0),
               failed=result.counts.get("failed", 0))
    shutil.copyfile(output.RunDir(attempt).listing, out / UPDATES / rec["listing"])
    _write_lines(out / UPDATES / rec["removed"], [pathcodec.encode(p).encode() + b"\n" for p in removed])
    _write_lines(out / UPDATES / rec["aliases"], [json.dumps(a).encode() + b"\n" for a in aliases])
    output.atomic_write_json(out / UPDATES / files["record"], rec)  # before the first shard moves
    _publish(out, attempt, rec)
    _finish_record(out, rec)
    _refresh_run(cfg, out, manifest)
    k1 = next_shard(out) - 1
    shards = (f"shard {output.shard_name(k0)}" if k1 == k0 else
              f"shards {output.shard_name(k0)}..{output.shard_name(k1)}")
    msg = (f"Updated {out}: {rec['embedded']} new input(s) embedded into {shards}, {rec['failed']} failed, "
           f"{len(removed)} removed since"
           + (f" (recorded in {out / UPDATES / rec['removed']})" if removed else "")
           + (f", {len(aliases)} skipped as the content of an embedded input" if aliases else "") + ".")
    return RunResult(EXIT_WITH_FAILURES if rec["failed"] else EXIT_SUCCESS, msg,
                     {"embedded": rec["embedded"], "failed": rec["failed"], "total": len(new)}, str(out))


def _embedded_hashes(out: Path) -> dict[str, str]:
    """content hash -> the path (text form) of the embedded row that has it, over every shard."""
    known: dict[str, str] = {}
    d = out / output.EMB_DIR
    for k in output.completed_shards(out):
        h = d / f"{output.shard_name(k)}{HASHES_SUFFIX}"
        if not h.exists():
            continue
        paths = (d / f"{output.shard_name(k)}{rundir.PATHS_SUFFIX}").read_bytes().splitlines()
        for line, p in zip(h.read_text().splitlines(), paths):
            if line:
                known.setdefault(line, output.decode_path_line(p))
    return known


def _finish_record(out: Path, rec: dict) -> None:
    attempt = out / UPDATES / rec["attempt"]
    if attempt.exists():
        shutil.rmtree(attempt)
    files = update_files(rec["update"])
    (out / UPDATES / files["list"]).unlink(missing_ok=True)
    rec["published"] = True
    output.atomic_write_json(out / UPDATES / files["record"], rec)


def _refresh_run(cfg: Config, out: Path, manifest: dict) -> None:
    """The run-level files after new shards: failures, metadata layout, pickle, manifest."""
    import numpy as np

    rd = rundir.RunDir(out)
    done = rd.completed_shards()
    failed = rd.write_failures(done)
    rows = sum(rd.shard_counts(k)[0] for k in done)
    o = cfg.output
    if o.metadata or o.layout == "clip-retrieval":
        from pipeline.data import metadata

        metadata.publish(out, done, o.metadata, o.layout)
    if o.pickle:
        paths, emb = output.load_embeddings(out)
        rd.write_pickle(paths, np.asarray(emb))
    manifest = dict(manifest)
    manifest["updated"] = rundir.now_iso()
    manifest["shards"] = done
    manifest["counts"] = {**manifest.get("counts", {}), "embedded": rows, "failed": failed}
    manifest["updates"] = [{k: r[k] for k in ("update", "first_shard", "first_id", "added", "embedded", "failed",
                                             "removed_count", "aliased")} for r in records(out)]
    rd.write_manifest(manifest)
