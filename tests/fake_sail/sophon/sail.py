"""A FAKE `sophon.sail` for tests — NOT Sophgo's SAIL, no TPU anywhere.

It mimics the Python API and the traps recorded in /work/shared/docs/sail-api.md (section numbers
below refer to that file), backed by numpy, OpenCV and onnxruntime so that results are real
numbers. Only what clip-pipeline's sail backend uses is implemented, plus the listed traps.
Behaviours marked [UNCONFIRMED] in sail-api.md are modelled as described there and say so here.

The "bmodel" this fake loads is a JSON file that says it is fake (see tests/fake_sail/README.md).
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time
from enum import IntEnum

import cv2
import numpy as np

__fake__ = True
__version__ = "0.0.0-fake"


# ----------------------------------------------------------------------------------------------
# Exceptions (§2.3): registered with pybind11, so they derive from Exception, NOT RuntimeError.
class SailDeviceError(Exception):
    pass


class SailTensorError(Exception):
    pass


class SailEngineError(Exception):
    pass


class SailBMImageError(Exception):
    pass


class SailDecoderError(Exception):
    pass


class SailEncoderError(Exception):
    pass


class SailUnknownError(Exception):
    pass


# status codes (§2.1, §2.3)
SAIL_ERR_DEV_HANDLE = 1004
SAIL_ERR_DEC_OPEN = 5003
BM_NOT_SUPPORTED = 6


def _log(msg: str) -> None:
    print(f"[fake-sail] {msg}", file=sys.stderr)


def _env_ids(name: str) -> set[int]:
    raw = os.environ.get(name, "")
    return {int(x) for x in raw.split(",") if x.strip()}


# ----------------------------------------------------------------------------------------------
# Enums; values also exported at module level like the real module (§1.2, §2.4).
class IOMode(IntEnum):
    SYSI = 0
    SYSO = 1
    SYSIO = 2
    DEVIO = 3


class Dtype(IntEnum):
    BM_FLOAT32 = 0
    BM_FLOAT16 = 1
    BM_INT8 = 2
    BM_UINT8 = 3
    BM_INT16 = 4
    BM_UINT16 = 5
    BM_INT32 = 6
    BM_UINT32 = 7
    BM_BFLOAT16 = 8


class Format(IntEnum):
    FORMAT_YUV420P = 0
    FORMAT_YUV422P = 1
    FORMAT_YUV444P = 2
    FORMAT_NV12 = 3
    FORMAT_RGB_PLANAR = 8
    FORMAT_BGR_PLANAR = 9
    FORMAT_RGB_PACKED = 10
    FORMAT_BGR_PACKED = 11
    FORMAT_GRAY = 14


class ImgDtype(IntEnum):
    DATA_TYPE_EXT_FLOAT32 = 0
    DATA_TYPE_EXT_1N_BYTE = 1
    DATA_TYPE_EXT_1N_BYTE_SIGNED = 3


class bmcv_resize_algorithm(IntEnum):
    BMCV_INTER_NEAREST = 0
    BMCV_INTER_LINEAR = 1
    BMCV_INTER_BICUBIC = 2


class sail_resize_type(IntEnum):
    BM_RESIZE_VPP_NEAREST = 0
    BM_RESIZE_TPU_NEAREST = 1
    BM_RESIZE_TPU_LINEAR = 2
    BM_RESIZE_TPU_BICUBIC = 3


for _enum in (IOMode, Dtype, Format, ImgDtype, bmcv_resize_algorithm, sail_resize_type):
    globals().update(_enum.__members__)

_PLANAR = {Format.FORMAT_RGB_PLANAR, Format.FORMAT_BGR_PLANAR}
_PACKED = {Format.FORMAT_RGB_PACKED, Format.FORMAT_BGR_PACKED}
_YUV = {Format.FORMAT_YUV420P, Format.FORMAT_YUV422P, Format.FORMAT_YUV444P, Format.FORMAT_NV12}
_NP_DTYPE = {Dtype.BM_FLOAT32: np.float32, Dtype.BM_UINT8: np.uint8, Dtype.BM_INT8: np.int8,
             Dtype.BM_INT32: np.int32, Dtype.BM_FLOAT16: np.float16}


# ----------------------------------------------------------------------------------------------
# Devices (§1.1)
def get_available_tpu_num() -> int:
    return int(os.environ.get("FAKE_SAIL_TPUS", "1"))


def _check_dev(dev_id: int, exc: type) -> None:
    if not isinstance(dev_id, int) or dev_id < 0 or dev_id >= get_available_tpu_num():
        _log(f"bm_dev_request failed for dev_id {dev_id} (invalid id or open-files ulimit)")
        raise exc("init device failure")


class Handle:
    def __init__(self, dev_id: int = 0):
        _check_dev(dev_id, SailDeviceError)
        self._dev = dev_id

    def get_device_id(self) -> int:
        return self._dev

    def get_sn(self) -> str:
        return f"FAKE{self._dev:04d}"

    def get_target(self) -> str:
        return "BM1684X"


# ----------------------------------------------------------------------------------------------
# Tensor (§1.5): device-only tensors have no valid system copy until sync_d2s.
class Tensor:
    def __init__(self, handle: Handle, shape_or_array, dtype=Dtype.BM_FLOAT32,
                 own_sys_data: bool = False, own_dev_data: bool = False):
        self._dev = handle.get_device_id()
        if isinstance(shape_or_array, np.ndarray):
            self._data = np.ascontiguousarray(shape_or_array)
            self._own_sys = True if own_sys_data is None else bool(own_sys_data)
        else:
            self._data = np.zeros(list(shape_or_array), dtype=_NP_DTYPE.get(Dtype(dtype), np.float32))
            self._own_sys = bool(own_sys_data)

    def shape(self) -> list[int]:
        return list(self._data.shape)

    def asnumpy(self) -> np.ndarray:
        return self._data.copy()

    def update_data(self, arr: np.ndarray) -> None:
        arr = np.asarray(arr)
        if arr.size != self._data.size:
            raise SailTensorError("update_data: size mismatch")
        self._data = arr.reshape(self._data.shape).astype(self._data.dtype)

    def sync_s2d(self) -> None:
        pass

    def sync_d2s(self) -> None:
        pass

    def zeros(self) -> None:
        self._data[...] = 0


# ----------------------------------------------------------------------------------------------
# Engine (§1.2-1.6)
def _load_fake_bmodel(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            meta = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        _log(f"Load {path} failed")
        raise SailEngineError("invalid bmodel") from None
    if not isinstance(meta, dict) or meta.get("fake_bmodel") is not True:
        raise SailEngineError("invalid bmodel")
    onnx_path = meta["onnx"]
    if not os.path.isabs(onnx_path):
        onnx_path = os.path.join(os.path.dirname(os.path.abspath(path)), onnx_path)
    meta["onnx"] = onnx_path
    return meta


class _Net:
    """One compiled network: ONNX session + static stages (batch sizes)."""

    def __init__(self, path: str):
        import onnxruntime as ort

        meta = _load_fake_bmodel(path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        try:
            self.sess = ort.InferenceSession(meta["onnx"], opts, providers=["CPUExecutionProvider"])
        except Exception:  # noqa: BLE001 - a broken model is "invalid bmodel"
            raise SailEngineError("invalid bmodel") from None
        inp = self.sess.get_inputs()[0]
        out = self.sess.get_outputs()[0]
        self.graph = meta.get("graph_name", "clip_image_vitb32")
        self.input_name, self.output_name = inp.name, out.name
        self.stages = sorted(int(b) for b in meta.get("batch_sizes", [1]))
        self.sample_shape = [int(d) for d in inp.shape[1:]]
        self.out_tail = [int(d) if isinstance(d, int) else 0 for d in out.shape[1:]]
        np_in = {"float32": np.float32, "uint8": np.uint8, "int32": np.int32}[meta.get("input_dtype", "float32")]
        if 0 in self.out_tail:  # dynamic output dims: learn them by running once
            probe = np.zeros([1, *self.sample_shape], dtype=np_in)
            self.out_tail = list(self.sess.run(None, {self.input_name: probe})[0].shape[1:])
        # int32: a text encoder's token ids (sail-api.md §7 text encoder: the bmodel input is INT32)
        self.input_dtype = {"float32": Dtype.BM_FLOAT32, "uint8": Dtype.BM_UINT8,
                            "int32": Dtype.BM_INT32}[meta.get("input_dtype", "float32")]
        self.input_scale = float(meta.get("input_scale", 1.0))
        self.output_dtype = Dtype.BM_FLOAT32

    def valid_shape(self, shape) -> bool:
        return any(list(shape) == [b, *self.sample_shape] for b in self.stages)

    def run(self, x: np.ndarray, dev_id: int) -> np.ndarray:
        if dev_id in _env_ids("FAKE_SAIL_FAIL_DEVS"):
            raise SailEngineError(f"bmrt_launch_tensor failed on dev {dev_id} (injected fault)")
        if self.input_dtype == Dtype.BM_UINT8:
            x = np.clip(np.rint(x / self.input_scale), 0, 255).astype(np.uint8)
        elif self.input_dtype == Dtype.BM_INT32:
            # §1.4: the numpy path coerced the input to float32; INT32 model inputs are then
            # quantised with get_input_scale (engine.cpp:850-870), i.e. rounded to int32.
            x = np.rint(x / self.input_scale).astype(np.int32)
        else:
            x = x.astype(np.float32, copy=False)
        return np.asarray(self.sess.run(None, {self.input_name: x})[0], dtype=np.float32)


def _env_ms(name: str) -> float:
    try:
        return max(0.0, float(os.environ.get(name, "0") or 0)) / 1000.0
    except ValueError:
        return 0.0


def _hold_gil_for(seconds: float) -> None:
    """Block without releasing the GIL, like the numpy Engine.process (§5): a PyDLL call keeps it."""
    if seconds > 0:
        import ctypes

        ctypes.PyDLL(None).usleep(int(seconds * 1e6))


class Engine:
    """Only the `Engine(bmodel_path, dev_id, IOMode)` form (the one every sample uses, §1.2)."""

    def __init__(self, bmodel_path: str, dev_id: int, mode: IOMode):
        _check_dev(dev_id, SailEngineError)
        self._dev = dev_id
        self._mode = IOMode(mode)
        self._net = _Net(bmodel_path)
        self._lock = threading.Lock()

    # introspection (§1.3)
    def _g(self, g: str) -> _Net:
        if g != self._net.graph:
            raise SailEngineError(f"graph {g!r} not found")
        return self._net

    def get_graph_names(self) -> list[str]:
        return [self._net.graph]

    def get_input_names(self, g: str) -> list[str]:
        return [self._g(g).input_name]

    def get_output_names(self, g: str) -> list[str]:
        return [self._g(g).output_name]

    def get_input_shape(self, g: str, name: str) -> list[int]:
        n = self._g(g)
        if name != n.input_name:
            raise SailEngineError(f"input {name!r} not found")
        return [max(n.stages), *n.sample_shape]  # multi-stage: the largest shape (§1.3)

    def get_output_shape(self, g: str, name: str) -> list[int]:
        n = self._g(g)
        if name != n.output_name:
            raise SailEngineError(f"output {name!r} not found")
        return [max(n.stages), *n.out_tail]

    def get_max_input_shapes(self, g: str) -> dict:
        return {self._g(g).input_name: self.get_input_shape(g, self._net.input_name)}

    def get_input_dtype(self, g: str, name: str) -> Dtype:
        return self._g(g).input_dtype

    def get_output_dtype(self, g: str, name: str) -> Dtype:
        return self._g(g).output_dtype

    def get_input_scale(self, g: str, name: str) -> float:
        return self._g(g).input_scale

    def get_output_scale(self, g: str, name: str) -> float:
        return 1.0

    def graph_is_dynamic(self, g: str) -> bool:
        return False

    def get_device_id(self) -> int:
        return self._dev

    def get_handle(self) -> Handle:
        return Handle(self._dev)

    def process(self, g: str, inputs: dict, *rest, core_list=None):
        net = self._g(g)
        if rest and isinstance(next(iter(inputs.values())), Tensor):
            return self._process_tensors(net, inputs, rest[-1])
        # numpy path (§1.4)
        if self._mode not in (IOMode.SYSI, IOMode.SYSIO):
            raise SailEngineError("bad input")
        if set(inputs) != {net.input_name}:
            raise SailEngineError("bad input")
        x = np.ascontiguousarray(np.asarray(inputs[net.input_name], dtype=np.float32))
        if not net.valid_shape(x.shape):
            _log(f"Invalid shape for input tensor {net.input_name}: {list(x.shape)}")
            raise SailEngineError("bad input")
        with self._lock:
            t0 = time.monotonic()
            y = net.run(x, self._dev)
            _hold_gil_for(_env_ms("FAKE_SAIL_INFER_MS") - (time.monotonic() - t0))
        return {net.output_name: np.array(y, dtype=np.float32, copy=True)}

    def _process_tensors(self, net: _Net, inputs: dict, outputs: dict) -> None:
        # Tensor path (§1.5): no shape validation; a failed launch is only logged.
        if self._mode in (IOMode.SYSI, IOMode.SYSIO) and any(not t._own_sys for t in inputs.values()):
            raise SailEngineError("bad input")
        t = inputs[net.input_name]
        if not net.valid_shape(t.shape()):
            _log("bmrt_launch_tensor_ex() err")  # outputs stay stale, no exception
            return
        with self._lock:
            try:
                t0 = time.monotonic()
                y = net.run(t._data, self._dev)
                delay = _env_ms("FAKE_SAIL_INFER_MS") - (time.monotonic() - t0)
                if delay > 0:
                    time.sleep(delay)  # the Tensor path releases the GIL (§5)
            except SailEngineError:
                _log("bmrt_launch_tensor_ex() err")
                return
        out = outputs[net.output_name]
        n = min(out._data.shape[0], y.shape[0])
        out._data[:n] = y[:n]


# ----------------------------------------------------------------------------------------------
# Images (§2.4): pixels kept in numpy; planar = [3,h,w], packed = [h,w,3], GRAY = [h,w],
# YUV420P = OpenCV I420 layout [h*3/2, w].
class BMImage:
    def __init__(self, *args):
        if not args:
            self._arr, self._fmt, self._dt, self._dev = None, None, None, None
            return
        handle, h, w, fmt, dt = args
        self._dev = handle.get_device_id()
        self._fmt, self._dt = Format(fmt), ImgDtype(dt)
        npdt = np.float32 if self._dt == ImgDtype.DATA_TYPE_EXT_FLOAT32 else np.uint8
        self._arr = np.zeros(_layout_shape(self._fmt, h, w), dtype=npdt)

    @classmethod
    def _make(cls, arr, fmt, dev, dt=ImgDtype.DATA_TYPE_EXT_1N_BYTE) -> BMImage:
        img = cls()
        img._arr, img._fmt, img._dt, img._dev = arr, Format(fmt), ImgDtype(dt), dev
        return img

    def _check(self) -> None:
        if self._arr is None:
            raise SailBMImageError("BMImage is empty")

    def width(self) -> int:
        self._check()
        return _hw(self)[1]

    def height(self) -> int:
        self._check()
        return _hw(self)[0]

    def format(self) -> Format:
        self._check()
        return self._fmt

    def dtype(self) -> ImgDtype:
        self._check()
        return self._dt

    def data(self) -> BMImage:
        return self

    def get_device_id(self) -> int:
        return self._dev


def _layout_shape(fmt, h, w):
    if fmt in _PLANAR or fmt == Format.FORMAT_YUV444P:
        return (3, h, w)
    if fmt in _PACKED:
        return (h, w, 3)
    if fmt == Format.FORMAT_GRAY:
        return (h, w)
    if fmt == Format.FORMAT_YUV420P:
        return (h * 3 // 2, w)
    raise SailBMImageError(f"format {fmt} not supported by the fake")


def _hw(img: BMImage) -> tuple[int, int]:
    a, f = img._arr, img._fmt
    if f in _PLANAR or f == Format.FORMAT_YUV444P:
        return a.shape[1], a.shape[2]
    if f == Format.FORMAT_YUV420P:
        return a.shape[0] * 2 // 3, a.shape[1]
    return a.shape[0], a.shape[1]


def _to_bgr_packed(img: BMImage) -> np.ndarray:
    a, f = img._arr, img._fmt
    if f == Format.FORMAT_BGR_PACKED:
        return a
    if f == Format.FORMAT_RGB_PACKED:
        return a[..., ::-1]
    if f == Format.FORMAT_BGR_PLANAR:
        return np.transpose(a, (1, 2, 0))
    if f == Format.FORMAT_RGB_PLANAR:
        return np.transpose(a[::-1], (1, 2, 0))
    if f == Format.FORMAT_GRAY:
        return cv2.cvtColor(a, cv2.COLOR_GRAY2BGR)
    if f == Format.FORMAT_YUV420P:
        return cv2.cvtColor(a, cv2.COLOR_YUV2BGR_I420)
    raise SailBMImageError("not supported")


def _from_bgr_packed(bgr: np.ndarray, fmt: Format) -> np.ndarray:
    bgr = np.ascontiguousarray(bgr)
    if fmt == Format.FORMAT_BGR_PACKED:
        return bgr
    if fmt == Format.FORMAT_RGB_PACKED:
        return np.ascontiguousarray(bgr[..., ::-1])
    if fmt == Format.FORMAT_BGR_PLANAR:
        return np.ascontiguousarray(np.transpose(bgr, (2, 0, 1)))
    if fmt == Format.FORMAT_RGB_PLANAR:
        return np.ascontiguousarray(np.transpose(bgr[..., ::-1], (2, 0, 1)))
    if fmt == Format.FORMAT_GRAY:
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    if fmt == Format.FORMAT_YUV420P:
        h, w = bgr.shape[:2]
        return cv2.cvtColor(bgr[: h - h % 2, : w - w % 2], cv2.COLOR_BGR2YUV_I420)
    raise SailBMImageError("not supported")


class _BMImageArray:
    N = 0

    def __init__(self, *args):
        self._imgs: list = [None] * self.N

    def __len__(self):
        return self.N

    def __setitem__(self, i: int, img: BMImage) -> None:
        if not 0 <= i < self.N:
            raise IndexError(i)
        first = next((x for x in self._imgs if x is not None), None)
        if first is not None and (_hw(first) != _hw(img) or first._fmt != img._fmt or first._dt != img._dt):
            raise ValueError("BMImageArray: size or format mismatch")
        self._imgs[i] = BMImage._make(img._arr.copy(), img._fmt, img._dev, img._dt)

    def copy_from(self, i: int, img: BMImage) -> None:
        self[i] = img

    def attach_from(self, i: int, img: BMImage) -> None:
        self[i] = img


for _n in (2, 3, 4, 8, 16, 32, 64, 128, 256):
    globals()[f"BMImageArray{_n}D"] = type(f"BMImageArray{_n}D", (_BMImageArray,), {"N": _n})

_BMCV_ARRAY_SIZES = (2, 3, 4, 8)  # §3.4: registerBMImageArrayFunctions<16..256> is commented out


def _bmcv_image_arg(x) -> None:
    """pybind overload resolution: BMImageArray of N >= 16 matches no overload -> TypeError."""
    if isinstance(x, _BMImageArray) and x.N not in _BMCV_ARRAY_SIZES:
        raise TypeError(f"incompatible function arguments: BMImageArray{x.N}D")
    if not isinstance(x, (BMImage, _BMImageArray)):
        raise TypeError("incompatible function arguments")


# ----------------------------------------------------------------------------------------------
# Decoder (§2.1)
_PIC_SUFFIXES = ("jpg", "JPG", "jpeg", "JPEG", "bmp", "BMP", "png", "PNG")  # case-sensitive


def _suffix(path: str) -> str:
    base = os.path.basename(path)
    return base.rsplit(".", 1)[1] if "." in base else ""


class Decoder:
    def __init__(self, file_path: str, compressed: bool = True, tpu_id: int = 0):
        self._path, self._dev = file_path, tpu_id
        self._pic = _suffix(file_path) in _PIC_SUFFIXES
        self._frame = None
        if not self._pic:
            # FFmpeg (video) path: the constructor raises plain RuntimeError on failure; on
            # success frames come out as YUV (§2.1).
            data = np.fromfile(file_path, dtype=np.uint8) if os.path.isfile(file_path) else np.zeros(0, np.uint8)
            bgr = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
            if bgr is None:
                raise RuntimeError("Failed to open input file")
            self._frame = _from_bgr_packed(bgr, Format.FORMAT_YUV420P)

    def is_opened(self) -> bool:
        return True

    def _decode(self, handle: Handle):
        if handle.get_device_id() != self._dev:
            return SAIL_ERR_DEV_HANDLE, None
        if not self._pic:
            return 0, BMImage._make(self._frame.copy(), Format.FORMAT_YUV420P, self._dev)
        needle = os.environ.get("FAKE_SAIL_DECODE_FAIL", "")
        if needle and needle in self._path:
            _log("cv::bmcv::toBMI() err (injected)")
            return BM_NOT_SUPPORTED, None
        try:
            data = np.fromfile(self._path, dtype=np.uint8)
        except OSError:
            return SAIL_ERR_DEC_OPEN, None
        bgr = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
        if bgr is None:
            _log("cv::bmcv::toBMI() err")
            return BM_NOT_SUPPORTED, None
        return 0, BMImage._make(np.ascontiguousarray(bgr), Format.FORMAT_BGR_PACKED, self._dev)

    def read(self, handle: Handle, image: BMImage | None = None):
        t0 = time.monotonic()
        code, img = self._decode(handle)
        delay = _env_ms("FAKE_SAIL_DECODE_MS") - (time.monotonic() - t0)
        if delay > 0:
            time.sleep(delay)  # the JPU decode releases the GIL (§5)
        if image is None:
            if code != 0:
                raise SailDecoderError("Failed to get one decoded image")
            return img
        if code == 0:
            if image._arr is not None and (_hw(image) != _hw(img) or image._fmt != img._fmt):
                # pre-created with another size/format: vpp-resized into it, nearest (§2.1 trap)
                h, w = _hw(image)
                bgr = cv2.resize(_to_bgr_packed(img), (w, h), interpolation=cv2.INTER_NEAREST)
                image._arr = _from_bgr_packed(bgr, image._fmt)
            else:
                image._arr, image._fmt, image._dt, image._dev = img._arr, img._fmt, img._dt, img._dev
        return code


# ----------------------------------------------------------------------------------------------
# Bmcv (§2.2, §2.4, §3)
_CV_INTER = {bmcv_resize_algorithm.BMCV_INTER_NEAREST: cv2.INTER_NEAREST,
             bmcv_resize_algorithm.BMCV_INTER_LINEAR: cv2.INTER_LINEAR}


class Bmcv:
    def __init__(self, handle: Handle):
        self._dev = handle.get_device_id()

    def get_bm_image_data_format(self, dtype: Dtype) -> ImgDtype:
        return {Dtype.BM_FLOAT32: ImgDtype.DATA_TYPE_EXT_FLOAT32, Dtype.BM_UINT8: ImgDtype.DATA_TYPE_EXT_1N_BYTE,
                Dtype.BM_INT8: ImgDtype.DATA_TYPE_EXT_1N_BYTE_SIGNED}[Dtype(dtype)]

    def imread(self, filename: str) -> BMImage:
        # §2.2: lower-case jpg/jpeg -> JPU decode into YUV (the fake always gives YUV420P for
        # colour and GRAY for grey JPEGs; the real chroma format follows the file's sampling);
        # anything else or a failed HW decode -> opencv imread (BGR_PACKED / GRAY).
        try:
            data = np.fromfile(filename, dtype=np.uint8)
        except OSError:
            raise SailDecoderError("imread: cannot read file") from None
        if data.size == 0:
            raise SailDecoderError("imread: empty file")
        img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
        if img is None:
            raise SailDecoderError("imread: decode failed")
        if img.ndim == 2:
            return BMImage._make(img, Format.FORMAT_GRAY, self._dev)
        if img.dtype != np.uint8 or img.shape[2] not in (3, 4):
            raise SailUnknownError("not supported")
        bgr = np.ascontiguousarray(img[..., :3])
        if _suffix(filename) in ("jpg", "jpeg") and data[:2].tobytes() == b"\xff\xd8":
            return BMImage._make(_from_bgr_packed(bgr, Format.FORMAT_YUV420P), Format.FORMAT_YUV420P, self._dev)
        return BMImage._make(bgr, Format.FORMAT_BGR_PACKED, self._dev)

    def mat_to_bm_image(self, mat: np.ndarray) -> BMImage:
        mat = np.asarray(mat)
        if mat.dtype != np.uint8 or mat.ndim != 3 or mat.shape[2] != 3:
            raise SailBMImageError("mat_to_bm_image: expects uint8 HxWx3 BGR")
        return BMImage._make(np.ascontiguousarray(mat).copy(), Format.FORMAT_BGR_PACKED, self._dev)

    def crop(self, img: BMImage, x0: int, y0: int, w: int, h: int) -> BMImage:
        _bmcv_image_arg(img)
        H, W = _hw(img)
        if x0 < 0 or y0 < 0 or w <= 0 or h <= 0 or x0 + w > W or y0 + h > H:
            raise SailBMImageError("crop: window outside the image")
        bgr = _to_bgr_packed(img)[y0:y0 + h, x0:x0 + w]
        fmt = img._fmt if img._fmt not in _YUV else Format.FORMAT_BGR_PACKED
        return BMImage._make(_from_bgr_packed(bgr, fmt), fmt, self._dev)

    def crop_and_resize(self, img: BMImage, x0: int, y0: int, cw: int, ch: int, w: int, h: int,
                        resize_alg=bmcv_resize_algorithm.BMCV_INTER_NEAREST) -> BMImage:
        _bmcv_image_arg(img)
        if img._fmt in _YUV:
            raise SailBMImageError("bmcv_image_resize: YUV input not supported")
        if bmcv_resize_algorithm(resize_alg) not in _CV_INTER:  # §3.1: no BICUBIC on BM1684X
            raise SailBMImageError("bmcv_image_resize: BICUBIC not supported on BM1684X")
        H, W = _hw(img)
        if x0 < 0 or y0 < 0 or x0 + cw > W or y0 + ch > H:
            raise SailBMImageError("crop_and_resize: window outside the image")
        if min(cw, ch, w, h) < 8 or max(cw, ch, w, h) > 8192 or max(cw / w, w / cw, ch / h, h / ch) > 128:
            raise SailBMImageError("bmcv_image_resize: size or scale ratio out of range")
        bgr = _to_bgr_packed(img)[y0:y0 + ch, x0:x0 + cw]
        out = cv2.resize(bgr, (w, h), interpolation=_CV_INTER[bmcv_resize_algorithm(resize_alg)])
        fmt = img._fmt if img._fmt in (_PLANAR | {Format.FORMAT_GRAY}) else Format.FORMAT_BGR_PLANAR
        return BMImage._make(_from_bgr_packed(out, fmt), fmt, self._dev)

    def resize(self, img: BMImage, w: int, h: int, resize_alg=bmcv_resize_algorithm.BMCV_INTER_NEAREST) -> BMImage:
        H, W = _hw(img)
        return self.crop_and_resize(img, 0, 0, W, H, w, h, resize_alg)

    def yuv2bgr(self, img: BMImage) -> BMImage:
        if img._fmt not in _YUV:
            raise SailBMImageError("yuv2bgr: input is not YUV")
        return BMImage._make(_from_bgr_packed(_to_bgr_packed(img), Format.FORMAT_BGR_PLANAR),
                             Format.FORMAT_BGR_PLANAR, self._dev)

    def convert_format(self, img: BMImage, *args, image_format=None):
        _bmcv_image_arg(img)
        if args and isinstance(args[0], BMImage):
            out = args[0]
            out._arr = _from_bgr_packed(_to_bgr_packed(img), out._fmt)
            return 0
        fmt = Format(args[0] if args else (image_format if image_format is not None else Format.FORMAT_BGR_PLANAR))
        return BMImage._make(_from_bgr_packed(_to_bgr_packed(img), fmt), fmt, self._dev)

    def convert_to(self, img: BMImage, *args):
        # §3.3: planar (or GRAY) in, same format out; packed input fails on BM1684X; the
        # returning form keeps the input dtype (uint8, saturated).
        _bmcv_image_arg(img)
        if img._fmt not in (_PLANAR | {Format.FORMAT_GRAY}):
            raise SailBMImageError("convert_to: input format not supported on BM1684X")
        if isinstance(args[0], BMImage):
            out, ab = args
            if out._fmt != img._fmt or _hw(out) != _hw(img):
                raise SailBMImageError("convert_to: output format/size must match the input")
        else:
            (ab,) = args
            out = None
        a = np.array([p[0] for p in ab], dtype=np.float32).reshape(3, 1, 1)
        b = np.array([p[1] for p in ab], dtype=np.float32).reshape(3, 1, 1)
        res = img._arr.astype(np.float32) * a + b
        if out is None:
            return BMImage._make(np.clip(np.rint(res), 0, 255).astype(np.uint8), img._fmt, self._dev, img._dt)
        if out._dt == ImgDtype.DATA_TYPE_EXT_FLOAT32:
            out._arr = res.astype(np.float32)
        else:
            out._arr = np.clip(np.rint(res), 0, 255).astype(np.uint8)
        return 0  # the real one returns 0 even when bmcv failed (§3.3 gotcha)

    def bm_image_to_tensor(self, img, tensor: Tensor | None = None):
        _bmcv_image_arg(img)
        imgs = [img] if isinstance(img, BMImage) else list(img._imgs)
        if any(i is None for i in imgs) or any(i._fmt not in (_PLANAR | _PACKED | {Format.FORMAT_GRAY}) for i in imgs):
            raise SailBMImageError("not supported")
        arr = np.stack([i._arr if i._arr.ndim == 3 else i._arr[None] for i in imgs])
        if tensor is None:
            tensor = Tensor(Handle(self._dev), arr, own_sys_data=False)
            tensor._own_sys = False
            return tensor
        tensor._data = arr  # zero-copy re-point (§3.4)
        tensor._own_sys = False
        return None


# ----------------------------------------------------------------------------------------------
# EngineImagePreProcess (§3.5 and the §3.4 addendum): preprocessing + inference in C++ threads.
_EPP_BATCHES = (1, 4, 8, 16, 32, 64)
#: fake-only test hook (not in SAIL): the last batch EngineImagePreProcess fed its network,
#: as (float32 NCHW input, image_idxs), so tests can check the preprocessing itself.
LAST_EPP_INPUT: tuple | None = None
_EPP_INTER = {sail_resize_type.BM_RESIZE_VPP_NEAREST: cv2.INTER_NEAREST,
              sail_resize_type.BM_RESIZE_TPU_NEAREST: cv2.INTER_NEAREST,
              sail_resize_type.BM_RESIZE_TPU_LINEAR: cv2.INTER_LINEAR,
              # A model of the TPU-kernel bicubic: plain 4x4 bicubic, no antialias [UNCONFIRMED
              # numerics - the real kernel's coefficients and rounding are unknown].
              sail_resize_type.BM_RESIZE_TPU_BICUBIC: cv2.INTER_CUBIC}


class EngineImagePreProcess:
    def __init__(self, bmodel_path: str, tpu_id: int, use_mat_output: bool = False, core_list=None):
        _check_dev(tpu_id, SailEngineError)
        self._dev = tpu_id
        self._net = _Net(bmodel_path)
        # [UNCONFIRMED] for multi-stage bmodels: the fake uses the largest stage.
        self._batch = max(self._net.stages)
        if self._batch not in _EPP_BATCHES:  # decoder_multi.cpp:1215-1218
            raise SailEngineError(f"EngineImagePreProcess: batch {self._batch} not in {_EPP_BATCHES}")
        self._h, self._w = self._net.sample_shape[1], self._net.sample_shape[2]
        self._started = False

    def InitImagePreProcess(self, resize_mode, bgr2rgb: bool = False, queue_in_size: int = 20,
                            queue_out_size: int = 20) -> int:
        self._inter = _EPP_INTER[sail_resize_type(resize_mode)]
        self._bgr2rgb = bool(bgr2rgb)
        self._ab = ((1.0, 0.0),) * 3
        self._in: queue.Queue = queue.Queue(max(queue_in_size, self._batch))
        self._out: queue.Queue = queue.Queue(max(queue_out_size, 1))
        threading.Thread(target=self._worker, daemon=True).start()
        self._started = True
        return 0

    def SetConvertAtrr(self, alpha_beta) -> int:
        self._ab = tuple((float(a), float(b)) for a, b in alpha_beta)
        return 0

    def PushImage(self, channel_idx: int, image_idx: int, image: BMImage) -> int:
        if not self._started:
            return 1
        try:
            self._in.put_nowait((channel_idx, image_idx, image))
        except queue.Full:
            return 1
        return 0

    def _prep(self, img: BMImage) -> np.ndarray:
        bgr = _to_bgr_packed(img)
        x = cv2.resize(bgr, (self._w, self._h), interpolation=self._inter)
        if self._bgr2rgb:
            x = x[..., ::-1]
        x = np.transpose(x, (2, 0, 1)).astype(np.float32)
        a = np.array([p[0] for p in self._ab], np.float32).reshape(3, 1, 1)
        b = np.array([p[1] for p in self._ab], np.float32).reshape(3, 1, 1)
        return x * a + b

    def _worker(self) -> None:
        while True:
            items = [self._in.get() for _ in range(self._batch)]  # full batches only (§3.5)
            if self._dev in _env_ids("FAKE_SAIL_HANG_DEVS"):
                threading.Event().wait()
            try:
                t0 = time.monotonic()
                x = np.stack([self._prep(img) for _, _, img in items])
                global LAST_EPP_INPUT
                LAST_EPP_INPUT = (x, [i for _, i, _ in items])
                y = self._net.run(x, self._dev)
                delay = _env_ms("FAKE_SAIL_INFER_MS") - (time.monotonic() - t0)
                if delay > 0:
                    time.sleep(delay)  # the chip is busy; the GIL is free (C++ threads, §5)
                result = ({self._net.output_name: y}, [img for _, _, img in items],
                          [c for c, _, _ in items], [i for _, i, _ in items],
                          [[0, 0, self._w, self._h] for _ in items])
            except Exception as exc:  # noqa: BLE001
                result = exc
            self._out.put(result)

    def GetBatchData_Npy(self):
        r = self._out.get()
        if isinstance(r, Exception):
            raise SailEngineError(str(r))
        return r

    def get_graph_name(self) -> str:
        return self._net.graph

    def get_input_width(self) -> int:
        return self._w

    def get_input_height(self) -> int:
        return self._h

    def get_output_names(self) -> list[str]:
        return [self._net.output_name]

    def get_output_shape(self, tensor_name: str) -> list[int]:
        return [self._batch, *self._net.out_tail]


class LogLevel(IntEnum):
    DEBUG = 0
    INFO = 1
    WARN = 2
    ERROR = 3


def set_loglevel(level) -> int:
    return 0


def set_print_flag(flag: bool) -> None:
    pass
