"""The generic worker loop (`_run_core` around a `Loop`) and the supervisor's death handling, driven
in-process: real ZeroMQ sockets, a stand-in core, no spawned processes."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from pipeline import config as cfgmod
from pipeline.data.rundir import listing_line
from pipeline.run.progress import Progress
from pipeline.run.start import RunStart
from pipeline.run.supervisor import Supervisor
from pipeline.wire import messages, transport
from pipeline.worker.loop import EXIT_CRASH, EXIT_DEVICE, Loop, Slot, _run_core, _Stop
from pipeline.worker.spec import DecodeSpec
from stages.base import StageCore


class Boom(Exception):
    pass


class EchoCore(StageCore):
    """Sends each item on as a `px` of its id, one failure for id 3, dies on id `die_on`."""

    def __init__(self, die_on: int | None = None, device_error_on: int | None = None):
        super().__init__()
        self.die_on, self.device_error_on = die_on, device_error_on
        self.info = {"dim": 4}
        self.closed = False

    def handle(self, header, frames):
        i = header["id"]
        if i == self.die_on:
            raise Boom(f"died on {i}")
        if i == self.device_error_on:
            from pipeline.backends.base import DeviceError

            raise DeviceError("the device fell over")
        if i == 3:
            return [("sink", messages.Failure(i, header["path"], "corrupt", "bad", "decode").header(), ())]
        px = np.full((2, 2, 3), i, np.uint8)
        return [("next", *messages.image("px", i, header["path"], px))]

    def close(self):
        self.closed = True


@pytest.fixture
def wired(monkeypatch, tmp_path):
    """A decode worker's spec and slot, and the test's own ends of its pipes."""
    ep = transport.Endpoints.create()
    cfg = cfgmod.from_dict({"output": {"dir": str(tmp_path / "out")}})
    spec = DecodeSpec(index=0, cfg=cfg, in_addr=ep.stage("decode", 0),
                      next_addrs=(ep.stage("infer", 0),), sink_addr=ep.addr("sink"), control_addr=ep.addr("control"),
                      in_hwm=8, out_hwm=8, sink_hwm=8)
    slot = Slot(str(tmp_path / "slot"))
    ctx = zmq.Context()
    ends = {name: transport.pull(ctx, addr, 100) for name, addr in
            (("next", spec.next_addrs[0]), ("sink", spec.sink_addr), ("control", spec.control_addr))}
    feed = transport.push(ctx, [spec.in_addr], 100)
    yield spec, slot, ends, feed
    for s in (*ends.values(), feed):
        s.close(0)
    ctx.term()
    ep.cleanup()


def drive(monkeypatch, spec, slot, core, feed, ids, stop_after: float = 1.0):
    """Run _run_core in this thread; another thread feeds `ids` and stops the loop after a while."""
    monkeypatch.setattr(type(spec), "make_core", lambda self, slot: core)
    loop = Loop(spec, slot)

    def feeder():
        time.sleep(0.1)
        for i in ids:
            transport.send(feed, messages.item(i, f"/in/{i}.jpg".encode()))
        time.sleep(stop_after)
        loop.stopping = True

    t = threading.Thread(target=feeder, daemon=True)
    t.start()
    try:
        code = _run_core(spec, slot, loop)
    except _Stop:
        code = None
    finally:
        t.join(5)
        loop.close()
    return code


def drain(sock) -> list[dict]:
    out = []
    while sock.poll(200):
        out.append(transport.recv(sock)[0])
    return out


def test_loop_routes_outputs_and_reports(monkeypatch, wired):
    spec, slot, ends, feed = wired
    core = EchoCore()
    assert drive(monkeypatch, spec, slot, core, feed, [1, 2, 3, 4]) is None  # stopped, not failed
    assert [h["id"] for h in drain(ends["next"])] == [1, 2, 4]
    assert [(h["t"], h["id"], h["reason"]) for h in drain(ends["sink"])] == [("fail", 3, "corrupt")]
    control = drain(ends["control"])
    assert control[0] == messages.ready("decode-0", "decode", 0, control[0]["pid"], {"dim": 4})
    stats = [h["stats"] for h in control if h["t"] == "stats"]
    assert stats and stats[-1]["in"] == 4 and stats[-1]["out"] == 3 and stats[-1]["sink_out"] == 1
    assert core.closed and slot.current_ids() == [] and slot.busy_since == 0.0


def test_a_death_mid_unit_leaves_the_ids_it_held_in_the_slot(monkeypatch, wired):
    """An exception escaping handle() ends the loop with the unit's ids still in the slot: that is
    what the supervisor charges when it sees the worker die (worker_main reports it as a crash)."""
    spec, slot, ends, feed = wired
    core = EchoCore(die_on=2)
    with pytest.raises(Boom):
        drive(monkeypatch, spec, slot, core, feed, [1, 2, 3])
    assert slot.current_ids() == [2] and slot.busy_since > 0
    assert [h["id"] for h in drain(ends["next"])] == [1]
    assert core.closed
    assert EXIT_CRASH == 70


def test_a_device_error_does_not_blame_the_items(monkeypatch, wired):
    spec, slot, ends, feed = wired
    code = drive(monkeypatch, spec, slot, EchoCore(device_error_on=2), feed, [1, 2])
    assert code == EXIT_DEVICE and slot.current_ids() == []
    errors = [h for h in drain(ends["control"]) if h["t"] == "error"]
    assert errors[0]["kind"] == "device" and errors[0]["ids"] == [] and "fell over" in errors[0]["message"]


class DeadProc:
    exitcode = EXIT_CRASH
    pid = 12345


def test_supervisor_on_death_reissues_then_fails_an_input_that_kills_twice(tmp_path: Path, monkeypatch):
    inputs = tmp_path / "in"
    inputs.mkdir()
    cfg = cfgmod.from_dict({"input": {"paths": [str(inputs)]}, "output": {"dir": str(tmp_path / "out")},
                            "infer": {"backend": "fake"}, "run": {"max_restarts": 5}})
    sup = Supervisor(cfg, progress=Progress("none"), log=lambda m: None)
    sup.rundir.path.mkdir(parents=True)
    sup.rundir.listing.write_bytes(b"".join(listing_line(f"/in/{i}.jpg".encode()) for i in range(10)))
    sup.devices = ["cpu:0"]
    sup.start = RunStart(cfg, sup.rundir, sup.listing_path, devices=sup.devices)  # what prepare() finds
    sup.plan()
    spawned: list[str] = []
    monkeypatch.setattr(sup.pool, "spawn", lambda w: spawned.append(w.name))
    try:
        sup.source().slot.sent_upto = 10
        sup.ledger.on_resolved([0, 1, 2], 3, 0)
        dec = sup.workers["decode-0"]
        # first death: 5 and 6 charged once, every sent and unresolved id re-issued
        dec.proc = DeadProc()
        dec.slot.begin([5, 6])
        sup.on_death(dec, "exit code 70")
        assert spawned == ["decode-0"] and dec.restarts == 1 and sup.ledger.crash_counts == {5: 1, 6: 1}
        assert sup.reissue_pending == {3, 4, 5, 6, 7, 8, 9} and sup.outbox.queue == []
        sup.reissue_pending.clear()  # sent (pump_outbox)
        # the re-issued 5 and 6 kill it again: now they fail as crashed_worker and are not re-issued
        dec.proc = DeadProc()
        dec.slot.begin([5, 6])
        sup.on_death(dec, "exit code 70")
        assert spawned == ["decode-0"] * 2 and dec.restarts == 2 and sup.ledger.crash_counts == {5: 2, 6: 2}
        assert sup.reissue_pending == {3, 4, 7, 8, 9}
        fails = [h for _sock, h in sup.outbox.queue if h["t"] == "fail"]
        assert sorted((h["id"], h["reason"], h["path"]) for h in fails) == [
            (5, "crashed_worker", b"/in/5.jpg"), (6, "crashed_worker", b"/in/6.jpg")]
    finally:
        sup.ep.cleanup()


def test_a_worker_that_failed_to_start_does_not_hide_the_error(tmp_path: Path, monkeypatch):
    """fork/exec refused for the second worker: run() raises that error and stops the first worker;
    stop_all used to call terminate() on the never-started process (AttributeError over the cause)."""
    import errno
    import multiprocessing.context as mpc

    inputs = tmp_path / "in"
    inputs.mkdir()
    cfg = cfgmod.from_dict({"input": {"paths": [str(inputs)]}, "output": {"dir": str(tmp_path / "out")},
                            "infer": {"backend": "fake"}})
    sup = Supervisor(cfg, progress=Progress("none"), log=lambda m: None)
    real_start, started = mpc.SpawnProcess.start, []

    def start(proc):
        if started:
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
        real_start(proc)
        started.append(proc)

    monkeypatch.setattr(mpc.SpawnProcess, "start", start)
    with pytest.raises(OSError, match="Resource temporarily unavailable"):
        sup.run()
    assert len(started) == 1 and started[0].exitcode is not None  # the one that started was stopped
    never = [w.proc for w in sup.workers.values() if w.proc is not None and w.proc not in started]
    assert never and all(p.pid is None for p in never)
    sup.pool.stop_all()  # again, with nothing left to stop: no error either



# what a run's shutdown does not wait for: a stage worker's poll, woken by SIGTERM
def test_request_stop_wakes_the_poll(monkeypatch):
    import os
    import select

    from pipeline.worker.loop import Loop

    loop = Loop.__new__(Loop)  # only the stop pipe, no sockets
    loop.stopping = False
    loop.stop_r, loop.stop_w = os.pipe()
    os.set_blocking(loop.stop_w, False)
    assert select.select([loop.stop_r], [], [], 0)[0] == []
    loop.request_stop()
    loop.request_stop()  # twice: still one wake-up pending, no error
    assert loop.stopping and select.select([loop.stop_r], [], [], 0)[0] == [loop.stop_r]


class SlowSetupCore(EchoCore):
    """A core whose setup (a model load) waits for the test; it records what it handled."""

    def __init__(self, batch_size: int | None = None):
        super().__init__()
        self.release = threading.Event()
        self.handled: list[int] = []
        if batch_size:
            self.info = {"dim": 4, "batch_size": batch_size}

    def setup(self):
        assert self.release.wait(10)

    def handle(self, header, frames):
        self.handled.append(header["id"])
        return []


def test_an_infer_process_takes_work_while_its_model_loads(monkeypatch, tmp_path):
    """The input is bound and the window granted before the setup: a sender's first messages wait
    in the device's socket during the model load instead of in the sender (which goes on decoding),
    and the device announces its own batch's window once it is open."""
    from pipeline.wire.dispatch import window_for
    from pipeline.worker.spec import InferSpec

    ep = transport.Endpoints.create()
    cfg = cfgmod.from_dict({"output": {"dir": str(tmp_path / "out")}, "model": {"batch_size": 4}})
    spec = InferSpec(index=0, cfg=cfg, in_addr=ep.stage("infer", 0), sink_addr=ep.addr("sink"),
                     control_addr=ep.addr("control"), in_hwm=8, sink_hwm=8, device="cpu:0",
                     credit_addrs=(ep.addr("credit-decode-0"),))
    ctx = zmq.Context()
    credits = transport.pull(ctx, spec.credit_addrs[0], 100)
    control = transport.pull(ctx, spec.control_addr, 100)
    sink = transport.pull(ctx, spec.sink_addr, 100)
    feed = transport.push(ctx, [spec.in_addr], 100)
    core = SlowSetupCore(batch_size=8)
    monkeypatch.setattr(InferSpec, "make_core", lambda self, slot: core)
    loop = Loop(spec, Slot(str(tmp_path / "slot")))

    def run():
        try:
            _run_core(spec, loop.slot, loop)
        except _Stop:  # the test's stop below
            pass

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        assert credits.poll(5000), "no window announced while the model loads"
        first = transport.recv(credits)[0]
        assert first["t"] == "credit" and first["w"] == window_for(4, cfg.queues.infer_batches, 1)
        for i in (1, 2):  # the socket is bound: the push connects and the messages are taken at once
            assert feed.poll(2000, zmq.POLLOUT)
            transport.send(feed, messages.item(i, f"/in/{i}.jpg".encode()), flags=zmq.NOBLOCK)
        time.sleep(0.2)
        assert core.handled == [] and not control.poll(0)  # still loading: nothing handled, not ready
        core.release.set()
        assert control.poll(5000) and transport.recv(control)[0]["t"] == "ready"
        deadline = time.monotonic() + 5
        while core.handled != [1, 2] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert core.handled == [1, 2]
        windows = []
        while credits.poll(500):
            windows.append(transport.recv(credits)[0]["w"])
        assert window_for(8, cfg.queues.infer_batches, 1) in windows  # the model's own batch, once open
    finally:
        loop.stopping = True
        t.join(5)
        loop.close()
        for s in (credits, control, sink, feed):
            s.close(0)
        ctx.term()
        ep.cleanup()
