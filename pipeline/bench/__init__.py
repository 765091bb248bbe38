"""`clip-pipeline bench`: the pipeline against its ceilings and the designs people write by hand.

Every case runs in one invocation on the same machine and inputs, repeated and interleaved
(`--repeats`), so ratios are taken between runs that saw the same background load; medians are
reported. Cases:

  cpu     1. model-only ceiling: the same model, processes and threads fed pre-decoded tensors
          2. clip-pipeline end to end on a directory of JPEGs (a real run, shards written)
          2b. the same run with decode replaced by ready crops (fake.ready_crops): what the
             orchestration reaches without the host's decode work, which splits 1 - 2/1 into
             decode (2b - 2) and everything else (1 - 2b)
          3. a single-process loop like the reference program's CPU path (decode + preprocess a
             batch with PIL, then infer with every core, repeat)
          4. a torch-DataLoader-style baseline (worker processes doing reference preprocessing
             into float batches, the main process inferring); torch itself is not needed
          + optional int8 model: its ceiling, end to end, and its cosine vs the fp32 model
  fake    fake devices with an accelerator's batch latency, decode replaced by ready crops
          (fake.ready_crops, bench-only): images/s vs the devices' ceiling, host CPU s / 1000 img
  memory  peak RSS/PSS of the whole process tree for growing input counts (fake backend)

Throughput of a pipeline run is the steady rate from the moment every device has delivered its
first batch to the last result; start-up
(spawn, model load) is reported separately as time to first embedding. Baselines are timed from
the end of their first batch, ceilings after a warm-up batch, so every figure excludes model load.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import platform
import resource
import shutil
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import numpy as np

SCHEMA = "clip-pipeline-bench/1"
REPO = Path(__file__).resolve().parents[2]
DEFAULT_CORPUS = REPO.parent / "shared" / "bench" / "corpus-1k"
BM1684X_MS_PER_IMAGE_B32 = 1.66  # bmrt_test compute, 32-batch fp16 bmodel (docs/performance.md, "Baselines")


# -- machine and process-tree measurements ---------------------------------------------------------
def machine_info() -> dict[str, Any]:
    from pipeline.run.telemetry import software_versions

    model = ""
    family = {}  # "cpu family" / "model": names the core generation where "model name" does not
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key = line.split(":", 1)[0].strip()
            if key == "model name" and not model:
                model = line.split(":", 1)[1].strip()
            elif key in ("cpu family", "model") and key not in family:
                family[key] = line.split(":", 1)[1].strip()
            elif not line.strip() and model:
                break
    except OSError:
        pass
    flags = ""
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags_line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
        have = set(flags_line.split(":", 1)[-1].split())
        flags = " ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in have)
    except OSError:
        pass
    mem = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {"cpu_model": model, "cpu_family_model": f"{family.get('cpu family', '?')}/{family.get('model', '?')}",
            "cpu_flags": flags, "logical_cpus": os.cpu_count(),
            "nice": os.nice(0),  # the bench's scheduling priority (e.g. run under `nice -n -5`)
            "usable_cpus": len(os.sched_getaffinity(0)), "mem_total_gib": round(mem / 2**30, 1),
            "kernel": platform.release(), "loadavg_start": list(os.getloadavg()),
            "versions": software_versions()}


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                out += [int(x) for x in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
            except OSError:
                pass
    except OSError:
        pass
    return out


def tree_pids(root: int | None = None) -> list[int]:
    todo, seen = [root or os.getpid()], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo += _children(p)
    return seen


def _mem_kib(pid: int) -> tuple[int, int]:
    """(Rss, Pss) of one process in KiB from smaps_rollup (0, 0 if it is gone)."""
    rss = pss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
    except (OSError, ValueError):
        pass
    return rss, pss


_PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


def _rss_kib(pid: int) -> int:
    """Resident set of one process in KiB from statm (O(1) for the kernel; 0 if it is gone)."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE_KIB
    except (OSError, IndexError, ValueError):
        return 0


