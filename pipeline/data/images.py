"""Pure image functions: decode (PIL / simplejpeg), CLIP's reference crop, the fast crop, normalise.

The one implementation of CLIP's image preprocessing in the project: the stages (decode,
preprocess), the backends (cpu, sim, sail host paths), the toolchain (compile/verify inputs) and the
tests all use these functions. No sockets, no processes; errors are ItemError with a reason code
(pipeline.wire.messages.REASONS).

Decoding: the format is sniffed from the content (a PNG named .jpg is a PNG). A JPEG cut short (or
holding only headers) fails as truncated in every mode and backend; it is never embedded from a
partial decode. Output contract of `decode_file` (what a crop function receives), HxWxC uint8:
  * images that open in mode L, RGB, RGBA or LA (every JPEG but CMYK ones, most PNGs): the full
    image, 1 (L), 3 (RGB) or 4 (RGBA; LA as RGBA, whose premultiplied resize is the same per
    channel) channels. In mode "fast" L becomes RGB, and JPEGs are already shrunk by
    libjpeg-turbo's DCT scaling by a power of two (1/2, 1/4, 1/8) while the shorter side stays >=
    the target size.
  * every other mode (1, P, CMYK, YCbCr, LAB, I;16, I, F, ...), in both modes: the finished
    224x224x3 crop of `clip_crop`, made from the PIL image in the mode it opened in (a pixel array
    cannot carry a palette or a bit depth). Both crop functions pass a 224x224x3 array through
    unchanged, so the preprocess stage (or the fused crop) needs no special case.

Crops (config key preprocess.mode):
  * reference — CLIP's own transform exactly (`clip_crop`): Resize(224, BICUBIC) of the shorter side
    with PIL on the image in the mode it opened in (so PIL's own rules apply: NEAREST for 1 and P,
    premultiplied alpha for LA and RGBA), CenterCrop(224) with torchvision's rounding, then
    convert("RGB"). The crop stays uint8 (PIL's resize output is uint8 too), so shipping uint8 and
    normalising later is exact. One documented deviation (README, "Preprocessing fidelity"): 16- and
    32-bit integer images are scaled by their bit depth instead of saturating (`deep_integer_full_scale`).
  * fast — the decoder already shrank JPEGs by a power of two in the DCT domain; OpenCV resize of
    the shorter side (bicubic 2x up + integer 2x area down while the remaining factor is under 2,
    area beyond; premultiplied by alpha for RGBA, as PIL does), same crop. Its measured difference
    from reference is in the README ("Preprocessing fidelity").
Normalisation ((x/255 - mean)/std, HWC -> CHW) happens per batch in the infer stage, or is folded
into a uint8-input model (modelgen) or a fused bmodel (toolchain).
"""

from __future__ import annotations

import errno
import io
import os
import stat
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from pipeline.wire.messages import ItemError

Image.MAX_IMAGE_PIXELS = None  # we enforce our own limit (max_pixels) before decoding
warnings.simplefilter("ignore", Image.DecompressionBombWarning)

# CLIP's normalisation (openai/CLIP clip.py _transform), the one definition in the project.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

SIZE = 224
_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
# Above this many resized pixels (150 MB as RGB) only the crop region is resampled; see reference_crop.
PANORAMA_PIXELS = 50_000_000


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
                   exif_transpose=p.exif_transpose, target=cfg.model.image_size or SIZE)


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
            # Sized to the file: read(max_file_bytes + 1) allocates that much (512 MB by default)
            # for every input, a measured 0.02 ms of a core per photo. One byte more tells a file
            # that grew since the fstat; then the rest is read up to the limit.
            data = fh.read(size + 1)
            if len(data) > size:
                data += fh.read(max(0, max_file_bytes + 1 - len(data)))
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


#: modes decode hands on as full-size arrays (LA as RGBA); every other mode leaves as clip_crop's crop
ARRAY_MODES = ("L", "RGB", "RGBA", "LA")
_I16_FULL = 65535
_I32_FULL = 2**31 - 1


def _to_array(img: Image.Image, mode: str) -> np.ndarray:
    """The decoded PIL image as decode hands it on (see the module doc's output contract)."""
    if img.mode not in ARRAY_MODES:
        return clip_crop(img)
    if img.mode == "LA" or (mode == "fast" and img.mode == "L"):
        img = img.convert("RGBA" if img.mode == "LA" else "RGB")
    return np.asarray(img)


