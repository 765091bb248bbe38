"""The tests' own CLIP preprocessing, independent of the project's code, and images of every mode.

`clip_transform` re-implements OpenAI CLIP's `_transform(224)` (clip/clip.py):

    Compose([Resize(224, interpolation=BICUBIC), CenterCrop(224), _convert_image_to_rgb,
             ToTensor(), Normalize(MEAN, STD)])

with PIL calls only, step by step as torchvision does them on a PIL image (torchvision 0.29,
transforms/functional.py): `resize` -> `_compute_resized_output_size` (shorter side -> 224, longer
side `int(224 * long / short)`) -> `PIL.Image.resize(..., BICUBIC)` on the image *in the mode it
opened in* (so PIL's own rule applies: `1` and `P` images are resized with NEAREST, `LA`/`RGBA`
premultiplied); `center_crop` -> `int(round((h - 224) / 2.0))` offsets; `convert("RGB")`;
`to_tensor` -> uint8 / 255; `normalize` -> (x - mean) / std in float32.

`documented_crop_u8` is the README's stated rule for the modes where CLIP's output is meaningless
(16/32-bit integer images saturate to white), written here from the README's words so the
project's implementation is checked against the documentation, not against itself.

Nothing here imports the project (`pipeline`, `stages`): it lives in tests/ on purpose.
scripts/measure_preprocess.py imports it to publish the same comparisons.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

SIZE = 224
# OpenAI CLIP's Normalize constants (clip/clip.py), written out again on purpose.
MEAN = np.asarray((0.48145466, 0.4578275, 0.40821073), np.float32)
STD = np.asarray((0.26862954, 0.26130258, 0.27577711), np.float32)


def _resize_crop(img: Image.Image, size: int = SIZE) -> Image.Image:
    """torchvision Resize(size, BICUBIC) then CenterCrop(size) on a PIL image, no mode change."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    nw, nh = (new_short, new_long) if w <= h else (new_long, new_short)
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    top = int(round((nh - size) / 2.0))
    left = int(round((nw - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def clip_crop_u8(img: Image.Image, size: int = SIZE) -> np.ndarray:
    """CLIP's transform up to ToTensor: [size,size,3] uint8 RGB."""
    return np.asarray(_resize_crop(img, size).convert("RGB"), dtype=np.uint8)


def to_tensor_normalize(u8: np.ndarray) -> np.ndarray:
    """torchvision ToTensor + Normalize: uint8 HWC -> float32 CHW."""
    x = u8.astype(np.float32) / np.float32(255.0)
    return ((x - MEAN) / STD).transpose(2, 0, 1).astype(np.float32)


def clip_transform(img: Image.Image, size: int = SIZE) -> np.ndarray:
    """CLIP's whole `_transform(size)`: PIL image (any mode) -> float32 [3,size,size]."""
    return to_tensor_normalize(clip_crop_u8(img, size))


def documented_crop_u8(img: Image.Image, size: int = SIZE) -> np.ndarray:
    """The README's rule for deep integer images; CLIP's order for every other mode.

    I;16* images, and I images with any value outside 0..255: resized and cropped in their own
    mode like CLIP, then each value v becomes round(v * 255 / M) (clipped to 0..255), with
    M = 65535 for I;16* and for I images whose values all lie in 0..65535, else M = 2**31 - 1
    (negative values become 0). I images whose values all lie in 0..255 follow CLIP exactly.
    """
    mode = img.mode
    if mode.startswith("I;16"):
        full = 65535
    elif mode == "I":
        lo, hi = img.getextrema()
        if lo >= 0 and hi <= 255:
            return clip_crop_u8(img, size)
        full = 65535 if lo >= 0 and hi <= 65535 else 2**31 - 1
    else:
        return clip_crop_u8(img, size)
    v = np.asarray(_resize_crop(img, size)).astype(np.float64)
    v8 = np.clip(np.rint(v * 255.0 / full), 0, 255).astype(np.uint8)
    return np.repeat(v8[:, :, None], 3, axis=2)


def torchvision_transform():
    """OpenAI CLIP's Compose built from torchvision itself (import only where it is installed)."""
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

    return Compose([Resize(SIZE, interpolation=InterpolationMode.BICUBIC), CenterCrop(SIZE),
                    lambda im: im.convert("RGB"), ToTensor(),
                    Normalize(tuple(MEAN.tolist()), tuple(STD.tolist()))])


# --- images of every mode PIL opens ---------------------------------------------------------------

def photo_rgb(w: int, h: int, seed: int = 0) -> np.ndarray:
    """A photo-like uint8 RGB array: smooth colour fields, an edge or two, sensor-like noise."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(2, h // 24), max(2, w // 24), 3), dtype=np.uint8)
    arr = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC), np.float64)
    arr[h // 3: h // 3 + max(1, h // 10), :, :] = 250.0  # a bright bar: hard edges for the kernels
    arr[:, w // 2: w // 2 + max(1, w // 12), 1] = 5.0
    arr += rng.normal(0, 6, arr.shape)
    return np.clip(arr, 0, 255).astype(np.uint8)


def _alpha(w: int, h: int) -> np.ndarray:
    """Alpha with fully transparent, fully opaque and graded regions."""
    a = np.tile(np.linspace(0, 255, w), (h, 1))
    a[: h // 4] = 0
    a[-h // 4:] = 255
    return a.astype(np.uint8)


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def mode_images(w: int = 317, h: int = 243, seed: int = 0) -> dict[str, bytes]:
    """Encoded files, one per case, name -> bytes; `Image.open(...).mode` is the case's mode.

    Covers 1, L, LA, P, P+transparency (PNG and GIF), RGB, RGBA, CMYK (JPEG and TIFF), YCbCr, LAB,
    I;16, I (0..255 values, 16-bit values, 32-bit signed values), F and 16-bit-per-channel RGB.
    """
    import cv2  # only to write 48-bit PNGs, which PIL cannot

    rgb = photo_rgb(w, h, seed)
    pil = Image.fromarray(rgb)
    grey = np.asarray(pil.convert("L"))
    rng = np.random.default_rng(seed + 1)
    out: dict[str, bytes] = {}
    out["1 (PNG)"] = _save(pil.convert("1"), "PNG")
    out["L (PNG)"] = _save(pil.convert("L"), "PNG")
    out["LA (PNG)"] = _save(Image.merge("LA", (pil.convert("L"), Image.fromarray(_alpha(w, h)))), "PNG")
    pal = pil.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    out["P (PNG)"] = _save(pal, "PNG")
    out["P (GIF)"] = _save(pal, "GIF")
    idx = np.asarray(pal)
    common = int(np.bincount(idx.ravel()).argmax())  # the most used colour becomes transparent
    out["P+transparency (PNG)"] = _save(pal, "PNG", transparency=common)
    out["P+transparency (GIF)"] = _save(pal, "GIF", transparency=common)
    out["RGB (JPEG)"] = _save(pil, "JPEG", quality=92)
    out["RGB (PNG)"] = _save(pil, "PNG")
    out["RGBA (PNG)"] = _save(Image.merge("RGBA", (*pil.split(), Image.fromarray(_alpha(w, h)))), "PNG")
    cmyk = pil.convert("CMYK")
    out["CMYK (JPEG)"] = _save(cmyk, "JPEG", quality=92)
    out["CMYK (TIFF)"] = _save(cmyk, "TIFF")
    out["YCbCr (TIFF)"] = _save(pil.convert("YCbCr"), "TIFF")
    lab = np.stack([grey, np.clip(128 + (rgb[:, :, 0].astype(int) - rgb[:, :, 1]) // 2, 0, 255),
                    np.clip(128 + (rgb[:, :, 1].astype(int) - rgb[:, :, 2]) // 2, 0, 255)], axis=2)
    out["LAB (TIFF)"] = _save(Image.fromarray(lab.astype(np.uint8), "LAB"), "TIFF")
    g16 = (grey.astype(np.int64) * 257 + rng.integers(0, 257, grey.shape)).clip(0, 65535)
    out["I;16 (PNG)"] = _save(Image.fromarray(g16.astype(np.uint16)), "PNG")
    out["I 0..255 (TIFF)"] = _save(Image.fromarray(grey.astype(np.int32), "I"), "TIFF")
    out["I 16-bit values (TIFF)"] = _save(Image.fromarray(g16.astype(np.int32), "I"), "TIFF")
    g32 = grey.astype(np.int64) * 8421504 - 2**27  # 0..255 spread over the signed 32-bit range, some < 0
    out["I 32-bit values (TIFF)"] = _save(Image.fromarray(g32.clip(-2**31, 2**31 - 1).astype(np.int32), "I"), "TIFF")
    out["F (TIFF)"] = _save(Image.fromarray(grey.astype(np.float32) + rng.random(grey.shape, np.float32), "F"), "TIFF")
    rgb16 = (rgb.astype(np.uint16) * 257 + rng.integers(0, 257, rgb.shape).astype(np.uint16))[:, :, ::-1]
    ok, png48 = cv2.imencode(".png", np.ascontiguousarray(rgb16))
    assert ok
    out["RGB 16-bit (PNG)"] = png48.tobytes()
    return out
