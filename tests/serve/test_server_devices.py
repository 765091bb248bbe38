"""Image queries on runs whose device the service cannot open in its own process: a device that
decodes files itself (sail's device mode, on the fake sophon.sail here and on real SAIL on the
BM1684X cmodel in the slow test) and devices under another interpreter (the sim backend and sail on
the cmodel, slow; in the default suite the fake backend told to run under one). Each query goes
through a persistent child with the run's device open (pipeline/serve/querychild.py): a photo of
the run comes back first, with similarity ~1."""

from __future__ import annotations

import base64
import shutil
import sys

import pytest
from imagegen import make_images
from sail_helpers import use_fake_sail, write_fake_bmodel
from serve_helpers import call, require_web

from pipeline.config import from_dict
from pipeline.output import load_embeddings

require_web()

from pipeline.serve.app import Settings  # noqa: E402
from pipeline.serve.querychild import QueryChild  # noqa: E402
from pipeline.serve.server import Service  # noqa: E402


def make_run(out, imgs, backend: str, model, **extra) -> list[str]:
    """A run of `backend` over imgs into out; its paths, in row order."""
    from pipeline.run.supervisor import run

    cfg = {"input": {"paths": [str(imgs)]}, "output": {"dir": str(out), "shard_size": 5},
           "model": {"path": str(model)}, "infer": {"backend": backend, "devices": [0], "batch_timeout_ms": 20},
           "run": {"progress": "none", "start_timeout_s": 300, "stall_timeout_s": 300}}
    for k, v in extra.items():
        cfg.setdefault(k, {}).update(v)
    res = run(from_dict(cfg))
    assert res.exit_code == 0, res.message
    return list(load_embeddings(out)[0])


def b64(path) -> str:
    return base64.b64encode(open(path, "rb").read()).decode()


def serve(out, tmp_path, **kw) -> Service:
    svc = Service([str(out)], Settings(cache_dir=tmp_path / "cache"), **kw)
    svc.start()
    return svc


def query_finds_itself(svc: Service, paths: list[str], rows=(1, 6)) -> None:
    base = f"http://127.0.0.1:{svc.port}/"
    for i in rows:
        status, got, _ = call(base, "knn-service", {"image": b64(paths[i]), "num_images": 3})
        assert status == 200, got
        assert got[0]["id"] == i and got[0]["image_path"] == paths[i], (i, got)
        assert got[0]["similarity"] > 0.999, got[0]


@pytest.fixture
def photos8(tmp_path):
    return make_images(tmp_path / "imgs", 8, seed=11)


@pytest.fixture(scope="module")
def fake_sail_run(tmp_path_factory, tiny_model):
    """A sail device-mode run on the fake sophon.sail (which stays on the path for this module's tests)."""
    d = tmp_path_factory.mktemp("sail-device")
    make_images(d / "imgs", 8, seed=11)
    with pytest.MonkeyPatch.context() as mp:
        use_fake_sail(mp, tpus=1)
        bm = write_fake_bmodel(d / "clip_4b.bmodel", tiny_model, [4])
        out = d / "sail-device"
        yield out, make_run(out, d / "imgs", "sail", bm, sail={"mode": "device"})


def test_sail_device_mode_image_queries_go_through_the_device_in_a_query_process(tmp_path, fake_sail_run,
                                                                                   monkeypatch):
    """sail device mode (input_kind "files", on the fake sophon.sail): the uploaded file goes to the
    run's device as a file; a child that dies is started again; one that overruns its deadline is
    stopped and the request is a JSON 503."""
    out, paths = fake_sail_run
    svc = serve(out, tmp_path, image_timeout_s=20)
    try:
        query_finds_itself(svc, paths)
        child = svc.indices[0]._image
        assert isinstance(child, QueryChild) and child.files and child.starts == 1
        child.proc.kill()  # a dead child: the next query starts another
        child.proc.wait(5)
        query_finds_itself(svc, paths, rows=(4,))
        assert child.starts == 2
        # a device that takes longer than the deadline: that child is stopped, the client told why
        monkeypatch.setenv("FAKE_SAIL_INFER_MS", "5000")
        child.timeout_s = 1.0
        child.proc.kill()
        child.proc.wait(5)
        status, doc, _ = call(f"http://127.0.0.1:{svc.port}/", "knn-service", {"image": b64(paths[2])})
        assert status == 503 and "took longer than 1s" in doc["error"] and "--image-timeout" in doc["error"], doc
        monkeypatch.delenv("FAKE_SAIL_INFER_MS")
        child.timeout_s = 20.0
        query_finds_itself(svc, paths, rows=(2,))
        # a file the device's decoder refuses is the query's fault: a 4xx naming the reason
        broken = tmp_path / "broken.jpg"
        broken.write_bytes(open(paths[0], "rb").read()[:400])
        status, doc, _ = call(f"http://127.0.0.1:{svc.port}/", "knn-service", {"image": b64(broken)})
        assert 400 <= status < 500 and "cannot be used" in doc["error"], doc
    finally:
        svc.close()
    assert child.proc is None  # close() stopped it


