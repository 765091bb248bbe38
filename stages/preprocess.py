"""Preprocess stage: decoded image -> 224x224x3 uint8 RGB centre crop; batch normalisation.

Two named modes (config key preprocess.mode):
  * reference — CLIP's own transform exactly: Resize(224, BICUBIC) of the shorter side with PIL,
    CenterCrop(224) with torchvision's rounding, convert("RGB"). The crop stays uint8 (PIL's
    resize output is uint8 too), so shipping uint8 and normalising later is exact.
  * fast — the decoder already shrank JPEGs by a power of two in the DCT domain; OpenCV INTER_AREA
    resize of the shorter side, same crop. Its measured difference from reference is in the README.
Normalisation ((x/255 - mean)/std, HWC -> CHW) happens per batch in the infer stage, or is folded
into a uint8-input model.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from pipeline.config import CLIP_MEAN, CLIP_STD
from pipeline.worker import StageCore

SIZE = 224
_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
# Above this many resized pixels (150 MB as RGB) only the crop region is resampled; see reference_crop.
PANORAMA_PIXELS = 50_000_000


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


def reference_crop(img: np.ndarray, size: int = SIZE) -> np.ndarray:
    """CLIP's transform on an HxWxC uint8 array (C = 1, 3, 4) -> [size,size,3] uint8 RGB."""
    pil = Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img, _MODES[img.shape[2]])
    w, h = pil.size
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
        pil = pil.resize((size, size), Image.Resampling.BICUBIC, box=box)
    else:
        pil = pil.resize((nw, nh), Image.Resampling.BICUBIC).crop((left, top, right, bottom))
    return np.asarray(pil.convert("RGB"))


def fast_crop(img: np.ndarray, size: int = SIZE) -> np.ndarray:
    """Area-resize the shorter side to `size` with OpenCV and centre-crop -> [size,size,3] uint8."""
    import cv2

    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    elif img.shape[2] == 4:
        img = img[:, :, :3]
    h, w = img.shape[:2]
    nw, nh = resized_size(w, h, size)
    interp = cv2.INTER_AREA if nw <= w else cv2.INTER_CUBIC
    out = cv2.resize(np.ascontiguousarray(img), (nw, nh), interpolation=interp)
    left, top, right, bottom = crop_box(nw, nh, size)
    return np.ascontiguousarray(out[top:bottom, left:right])


def crop(img: np.ndarray, mode: str) -> np.ndarray:
    return reference_crop(img) if mode == "reference" else fast_crop(img)


_SCALE = (1.0 / (255.0 * np.asarray(CLIP_STD, dtype=np.float32))).astype(np.float32)
_SHIFT = (-np.asarray(CLIP_MEAN, dtype=np.float32) / np.asarray(CLIP_STD, dtype=np.float32)).astype(np.float32)


def normalize(pixels: np.ndarray) -> np.ndarray:
    """uint8 RGB [n,H,W,3] -> float32 [n,3,H,W], CLIP-normalised ((x/255 - mean) / std)."""
    x = pixels.astype(np.float32).transpose(0, 3, 1, 2)
    out = np.empty(x.shape, dtype=np.float32)
    for c in range(3):
        np.multiply(x[:, c], _SCALE[c], out=out[:, c])
        out[:, c] += _SHIFT[c]
    return out


class PreprocessCore(StageCore):
    """Preprocess worker (when not fused with decode): decoded image -> 224x224 uint8 crop."""

    def __init__(self, spec):
        self.mode = spec.cfg.preprocess.mode
        self.info: dict = {}

    def setup(self) -> None:
        import cv2

        cv2.setNumThreads(1)

    def handle(self, header: dict, frames: list):
        from pipeline.transport import array_from
        from stages.decode import failure, image_message

        try:
            out = crop(array_from(header, frames[0]), self.mode)
        except Exception as exc:  # noqa: BLE001 - one bad image never stops the run
            return [failure(header["id"], header["path"], "corrupt",
                            f"preprocess: {type(exc).__name__}: {exc}", "preprocess")]
        return [image_message("px", header, out)]
