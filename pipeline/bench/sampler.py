"""Process-tree and machine measurements from /proc: CPU time, RSS/PSS, the machine's description."""

from __future__ import annotations

import os
import platform
import resource
import threading
import time
from pathlib import Path
from typing import Any


def machine_info() -> dict[str, Any]:
    from pipeline.data.rundir import software_versions

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


def session_pids(sid: int) -> list[int]:
    """Live (not zombie) processes of a session: every process a run started shares the CLI's."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if fields[0] != "Z" and int(fields[3]) == sid:
            pids.append(int(d.name))
    return pids


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


def cpu_seconds() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime
