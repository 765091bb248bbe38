"""Generated classification data: 10 classes of coloured shapes, as CIFAR pickles or ImageFolder trees.

Each class is one (shape, colour) pair; the shape's position, size, colour shade and the noisy
grey background vary per image. Distinct enough that even random-weight features separate them.
(Labelled classes, not photos: the one content generator the tests share without labels is
imagegen.photo; files are written by imagegen.write.)
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from imagegen import write
from PIL import Image, ImageDraw

CLASSES = [
    ("circle", (220, 40, 40)), ("square", (40, 180, 40)), ("triangle", (40, 70, 220)),
    ("cross", (230, 200, 30)), ("bar", (200, 40, 200)), ("circle", (30, 200, 200)),
    ("square", (240, 140, 20)), ("triangle", (120, 60, 20)), ("cross", (250, 250, 250)),
    ("bar", (10, 10, 10)),
]
NAMES = [f"{c[0]}_{i}" for i, c in enumerate(CLASSES)]


def draw(label: int, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    shape, colour = CLASSES[label]
    bg = rng.integers(90, 160)
    px = np.clip(bg + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(px)
    d = ImageDraw.Draw(img)
    r = rng.uniform(0.25, 0.4) * size
    cx, cy = rng.uniform(r, size - r, 2)
    col = tuple(int(np.clip(c + rng.normal(0, 15), 0, 255)) for c in colour)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        d.ellipse(box, fill=col)
    elif shape == "square":
        d.rectangle(box, fill=col)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=col)
    elif shape == "cross":
        w = r / 3
        d.rectangle((cx - r, cy - w, cx + r, cy + w), fill=col)
        d.rectangle((cx - w, cy - r, cx + w, cy + r), fill=col)
    else:  # bar
        d.rectangle((cx - r, cy - r / 3, cx + r, cy + r / 3), fill=col)
    return np.asarray(img)


def make_split(n_per_class: int, seed: int, classes: list[int] | None = None, size: int = 32):
    rng = np.random.default_rng(seed)
    classes = list(range(len(CLASSES))) if classes is None else classes
    labels = [c for c in classes for _ in range(n_per_class)]
    return np.stack([draw(c, rng, size) for c in labels]), np.array(labels)


def write_cifar(d: Path, n_train: int = 30, n_test: int = 10, test_classes: list[int] | None = None) -> Path:
    """d/cifar-100-python/{train,test,meta} in CIFAR-100's python format (bytes keys, CHW rows)."""
    root = d / "cifar-100-python"
    root.mkdir(parents=True, exist_ok=True)
    for name, n, seed, classes in (("train", n_train, 0, None), ("test", n_test, 1, test_classes)):
        imgs, labels = make_split(n, seed, classes)
        data = imgs.transpose(0, 3, 1, 2).reshape(len(imgs), -1)
        with open(root / name, "wb") as fh:
            pickle.dump({b"batch_label": name.encode(), b"fine_labels": labels.tolist(),
                         b"coarse_labels": [0] * len(labels), b"data": data,
                         b"filenames": [f"{i}.png".encode() for i in range(len(labels))]}, fh, protocol=2)
    with open(root / "meta", "wb") as fh:
        pickle.dump({b"fine_label_names": [n.encode() for n in NAMES], b"coarse_label_names": [b"all"]}, fh, protocol=2)
    return root


def write_imagefolder(d: Path, n: int, seed: int, classes: list[int] | None = None, size: int = 48) -> Path:
    imgs, labels = make_split(n, seed, classes, size)
    for i, (img, lab) in enumerate(zip(imgs, labels, strict=True)):
        p = d / NAMES[lab] / f"{i:05d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        write(p, img)
    return d
