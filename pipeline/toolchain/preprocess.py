"""Inputs of compile (--fuse-preprocess) and verify, from the pipeline's own preprocessing.

CLIP's mean/std and the crop come from pipeline/data/images.py (the one implementation): a bmodel is
verified on exactly the crops the pipeline's default (reference) path feeds it.
"""
from __future__ import annotations

import numpy as np

from pipeline.data.images import CLIP_MEAN, CLIP_STD, DecodeOptions, decode_file, reference_crop

# CLIP's mean/std in 0..255 units, as TPU-MLIR takes them: y = (x - mean) * scale per channel (RGB).
CLIP_MEAN_255 = tuple(255.0 * m for m in CLIP_MEAN)
CLIP_SCALE_255 = tuple(1.0 / (255.0 * s) for s in CLIP_STD)


def normalize_u8(u8: np.ndarray) -> np.ndarray:
    """uint8 [N,3,H,W] RGB planar -> float32 CLIP-normalised, what a fused bmodel computes."""
    mean = np.asarray(CLIP_MEAN_255, np.float32).reshape(1, 3, 1, 1)
    scale = np.asarray(CLIP_SCALE_255, np.float32).reshape(1, 3, 1, 1)
    return ((u8.astype(np.float32) - mean) * scale).astype(np.float32)


def random_u8_images(n: int, seed: int = 0, size: int = 224) -> np.ndarray:
    """Seeded random uint8 RGB planar images [n,3,size,size]."""
    return np.random.default_rng(seed).integers(0, 256, (n, 3, size, size), dtype=np.uint8)


def load_images_u8(directory, size: int = 224, limit: int | None = None) -> tuple[list[str], np.ndarray]:
    """The pipeline's reference preprocessing up to (not including) normalisation: decode
    (pipeline.data.images.decode_file), CLIP's resize + centre crop (reference_crop).
    Returns (paths, uint8 [N,3,size,size])."""
    import os
    from pathlib import Path

    exts = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
    paths = sorted(p for p in Path(directory).rglob("*") if p.suffix.lower() in exts)
    if limit:
        paths = paths[:limit]
    opts = DecodeOptions()
    out = np.empty((len(paths), 3, size, size), np.uint8)
    for k, p in enumerate(paths):
        out[k] = reference_crop(decode_file(os.fsencode(p), opts), size).transpose(2, 0, 1)
    return [str(p) for p in paths], out


def random_token_ids(n: int, context: int = 77, seed: int = 0) -> np.ndarray:
    """n rows shaped like CLIP token ids: sot, random BPE ids, eot (the row's maximum), zero padding."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((n, context), np.int32)
    for i in range(n):
        k = int(rng.integers(0, context - 1))
        ids[i, 0] = 49406
        ids[i, 1:k + 1] = rng.integers(1, 49406, size=k)
        ids[i, k + 1] = 49407
    return ids
