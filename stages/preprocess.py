"""Preprocess stage (only when not fused with decode): decoded image -> 224x224x3 uint8 RGB crop.

The crops themselves (reference: CLIP's exact transform; fast: OpenCV area resize) and the batch
normalisation are pure functions in pipeline/data/images.py; this module is the worker core.
"""

from __future__ import annotations

from pipeline.data.images import crop
from pipeline.wire.messages import Failure
from pipeline.wire.transport import array_from
from stages.base import Output, StageCore, fail
from stages.decode import image_message


class PreprocessCore(StageCore):
    """Preprocess worker (when not fused with decode): decoded image -> 224x224 uint8 crop."""

    def __init__(self, spec):
        super().__init__()
        self.mode = spec.cfg.preprocess.mode
        self.size = spec.cfg.model.image_size or 224

    def setup(self) -> None:
        import cv2

        cv2.setNumThreads(1)

    def handle(self, header: dict, frames: list) -> list[Output]:
        try:
            out = crop(array_from(header, frames[0]), self.mode, self.size)
        except Exception as exc:  # noqa: BLE001 - one bad image never stops the run
            return [fail(Failure(header["id"], header["path"], "corrupt",
                                 f"preprocess: {type(exc).__name__}: {exc}", "preprocess"))]
        return [image_message("px", header, out)]
