"""CLIP normalisation constants shared by compile (--fuse-preprocess) and verify."""
from __future__ import annotations

import numpy as np

# CLIP's mean/std in 0..255 units, as TPU-MLIR takes them: y = (x - mean) * scale per channel (RGB).
# mean = 255 * (0.48145466, 0.4578275, 0.40821073); scale = 1 / (255 * (0.26862954, 0.26130258, 0.27577711)).
CLIP_MEAN_255 = (122.770935, 116.74601, 104.093735)
CLIP_SCALE_255 = (0.0145984, 0.0150077, 0.0142200)


def normalize_u8(u8: np.ndarray) -> np.ndarray:
    """uint8 [N,3,H,W] RGB planar -> float32 CLIP-normalised, exactly what a fused bmodel computes."""
    mean = np.asarray(CLIP_MEAN_255, np.float32).reshape(1, 3, 1, 1)
    scale = np.asarray(CLIP_SCALE_255, np.float32).reshape(1, 3, 1, 1)
    return ((u8.astype(np.float32) - mean) * scale).astype(np.float32)


def random_u8_images(n: int, seed: int = 0, size: int = 224) -> np.ndarray:
    """Seeded random uint8 RGB planar images [n,3,size,size]."""
    return np.random.default_rng(seed).integers(0, 256, (n, 3, size, size), dtype=np.uint8)


def load_images_u8(directory, size: int = 224, limit: int | None = None) -> tuple[list[str], np.ndarray]:
    """Reference CLIP preprocessing up to (not including) normalisation: PIL RGB, shorter side to
    ``size`` (bicubic), centre crop. Returns (paths, uint8 [N,3,size,size])."""
    from pathlib import Path

    from PIL import Image

    exts = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
    paths = sorted(p for p in Path(directory).rglob("*") if p.suffix.lower() in exts)
    if limit:
        paths = paths[:limit]
    out = np.empty((len(paths), 3, size, size), np.uint8)
    for k, p in enumerate(paths):
        with Image.open(p) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = size / min(w, h)
            im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
            w, h = im.size
            left, top = (w - size) // 2, (h - size) // 2
            im = im.crop((left, top, left + size, top + size))
            out[k] = np.asarray(im, np.uint8).transpose(2, 0, 1)
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
