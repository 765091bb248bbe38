"""The first code a worker process runs: ask the kernel for a signal on the supervisor's death
*before* the heavy imports (numpy, zmq, a device library), so a worker whose supervisor is killed
while it is still starting cannot outlive it (issue #12). Imports nothing heavy itself.

Spawned workers run `boot(payload)` (payload = the pickled (WorkerSpec, Slot)); workers under
another interpreter run `python -m pipeline.worker.boot SPEC.pickle`.
"""

from __future__ import annotations

import sys

from pipeline.worker.pdeath import early_guard


def boot(payload: bytes) -> None:
    early_guard()
    import pickle

    from pipeline.worker.loop import worker_main

    spec, slot = pickle.loads(payload)
    worker_main(spec, slot)


if __name__ == "__main__":
    early_guard()
    with open(sys.argv[1], "rb") as fh:
        boot(fh.read())
