"""CPU backend: onnxruntime inference (decode and preprocess run in the host stages)."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from pipeline.backends.base import Backend, Device, DeviceError, TextSession, text_model
from pipeline.config import Config, ConfigError
from pipeline.data.images import normalize
from pipeline.errors import TextModelError

_CPU = re.compile(r"^cpu:(\d+)$")


def resolve_cpu_devices(cfg: Config, backend: str) -> list[str]:
    devices = cfg.infer.devices
    if devices == ("all",):
        import os

        return [f"cpu:{i}" for i in range(len(os.sched_getaffinity(0)))]
    names = []
    for d in devices:
        if isinstance(d, int) and not isinstance(d, bool):
            d = f"cpu:{d}"
        if not isinstance(d, str) or not _CPU.match(d):
            raise ConfigError(f"config key infer.devices: {d!r} is not a {backend} device "
                              "(use \"cpu:0\", \"cpu:1\", ... or \"all\")")
        names.append(d)
    if len(set(names)) != len(names):
        raise ConfigError(f"config key infer.devices lists a device twice: {list(devices)}")
    return names


def take_image_input(dev: Device, cfg: Config, uint8_input: bool, input_type: str, in_shape: list, out_shape: list) -> None:
    """The checks and settings an ONNX image tower's input implies (cpu and openvino devices): the
    input kind against model.input_kind, the crop size against model.image_size, a fixed or dynamic
    batch (model.batch_size), the embedding width. Shapes: ints where static, anything else where not."""
    dev.uint8_input = uint8_input
    if cfg.model.input_kind == "uint8" and not uint8_input:
        raise DeviceError(f"model.input_kind = 'uint8' but {cfg.model.path} takes {input_type}")
    if cfg.model.input_kind == "float" and uint8_input:
        raise DeviceError(f"model.input_kind = 'float' but {cfg.model.path} takes uint8")
    want = cfg.model.image_size or 224
    hw = in_shape[1:3] if uint8_input else in_shape[2:4]
    if all(isinstance(d, int) for d in hw) and tuple(hw) != (want, want):
        raise ConfigError(f"model {cfg.model.path} takes {hw[0]}x{hw[1]} images but the crops are {want}x{want} "
                          f"(config key model.image_size; 0 reads the size from the model)")
    batch = in_shape[0]
    dev.fixed_batch = isinstance(batch, int)
    dev.batch_size = batch if dev.fixed_batch else cfg.model.batch_size
    dev.dim = int(out_shape[-1]) if isinstance(out_shape[-1], int) else 512


class OnnxDevice(Device):
    def __init__(self, cfg: Config, device: str):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = cfg.infer.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(cfg.model.path, opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001
            raise DeviceError(f"cannot load model {cfg.model.path} with onnxruntime: {exc}") from exc
        inp = self.session.get_inputs()[0]
        out = self.session.get_outputs()[0]
        self.input_name = inp.name
        take_image_input(self, cfg, inp.type == "tensor(uint8)", inp.type, inp.shape, out.shape)

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        x = pixels if self.uint8_input else normalize(pixels)
        return self.session.run(None, {self.input_name: x})[0]


class OrtTextSession(TextSession):
    """onnxruntime text model: ids [n, 77] -> [n, dim] or [n, 77, width]."""

    def __init__(self, path: str, threads: int = 1):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001
            raise TextModelError(f"cannot load text model {path} with onnxruntime: {exc}") from exc
        inp = self.session.get_inputs()[0]
        out = self.session.get_outputs()[0]
        if inp.type not in ("tensor(int32)", "tensor(int64)") or len(inp.shape) != 2:
            raise TextModelError(f"{path} is not a CLIP text model: its input {inp.name} is {inp.type} {inp.shape}, "
                                 "expected int32/int64 token ids [batch, 77]")
        self.input_name = inp.name
        self.id_dtype = np.int32 if inp.type == "tensor(int32)" else np.int64
        self.context_length = inp.shape[1] if isinstance(inp.shape[1], int) else 77
        self.fixed_batch = inp.shape[0] if isinstance(inp.shape[0], int) else None
        self.out_rank = len(out.shape)
        self.out_last = out.shape[-1] if isinstance(out.shape[-1], int) else None

    def run_ids(self, ids: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: ids.astype(self.id_dtype, copy=False)})[0]


class CpuBackend(Backend):
    name = "cpu"

    @classmethod
    def tail_pieces(cls, cfg: Config) -> int:
        """onnxruntime with a dynamic batch: a batch costs about its size (ViT-B/32 on a core: the
        per-image cost changes little from batch 4 to 16), so the tail goes as quarter batches."""
        return 4

    @classmethod
    def resolve_devices(cls, cfg: Config) -> list[str]:
        return resolve_cpu_devices(cfg, "cpu")

    @classmethod
    def open_text(cls, model: str | None, device: Any = None, threads: int = 1, precision: str = "auto") -> TextSession:
        return OrtTextSession(text_model(model), threads)

    @classmethod
    def open_device(cls, cfg: Config, device: str) -> Device:
        return OnnxDevice(cfg, device)

    @classmethod
    def probe(cls) -> dict:
        import os

        try:
            import onnxruntime as ort
        except ImportError as exc:
            return {"available": False, "devices": [], "reason": f"onnxruntime not importable: {exc}"}
        n = len(os.sched_getaffinity(0))
        return {"available": True, "devices": [f"cpu:{i}" for i in range(n)],
                "reason": f"onnxruntime {ort.__version__}, {n} usable cores"}
