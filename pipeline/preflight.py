"""Checks made before a run starts its workers, shared by `run` and `run --dry-run`.

Everything here only reads: the dry run calls exactly these checks, so it refuses what the real
run refuses (same message, same exit status) and warns about what the real run warns about.
"""

from __future__ import annotations

import os
from typing import Any

from pipeline.config import Config

# fingerprint field (manifest.json) -> the config key a user changes to change it
FINGERPRINT_KEYS = {
    "model_sha256": "model.path",
    "backend": "infer.backend",
    "sail_mode": "sail.mode",
    "preprocess_mode": "preprocess.mode",
    "exif_transpose": "preprocess.exif_transpose",
    "normalize": "output.normalize",
    "dtype": "output.dtype",
    "shard_size": "output.shard_size",
    "inputs": "input.paths",
    "extensions": "input.extensions",
    "recursive": "input.recursive",
    "follow_symlinks": "input.follow_symlinks",
}


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def device_warnings(cfg: Config, devices: list[Any], cores: int | None = None) -> list[str]:
    """The cpu backend runs one inference process per device with infer.threads threads each;
    more threads than usable cores oversubscribe the CPU (slower, not faster). cpu:N names a
    process, not a core (nothing is pinned), so cpu:5 on a 2-core machine is worth a word too."""
    if cfg.infer.backend != "cpu":
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
