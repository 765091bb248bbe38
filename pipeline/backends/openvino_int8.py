"""openvino.precision = "int8": the image tower quantised by NNCF's post-training quantisation,
calibrated on photos preprocessed exactly as the run preprocesses them, made once and cached.

The calibration set is `openvino.calibration` (a directory of photos like the ones to embed) and
`openvino.calibration_count` of its photos, spread evenly over the sorted file names; its identity
is the chosen photos' names and bytes (sha256), so a copied directory is the same set and an edited
photo is not. The quantised model (OpenVINO IR, int8 weights and FakeQuantize ops) is kept in
~/.cache/clip-pipeline/openvino-int8/ under the model's sha256, that identity, the count, the
preprocessing and the NNCF / OpenVINO versions. `quantized_model` (through openvino.py's
`int8_model`) makes it under a lock that the other processes wait for (they load its result instead
of calibrating again); a run calls it once in the main process before the workers start
(`OpenVinoBackend.prepare`), so the workers only load it.
Text towers are not quantised (refused in `OvTextSession`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import importlib.util
import io
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import Config, ConfigError

INT8_INSTALL_HINT = "pip install -e '.[openvino-int8]'"
#: /proc/cpuinfo flags that mean int8 dot products in hardware (OpenVINO runs int8 without them, slower)
NATIVE_INT8_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni")


class NncfMissing(ConfigError):
    """The nncf package is not installed (the `openvino-int8` extra)."""


def nncf_missing_message(why: str = "") -> str:
    return ("openvino.precision = \"int8\" needs NNCF (Intel's quantisation library) to calibrate the model, "
            f"which is not installed{f' ({why})' if why else ''}: {INT8_INSTALL_HINT}")


def require_nncf(import_it: bool = False) -> Any:
    """The nncf module (import_it), or None after checking only that it is installed (no slow import)."""
    if not import_it:
        if importlib.util.find_spec("nncf") is None:
            raise NncfMissing(nncf_missing_message())
        return None
    try:
        import nncf
    except ImportError as exc:
        raise NncfMissing(nncf_missing_message(str(exc))) from None
    return nncf


def nncf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nncf")
    except PackageNotFoundError:
        raise NncfMissing(nncf_missing_message()) from None


@dataclasses.dataclass(frozen=True)
class CalibrationSet:
    directory: str
    files: tuple[str, ...]  # the chosen photos, paths relative to `directory`, in order
    available: int          # photos in the directory
    digest: str             # sha256 of the chosen photos' relative names and bytes

    def fingerprint(self) -> str:
        """The manifest's fingerprint value: which photos, not where they lie."""
        return f"{len(self.files)} photos, sha256 {self.digest[:16]}"

    def identity(self) -> dict[str, Any]:
        return {"dir": self.directory, "photos": len(self.files), "of": self.available, "sha256": self.digest}


@functools.lru_cache(maxsize=8)
def _photos(directory: str, extensions: tuple[str, ...]) -> tuple[str, ...]:
    """The directory's photos, sorted; walked once per process (the checks, the fingerprint and the
    manifest each ask for the calibration set, and a large directory takes a while to walk)."""
    exts = {"." + e.lower().lstrip(".") for e in extensions} - {".tar"}
    out = []
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in files:
            if os.path.splitext(name)[1].lower() in exts:
                out.append(os.path.relpath(os.path.join(root, name), directory))
    return tuple(sorted(out))


