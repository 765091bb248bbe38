"""The tests' one image generator: photo-like content and one encoder for files and bytes.

- `photo(w, h, seed)`: the picture, a uint8 [h, w, 3] RGB array: smooth colour gradients, a few
  hard-edged discs and mild sensor-like noise. Every generated image in the suite comes from it, so
  tolerances tuned on one test's images hold for the others' (the sail tests' were tuned on it);
- `photo_image(w, h, seed, mode)`: the same picture as a PIL image in any mode (RGBA/LA with an
  alpha that has transparent, opaque and graded regions);
- `encode(img, fmt, quality=...)` -> bytes and `write(path, img)` -> path (format from the suffix);
- `make_images(d, n, seed)`: a folder of photos of assorted sizes, JPEG and PNG mixed;
- `mode_images(w, h, seed)`: one encoded file of the picture per image mode PIL opens;
- `write_shard(path, images)`: a webdataset tar shard of those files, img2dataset's way.

Nothing here imports the project (`pipeline`, `stages`): scripts/measure_preprocess.py and
scripts/bench_overlap_sail.py use it too. conftest.py builds its image fixtures on it.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

SIZES = ((64, 48), (48, 64), (80, 80), (300, 120), (33, 257))  # make_images' default: both orientations, odd sides
FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".jfif": "JPEG", ".png": "PNG", ".webp": "WEBP", ".gif": "GIF",
           ".tif": "TIFF", ".tiff": "TIFF", ".bmp": "BMP"}


def photo(w: int, h: int, seed: int | Sequence[int] = 0) -> np.ndarray:
    """A photo-like uint8 RGB array [h, w, 3]; any size from 1x1; distinct per seed."""
    import cv2  # the discs; cv2 is a dependency of the project

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)  # planes drawn in B, G, R order (as the sail tests were tuned)
    for c in range(3):
        fx, fy, ph = rng.uniform(0.5, 4, 2).tolist() + [rng.uniform(0, 6.28)]
        img[..., c] = 128 + 90 * np.sin(2 * np.pi * (fx * xx / w + fy * yy / h) + ph)
    for _ in range(6):
        hi = min(w, h) // 3  # tiny images (a few pixels) get tiny discs
        cx, cy, r = int(rng.integers(0, w)), int(rng.integers(0, h)), int(rng.integers(10, hi)) if hi > 10 else 1
        cv2.circle(img, (cx, cy), r, rng.uniform(0, 255, 3).tolist(), -1)
    img += rng.normal(0, 6, img.shape)
    return np.ascontiguousarray(np.clip(img, 0, 255).astype(np.uint8)[:, :, ::-1])


def alpha(w: int, h: int) -> np.ndarray:
    """A uint8 alpha [h, w]: fully transparent top quarter, opaque bottom quarter, graded between."""
    a = np.tile(np.linspace(0, 255, w), (h, 1))
    a[: h // 4] = 0
    a[h - h // 4:] = 255
    return a.astype(np.uint8)


def photo_image(w: int, h: int, seed: int | Sequence[int] = 0, mode: str = "RGB") -> Image.Image:
    """`photo` as a PIL image converted to `mode`; RGBA and LA get `alpha(w, h)`."""
    img = Image.fromarray(photo(w, h, seed))
    if mode in ("RGBA", "LA"):
        base = img if mode == "RGBA" else img.convert("L")
        return Image.merge(mode, (*base.split(), Image.fromarray(alpha(w, h))))
    return img if mode == "RGB" else img.convert(mode)


def encode(img: np.ndarray | Image.Image, fmt: str = "JPEG", *, quality: int = 92, **save: object) -> bytes:
    """Encode a PIL image or an array (uint8 RGB or grey; uint16 grey or RGB, PNG only) as `fmt`.

    JPEG and WEBP at `quality`; `save` goes to PIL's save (e.g. progressive=True, exif=...)."""
    fmt = fmt.upper()
    if isinstance(img, np.ndarray) and img.dtype == np.uint16 and img.ndim == 3:
        if fmt != "PNG":
            raise ValueError(f"16-bit RGB only as PNG, not {fmt}")
        import cv2  # PIL cannot write 48-bit PNGs

        ok, buf = cv2.imencode(".png", np.ascontiguousarray(img[:, :, ::-1]))
        assert ok
        return buf.tobytes()
    pil = Image.fromarray(img) if isinstance(img, np.ndarray) else img
    if fmt in ("JPEG", "WEBP"):
        save.setdefault("quality", quality)
    buf = io.BytesIO()
    pil.save(buf, fmt, **save)
    return buf.getvalue()


def write(path: Path, img: np.ndarray | Image.Image, fmt: str | None = None, **kw: object) -> Path:
    """Write `encode(img, fmt, **kw)` to path; fmt defaults to the suffix's format (any case)."""
    path = Path(path)
    if fmt is None:
        if path.suffix.lower() not in FORMATS:
            raise ValueError(f"no image format for the suffix of {path}: give fmt")
        fmt = FORMATS[path.suffix.lower()]
    path.write_bytes(encode(img, fmt, **kw))
    return path


