"""Embedding images through the normal pipeline, for queries and evaluations.

Query images and evaluation datasets go through exactly the code that made an output (the same
backend, preprocessing and model, via the Supervisor), so their vectors are comparable with
the output's. The model is checked against the one recorded in the output's manifest.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

from pipeline.backends import get_backend
from pipeline.config import Config, ConfigError, apply_override, from_dict, parse_value
from pipeline.data.rundir import RunDir, looks_like_run, manifest_missing
from pipeline.output import load_embeddings
from pipeline.run.attempt import run_into
from pipeline.run.progress import Progress
from pipeline.run.supervisor import RunAborted


def manifest_of(out: str | os.PathLike) -> dict[str, Any]:
    manifest = RunDir(out).read_manifest()  # DamagedRun (a ConfigError) says how to recover
    if manifest is None and looks_like_run(out):
        raise manifest_missing(out)
    if manifest is None:
        raise ConfigError(f"{out} holds no clip-pipeline run (no manifest.json); give the --output directory of a run")
    return manifest


def config_of(out: str | os.PathLike, manifest: dict | None = None) -> Config:
    """The config an output was made with (as recorded in its manifest)."""
    manifest = manifest or manifest_of(out)
    raw = dict(manifest.get("config") or {})
    if not raw:
        raise ConfigError(f"{out}/manifest.json records no config; it was not written by clip-pipeline run")
    return from_dict(raw, source=f"{out}/manifest.json")


def check_same_model(out: str | os.PathLike, manifest: dict, cfg: Config) -> dict[str, Any]:
    """The identity of cfg's model; ConfigError if it is not the model that made `out`."""
    want = (manifest.get("model") or {}).get("sha256")
    try:
        have = get_backend(cfg.infer.backend).model_identity(cfg)
    except FileNotFoundError:
        raise ConfigError(f"model file {cfg.model.path} (recorded in {out}/manifest.json) does not exist; "
                          "pass --model PATH to the model that made this output") from None
    if want and have.get("sha256") != want:
        raise ConfigError(f"model {cfg.model.path} (sha256 {str(have.get('sha256'))[:12]}) is not the model that "
                          f"made {out} (sha256 {want[:12]}); its vectors would not be comparable. Pass --model PATH "
                          "to the model recorded in the manifest")
    return have


def query_config(out: str | os.PathLike, model: str | None = None, backend: str | None = None,
                 devices: tuple = (), sets: tuple[str, ...] = ()) -> tuple[Config, dict]:
    """OUT's config with optional overrides, checked to use OUT's model; (cfg, manifest)."""
    manifest = manifest_of(out)
    raw = json.loads(json.dumps(manifest.get("config") or {}))
    if not raw:
        raise ConfigError(f"{out}/manifest.json records no config; it was not written by clip-pipeline run")
    for assignment in sets:
        apply_override(raw, assignment)
    if model:
        raw.setdefault("model", {})["path"] = os.path.abspath(model)
    if backend:
        raw.setdefault("infer", {})["backend"] = backend
    if devices:
        raw.setdefault("infer", {})["devices"] = [parse_value(d) for d in devices]
    raw.setdefault("model", {})["build"] = ""  # never build a (different) model for a query
    cfg = from_dict(raw, source=f"{out}/manifest.json")
    check_same_model(out, manifest, cfg)
    return cfg, manifest


@dataclasses.dataclass
class Embedded:
    paths: list[str]
    embeddings: np.ndarray  # float32 [n, dim], row i for paths[i]
    failures: list[dict]  # {id, path, reason, message}
    out_dir: str


def embed_inputs(cfg: Config, inputs: list[str], work_dir: str | os.PathLike, *,
                 progress: str = "none", restart: bool = False, quiet: bool = False) -> Embedded:
    """Run the pipeline (cfg's backend, model, preprocessing) on `inputs` into work_dir; load the result.

    work_dir is an ordinary, resumable output directory: running again with the same inputs and
    model reuses what was embedded.
    """
    try:
        result = run_into(cfg, work_dir, inputs=dataclasses.replace(cfg.input, paths=tuple(os.path.abspath(p) for p in inputs)),
                          dtype="float32", restart=restart, progress=Progress(progress, cfg.run.log_interval_s, quiet=quiet))
    except RunAborted as exc:
        raise RuntimeError(f"embedding {', '.join(inputs)} failed: {exc}") from None
    if result.exit_code not in (0, 3):
        raise RuntimeError(f"embedding {', '.join(inputs)} failed: {result.message}")
    paths, emb = load_embeddings(work_dir)
    failures = []
    fpath = RunDir(work_dir).failures
    if fpath.exists():
        failures = [json.loads(line) for line in fpath.read_text().splitlines() if line.strip()]
    return Embedded(paths, np.asarray(emb, dtype=np.float32), failures, str(work_dir))
