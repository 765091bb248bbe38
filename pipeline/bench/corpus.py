"""The bench's inputs: the JPEG corpus (a directory given by --images), linked or empty input trees, reference crops."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click
import numpy as np


class BenchUsageError(click.ClickException):
    """A usage problem (missing corpus or model): one line on stderr, exit 2, like `run`'s errors."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


def jpeg_files(images: Path, n: int) -> list[Path]:
    try:
        files = sorted(p for p in images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    except OSError as exc:
        raise BenchUsageError(f"cannot read the bench corpus {images}: {exc.strerror or exc} (--images DIR)") from None
    if not files:
        raise BenchUsageError(f"no JPEGs in {images} (--images DIR: a directory of .jpg files)")
    return [files[i % len(files)] for i in range(n)]


def link_inputs(files: list[Path], dst: Path) -> Path:
    """A directory of n symlinks (repeating the corpus if n exceeds it) in listing order."""
    dst.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(files):
        os.symlink(f.resolve(), dst / f"{i:07d}{f.suffix}")
    return dst


def empty_inputs(n: int, dst: Path, per_dir: int = 1000) -> Path:
    """n empty .jpg files, 1000 per subdirectory (like a photo dump): enough for fake.ready_crops,
    which never reads them. (The source holds one directory's names at a time, so one flat
    directory of 100k files would measure the directory, not the pipeline.)"""
    for i in range(n):
        sub = dst / f"{i // per_dir:05d}"
        if i % per_dir == 0:
            sub.mkdir(parents=True, exist_ok=True)
        os.close(os.open(sub / f"{i:07d}.jpg", os.O_CREAT | os.O_WRONLY, 0o644))
    return dst


def reference_batch(files: list[Path]) -> np.ndarray:
    """CLIP reference crops [n,224,224,3] uint8 (decoded once, for ceilings and cosines)."""
    from pipeline.data.images import DecodeOptions, crop, decode_file

    opts = DecodeOptions()
    return np.stack([crop(decode_file(os.fsencode(f), opts), "reference") for f in files])