def make_images(d: Path, n: int, seed: int = 0, sizes: Sequence[tuple[int, int]] = SIZES) -> list[Path]:
    """n photos in d (img_000.jpg ..., every fifth a PNG), sizes cycling through `sizes`; their paths.

    Image i is photo(w, h, (seed, i)): distinct across i and across seeds."""
    d.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        out.append(write(d / (f"img_{i:03d}.png" if i % 5 == 4 else f"img_{i:03d}.jpg"), photo(w, h, (seed, i))))
    return out


def mode_images(w: int = 317, h: int = 243, seed: int = 0) -> dict[str, bytes]:
    """Encoded files of photo(w, h, seed), one per case, name -> bytes; `Image.open(...).mode` is the case's mode.

    Covers 1, L, LA, P, P+transparency (PNG and GIF), RGB, RGBA, CMYK (JPEG and TIFF), YCbCr, LAB,
    I;16, I (0..255 values, 16-bit values, 32-bit signed values), F and 16-bit-per-channel RGB.
    """
    rgb = photo(w, h, seed)
    pil = Image.fromarray(rgb)
    grey = np.asarray(pil.convert("L"))
    rng = np.random.default_rng((seed, 1))  # the low bits of the deep images
    out: dict[str, bytes] = {}
    out["1 (PNG)"] = encode(pil.convert("1"), "PNG")
    out["L (PNG)"] = encode(pil.convert("L"), "PNG")
    out["LA (PNG)"] = encode(photo_image(w, h, seed, "LA"), "PNG")
    pal = pil.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    out["P (PNG)"] = encode(pal, "PNG")
    out["P (GIF)"] = encode(pal, "GIF")
    common = int(np.bincount(np.asarray(pal).ravel()).argmax())  # the most used colour becomes transparent
    out["P+transparency (PNG)"] = encode(pal, "PNG", transparency=common)
    out["P+transparency (GIF)"] = encode(pal, "GIF", transparency=common)
    out["RGB (JPEG)"] = encode(pil, "JPEG")
    out["RGB (PNG)"] = encode(pil, "PNG")
    out["RGBA (PNG)"] = encode(photo_image(w, h, seed, "RGBA"), "PNG")
    cmyk = pil.convert("CMYK")
    out["CMYK (JPEG)"] = encode(cmyk, "JPEG")
    out["CMYK (TIFF)"] = encode(cmyk, "TIFF")
    out["YCbCr (TIFF)"] = encode(pil.convert("YCbCr"), "TIFF")
    lab = np.stack([grey, np.clip(128 + (rgb[:, :, 0].astype(int) - rgb[:, :, 1]) // 2, 0, 255),
                    np.clip(128 + (rgb[:, :, 1].astype(int) - rgb[:, :, 2]) // 2, 0, 255)], axis=2)
    out["LAB (TIFF)"] = encode(Image.fromarray(lab.astype(np.uint8), "LAB"), "TIFF")
    g16 = (grey.astype(np.int64) * 257 + rng.integers(0, 257, grey.shape)).clip(0, 65535)
    out["I;16 (PNG)"] = encode(g16.astype(np.uint16), "PNG")
    out["I 0..255 (TIFF)"] = encode(Image.fromarray(grey.astype(np.int32), "I"), "TIFF")
    out["I 16-bit values (TIFF)"] = encode(Image.fromarray(g16.astype(np.int32), "I"), "TIFF")
    g32 = grey.astype(np.int64) * 8421504 - 2**27  # 0..255 spread over the signed 32-bit range, some < 0
    out["I 32-bit values (TIFF)"] = encode(Image.fromarray(g32.clip(-2**31, 2**31 - 1).astype(np.int32), "I"), "TIFF")
    out["F (TIFF)"] = encode(Image.fromarray(grey.astype(np.float32) + rng.random(grey.shape, np.float32), "F"), "TIFF")
    out["RGB 16-bit (PNG)"] = encode(rgb.astype(np.uint16) * 257 + rng.integers(0, 257, rgb.shape).astype(np.uint16), "PNG")
    return out


def add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    """One member of a tar (a webdataset shard)."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def write_shard(path: Path, images: list[Path], extra=()) -> list[str]:
    """A webdataset shard like img2dataset's: KEY.jpg + KEY.txt + KEY.json per image, plus `extra`
    (name, bytes) members appended. Returns the sample keys in order."""
    keys = []
    with tarfile.open(path, "w") as tf:
        for i, img in enumerate(images):
            key = f"{i:09d}"
            keys.append(key)
            add_member(tf, f"{key}{img.suffix}", img.read_bytes())
            add_member(tf, f"{key}.txt", f"caption {i}".encode())
            add_member(tf, f"{key}.json", json.dumps({"key": key, "url": f"http://x/{i}", "i": i}).encode())
        for name, data in extra:
            add_member(tf, name, data)
    return keys
