"""The pipeline's vocabulary: one constructor per message of ARCHITECTURE.md's table, the one
`Failure` record and the one list of failure reason codes.

A message is a msgpack header (a dict with `t`) plus raw buffers (arrays travel as buffers with
`shape`/`dtype` in the header, see pipeline.wire.transport). Constructors of array messages return
`(header, buffers)`; the others return the header. Where a message goes (next stage, sink,
control) is the sender's business, not the message's.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.wire import pathcodec
from pipeline.wire.transport import array_header

# Why an input could not be embedded (docs/robustness.md). Decode: empty .. vanished; infer adds
# non_finite; the supervisor decides crashed_worker (an input that killed its worker twice).
# Tar shards (pipeline/data/inputs.py): no_image (a sample without an image member), tar_truncated
# (the tar ends inside the member), tar_corrupt (a header that is not a tar header). Every code the
# project raises is one of these (tests/test_code_shape.py reads the code for them).
REASONS = ("empty", "not_an_image", "truncated", "corrupt", "too_large", "unreadable", "vanished",
           "not_a_file", "timeout", "no_image", "tar_truncated", "tar_corrupt", "non_finite", "crashed_worker")

MESSAGE_LIMIT = 500  # characters of a failure's message kept (a decoder's text can be long)


class ItemError(Exception):
    """This input cannot be embedded. `reason` is a short code (REASONS), `message` the details."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


_ADDRESS = re.compile(r"<([\w.]+) object at 0x[0-9a-fA-F]+>")


def stable_message(text: str) -> str:
    """A failure's message without what differs between two runs of the same input: an object's
    memory address in a library's text (PIL: "cannot identify image file <_io.BytesIO object at
    0x7f...>") becomes the object's type, so failures.jsonl stays byte-identical (issue #27)."""
    return _ADDRESS.sub(r"<\1>", text)


@dataclass(frozen=True)
class Failure:
    """One input that cannot be embedded: the `fail` message, a device's per-input failure, the
    supervisor's decision and the line of a shard's .failures.jsonl are all this record."""

    id: int
    path: bytes
    reason: str
    message: str
    stage: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "message", stable_message(self.message))

    def header(self) -> dict[str, Any]:
        """The `fail` message (any stage or the supervisor -> sink)."""
        return {"t": "fail", "id": self.id, "path": self.path, "reason": self.reason,
                "message": self.message[:MESSAGE_LIMIT], "stage": self.stage}

    @classmethod
    def from_header(cls, h: dict[str, Any]) -> Failure:
        return cls(h["id"], h["path"], h["reason"], h["message"], h.get("stage", ""))

    def record(self) -> dict[str, Any]:
        """The JSON line of a .failures.jsonl file (path as text)."""
        path = self.path if isinstance(self.path, str) else pathcodec.encode(self.path)  # lossless UTF-8 text
        return {"id": self.id, "path": path, "reason": self.reason, "message": self.message, "stage": self.stage}


# -- data messages (ARCHITECTURE.md "Messages") ------------------------------------------------

def item(item_id: int, path: bytes, suspect: bool = False) -> dict[str, Any]:
    """One input (source or supervisor re-issue -> first stage). `suspect`: a worker that died was
    holding it; a device process that decodes files itself runs it in a batch of its own."""
    h: dict[str, Any] = {"t": "item", "id": item_id, "path": path}
    if suspect:
        h["suspect"] = True
    return h


def items(ids: Sequence[int], paths: Sequence[bytes]) -> dict[str, Any]:
    """A group of inputs (source -> first stage)."""
    return {"t": "items", "ids": list(ids), "paths": list(paths)}


def image(kind: str, item_id: int, path: bytes, arr: np.ndarray) -> tuple[dict[str, Any], tuple]:
    """`img` (full-size pixels, decode -> preprocess) or `px` (a 224x224 crop -> infer)."""
    assert kind in ("img", "px"), kind
    return {"t": kind, "id": item_id, "path": path, **array_header(arr)}, (arr,)


def pixels(ids: Sequence[int], paths: Sequence[bytes], crops: np.ndarray) -> tuple[dict[str, Any], tuple]:
    """`pxs`: the crops of a group, uint8 [n,224,224,3] (fused decode -> infer)."""
    return {"t": "pxs", "ids": list(ids), "paths": list(paths), **array_header(crops)}, (crops,)


def embeddings(ids: Sequence[int], paths: Sequence[bytes], emb: np.ndarray) -> tuple[dict[str, Any], tuple]:
    """`emb`: float32 [n, dim] rows of these inputs (infer -> sink)."""
    return {"t": "emb", "ids": list(ids), "paths": list(paths), **array_header(emb)}, (emb,)


def total(n: int) -> dict[str, Any]:
    """The number of inputs, once the listing is complete (supervisor -> sink)."""
    return {"t": "total", "n": n}


def dim(n: int) -> dict[str, Any]:
    """The embedding width, from the first device that is ready (supervisor -> sink)."""
    return {"t": "dim", "n": n}


# -- control messages (worker -> supervisor) ---------------------------------------------------

def stats(worker: str, role: str, index: int, counters: dict[str, float]) -> dict[str, Any]:
    return {"t": "stats", "worker": worker, "role": role, "index": index, "stats": dict(counters)}


def ready(worker: str, role: str, index: int, pid: int, info: dict[str, Any]) -> dict[str, Any]:
    return {"t": "ready", "worker": worker, "role": role, "index": index, "pid": pid, "info": info}


def listed(n: int, done: bool) -> dict[str, Any]:
    return {"t": "listed", "n": n, "done": done}


def resolved(ids: list[int], embedded: int, failed: int) -> dict[str, Any]:
    return {"t": "resolved", "ids": ids, "failed": failed, "embedded": embedded}


def shard(k: int, rows: int, failed: int) -> dict[str, Any]:
    return {"t": "shard", "k": k, "rows": rows, "failed": failed}


def warning(message: str) -> dict[str, Any]:
    return {"t": "warning", "message": message}


ERROR_KINDS = ("crash", "device", "setup", "fatal")


def error(kind: str, worker: str, role: str, index: int, ids: list[int], exc_type: str, message: str,
          traceback: str) -> dict[str, Any]:
    assert kind in ERROR_KINDS, kind
    return {"t": "error", "kind": kind, "worker": worker, "role": role, "index": index, "ids": ids,
            "exc_type": exc_type, "message": message, "traceback": traceback}
