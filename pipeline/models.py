"""Model files: identity for the manifest, and building the synthetic default on first use."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def sha256_file(path: str | os.PathLike, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sidecar(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON written next to a model by our builders/compilers (`<model>.json`), or {}."""
    p = Path(f"{path}.json")
    try:
        return json.loads(p.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def model_identity(path: str | os.PathLike) -> dict[str, Any]:
    """What the manifest records about a model; resume refuses a different sha256."""
    info = sidecar(path)
    return {
        "path": str(path),
        "sha256": sha256_file(path),
        "bytes": os.path.getsize(path),
        # our ONNX builder writes "synthetic"; the bmodel compiler copies it as onnx.synthetic_weights
        "synthetic": bool(info.get("synthetic") or (info.get("onnx") or {}).get("synthetic_weights")),
        "arch": info.get("arch", "unknown"),
        "info": info,
    }


def ensure_model(cfg, log=print) -> None:
    """Build the synthetic model named by model.build at model.path if it is missing."""
    path = Path(cfg.model.path)
    if path.exists() or not cfg.model.build or cfg.infer.backend in ("sail", "sim"):
        return
    from pipeline.modelgen import build_clip_image_onnx

    log(f"Building synthetic CLIP {cfg.model.build} (seed {cfg.model.seed}) at {path} — "
        "SYNTHETIC random weights: embeddings carry no meaning. Point model.path at a real model for real use.")
    path.parent.mkdir(parents=True, exist_ok=True)
    build_clip_image_onnx(path, arch=cfg.model.build, seed=cfg.model.seed)
