"""Decode stage (stages/decode.py): DecodeCore on groups and single items, and the ready crops
of the fake and cpu backends (fake.ready_crops). The decoders themselves are tested in tests/data/test_images.py and tests/data/test_images_bad_inputs.py."""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import SAMPLES, worker_spec

from pipeline.backends.base import ready_crop
from stages.decode import DecodeCore


def test_decode_group_keeps_per_item_failures_and_ids(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    good = [os.fsencode(SAMPLES / f"sample_0{i}.jpg") for i in (0, 1)]
    core = DecodeCore(worker_spec("decode", {"preprocess": {"mode": "fast"}}))
    core.setup()
    out = core.handle({"t": "items", "ids": [7, 8, 9], "paths": [good[0], os.fsencode(bad), good[1]]}, [])
    fails = [h for t, h, _ in out if h["t"] == "fail"]
    pxs = [(h, b) for t, h, b in out if h["t"] == "pxs"]
    assert [(f["id"], f["reason"]) for f in fails] == [(8, "not_an_image")]
    assert len(pxs) == 1 and pxs[0][0]["ids"] == [7, 9] and pxs[0][0]["paths"] == [good[0], good[1]]
    assert pxs[0][1][0].shape == (2, 224, 224, 3) and pxs[0][1][0].dtype == np.uint8
    # one item per message (re-issued ids) still works
    single = core.handle({"t": "item", "id": 3, "path": good[0]}, [])
    assert [h["t"] for _, h, _ in single] == ["px"] and single[0][1]["id"] == 3


@pytest.mark.parametrize("backend", ["fake", "cpu"])  # cpu: the bench's "decode -> ready crops" case
def test_ready_crops_skip_the_files(backend):
    core = DecodeCore(worker_spec("decode", {"infer": {"backend": backend}, "fake": {"ready_crops": True}}))
    out = core.handle({"t": "items", "ids": [0, 1], "paths": [b"/does/not/exist.jpg", b"/nor/this.jpg"]}, [])
    (_, h, (px,)), = out
    assert h["t"] == "pxs" and h["ids"] == [0, 1] and px.shape == (2, 224, 224, 3)
    assert np.array_equal(px[1], ready_crop())
