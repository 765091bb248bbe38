"""SOPHON BM1684X backend (`infer.backend = "sail"`), through Sophgo's `sophon.sail`.

Section numbers (§) refer to /work/shared/docs/sail-api.md, which records the SAIL behaviours this
code depends on. Never run on hardware. Verified against the test double in tests/fake_sail and
against SOPHGO's real SAIL built for the BM1684X cmodel (``sail.runtime = "cmodel"``,
scripts/setup_sail_cmodel.sh: the workers run under the TPU-MLIR venv's Python 3.10, so this module
and what it imports stay 3.10-compatible); docs/sail-backend.md says what the cmodel substitutes.

How the card's decode -> preprocess -> infer stages map onto processes
----------------------------------------------------------------------
* ``sail.mode = "device"`` (default; ``input_kind == "files"``): the supervisor sends *paths* to
  one process per chip. Inside that process the JPEG hardware decoder (``sail.Decoder``, §2.1)
  writes the decoded image into *device memory* as a BMImage; the centre square is cropped with
  bmcv (§3.2) and pushed into ``sail.EngineImagePreProcess`` (§3.5 and the §3.4 addendum), whose
  C++ threads resize it (linear, on a BM1684X's VPP), swap BGR->RGB, apply CLIP's alpha/beta and run
  the bmodel. Decode, preprocess and infer are fused into the device process because a decoded
  image only exists in that chip's memory: shipping it to another process would mean a
  device->host copy of the full-size image, the very work the hardware decoder saves, and
  sophon handles must not cross process boundaries anyway (§5: open everything in the child).
  Files the hardware path cannot take (suffix not on SAIL's case-sensitive list, content not
  JPEG, a JPEG without its end marker, images outside the TPU resize limits, a failed hardware
  decode, an EXIF rotation, no JPU at all on the cmodel) are decoded on the host CPU *in the same
  process* with ``pipeline.data.images.decode_file`` and uploaded as a ``sail.Tensor`` +
  ``Bmcv.tensor_to_bm_image``; decode_file's ItemError gives the failure reason, so reasons match
  the cpu backend's.
  The host decode/preprocess worker pools are not used in this mode.
* ``sail.mode = "host"`` (``input_kind == "pixels"``): the normal host decode + preprocess
  workers make CLIP's exact crop (uint8 224x224) on the CPU; the device process only normalises
  and runs ``Engine.process`` (numpy path, §1.4). Slower on an SE7's 8 ARM cores, but exact.

Fixed batches (§1.6): bmodels are compiled per batch size. Host mode discovers a multi-stage
bmodel's static batch sizes at start-up (``get_input_shape`` reports only the largest, §1.3) and
runs each call on the smallest stage that holds it, zero-padding; padding rows are dropped.
Device mode pads a short batch with fresh images (PushImage moves each BMImage: never push one
twice), because EngineImagePreProcess only returns full batches (§3.5), and maps rows back through
the returned image indices.

Nothing device-related is opened before the worker process starts (§5); ``resolve_devices`` and
``probe`` only count chips with ``get_available_tpu_num`` (bm_dev_getcount, no handle is opened).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.backends.base import (
    Backend,
    Device,
    DeviceError,
    FileBatchResult,
    Prepared,
    TextSession,
)
from pipeline.config import ConfigError
from pipeline.data.images import (
    CLIP_MEAN,
    CLIP_STD,
    DecodeOptions,
    normalize,
    open_input,
    reference_crop,
)
from pipeline.data.inputs import TarReader, decode_input, is_member_ref
from pipeline.errors import TextModelError
from pipeline.wire.messages import Failure, ItemError

if TYPE_CHECKING:
    from pipeline.config import Config

INSTALL_HINT = (
    "sophon.sail is not importable. It is not on PyPI: install the wheel from Sophgo's SDK, "
    "sophon-X.Y.Z-py3-none-any.whl (x86 PCIe hosts) or sophon_arm-X.Y.Z-py3-none-any.whl (SE boxes), "
    "matching the installed libsophon (never `pip install sophon`, an unrelated 2022 package)"
)
#: §2.1: sail.Decoder takes the still-image path only for these suffixes, case-sensitively.
DECODER_SUFFIXES = frozenset({"jpg", "JPG", "jpeg", "JPEG", "bmp", "BMP", "png", "PNG"})
#: ...of which we send only JPEG content to it: the JPU decodes JPEG; PNG/BMP would be a software
#: decode by sophon-opencv anyway, and decode_file handles their modes (palette, 16-bit) like the
#: cpu backend does.
HW_SUFFIXES = frozenset({"jpg", "JPG", "jpeg", "JPEG"})
#: §3.1: BM1684X resize limits (also assumed for EngineImagePreProcess's TPU resize [UNCONFIRMED]).
RESIZE_MIN, RESIZE_MAX, RESIZE_MAX_RATIO = 8, 8192, 128
#: §3.5: EngineImagePreProcess batch sizes.
EPP_BATCHES = (1, 4, 8, 16, 32, 64)
#: |value| no CLIP image tower reaches on normalised pixels (ViT-B/32 features are O(1)); above it
#: a row is uninitialised memory, not an embedding
IMPLAUSIBLE = 1e6
#: bytes of a JPEG's start read to find its EXIF orientation (APP1 comes first; EXIF is <= 64 KiB)
EXIF_HEAD_BYTES = 65536 + 64
#: what a padding slot of a short device-mode batch holds (its row is dropped)
PAD_PIXELS = np.full((224, 224, 3), 128, np.uint8)
#: candidate batch sizes probed to find the stages of a multi-stage bmodel.
STAGE_CANDIDATES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def alpha_beta(scale: float = 1.0) -> tuple[tuple[float, float], ...]:
    """CLIP normalisation as per-channel (alpha, beta) on 0..255 input, RGB order (§3.3)."""
    return tuple(((1.0 / (255.0 * s)) * scale, (-m / s) * scale) for m, s in zip(CLIP_MEAN, CLIP_STD))


CMODEL_ENV = "CLIP_PIPELINE_SAIL_CMODEL"
CMODEL_HINT = "run scripts/setup_sail_cmodel.sh (after scripts/setup_tpu_mlir.sh)"


def cmodel_dir() -> Path:
    """Where scripts/setup_sail_cmodel.sh puts real SAIL built for the BM1684X cmodel:
    $CLIP_PIPELINE_SAIL_CMODEL, else `sail-cmodel` beside the TPU-MLIR venv."""
    from pipeline.toolchain.env import venv_dir

    env = os.environ.get(CMODEL_ENV)
    return Path(env).expanduser() if env else venv_dir().parent / "sail-cmodel"


def cmodel_python() -> str:
    """The TPU-MLIR venv's interpreter, when the cmodel SAIL is built for it; else ConfigError."""
    from pipeline.toolchain.env import TpuMlirMissing, find_venv

    try:
        venv = find_venv()
    except TpuMlirMissing as exc:
        raise ConfigError("sail.runtime = \"cmodel\" runs in the TPU-MLIR venv: " + str(exc).replace("\n", " ")) from None
    d = cmodel_dir()
    if not (d / "stamp").is_file():
        raise ConfigError(f"sail.runtime = \"cmodel\": real SAIL for the BM1684X cmodel is not built at {d}; {CMODEL_HINT}")
    return str(venv / "bin" / "python")


