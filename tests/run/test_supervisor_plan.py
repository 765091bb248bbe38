"""Supervisor.plan computes the topology once: every pipe's high-water mark is the same number on
both ends, and lands on typed WorkerSpec fields (the workers derive nothing from their role)."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from pipeline import config as cfgmod
from pipeline.data import rundir
from pipeline.run.progress import Progress
from pipeline.run.supervisor import Supervisor, grouped_hwm
from pipeline.worker.loop import WorkerSpec

ROOT = Path(__file__).resolve().parents[2]
QUEUES = {"decode": 64, "preprocess": 24, "infer": 40, "sink": 12}


def plan(tmp_path: Path, backend: str = "fake", fuse: bool = True, items: int = 16, devices=("cpu:0", "cpu:1"),
         **sections) -> Supervisor:
    raw = {"input": {"paths": [str(tmp_path)]}, "output": {"dir": str(tmp_path / "out")},
           "infer": {"backend": backend}, "queues": QUEUES,
           "workers": {"decode": 2, "preprocess": 2, "fuse_decode_preprocess": fuse, "items_per_message": items},
           **sections}
    sup = Supervisor(cfgmod.from_dict(raw), progress=Progress("none"))
    sup.devices = list(devices)
    sup.plan()
    return sup


@pytest.fixture
def planned(tmp_path):
    made: list[Supervisor] = []

    def make(**kw) -> Supervisor:
        made.append(plan(tmp_path, **kw))
        return made[-1]

    yield make
    for sup in made:
        sup.ep.cleanup()


def edges(sup: Supervisor) -> list[tuple[str, str, int, int]]:
    """(sender, receiver, sender's out_hwm, receiver's in_hwm) for every pipe between workers."""
    by_addr = {w.spec.in_addr: w for w in sup.workers.values() if w.spec.in_addr}
    out = []
    for w in sup.workers.values():
        for addr in w.spec.next_addrs:
            out.append((w.name, by_addr[addr].name, w.spec.out_hwm, by_addr[addr].spec.in_hwm))
        if w.role != "sink":
            out.append((w.name, "sink-0", w.spec.sink_hwm, sup.workers["sink-0"].spec.in_hwm))
    return out


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("items", [1, 16])
@pytest.mark.parametrize("backend", ["fake", "sail"])  # pixels (host decode) / files (sail device mode)
def test_both_ends_of_every_pipe_agree(planned, backend, fuse, items):
    sup = planned(backend=backend, fuse=fuse, items=items, devices=("0",) if backend == "sail" else ("cpu:0", "cpu:1"))
    found = edges(sup)
    assert found and all(w.spec.in_hwm > 0 for w in sup.workers.values() if w.role != "source")
    for sender, receiver, out_hwm, in_hwm in found:
        assert out_hwm == in_hwm, f"{sender} -> {receiver}: {out_hwm} != {in_hwm}"


def test_files_mode_unfused_infer_takes_the_sources_groups(planned):
    """Regression: in files mode with fuse_decode_preprocess = false the source sent `items` groups
    with HWM infer/16 while infer received them as single items with HWM infer."""
    sup = planned(backend="sail", fuse=False, devices=("0",))
    src, infer = sup.workers["source-0"].spec, sup.workers["infer-0(0)"].spec
    assert infer.in_hwm == src.out_hwm == grouped_hwm(sup.cfg, QUEUES["infer"], True) == 3
    assert "decode-0" not in sup.workers


def test_supervisor_reissues_into_the_first_stage_with_its_depth(planned):
    """Regression: the supervisor's socket to the first stage used queues.decode even when the
    first stage is infer (files mode)."""
    assert planned(backend="sail", devices=("0",)).first_stage_hwm == QUEUES["infer"]
    assert planned(backend="fake").first_stage_hwm == QUEUES["decode"]


def test_specs_are_typed_and_frozen(planned):
    sup = planned()
    names = {f.name for f in dataclasses.fields(WorkerSpec)}
    assert "extra" not in names and {"in_hwm", "out_hwm", "listing_path", "done_shards", "start_at"} <= names
    src = sup.workers["source-0"].spec
    assert src.listing_path == str(rundir.RunDir(sup.out).listing) and src.done_shards == ()
    with pytest.raises(dataclasses.FrozenInstanceError):
        src.start_at = 5  # type: ignore[misc]


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