def test_a_backend_under_another_interpreter_gets_crops_in_a_query_process(tmp_path, photos8, monkeypatch):
    """A pixels backend whose workers run under another interpreter (the sim backend's case) gets
    the run's crop in the child: here the fake backend, told its interpreter is this one."""
    from pipeline.backends.fake import FakeBackend

    out = tmp_path / "fake"
    paths = make_run(out, tmp_path / "imgs", "fake", "", fake={"dim": 64})
    monkeypatch.setattr(FakeBackend, "worker_python", classmethod(lambda cls, cfg: sys.executable))
    svc = serve(out, tmp_path)
    try:
        query_finds_itself(svc, paths)
        child = svc.indices[0]._image
        assert isinstance(child, QueryChild) and not child.files and child.python == sys.executable
        assert child.dim == 64
    finally:
        svc.close()


def test_an_image_model_that_cannot_be_opened_is_a_503_that_says_why(tmp_path, fake_sail_run, monkeypatch):
    out, paths = fake_sail_run
    monkeypatch.setenv("FAKE_SAIL_TPUS", "0")  # the chip is gone
    svc = serve(out, tmp_path)
    try:
        status, doc, _ = call(f"http://127.0.0.1:{svc.port}/", "knn-service", {"image": b64(paths[0])})
        assert status == 503 and "image queries are not available for index 'sail-device'" in doc["error"], doc
        status, doc, _ = call(f"http://127.0.0.1:{svc.port}/", "knn-service", {"embedding_input": [0.0] * 512})
        assert status in (200, 400), doc  # vectors still work (or say why the vector is wrong)
    finally:
        svc.close()


# ------------------------------------------------------------------ slow: the real runtimes, Python 3.10
def tpu_mlir_venv():
    from pipeline.toolchain.env import TpuMlirMissing, find_venv

    try:
        return find_venv()
    except TpuMlirMissing as exc:
        pytest.skip(f"TPU-MLIR venv not available ({str(exc).splitlines()[0]}); run scripts/setup_tpu_mlir.sh")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory, tiny_model):
    """The tiny synthetic model compiled by TPU-MLIR for the BM1684X, batch 4 (F16)."""
    tpu_mlir_venv()
    from pipeline.toolchain.compile import compile_onnx

    d = tmp_path_factory.mktemp("bm")
    side = compile_onnx(tiny_model, d, batches=[4], log=lambda s: None)[0]
    return d / side["bmodel"]


@pytest.mark.slow
def test_sim_run_image_queries(tmp_path, compiled, photos8):
    out = tmp_path / "sim"
    paths = make_run(out, tmp_path / "imgs", "sim", compiled)
    svc = serve(out, tmp_path)
    try:
        query_finds_itself(svc, paths)
        child = svc.indices[0]._image
        assert isinstance(child, QueryChild) and not child.files and "tpu-mlir" in child.python
    finally:
        svc.close()


@pytest.mark.slow
def test_sail_cmodel_device_mode_run_image_queries(tmp_path, compiled, photos8):
    from pipeline.backends.sail import cmodel_python
    from pipeline.config import ConfigError

    try:
        cmodel_python()
    except ConfigError as exc:
        pytest.skip(f"real SAIL on the BM1684X cmodel is not available: {exc}")
    out = tmp_path / "sail-cmodel"
    bm = tmp_path / "clip_4b.bmodel"
    shutil.copy(compiled, bm)
    paths = make_run(out, tmp_path / "imgs", "sail", bm, sail={"mode": "device", "runtime": "cmodel"})
    svc = serve(out, tmp_path)
    try:
        query_finds_itself(svc, paths)
        child = svc.indices[0]._image
        assert isinstance(child, QueryChild) and child.files and "tpu-mlir" in child.python
    finally:
        svc.close()
