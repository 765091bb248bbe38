"""A stand-in for the decode stage, BENCH-ONLY (`fake.ready_crops`): every input becomes one fixed
crop, nothing is read or decoded, so a run measures the orchestration at accelerator speed (the
fake backend) or the pipeline without the host's decode (the bench's cpu case 2b).

The run plan picks this core instead of stages/decode.py's for the decode workers when the key is
set (DecodeSpec.ready_crops); the real decode stage knows nothing of it.
"""

from __future__ import annotations

import numpy as np

from stages.base import StageCore
from stages.decode import image_message, pixels_message


def ready_crop(size: int = 224) -> np.ndarray:
    """The fixed crop (a smooth gradient, so fake embeddings are finite)."""
    y, x = np.mgrid[0:size, 0:size]
    return np.ascontiguousarray(np.stack([x, y, (x + y) // 2], axis=2).astype(np.uint8))


class ReadyCropCore(StageCore):
    """Decode worker stand-in: one pre-made S x S crop per input (fused: stacked per group)."""

    def __init__(self, spec):
        super().__init__()
        self.fused = spec.fused
        self.crop = ready_crop(spec.cfg.model.image_size or 224)
        self.groups: dict[int, np.ndarray] = {}

    def handle(self, header: dict, frames: list):
        if header["t"] != "items":
            return [image_message("px", header, self.crop)]
        ids, paths = header["ids"], header["paths"]
        if not self.fused:  # the preprocess stage takes one image per message
            return [image_message("img", {"id": i, "path": p}, self.crop) for i, p in zip(ids, paths)]
        if len(ids) not in self.groups:  # built once per group size, sent zero-copy
            self.groups[len(ids)] = np.ascontiguousarray(np.broadcast_to(self.crop, (len(ids), *self.crop.shape)))
        return [pixels_message(ids, paths, self.groups[len(ids)], header.get("tail", 0))]
