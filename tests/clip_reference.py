"""The tests' own CLIP preprocessing, independent of the project's code.

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
scripts/measure_preprocess.py imports it to publish the same comparisons. The images of every
mode it is checked on are `imagegen.mode_images`.
"""

from __future__ import annotations

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
