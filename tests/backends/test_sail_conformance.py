"""Conformance: the seed program's own SAIL call sequences, replayed against the fake.

The seed program (wangyifan2018/CLIP-TPU, HEAD 102a096) embeds images on a BM1684X two ways:

* ``embeddings_bmcv.py`` -> ``clip/clip_multi.py`` ``CLIP_Multi``: hardware decode
  (``sail.Decoder(path, True, dev).read(handle)``), ``center_crop_bmcv`` (``bmcv.crop`` of the
  aspect-matched centre window), ``EngineImagePreProcess`` (``InitImagePreProcess(
  BM_RESIZE_TPU_LINEAR, True, q, q)`` at HEAD, ``SetConvertAtrr`` with (1/255)/std, -mean/std),
  ``PushImage`` retried every 10 ms while non-zero, ``GetBatchData_Npy`` once per batch in another
  thread, the file list padded to a whole batch with its first image;
* ``embeddings.py`` -> ``clip/clip.py`` ``CLIP.encode_image``: ``sail.Engine(model, dev, SYSIO)``,
  names queried, each batch zero-padded to the bmodel's batch, ``Engine.process`` with numpy,
  the output trimmed to the real rows.

``seed_clip_multi`` / ``seed_encode_image`` below transcribe those call sequences (threads, retry
loop and padding included; torch replaced by numpy, the text tower left out). Run against the fake,
they must work, and must give what our backend gives: if the fake grows a behaviour that would
break the seed's real-hardware sequence, or drifts from it, this fails. Commit 77003ce's BICUBIC
version of the same sequence must die, as it would on a BM1684X.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
from imagegen import photo, write
from sail_helpers import FAKE_SAIL_DIR, use_fake_sail, write_fake_bmodel

from pipeline.config import from_dict

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def seed_clip_multi(sail, image_model: str, image_name_list: list[str], max_que_size: int = 128, dev_id: int = 0,
                    resize_name: str = "BM_RESIZE_TPU_LINEAR"):
    """CLIP_Multi.__init__ (image part) + encode_image, as in clip/clip_multi.py."""
    image_name_list = list(image_name_list)
    alpha_beta = [((1.0 / 255) / STD[i], -MEAN[i] / STD[i]) for i in range(3)]
    epp = sail.EngineImagePreProcess(image_model, dev_id, False)
    epp.InitImagePreProcess(getattr(sail.sail_resize_type, resize_name), True, max_que_size, max_que_size)
    epp.SetConvertAtrr(alpha_beta)
    net_w, net_h = epp.get_input_width(), epp.get_input_height()
    output_name = epp.get_output_names()[0]
    output_shape = epp.get_output_shape(output_name)
    batch_size = output_shape[0]
    if len(image_name_list) % batch_size != 0:
        for _ in range(batch_size - len(image_name_list) % batch_size):
            image_name_list.append(image_name_list[0])
    run_count = len(image_name_list) // batch_size
    post: list = []
    img_path_list, embedding_list = [], []

    def center_crop_bmcv(bmcv, bmimg):
        img_w, img_h = bmimg.width(), bmimg.height()
        target = net_w / net_h
        if img_w / img_h > target:
            crop_w, crop_h = int(img_h * target), img_h
        else:
            crop_w, crop_h = img_w, int(img_w / target)
        return bmcv.crop(bmimg, (img_w - crop_w) // 2, (img_h - crop_h) // 2, crop_w, crop_h)

    def decoder_and_pushdata():
        handle = sail.Handle(dev_id)
        bmcv = sail.Bmcv(handle)
        for image_index, image_name in enumerate(image_name_list):
            decoder = sail.Decoder(image_name, True, dev_id)
            bmimg = decoder.read(handle)
            cropped_img = center_crop_bmcv(bmcv, bmimg)
            while epp.PushImage(0, image_index, cropped_img) != 0:
                time.sleep(0.01)

    def inferences_thread():
        for _ in range(run_count):
            output_tensor_map, _ost, _ch, imageidx_list, _pad = epp.GetBatchData_Npy()
            post.append((output_tensor_map, imageidx_list))

    threads = [threading.Thread(target=decoder_and_pushdata), threading.Thread(target=inferences_thread)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
        assert not t.is_alive(), "the seed's sequence hung on the fake"
    for output_tensor_map, imageidxs in post:  # post_process
        features = output_tensor_map[output_name]
        features /= np.linalg.norm(features, axis=-1, keepdims=True)
        embedding_list.extend(features)
        img_path_list.extend([image_name_list[idx] for idx in imageidxs])
    return img_path_list, np.stack(embedding_list)


def seed_encode_image(sail, image_model: str, image: np.ndarray, dev_id: int = 0) -> np.ndarray:
    """CLIP.__init__ (image part) + encode_image, as in clip/clip.py (float NCHW, CLIP-normalised)."""
    net = sail.Engine(image_model, dev_id, sail.IOMode.SYSIO)
    g = net.get_graph_names()[0]
    in_name = net.get_input_names(g)[0]
    out_name = net.get_output_names(g)[0]
    bs = net.get_input_shape(g, in_name)[0]
    n = image.shape[0]
    outs = []
    for start in range(0, n, bs):
        sl = image[start:start + bs]
        if sl.shape[0] < bs:
            sl = np.concatenate([sl, np.zeros((bs - sl.shape[0], *sl.shape[1:]), sl.dtype)])
        outs.append(net.process(g, {in_name: sl})[out_name])
    return np.concatenate(outs)[:n]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from pipeline.model.modelgen import build_clip_image_onnx

    d = tmp_path_factory.mktemp("seed")
    onnx_path = d / "tiny.onnx"
    build_clip_image_onnx(onnx_path, arch="tiny", seed=0, input_kind="float")
    imgs = d / "imgs"
    imgs.mkdir()
    files = [write(imgs / f"p{i:02d}.jpg", photo(220 + 41 * i, 400 - 19 * i, 200 + i)) for i in range(10)]
    return d, onnx_path, files


def ours(cfg_mode, bm, files, **sail):
    from pipeline.backends.sail import SailBackend

    cfg = from_dict({"model": {"path": str(bm)}, "infer": {"backend": "sail", "devices": [0]},
                     "sail": {"mode": cfg_mode, **sail}})
    return SailBackend.open_device(cfg, "sail:0")


def test_seed_bmcv_sequence_runs_on_the_fake_and_matches_device_mode(setup, monkeypatch):
    d, onnx_path, files = setup
    use_fake_sail(monkeypatch)
    from sophon import sail

    bm = write_fake_bmodel(d / "b4.bmodel", onnx_path, [4])
    paths, emb = seed_clip_multi(sail, str(bm), [str(f) for f in files])
    # 10 files padded to 12 with the first one, rows in push order
    assert paths == [str(f) for f in files] + [str(files[0])] * 2 and emb.shape == (12, 512)
    dev = ours("device", bm, files)
    res = dev.embed_files(list(range(10)), [os.fsencode(f) for f in files])
    mine = res.embeddings / np.linalg.norm(res.embeddings, axis=1, keepdims=True)
    # the same calls (decode, centre square, linear EPP resize, alpha/beta): the same numbers
    np.testing.assert_allclose(mine, emb[:10], atol=1e-5)
    np.testing.assert_allclose(emb[10], emb[0], atol=1e-6)


def test_seed_engine_process_sequence_runs_on_the_fake_and_matches_host_mode(setup, monkeypatch):
    from pipeline.data.images import DecodeOptions, decode_file, normalize, reference_crop

    d, onnx_path, files = setup
    use_fake_sail(monkeypatch)
    from sophon import sail

    bm = write_fake_bmodel(d / "b8.bmodel", onnx_path, [8])
    crops = np.stack([reference_crop(decode_file(os.fsencode(f), DecodeOptions())) for f in files])
    seed = seed_encode_image(sail, str(bm), normalize(crops))  # 10 = 8 + 2 zero-padded to 8
    assert seed.shape == (10, 512)
    np.testing.assert_allclose(ours("host", bm, files).embed(crops), seed, atol=1e-5)


def test_seed_bicubic_version_dies_on_the_fake(setup):
    """CLIP-TPU commit 77003ce (BM_RESIZE_TPU_BICUBIC, reverted 3 h later by bf945aa): the same
    sequence aborts the process in EngineImagePreProcess's resize thread, as on a BM1684X."""
    d, onnx_path, files = setup
    bm = write_fake_bmodel(d / "b4c.bmodel", onnx_path, [4])
    code = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{os.path.dirname(os.path.abspath(__file__))!r}, {os.path.join(ROOT, 'tests')!r}]
        import sophon.sail as sail
        from test_sail_conformance import seed_clip_multi
        seed_clip_multi(sail, {str(bm)!r}, {[str(f) for f in files[:4]]!r}, resize_name="BM_RESIZE_TPU_BICUBIC")
        print("SURVIVED")
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([FAKE_SAIL_DIR, ROOT]), FAKE_SAIL_TPUS="1")
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == -signal.SIGABRT, (p.returncode, p.stderr[-2000:])
    assert "SURVIVED" not in p.stdout and "bmcv api fail" in p.stderr