def choose(files: Sequence[str], count: int) -> list[str]:
    """`count` of `files` spread evenly over the sorted list (all of them when there are fewer)."""
    if count >= len(files):
        return list(files)
    return [files[i * len(files) // count] for i in range(count)]


@functools.lru_cache(maxsize=8)
def _digest(directory: str, files: tuple[str, ...], stats: tuple) -> str:
    h = hashlib.sha256()
    for rel in files:
        h.update(os.fsencode(rel) + b"\0")
        with open(os.path.join(directory, rel), "rb") as fh:
            h.update(hashlib.sha256(fh.read()).digest())
    return h.hexdigest()


def calibration_set(cfg: Config) -> CalibrationSet:
    """The calibration photos of cfg (openvino.calibration, openvino.calibration_count), refused with
    the config key when there are none. Reads the chosen photos once per process (their sha256)."""
    d = cfg.openvino.calibration
    if not d:
        raise ConfigError("openvino.precision = \"int8\" needs calibration photos: set config key openvino.calibration "
                          "to a directory of photos like the ones to embed (e.g. --set openvino.calibration=DIR; "
                          f"{cfg.openvino.calibration_count} of them are used, openvino.calibration_count)")
    if not os.path.isdir(d):
        raise ConfigError(f"config key openvino.calibration: {d} is not a directory (openvino.precision = \"int8\" "
                          "calibrates on the photos in it)")
    photos = _photos(d, tuple(cfg.input.extensions))
    if not photos:
        raise ConfigError(f"config key openvino.calibration: {d} holds no photos (files ending in "
                          f"{', '.join('.' + e for e in cfg.input.extensions)}, input.extensions): "
                          "openvino.precision = \"int8\" calibrates on them")
    chosen = tuple(choose(photos, cfg.openvino.calibration_count))
    try:
        stats = tuple((st.st_ino, st.st_size, st.st_mtime_ns) for st in (os.stat(os.path.join(d, f)) for f in chosen))
        digest = _digest(d, chosen, stats)
    except OSError as exc:
        raise ConfigError(f"config key openvino.calibration: cannot read {exc.filename}: {exc.strerror}") from None
    return CalibrationSet(d, chosen, len(photos), digest)


def _image_size(cfg: Config) -> int:
    from pipeline.model.models import resolve_image_size

    return cfg.model.image_size or resolve_image_size(cfg)


@dataclasses.dataclass(frozen=True)
class Engine:
    """What quantising needs from openvino.py (which imports this module, not the other way)."""

    version: str                     # openvino's version, for the cache key (no import)
    module: Callable[[], Any]        # the openvino module, imported only to quantise
    float_model: Callable[[], str]   # the file to quantise: the ONNX, or its cached IR


def int8_dir(cfg: Config, cal: CalibrationSet, ov_version: str) -> Path:
    """Where the quantised model of cfg's model and calibration set is kept."""
    from pipeline.model.models import cache_root, model_sha256

    key = {"model": model_sha256(cfg.model.path), "calibration": cal.digest, "photos": len(cal.files),
           "preprocess": [cfg.preprocess.mode, cfg.preprocess.exif_transpose, _image_size(cfg)]}
    h = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:40]
    return cache_root() / "openvino-int8" / f"{h}-ov{ov_version}-nncf{nncf_version()}"


def calibration_crops(cfg: Config, cal: CalibrationSet) -> tuple[np.ndarray, int]:
    """The chosen photos as the run's crops (uint8 [n,S,S,3]: the run's decode options, preprocess.mode
    and crop size), and how many could not be decoded (skipped, as a run fails them)."""
    from pipeline.data.images import DecodeOptions, crop, decode_file

    opts = DecodeOptions.from_config(cfg.replace(model=dataclasses.replace(cfg.model, image_size=_image_size(cfg))))
    crops, bad = [], 0
    for rel in cal.files:
        try:
            crops.append(crop(decode_file(os.fsencode(os.path.join(cal.directory, rel)), opts), opts.mode, opts.target))
        except Exception:  # noqa: BLE001 - an undecodable photo is left out, as a run fails it
            bad += 1
    if not crops:
        raise ConfigError(f"config key openvino.calibration: none of the {len(cal.files)} chosen photos in "
                          f"{cal.directory} could be decoded")
    return np.stack(crops), bad


def quantize(cfg: Config, cal: CalibrationSet, engine: Engine) -> Any:
    """NNCF post-training quantisation of cfg's image tower (an ov.Model), calibrated on `cal`."""
    from pipeline.data.images import normalize

    nncf = require_nncf(import_it=True)
    model = engine.module().Core().read_model(engine.float_model())
    crops, _bad = calibration_crops(cfg, cal)
    uint8_input = model.inputs[0].get_element_type().get_type_name() == "u8"
    # the model's own input: uint8 NHWC crops, or CLIP-normalised float NCHW, one photo per sample
    data = nncf.Dataset(list(crops), (lambda c: c[None]) if uint8_input else (lambda c: normalize(c[None])))
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # NNCF draws progress bars on stdout
            return nncf.quantize(model, data, model_type=nncf.ModelType.TRANSFORMER,
                                 target_device=nncf.TargetDevice.CPU, subset_size=len(crops))
    except Exception as exc:  # noqa: BLE001 - NNCF raises its own types, with the reason in the message
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        raise ConfigError(f"NNCF cannot quantise {cfg.model.path} (openvino.precision = \"int8\"): {lines[0]}; "
                          "use fp32 or bf16") from exc


def _complete(target: Path) -> bool:
    return (target / "model.xml").is_file() and (target / "model.bin").is_file()


def quantized_model(cfg: Config, engine: Engine, log: Callable[[str], None] | None = None) -> Any:
    """The int8 model of cfg (a path to its IR), quantised once and cached; an ov.Model quantised in
    this process where the cache cannot be written. One process quantises under the lock; the others
    wait for it and load its result (openvino.py's `int8_model` gives the `engine`). A cache hit
    imports neither openvino nor NNCF."""
    cal = calibration_set(cfg)
    try:
        target = int8_dir(cfg, cal, engine.version)
    except OSError:
        return quantize(cfg, cal, engine)
    if _complete(target):
        return str(target / "model.xml")
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        lock = open(target.with_name(f".{target.name}.lock"), "wb")
    except OSError:
        return quantize(cfg, cal, engine)  # no cache here: quantised in memory
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # waits while another process quantises: it is the same model
        if _complete(target):
            return str(target / "model.xml")
        if log:
            log(f"openvino int8: calibrating on {len(cal.files)} photos of {cal.directory} (once; kept in {target.parent})")
        q = quantize(cfg, cal, engine)
        try:
            tmp.mkdir()
            engine.module().save_model(q, str(tmp / "model.xml"), compress_to_fp16=False)
            os.replace(tmp, target)
        except OSError:
            return q
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target / "model.xml")
