"""OpenVINO backend: the cpu backend's device model (`cpu:N`, infer.threads per process, the host
decodes) with OpenVINO's CPU plugin instead of onnxruntime, at fp32 or bf16 (`openvino.precision`), or
int8 when asked for (the image tower quantised by NNCF, calibrated on photos: openvino_int8.py).

On CPUs with native bf16 (AVX512_BF16 on Zen 4/5 and Cooper Lake; AMX on Sapphire Rapids and later)
bf16 inference runs 2-4x faster than fp32 with a cosine of ~0.9999 to the fp32 embedding (README,
"Fidelity"). Where bf16 would be emulated it is slower than fp32, so `bf16` is refused there and
`auto` means fp32. The precision is resolved once, before any worker starts (`resolve`), and
recorded in the manifest's model identity (`engine`), so a resume with another precision is refused.

The same ONNX files as the cpu backend: image towers with float NCHW or uint8 NHWC input, any batch.
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.backends.base import Device, DeviceError, TextSession
from pipeline.backends.cpu import CpuBackend, take_image_input
from pipeline.config import Config, ConfigError
from pipeline.data.images import normalize
from pipeline.errors import TextModelError

INSTALL_HINT = "pip install -e '.[openvino]'"
#: /proc/cpuinfo flags that mean bf16 matrix arithmetic in hardware
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
#: openvino.precision -> INFERENCE_PRECISION_HINT (int8: the quantised ops run int8, the rest fp32)
OV_HINT = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}


class OpenVinoMissing(ConfigError):
    """The openvino package is not installed (the `openvino` extra)."""


def import_openvino():
    try:
        import openvino
    except ImportError as exc:
        raise OpenVinoMissing(f"infer.backend = \"openvino\" needs the openvino package, which is not installed "
                              f"({exc}): {INSTALL_HINT}") from None
    return openvino


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def native_bf16_flags(flags: set[str] | None = None) -> list[str]:
    """This CPU's bf16 flags (empty: bf16 would be emulated). Read from /proc/cpuinfo, no import."""
    flags = cpu_flags() if flags is None else flags
    return [f for f in NATIVE_BF16_FLAGS if f in flags]


def ov_version() -> str:
    """The installed openvino's version ("2026.4.1"), read from its package metadata: importing
    openvino costs ~0.1 s of a core, on a run's path before any worker starts."""
    import importlib.metadata

    try:
        return importlib.metadata.version("openvino").split("-")[0]
    except importlib.metadata.PackageNotFoundError:
        return import_openvino().__version__.split("-")[0]  # OpenVinoMissing, with the install line


@functools.cache
def _ov_capabilities() -> tuple[str, ...]:
    """The CPU plugin's OPTIMIZATION_CAPABILITIES, remembered per openvino version and CPU
    (~/.cache/clip-pipeline/openvino-capabilities.json): asking costs an import of openvino and a
    Core (~0.2 s of a core) in the process that resolves the precision, before any worker starts.
    A cache that cannot be read or written is ignored."""
    import hashlib
    import json

    from pipeline.model.models import cache_root

    key = f"{ov_version()}:{hashlib.sha256(' '.join(sorted(cpu_flags())).encode()).hexdigest()[:16]}"
    path = cache_root() / "openvino-capabilities.json"
    try:
        cache = json.loads(path.read_text())
        hit = cache.get(key) if isinstance(cache, dict) else None
        if isinstance(hit, list) and all(isinstance(c, str) for c in hit):
            return tuple(hit)
    except (OSError, ValueError):
        pass
    core = import_openvino().Core()
    caps = tuple(str(c) for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    try:
        from pipeline.data.rundir import atomic_write_json

        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {key: list(caps)})
    except OSError:
        pass
    return caps


@dataclasses.dataclass(frozen=True)
class Precision:
    requested: str  # "auto", "fp32", "bf16" or "int8" (openvino.precision)
    resolved: str   # "fp32", "bf16" or "int8"
    reason: str     # why (one phrase, shown by dry-run and recorded in the manifest)


def resolve_precision(requested: str, flags: set[str] | None = None, capabilities: tuple[str, ...] | None = None,
                      key: str = "config key openvino.precision") -> Precision:
    """`auto` -> bf16 where the CPU has native bf16 (a cpuinfo flag and OpenVINO's BF16 capability),
    else fp32; `bf16` without native bf16 is refused (emulated bf16 is slower than fp32). `int8` is
    never chosen by `auto`: only asked for."""
    if requested == "int8":
        from pipeline.backends.openvino_int8 import NATIVE_INT8_FLAGS

        have = [f for f in NATIVE_INT8_FLAGS if f in (cpu_flags() if flags is None else flags)]
        return Precision("int8", "int8", "openvino.precision = \"int8\": NNCF post-training quantisation ("
                         + (f"this CPU has {', '.join(have)})" if have else "this CPU has no int8 dot-product "
                            "instructions (VNNI / AMX): it runs, maybe not faster than fp32)"))
    native = native_bf16_flags(flags)
    caps = _ov_capabilities() if capabilities is None else capabilities
    has = bool(native) and "BF16" in caps
    if requested == "fp32":
        return Precision("fp32", "fp32", "openvino.precision = \"fp32\"")
    if has:
        return Precision(requested, "bf16", f"this CPU has native bf16 ({', '.join(native)})")
    why = ("this CPU has no native bf16 (no " + " / ".join(NATIVE_BF16_FLAGS) + " in /proc/cpuinfo)" if not native
           else "OpenVINO's CPU plugin does not list BF16 among its OPTIMIZATION_CAPABILITIES here")
    if requested == "bf16":
        raise ConfigError(f"{key} = \"bf16\" is refused: {why}, so bf16 would be emulated, "
                          "which is slower than fp32; use \"fp32\" or \"auto\"")
    return Precision("auto", "fp32", why)


def resolved_config(cfg: Config) -> Config:
    """cfg with openvino.precision resolved (idempotent: fp32/bf16 are checked, not changed); int8
    needs NNCF and a calibration set (refused here, naming the key, before anything starts)."""
    p = resolve_precision(cfg.openvino.precision)
    if p.resolved == "int8":
        from pipeline.backends.openvino_int8 import calibration_set, require_nncf

        calibration_set(cfg)
        require_nncf()
    return cfg.replace(openvino=dataclasses.replace(cfg.openvino, precision=p.resolved))


def compile_config(precision: str, threads: int) -> dict[str, Any]:
    """The CPU plugin's settings: one stream of `threads` threads, no pinning (several inference
    processes share the cores, as the cpu backend's; pinned, two 1-thread processes could land on
    the same core)."""
    return {"INFERENCE_PRECISION_HINT": OV_HINT[precision], "INFERENCE_NUM_THREADS": int(threads),
            "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY", "ENABLE_CPU_PINNING": False}


def ir_dir(path: str) -> Path:
    """Where the IR of the ONNX model at `path` is kept: its sha256 (remembered per file, so this
    reads no model) and the OpenVINO version, which writes the IR."""
    from pipeline.model.models import cache_root, model_sha256

    return cache_root() / "openvino-ir" / f"{model_sha256(path)[:40]}-ov{ov_version()}"


def converted_model(path: str) -> str:
    """The ONNX model at `path` as OpenVINO IR (model.xml + model.bin), converted once and kept in
    the cache (`openvino.ir_cache`); `path` itself for a model that is not ONNX or where the cache
    cannot be written (read-only home, full disk).

    The IR is what `read_model` builds from the ONNX at every start (~0.35 s of a core for ViT-B/32),
    saved without fp16 compression, so the compiled model is the same: embeddings bit-identical
    (tests/backends/test_openvino.py). Loading it maps model.bin instead of parsing protobuf. Several
    processes start at once: one converts (a temporary directory renamed into place, under a lock
    taken without waiting) while the others read the ONNX as they would without the cache."""
    if not str(path).endswith(".onnx"):
        return path
    ov = import_openvino()
    try:
        target = ir_dir(path)
    except OSError:
        return path
    xml = target / "model.xml"
    if xml.is_file() and (target / "model.bin").is_file():
        return str(xml)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.with_name(f".{target.name}.lock"), "wb") as lock:
            # one converter at a time, and nobody waits for it: the others read the ONNX as before
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if not xml.is_file():
                tmp.mkdir()
                ov.save_model(ov.Core().read_model(path), str(tmp / "model.xml"), compress_to_fp16=False)
                os.replace(tmp, target)
    except OSError:
        pass  # no space or no permission, or another process is converting it now
    except RuntimeError:
        return path  # OpenVINO cannot read it: compile_model(path) says why, with the file's name
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(xml) if xml.is_file() and (target / "model.bin").is_file() else path


def int8_model(cfg: Config, log: Callable[[str], None] | None = None) -> Any:
    """cfg's image tower quantised to int8 (openvino_int8.py): the cached IR's path, made once."""
    from pipeline.backends.openvino_int8 import Engine, quantized_model

    path = cfg.model.path
    float_model = (lambda: converted_model(path)) if cfg.openvino.ir_cache else (lambda: path)
    return quantized_model(cfg, Engine(ov_version(), import_openvino, float_model), log)


