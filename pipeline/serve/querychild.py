"""Image queries for backends the service cannot run in its own process: a persistent child per run.

A backend whose device decodes files itself (`input_kind == "files"`: sail's device mode) or whose
workers run under another interpreter (`Backend.worker_python`: the sim backend, sail on the
cmodel, both TPU-MLIR's Python 3.10) embeds a query image here, as its infer workers embed a run's
inputs: `python -m pipeline.serve.querychild` is started under that interpreter (the way
pipeline/run/pool.py starts such workers), opens the run's device once, then embeds one query at a
time: a crop for a pixels device (the service decoded and cropped it with the run's
preprocessing), a file path for a files device (the device decodes and preprocesses it as it
does the run's inputs). The service waits for each answer up to a deadline; a child that overruns
it is killed, and one that died is started again by the next query.

The protocol is on the child's stdin and on a copy of its stdout taken before anything runs (the
device runtimes print to fd 1; the sim backend points fd 1 at /dev/null): frames of
`>II` (header length, payload length), a JSON header, raw payload bytes. Arrays go as raw bytes
with their shape, never pickled, as the two sides may run different numpy versions; only the
opening message (the run's Config and the device name) is a pickle (protocol 4, as
pipeline/run/pool.py passes worker specs across interpreters). Keep this file Python-3.10-compatible.
"""

from __future__ import annotations

import json
import os
import pickle
import select
import struct
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np

FRAME = struct.Struct(">II")


class ChildFailed(RuntimeError):
    """The child could not answer (it died, overran its deadline, or its device failed)."""


