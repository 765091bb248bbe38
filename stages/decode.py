"""Decode stage: file bytes -> pixel array, or a failed item with a short reason code.

Pure functions; no sockets. The format is sniffed from the content (a PNG named .jpg is a PNG).
Reason codes (docs/robustness.md): empty, not_an_image, truncated, corrupt, too_large,
unreadable, vanished. A JPEG cut short (or holding only headers) fails as truncated in every mode
and backend; it is never embedded from a partial decode.

Output contract (what the preprocess stage receives):
  * mode "reference": the image in the mode CLIP's transform resizes it in — 1 (L), 3 (RGB) or
    4 (RGBA) channels, full size. Palette, CMYK, 16-bit and other modes are converted to one of
    these first (documented deviation: CLIP would resize a palette image with NEAREST).
  * mode "fast": 3-channel RGB, JPEGs already shrunk by libjpeg-turbo's DCT scaling by a power of
    two (1/2, 1/4, 1/8) while the shorter side stays >= the target size.
"""

from __future__ import annotations

import errno
import io
import os
import stat
import time
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from pipeline.worker import StageCore

Image.MAX_IMAGE_PIXELS = None  # we enforce our own limit (max_pixels) before decoding
warnings.simplefilter("ignore", Image.DecompressionBombWarning)

REASONS = ("empty", "not_an_image", "truncated", "corrupt", "too_large", "unreadable", "vanished", "not_a_file",
           "timeout")


class ItemError(Exception):
    """This input cannot be embedded. `reason` is a short code, `message` the details."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class DecodeOptions:
    mode: str = "reference"  # "reference" | "fast"
    max_pixels: int = 178_956_970
    max_file_bytes: int = 512 * 1024 * 1024
    exif_transpose: bool = False
    target: int = 224

    @classmethod
    def from_config(cls, cfg) -> DecodeOptions:
        p = cfg.preprocess
        return cls(mode=p.mode, max_pixels=p.max_pixels, max_file_bytes=p.max_file_bytes,
                   exif_transpose=p.exif_transpose)


_MAGIC = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
)


_SOS = b"\xff\xda"  # JPEG start-of-scan marker: the compressed image data follows it


def sniff(data: bytes) -> str | None:
    """The image format from the first bytes, or None."""
    for magic, fmt in _MAGIC:
        if data.startswith(magic):
            return fmt
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def open_input(path: bytes):
    """Open an input for reading without ever blocking on it: anything that is not a regular file
    or a directory after resolving symlinks (FIFO, socket, /dev/zero...) fails as `not_a_file`
    before it is opened, and the open itself is non-blocking with an fstat check, so a file swapped
    for a FIFO after the stat cannot block either. Raises ItemError or OSError."""
    st = os.stat(path)
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise ItemError("not_a_file", f"{_kind(st.st_mode)}, not a regular file: never opened")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, "Is a directory")
        if not stat.S_ISREG(mode):
            raise ItemError("not_a_file", f"{_kind(mode)}, not a regular file (swapped after listing)")
        os.set_blocking(fd, True)
        return open(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path: bytes, max_file_bytes: int) -> bytes:
    """Read a whole input file, mapping OS errors to reason codes."""
    try:
        with open_input(path) as fh:
            size = os.fstat(fh.fileno()).st_size
            if size > max_file_bytes:
                raise ItemError("too_large", f"file is {size} bytes, over preprocess.max_file_bytes={max_file_bytes}")
            data = fh.read(max_file_bytes + 1)
    except FileNotFoundError:
        raise ItemError("vanished", "file no longer exists (deleted after listing, or a dangling symlink)") from None
    except IsADirectoryError:
        raise ItemError("unreadable", "is a directory") from None
    except PermissionError as exc:
        raise ItemError("unreadable", f"permission denied: {exc.strerror}") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ItemError("unreadable", "symlink loop") from None
        raise ItemError("unreadable", f"{exc.strerror or exc}") from None
    if not data:
        raise ItemError("empty", "file is empty (0 bytes)")
    if len(data) > max_file_bytes:
        raise ItemError("too_large", f"file grew over preprocess.max_file_bytes={max_file_bytes}")
    return data


def _check_pixels(w: int, h: int, limit: int) -> None:
    if w <= 0 or h <= 0:
        raise ItemError("corrupt", f"header claims an empty image ({w}x{h})")
    if w * h > limit:
        raise ItemError("too_large", f"{w}x{h} = {w * h} pixels, over preprocess.max_pixels={limit}")


def _to_supported_mode(img: Image.Image) -> Image.Image:
    """Bring any PIL mode to L, RGB or RGBA (the modes CLIP's resize sees for common photos)."""
    mode = img.mode
    if mode in ("L", "RGB", "RGBA"):
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.uint32 if mode == "I" else np.uint16)
        if mode == "I":
            arr = np.clip(arr, 0, 65535)
        return Image.fromarray((arr >> 8).astype(np.uint8), "L")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
    if mode == "1":
        return img.convert("L")
    if mode == "LA":
        return img.convert("RGBA")
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in img.info
        return img.convert("RGBA" if has_alpha else "RGB")
    return img.convert("RGB")  # CMYK, YCbCr, LAB, HSV, RGBX, ...


