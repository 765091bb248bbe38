#!/usr/bin/env python3
"""Generate the bundled sample images (procedural, so their licence is ours: Apache-2.0).

Writes a dozen small photos-like pictures (gradients, shapes, noise) in JPEG and PNG, in a few
sizes and orientations, to samples/images/. Deterministic: re-running gives the same pixels.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def picture(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([
        (x / w) * rng.uniform(80, 255),
        (y / h) * rng.uniform(80, 255),
        ((x + y) / (w + h)) * rng.uniform(80, 255),
    ], axis=2)
    img = Image.fromarray(np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(20, w // 2)), y0 + int(rng.integers(20, h // 2))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=color)
    return img.filter(ImageFilter.GaussianBlur(1.2))


def main(out: str = "samples/images") -> None:
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2024)
    sizes = [(320, 240), (240, 320), (400, 300), (300, 300), (500, 200), (256, 384)]
    for i in range(12):
        w, h = sizes[i % len(sizes)]
        img = picture(rng, w, h)
        if i % 4 == 3:
            img.save(d / f"sample_{i:02d}.png", optimize=True)
        else:
            img.save(d / f"sample_{i:02d}.jpg", quality=85)
    print(f"wrote 12 sample images to {d}")


if __name__ == "__main__":
    main(*sys.argv[1:])
