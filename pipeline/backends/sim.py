"""Simulator backend: BM1684X bmodels run on TPU-MLIR's chip simulator (cmodel) via pyruntime_bm.

The closest thing to SOPHON hardware this project has: the real BM1684X runtime (libbmrt) runs a
real bmodel, only the chip is simulated. Each infer worker runs *under the TPU-MLIR Python 3.10
venv* (`scripts/setup_tpu_mlir.sh`), launched as `python -m pipeline.worker.boot` and speaking the same
ZeroMQ/msgpack protocol as every other worker — decode, preprocess and the sink run as usual in
the main interpreter. Throughput is seconds per forward (tiny model) to minutes (ViT-B/32):
for correctness of the TPU path, never for speed.

Devices: `devices = [0]` (or "sim:0"); several entries run several simulator processes.
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

from pipeline.backends.base import Backend, Device, DeviceError, TextSession
from pipeline.config import Config, ConfigError
from pipeline.data.images import normalize
from pipeline.errors import TextModelError


class SimDevice(Device):
    """One bmodel loaded in pyruntime_bm (runs inside the venv's Python 3.10)."""

    def __init__(self, cfg: Config, device: str):
        import importlib.util
        import sys

        spec = importlib.util.find_spec("tpu_mlir")
        if spec is None:
            raise DeviceError("tpu_mlir is not importable in this interpreter; run scripts/setup_tpu_mlir.sh")
        sys.path.insert(0, os.path.join(list(spec.submodule_search_locations)[0], "python"))
        if not os.path.isfile(cfg.model.path):  # pyruntime_bm aborts the process on a missing file
            raise DeviceError(f"bmodel not found: {cfg.model.path} (config key model.path)")
        # the runtime prints to fd 1; keep the user's terminal for the progress display
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        import pyruntime_bm

        self.model = pyruntime_bm.Model(cfg.model.path, 0, "")
        self.net = self.model.Net(self.model.networks[0])
        self.inp = self.net.inputs[0]
        shape = tuple(self.inp.data.shape)
        size = cfg.model.image_size or 224
        if len(shape) != 4 or shape[1:] not in ((3, size, size),):
            raise DeviceError(f"bmodel {cfg.model.path} input {self.inp.name} has shape {shape}, expected [N,3,{size},{size}] "
                              "(config key model.image_size)")
        self.batch_size = shape[0]
        self.fixed_batch = True
        self.uint8_input = self.inp.data.dtype == np.uint8  # compiled with --fuse-preprocess
        if self.inp.data.dtype not in (np.float32, np.uint8):
            # an INT8 bmodel compiled with model_deploy --quant_input takes int8 scaled by the input's
            # scale; `clip-pipeline compile --quantize int8|mixed` keeps float32 (or fused uint8) input.
            raise DeviceError(f"bmodel {cfg.model.path} input {self.inp.name} is {self.inp.data.dtype}: the sim "
                              "backend takes float32 (CLIP-normalised) or uint8 (fused preprocessing) input; "
                              "recompile with `clip-pipeline compile --quantize int8` (no --quant_input)")
        self.dim = int(np.prod(self.net.outputs[0].data.shape[1:]))

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        if pixels.shape[0] != self.batch_size:
            raise DeviceError(f"batch of {pixels.shape[0]} for a {self.batch_size}-batch bmodel")
        x = np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)) if self.uint8_input else normalize(pixels)
        self.inp.data[...] = x.astype(self.inp.data.dtype, copy=False)
        self.net.forward()
        out = np.array(self.net.outputs[0].data, dtype=np.float32)  # copy: the view is reused
        return out.reshape(self.batch_size, -1)


class SimTextSession(TextSession):
    """A text bmodel on the BM1684X simulator (TPU-MLIR venv child process; seconds per batch)."""

    def __init__(self, path: str):
        from pipeline.toolchain.runner import BmodelRunner, SimulatorError

        try:
            self.runner = BmodelRunner(path)
        except (SimulatorError, FileNotFoundError, RuntimeError) as exc:  # TpuMlirMissing is a RuntimeError
            raise TextModelError(f"cannot open text bmodel {path} on the simulator: {str(exc).splitlines()[0]}") from exc
        net = self.runner.nets[self.runner.networks[0]]
        in_shape, out_shape = net["inputs"][0]["shape"], net["outputs"][0]["shape"]
        if len(in_shape) != 2:
            raise TextModelError(f"{path}: input is {in_shape}, expected token ids [batch, 77]")
        self.fixed_batch, self.context_length = int(in_shape[0]), int(in_shape[1])
        self.out_rank, self.out_last = len(out_shape), int(out_shape[-1])
        self.id_dtype = np.int32

    def run_ids(self, ids: np.ndarray) -> np.ndarray:
        (y,) = self.runner.forward([np.ascontiguousarray(ids, dtype=np.int32)])
        return np.asarray(y, dtype=np.float32)


class SimBackend(Backend):
    name = "sim"

    @classmethod
    def resolve_devices(cls, cfg: Config) -> list[str]:
        out = []
        for d in cfg.infer.devices:
            if isinstance(d, int) and not isinstance(d, bool) and d >= 0:
                out.append(f"sim:{d}")
            elif isinstance(d, str) and re.fullmatch(r"sim:\d+", d):
                out.append(d)
            else:
                raise ConfigError(f"config key infer.devices: {d!r} is not a simulator device (use 0, 1, ... or \"sim:0\")")
        cls.worker_python(cfg)  # fail early, in the supervisor, with the set-up hint
        if not cfg.model.path.endswith(".bmodel"):
            raise ConfigError(f"config key model.path: the sim backend runs a BM1684X .bmodel, got {cfg.model.path} "
                              "(compile one with `clip-pipeline compile`)")
        return out

    @classmethod
    def worker_python(cls, cfg: Config) -> str | None:
        from pipeline.toolchain.env import TpuMlirMissing, find_venv

        try:
            return str(find_venv() / "bin" / "python")
        except TpuMlirMissing as exc:
            raise ConfigError(str(exc).replace("\n", " ")) from None

    @classmethod
    def open_text(cls, model: str | None, device: Any = None, threads: int = 1, precision: str = "auto") -> TextSession:
        if model is None:
            raise TextModelError("no text model given")
        return SimTextSession(model)

    @classmethod
    def open_device(cls, cfg: Config, device: str) -> Device:
        return SimDevice(cfg, device)

    @classmethod
    def probe(cls) -> dict:
        from pipeline.toolchain.env import TpuMlirMissing, find_venv

        try:
            venv = find_venv()
        except TpuMlirMissing as exc:
            return {"available": False, "devices": [], "reason": str(exc).splitlines()[0]}
        return {"available": True, "devices": ["sim:0 (BM1684X simulator)"], "reason": f"TPU-MLIR venv {venv}"}