def _decode_pil(data: bytes, fmt: str, opts: DecodeOptions) -> np.ndarray:
    try:
        img = Image.open(io.BytesIO(data))
        _check_pixels(img.width, img.height, opts.max_pixels)
        if opts.mode == "fast" and fmt == "jpeg":
            img.draft("RGB", (opts.target, opts.target))  # only reached for CMYK/odd JPEGs
        img.load()
        if opts.exif_transpose:
            img = ImageOps.exif_transpose(img)
        img = _to_supported_mode(img)
        if opts.mode == "fast" and img.mode != "RGB":
            img = img.convert("RGB")
        return np.asarray(img)
    except ItemError:
        raise
    except Image.DecompressionBombError as exc:
        raise ItemError("too_large", str(exc)) from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, KeyError) as exc:
        text = str(exc)
        if "truncated" in text or isinstance(exc, EOFError) or "premature end" in text.lower():
            raise ItemError("truncated", text or "unexpected end of data") from None
        raise ItemError("corrupt", f"{fmt} decoder: {text or type(exc).__name__}") from None
    except MemoryError:
        raise ItemError("too_large", "out of memory while decoding") from None


def _fast_jpeg(data: bytes, opts: DecodeOptions) -> np.ndarray | None:
    """libjpeg-turbo decode with power-of-two DCT downscaling; None = let PIL handle it."""
    import simplejpeg

    try:
        h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError as exc:
        raise ItemError("corrupt", f"jpeg header: {exc}") from None
    _check_pixels(w, h, opts.max_pixels)
    if colorspace not in ("Gray", "YCbCr", "RGB") or opts.exif_transpose:
        return None
    short = min(w, h)
    factor = 1
    while factor < 8 and short // (factor * 2) >= opts.target:
        factor *= 2
    try:
        # min_height/min_width make simplejpeg pick exactly 1/factor (the smallest n/8 that keeps
        # both sides >= them); powers of two keep the SIMD IDCT (see docs: baselines).
        return simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=-(-h // factor),
                                      min_width=-(-w // factor), strict=True)
    except ValueError as exc:
        text = str(exc)
        if "premature end" in text.lower() or "truncated" in text.lower():
            raise ItemError("truncated", text) from None
        raise ItemError("corrupt", f"jpeg decoder: {text}") from None


def decode_bytes(data: bytes, opts: DecodeOptions) -> np.ndarray:
    """Decode image bytes to an HxWxC uint8 array (C = 1, 3 or 4; see module doc)."""
    fmt = sniff(data)
    if fmt is None:
        head = data[:16]
        raise ItemError("not_an_image", f"unrecognised content (first bytes {head!r})")
    if fmt == "jpeg" and _SOS not in data:
        # SOI and tables but no scan: the file was cut before any image data. Checked here so
        # both decoders (and modes) give the same reason.
        raise ItemError("truncated", "JPEG holds only headers and no image data (file cut short)")
    if fmt == "jpeg" and opts.mode == "fast":
        arr = _fast_jpeg(data, opts)
        if arr is not None:
            return arr
    arr = _decode_pil(data, fmt, opts)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return np.ascontiguousarray(arr)


def decode_file(path: bytes, opts: DecodeOptions) -> np.ndarray:
    """Read and decode one input file; raises ItemError with a reason code."""
    return decode_bytes(read_bytes(path, opts.max_file_bytes), opts)


def failure(item_id: int, path: bytes, reason: str, message: str, stage: str) -> tuple[str, dict, tuple]:
    """The sink-bound message for one failed input."""
    return ("sink", {"t": "fail", "id": item_id, "path": path, "reason": reason,
                     "message": message[:500], "stage": stage}, ())


def image_message(kind: str, header: dict, arr) -> tuple[str, dict, tuple]:
    from pipeline.transport import array_header

    return ("next", {"t": kind, "id": header["id"], "path": header["path"], **array_header(arr)}, (arr,))


# Test-only fault hook: a decode worker that receives an input whose path contains this byte
# string exits hard (os._exit), in every generation, so the supervisor's "an input that kills its
# worker twice fails as crashed_worker" path can be exercised. Never set it in production.
CRASH_ENV = "CLIP_PIPELINE_TEST_CRASH_ON"
_CRASH_ON = os.fsencode(os.environ.get(CRASH_ENV, "")) or None
# Test-only: a decode worker that receives an input whose path contains this byte string hangs on
# it (as on a dead network mount), in every generation: the preprocess.decode_timeout_s test.
HANG_ENV = "CLIP_PIPELINE_TEST_HANG_ON"
_HANG_ON = os.fsencode(os.environ.get(HANG_ENV, "")) or None


def pixels_message(ids: list[int], paths: list[bytes], pixels: np.ndarray) -> tuple[str, dict, tuple]:
    """Crops of several inputs in one message: uint8 [n,224,224,3] and their ids/paths."""
    from pipeline.transport import array_header

    return ("next", {"t": "pxs", "ids": list(ids), "paths": list(paths), **array_header(pixels)}, (pixels,))


def ready_crop(size: int = 224) -> np.ndarray:
    """The fixed crop fake.ready_crops sends (a smooth gradient, so fake embeddings are finite)."""
    y, x = np.mgrid[0:size, 0:size]
    return np.ascontiguousarray(np.stack([x, y, (x + y) // 2], axis=2).astype(np.uint8))


class DecodeCore(StageCore):
    """Decode worker: item -> decoded image (or, fused, the 224x224 crop) or a failed item."""

    def __init__(self, spec):
        self.opts = DecodeOptions.from_config(spec.cfg)
        self.fused = spec.cfg.workers.fuse_decode_preprocess
        cfg = spec.cfg
        # bench-only (fake.ready_crops): skip the files, send a pre-made crop per input
        self.ready_crop = ready_crop() if cfg.infer.backend == "fake" and cfg.fake.ready_crops else None
        self.ready_groups: dict[int, np.ndarray] = {}
        self.info: dict = {}
        self.slot = None  # the worker's Slot (set by make_core): marks the input being decoded

    def setup(self) -> None:
        import cv2

        cv2.setNumThreads(1)  # one process per core does better than thread pools on small boxes

    def handle(self, header: dict, frames: list):
        if header["t"] == "items":
            return self.handle_group(header)
        if self.ready_crop is not None:
            return [image_message("px", header, self.ready_crop)]
        return self.handle_one(header)

    def handle_group(self, header: dict):
        """A group of inputs -> one message of stacked crops (fused) plus per-item failures."""
        ids, paths = header["ids"], header["paths"]
        if self.ready_crop is not None:
            if not self.fused:  # the preprocess stage takes one image per message
                return [image_message("img", {"id": i, "path": p}, self.ready_crop) for i, p in zip(ids, paths)]
            if len(ids) not in self.ready_groups:  # built once per group size, sent zero-copy
                self.ready_groups[len(ids)] = np.ascontiguousarray(
                    np.broadcast_to(self.ready_crop, (len(ids), *self.ready_crop.shape)))
            return [pixels_message(ids, paths, self.ready_groups[len(ids)])]
        outputs, ok_ids, ok_paths, crops = [], [], [], []
        for item_id, path in zip(ids, paths):
            for target, h, bufs in self.handle_one({"t": "item", "id": item_id, "path": path}):
                if self.fused and h["t"] == "px":
                    ok_ids.append(item_id)
                    ok_paths.append(path)
                    crops.append(bufs[0])
                else:
                    outputs.append((target, h, bufs))
        if crops:
            outputs.append(pixels_message(ok_ids, ok_paths, np.stack(crops)))
        return outputs

    def handle_one(self, header: dict):
        from stages.preprocess import crop

        if _CRASH_ON and _CRASH_ON in header["path"]:
            os._exit(86)  # test-only fault hook, see CRASH_ENV
        if self.slot is not None:  # the supervisor's per-input deadline and "stuck" progress note
            self.slot.begin_item(header["id"])
        try:
            if _HANG_ON and _HANG_ON in header["path"]:
                while True:  # test-only fault hook, see HANG_ENV
                    time.sleep(3600)
            arr = decode_file(header["path"], self.opts)
            if self.fused:
                return [image_message("px", header, crop(arr, self.opts.mode))]
        except ItemError as exc:
            return [failure(header["id"], header["path"], exc.reason, exc.message, "decode")]
        except Exception as exc:  # noqa: BLE001 - one bad image never stops the run
            return [failure(header["id"], header["path"], "unreadable",
                            f"unexpected {type(exc).__name__}: {exc}", "decode")]
        finally:
            if self.slot is not None:
                self.slot.end_item()
        return [image_message("img", header, arr)]
