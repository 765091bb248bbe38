"""The run plan: the whole topology of a run, decided once, as data (no processes, no sockets).

`plan_run` turns the config, the resolved devices and the output's state into one spec per worker
(pipeline/worker/spec.py: addresses, queue limits, and each role's own settings), plus what the
supervisor needs to talk to them. It is the only place that wires the topology: which stages
exist (files-mode devices decode themselves; decode and preprocess fused or not), which pipes
carry groups, the queue depth of each (both ends of a pipe use the same high-water mark), credit
dispatch, the run's tail, and which core the decode workers run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.config import Config
from pipeline.wire.dispatch import tail_cap, tail_images, tail_piece
from pipeline.wire.transport import Endpoints
from pipeline.worker.spec import DecodeSpec, InferSpec, PreprocessSpec, SinkSpec, SourceSpec, WorkerSpec


def grouped_hwm(cfg: Config, depth: int, grouped: bool) -> int:
    """Queue depths count images; a pipe of grouped messages holds depth / items_per_message of them."""
    if not grouped:
        return depth
    return max(1, -(-depth // cfg.workers.items_per_message))


def run_tail(cfg: Config, n_devices: int, pieces: int) -> tuple[int, int, int]:
    """(inputs at the end sent as tail pieces, inputs per piece, the cap a device may hold when
    given one): issue #20, pipeline/wire/dispatch.py. None (0, 1, 0) with round_robin dispatch, one
    device, or a backend whose batch costs the same full or not (Backend.tail_pieces = 1; `pieces`:
    into how many pieces a batch is cut)."""
    if cfg.queues.dispatch != "credit" or n_devices < 2 or pieces <= 1:
        return 0, 1, 0
    batch = cfg.model.batch_size
    return (tail_images(batch, cfg.queues.infer_batches, n_devices), tail_piece(batch, pieces),
            tail_cap(batch, pieces))


@dataclass(frozen=True)
class RunPlan:
    specs: tuple[WorkerSpec, ...]  # sink, infer, the host stages, source: the order they are started in
    stage_order: tuple[str, ...]  # source, ..., sink: the edges of the queue-fill figure
    capacity: dict[str, int] = field(default_factory=dict)  # images each stage's inputs can hold
    first_stage_addrs: tuple[str, ...] = ()  # where the supervisor re-issues single items
    first_stage_hwm: int = 0
    control_addr: str = ""
    sink_addr: str = ""
    files_mode: bool = False

    def roles(self) -> dict[str, str]:
        return {s.name: s.role for s in self.specs}


def plan_run(cfg: Config, devices: list[str], ep: Endpoints, *, files_mode: bool, tail_pieces: int,
             out_dir: str, listing_path: str, done_shards: tuple[int, ...] = (), listing_complete: bool = False,
             id_range: tuple[int, int] | None = None) -> RunPlan:
    """The topology of a run over `devices` writing into `out_dir`, with endpoints named by `ep`.

    files_mode: the devices take file paths (no decode/preprocess workers). id_range: a cluster
    range run replays ids [lo, hi) of the planned listing at `listing_path`."""
    infer_addrs = tuple(ep.stage("infer", i) for i in range(len(devices)))
    sink_addr, control_addr = ep.addr("sink"), ep.addr("control")
    chain: list[tuple[str, int]] = []
    if not files_mode:
        chain.append(("decode", cfg.workers.decode))
        if not cfg.workers.fuse_decode_preprocess:
            chain.append(("preprocess", cfg.workers.preprocess))
    stage_addrs = {role: tuple(ep.stage(role, i) for i in range(n)) for role, n in chain}
    stage_addrs["infer"] = infer_addrs
    order = [r for r, _ in chain] + ["infer"]
    first = order[0]
    depth = {"decode": cfg.queues.decode, "preprocess": cfg.queues.preprocess, "infer": cfg.queues.infer,
             "sink": cfg.queues.sink}
    # Which pipes carry groups of inputs: the source's `items` into the first stage, and the
    # fused decoder's `pxs` into infer. Everything else is one input (or one batch) per message.
    grouped = {role: False for role in depth}
    grouped[first] = True
    if "decode" in order and cfg.workers.fuse_decode_preprocess:
        grouped["infer"] = True
    hwm = {role: grouped_hwm(cfg, depth[role], grouped[role]) for role in depth}
    stage_order = ("source", *order, "sink")
    receivers = {**{r: n for r, n in chain}, "infer": len(devices), "sink": 1}
    # Credit-based dispatch into the devices (pipeline/wire/dispatch.py): each sender into the
    # infer stage binds a credit endpoint; every infer process returns credits to all of them.
    feeder, n_feeders = (chain[-1] if chain else ("source", 1))
    credit = cfg.queues.dispatch == "credit"
    credit_addrs = tuple(ep.addr(f"credit-{feeder}-{i}") for i in range(n_feeders)) if credit else ()
    capacity = {r: depth[r] * receivers[r] for r in stage_order[1:]}
    if credit:
        capacity["infer"] = (1 + cfg.queues.infer_batches) * cfg.model.batch_size * len(devices)

    def common(role: str, index: int, nxt: str | None) -> dict[str, Any]:
        return {"index": index, "cfg": cfg, "in_addr": stage_addrs[role][index] if role in stage_addrs else None,
                "next_addrs": stage_addrs[nxt] if nxt else (), "sink_addr": sink_addr, "control_addr": control_addr,
                "in_hwm": hwm.get(role, 0), "out_hwm": hwm[nxt] if nxt else 0, "sink_hwm": cfg.queues.sink,
                "credit_addr": credit_addrs[index] if credit and role == feeder else ""}

    specs: list[WorkerSpec] = [SinkSpec(**{**common("sink", 0, None), "in_addr": sink_addr, "in_hwm": hwm["sink"]},
                                        out_dir=out_dir)]
    specs += [InferSpec(**common("infer", i, None), device=dev, files_mode=files_mode, credit_addrs=credit_addrs)
              for i, dev in enumerate(devices)]
    for pos, (role, n) in enumerate(chain):
        for i in range(n):
            if role == "decode":
                # bench-only (fake.ready_crops): the decode workers run the ready-crop stand-in
                specs.append(DecodeSpec(**common(role, i, order[pos + 1]), fused=cfg.workers.fuse_decode_preprocess,
                                        ready_crops=cfg.fake.ready_crops))
            else:
                specs.append(PreprocessSpec(**common(role, i, order[pos + 1])))
    tail_n, piece, cap = run_tail(cfg, len(devices), tail_pieces)
    specs.append(SourceSpec(**common("source", 0, first), out_dir=out_dir, listing_path=listing_path,
                            done_shards=tuple(done_shards),
                            listing_complete=listing_complete, tail_n=tail_n, tail_piece=piece, tail_cap=cap,
                            **({"range_lo": id_range[0], "range_hi": id_range[1]} if id_range else {})))
    return RunPlan(tuple(specs), stage_order, capacity, stage_addrs[first], depth[first], control_addr, sink_addr,
                   files_mode)
