"""Reference preprocessing equals CLIP's for every image mode PIL opens (README: "Preprocessing fidelity").

The comparison is with tests/clip_reference.py, an independent PIL re-implementation of OpenAI
CLIP's torchvision transform, and with torchvision itself where it is installed. The images of every
mode come from tests/imagegen.py (1, L, LA, P, P+transparency, RGB, RGBA, CMYK, YCbCr, LAB, I;16, I, F,
16-bit RGB), at a size that is shrunk and one that is enlarged.
"""

from __future__ import annotations

import io

import clip_reference as ref
import numpy as np
import pytest
from imagegen import encode, mode_images, photo_image
from PIL import Image

from pipeline.data.images import DecodeOptions, crop, decode_bytes, fast_crop, normalize, reference_crop

TOL = 1e-6  # after normalisation; one 8-bit level is ~0.015
SIZES = {"317x243": (317, 243), "61x97": (61, 97)}
IMAGES = {(size, name): data for size, (w, h) in SIZES.items() for name, data in mode_images(w, h).items()}
DEEP = {"I;16 (PNG)", "I 16-bit values (TIFF)", "I 32-bit values (TIFF)"}  # the README's documented rule


def project(data: bytes, mode: str = "reference") -> np.ndarray:
    """decode -> crop, as the decode(+preprocess) workers do it: uint8 [224,224,3]."""
    return crop(decode_bytes(data, DecodeOptions(mode=mode)), mode)


def opened(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def test_every_mode_is_generated():
    modes = {opened(d).mode for d in IMAGES.values()}
    assert {"1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "I;16", "I", "F"} <= modes
    assert any("transparency" in opened(d).info for d in IMAGES.values())


@pytest.mark.parametrize("key", sorted(IMAGES), ids=lambda k: f"{k[1]}@{k[0]}")
def test_reference_equals_clip(key):
    data = IMAGES[key]
    ours = normalize(project(data)[None])[0]
    if key[1] in DEEP:
        theirs = ref.to_tensor_normalize(ref.documented_crop_u8(opened(data)))
    else:
        theirs = ref.clip_transform(opened(data))
    assert ours.shape == theirs.shape == (3, 224, 224)
    assert np.abs(ours - theirs).max() <= TOL


@pytest.mark.parametrize("name", sorted(DEEP))
def test_deep_integer_rule_is_a_real_deviation(name):
    """Where the documented rule applies, CLIP's own output is (nearly) white: the rule is needed."""
    data = IMAGES[("317x243", name)]
    clip = ref.clip_crop_u8(opened(data))
    ours = project(data)
    assert (clip == 255).mean() > 0.9
    assert (ours == 255).mean() < 0.1 and ours.std() > 20  # a picture, not a white page


def test_i_image_with_8bit_values_is_kept_as_is():
    data = IMAGES[("317x243", "I 0..255 (TIFF)")]
    grey = np.asarray(opened(IMAGES[("317x243", "L (PNG)")]))
    assert np.array_equal(np.asarray(opened(data)), grey)  # the same picture in a 32-bit container
    # PIL resamples I in 32-bit arithmetic, L in 8-bit: the same picture to within rounding
    diff = np.abs(project(data).astype(np.int16) - project(IMAGES[("317x243", "L (PNG)")]))
    assert diff.max() <= 2 and diff.mean() < 0.5


def test_palette_transparency_keeps_the_palette_colour():
    """CLIP resizes P with NEAREST and converts to RGB: transparent pixels keep their colour."""
    data = IMAGES[("317x243", "P+transparency (PNG)")]
    assert np.array_equal(project(data), project(IMAGES[("317x243", "P (PNG)")]))


@pytest.mark.parametrize("name", ["RGBA (PNG)", "LA (PNG)"])
def test_fast_mode_handles_alpha_like_the_reference_order(name):
    """PIL resizes RGBA/LA premultiplied and drops alpha afterwards; fast mode does the same."""
    data = IMAGES[("317x243", name)]
    clip = ref.clip_crop_u8(opened(data)).astype(np.int16)
    fast = project(data, "fast").astype(np.int16)
    dropped_first = np.asarray(opened(data).convert("RGB"))  # the old order: alpha dropped before resizing
    old = fast_crop(dropped_first).astype(np.int16)
    assert np.abs(old - clip).mean() > 10  # the test image has transparent areas that matter
    assert np.abs(fast - clip).mean() < 2.0


@pytest.mark.parametrize("name", ["1 (PNG)", "P (PNG)", "P+transparency (GIF)", "CMYK (TIFF)", "YCbCr (TIFF)",
                                  "LAB (TIFF)", "F (TIFF)", "I;16 (PNG)", "I 0..255 (TIFF)"])
def test_fast_mode_uses_the_reference_crop_for_uncommon_modes(name):
    data = IMAGES[("317x243", name)]
    assert np.array_equal(project(data, "fast"), project(data, "reference"))


def test_a_finished_crop_passes_both_crops_unchanged():
    """Decode hands uncommon modes on as the finished 224x224 crop; the crop stage must keep it."""
    px = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    assert np.array_equal(reference_crop(px), px)
    assert np.array_equal(fast_crop(px), px)


@pytest.mark.parametrize("mode", ["1", "P", "I;16", "CMYK"])
def test_panorama_of_uncommon_modes(mode):
    """The crop-region path (extreme aspect ratios) also works for modes decode crops itself."""
    if mode == "I;16":
        img = Image.fromarray(np.asarray(photo_image(30000, 2, 0, "L")).astype(np.uint16) * 257)
    else:
        img = photo_image(30000, 2, 0, mode)
    out = project(encode(img, "TIFF"))
    assert out.shape == (224, 224, 3)


def test_toolchain_verify_uses_the_reference_crop(tmp_path):
    """`verify --images` feeds the simulator the same crops as `run` in reference mode."""
    from pipeline.toolchain.preprocess import load_images_u8

    names = ["RGB (JPEG)", "P+transparency (PNG)", "1 (PNG)", "CMYK (TIFF)", "I;16 (PNG)", "RGBA (PNG)"]
    ext = {"JPEG": ".jpg", "PNG": ".png", "TIFF": ".tif"}
    for i, name in enumerate(names):
        (tmp_path / f"{i:02d}{ext[name.split('(')[1].rstrip(')')]}").write_bytes(IMAGES[("61x97", name)])
    paths, u8 = load_images_u8(tmp_path)
    assert len(paths) == len(names)
    for i, name in enumerate(names):
        assert np.array_equal(u8[i].transpose(1, 2, 0), project(IMAGES[("61x97", name)])), name


@pytest.mark.parametrize("key", sorted(IMAGES), ids=lambda k: f"{k[1]}@{k[0]}")
def test_against_torchvision(key):
    """OpenAI CLIP's Compose built from torchvision itself (skipped where torchvision is absent)."""
    pytest.importorskip("torchvision")
    data = IMAGES[key]
    theirs = ref.torchvision_transform()(opened(data)).numpy()
    assert np.array_equal(theirs, ref.clip_transform(opened(data)))  # the tests' re-implementation is exact
    if key[1] not in DEEP:
        ours = normalize(project(data)[None])[0]
        assert np.abs(ours - theirs).max() <= TOL
