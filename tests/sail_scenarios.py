"""SAIL call sequences run the same way against the fake and against real SAIL on the cmodel.

    python tests/sail_scenarios.py SCENARIO ARGS.json     # prints one JSON line: the result

`tests/backends/test_sail_differential.py` runs each scenario twice, in a fresh process each time (what
aborts must not take pytest with it): under this interpreter with tests/fake_sail on PYTHONPATH
(the fake), and under the TPU-MLIR venv's Python 3.10 with real SAIL built by
scripts/setup_sail_cmodel.sh (the cmodel). It then asserts the same results or the same failure.
Keep this file Python-3.10-compatible and free of anything the cmodel build lacks: there is no
`sail.Decoder` and no `Bmcv.mat_to_bm_image` there (no JPU model, no OpenCV), so images reach the
device the way the backend uploads CPU-decoded pixels: `sail.Tensor` -> `Bmcv.tensor_to_bm_image`.

Each scenario takes the args dict (paths of the bmodel and images) and returns a JSON-able dict;
arrays go out as lists. `"bmodel"` is a fake JSON bmodel for the fake and a compiled bmodel of
the same ONNX for the cmodel.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
ALPHA_BETA = tuple(((1.0 / 255) / STD[i], -MEAN[i] / STD[i]) for i in range(3))


def _sail():
    import sophon.sail as sail

    sail.set_print_flag(False)
    return sail


def _rgb(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def upload(sail, handle, bmcv, rgb: np.ndarray):
    """CPU pixels -> BGR_PLANAR BMImage attached to a Tensor (what the backend does): (image, tensor)."""
    planar = np.ascontiguousarray(rgb[:, :, ::-1].transpose(2, 0, 1)[None])
    t = sail.Tensor(handle, planar, True, True)
    t.sync_s2d()
    return bmcv.tensor_to_bm_image(t, sail.Format.FORMAT_BGR_PLANAR), t


def _pixels(bmcv, img) -> np.ndarray:
    t = bmcv.bm_image_to_tensor(img)
    return np.asarray(t.asnumpy())


def _name(enum_value) -> str:
    """An enum member's name (pybind11 enums and the fake's IntEnums both have .name)."""
    return getattr(enum_value, "name", str(enum_value))


def _error(exc: BaseException) -> dict:
    return {"raised": type(exc).__name__}


# ----------------------------------------------------------------------------------- scenarios
def engine_numpy(a: dict) -> dict:
    """CLIP-TPU clip/clip.py encode_image: SYSIO Engine, names queried, zero-padded batch,
    numpy process, trimmed; then a batch that matches no stage (SailEngineError "bad input")."""
    sail = _sail()
    net = sail.Engine(a["bmodel"], 0, sail.IOMode.SYSIO)
    g = net.get_graph_names()[0]
    i, o = net.get_input_names(g)[0], net.get_output_names(g)[0]
    shape = list(net.get_input_shape(g, i))
    x = np.asarray(a["x"], np.float32)
    n = len(x)
    pad = np.concatenate([x, np.zeros((shape[0] - n, *x.shape[1:]), np.float32)])
    y = np.asarray(net.process(g, {i: pad})[o])[:n]
    res = {"input_shape": shape, "output_shape": list(net.get_output_shape(g, o)),
           "input_dtype": _name(net.get_input_dtype(g, i)),
           "output_dtype": _name(net.get_output_dtype(g, o)), "y": y.tolist()}
    try:
        net.process(g, {i: np.zeros([shape[0] + 1, *shape[1:]], np.float32)})
        res["bad_shape"] = "returned"
    except Exception as exc:  # noqa: BLE001
        res["bad_shape"] = type(exc).__name__
    return res


def upload_crop(a: dict) -> dict:
    """Tensor -> tensor_to_bm_image -> width/height/format, Bmcv.crop of the centre square, read
    back with bm_image_to_tensor; then crop and resize outside the VPP limits (SAIL_CHECK_RET)."""
    sail = _sail()
    h = sail.Handle(0)
    bmcv = sail.Bmcv(h)
    rgb = np.random.default_rng(0).integers(0, 256, (256, 320, 3), dtype=np.uint8)
    img, t = upload(sail, h, bmcv, rgb)
    res = {"wh": [img.width(), img.height()], "format": _name(img.format()),
           "dtype": _name(img.dtype())}
    back = _pixels(bmcv, img)
    res["upload_exact"] = bool(np.array_equal(back[0], rgb[:, :, ::-1].transpose(2, 0, 1)))
    sq = bmcv.crop(img, 32, 0, 256, 256)  # 256 px rows: a 64-byte multiple, no stride padding
    res["crop_wh"] = [sq.width(), sq.height()]
    res["crop_format"] = _name(sq.format())
    res["crop_exact"] = bool(np.array_equal(_pixels(bmcv, sq)[0], rgb[:, 32:288, ::-1].transpose(2, 0, 1)))
    # a 250-px crop: rows padded to 256 bytes (64-byte stride); bm_image_to_tensor ignores the
    # padding (zero-copy), so the read-back is sheared unless the stride equals the width
    odd = bmcv.crop(img, 10, 3, 250, 250)
    res["crop250_readback_exact"] = bool(np.array_equal(_pixels(bmcv, odd)[0], rgb[3:253, 10:260, ::-1].transpose(2, 0, 1)))
    wide, tw = upload(sail, h, bmcv, np.zeros((300, 9000, 3), np.uint8))
    try:
        bmcv.crop(wide, 4350, 0, 300, 300)
        res["crop_9000"] = "returned"
    except Exception as exc:  # noqa: BLE001
        res["crop_9000"] = type(exc).__name__
    try:
        bmcv.resize(img, 224, 224, sail.bmcv_resize_algorithm.BMCV_INTER_BICUBIC)
        res["resize_bicubic"] = "returned"
    except Exception as exc:  # noqa: BLE001
        res["resize_bicubic"] = type(exc).__name__
    return res


def quantise(a: dict) -> dict:
    """SAIL's float32 -> int8/uint8 quantisation (AnyScale_SSE, the numpy Engine.process's
    scale_input_tensor path) through Tensor.scale_from: ties, saturation, and the scalar tail."""
    sail = _sail()
    h = sail.Handle(0)
    x = np.asarray(a["x"], np.float32)
    out = {}
    for name, dt in (("int8", sail.Dtype.BM_INT8), ("uint8", sail.Dtype.BM_UINT8)):
        t = sail.Tensor(h, [len(x)], dt, True, False)
        t.scale_from(x, float(a["scale"]))
        out[name] = np.asarray(t.asnumpy()).astype(int).tolist()
    return out


def _epp(sail, a: dict, resize: str = "BM_RESIZE_TPU_LINEAR"):
    epp = sail.EngineImagePreProcess(a["bmodel"], 0, False)
    batch = epp.get_output_shape(epp.get_output_names()[0])[0]
    epp.InitImagePreProcess(getattr(sail.sail_resize_type, resize), True, batch, batch)
    epp.SetConvertAtrr(ALPHA_BETA)
    return epp, batch


def _centre(bmcv, img):
    w, h = img.width(), img.height()
    s = min(w, h)
    return img if w == h else bmcv.crop(img, (w - s) // 2, (h - s) // 2, s, s)


def epp_batch(a: dict) -> dict:
    """CLIP-TPU clip/clip_multi.py with CPU decode: upload, centre square, PushImage (retried while
    non-zero) of a fresh image per slot, GetBatchData_Npy; a short batch padded with fresh images."""
    sail = _sail()
    h = sail.Handle(0)
    bmcv = sail.Bmcv(h)
    epp, batch = _epp(sail, a, a.get("resize", "BM_RESIZE_TPU_LINEAR"))
    keep, moved = [], []
    paths = a["images"]
    for k in range(batch):
        if k < len(paths):
            img, t = upload(sail, h, bmcv, _rgb(paths[k]))
            idx = k
        else:  # padding: a fresh grey image, never one pushed before
            img, t = upload(sail, h, bmcv, np.full((224, 224, 3), 128, np.uint8))
            idx = -1 - (k - len(paths))
        sq = _centre(bmcv, img)
        keep += [img, t, sq]
        while epp.PushImage(0, idx, sq) != 0:
            time.sleep(0.01)
        moved.append(sq.width())  # PushImage moved the image; its width field stays
    outs, _ost, chans, idxs, _pads = epp.GetBatchData_Npy()
    y = np.asarray(outs[epp.get_output_names()[0]])
    return {"idxs": list(idxs), "channels": list(chans), "y": y.tolist(), "moved_widths": moved}


def epp_push_twice(a: dict) -> dict:
    """One BMImage pushed into every slot of a batch: PushImage moved it at the first push, the
    others queue an empty image, and the preprocess thread's throw ends the process (SIGABRT)."""
    sail = _sail()
    h = sail.Handle(0)
    bmcv = sail.Bmcv(h)
    epp, batch = _epp(sail, a)
    img, t = upload(sail, h, bmcv, np.full((224, 224, 3), 90, np.uint8))
    for k in range(batch):
        while epp.PushImage(0, k, img) != 0:
            time.sleep(0.01)
    epp.GetBatchData_Npy()
    return {"survived": True}


