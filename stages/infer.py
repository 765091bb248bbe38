"""Infer stage: batch 224x224 crops (or file paths) per device and embed them.

One process per device. Items arrive one per message; the Batcher gathers them into batches of
the device's batch size, flushing a partial batch after `infer.batch_timeout_ms` without new
input. Fixed-batch models (bmodels) get zero-padded batches; padding rows never leave this stage.
Completion is not signalled through this stage: the supervisor counts resolved ids at the sink.

With `infer.overlap` the device call (`Device.embed` / `Device.run_prepared`) runs on one background
thread, at most one batch in flight, while the loop thread receives and prepares the next batch
(stacking/padding crops, or `Device.prepare_files`: hardware decode + crop). Results leave in batch
order and only the loop thread sends. The background thread writes a byte to a pipe when it
finishes (`wake_fd`, polled by the worker loop), so results are sent at once, without polling.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from pipeline.backends import get_backend
from pipeline.backends.base import DeviceError
from pipeline.wire import messages
from pipeline.wire.messages import Failure
from pipeline.wire.transport import array_from
from stages.base import Output, StageCore, fail


@dataclass
class Batch:
    ids: list[int] = field(default_factory=list)
    paths: list[bytes] = field(default_factory=list)
    arrays: list[np.ndarray] = field(default_factory=list)
    started: float = 0.0
    pixels: np.ndarray | None = None  # the whole batch as one array, when it arrived as one message

    def __len__(self) -> int:
        return len(self.ids)


class Batcher:
    """Pure batching logic: add items, take a batch when full or when the timeout has passed."""

    def __init__(self, batch_size: int, timeout_s: float):
        self.batch_size = batch_size
        self.timeout_s = timeout_s
        self.pending = Batch()

    def add(self, item_id: int, path: bytes, arr: np.ndarray | None, now: float) -> Batch | None:
        if not self.pending:
            self.pending.started = now
        self.pending.ids.append(item_id)
        self.pending.paths.append(path)
        if arr is not None:
            self.pending.arrays.append(arr)
        return self.take() if len(self.pending) >= self.batch_size else None

    def deadline(self) -> float | None:
        return self.pending.started + self.timeout_s if self.pending else None

    def due(self, now: float) -> bool:
        return bool(self.pending) and now >= self.pending.started + self.timeout_s

    def take(self) -> Batch:
        batch, self.pending = self.pending, Batch()
        return batch


def pad_batch(pixels: np.ndarray, batch_size: int) -> np.ndarray:
    """Zero-pad [n,...] to [batch_size,...] for fixed-batch models."""
    n = pixels.shape[0]
    if n == batch_size:
        return pixels
    if n > batch_size:
        raise ValueError(f"batch of {n} exceeds the model's fixed batch {batch_size}")
    out = np.zeros((batch_size, *pixels.shape[1:]), dtype=pixels.dtype)
    out[:n] = pixels
    return out


def l2_normalize(emb: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    return emb / np.maximum(norms, 1e-12)


class _Job:
    __slots__ = ("batch", "payload", "since", "done", "result", "exc")

    def __init__(self, batch: Batch, payload: Any, since: float):
        self.batch, self.payload, self.since = batch, payload, since
        self.done = threading.Event()
        self.result: Any = None
        self.exc: BaseException | None = None


class BackgroundRunner:
    """One daemon thread running fn(payload) for at most one job at a time.

    `submit` hands a job over; `take(block)` returns the finished job (or None) and clears the slot;
    the job's exception, if any, is re-raised by `take` on the caller's (loop) thread. A byte is
    written to a pipe when a job finishes: `fileno()` is for the loop's poller, `clear_wake()`
    drains it. The thread is a daemon: a hung device call never keeps the process alive.
    """

    def __init__(self, fn: Callable[[Any], Any], name: str):
        self.fn = fn
        self.inflight: _Job | None = None
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self._closed = False
        self.run_s = 0.0  # cumulative seconds the device call ran (the stage's busy time)
        self.calls_running = 0
        self._thread = threading.Thread(target=self._main, daemon=True, name=name)
        self._thread.start()

    def _main(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            t0 = time.monotonic()
            self.calls_running += 1
            try:
                job.result = self.fn(job.payload)
            except BaseException as exc:  # noqa: BLE001 - re-raised on the loop thread by take()
                job.exc = exc
            finally:
                self.calls_running -= 1
            self.run_s += time.monotonic() - t0
            job.done.set()
            if not self._closed:
                try:
                    os.write(self._w, b"x")
                except OSError:  # pipe full (a wake-up is pending anyway) or closed at exit
                    pass

    def submit(self, job: _Job) -> None:
        if self.inflight is not None:
            raise RuntimeError("a batch is already in flight")
        self.inflight = job
        self._jobs.put(job)

    def take(self, block: bool) -> _Job | None:
        job = self.inflight
        if job is None or (not block and not job.done.is_set()):
            return None
        job.done.wait()  # the device call has its own timeouts (sail.timeout_s); stalls: supervisor
        self.inflight = None
        if job.exc is not None:
            raise job.exc
        return job

    def fileno(self) -> int:
        return self._r

    def clear_wake(self) -> None:
        try:
            while os.read(self._r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def close(self, timeout: float | None = None) -> None:
        """Stop the thread, letting an in-flight call finish (for up to `timeout` seconds; the device
        is closed after this). Tearing a device library down under a running call printed native
        errors on Ctrl-C (onnxruntime: "GetElementType is not implemented", "terminate called
        without an active exception"), so the default is to wait: a hung call is the supervisor's
        business (run.stall_timeout_s, then SIGKILL). A call still running after `timeout` is left
        behind (daemon) together with the pipe."""
        self._jobs.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            return
        self._closed = True
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass


class InferCore(StageCore):
    """Infer worker core: owns one device (opened in setup, inside this process)."""

    def __init__(self, spec, slot):
        super().__init__()
        self.spec = spec
        self.cfg = spec.cfg
        self.slot = slot
        self.device = None
        self.batcher: Batcher | None = None
        self.runner: BackgroundRunner | None = None
        self.files_mode = False
        self.serial_calls = 0  # a device call running on the loop thread (infer.overlap off)

    def in_device_call(self) -> bool:
        return bool(self.serial_calls or (self.runner is not None and self.runner.calls_running))

    def setup(self) -> None:
        backend = get_backend(self.cfg.infer.backend)
        self.files_mode = backend.input_kind(self.cfg) == "files"
        self.device = backend.open_device(self.cfg, self.spec.device)
        self.batcher = Batcher(self.device.batch_size, self.cfg.infer.batch_timeout_ms / 1000.0)
        if self.cfg.infer.overlap:
            self.runner = BackgroundRunner(self._execute, name=f"infer-run-{self.spec.device}")
        self.info = {"device": self.spec.device, "batch_size": self.device.batch_size,
                     "fixed_batch": self.device.fixed_batch, "dim": self.device.dim,
                     "overlap": self.runner is not None}

    def busy_s(self) -> float | None:
        """With overlap, the stage's busy time is the device's (the loop's own work overlaps it)."""
        return None if self.runner is None else self.runner.run_s

    def wake_fd(self) -> int | None:
        """A file descriptor the worker loop polls: readable when an in-flight batch has finished."""
        return None if self.runner is None else self.runner.fileno()

    def handle(self, header: dict, frames: list):
        if header["t"] in ("pxs", "items"):
            return self.handle_group(header, frames)
        if header.get("suspect") and self.files_mode:
            return self.run_alone(header["id"], header["path"])
        arr = None if self.files_mode else array_from(header, frames[0])
        batch = self.batcher.add(header["id"], header["path"], arr, time.monotonic())
        return self.run(batch) if batch is not None else ()

    def handle_group(self, header: dict, frames: list) -> list:
        """Several inputs in one message (crops stacked [n,224,224,3], or paths in files mode)."""
        pixels = None if self.files_mode else array_from(header, frames[0])
        outputs: list = []
        now = time.monotonic()
        if pixels is not None and not self.batcher.pending and len(pixels) == self.batcher.batch_size:
            # a whole batch in one message: infer on the received buffer, no per-row copy
            return self.run(Batch(ids=list(header["ids"]), paths=list(header["paths"]), started=now, pixels=pixels))
        for k, (item_id, path) in enumerate(zip(header["ids"], header["paths"])):
            batch = self.batcher.add(item_id, path, None if pixels is None else pixels[k], now)
            if batch is not None:
                outputs.extend(self.run(batch))
        if header.get("tail") and self.batcher.pending:
            # a piece of the run's tail (pipeline/wire/dispatch.py): run it now; waiting to fill a batch
            # (or for batch_timeout_ms) would idle this device while the others finish
            outputs.extend(self.run(self.batcher.take()))
        return outputs

    def run_alone(self, item_id: int, path: bytes) -> list:
        """A re-issued input that was held when this kind of process died (files mode: the device
        process decodes files itself, and e.g. a bmcv error in SAIL's preprocess threads aborts it).
        It runs in a batch of its own, with nothing else in flight, so that if it kills the process
        again only it is charged and it fails as crashed_worker, not the inputs batched with it."""
        outputs = self.run(self.batcher.take()) if self.batcher.pending else []
        outputs.extend(self.collect(block=True))
        outputs.extend(self._run_serial(Batch(ids=[item_id], paths=[path], started=time.monotonic())))
        return outputs

    def flush(self, now: float):
        outputs = self.collect(block=False)
        if self.batcher.due(now):
            outputs.extend(self.run(self.batcher.take()))
        return outputs

    def deadline(self) -> float | None:
        # An in-flight batch needs no deadline: its completion wakes the loop through wake_fd().
        return self.batcher.deadline()

    # --- the two halves of a batch --------------------------------------------------------------
    def _prepare(self, batch: Batch) -> Any:
        """Host side (loop thread): stack/pad the crops, or decode + crop the files."""
        if self.files_mode:
            return self.device.prepare_files(batch.ids, batch.paths)
        pixels = batch.pixels if batch.pixels is not None else np.stack(batch.arrays)
        if self.device.fixed_batch:
            pixels = pad_batch(pixels, self.device.batch_size)
        return pixels

    def _execute(self, prepared: Any) -> Any:
        """Device side (the background thread with overlap): inference only."""
        if self.files_mode:
            return self.device.run_prepared(prepared)
        return self.device.embed(prepared)

    def run(self, batch: Batch) -> list:
        if self.runner is None:
            return self._run_serial(batch)
        job = self.runner.inflight
        t0 = time.monotonic()
        # the slot holds everything this process holds: the batch in flight and the one prepared
        self.slot.begin((job.batch.ids if job else []) + list(batch.ids))
        if job is not None:
            self.slot.floats[0] = job.since  # busy since the oldest unit still held
        payload = self._prepare(batch)
        outputs = self.collect(block=True)  # the previous batch: results stay in order
        self.slot.begin(batch.ids)
        self.slot.floats[0] = t0
        self.runner.submit(_Job(batch, payload, t0))
        return outputs

    def collect(self, block: bool) -> list:
        """Outputs of the in-flight batch once it has finished (waits for it when block)."""
        if self.runner is None:
            return []
        self.runner.clear_wake()
        job = self.runner.take(block)  # re-raises the device call's DeviceError here
        if job is None:
            return []
        if self.runner.inflight is None:
            self.slot.end()
        return self._finish(job.batch, job.result)

    def _run_serial(self, batch: Batch) -> list:
        self.slot.begin(batch.ids)
        self.serial_calls += 1
        try:
            if self.files_mode:
                result = self.device.embed_files(batch.ids, batch.paths)
            else:
                result = self._execute(self._prepare(batch))
        finally:
            self.serial_calls -= 1
            self.slot.end()
        return self._finish(batch, result)

    def _finish(self, batch: Batch, result: Any) -> list[Output]:
        if self.files_mode:
            path_of = dict(zip(batch.ids, batch.paths))
            ids, paths, emb = result.ids, [path_of[i] for i in result.ids], result.embeddings
            outputs = [fail(replace(f, stage="infer")) for f in result.failures]
        else:
            emb = result[:len(batch)]
            ids, paths, outputs = batch.ids, batch.paths, []
        emb = np.asarray(emb, dtype=np.float32)
        if emb.shape != (len(ids), self.device.dim):
            raise DeviceError(f"device {self.spec.device} returned shape {emb.shape}, expected {(len(ids), self.device.dim)}")
        finite = np.isfinite(emb).all(axis=1)
        if not finite.all():
            for i in np.flatnonzero(~finite):
                outputs.append(fail(Failure(ids[i], paths[i], "non_finite", "model output has NaN/inf", "infer")))
            keep = np.flatnonzero(finite)
            ids, paths, emb = [ids[i] for i in keep], [paths[i] for i in keep], emb[keep]
        if self.cfg.output.normalize:
            emb = l2_normalize(emb)
        emb = np.ascontiguousarray(emb, dtype=np.float32)
        if ids:
            outputs.append(("sink", *messages.embeddings(ids, paths, emb)))
        return outputs

    def close(self) -> None:
        if self.runner is not None:
            self.runner.close(self.cfg.run.stall_timeout_s)  # the call in flight returns first
        if self.device is not None:
            self.device.close()