class TreeMemory(threading.Thread):
    """Samples CPU time and RSS summed over this process and all its descendants (peaks kept), and
    PSS every `pss_interval_s`.

    The sampler runs in the measured process tree, so what it costs is charged to the run it
    measures (the ceilings and baselines have no sampler). CPU ticks (/proc/PID/stat) and RSS
    (/proc/PID/statm) are O(1) reads; PSS needs smaps_rollup, which walks every mapping of the
    process: 6-17 ms per ViT-B/32 inference process (measured), so at 4 Hz over a 2-device tree it
    took ~10% of a core, ~5% of a 2-core host, charged to the pipeline alone (issue #20). So PSS
    is sampled every 5 s by default (~0.3% of a core), and at most twice a second while the tree's
    RSS grows by 5% (start-up); the memory case, which reports PSS and no throughput ratio,
    samples it at 4 Hz.
    """

    def __init__(self, interval_s: float = 0.25, pss_interval_s: float = 5.0):
        super().__init__(daemon=True)
        self.interval_s = interval_s
        self.pss_interval_s = pss_interval_s
        self.peak_rss = self.peak_pss = 0
        self.peak_procs = 0
        self.cpu: list[tuple[float, float]] = []  # (time, CPU seconds of the live tree)
        self._last_pss = float("-inf")
        self._rss_at_pss = 0
        self._stop_evt = threading.Event()

    def run(self) -> None:
        while not self._stop_evt.is_set():
            self.sample()
            self._stop_evt.wait(self.interval_s)

    def sample(self) -> None:
        pids = tree_pids()
        now = time.monotonic()
        rss = ticks = 0
        for p in pids:
            rss += _rss_kib(p)
            ticks += _cpu_ticks(p)
        self.cpu.append((now, ticks / _CLK_TCK))
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_procs = max(self.peak_procs, len(pids))
        # PSS every pss_interval_s, and sooner (at most 2 Hz) while the tree grows by 5% (start-up:
        # model loads), so a short run's peak is not missed between two interval samples.
        since = now - self._last_pss
        if since >= self.pss_interval_s or (since >= 0.5 and rss > 1.05 * self._rss_at_pss):
            self._last_pss, self._rss_at_pss = now, rss
            self.peak_pss = max(self.peak_pss, sum(_mem_kib(p)[1] for p in pids))

    def stop(self) -> dict[str, float]:
        self._stop_evt.set()
        if self.ident is not None:  # started (a sampler driven by hand has no thread to join)
            self.join(5)
        return {"peak_tree_rss_mib": round(self.peak_rss / 1024, 1), "peak_tree_pss_mib": round(self.peak_pss / 1024, 1),
                "peak_processes": self.peak_procs, "pss_interval_s": self.pss_interval_s}


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _cpu_ticks(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime, stime
    except (OSError, IndexError, ValueError):
        return 0


def steady_cpu_rate(samples: list[tuple[float, float]], t_a: float, t_b: float) -> float | None:
    """Host CPU seconds per second between t_a and t_b, from the tree samples inside that window."""
    inside = [s for s in samples if t_a <= s[0] <= t_b]
    if len(inside) < 2 or inside[-1][0] - inside[0][0] < 0.5:
        return None
    return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])


def _cpu_seconds() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


class BenchUsageError(click.ClickException):
    """A usage problem (missing corpus or model): one line on stderr, exit 2, like `run`'s errors."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


# -- inputs ---------------------------------------------------------------------------------------
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


# -- subprocess jobs (spawned, so every measurement starts from a clean interpreter) -------------
def _session(model: str, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    return sess, sess.get_inputs()[0].name, sess.get_inputs()[0].type == "tensor(uint8)"


def _feed(pixels: np.ndarray, uint8_input: bool) -> np.ndarray:
    from pipeline.data.images import normalize

    return pixels if uint8_input else normalize(pixels)


def _ceiling_job(model: str, threads: int, pixels: np.ndarray, batches: int, barrier, conn) -> None:
    sess, name, u8 = _session(model, threads)
    x = _feed(pixels, u8)
    sess.run(None, {name: x})  # warm-up (allocations, kernel selection)
    barrier.wait()
    t0 = time.monotonic()
    for _ in range(batches):
        sess.run(None, {name: x})
    conn.send((t0, time.monotonic(), batches * len(pixels)))


def _single_loop_job(model: str, threads: int, files: list[str], batch: int, conn) -> None:
    """The reference program's CPU path: decode+preprocess a batch (PIL, CLIP transform), infer."""
    from pipeline.data.images import DecodeOptions, decode_file, normalize, reference_crop

    sess, name, u8 = _session(model, threads)
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


