"""What the pipeline is measured against: the model-only ceiling and the hand-written designs, each in a spawned process."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np


def _session(model: str, threads: int, engine: str = "ort"):
    """(session, input name, uint8 input?) with `session.run(None, {name: x})[0]`, onnxruntime's call;
    engine "fp32"/"bf16": OpenVINO at that precision (the openvino backend's session) behind the same call."""
    if engine != "ort":
        return _ov_session(model, threads, engine)
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    return sess, sess.get_inputs()[0].name, sess.get_inputs()[0].type == "tensor(uint8)"


class _OvRun:
    """An OpenVINO session behind onnxruntime's `run(None, {name: x})` call, for the bench's jobs."""

    def __init__(self, model: str, threads: int, precision: str):
        from pipeline.backends.openvino import OvSession

        self.s = OvSession(model, precision, threads)

    def run(self, _outputs, feeds: dict) -> list:
        return [self.s.run(next(iter(feeds.values())))]


def _ov_session(model: str, threads: int, precision: str):
    sess = _OvRun(model, threads, precision)
    return sess, "x", sess.s.input_type == "u8"


def _feed(pixels: np.ndarray, uint8_input: bool) -> np.ndarray:
    from pipeline.data.images import normalize

    return pixels if uint8_input else normalize(pixels)


def _ceiling_job(model: str, threads: int, pixels: np.ndarray, batches: int, barrier, engine: str, conn) -> None:
    sess, name, u8 = _session(model, threads, engine)
    x = _feed(pixels, u8)
    sess.run(None, {name: x})  # warm-up (allocations, kernel selection)
    barrier.wait()
    t0 = time.monotonic()
    for _ in range(batches):
        sess.run(None, {name: x})
    conn.send((t0, time.monotonic(), batches * len(pixels)))


def single_loop_job(model: str, threads: int, files: list[str], batch: int, engine: str, conn) -> None:
    """The reference program's CPU path: decode+preprocess a batch (PIL, CLIP transform), infer
    (engine: "ort" = onnxruntime, "fp32"/"bf16" = OpenVINO at that precision)."""
    from pipeline.data.images import DecodeOptions, decode_file, normalize, reference_crop

    sess, name, u8 = _session(model, threads, engine)
    opts = DecodeOptions()
    t_first = n_after = None
    t_start = time.monotonic()
    for lo in range(0, len(files), batch):
        pixels = np.stack([reference_crop(decode_file(os.fsencode(f), opts)) for f in files[lo:lo + batch]])
        sess.run(None, {name: pixels if u8 else normalize(pixels)})
        if t_first is None:
            t_first, n_after = time.monotonic(), len(files) - len(pixels)
    conn.send((t_first, time.monotonic(), n_after, t_start))


def _loader_batch(paths: list[str]) -> np.ndarray:
    """What a DataLoader worker does: reference transform per image, collate to float [B,3,224,224]."""
    from pipeline.data.images import DecodeOptions, decode_file, normalize, reference_crop

    opts = DecodeOptions()
    return normalize(np.stack([reference_crop(decode_file(os.fsencode(p), opts)) for p in paths]))


def dataloader_job(model: str, threads: int, files: list[str], batch: int, workers: int, conn) -> None:
    """torch DataLoader(num_workers=workers, prefetch_factor=2) + model in the main process."""
    sess, name, _ = _session(model, threads)
    batches = [files[lo:lo + batch] for lo in range(0, len(files), batch)]
    ctx = mp.get_context("spawn")
    t_first = n_after = None
    with ctx.Pool(workers) as pool:
        pending = [pool.apply_async(_loader_batch, (b,)) for b in batches[:2 * workers]]
        nxt = len(pending)
        t_start = time.monotonic()
        while pending:
            x = pending.pop(0).get(timeout=600)
            if nxt < len(batches):
                pending.append(pool.apply_async(_loader_batch, (batches[nxt],)))
                nxt += 1
            sess.run(None, {name: x})
            if t_first is None:
                t_first, n_after = time.monotonic(), len(files) - len(x)
    conn.send((t_first, time.monotonic(), n_after, t_start))


def cosine_job(model_a: str, model_b: str, pixels: np.ndarray, conn) -> None:
    out = []
    for m in (model_a, model_b):
        sess, name, u8 = _session(m, 2)
        out.append(sess.run(None, {name: _feed(pixels, u8)})[0].astype(np.float64))
    a, b = out
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    conn.send((float(cos.mean()), float(cos.min())))


def spawn(target: Callable, *args: Any, timeout_s: float = 1800) -> Any:
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=target, args=(*args, send), daemon=False)
    p.start()
    send.close()
    try:
        if not recv.poll(timeout_s):
            raise RuntimeError(f"bench job {target.__name__} gave no result within {timeout_s:.0f}s")
        return recv.recv()
    except EOFError:
        raise RuntimeError(f"bench job {target.__name__} died (exit code {p.exitcode})") from None
    finally:
        p.join(30)
        if p.exitcode is None:
            p.kill()
            p.join()


def model_ceiling(model: str, procs: int, threads: int, pixels: np.ndarray, n_images: int, engine: str = "ort") -> dict:
    """Images/s of `procs` processes x `threads` threads running the model on ready tensors
    (engine: "ort" = onnxruntime, "fp32"/"bf16" = OpenVINO at that precision, "int8" = OpenVINO
    running `model`, an already quantised IR: the openvino backend's `int8_model`)."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(procs)
    batches = max(1, -(-n_images // (procs * len(pixels))))
    pipes, jobs = [], []
    for _ in range(procs):
        recv, send = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_ceiling_job, args=(model, threads, pixels, batches, barrier, engine, send))
        p.start()
        send.close()
        pipes.append(recv)
        jobs.append(p)
    try:
        res = []
        for r in pipes:
            if not r.poll(1800):
                raise RuntimeError("model ceiling job gave no result")
            res.append(r.recv())
    finally:
        for p in jobs:
            p.join(30)
    t0, t1 = min(r[0] for r in res), max(r[1] for r in res)
    n = sum(r[2] for r in res)
    return {"images": n, "seconds": round(t1 - t0, 3), "images_per_s": round(n / (t1 - t0), 3)}


def loop_result(res: tuple) -> dict:
    t_first, t_end, n_after, t_start = res
    return {"images": n_after, "seconds": round(t_end - t_first, 3),
            "images_per_s": round(n_after / (t_end - t_first), 3) if t_end > t_first else None,
            "first_batch_s": round(t_first - t_start, 3)}
