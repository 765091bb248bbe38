"""Run bmodels on the BM1684X simulator from the main (3.11) interpreter.

The simulator lives in the TPU-MLIR venv (Python 3.10, ``pyruntime_bm``); :class:`BmodelRunner`
keeps one child process per bmodel (``venv_scripts/bmrun.py``) and exchanges numpy arrays with it
over pipes. Speed: seconds per forward for a tiny model, minutes for ViT-B/32 -- for correctness,
never for throughput.
"""
from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .env import find_venv, venv_env, venv_script


class SimulatorError(RuntimeError):
    """The simulator child failed (its stderr tail is in the message)."""


class BmodelRunner:
    """One bmodel loaded in the simulator, in a child process.

    >>> with BmodelRunner("m_bm1684x_f16_4b.bmodel") as r:
    ...     r.networks, r.nets[r.networks[0]]["inputs"]
    ...     (emb,) = r.forward([x])          # x: [4,3,224,224] float32 (or uint8 if fused)

    Inputs of a smaller batch than the tensor buffers run through ``forward_dynamic`` (they must
    match a stage of a multi-stage bmodel).
    """

    def __init__(self, bmodel, venv=None):
        self.bmodel = Path(bmodel).resolve()
        if not self.bmodel.is_file():  # pyruntime_bm would abort on a missing file
            raise FileNotFoundError(f"bmodel not found: {self.bmodel}")
        d = find_venv(venv)
        self._err = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(
            [str(d / "bin" / "python"), str(venv_script("bmrun.py")), str(self.bmodel)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err, env=venv_env(venv))
        hello = self._recv_json()
        if not hello.get("ok"):
            self.close()
            raise SimulatorError(hello.get("error", "simulator failed to start"))
        self.networks: list[str] = hello["networks"]
        self.nets: dict = hello["nets"]
        self.last_seconds: float | None = None

    # -- protocol -------------------------------------------------------------------------------
    def _stderr_tail(self, n: int = 3000) -> str:
        try:
            self._err.seek(0, os.SEEK_END)
            size = self._err.tell()
            self._err.seek(max(0, size - n))
            return self._err.read().decode(errors="replace")
        except (OSError, ValueError):
            return ""

    def _send(self, payload: bytes):
        try:
            self._proc.stdin.write(struct.pack("<Q", len(payload)) + payload)
            self._proc.stdin.flush()
        except BrokenPipeError:
            raise SimulatorError(f"simulator process died:\n{self._stderr_tail()}") from None

    def _recv(self) -> bytes:
        head = self._proc.stdout.read(8)
        if len(head) < 8:
            rc = self._proc.wait()
            raise SimulatorError(f"simulator process exited (rc={rc}):\n{self._stderr_tail()}")
        (n,) = struct.unpack("<Q", head)
        return self._proc.stdout.read(n)

    def _recv_json(self) -> dict:
        return json.loads(self._recv())

    # -- API ------------------------------------------------------------------------------------
    def forward(self, inputs: Sequence[np.ndarray], net: str | None = None) -> list[np.ndarray]:
        """Run one forward; inputs by position, cast to the bmodel's dtypes. Returns outputs."""
        buf = io.BytesIO()
        np.savez(buf, **{f"in{k}": np.ascontiguousarray(x) for k, x in enumerate(inputs)})
        self._send(json.dumps({"op": "forward", "net": net}).encode())
        self._send(buf.getvalue())
        reply = self._recv_json()
        if not reply.get("ok"):
            raise SimulatorError(reply.get("error", "forward failed"))
        self.last_seconds = reply["seconds"]
        arrays = np.load(io.BytesIO(self._recv()))
        return [arrays[f"out{k}"] for k in range(len(reply["shapes"]))]

    def close(self):
        if self._proc.poll() is None:
            try:
                self._send(json.dumps({"op": "close"}).encode())
                self._proc.stdin.close()
                self._proc.wait(timeout=30)
            except (SimulatorError, OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()
        self._err.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def run_bmodel(bmodel, inputs: Sequence[np.ndarray], net: str | None = None, venv=None) -> list[np.ndarray]:
    """One-shot: load ``bmodel`` in the simulator, run one forward on ``inputs``, return outputs."""
    with BmodelRunner(bmodel, venv=venv) as r:
        return r.forward(inputs, net=net)
