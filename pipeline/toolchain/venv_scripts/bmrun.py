"""Runs INSIDE the TPU-MLIR Python 3.10 venv (numpy 1.x): serve forwards of one bmodel on the
BM1684X simulator (cmodel) through pyruntime_bm. Started by pipeline.toolchain.runner.

    <venv>/bin/python bmrun.py BMODEL

Protocol on stdin/stdout, frames of 8-byte little-endian length + payload:
  child -> parent: JSON hello {"ok", "networks", "nets": {name: {"inputs", "outputs"}}}
  parent -> child: JSON {"op": "forward", "net": name}, then an .npz frame (in0, in1, ...)
  child -> parent: JSON {"ok": true, "seconds", "shapes"} then .npz (out0, ...), or {"ok": false, "error"}
  parent -> child: JSON {"op": "close"}
The runtime prints to fd 1, so the protocol uses a private dup of fd 1 and fd 1 goes to stderr.

How pyruntime_bm is used (what a simulator device worker needs):
  * sys.path gets <site-packages>/tpu_mlir/python; ``Model(path, 0, "")`` loads (a missing file
    aborts the process: check first); ``.networks`` lists graph names; ``.Net(name)``.
  * ``net.inputs`` / ``net.outputs``: tensors with ``.name``, ``.dtype`` and a writable ``.data``
    numpy view, sized by the FIRST stage of a multi-stage bmodel (combine largest batch first).
  * Full static shape: ``inp.data[...] = x; net.forward()``. Another stage (smaller batch): write
    the flat prefix of ``.data`` and ``net.forward_dynamic([list(x.shape)])``, which returns the
    output shapes; read the flat prefix of each output's ``.data``.
  * Output names differ from the ONNX ones (``embedding_MatMul_f32``): go by position. Copy outputs
    out before the next forward (the views are reused).
"""
import io
import json
import os
import struct
import sys
import time
import traceback


def main() -> int:
    proto_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # runtime chatter -> stderr
    proto_in = sys.stdin.buffer

    def send(payload: bytes):
        proto_out.write(struct.pack("<Q", len(payload)))
        proto_out.write(payload)
        proto_out.flush()

    def send_json(obj):
        send(json.dumps(obj).encode())

    def recv() -> bytes:
        head = proto_in.read(8)
        if len(head) < 8:
            raise EOFError
        (n,) = struct.unpack("<Q", head)
        data = proto_in.read(n)
        if len(data) < n:
            raise EOFError
        return data

    bmodel = sys.argv[1]
    import importlib.util

    spec = importlib.util.find_spec("tpu_mlir")
    sys.path.insert(0, os.path.join(list(spec.submodule_search_locations)[0], "python"))
    import numpy as np

    if int(np.__version__.split(".")[0]) >= 2:
        send_json({"ok": False, "error": f"numpy {np.__version__} in the venv: pyruntime_bm needs numpy<2"})
        return 2
    if not os.path.isfile(bmodel):  # Model() would abort the process
        send_json({"ok": False, "error": f"bmodel not found: {bmodel}"})
        return 2
    import pyruntime_bm

    model = pyruntime_bm.Model(bmodel, 0, "")
    nets = {}
    desc = {}
    for name in model.networks:
        net = model.Net(name)
        nets[name] = net
        desc[name] = {
            "inputs": [{"name": t.name, "dtype": str(t.data.dtype), "shape": list(t.data.shape)}
                       for t in net.inputs],
            "outputs": [{"name": t.name, "dtype": str(t.data.dtype), "shape": list(t.data.shape)}
                        for t in net.outputs],
        }
    send_json({"ok": True, "networks": list(model.networks), "nets": desc})

    while True:
        try:
            req = json.loads(recv())
        except EOFError:
            return 0
        if req.get("op") == "close":
            return 0
        try:
            arrays = np.load(io.BytesIO(recv()))
            net = nets[req.get("net") or model.networks[0]]
            xs = [arrays[f"in{k}"] for k in range(len(net.inputs))]
            full = True
            for t, x in zip(net.inputs, xs):
                if x.size > t.data.size:
                    raise ValueError(f"input {t.name}: {x.shape} larger than the bmodel's {t.data.shape}")
                full = full and tuple(x.shape) == tuple(t.data.shape)
            t0 = time.perf_counter()
            if full:
                for t, x in zip(net.inputs, xs):
                    t.data[...] = x.astype(t.data.dtype, copy=False)
                net.forward()
                shapes = [list(t.data.shape) for t in net.outputs]
            else:
                for t, x in zip(net.inputs, xs):
                    t.data.reshape(-1)[: x.size] = x.astype(t.data.dtype, copy=False).reshape(-1)
                shapes = [list(s) for s in net.forward_dynamic([list(x.shape) for x in xs])]
            secs = time.perf_counter() - t0
            outs = {}
            for k, (t, s) in enumerate(zip(net.outputs, shapes)):
                n = int(np.prod(s))
                outs[f"out{k}"] = np.array(t.data.reshape(-1)[:n]).reshape(s)
            buf = io.BytesIO()
            np.savez(buf, **outs)
            send_json({"ok": True, "seconds": secs, "shapes": shapes})
            send(buf.getvalue())
        except Exception as e:  # report, keep serving
            send_json({"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()})


if __name__ == "__main__":
    sys.exit(main())