class OvSession:
    """One compiled ONNX model on OpenVINO's CPU plugin: first input -> first output, any batch.
    `source`: what to compile instead of `path` (int8: the quantised model, a path or an ov.Model)."""

    def __init__(self, path: str, precision: str, threads: int, what: str = "model",
                 key: str = "config key openvino.precision", cache_dir: str = "", ir_cache: bool = True,
                 source: Any = None):
        ov = import_openvino()
        # "auto" -> fp32/bf16; bf16 is checked again here (a session opened without a resolved config)
        precision = resolve_precision(precision, key=key).resolved
        if precision == "int8" and source is None and str(path).endswith(".onnx"):
            raise ConfigError(f"{key} = \"int8\" needs the model quantised first (calibrated on photos: "
                              "openvino.calibration); this session was given the float model")
        self.precision = precision
        core = ov.Core()
        if cache_dir:
            # opt-in (openvino.cache_dir): OpenVINO keys an entry by the model file (path and file
            # info) and the compile settings
            core.set_property({"CACHE_DIR": os.path.expanduser(cache_dir)})
        try:
            # from a path: with a CACHE_DIR hit the model file is not even parsed
            if source is None:
                source = converted_model(path) if ir_cache else path
            self.compiled = core.compile_model(source, "CPU", compile_config(precision, threads))
        except Exception as exc:  # noqa: BLE001 - openvino raises RuntimeError with the parser's message
            raise DeviceError(f"cannot load {what} {path} with OpenVINO: {str(exc).strip().splitlines()[0]}") from exc
        self.request = self.compiled.create_infer_request()
        inp, out = self.compiled.inputs[0], self.compiled.outputs[0]
        self.input_type = inp.get_element_type().get_type_name()  # "f32", "u8", "i32", "i64"
        self.input_shape = [d.get_length() if d.is_static else None for d in inp.get_partial_shape()]
        self.output_shape = [d.get_length() if d.is_static else None for d in out.get_partial_shape()]

    def run(self, x: np.ndarray) -> np.ndarray:
        # share_inputs: no copy of the batch; the output is copied out of the request's buffer
        res = self.request.infer({0: x}, share_inputs=True)
        return np.array(res[0], dtype=np.float32, copy=True)


class OvImageDevice(Device):
    def __init__(self, cfg: Config, device: str):
        source = None
        if cfg.openvino.precision == "int8":  # a run made it before start (prepare): loaded from the cache
            source = int8_model(cfg)
        self.session = OvSession(cfg.model.path, cfg.openvino.precision, cfg.infer.threads,
                                 cache_dir=cfg.openvino.cache_dir, ir_cache=cfg.openvino.ir_cache, source=source)
        s = self.session
        if s.input_type not in ("u8", "f32") or len(s.input_shape) != 4:
            raise DeviceError(f"{cfg.model.path} is not a CLIP image tower: input {s.input_type} {s.input_shape}")
        take_image_input(self, cfg, s.input_type == "u8", s.input_type, s.input_shape, s.output_shape)

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        x = pixels if self.uint8_input else normalize(pixels)
        try:
            return self.session.run(np.ascontiguousarray(x))
        except RuntimeError as exc:
            raise DeviceError(f"OpenVINO inference failed: {exc}") from exc


class OvTextSession(TextSession):
    """A text tower (either form) on OpenVINO: ids [n, 77] -> [n, dim] or [n, 77, width]."""

    def __init__(self, path: str, threads: int = 1, precision: str = "auto"):
        if precision == "int8":
            raise TextModelError("int8 is for the image tower only (openvino.precision = \"int8\", calibrated on "
                                 "photos): run the text tower at fp32, bf16 or auto")
        try:
            self.ov = OvSession(path, precision, threads, what="text model", key="text precision (--precision)")
        except (DeviceError, ConfigError) as exc:  # a broken model; openvino missing; bf16 refused here
            raise TextModelError(str(exc)) from exc
        shape, out = self.ov.input_shape, self.ov.output_shape
        if self.ov.input_type not in ("i32", "i64") or len(shape) != 2:
            raise TextModelError(f"{path} is not a CLIP text model: its input is {self.ov.input_type} {shape}, "
                                 "expected int32/int64 token ids [batch, 77]")
        self.id_dtype = np.int32 if self.ov.input_type == "i32" else np.int64
        self.context_length = shape[1] or 77
        self.fixed_batch = shape[0]
        self.out_rank = len(out)
        self.out_last = out[-1]
        self.engine_info = engine_identity(self.ov.precision)

    def run_ids(self, ids: np.ndarray) -> np.ndarray:
        try:
            return self.ov.run(np.ascontiguousarray(ids, dtype=self.id_dtype))
        except RuntimeError as exc:
            raise TextModelError(f"OpenVINO text inference failed: {exc}") from exc


