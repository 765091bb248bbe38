"""Model files: identity for the manifest, and building the synthetic default on first use."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any


def sha256_file(path: str | os.PathLike, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def cache_root() -> Path:
    """The project's cache directory ($XDG_CACHE_HOME or ~/.cache, then clip-pipeline/)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "clip-pipeline"


def _hash_cache_path() -> Path:
    return cache_root() / "model-sha256.json"


# A file changed less than this long ago is not remembered: file system timestamps are coarse (a
# write within the same tick would keep the ctime), as git's "racy" index entries
RACY_NS = 2_000_000_000


def model_sha256(path: str | os.PathLike) -> str:
    """sha256_file of a model, remembered per file (~/.cache/clip-pipeline/model-sha256.json) under
    its device, inode, size, mtime and ctime: a run's start-up no longer reads the whole model
    (ViT-B/32: 350 MB, ~0.25 s) before any worker starts. Any write to the file, or a new file in
    its place, changes the ctime (which no user call can set back), so a changed model is hashed
    again. A cache that cannot be read or written is ignored."""
    st = os.stat(path)
    key = os.path.realpath(path)
    stamp = [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    cache_file = _hash_cache_path()
    try:
        cache = json.loads(cache_file.read_text())
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, ValueError):
        cache = {}
    hit = cache.get(key)
    if isinstance(hit, dict) and hit.get("stat") == stamp and isinstance(hit.get("sha256"), str):
        return hit["sha256"]
    digest = sha256_file(path)
    st2 = os.stat(path)
    if [st2.st_dev, st2.st_ino, st2.st_size, st2.st_mtime_ns, st2.st_ctime_ns] != stamp or \
            time.time_ns() - st.st_ctime_ns < RACY_NS:
        return digest  # changed while read, or so recently that another write could share its timestamps
    cache[key] = {"stat": stamp, "sha256": digest}
    try:
        from pipeline.data.rundir import atomic_write_bytes

        cache_file.parent.mkdir(parents=True, exist_ok=True)
        # the 64 most recent models, in the order they were hashed (not sorted: the oldest go first)
        atomic_write_bytes(cache_file, json.dumps(dict(list(cache.items())[-64:])).encode())
    except OSError:
        pass
    return digest


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
        "sha256": model_sha256(path),
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
    from pipeline.model.modelgen import build_clip_image_onnx

    log(f"Building synthetic CLIP {cfg.model.build} (seed {cfg.model.seed}) at {path} — "
        "SYNTHETIC random weights: embeddings carry no meaning. Point model.path at a real model for real use.")
    path.parent.mkdir(parents=True, exist_ok=True)
    build_clip_image_onnx(path, arch=cfg.model.build, seed=cfg.model.seed)


def _square(shape) -> int | None:
    """S from an image input shape [N,3,S,S] or [N,S,S,3]; None otherwise."""
    if not isinstance(shape, (list, tuple)) or len(shape) != 4:
        return None
    dims = [d if isinstance(d, int) and d > 0 else None for d in shape]
    if dims[1] == 3 and dims[2] and dims[2] == dims[3]:
        return dims[2]
    if dims[3] == 3 and dims[1] and dims[1] == dims[2]:
        return dims[1]
    return None


def model_image_size(path: str | os.PathLike) -> int | None:
    """The square input size a model takes (336 for a ViT-L/14@336), from its sidecar (our ONNX
    builder's ``input_shape``, the compiler's ``input.shape``) or else the ONNX graph; None if unknown."""
    info = sidecar(path)
    for shape in (info.get("input_shape"), (info.get("input") or {}).get("shape")):
        size = _square(shape)
        if size:
            return size
    if str(path).lower().endswith(".onnx") and os.path.isfile(path):
        from pipeline.model.modelgen import read_model_info

        return _square(read_model_info(path).get("input_shape"))
    return None


def resolve_image_size(cfg) -> int:
    """cfg.model.image_size, or (0) the model's own input size, or 224. A set size that the model
    does not take is a ConfigError (exit 2 before any worker starts)."""
    known = None
    if cfg.infer.backend != "fake" and os.path.exists(cfg.model.path):
        known = model_image_size(cfg.model.path)
    if cfg.model.image_size:
        if known and known != cfg.model.image_size:
            from pipeline.errors import ConfigError

            raise ConfigError(f"config key model.image_size = {cfg.model.image_size}, but model {cfg.model.path} takes "
                              f"{known}x{known} images: set it to {known} or to 0 (read it from the model)")
        return cfg.model.image_size
    return known or 224
