"""Image decoding for the service, in child processes with a deadline: uploads to query crops, rows to thumbnails.

Both go through pipeline/images.py (the run's own decoder and crop, its `max_pixels` and file size
limits). A decode runs in a spawned child so that a pathological image can be stopped: a child
that overruns the run's `preprocess.decode_timeout_s` (capped by `serve --decode-timeout`) is
killed and replaced, and the request gets a 4xx naming the reason, as the pipeline's decode
workers do for an input of a run.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import queue
import threading
from typing import Any

import numpy as np

from pipeline.data.images import DecodeOptions, crop, decode_bytes
from pipeline.wire.messages import ItemError


def query_crop(data: bytes, opts: DecodeOptions) -> np.ndarray:
    """An uploaded image to the S x S uint8 crop the run's infer stage takes (decode + crop, as fused decode does)."""
    return np.ascontiguousarray(crop(decode_bytes(data, opts), opts.mode, opts.target))


def thumbnail(path: bytes, opts: DecodeOptions, side: int, tars: Any = None) -> bytes:
    """A JPEG of the input at `path` (a file or TAR/MEMBER) whose longer side is at most `side`."""
    from PIL import Image

    from pipeline.data.inputs import TarReader, decode_input

    own = tars is None
    tars = tars or TarReader()
    try:
        arr = decode_input(path, opts, tars)
    finally:
        if own:
            tars.close()
    img = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
    if img.mode != "RGB":
        img = img.convert("RGB")
    img.thumbnail((side, side), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _child_main(conn) -> None:
    """The decode child: (kind, args) in, ("ok", result) or ("fail", reason, message) out, until EOF."""
    from pipeline.data.inputs import TarReader
    from pipeline.worker.pdeath import set_parent_death_signal

    set_parent_death_signal()
    tars = TarReader()
    conn.send(("ready",))  # imports done: the decode deadline starts counting from here
    while True:
        try:
            kind, args = conn.recv()
        except (EOFError, OSError):
            return
        try:
            result = query_crop(*args) if kind == "crop" else thumbnail(*args, tars=tars)
            conn.send(("ok", result))
        except ItemError as exc:
            conn.send(("fail", exc.reason, exc.message))
        except Exception as exc:  # noqa: BLE001 - one bad image is an answer, never a dead child
            conn.send(("fail", "unreadable", f"unexpected {type(exc).__name__}: {exc}"))


class _Child:
    def __init__(self, ctx):
        self.ready = False  # its ("ready",) read: a starting child (imports) is not timed as a decode
        self.conn, child_conn = ctx.Pipe()
        self.proc = ctx.Process(target=_child_main, args=(child_conn,), daemon=True, name="serve-decode")
        self.proc.start()
        child_conn.close()

    def stop(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)
        self.conn.close()


class DecodePool:
    """`workers` decode children; `call` blocks for a free one (up to `wait_s`), then for its answer
    (up to `timeout_s`, else the child is killed and replaced). Thread-safe."""

    def __init__(self, workers: int = 2, timeout_s: float = 10.0, wait_s: float = 30.0):
        self.ctx = mp.get_context("spawn")
        self.timeout_s, self.wait_s = timeout_s, wait_s
        self.idle: queue.Queue[_Child] = queue.Queue()
        self._all: list[_Child] = []
        self._lock = threading.Lock()
        for _ in range(workers):
            self._add()

    def _add(self) -> None:
        child = _Child(self.ctx)
        with self._lock:
            self._all.append(child)
        self.idle.put(child)

    def _replace(self, child: _Child) -> None:
        child.stop()
        with self._lock:
            self._all.remove(child)
        self._add()

    def call(self, kind: str, *args: Any) -> Any:
        """Run query_crop ("crop") or thumbnail ("thumb") in a child; ItemError on failure or timeout."""
        try:
            child = self.idle.get(timeout=self.wait_s)
        except queue.Empty:
            raise ItemError("timeout", f"every decoder was busy for {self.wait_s:.0f}s; try again") from None
        try:
            if not child.ready:
                if not child.conn.poll(self.wait_s):
                    self._replace(child)
                    child = None
                    raise ItemError("timeout", f"a decoder did not start in {self.wait_s:.0f}s; try again")
                child.conn.recv()
                child.ready = True
            child.conn.send((kind, args))
            if not child.conn.poll(self.timeout_s):
                self._replace(child)
                child = None
                raise ItemError("timeout", f"decoding took longer than {self.timeout_s:g}s "
                                           "(the run's preprocess.decode_timeout_s, capped by serve --decode-timeout)")
            status, *rest = child.conn.recv()
        except (EOFError, OSError):
            if child is not None:
                self._replace(child)
                child = None
            raise ItemError("unreadable", "the decoder process died on this image") from None
        finally:
            if child is not None:
                self.idle.put(child)
        if status == "ok":
            return rest[0]
        raise ItemError(rest[0], rest[1])

    def close(self) -> None:
        with self._lock:
            children, self._all = self._all, []
        for child in children:
            child.stop()
