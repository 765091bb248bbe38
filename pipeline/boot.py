"""The first code a worker process runs: ask the kernel for a signal on the supervisor's death
*before* the heavy imports (numpy, zmq, a device library), so a worker whose supervisor is killed
while it is still starting cannot outlive it (issue #12). Imports nothing heavy itself.

Spawned workers run `boot(payload)` (payload = the pickled (WorkerSpec, Slot)); workers under
another interpreter run `python -m pipeline.boot SPEC.pickle`.
"""

from __future__ import annotations

import os
import signal
import sys

PR_SET_PDEATHSIG = 1
PARENT_ENV = "CLIP_PIPELINE_SUPERVISOR_PID"


def set_parent_death_signal(sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send `sig` to this process when its parent dies (Linux prctl
    PR_SET_PDEATHSIG). Returns False where unavailable (the worker loops' parent checks remain)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def orphaned() -> bool:
    """True when the supervisor that started this process is gone."""
    parent = os.environ.get(PARENT_ENV)
    return bool(parent) and os.getppid() != int(parent)


def early_guard() -> None:
    """Until the worker loop installs its own handler: SIGTERM (the parent-death signal, or the
    supervisor stopping us) ends the process at once; nothing has been opened yet."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle
    set_parent_death_signal(signal.SIGTERM)
    if orphaned():  # the supervisor died before prctl took effect
        os._exit(0)


def boot(payload: bytes) -> None:
    early_guard()
    import pickle

    from pipeline.worker import worker_main

    spec, slot = pickle.loads(payload)
    worker_main(spec, slot)


if __name__ == "__main__":
    early_guard()
    with open(sys.argv[1], "rb") as fh:
        boot(fh.read())
