"""Parent-death handling shared by pipeline/worker/boot.py (before the heavy imports) and the worker loop:
the kernel's PR_SET_PDEATHSIG and the supervisor's pid, passed in the environment. Imports nothing
heavy (it runs first in every worker)."""

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