class OpenVinoBackend(CpuBackend):
    """cpu's devices, batching, tail splitting and bench ready crops; OpenVINO's inference."""

    name = "openvino"

    @classmethod
    def resolve(cls, cfg: Config) -> Config:
        return resolved_config(cfg)

    @classmethod
    def tail_pieces(cls, cfg: Config) -> int:
        """fp32 as onnxruntime (quarter batches); bf16 on AMX/AVX512_BF16 half batches: small batches
        cost more per image there (ViT-B/32, one core: 17.7 ms at batch 4, 14.7 at 8, 13.1 at 16),
        so quarter batches made the last 64 images of a run ~35% dearer."""
        return 2 if cfg.openvino.precision == "bf16" else 4

    @classmethod
    def open_device(cls, cfg: Config, device: str) -> Device:
        return OvImageDevice(cfg, device)

    @classmethod
    def open_text(cls, model: str | None, device: Any = None, threads: int = 1, precision: str = "auto") -> TextSession:
        if model is None:
            raise TextModelError("no text model given")
        return OvTextSession(model, threads, precision)

    @classmethod
    def resolve_devices(cls, cfg: Config) -> list[str]:
        from pipeline.backends.cpu import resolve_cpu_devices

        return resolve_cpu_devices(cfg, "openvino")

    @classmethod
    def prepare(cls, cfg: Config, log: Callable[[str], None]) -> None:
        if cfg.openvino.precision == "int8":  # quantised once here, so the workers only load it
            int8_model(cfg, log)

    @classmethod
    def model_identity(cls, cfg: Config) -> dict[str, Any]:
        ident = super().model_identity(cfg)
        ident["engine"] = engine_identity(cfg.openvino.precision, calibration_of(cfg))
        return ident

    @classmethod
    def fingerprint_fields(cls, cfg: Config) -> dict[str, Any]:
        cal = calibration_of(cfg)
        return {"precision": cfg.openvino.precision, **({"calibration": cal.fingerprint()} if cal else {})}

    @classmethod
    def probe(cls) -> dict:
        import os

        try:
            ov = import_openvino()
            _ov_capabilities()
        except ConfigError as exc:
            return {"available": False, "devices": [], "reason": str(exc)}
        n = len(os.sched_getaffinity(0))
        p = resolve_precision("auto")
        return {"available": True, "devices": [f"cpu:{i}" for i in range(n)],
                "reason": f"OpenVINO {ov.__version__.split('-')[0]}, {n} usable cores; precision auto = {p.resolved}: "
                          f"{p.reason}"}


def calibration_of(cfg: Config) -> Any:
    """int8's CalibrationSet (openvino_int8.py), None at the other precisions."""
    if cfg.openvino.precision != "int8":
        return None
    from pipeline.backends.openvino_int8 import calibration_set

    return calibration_set(cfg)


def engine_identity(precision: str, calibration: Any = None) -> dict[str, Any]:
    """What the manifest, `inspect` and the report record about the engine: the resolved precision
    (int8: and the calibration set, with NNCF's version)."""
    p = resolve_precision(precision)
    ident = {"name": "openvino", "version": ov_version(), "precision": p.resolved,
             "precision_reason": p.reason}
    if calibration is not None:
        from pipeline.backends.openvino_int8 import nncf_version

        ident["calibration"] = calibration.identity()
        ident["nncf"] = nncf_version()
    return ident


def bf16_hint(cfg: Config, flags: set[str] | None = None) -> str | None:
    """One line for `run` and `run --dry-run` with the default cpu backend (onnxruntime fp32) on a CPU
    with native bf16: how to get about twice the throughput. None elsewhere. Reads /proc/cpuinfo only."""
    if cfg.infer.backend != "cpu":
        return None
    native = native_bf16_flags(flags)
    if not native:
        return None
    import importlib.util

    install = "" if importlib.util.find_spec("openvino") else f" (after {INSTALL_HINT})"
    return (f"note: this CPU has native bf16 ({', '.join(native)}): --set infer.backend=openvino --set "
            f"openvino.precision=bf16{install} runs inference at about 2x the throughput or more, with embeddings "
            "at a cosine of ~0.9999 to fp32 (README, \"Preprocessing fidelity\": check your weights with scripts/bf16_parity.py)")
