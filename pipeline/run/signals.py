"""SIGINT/SIGTERM during one run, from the first check to the last manifest write.

A signal before the workers start stops at once (InterruptedBeforeStart: nothing ran, nothing is
left to stop). After, the first one is only recorded, and the supervisor stops the run in order
(shards kept, manifest "interrupted", the closing message); a second one asks for a hurried stop
(the workers are killed, not stopped in order). The previous handlers come back when the run ends,
unless the caller keeps these (`keep`: the CLI, which exits right after).
"""

from __future__ import annotations

import signal
from typing import Any


class InterruptedBeforeStart(KeyboardInterrupt):
    """SIGINT/SIGTERM while the run was being prepared (checks, model build): no worker ran."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class SignalGuard:
    """The run's SIGINT/SIGTERM handlers, as a context manager around the whole run."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None  # the first signal received, if any
        self.hurry = False  # a second signal: stop the workers now (kill), not in order
        self.started = False  # the workers are about to start: a signal no longer raises
        self.keep = False  # leave these handlers installed after the run (a signal then changes nothing)
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> SignalGuard:
        self.previous = {s: signal.getsignal(s) for s in self.SIGNALS}
        for s in self.SIGNALS:
            signal.signal(s, self.on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.keep:
            for s, h in self.previous.items():
                signal.signal(s, h)

    def on_signal(self, signum: int, frame: object) -> None:  # noqa: ARG002
        if self.signum is None:
            self.signum = signum
            if not self.started:
                raise InterruptedBeforeStart(signum)
        else:
            self.hurry = True

    def start(self) -> None:
        """From here a signal stops the run in order; one that came during the preparation, after
        the last point it could raise, stops it now."""
        self.started = True
        if self.signum is not None:
            raise InterruptedBeforeStart(self.signum)
