"""The stage contract: what a stage supplies to the generic worker loop (pipeline/worker/loop.py).

A stage is a *core*: `setup()`, `handle(header, frames) -> outputs`, `flush(now) -> outputs`,
`deadline()`, `close()`, plus `info` (sent with `ready`), `wake_fd()` and `busy_s()`. StageCore
gives every hook but `handle` a no-op default, so the loop calls them all without probing.
Outputs are (target, header, buffers) with target "next" (the next stage), "sink" or "control".
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pipeline.wire.messages import Failure

Output = tuple[str, dict, tuple]


class FatalError(Exception):
    """Raised by a core when the whole run must stop (message is for the user)."""


class StageCore:
    """Base of the stage cores: no-op defaults for the optional hooks."""

    #: what the supervisor learns with `ready` (e.g. the device's embedding width); set in __init__/setup
    info: dict[str, Any]

    def __init__(self) -> None:
        self.info = {}

    def setup(self) -> None:
        """Open what the stage needs (models, devices), inside the worker process."""

    def handle(self, header: dict, frames: list) -> Iterable[Output]:
        raise NotImplementedError

    def in_device_call(self) -> bool:
        """True while a device call runs (a worker whose supervisor died waits for it to return)."""
        return False

    def flush(self, now: float) -> Iterable[Output]:
        """Outputs that are due without new input (a batch timeout, a finished background job)."""
        return ()

    def deadline(self) -> float | None:
        """When flush() next has something to do (monotonic seconds), or None."""
        return None

    def wake_fd(self) -> int | None:
        """A file descriptor the loop also polls (readable = call flush), or None."""
        return None

    def busy_s(self) -> float | None:
        """The stage's busy seconds when its work runs on a thread of its own (else None: the loop
        counts the time spent in handle/flush)."""
        return None

    def close(self) -> None:
        """Release what setup() opened."""


def fail(failure: Failure) -> Output:
    """The sink-bound `fail` message of one input that cannot be embedded."""
    return ("sink", failure.header(), ())