def backend(a: dict) -> dict:
    """The sail backend's own device classes (every SAIL call it makes): device mode on files and
    host mode on CLIP crops, with a config like configs/bm1684x.toml's [sail] section."""
    from pipeline.backends.sail import SailBackend
    from pipeline.config import from_dict

    cfg = from_dict({"model": {"path": a["bmodel"]}, "infer": {"backend": "sail", "devices": [0]},
                     "sail": {"mode": a["mode"], "runtime": a["runtime"]}})
    dev = SailBackend.open_device(cfg, "sail:0")
    res = {"batch_size": dev.batch_size, "dim": dev.dim}
    if a["mode"] == "device":
        paths = [os.fsencode(p) for p in a["images"]]
        r = dev.embed_files(list(range(len(paths))), paths)
        res.update(ids=r.ids, y=np.asarray(r.embeddings).tolist(),
                   failures=[[f.id, f.reason] for f in r.failures])
    else:
        crops = np.load(a["crops"])
        res["y"] = np.asarray(dev.embed(crops)).tolist()
    dev.close()
    return res


SCENARIOS = {f.__name__: f for f in (engine_numpy, upload_crop, quantise, epp_batch, epp_push_twice, backend)}


if __name__ == "__main__":
    scenario, args_path = sys.argv[1], sys.argv[2]
    result_fd = os.dup(1)  # the backend points fd 1 at /dev/null on the cmodel (its start-up noise)
    with open(args_path, encoding="utf-8") as fh:
        args = json.load(fh)
    try:
        result = SCENARIOS[scenario](args)
    except Exception as exc:  # noqa: BLE001 - the failure is the result
        result = _error(exc)
    sys.stdout.flush()
    with os.fdopen(result_fd, "w") as out:
        out.write("RESULT " + json.dumps(result) + "\n")
    os._exit(0)  # skip interpreter teardown: SAIL's threads may still hold the handle
