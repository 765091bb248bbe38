"""The run plan (pipeline/run/plan.py) computes the topology once, as data: every pipe's
high-water mark is the same number on both ends, and lands on the typed spec of each role
(pipeline/worker/spec.py: the workers derive nothing from their role)."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from pipeline import config as cfgmod
from pipeline.backends import get_backend
from pipeline.data import rundir
from pipeline.run.plan import RunPlan, grouped_hwm, plan_run
from pipeline.wire.transport import Endpoints
from pipeline.worker.spec import DecodeSpec, InferSpec, SourceSpec

ROOT = Path(__file__).resolve().parents[2]
QUEUES = {"decode": 64, "preprocess": 24, "infer": 40, "sink": 12}


class Planned:
    """A RunPlan with its config, and its specs by worker name."""

    def __init__(self, cfg, topo: RunPlan, out: Path):
        self.cfg, self.topo, self.out = cfg, topo, out
        self.specs = {s.name: s for s in topo.specs}
        self.first_stage_hwm = topo.first_stage_hwm


def plan(tmp_path: Path, ep: Endpoints, backend: str = "fake", fuse: bool = True, items: int = 16,
         devices=("cpu:0", "cpu:1"), **sections) -> Planned:
    raw = {"input": {"paths": [str(tmp_path)]}, "output": {"dir": str(tmp_path / "out")},
           "infer": {"backend": backend}, "queues": QUEUES,
           "workers": {"decode": 2, "preprocess": 2, "fuse_decode_preprocess": fuse, "items_per_message": items},
           **sections}
    cfg = cfgmod.from_dict(raw)
    b = get_backend(backend)
    topo = plan_run(cfg, list(devices), ep, files_mode=b.input_kind(cfg) == "files", tail_pieces=b.tail_pieces(cfg),
                    out_dir=cfg.output.dir, listing_path=str(rundir.RunDir(cfg.output.dir).listing))
    return Planned(cfg, topo, Path(cfg.output.dir))


@pytest.fixture
def planned(tmp_path):
    ep = Endpoints.create()

    def make(**kw) -> Planned:
        return plan(tmp_path, ep, **kw)

    yield make
    ep.cleanup()


def edges(p: Planned) -> list[tuple[str, str, int, int]]:
    """(sender, receiver, sender's out_hwm, receiver's in_hwm) for every pipe between workers."""
    by_addr = {s.in_addr: s for s in p.specs.values() if s.in_addr}
    out = []
    for s in p.specs.values():
        for addr in s.next_addrs:
            out.append((s.name, by_addr[addr].name, s.out_hwm, by_addr[addr].in_hwm))
        if s.sends_to_sink:
            out.append((s.name, "sink-0", s.sink_hwm, p.specs["sink-0"].in_hwm))
    return out


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("items", [1, 16])
@pytest.mark.parametrize("backend", ["fake", "sail"])  # pixels (host decode) / files (sail device mode)
def test_both_ends_of_every_pipe_agree(planned, backend, fuse, items):
    p = planned(backend=backend, fuse=fuse, items=items, devices=("0",) if backend == "sail" else ("cpu:0", "cpu:1"))
    found = edges(p)
    assert found and all(s.in_hwm > 0 for s in p.specs.values() if s.role != "source")
    for sender, receiver, out_hwm, in_hwm in found:
        assert out_hwm == in_hwm, f"{sender} -> {receiver}: {out_hwm} != {in_hwm}"


def test_files_mode_unfused_infer_takes_the_sources_groups(planned):
    """Regression: in files mode with fuse_decode_preprocess = false the source sent `items` groups
    with HWM infer/16 while infer received them as single items with HWM infer."""
    p = planned(backend="sail", fuse=False, devices=("0",))
    src, infer = p.specs["source-0"], p.specs["infer-0(0)"]
    assert infer.in_hwm == src.out_hwm == grouped_hwm(p.cfg, QUEUES["infer"], True) == 3
    assert "decode-0" not in p.specs and infer.files_mode


def test_supervisor_reissues_into_the_first_stage_with_its_depth(planned):
    """Regression: the supervisor's socket to the first stage used queues.decode even when the
    first stage is infer (files mode)."""
    assert planned(backend="sail", devices=("0",)).first_stage_hwm == QUEUES["infer"]
    assert planned(backend="fake").first_stage_hwm == QUEUES["decode"]


def test_specs_are_typed_and_frozen(planned):
    p = planned(fuse=False)
    assert {type(s).__name__ for s in p.topo.specs} == {"SourceSpec", "DecodeSpec", "PreprocessSpec", "InferSpec",
                                                      "SinkSpec"}
    names = {f.name for f in dataclasses.fields(SourceSpec)}
    assert "extra" not in names and {"in_hwm", "out_hwm", "listing_path", "done_shards", "start_at"} <= names
    assert "listing_path" not in {f.name for f in dataclasses.fields(DecodeSpec)}  # each role its own fields
    src = p.specs["source-0"]
    assert src.listing_path == str(rundir.RunDir(p.out).listing) and src.done_shards == ()
    with pytest.raises(dataclasses.FrozenInstanceError):
        src.start_at = 5  # type: ignore[misc]


@pytest.mark.parametrize("fuse", [True, False])
def test_the_plan_settles_what_the_stages_used_to_derive(planned, fuse):
    """Decode's fusing, the device's input kind, the ready-crop stand-in and the run's tail are on the
    specs: no stage re-reads them from the config."""
    p = planned(fuse=fuse, backend="cpu")
    assert all(s.fused == fuse and not s.ready_crops for s in p.specs.values() if isinstance(s, DecodeSpec))
    assert all(not s.files_mode for s in p.specs.values() if isinstance(s, InferSpec))
    b, src = p.cfg.model.batch_size, p.specs["source-0"]
    assert (src.tail_n, src.tail_piece, src.tail_cap) == (2 * (1 + p.cfg.queues.infer_batches) * b, b // 4, b + b // 4)
    bench = planned(backend="fake", fake={"ready_crops": True})
    assert all(s.ready_crops for s in bench.specs.values() if isinstance(s, DecodeSpec))
    assert bench.specs["source-0"].tail_n == 0  # the fake's latency is per batch: no tail pieces
    sail = planned(backend="sail", devices=("0",))
    assert sail.specs["infer-0(0)"].files_mode


def test_only_rundir_spells_the_layouts_file_names():
    """manifest.json, listing.jsonl, ... appear as string literals only in pipeline/data/rundir.py."""
    names = {rundir.MANIFEST, rundir.LISTING, rundir.FAILURES, rundir.REPORT, rundir.PICKLE, rundir.WORKERS,
             rundir.EMB_DIR, *rundir.SHARD_SUFFIXES, "part-"}
    offenders = []
    for p in sorted([*ROOT.glob("pipeline/**/*.py"), *ROOT.glob("stages/*.py")]):
        if p.name == "rundir.py":
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
                offenders.append(f"{p.relative_to(ROOT)}:{node.lineno} {node.value!r}")
    assert offenders == []