def import_sail(runtime: str = "chip"):
    # optional; imported lazily (counting chips in the supervisor, devices inside the workers)
    try:
        import sophon
        from sophon import sail
    except ImportError as exc:
        if runtime == "cmodel":
            raise ConfigError(f"sail.runtime = \"cmodel\": sophon.sail is not importable in {sys.executable} ({exc}); "
                              f"{CMODEL_HINT}") from None
        raise ConfigError(f"{INSTALL_HINT} ({exc})") from None
    if runtime == "cmodel" and not getattr(sophon, "CMODEL", False):
        # e.g. the test double or a chip wheel earlier on PYTHONPATH than the cmodel build
        raise ConfigError(f"sail.runtime = \"cmodel\": the sophon.sail imported from {getattr(sail, '__file__', '?')} "
                          f"is not the cmodel build of scripts/setup_sail_cmodel.sh (PYTHONPATH?)")
    return sail


def _dev_id(device: str) -> int:
    try:
        return int(str(device).removeprefix("sail:"))
    except ValueError:
        raise ConfigError(f"sail device {device!r} is not a dev_id") from None


def _where(dev_id: int, label: str | None) -> str:
    """How messages name a device: "dev_id N", or "sail:N (cmodel device 0)" on the cmodel."""
    if label is None:
        return f"dev_id {dev_id}"
    return f"{label} (cmodel device {dev_id})"


def _sail_error(what: str, exc: BaseException) -> str:
    return f"{what}: {type(exc).__name__}: {exc}"


