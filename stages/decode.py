"""Decode stage: file bytes -> pixel array (or, fused, the 224x224 crop), or a failed item.

The image functions (decoders, crops, reason codes) are in pipeline/data/images.py; this module is the
worker core around them. Decode and preprocess are fused by default (workers.fuse_decode_preprocess):
then the group of inputs of an `items` message leaves as one `pxs` message of crops, and each
failure goes to the sink on its own.
"""

from __future__ import annotations

import numpy as np

from pipeline.backends import get_backend
from pipeline.data.images import DecodeOptions, crop
from pipeline.data.inputs import TarReader, decode_input
from pipeline.wire import messages
from pipeline.wire.messages import Failure, ItemError
from stages.base import Output, StageCore, fail


def image_message(kind: str, header: dict, arr: np.ndarray) -> Output:
    return ("next", *messages.image(kind, header["id"], header["path"], arr))


def pixels_message(ids: list[int], paths: list[bytes], pixels: np.ndarray, tail: int = 0) -> Output:
    """Crops of several inputs in one message: uint8 [n,224,224,3] and their ids/paths. `tail`: a
    piece of the run's tail, passed on from the source (pipeline/wire/dispatch.py, tail_images)."""
    header, bufs = messages.pixels(ids, paths, pixels)
    if tail:
        header["tail"] = tail
    return ("next", header, bufs)


class DecodeCore(StageCore):
    """Decode worker: item -> decoded image (or, fused, the 224x224 crop) or a failed item."""

    def __init__(self, spec):
        super().__init__()
        self.opts = DecodeOptions.from_config(spec.cfg)
        self.fused = spec.cfg.workers.fuse_decode_preprocess
        # A backend may stand in for the host's work (bench-only: fake.ready_crops): then the files
        # are neither read nor decoded and this pre-made crop is sent for every input.
        self.ready_crop = get_backend(spec.cfg.infer.backend).ready_crop(spec.cfg)
        self.ready_groups: dict[int, np.ndarray] = {}
        self.slot = None  # the worker's Slot (set by make_core): marks the input being decoded
        self.tars = TarReader()  # webdataset members: one header scan per tar, one seek per member

    def decode(self, path: bytes) -> np.ndarray:
        """A file, or a member of a tar shard (TAR/MEMBER, pipeline/data/inputs.py), to pixels."""
        return decode_input(path, self.opts, self.tars)

    def close(self) -> None:
        self.tars.close()

    def setup(self) -> None:
        import cv2

        cv2.setNumThreads(1)  # one process per core does better than thread pools on small boxes

    def handle(self, header: dict, frames: list):
        if header["t"] == "items":
            return self.handle_group(header)
        if self.ready_crop is not None:
            return [image_message("px", header, self.ready_crop)]
        return self.handle_one(header)

    def handle_group(self, header: dict):
        """A group of inputs -> one message of stacked crops (fused) plus per-item failures."""
        ids, paths = header["ids"], header["paths"]
        if self.ready_crop is not None:
            if not self.fused:  # the preprocess stage takes one image per message
                return [image_message("img", {"id": i, "path": p}, self.ready_crop) for i, p in zip(ids, paths)]
            if len(ids) not in self.ready_groups:  # built once per group size, sent zero-copy
                self.ready_groups[len(ids)] = np.ascontiguousarray(
                    np.broadcast_to(self.ready_crop, (len(ids), *self.ready_crop.shape)))
            return [pixels_message(ids, paths, self.ready_groups[len(ids)], header.get("tail", 0))]
        outputs, ok_ids, ok_paths, crops = [], [], [], []
        for item_id, path in zip(ids, paths):
            for target, h, bufs in self.handle_one(messages.item(item_id, path)):
                if self.fused and h["t"] == "px":
                    ok_ids.append(item_id)
                    ok_paths.append(path)
                    crops.append(bufs[0])
                else:
                    outputs.append((target, h, bufs))
        if crops:
            outputs.append(pixels_message(ok_ids, ok_paths, np.stack(crops), header.get("tail", 0)))
        return outputs

    def handle_one(self, header: dict) -> list[Output]:
        if self.slot is not None:  # the supervisor's per-input deadline and "stuck" progress note
            self.slot.begin_item(header["id"])
        try:
            arr = self.decode(header["path"])
            if self.fused:
                return [image_message("px", header, crop(arr, self.opts.mode, self.opts.target))]
        except ItemError as exc:
            return [fail(Failure(header["id"], header["path"], exc.reason, exc.message, "decode"))]
        except Exception as exc:  # noqa: BLE001 - one bad image never stops the run
            return [fail(Failure(header["id"], header["path"], "unreadable",
                                 f"unexpected {type(exc).__name__}: {exc}", "decode"))]
        finally:
            if self.slot is not None:
                self.slot.end_item()
        return [image_message("img", header, arr)]