class QueryFailed(ValueError):
    """The device refused this input (a per-item failure, like a run's failures.jsonl entry)."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason, self.message = reason, message


def pack(header: dict, payload: bytes = b"") -> bytes:
    head = json.dumps(header).encode()
    return FRAME.pack(len(head), len(payload)) + head + payload


def _read_exact(fh, n: int) -> bytes:
    """n bytes from a blocking file (the child's side); EOFError at the end."""
    buf = b""
    while len(buf) < n:
        got = fh.read(n - len(buf))
        if not got:
            raise EOFError
        buf += got
    return buf


def read_frame(fh) -> tuple[dict, bytes]:
    hlen, plen = FRAME.unpack(_read_exact(fh, FRAME.size))
    return json.loads(_read_exact(fh, hlen)), _read_exact(fh, plen)


# ------------------------------------------------------------------------------------- the child
def _embed(dev: Any, files: bool, header: dict, payload: bytes) -> np.ndarray:
    from pipeline.backends.base import pad_batch

    if files:
        res = dev.embed_files([0], [os.fsencode(header["path"])])
        if res.failures:
            f = res.failures[0]
            raise QueryFailed(f.reason, f.message)
        return np.asarray(res.embeddings, dtype=np.float32)[:1]
    crop = np.frombuffer(payload, dtype=np.uint8).reshape(header["shape"])[None]
    return np.asarray(dev.embed(pad_batch(crop, dev.batch_size) if dev.fixed_batch else crop)[:1], dtype=np.float32)


def child_main() -> None:
    out = os.fdopen(os.dup(1), "wb", buffering=0)  # the protocol's; fd 1 becomes stderr for the runtimes
    os.dup2(2, 1)
    inp = sys.stdin.buffer

    def send(header: dict, payload: bytes = b"") -> None:
        out.write(pack(header, payload))

    try:
        _, payload = read_frame(inp)
    except EOFError:
        return
    cfg, device = pickle.loads(payload)
    from pipeline.backends import get_backend
    from pipeline.backends.base import DeviceError

    backend = get_backend(cfg.infer.backend)
    files = backend.input_kind(cfg) == "files"
    try:
        dev = backend.open_device(cfg, device)
    except Exception as exc:  # noqa: BLE001 - the service says why image queries are unavailable
        send({"ok": False, "error": f"cannot open {device}: {type(exc).__name__}: {exc}"})
        return
    send({"ok": True, "dim": int(dev.dim), "files": files})
    while True:
        try:
            header, payload = read_frame(inp)
        except EOFError:
            break
        try:
            emb = _embed(dev, files, header, payload)
        except QueryFailed as exc:
            send({"ok": False, "reason": exc.reason, "error": exc.message})
            continue
        except DeviceError as exc:  # the device is not to be trusted any more: the service starts another
            send({"ok": False, "error": f"the device failed: {exc}"})
            break
        except Exception as exc:  # noqa: BLE001 - one query's failure is an answer
            send({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
            continue
        send({"ok": True, "shape": list(emb.shape)}, np.ascontiguousarray(emb, dtype=np.float32).tobytes())
    dev.close()


# ------------------------------------------------------------------------------------ the parent
class QueryChild:
    """One child with the run's device open; `embed` is thread-safe (one query at a time)."""

    def __init__(self, cfg: Any, device: str, python: str | None, *, env: dict[str, str] | None = None,
                 open_timeout_s: float = 300.0, timeout_s: float = 300.0, log=print):
        self.cfg, self.device, self.python = cfg, device, python
        self.extra_env = dict(env or {})
        self.open_timeout_s, self.timeout_s = open_timeout_s, timeout_s
        self.log = log
        self.proc: subprocess.Popen | None = None
        self.files = False
        self.dim = 0
        self.starts = 0
        self.lock = threading.Lock()

    # -- process -----------------------------------------------------------------------------------
    def _start(self) -> None:
        from pipeline.worker.loop import CHECKOUT, subprocess_environ

        python = self.python or sys.executable
        # it ends itself when the service is gone (the supervisor's pid in its environment: pdeath.early_guard)
        env = subprocess_environ(self.extra_env, foreign=bool(self.python))
        self.proc = subprocess.Popen([python, "-m", "pipeline.serve.querychild"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env, cwd=CHECKOUT, bufsize=0)
        self.starts += 1
        try:
            self._send({"op": "open"}, pickle.dumps((self.cfg, self.device), protocol=4))
            header, _ = self._receive(self.open_timeout_s, "opening the device")
        except ChildFailed:
            self._stop()
            raise
        if not header.get("ok"):
            self._stop()
            raise ChildFailed(header.get("error", "the query process could not open the device"))
        self.files, self.dim = bool(header["files"]), int(header["dim"])
        if self.starts > 1:
            self.log(f"serve: the image query process for {self.device} was started again ({self.starts} starts)")

    def _running(self) -> None:
        """Start the child and open its device, unless it is running (the lock held; raises ChildFailed)."""
        if self.proc is None or self.proc.poll() is not None:
            self._stop()
            self._start()

    def _stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        for stream in (proc.stdin, proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        try:
            proc.wait(5)  # stdin closed: it closes its device and exits
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def _send(self, header: dict, payload: bytes = b"") -> None:
        data = memoryview(pack(header, payload))
        try:
            while data:
                data = data[os.write(self.proc.stdin.fileno(), data):]
        except OSError:
            raise ChildFailed(f"the image query process ended ({self._ended()})") from None

    def _ended(self) -> str:
        code = self.proc.poll() if self.proc is not None else None
        if code is None:
            return "it stopped answering"
        return f"exit status {code}" if code >= 0 else f"killed by signal {-code}"

    def _receive(self, timeout_s: float, what: str) -> tuple[dict, bytes]:
        deadline = time.monotonic() + timeout_s
        fd = self.proc.stdout.fileno()

        def exact(n: int) -> bytes:
            buf = b""
            while len(buf) < n:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([fd], [], [], left)[0]:
                    self.proc.kill()
                    raise ChildFailed(f"{what} took longer than {timeout_s:g}s; the query process was stopped "
                                      "(serve --image-timeout)")
                got = os.read(fd, n - len(buf))
                if not got:
                    self.proc.wait(5)
                    raise ChildFailed(f"the image query process ended while {what} ({self._ended()}); "
                                      "the service's log has its output")
                buf += got
            return buf

        hlen, plen = FRAME.unpack(exact(FRAME.size))
        return json.loads(exact(hlen)), exact(plen)

    # -- queries -----------------------------------------------------------------------------------
    def open(self) -> None:
        """Start the child and open its device, when not running (raises ChildFailed)."""
        with self.lock:
            self._running()

    def embed(self, crop: np.ndarray | None = None, path: str | None = None) -> np.ndarray:
        """float32 [dim] of one query: `path` for a files device, else `crop` (S x S x 3 uint8).
        ChildFailed when the child cannot answer, QueryFailed when the device refuses the input."""
        with self.lock:
            self._running()
            if self.files:
                self._send({"op": "embed", "path": path})
            else:
                crop = np.ascontiguousarray(crop, dtype=np.uint8)
                self._send({"op": "embed", "shape": list(crop.shape)}, crop.tobytes())
            try:
                header, payload = self._receive(self.timeout_s, "embedding the image")
            except ChildFailed:
                self._stop()
                raise
            if not header.get("ok"):
                if "reason" in header:
                    raise QueryFailed(header["reason"], header["error"])
                self._stop()  # a failed device: the next query starts a fresh child
                raise ChildFailed(header.get("error", "the device failed"))
            return np.frombuffer(payload, dtype=np.float32).reshape(header["shape"])[0]

    def close(self) -> None:
        with self.lock:
            self._stop()


if __name__ == "__main__":
    from pipeline.worker.pdeath import early_guard

    early_guard()
    child_main()