def exif_orientation(head: bytes) -> int:
    """The EXIF orientation (1..8) of a JPEG from its first bytes; 1 when there is none."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(head)) as im:  # reads the markers only, no decode
            o = im.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - unreadable header: the CPU decoder judges the file
        return 0
    return o if isinstance(o, int) else 0


class _Img:
    """A BMImage and what must outlive it: the Tensor whose device memory it is attached to
    (Bmcv.tensor_to_bm_image), None for an image that owns its memory (Decoder.read, Bmcv.crop)."""

    __slots__ = ("bm", "keep")

    def __init__(self, bm, keep=None):
        self.bm, self.keep = bm, keep


class _OutputCheck:
    """Turns outputs that cannot be real into a DeviceError.

    A failed inference launch in SAIL is only logged ("bmrt_launch_tensor_ex() err", src/graph.cpp:
    646-648, 723-725; the numpy path, src/engine.cpp:1327, runs the same code) and the call returns
    normally, so the outputs hold whatever the output memory held: the previous batch's results,
    or zeros where the SAIL version clears it first. Neither can be a CLIP embedding of a new
    batch: an all-zero row has no direction, and a batch bit-identical to the previous one for
    different inputs is stale. (Identical inputs legitimately give identical outputs, so the
    previous batch's input fingerprint is kept too.)"""

    def __init__(self, where: str):
        self.where = where
        self.prev: tuple[bytes, bytes] | None = None

    def check(self, y: np.ndarray, fingerprint: bytes) -> None:
        # EngineImagePreProcess runs each batch into a *fresh* output tensor (SAIL
        # src/decoder_multi.cpp:2672; tensor.cpp:867-869 allocates without clearing), so after a
        # failed launch its rows are whatever that memory held: zeros, an earlier batch's outputs
        # (a reused allocation), or arbitrary bit patterns: non-finite or absurd magnitudes, which
        # a network on normalised pixels cannot produce.
        bad = ~np.isfinite(y).all(axis=1) | (np.abs(np.nan_to_num(y)) > IMPLAUSIBLE).any(axis=1)
        if bad.any():
            raise DeviceError(f"{self.where}: {int(bad.sum())} of {len(y)} output rows are non-finite or over "
                              f"{IMPLAUSIBLE:g} (uninitialised outputs of a failed inference launch that SAIL only logged?)")
        zero = ~np.any(y != 0, axis=1)
        if zero.any():
            raise DeviceError(f"{self.where}: {int(zero.sum())} of {len(y)} output rows are all zeros "
                              "(a failed inference launch that SAIL only logged?)")
        out = np.ascontiguousarray(y).tobytes()
        if self.prev is not None and self.prev[1] == out and self.prev[0] != fingerprint:
            raise DeviceError(f"{self.where}: outputs bit-identical to the previous batch for different "
                              "inputs: stale outputs (a failed inference launch that SAIL only logged?)")
        self.prev = (fingerprint, out)


def _digest(*parts: bytes) -> bytes:
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(p)
    return h.digest()


class _Model:
    """What the bmodel says about itself (§1.3); names are always queried, never assumed."""

    def __init__(self, sail, engine, path: str):
        try:
            self.graph = engine.get_graph_names()[0]
            self.input = engine.get_input_names(self.graph)[0]
            self.output = engine.get_output_names(self.graph)[0]
            self.input_shape = list(engine.get_input_shape(self.graph, self.input))  # largest stage
            self.output_shape = list(engine.get_output_shape(self.graph, self.output))
            self.input_dtype = engine.get_input_dtype(self.graph, self.input)
            self.output_dtype = engine.get_output_dtype(self.graph, self.output)
            self.input_scale = float(engine.get_input_scale(self.graph, self.input))
        except Exception as exc:
            raise DeviceError(_sail_error(f"reading the bmodel {path}", exc)) from exc
        D = sail.Dtype
        # §1.4: the numpy path reads any non-int8 output as float32 -> FP16 outputs are garbage.
        if self.output_dtype != D.BM_FLOAT32:
            raise ConfigError(f"bmodel {path}: output dtype {self.output_dtype} is not BM_FLOAT32; recompile with float32 I/O")
        s = self.input_shape
        if self.input_dtype == D.BM_FLOAT32 and len(s) == 4 and s[1] == 3:
            self.layout = "float_nchw"
        elif self.input_dtype == D.BM_UINT8 and len(s) == 4 and s[3] == 3:
            self.layout = "uint8_nhwc"
        elif self.input_dtype == D.BM_UINT8 and len(s) == 4 and s[1] == 3:
            self.layout = "uint8_nchw"
        elif self.input_dtype == D.BM_INT8 and len(s) == 4 and s[1] == 3:
            # an INT8 bmodel deployed with --quant_input: CLIP-normalised data, quantised with the
            # input scale by the numpy Engine.process (sail-api.md §1.4, engine.cpp:850-870)
            self.layout = "int8_nchw"
        else:
            raise ConfigError(f"bmodel {path}: input {self.input} {s} dtype {self.input_dtype} is neither "
                              "float32/int8 [N,3,H,W] (CLIP-normalised) nor uint8 pixels [N,H,W,3]/[N,3,H,W]")
        if self.layout.startswith("uint8") and abs(self.input_scale - 1.0) > 1e-6:
            raise ConfigError(f"bmodel {path}: uint8 input with scale {self.input_scale} != 1 is not supported")
        self.max_batch = int(s[0])
        self.hw = (s[2], s[3]) if self.layout.endswith("nchw") else (s[1], s[2])
        if len(self.output_shape) != 2 or self.output_shape[0] != self.max_batch:
            raise ConfigError(f"bmodel {path}: output {self.output} shape {self.output_shape} is not [batch, dim]")
        self.dim = int(self.output_shape[1])


class SailHostDevice(Device):
    """host mode: uint8 crops in, `Engine.process` with numpy (IOMode.SYSIO, §1.4)."""

    fixed_batch = False  # we pad to a stage ourselves and return only real rows

    def __init__(self, sail, cfg: Config, dev_id: int, label: str | None = None):
        self.dev_id = dev_id
        self.where = _where(dev_id, label)
        path = cfg.model.path
        try:
            self.engine = sail.Engine(path, dev_id, sail.IOMode.SYSIO)  # §1.2: numpy needs SYSI/SYSIO
        except Exception as exc:  # Sail*Error derive from Exception, not RuntimeError (§2.3)
            raise DeviceError(_sail_error(f"opening bmodel {path} on dev_id {dev_id}", exc)) from exc
        self.outcheck = _OutputCheck(self.where)
        self.model = m = _Model(sail, self.engine, path)
        size = cfg.model.image_size or 224
        if m.hw != (size, size):
            raise ConfigError(f"bmodel {path}: host mode feeds {size}x{size} crops, the model takes {m.hw} "
                              "(config key model.image_size)")
        self.dim = m.dim
        self.stages = self._discover_stages()
        self.batch_size = max(self.stages)

    def _discover_stages(self) -> list[int]:
        # §1.3: a multi-stage bmodel reports only its largest shape; §1.4: the numpy path raises
        # SailEngineError("bad input") for a shape that matches no stage. So try smaller batch
        # sizes once at start-up (a matching one doubles as a warm-up run).
        m = self.model
        stages = [m.max_batch]
        for b in STAGE_CANDIDATES:
            if b >= m.max_batch:
                break
            try:
                self._run(np.zeros([b, *m.input_shape[1:]], dtype=np.float32), b)
            except DeviceError:
                continue
            stages.append(b)
        return sorted(stages)

    def _run(self, x: np.ndarray, expect: int) -> np.ndarray:
        m = self.model
        if list(x.shape[1:]) != m.input_shape[1:]:  # check it ourselves, never rely on the runtime
            raise DeviceError(f"input shape {list(x.shape)} does not fit the bmodel's {m.input_shape}")
        try:
            out = self.engine.process(m.graph, {m.input: x})
        except Exception as exc:
            raise DeviceError(_sail_error(f"{self.where}: Engine.process", exc)) from exc
        y = np.asarray(out[m.output], dtype=np.float32)
        if y.shape != (expect, m.dim):
            raise DeviceError(f"{self.where}: output shape {y.shape}, expected {(expect, m.dim)}")
        self.outcheck.check(y, _digest(np.ascontiguousarray(x).tobytes()))
        return y

    def _inputs(self, pixels: np.ndarray) -> np.ndarray:
        if self.model.layout in ("float_nchw", "int8_nchw"):
            return normalize(pixels)  # int8: Engine.process quantises with the bmodel's input scale
        if self.model.layout == "uint8_nchw":
            return np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))
        return pixels  # uint8_nhwc, normalisation fused into the model

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        # With infer.overlap this runs on the background thread. The numpy Engine.process does
        # NOT release the GIL (§5), so in host mode the loop thread cannot prepare the next batch
        # meanwhile: overlap gains little here (the host workers do the decode anyway).
        pixels = np.asarray(pixels)
        if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[1:] != (224, 224, 3):
            raise ValueError(f"embed expects uint8 [n,224,224,3], got {pixels.dtype} {pixels.shape}")
        out = []
        i, n = 0, len(pixels)
        while i < n:
            chunk = pixels[i:i + self.batch_size]
            k = len(chunk)
            stage = min(b for b in self.stages if b >= k)  # smallest stage that holds the chunk
            if stage > k:  # §1.6: zero-pad to the compiled batch, drop the padding rows below
                chunk = np.concatenate([chunk, np.zeros((stage - k, 224, 224, 3), np.uint8)])
            out.append(self._run(self._inputs(chunk), stage)[:k])
            i += k
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def close(self) -> None:
        self.engine = None