def _dataloader_job(model: str, threads: int, files: list[str], batch: int, workers: int, conn) -> None:
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


def _cosine_job(model_a: str, model_b: str, pixels: np.ndarray, conn) -> None:
    out = []
    for m in (model_a, model_b):
        sess, name, u8 = _session(m, 2)
        out.append(sess.run(None, {name: _feed(pixels, u8)})[0].astype(np.float64))
    a, b = out
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    conn.send((float(cos.mean()), float(cos.min())))


def _spawn(target: Callable, *args: Any, timeout_s: float = 1800) -> Any:
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


def model_ceiling(model: str, procs: int, threads: int, pixels: np.ndarray, n_images: int) -> dict:
    """Images/s of `procs` processes x `threads` threads running the model on ready tensors."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(procs)
    batches = max(1, -(-n_images // (procs * len(pixels))))
    pipes, jobs = [], []
    for _ in range(procs):
        recv, send = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_ceiling_job, args=(model, threads, pixels, batches, barrier, send))
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


def _loop_result(res: tuple) -> dict:
    t_first, t_end, n_after, t_start = res
    return {"images": n_after, "seconds": round(t_end - t_first, 3),
            "images_per_s": round(n_after / (t_end - t_first), 3) if t_end > t_first else None,
            "first_batch_s": round(t_first - t_start, 3)}


# -- pipeline runs ----------------------------------------------------------------------------------
def run_pipeline(raw: dict, pss_interval_s: float = 5.0) -> dict:
    """One real `clip-pipeline run` in-process (the supervisor here, workers spawned); the tree's
    PSS is sampled every `pss_interval_s` (see TreeMemory: it costs the run CPU)."""
    from pipeline import config as cfgmod
    from pipeline.run.progress import Progress
    from pipeline.run.supervisor import Supervisor

    marks: list[tuple[float, int]] = []  # (time, inputs) of every `resolved` (Supervisor's on_resolved hook)
    cfg = cfgmod.from_dict(raw, source="<bench>")
    sup = Supervisor(cfg, restart=True, progress=Progress("none", 60), log=lambda m: None,
                     on_resolved=lambda t, n: marks.append((t, n)))
    mem = TreeMemory(pss_interval_s=pss_interval_s)
    cpu0 = _cpu_seconds()
    mem.start()
    t0 = time.monotonic()
    result = sup.run()
    t1 = time.monotonic()
    memory = mem.stop()
    cpu_s = _cpu_seconds() - cpu0
    if result.exit_code != 0:
        raise RuntimeError(f"bench pipeline run failed (exit {result.exit_code}): {result.message}")
    n = result.counts["embedded"] + result.counts["failed"]
    # The steady window opens once every device has delivered its first (warm-up) batch, as the
    # ceilings and baselines exclude theirs: at the first result resolved after every device that
    # took work sent its first (the devices' own clocks: CLOCK_MONOTONIC is system-wide). Without
    # those stamps: the k-th result (results come per batch or per tail piece).
    k = max(1, min(len(sup.devices), len(marks) - 1))
    firsts = [d["first_result_s"] for d in device_timelines(sup, 0.0, t1).values() if d["first_result_s"]]
    if firsts:
        later = [i for i, m in enumerate(marks) if m[0] >= max(firsts)]
        k = max(1, min(later[0] + 1 if later else len(marks) - 1, len(marks) - 1))
    t_first, n_first = marks[k - 1][0], sum(m[1] for m in marks[:k])
    t_last = marks[-1][0]
    steady = (n - n_first) / (t_last - t_first) if t_last > t_first else None
    cpu_rate = steady_cpu_rate(mem.cpu, t_first, t_last)
    # from the very first result (includes the second device's slow first batch: start-up skew)
    n0 = marks[0][1]
    from_first = (n - n0) / (t_last - marks[0][0]) if t_last > marks[0][0] else None
    return {"images": n, "wall_s": round(t1 - t0, 3), "images_per_s_wall": round(n / (t1 - t0), 3),
            "images_per_s": round(steady, 3) if steady else None,
            "images_per_s_from_first_result": round(from_first, 3) if from_first else None,
            "steady_window_s": [round(t_first - t0, 3), round(t_last - t0, 3)],
            "resolved_timeline": [[round(t - t0, 3), k] for t, k in marks],
            "devices": device_timelines(sup, t0, t_last),
            "time_to_first_embedding_s": round(t_first - t0, 3),
            "host_cpu_s": round(cpu_s, 3), "host_cpu_s_per_1000_incl_startup": round(1000 * cpu_s / n, 3),
            "host_cpu_cores_steady": round(cpu_rate, 3) if cpu_rate else None,
            "host_cpu_s_per_1000": round(1000 * cpu_rate / steady, 3) if cpu_rate and steady else None, **memory,
            "dispatch": sup.dispatch_summary()}


def device_timelines(sup: Any, t0: float, t_end: float) -> dict[str, dict]:
    """Per inference process (from its last stats): images taken, seconds its device was busy,
    its first and last result (seconds from the run's start; CLOCK_MONOTONIC is system-wide), and
    how long it sat idle at the end while another device still worked (its share of the tail)."""
    out: dict[str, dict] = {}
    for w in sup.workers.values():
        if w.role != "infer":
            continue
        st = sup.telemetry.stats.get(w.name, {})
        first, last = st.get("first_result_t"), st.get("last_result_t")
        out[str(w.device)] = {
            "images": int(st.get("in", 0)), "busy_s": round(float(st.get("busy_s", 0.0)), 3),
            "first_result_s": round(first - t0, 3) if first else None,
            "last_result_s": round(last - t0, 3) if last else None,
            "idle_at_end_s": round(max(0.0, t_end - last), 3) if last else None}
    return out


def pipeline_raw(inputs: Path, out: Path, **sections: dict) -> dict:
    raw: dict = {"input": {"paths": [str(inputs)]}, "output": {"dir": str(out), "on_existing": "restart"},
                 "run": {"progress": "none"}}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw


def _median(runs: list[dict], key: str) -> float | None:
    vals = [r[key] for r in runs if r.get(key) is not None]
    return round(statistics.median(vals), 3) if vals else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


# -- cases ---------------------------------------------------------------------------------------------
def case_cpu(p: dict, work: Path, say: Callable[[str], None]) -> dict:
    """The four designs (and the int8 pair) at each run length of --cpu-lengths, interleaved:
    repeat r runs every length once, and within a length the cases back to back, so every ratio
    is taken between runs that saw the same load. One length: the summary as before; several:
    one summary per length under "lengths" (start-up, steady state and tail each show)."""
    lengths = p.get("cpu_lengths") or [p["cpu_images"]]
    batch, reps = p["batch"], p["repeats"]
    pixels = reference_batch(jpeg_files(p["images"], batch))
    runs: dict[int, list[dict]] = {n: [] for n in lengths}
    for rep in range(reps):
        for n in lengths:
            runs[n].append(_cpu_rep(p, work, n, pixels, f"cpu rep {rep + 1}/{reps}, {n} images", say))
    out = {n: _cpu_summary(p, n, runs[n]) for n in lengths}
    extra: dict = {}
    pipe_model = p["pipeline_model"] or p["model"]
    if pipe_model != p["model"]:
        mean, low = _spawn(_cosine_job, p["model"], pipe_model, pixels)
        extra["pipeline_model_cosine_vs_baseline_model"] = {"mean": mean, "min": low}
    if p["int8_model"]:
        mean, low = _spawn(_cosine_job, p["model"], p["int8_model"], pixels)
        extra["int8_cosine_vs_fp32"] = {
            "mean": round(mean, 6), "min": round(low, 6), "images": len(pixels),
            "note": "on synthetic random weights; trained CLIP weights usually quantise worse: measure on yours"}
    if len(lengths) == 1:
        return {**out[lengths[0]], **extra}
    return {"setup": {**out[lengths[0]]["setup"], "images": list(lengths)}, "repeats": reps,
            "lengths": {str(n): out[n] for n in lengths}, **extra}


def _cpu_rep(p: dict, work: Path, n: int, pixels: np.ndarray, label: str, say: Callable[[str], None]) -> dict:
    batch, procs, threads = p["batch"], p["cpu_procs"], p["cpu_threads"]
    cores = len(os.sched_getaffinity(0))
    files = jpeg_files(p["images"], n)
    inputs = work / f"cpu-inputs-{n}"
    if not inputs.exists():
        link_inputs(files, inputs)
    pipe_model = p["pipeline_model"] or p["model"]
    devices = [f"cpu:{i}" for i in range(procs)]

    def pipe_raw(model: str, ready_crops: bool = False) -> dict:
        return pipeline_raw(inputs, work / "cpu-out", model={"path": model, "batch_size": batch},
                            preprocess={"mode": p["mode"]}, infer={"backend": "cpu", "devices": devices, "threads": threads},
                            workers={"decode": p["decode_workers"], "items_per_message": p["items_per_message"]},
                            queues={"infer": 2 * batch, "decode": 2 * p["items_per_message"]},
                            fake={"ready_crops": ready_crops})

    r: dict = {"load_before": list(os.getloadavg())}
    say(f"{label}: model-only ceiling ({procs} x {threads} threads)")
    r["ceiling"] = model_ceiling(pipe_model, procs, threads, pixels, n)
    say(f"{label}: clip-pipeline end to end")
    r["pipeline"] = run_pipeline(pipe_raw(pipe_model))
    say(f"{label}: clip-pipeline, decode replaced by ready crops")
    r["pipeline_ready_crops"] = run_pipeline(pipe_raw(pipe_model, ready_crops=True))
    say(f"{label}: single-process loop")
    r["single_loop"] = _loop_result(_spawn(_single_loop_job, p["model"], cores, [str(f) for f in files], batch))
    say(f"{label}: DataLoader-style baseline")
    r["dataloader"] = _loop_result(_spawn(_dataloader_job, p["model"], cores, [str(f) for f in files], batch, cores))
    if p["int8_model"]:
        say(f"{label}: int8 ceiling and end to end")
        r["int8_ceiling"] = model_ceiling(p["int8_model"], procs, threads, pixels, 2 * n)
        r["int8_pipeline"] = run_pipeline(pipe_raw(p["int8_model"]))
    r["load_after"] = list(os.getloadavg())
    return r


# The cpu case's ratios (run key / run key), per run and of the medians; scripts/pool_cpu_sweeps.py
# pools the same ones. 2b (pipeline_ready_crops) only where a run has it (older results do not).
CPU_RATIOS = (("pipeline", "ceiling"), ("pipeline", "single_loop"), ("pipeline", "dataloader"),
              ("pipeline_ready_crops", "ceiling"))


def _cpu_summary(p: dict, n: int, runs: list[dict]) -> dict:
    batch, procs, threads = p["batch"], p["cpu_procs"], p["cpu_threads"]
    cores = len(os.sched_getaffinity(0))
    pipe_model = p["pipeline_model"] or p["model"]
    med = {k: _median([r[k] for r in runs], "images_per_s") for k in runs[0] if isinstance(runs[0][k], dict)}
    per_run = [{f"{a}/{b}": _ratio(r[a]["images_per_s"], r[b]["images_per_s"]) for a, b in CPU_RATIOS if a in r}
               for r in runs]
    pipes = [r["pipeline"] for r in runs]
    out: dict = {
        "setup": {"images": n, "batch": batch, "preprocess_mode": p["mode"], "pipeline_model": pipe_model,
                  "baseline_model": p["model"], "int8_model": p["int8_model"],
                  "devices": [f"cpu:{i}" for i in range(procs)],
                  "threads_per_device": threads, "decode_workers": p["decode_workers"],
                  "items_per_message": p["items_per_message"], "baseline_threads": cores,
                  "dataloader_workers": cores},
        "runs": runs,
        "median_images_per_s": med,
        "ratios": {f"{a}/{b}": _ratio(med[a], med[b]) for a, b in CPU_RATIOS if a in med},
        "ratios_median_of_runs": {k: _median([{"v": r[k]} for r in per_run], "v") for k in per_run[0]},
        "per_run_ratios": per_run,
        "pipeline_from_first_result_images_per_s": _median(pipes, "images_per_s_from_first_result"),
        "host_cpu_cores_steady": _median(pipes, "host_cpu_cores_steady"),
        "tail_s": round(statistics.median(r["dispatch"]["tail_s"] for r in pipes), 3),
        "time_to_first_embedding_s": _median(pipes, "time_to_first_embedding_s"),
        "peak_tree_rss_mib": _median(pipes, "peak_tree_rss_mib"),
        "peak_tree_pss_mib": _median(pipes, "peak_tree_pss_mib"),
    }
    if p["int8_model"]:
        out["ratios"]["int8_pipeline/ceiling"] = _ratio(med["int8_pipeline"], med["int8_ceiling"])
        out["ratios"]["int8_pipeline/single_loop"] = _ratio(med["int8_pipeline"], med["single_loop"])
    return out


def case_fake(p: dict, work: Path, say: Callable[[str], None]) -> dict:
    batch = 32
    latency_ms = BM1684X_MS_PER_IMAGE_B32 * batch
    per_device = batch * 1000.0 / latency_ms
    out: dict = {"setup": {"batch": batch, "latency_ms_per_batch": round(latency_ms, 2),
                           "ceiling_per_device_images_per_s": round(per_device, 1),
                           "decode_workers": p["fake_decode_workers"], "items_per_message": p["fake_items_per_message"],
                           "input": "fake.ready_crops (decode/preprocess replaced by a ready uint8 crop)"},
                 "devices": {}}
    for ndev in p["fake_devices"]:
        n = int(p["fake_seconds"] * per_device * ndev)
        n = max(n, 4 * batch * ndev)
        inputs = empty_inputs(n, work / f"fake-inputs-{n}")
        raw = pipeline_raw(inputs, work / "fake-out", model={"batch_size": batch},
                           infer={"backend": "fake", "devices": [f"cpu:{i}" for i in range(ndev)]},
                           fake={"latency_ms_per_batch": latency_ms, "ready_crops": True},
                           workers={"decode": p["fake_decode_workers"], "items_per_message": p["fake_items_per_message"]},
                           output={"shard_size": 4096})
        # infer.overlap: the config default, one setting, or both interleaved run by run
        variants = {"default": [None], "on": [True], "off": [False], "both": [False, True]}[p.get("fake_overlap", "default")]
        by_variant: dict = {v: [] for v in variants}
        for rep in range(p["repeats"]):
            for v in variants:
                raw_v = raw if v is None else {**raw, "infer": {**raw["infer"], "overlap": v}}
                label = "" if v is None else f" overlap={'on' if v else 'off'}"
                say(f"fake {ndev} device(s){label} rep {rep + 1}/{p['repeats']}: {n} images")
                r = run_pipeline(raw_v)
                r["load_before"] = list(os.getloadavg())
                by_variant[v].append(r)
        shutil.rmtree(inputs, ignore_errors=True)
        ceiling = per_device * ndev
        for v, runs in by_variant.items():
            key = str(ndev) if v is None else f"{ndev} {'overlap' if v else 'serial'}"
            out["devices"][key] = _fake_summary(n, ceiling, runs)
    return out


def _fake_summary(n: int, ceiling: float, runs: list) -> dict:
    med = _median(runs, "images_per_s")
    return {
        "images": n, "ceiling_images_per_s": round(ceiling, 1), "runs": runs,
        "median_images_per_s": med, "ratio_to_ceiling": _ratio(med, ceiling),
        "host_cpu_s_per_1000": _median(runs, "host_cpu_s_per_1000"),
        "time_to_first_embedding_s": _median(runs, "time_to_first_embedding_s"),
        "peak_tree_rss_mib": _median(runs, "peak_tree_rss_mib"),
    }


def _dispatch_summary(runs: dict[str, list[dict]], ceiling: float | None = None) -> dict:
    out = {}
    for mode, rs in runs.items():
        tails = [r["dispatch"]["tail_s"] for r in rs]
        med = _median(rs, "images_per_s")
        out[mode] = {"median_tail_s": round(statistics.median(tails), 3), "tails_s": tails,
                     "median_images_per_s": med, "median_wall_s": _median(rs, "wall_s"),
                     "ratio_to_ceiling": _ratio(med, ceiling) if ceiling else None,
                     "images_per_device": [r["dispatch"]["images_per_device"] for r in rs]}
    return out


def case_dispatch(p: dict, work: Path, say: Callable[[str], None]) -> dict:
    """Where the work goes (issue #12): queues.dispatch credit vs the earlier round_robin,
    interleaved run by run. The tail is from the first device's last result to the last result
    (a device idle while another still works); throughput is the steady window of run_pipeline."""
    modes = ("round_robin", "credit")
    out: dict = {"setup": {"modes": list(modes), "repeats": p["repeats"]}, "cases": {}}

    def interleave(name: str, raw: dict, n: int, ceiling: float | None = None) -> None:
        runs: dict[str, list[dict]] = {m: [] for m in modes}
        for rep in range(p["repeats"]):
            for m in modes:
                say(f"dispatch {name} rep {rep + 1}/{p['repeats']}: {m}, {n} images")
                r = run_pipeline({**raw, "queues": {**raw.get("queues", {}), "dispatch": m}})
                r["load_before"] = list(os.getloadavg())
                runs[m].append(r)
        out["cases"][name] = {"images": n, "ceiling_images_per_s": ceiling, **_dispatch_summary(runs, ceiling)}

    if os.path.exists(p["model"]) and Path(p["images"]).is_dir():
        n, batch = p["cpu_images"], p["batch"]
        inputs = link_inputs(jpeg_files(p["images"], n), work / "dispatch-cpu-inputs")
        interleave("cpu_2_devices", pipeline_raw(
            inputs, work / "dispatch-out", model={"path": p["model"], "batch_size": batch},
            preprocess={"mode": p["mode"]}, infer={"backend": "cpu", "devices": ["cpu:0", "cpu:1"], "threads": 1},
            workers={"decode": p["decode_workers"], "items_per_message": p["items_per_message"]}), n)
    else:
        say(f"dispatch: no model {p['model']} or corpus {p['images']}: the 2-CPU-device case is skipped")
    batch = 32
    latency_ms = BM1684X_MS_PER_IMAGE_B32 * batch
    per_device = batch * 1000.0 / latency_ms
    ndev = 8
    out["setup"].update({"fake_batch": batch, "fake_latency_ms_per_batch": round(latency_ms, 2), "fake_devices": ndev,
                         "fake_decode_workers": p["fake_decode_workers"],
                         "fake_items_per_message": p["fake_items_per_message"], "slow_factor": 3.0})
    for name, slow in (("fake_8_devices", ()), ("fake_8_devices_one_3x_slower", ("cpu:7",))):
        ceiling = per_device * (ndev - len(slow) + len(slow) / 3.0)
        n = max(int(p["fake_seconds"] * ceiling), 4 * batch * ndev)
        inputs = empty_inputs(n, work / f"dispatch-fake-inputs-{n}")
        raw = pipeline_raw(inputs, work / "dispatch-out", model={"batch_size": batch},
                           infer={"backend": "fake", "devices": [f"cpu:{i}" for i in range(ndev)]},
                           fake={"latency_ms_per_batch": latency_ms, "ready_crops": True,
                                 "slow_devices": list(slow), "slow_factor": 3.0},
                           workers={"decode": p["fake_decode_workers"], "items_per_message": p["fake_items_per_message"]},
                           output={"shard_size": 4096})
        interleave(name, raw, n, round(ceiling, 1))
        shutil.rmtree(inputs, ignore_errors=True)
    return out


def case_memory(p: dict, work: Path, say: Callable[[str], None]) -> dict:
    sizes = {}
    for n in p["memory_sizes"]:
        say(f"memory: {n} inputs (fake backend, 2 devices, ready crops)")
        inputs = empty_inputs(n, work / f"mem-inputs-{n}")
        raw = pipeline_raw(inputs, work / "mem-out", model={"batch_size": 32},
                           infer={"backend": "fake", "devices": ["cpu:0", "cpu:1"]},
                           fake={"ready_crops": True}, workers={"items_per_message": 32})
        r = run_pipeline(raw, pss_interval_s=0.25)  # PSS is this case's figure: sample it at 4 Hz
        shutil.rmtree(inputs, ignore_errors=True)
        sizes[str(n)] = {k: r[k] for k in ("images", "wall_s", "images_per_s", "peak_tree_rss_mib",
                                           "peak_tree_pss_mib", "peak_processes")}
    peaks = [v["peak_tree_pss_mib"] for v in sizes.values()]
    return {"sizes": sizes, "pss_growth_mib_smallest_to_largest": round(peaks[-1] - peaks[0], 1) if peaks else None}


# -- output ------------------------------------------------------------------------------------------
def table(res: dict) -> str:
    lines = []
    cpu_case = res["cases"].get("cpu")
    cpus = list(cpu_case["lengths"].values()) if cpu_case and "lengths" in cpu_case else [cpu_case] if cpu_case else []
    for cpu in cpus:
        m, ra = cpu["median_images_per_s"], cpu["ratios"]
        lines += [f"CPU ({cpu['setup']['images']} JPEGs, batch {cpu['setup']['batch']}, median of {len(cpu['runs'])} runs)",
                  f"  {'case':44s} {'images/s':>9s}"]
        names = {"ceiling": "1. model-only ceiling (same model/devices)", "pipeline": "2. clip-pipeline end to end",
                 "pipeline_ready_crops": "2b. clip-pipeline, decode -> ready crops",
                 "single_loop": "3. single-process loop (reference CPU path)", "dataloader": "4. DataLoader-style baseline",
                 "int8_ceiling": "   int8 model-only ceiling", "int8_pipeline": "   int8 clip-pipeline end to end"}
        for k, label in names.items():
            if k in m:
                lines.append(f"  {label:44s} {m[k]:9.2f}")
        lines.append("  ratios of medians: " + ", ".join(f"{k} {v:.3f}" for k, v in ra.items() if v is not None))
        lines.append("  medians of per-run ratios: " + ", ".join(
            f"{k} {v:.3f}" for k, v in cpu["ratios_median_of_runs"].items() if v is not None))
        lines.append(f"  host_cpu_cores_steady {cpu.get('host_cpu_cores_steady')}; drain tail {cpu.get('tail_s')} s; "
                     f"pipeline from its first result {cpu.get('pipeline_from_first_result_images_per_s')} images/s")
        if "int8_cosine_vs_fp32" in cpu_case:
            c = cpu_case["int8_cosine_vs_fp32"]
            lines.append(f"  int8 cosine vs fp32: mean {c['mean']:.6f}, min {c['min']:.6f} "
                         "(synthetic weights; trained weights quantise worse)")
        lines.append(f"  time to first embedding {cpu['time_to_first_embedding_s']} s; peak process-tree RSS "
                     f"{cpu['peak_tree_rss_mib']} MiB (PSS {cpu['peak_tree_pss_mib']} MiB)")
    fake = res["cases"].get("fake")
    if fake:
        s = fake["setup"]
        lines.append(f"Fake devices ({s['latency_ms_per_batch']} ms per batch of {s['batch']}, ready crops)")
        lines.append(f"  {'devices':>10s} {'images/s':>9s} {'ceiling':>8s} {'ratio':>6s} {'cpu s/1k':>8s} "
                     f"{'ttfe s':>7s} {'RSS MiB':>8s}")
        for nd, d in fake["devices"].items():
            lines.append(f"  {nd:>10s} {d['median_images_per_s'] or 0:9.1f} {d['ceiling_images_per_s']:8.1f} "
                         f"{d['ratio_to_ceiling'] or 0:6.3f} {d['host_cpu_s_per_1000'] or 0:8.2f} "
                         f"{d['time_to_first_embedding_s']:7.2f} {d['peak_tree_rss_mib']:8.1f}")
    disp = res["cases"].get("dispatch")
    if disp:
        lines.append("Dispatch (round_robin = before, credit = now; medians, interleaved runs)")
        lines.append(f"  {'case':30s} {'mode':>12s} {'tail s':>7s} {'images/s':>9s} {'/ceiling':>8s}")
        for name, c in disp["cases"].items():
            for mode in disp["setup"]["modes"]:
                d = c[mode]
                ratio = f"{d['ratio_to_ceiling']:8.3f}" if d["ratio_to_ceiling"] else f"{'-':>8s}"
                lines.append(f"  {name:30s} {mode:>12s} {d['median_tail_s']:7.2f} {d['median_images_per_s'] or 0:9.1f} {ratio}")
    mem = res["cases"].get("memory")
    if mem:
        lines.append("Memory (fake backend, 2 devices): inputs -> peak process-tree PSS / RSS MiB")
        for nn, d in mem["sizes"].items():
            lines.append(f"  {nn:>8s}: {d['peak_tree_pss_mib']:8.1f} / {d['peak_tree_rss_mib']:8.1f}")
    m = res["machine"]
    lines.append(f"Machine: {m['cpu_model']} ({m['usable_cpus']} usable CPUs); load average "
                 f"{m['loadavg_start'][0]:.2f} at start, {m['loadavg_end'][0]:.2f} at end")
    return "\n".join(lines)
