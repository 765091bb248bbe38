"""The failure policy (pipeline/run/policy.py) alone: what a worker's death means, from facts only
(no processes, sockets or files)."""

from __future__ import annotations

import pytest

from pipeline import config as cfgmod
from pipeline.run.ledger import Ledger
from pipeline.run.policy import FailurePolicy
from pipeline.worker.loop import EXIT_CRASH, EXIT_DEVICE, EXIT_FATAL


class _W:
    """What the failure policy reads of a worker (pool.Worker's fields)."""

    def __init__(self, role: str, device: str | None = None):
        self.role, self.device, self.name = role, device, f"{role}-0" + (f"({device})" if device else "")
        self.restarts = self.streak = 0


def _policy(files_mode: bool = False, max_restarts: int = 2) -> FailurePolicy:
    return FailurePolicy(cfgmod.from_dict({"run": {"max_restarts": max_restarts}}), files_mode)


def test_the_failure_policy_fails_an_input_that_kills_its_worker_twice():
    policy, led, dec = _policy(max_restarts=5), Ledger(10), _W("decode")
    first = policy.on_death(dec, EXIT_CRASH, [5, 6], "exit code 70", led)
    assert first.restart and first.crashed == [] and led.crash_counts == {5: 1, 6: 1} and dec.restarts == 1
    second = policy.on_death(dec, EXIT_CRASH, [5, 6], "exit code 70", led)
    assert second.restart and second.crashed == [5, 6] and not second.abort


@pytest.mark.parametrize("role,files_mode,code,blamed", [
    ("decode", False, EXIT_CRASH, True), ("preprocess", False, EXIT_CRASH, True),
    ("decode", False, EXIT_DEVICE, False),  # the device failed, not the inputs
    ("infer", False, EXIT_CRASH, False),  # a pixel-mode device sees only crops: its deaths are its own
    ("infer", True, EXIT_CRASH, True),  # a files-mode device decodes the inputs itself
    ("sink", False, EXIT_CRASH, False)])
def test_the_failure_policy_blames_inputs_only_where_an_input_can_kill(role, files_mode, code, blamed):
    policy, led = _policy(files_mode), Ledger(10)
    policy.on_death(_W(role, "cpu:0" if role == "infer" else None), code, [4], "x", led)
    assert led.crash_counts == ({4: 1} if blamed else {})
    assert policy.on_death(_W("decode"), EXIT_CRASH, [4], "timed out", Ledger(10), blame=False).crashed == []


def test_the_failure_policy_takes_out_a_device_over_its_restarts_and_aborts_without_devices():
    policy, led = _policy(max_restarts=1), Ledger(10)
    dev = _W("infer", "cpu:1")
    assert policy.on_death(dev, EXIT_DEVICE, [], "exit code 71", led, devices_left=1).restart
    out = policy.on_death(dev, EXIT_DEVICE, [], "exit code 71", led, devices_left=1)
    assert out.remove and not out.abort and "device cpu:1 failed 2 times" in out.note and "(1 device(s) left)" in out.note
    last = policy.on_death(_W("infer", "cpu:0"), EXIT_DEVICE, [], "x", led, devices_left=0, last_error="chip gone")
    assert last.restart  # its first death
    gone = _W("infer", "cpu:0")
    gone.restarts = 1
    end = policy.on_death(gone, EXIT_DEVICE, [], "x", led, devices_left=0, last_error="chip gone")
    assert end.remove and end.abort == "every device failed (last error: chip gone); see report.json for details"


def test_the_failure_policy_aborts_on_a_broken_stage_and_on_a_fatal_error():
    policy, led, sink = _policy(max_restarts=1), Ledger(10), _W("sink")
    assert policy.on_death(sink, EXIT_CRASH, [], "exit code 70", led).restart
    broken = policy.on_death(sink, EXIT_CRASH, [], "exit code 70", led, last_error="no space")
    assert broken.abort == "sink-0 failed 2 times (last error: no space)"
    fatal = policy.on_death(_W("decode"), EXIT_FATAL, [1], "exit code 73", led, fatal="the output disk is full")
    assert fatal.abort == "the output disk is full" and not fatal.restart and not fatal.crashed