class SailFilesDevice(Device):
    """device mode: paths in; Decoder -> bmcv crop -> EngineImagePreProcess (resize, RGB, alpha/beta,
    inference) on one chip."""

    fixed_batch = False

    def __init__(self, sail, cfg: Config, dev_id: int, label: str | None = None):
        self.sail, self.cfg, self.dev_id = sail, cfg, dev_id
        self.where = _where(dev_id, label)
        path = cfg.model.path
        if not (hasattr(sail, "Bmcv") and hasattr(sail, "EngineImagePreProcess")):
            # a "runtime only" SAIL build has no multimedia classes (sail-api.md, packaging notes)
            raise ConfigError("this sophon.sail build has no Bmcv/EngineImagePreProcess "
                              "(runtime-only SAIL): set sail.mode = \"host\"")
        # The JPEG unit: absent from a SAIL built without OpenCV/FFmpeg, e.g. the cmodel build (the
        # JPU has no software model). Then every file is decoded on the CPU and uploaded.
        self.has_decoder = hasattr(sail, "Decoder")
        try:
            # Introspection only (§1.3); EngineImagePreProcess loads its own engine, so this one
            # is released before it, to keep a single copy of the weights in device memory.
            engine = sail.Engine(path, dev_id, sail.IOMode.SYSO)
            self.model = m = _Model(sail, engine, path)
            del engine
        except Exception as exc:
            if isinstance(exc, (DeviceError, ConfigError)):
                raise
            raise DeviceError(_sail_error(f"opening bmodel {path} on dev_id {dev_id}", exc)) from exc
        if m.layout != "float_nchw":
            # EngineImagePreProcess feeds a non-FP32 input as *signed* int8 (DATA_TYPE_EXT_1N_BYTE_SIGNED)
            # with alpha/beta multiplied by the input scale (SAIL src/decoder_multi.cpp:2411-2414,
            # 2480-2489): pixels above 127 saturate, and a uint8-input bmodel (ours, with the
            # normalisation fused in) would read the int8 bytes as wrapped values.
            raise ConfigError(
                f"bmodel {path}: input {m.input} is {getattr(m.input_dtype, 'name', m.input_dtype)} {m.input_shape}; "
                "sail device mode feeds EngineImagePreProcess's signed-int8 conversion to any non-float32 input, "
                "which would corrupt uint8 pixels (and is unverified for an int8 input): use a float32-input "
                "bmodel or sail.mode = \"host\"")
        if m.max_batch not in EPP_BATCHES:
            raise ConfigError(f"bmodel {path}: batch {m.max_batch} not in {EPP_BATCHES} "
                              "(EngineImagePreProcess, §3.5); use sail.mode = \"host\"")
        if m.hw != (224, 224):  # the VPP resize limits and the CPU fallback crop below assume 224
            raise ConfigError(f"bmodel {path}: device mode is written for 224x224 models, this one takes {m.hw}; "
                              "use sail.mode = \"host\"")
        self.dim, self.batch_size = m.dim, m.max_batch
        self.outcheck = _OutputCheck(self.where)
        ab = alpha_beta(1.0)  # float32 input: SAIL multiplies by the input scale, 1.0 here
        # Only what a BM1684X can do: EngineImagePreProcess's resize thread calls bmcv.resize with
        # the matching BMCV_INTER_* (SAIL src/decoder_multi.cpp:1914-1947), and libsophon sends
        # BM1684X to the VPP, which takes NEAREST and LINEAR only (bmcv_api_resize.cpp:1672-1673,
        # bm1684x/bmcv_1684x_vpp_internal.cpp:648-654). BICUBIC is refused at config validation.
        resize = {"linear": sail.sail_resize_type.BM_RESIZE_TPU_LINEAR,
                  "nearest": sail.sail_resize_type.BM_RESIZE_TPU_NEAREST}[cfg.sail.resize]
        try:
            self.handle = sail.Handle(dev_id)
            self.bmcv = sail.Bmcv(self.handle)
            # [UNCONFIRMED] for a multi-stage bmodel: which stage EngineImagePreProcess batches to;
            # we assume the largest (what get_input_shape reports) and check the output below.
            self.epp = sail.EngineImagePreProcess(path, dev_id, False)
            # Queues as short as SAIL allows (it raises smaller ones to the batch, decoder_multi.cpp:
            # 1180-1185): device memory is bounded by them (EPP_MEMORY in docs/sail-backend.md).
            q = self.batch_size
            # linear resize + BGR->RGB: the §3.4 addendum (CLIP-TPU clip/clip_multi.py:41 at HEAD)
            if self.epp.InitImagePreProcess(resize, True, q, q) != 0:
                raise DeviceError("InitImagePreProcess returned non-zero")
            if self.epp.SetConvertAtrr(ab) != 0:  # channel order after bgr2rgb = RGB (§3.3)
                raise DeviceError("SetConvertAtrr returned non-zero")
        except (DeviceError, ConfigError):
            raise
        except Exception as exc:
            raise DeviceError(_sail_error(f"opening EngineImagePreProcess on dev_id {dev_id}", exc)) from exc
        self.opts = DecodeOptions.from_config(cfg)
        # webdataset samples (TAR/MEMBER): sail.Decoder opens files by name only (§2.1), so their
        # bytes are read from the shard and decoded on the host CPU, then uploaded like any image
        # the hardware decoder does not take
        self.tars = TarReader()
        self.broken: str | None = None

    # --- per file ---------------------------------------------------------------------------
    def _hw_eligible(self, p: str) -> bool:
        """A file (not a tar member: sail.Decoder opens names only, §2.1), suffix on SAIL's list
        (§2.1, case-sensitive), JPEG content, end marker present, no EXIF rotation."""
        if not self.has_decoder or is_member_ref(os.fsencode(p)):
            return False
        base = os.path.basename(p)
        if "." not in base or base.rsplit(".", 1)[1] not in HW_SUFFIXES:
            return False
        try:
            with open_input(os.fsencode(p)) as fh:  # a FIFO or device is never opened (not_a_file)
                size = os.fstat(fh.fileno()).st_size
                if size < 4 or size > self.opts.max_file_bytes:
                    return False
                head = fh.read(EXIF_HEAD_BYTES)
                if head[:3] != b"\xff\xd8\xff":
                    return False
                fh.seek(max(0, size - 4096))
                tail = fh.read()
        except (OSError, ItemError):
            return False  # decode_file reports vanished/unreadable/not_a_file
        # a JPEG without its EOI marker may "decode" with grey rows on the hardware (§2.1
        # [UNCONFIRMED]); let the CPU decoder judge it, so it fails as `truncated` like on cpu.
        if b"\xff\xd9" not in tail:
            return False
        # sail.Decoder decodes still images with sophon-opencv imdecode(IMREAD_COLOR), which
        # applies the EXIF orientation (SAIL src/cvwrapper.cpp:1532-1575); CLIP's reference, host
        # mode and the CPU decoder do not rotate. A rotated JPEG goes to the CPU decoder, so device
        # mode embeds the same pixels as the reference (orientation-6 photo: cosine 0.467 otherwise).
        return exif_orientation(head) == 1

    def _hw_decode(self, p: str):
        sail = self.sail
        try:
            img = sail.BMImage()  # always a fresh BMImage: a pre-sized one is resized into (§2.1)
            ret = sail.Decoder(p, True, self.dev_id).read(self.handle, img)
        except Exception:  # noqa: BLE001 - RuntimeError/SailDecoderError: fall back to the CPU
            return None
        if ret != 0:  # §2.1: int return code, no exception
            return None
        return img

    def _cpu_decode(self, item_id: int, path: bytes, centre_crop_224: bool = False):
        try:
            rgb = decode_input(path, self.opts, self.tars)
        except ItemError as exc:
            return Failure(item_id, path, exc.reason, exc.message)
        if centre_crop_224:
            rgb = reference_crop(rgb)
        elif rgb.shape[2] == 1:
            rgb = np.repeat(rgb, 3, axis=2)
        elif rgb.shape[2] == 4:
            rgb = rgb[:, :, :3]
        return rgb

    def _upload(self, rgb: np.ndarray) -> _Img:
        """CPU pixels -> a BGR_PLANAR uint8 BMImage in device memory: a uint8 [1,3,h,w] Tensor
        with system and device memory (bind.cpp:293, the array_t<uint8_t> overload: a uint8 array
        picks it without a cast), copied to the device (sync_s2d), then
        Bmcv.tensor_to_bm_image(FORMAT_BGR_PLANAR), which *attaches* the image to the tensor's
        device memory (SAIL src/cvwrapper.cpp:4009-4047, bm_image_attach): the tensor is kept
        with the image until its batch is out of EngineImagePreProcess. This is the upload on
        every SAIL build (mat_to_bm_image needs OpenCV, absent from the cmodel build)."""
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"internal: uploading {rgb.dtype} {rgb.shape}, expected uint8 HxWx3")
        planar = np.ascontiguousarray(rgb[:, :, ::-1].transpose(2, 0, 1)[None])  # RGB HWC -> BGR NCHW
        t = self.sail.Tensor(self.handle, planar, True, True)
        t.sync_s2d()
        return _Img(self.bmcv.tensor_to_bm_image(t, self.sail.Format.FORMAT_BGR_PLANAR), t)

    @staticmethod
    def _within_vpp(w: int, h: int) -> bool:
        """Can the VPP crop this image to its centre square and EngineImagePreProcess resize that?
        Bmcv.crop is a bmcv_image_resize (SAIL src/cvwrapper.cpp: crop = crop_and_resize(..., w, h)),
        bound by the BM1684X limits on the source, the window and the output: 8..8192 pixels a
        side, scaling <= 128x (§3.1). Outside them bmcv *returns an error that the BMImage-returning
        Bmcv.crop ignores* (an unwritten image, no exception), and inside EngineImagePreProcess
        the error aborts the process; so this is checked before any bmcv call."""
        s = min(w, h)
        return (RESIZE_MIN <= w <= RESIZE_MAX and RESIZE_MIN <= h <= RESIZE_MAX
                and s / 224 <= RESIZE_MAX_RATIO and 224 / s <= RESIZE_MAX_RATIO)

    def _square(self, img: _Img) -> _Img | None:
        """Centre square of side min(w, h) (§3.2), or None when outside the VPP limits or when
        bmcv refuses it: the BMImage-returning Bmcv.crop raises SailBMImageError on a bmcv
        failure (SAIL_CHECK_RET, src/cvwrapper.cpp:4167); the caller then crops on the CPU."""
        w, h = img.bm.width(), img.bm.height()
        if not self._within_vpp(w, h):
            return None
        s = min(w, h)
        if w == h:
            return img
        try:
            # BGR_PLANAR (rows 64-byte aligned on an SoC build), its own device memory (the source may go)
            return _Img(self.bmcv.crop(img.bm, (w - s) // 2, (h - s) // 2, s, s))
        except Exception:  # noqa: BLE001 - Sail*Error derive from Exception (§2.3)
            return None

    def _prepare(self, item_id: int, path: bytes):
        """-> (_Img of a centre square, None) or (None, Failure)."""
        p = os.fsdecode(path)
        img = self._hw_decode(p) if self._hw_eligible(p) else None
        if img is not None:
            if img.width() * img.height() > self.opts.max_pixels:
                return None, Failure(item_id, path, "too_large", f"{img.width()}x{img.height()} pixels, "
                                     f"over preprocess.max_pixels={self.opts.max_pixels}")
            sq = self._square(_Img(img))
            if sq is not None:
                return sq, None
        rgb = self._cpu_decode(item_id, path)
        if isinstance(rgb, Failure):
            return None, rgb
        try:
            sq = self._square(self._upload(rgb)) if self._within_vpp(rgb.shape[1], rgb.shape[0]) else None
            if sq is None:  # outside the VPP limits, or bmcv refused the crop: CLIP's exact crop on
                sq = self._upload(reference_crop(rgb))  # the CPU, uploaded as 224x224 (no VPP crop)
        except Exception as exc:
            # the upload itself (Tensor alloc, s2d, attach) failed: device memory, not this input
            raise DeviceError(_sail_error(f"{self.where}: uploading {p}", exc)) from exc
        return sq, None

    def _pad_image(self) -> _Img:
        """A fresh 224x224 grey image for a padding slot. PushImage *moves* the BMImage into the
        queue (BMImageQueue::Push: `ptr_[end_idx] = std::move(image)`, src/decoder_multi.cpp:128-140,
        called at :1367; BMImage's move assignment nulls the source, src/cvwrapper.cpp:3260-3271):
        an image pushed once is empty, and pushing it again makes the preprocess thread throw
        ("input or output not attache mem") and the process abort. So every pad is new."""
        try:
            return self._upload(PAD_PIXELS)
        except Exception as exc:
            raise DeviceError(_sail_error(f"{self.where}: uploading a padding image", exc)) from exc

    # --- per batch --------------------------------------------------------------------------
    def _push(self, idx: int, img, deadline: float) -> None:
        while True:
            try:
                ret = self.epp.PushImage(0, idx, img)
            except Exception as exc:
                raise DeviceError(_sail_error(f"{self.where}: PushImage", exc)) from exc
            if ret == 0:
                return
            if time.monotonic() > deadline:  # non-zero = queue full (§3.5); never wait forever
                raise DeviceError(f"{self.where}: PushImage queue stayed full for {self.cfg.sail.timeout_s}s")
            time.sleep(0.001)

    def _get_batch(self, timeout: float):
        box: list = []

        def target() -> None:
            try:
                box.append(("ok", self.epp.GetBatchData_Npy()))  # releases the GIL (§5)
            except BaseException as exc:  # noqa: BLE001
                box.append(("err", exc))

        t = threading.Thread(target=target, daemon=True, name=f"sail-get-{self.dev_id}")
        t.start()
        t.join(timeout)
        if not box:
            raise DeviceError(f"{self.where}: no batch from EngineImagePreProcess within {timeout}s (hung?)")
        kind, val = box[0]
        if kind == "err":
            raise DeviceError(_sail_error(f"{self.where}: GetBatchData_Npy", val)) from val
        return val

    def _infer(self, imgs: list[_Img], fingerprint: bytes) -> np.ndarray:
        B, m = self.batch_size, len(imgs)
        deadline = time.monotonic() + self.cfg.sail.timeout_s
        # §3.5: full batches only; pad with fresh images (never one pushed before), index -1-j.
        # `pads` holds their tensors (the images attach to them) until the batch is out.
        pads = [self._pad_image() for _ in range(B - m)]
        for i, img in enumerate(imgs):
            self._push(i, img.bm, deadline)
        for j, pad in enumerate(pads):
            self._push(-1 - j, pad.bm, deadline)
        outputs, _ost, _channels, idxs, _pad = self._get_batch(max(0.0, deadline - time.monotonic()))
        y = np.asarray(outputs[self.model.output], dtype=np.float32)
        if y.shape != (B, self.dim) or len(idxs) != B:
            raise DeviceError(f"{self.where}: batch output {y.shape} / {len(idxs)} indices, expected {(B, self.dim)}")
        res = np.full((m, self.dim), np.nan, dtype=np.float32)
        seen = set()
        for row, idx in enumerate(idxs):
            if 0 <= idx < m:  # padding rows (negative indices) are dropped
                res[idx] = y[row]
                seen.add(idx)
        if len(seen) != m:
            raise DeviceError(f"{self.where}: batch returned indices {sorted(idxs)}, expected 0..{m - 1}")
        self.outcheck.check(y, fingerprint)
        return res

    def _check_usable(self) -> None:
        if self.broken:
            raise DeviceError(f"{self.where} is unusable after an earlier error: {self.broken}")

    def prepare_files(self, ids: Sequence[int], paths: Sequence[bytes]) -> Prepared:
        """Decode (JPU or CPU fallback) + bmcv centre square of each file: the host-side half.

        With `infer.overlap` this runs on the worker's loop thread while `run_prepared` of the
        previous batch runs on the background thread. Decoder.read releases the GIL, as do
        PushImage/GetBatchData_Npy; the (short) Bmcv calls hold it (§5). [UNCONFIRMED] that
        Decoder/Bmcv on this handle and EngineImagePreProcess may be used from two threads at once
        on real hardware: verified only against tests/fake_sail.
        """
        self._check_usable()
        failures: list[Failure] = []
        ok_ids: list[int] = []
        ok_paths: list[bytes] = []
        imgs: list = []
        for item_id, path in zip(ids, paths):
            img, fail = self._prepare(item_id, path)
            if fail is not None:
                failures.append(fail)
            else:
                ok_ids.append(item_id)
                ok_paths.append(path)
                imgs.append(img)
        return Prepared(ids=ok_ids, paths=ok_paths, failures=failures, data=imgs)

    def run_prepared(self, prepared: Prepared) -> FileBatchResult:
        """EngineImagePreProcess (TPU resize, RGB, alpha/beta, inference) on the prepared squares."""
        self._check_usable()
        imgs = prepared.data
        rows = []
        try:
            for i in range(0, len(imgs), self.batch_size):
                paths = prepared.paths[i:i + self.batch_size]
                rows.append(self._infer(imgs[i:i + self.batch_size], _digest(*(p + b"\0" for p in paths))))
        except DeviceError as exc:
            # the preprocess queue may now hold part of a batch: this handle is done for
            self.broken = str(exc)
            raise
        emb = np.concatenate(rows) if rows else np.zeros((0, self.dim), np.float32)
        return FileBatchResult(ids=list(prepared.ids), embeddings=emb, failures=list(prepared.failures))

    def embed_files(self, ids: Sequence[int], paths: Sequence[bytes]) -> FileBatchResult:
        return self.run_prepared(self.prepare_files(ids, paths))

    def close(self) -> None:
        self.tars.close()
        self.epp = None
        self.bmcv = None
        self.handle = None


class SailTextSession(TextSession):
    """A text bmodel on one SOPHON chip: int32 ids through the numpy ``Engine.process`` (sail-api.md §1.4)."""

    def __init__(self, path: str, dev_id: int):
        sail = import_sail()
        try:
            self.engine = sail.Engine(path, dev_id, sail.IOMode.SYSIO)  # §1.2: numpy needs SYSIO
            self.graph = self.engine.get_graph_names()[0]
            self.input_name = self.engine.get_input_names(self.graph)[0]
            self.output_name = self.engine.get_output_names(self.graph)[0]
            in_shape = list(self.engine.get_input_shape(self.graph, self.input_name))  # largest stage (§1.3)
            out_shape = list(self.engine.get_output_shape(self.graph, self.output_name))
            in_dtype = self.engine.get_input_dtype(self.graph, self.input_name)
            out_dtype = self.engine.get_output_dtype(self.graph, self.output_name)
        except Exception as exc:  # noqa: BLE001 - SailEngineError and friends
            raise TextModelError(f"cannot open text bmodel {path} on dev_id {dev_id}: {exc}") from exc
        if len(in_shape) != 2:
            raise TextModelError(f"{path}: input {self.input_name} is {in_shape}, expected token ids [batch, 77]")
        # §1.4: numpy inputs are coerced to float32, then to the model's dtype (ids < 2^24 are exact);
        # FP16/BF16 inputs raise "not supported"; non-FP32, non-int outputs come back as garbage.
        if in_dtype not in (sail.Dtype.BM_INT32, sail.Dtype.BM_FLOAT32):
            raise TextModelError(f"{path}: input dtype {in_dtype} not supported (expected INT32 or FP32 ids)")
        if out_dtype != sail.Dtype.BM_FLOAT32:
            raise TextModelError(f"{path}: output dtype {out_dtype}; recompile with float32 output")
        self.fixed_batch = int(in_shape[0])
        self.context_length = int(in_shape[1])
        self.out_rank = len(out_shape)
        self.out_last = int(out_shape[-1])
        self.id_dtype = np.int32
        self.check = _OutputCheck(_where(dev_id, None))

    def run_ids(self, ids: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(ids, dtype=np.int32)
        try:
            out = self.engine.process(self.graph, {self.input_name: x})
            y = np.asarray(out[self.output_name], dtype=np.float32)
            # SAIL only logs a failed launch and returns stale or zeroed outputs (sail.py _OutputCheck)
            self.check.check(y.reshape(len(y), -1), x.tobytes())
        except DeviceError as exc:
            raise TextModelError(f"text bmodel inference failed: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - SailEngineError and friends
            raise TextModelError(f"text bmodel inference failed: {exc}") from exc
        return y


class SailBackend(Backend):
    name = "sail"
    device_input = "files"

    @classmethod
    def input_kind(cls, cfg: Config) -> str:
        return "files" if cfg.sail.mode == "device" else "pixels"

    @classmethod
    def worker_python(cls, cfg: Config) -> str | None:
        # the cmodel build of real SAIL is a CPython 3.10 module linked to the TPU-MLIR wheel's
        # runtime: its workers run under that venv's interpreter, as the sim backend's do
        return cmodel_python() if cfg.sail.runtime == "cmodel" else None

    @classmethod
    def resolve_devices(cls, cfg: Config) -> list[str]:
        entries = list(cfg.infer.devices)
        cmodel = cfg.sail.runtime == "cmodel"
        if cmodel:
            cmodel_python()  # fail early, in the supervisor, with the set-up hint
        if entries == ["all"]:
            if cmodel:  # the wheel's libbmlib has one cmodel device (vendor README, "Devices")
                return ["sail:0"]
            sail = import_sail()
            try:
                n = int(sail.get_available_tpu_num())  # bm_dev_getcount; opens no handle (§1.1)
            except Exception as exc:  # noqa: BLE001
                raise ConfigError(_sail_error("infer.devices = \"all\": counting SOPHON devices failed", exc)) from None
            if n <= 0:
                raise ConfigError("infer.devices = \"all\": no SOPHON devices found (get_available_tpu_num() == 0)")
            return [f"sail:{i}" for i in range(n)]
        ids: list[int] = []
        for e in entries:
            if isinstance(e, bool) or not isinstance(e, (int, str)):
                raise ConfigError(f"config key infer.devices: sail devices are dev_ids (0, 1, ...) or \"all\", got {e!r}")
            if isinstance(e, str):
                if e == "all":
                    raise ConfigError("config key infer.devices: \"all\" must be the only entry")
                try:
                    e = int(e.removeprefix("sail:"))
                except ValueError:
                    raise ConfigError(f"config key infer.devices: {e!r} is not a dev_id "
                                      "(sail devices are 0, 1, ... or \"all\")") from None
            if e < 0:
                raise ConfigError(f"config key infer.devices: dev_id {e} is negative")
            if e in ids:
                raise ConfigError(f"config key infer.devices: dev_id {e} listed twice")
            ids.append(e)
        if not ids:
            raise ConfigError("config key infer.devices is empty: list dev_ids, e.g. [0], or \"all\"")
        if cmodel:
            # Only dev_id 0 exists on the cmodel, but each process has its own cmodel instance:
            # every configured id runs as the cmodel's device 0 in its own worker (the fan-out
            # across chips is exercised; the chips are not distinct). Said in the worker's log line.
            return [f"sail:{i}" for i in ids]
        sail = import_sail()
        try:
            n = int(sail.get_available_tpu_num())
        except Exception:  # noqa: BLE001 - let open_device report it per device
            n = None
        if n is not None and max(ids) >= n:
            raise ConfigError(f"config key infer.devices: dev_id {max(ids)} does not exist ({n} SOPHON device(s): 0..{n - 1})")
        return [f"sail:{i}" for i in ids]

    @classmethod
    def open_text(cls, model: str | None, device: Any = None, threads: int = 1, precision: str = "auto") -> TextSession:
        if model is None:
            raise TextModelError("no text model given")
        return SailTextSession(model, int(device or 0))

    @classmethod
    def open_device(cls, cfg: Config, device: str) -> Device:
        sail = import_sail(cfg.sail.runtime)
        dev_id = _dev_id(device)
        try:  # SAIL's spdlog writes every thread start/stop at info level; keep warnings and errors
            sail.set_loglevel(sail.LogLevel.WARN)
        except Exception:  # noqa: BLE001 - an older SAIL without it: only noisier
            pass
        if cfg.sail.runtime == "cmodel":
            sail.set_print_flag(False)
            # the cmodel prints its start-up to fd 1; keep the user's terminal for the progress
            # display (as the sim backend does)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.close(devnull)
            # only dev_id 0 exists on the cmodel (Handle(1) ends the process in libbmlib's assert)
            print(f"[sail] {device}: real SAIL on the BM1684X cmodel (software chip), opened as cmodel device 0",
                  file=sys.stderr, flush=True)
        hw, label = (0, device) if cfg.sail.runtime == "cmodel" else (dev_id, None)
        if cfg.sail.mode == "device":
            return SailFilesDevice(sail, cfg, hw, label=label)
        return SailHostDevice(sail, cfg, hw, label=label)

    @classmethod
    def probe(cls) -> dict[str, Any]:
        try:
            sail = import_sail()
        except ConfigError as exc:
            d = cmodel_dir()
            if (d / "stamp").is_file():
                return {"available": True, "devices": ["sail:0 (BM1684X cmodel)"], "chips": 0, "cmodel": str(d),
                        "reason": "no sophon.sail in this interpreter; real SAIL on the BM1684X cmodel (software chip, "
                                  f"built at {d}): set sail.runtime = \"cmodel\"; every dev_id runs as cmodel device 0, "
                                  "JPEG decode on the CPU"}
            return {"available": False, "devices": [], "chips": 0,
                    "reason": f"{exc}; or {CMODEL_HINT} for real SAIL on the BM1684X cmodel"}
        fake = bool(getattr(sail, "__fake__", False))
        try:
            n = int(sail.get_available_tpu_num())
        except Exception as exc:  # noqa: BLE001
            return {"available": False, "devices": [], "chips": 0, "fake": fake,
                    "reason": _sail_error("get_available_tpu_num", exc)}
        if n <= 0:
            return {"available": False, "devices": [], "chips": 0, "fake": fake,
                    "reason": "sophon.sail is installed but no SOPHON device was found (driver loaded? /dev/bm-sophon*)"}
        return {"available": True, "devices": [f"sail:{i}" for i in range(n)], "chips": n, "fake": fake,
                "reason": "test double (tests/fake_sail), not real hardware" if fake else ""}