def _decode_pil(data: bytes, fmt: str, opts: DecodeOptions) -> np.ndarray:
    try:
        img = Image.open(io.BytesIO(data))
        _check_pixels(img.width, img.height, opts.max_pixels)
        if opts.mode == "fast" and fmt == "jpeg":
            img.draft("RGB", (opts.target, opts.target))  # only reached for CMYK/odd JPEGs
        img.load()
        if opts.exif_transpose:
            img = ImageOps.exif_transpose(img)
        return _to_array(img, opts.mode)
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
        # both sides >= them); powers of two keep the SIMD IDCT (docs/performance.md, "Baselines").
        return simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=-(-h // factor),
                                      min_width=-(-w // factor), strict=True)
    except ValueError as exc:
        text = str(exc)
        if "premature end" in text.lower() or "truncated" in text.lower():
            raise ItemError("truncated", text) from None
        raise ItemError("corrupt", f"jpeg decoder: {text}") from None


def decode_bytes(data: bytes, opts: DecodeOptions) -> np.ndarray:
    """Decode image bytes to an HxWxC uint8 array (C = 1, 3 or 4; see the module doc's contract)."""
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


def resized_size(w: int, h: int, size: int = SIZE) -> tuple[int, int]:
    """torchvision Resize(int) output size: shorter side -> size, longer side truncated."""
    if w <= h:
        return size, int(size * h / w)
    return int(size * w / h), size


def crop_box(w: int, h: int, size: int = SIZE) -> tuple[int, int, int, int]:
    """torchvision CenterCrop offsets (round half to even, as Python's round)."""
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return left, top, left + size, top + size


def deep_integer_full_scale(img: Image.Image) -> int | None:
    """The value that becomes 255 for a 16/32-bit integer image; None where CLIP's conversion is kept.

    CLIP's convert("RGB") clips these images to 0..255, which makes a 16-bit photo white. Instead
    (the README's documented rule): I;16* -> 65535; I (32-bit signed) -> None when every value lies in
    0..255 (an 8-bit picture in a wide container: CLIP's own output), 65535 when every value lies in
    0..65535 (16-bit data: PGM, some TIFFs), else 2**31 - 1 (negative values become 0).
    """
    if img.mode.startswith("I;16"):
        return _I16_FULL
    if img.mode != "I":
        return None
    lo, hi = img.getextrema()
    if lo >= 0 and hi <= 255:
        return None
    return _I16_FULL if lo >= 0 and hi <= _I16_FULL else _I32_FULL


def clip_crop(img: Image.Image, size: int = SIZE) -> np.ndarray:
    """CLIP's transform up to ToTensor on a PIL image of any mode -> [size,size,3] uint8 RGB.

    Resize and crop happen in the image's own mode, RGB conversion last, as torchvision does it.
    """
    full = deep_integer_full_scale(img)
    w, h = img.size
    nw, nh = resized_size(w, h, size)
    left, top, right, bottom = crop_box(nw, nh, size)
    if nw * nh > PANORAMA_PIXELS:
        # Extreme aspect ratios: resizing the whole image would allocate gigabytes (20000x2 ->
        # 2240000x224). Resample only the source region that maps onto the centre crop through
        # PIL's `box` (filter taps may still read outside it). The geometry is the same; float
        # rounding of the filter centres moves some pixels by 1-2 levels (measured), so this
        # path is used only where the reference one would need over 150 MB for one image.
        sx, sy = w / nw, h / nh
        box = (left * sx, top * sy, right * sx, bottom * sy)
        out = img.resize((size, size), Image.Resampling.BICUBIC, box=box)
    else:
        out = img.resize((nw, nh), Image.Resampling.BICUBIC).crop((left, top, right, bottom))
    if full is None:
        return np.asarray(out.convert("RGB"))
    # round(v * 255 / full): never a tie, as 255 and full are odd and 2 * v * 255 is even
    v8 = np.clip(np.rint(np.asarray(out).astype(np.float64) * (255.0 / full)), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(np.repeat(v8[:, :, None], 3, axis=2))


def reference_crop(img: np.ndarray, size: int = SIZE) -> np.ndarray:
    """CLIP's transform on an HxWxC uint8 array (C = 1, 3, 4) -> [size,size,3] uint8 RGB."""
    return clip_crop(Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img, _MODES[img.shape[2]]), size)


def _resize_crop(img: np.ndarray, nw: int, nh: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """OpenCV resize of a whole HxWxC image to (nw, nh), the fast crop's filter (module doc), then
    the crop `box` (left, top, right, bottom) of the resized image.

    Shrinking by less than 2 (every JPEG after the DCT scaling, and most photos): bicubic upsampling
    to (2nw, 2nh), then OpenCV's integer 2x area (box) reduction, which is its SIMD path. Measured
    on corpus-1k against CLIP's PIL bicubic (docs/performance.md, "Fast preprocessing"): closer to it
    than OpenCV's general area resize (0.85 vs 0.94 levels mean), in 0.33 vs 0.61 ms of a core per
    photo (mostly 500x375), because the general (non-integer) area resize runs scalar code. The 2x
    area step runs on the crop's region of the upsampled image only: an integer 2x box reduction
    averages disjoint 2x2 blocks, so cropping at even offsets first gives the same bytes (asserted
    in tests/data/test_images.py) for about 20% less work on 4:3 photos. Shrinking by 2 or more
    (non-JPEG inputs, which get no DCT scaling): area resize, which does not alias there.
    Enlarging: bicubic, as PIL's resize does.
    """
    import cv2

    left, top, right, bottom = box
    h, w = img.shape[:2]
    if (nw, nh) == (w, h):
        return img[top:bottom, left:right]  # nothing to resize (a finished crop, or an image at the target size)
    img = np.ascontiguousarray(img)
    if nw > w or nh > h:
        return cv2.resize(img, (nw, nh), interpolation=cv2.INTER_CUBIC)[top:bottom, left:right]
    if 2 * nw > w and 2 * nh > h:
        up = cv2.resize(img, (2 * nw, 2 * nh), interpolation=cv2.INTER_CUBIC)
        region = up[2 * top:2 * bottom, 2 * left:2 * right]
        return cv2.resize(region, (right - left, bottom - top), interpolation=cv2.INTER_AREA)
    return cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)[top:bottom, left:right]


def fast_crop(img: np.ndarray, size: int = SIZE) -> np.ndarray:
    """Resize the shorter side to `size` with OpenCV and centre-crop (`_resize_crop`) ->
    [size,size,3] uint8.

    RGBA as in CLIP's order: resized premultiplied by alpha (as PIL's resize does), then
    un-premultiplied and alpha dropped, so fully transparent pixels end black and hidden colours
    do not bleed in at edges. Grey is resized as one channel and repeated. Extreme aspect ratios
    (over PANORAMA_PIXELS once resized: a 20000x2 strip would need a 2240000x224 intermediate,
    1.5 GB) take the reference crop, which resamples only the crop's region.
    """
    h, w = img.shape[:2]
    nw, nh = resized_size(w, h, size)
    if nw * nh > PANORAMA_PIXELS:
        return reference_crop(img, size)
    box = crop_box(nw, nh, size)
    if img.shape[2] == 4:
        alpha = img[:, :, 3:4].astype(np.float32)
        pre = np.concatenate([img[:, :, :3].astype(np.float32) * (alpha / 255.0), alpha], axis=2)
        out = _resize_crop(pre, nw, nh, box)
        a = np.clip(out[:, :, 3:4], 0.0, 255.0)  # bicubic may overshoot
        rgb = np.where(a > 0.5, out[:, :, :3] * 255.0 / np.maximum(a, 0.5), 0.0)
        return np.ascontiguousarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8))
    out = _resize_crop(img, nw, nh, box)
    if out.ndim == 2 or out.shape[2] == 1:  # grey (OpenCV drops a single channel's axis)
        return np.ascontiguousarray(np.repeat(out.reshape(size, size, 1), 3, axis=2))
    return np.ascontiguousarray(out)


def crop(img: np.ndarray, mode: str, size: int = SIZE) -> np.ndarray:
    return reference_crop(img, size) if mode == "reference" else fast_crop(img, size)


_SCALE = (1.0 / (255.0 * np.asarray(CLIP_STD, dtype=np.float32))).astype(np.float32)
_SHIFT = (-np.asarray(CLIP_MEAN, dtype=np.float32) / np.asarray(CLIP_STD, dtype=np.float32)).astype(np.float32)


def normalize(pixels: np.ndarray) -> np.ndarray:
    """uint8 RGB [n,H,W,3] -> float32 [n,3,H,W], CLIP-normalised ((x/255 - mean) / std)."""
    n, h, w, _ = pixels.shape
    out = np.empty((n, 3, h, w), dtype=np.float32)
    for c in range(3):  # one strided pass per channel: uint8 -> float32 x scale, then + shift
        np.multiply(pixels[..., c], _SCALE[c], out=out[:, c], dtype=np.float32)
        out[:, c] += _SHIFT[c]
    return out
