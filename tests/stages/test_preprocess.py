"""Preprocess stage (stages/preprocess.py, only when decode is not fused): full image -> crop.
The crops themselves are tested in tests/data/test_images.py."""

from __future__ import annotations

import numpy as np
from conftest import worker_spec

from pipeline.data.images import reference_crop
from pipeline.wire import messages
from pipeline.wire.transport import array_from
from stages.preprocess import PreprocessCore


def test_preprocess_core_sends_the_reference_crop_or_a_failure():
    core = PreprocessCore(worker_spec("preprocess", {"workers": {"fuse_decode_preprocess": False}}))
    core.setup()
    img = np.random.default_rng(0).integers(0, 256, (300, 260, 3), dtype=np.uint8)
    header, bufs = messages.image("img", 4, b"/x.jpg", img)
    ((target, h, (crop,)),) = core.handle(header, [memoryview(bufs[0])])
    assert target == "next" and h["t"] == "px" and h["id"] == 4
    assert np.array_equal(array_from(h, memoryview(crop)), reference_crop(img))
    bad = {**header, "shape": [300, 260, 2]}  # 2 channels: no such image mode
    ((target, h, _),) = core.handle(bad, [memoryview(np.zeros((300, 260, 2), np.uint8))])
    assert (target, h["t"], h["id"], h["reason"], h["stage"]) == ("sink", "fail", 4, "corrupt", "preprocess")
