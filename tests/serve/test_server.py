"""clip-pipeline serve: clip-back's API over a real run, its limits, bad requests, tokens and traversal attempts."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, cli, cli_env
from PIL import Image
from serve_helpers import call, make_run, raw_http, require_web

from pipeline.output import load_embeddings

require_web()

from pipeline.serve.app import Settings  # noqa: E402
from pipeline.serve.engine import near_duplicates  # noqa: E402
from pipeline.serve.server import Service  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory, photos, tiny_model):
    d = tmp_path_factory.mktemp("serve")
    out = make_run(d, photos, tiny_model)
    paths, _ = load_embeddings(out)
    return out, [p for p in paths]


@pytest.fixture(scope="module")
def served(run, tmp_path_factory):
    out, _ = run
    cache = tmp_path_factory.mktemp("cache")
    svc = Service([str(out)], Settings(cache_dir=cache, max_body_bytes=2 << 20, max_upload_bytes=1 << 20,
                                       max_pixels=4_000_000))
    svc.start()
    yield f"http://127.0.0.1:{svc.port}/", svc, cache
    svc.close()


def b64(path) -> str:
    return base64.b64encode(open(path, "rb").read()).decode()


def test_indices_list_and_info_say_synthetic_and_ignored_options(served, run):
    base, _, _ = served
    status, doc, _ = call(base, "indices-list")
    assert status == 200 and doc == ["photos"]
    status, info, _ = call(base, "info")
    ix = info["indices"][0]
    assert ix["rows"] == 12 and ix["synthetic_weights"] is True and ix["search"] == "exact"
    assert set(info["ignored_options"]) == {"use_safety_model", "use_violence_detector"}
    assert info["token_required"] is False


def test_text_query_equals_search_text(served, run):
    base, _, _ = served
    out, paths = run
    r = subprocess.run(cli("search", str(out), "--text", "a red circle", "-k", "5", "--json"), capture_output=True,
                       text=True, env=cli_env(), cwd=ROOT)
    assert r.returncode == 0, r.stderr
    want = json.loads(r.stdout)["queries"][0]["hits"]
    # clip-front's own body (text/plain, every option it sends by default)
    body = {"text": "a red circle", "image": None, "image_url": None, "embedding_input": None, "modality": "image",
            "num_images": 5, "indice_name": "photos", "num_result_ids": 5, "use_mclip": False, "deduplicate": False,
            "use_safety_model": True, "use_violence_detector": True, "aesthetic_score": "", "aesthetic_weight": "0.5"}
    status, got, _ = call(base, "knn-service", raw=json.dumps(body).encode(), headers={"Content-Type": "text/plain"})
    assert status == 200, got
    assert [g["id"] for g in got] == [h["row"] for h in want]
    assert [g["image_path"] for g in got] == [h["path"] for h in want]
    np.testing.assert_allclose([g["similarity"] for g in got], [h["score"] for h in want], atol=1e-5)
    assert all(g["url"].startswith(base + "thumb/photos/") for g in got)


def test_image_query_finds_itself_and_embedding_input_is_used_as_given(served, run):
    base, _, _ = served
    out, paths = run
    for i in (3, 7):
        status, got, _ = call(base, "knn-service", {"image": b64(paths[i]), "num_images": 3})
        assert status == 200, got
        assert got[0]["id"] == i and got[0]["image_path"] == paths[i] and got[0]["similarity"] > 0.99
    _, emb = load_embeddings(out)
    vec = np.asarray(emb[5], dtype=np.float32)
    status, got, _ = call(base, "knn-service", {"embedding_input": vec.tolist(), "num_images": 2})
    assert status == 200 and got[0]["id"] == 5
    np.testing.assert_allclose(got[0]["similarity"], float(vec @ vec), rtol=1e-5)
    status, got, _ = call(base, "knn-service", {"id": 9, "num_images": 1})  # more like this row
    assert status == 200 and got[0]["id"] == 9
    # clip-front's "similar image" sends a result's url: ours is a row, no fetch; anyone else's is refused
    status, got, _ = call(base, "knn-service", {"image_url": f"{base}thumb/photos/8", "num_images": 1})
    assert status == 200 and got[0]["id"] == 8
    for url in (f"{base}thumb/photos/12", f"{base}thumb/other/8", "http://example.com/thumb/photos/8"):
        status, doc, _ = call(base, "knn-service", {"image_url": url, "num_images": 1})
        assert status == 400 and "no outbound fetches" in doc["error"], url


def test_num_result_ids_beyond_num_images_and_metadata(served, run):
    base, _, _ = served
    _, paths = run
    status, got, _ = call(base, "knn-service", {"text": "x", "num_images": 2, "num_result_ids": 6})
    assert status == 200 and len(got) == 6
    assert all("image_path" in g for g in got[:2]) and not any("image_path" in g for g in got[2:])
    ids = [g["id"] for g in got[2:]]
    status, meta, _ = call(base, "metadata", {"ids": ids, "indice_name": "photos"})
    assert status == 200 and [m["id"] for m in meta] == ids
    assert [m["metadata"]["image_path"] for m in meta] == [paths[i] for i in ids]


def test_deduplicate_drops_near_copies_but_keeps_the_best():
    rng = np.random.default_rng(0)
    v = rng.standard_normal((6, 16)).astype(np.float32)
    v[2] = v[0] + 0.01 * rng.standard_normal(16)  # near copy of a better result
    v[5] = v[3]
    v[4] = v[2] * 1.0001  # linked through 2: the whole group goes to 0
    assert near_duplicates(v).tolist() == [False, False, True, False, True, True]
    assert near_duplicates(v[:1]).tolist() == [False]


def test_thumbnails_made_once_then_cached(served, run):
    base, svc, cache = served
    _, paths = run
    status, data, hdrs = call(base, "thumb/photos/4")
    assert status == 200 and hdrs["content-type"] == "image/jpeg"
    img = Image.open(io.BytesIO(data))
    assert max(img.size) <= 256 and img.format == "JPEG"
    cached = list(cache.rglob("4.jpg"))
    assert len(cached) == 1 and cached[0].read_bytes() == data
    os.unlink(paths[4])  # the source is gone: the cached thumbnail is still served
    status, again, _ = call(base, "thumb/photos/4")
    assert status == 200 and again == data
    status, doc, _ = call(base, "thumb/photos/4" if False else f"thumb/photos/{len(paths) - 1}")
    assert status == 200


@pytest.mark.parametrize("path", [
    "thumb/photos/12", "thumb/photos/-1", "thumb/photos/1.0", "thumb/photos/..%2F..%2Fetc%2Fpasswd",
    "thumb/..%2Fphotos/1", "thumb/photos/1/../../../etc/passwd", "thumb/%2Fetc%2Fpasswd/1", "thumb/etc/passwd",
    "thumb/photos/99999999999999999999999", "static/../app.py", "static/..%2Fapp.py", "static/%2e%2e/engine.py",
    "static/%2Fetc%2Fpasswd", "static//etc/passwd", "images/photos/img_000.jpg", "thumb/photos/%00",
])
def test_no_file_outside_the_listing_is_served(served, path):
    base, _, _ = served
    import http.client
    from urllib.parse import urlsplit

    u = urlsplit(base)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.request("GET", "/" + path)  # as written: no client-side normalisation of .. segments
    resp = conn.getresponse()
    payload = resp.read()
    assert resp.status == 404, (path, resp.status, payload[:200])
    doc = json.loads(payload)
    assert "error" in doc and b"root:" not in payload and b"import" not in payload


def _png_claiming(w: int, h: int) -> bytes:
    """A tiny PNG whose header claims w x h pixels (the decoder must refuse it before decoding)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("body,status,words", [
    (b"not json", 400, "not JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (b'{"text": "x", "indice_name": "../photos"}', 404, "no index named"),
    (b'{"text": "x", "num_images": 0}', 400, "num_images"),
    (b'{"text": "x", "num_images": "many"}', 400, "num_images"),
    (b'{"text": "x", "num_images": 1e9}', 400, "num_images"),
    (b'{"text": "x", "num_result_ids": 100000}', 400, "num_result_ids"),
    (b'{"text": 5}', 400, "text must be"),
    (b'{}', 400, "give one query"),
    (b'{"image_url": "http://169.254.169.254/latest/meta-data"}', 400, "no outbound fetches"),
    (b'{"image_url": "file:///etc/passwd"}', 400, "no outbound fetches"),
    (b'{"text": "x", "aesthetic_score": "9"}', 400, "aesthetic_score"),
    (b'{"text": "x", "use_mclip": true}', 400, "use_mclip"),
    (b'{"text": "x", "modality": "text"}', 400, "image embeddings only"),
    (b'{"image": "%%% not base64 %%%"}', 400, "not valid base64"),
    (b'{"image": "aGVsbG8gd29ybGQ="}', 400, "not_an_image"),
    (b'{"image": 17}', 400, "base64 string"),
    (b'{"embedding_input": [1, 2, 3]}', 400, "embedding_input must be"),
    (b'{"embedding_input": "abc"}', 400, "embedding_input must be"),
    (b'{"id": 12}', 400, "row number"),
    (b'{"id": true}', 400, "row number"),
])
def test_bad_knn_requests_are_4xx_json(served, body, status, words):
    base, _, _ = served
    got_status, doc, _ = call(base, "knn-service", raw=body)
    assert got_status == status, doc
    assert isinstance(doc, dict) and words in doc["error"] and "Traceback" not in doc["error"]


def test_upload_limits_pixels_bytes_and_body(served):
    base, _, _ = served
    status, doc, _ = call(base, "knn-service", {"image": base64.b64encode(_png_claiming(30000, 30000)).decode()})
    assert status == 413 and "too_large" in doc["error"] and "max_pixels" in doc["error"]
    status, doc, _ = call(base, "knn-service", {"image": base64.b64encode(b"\x89PNG" + b"\0" * (1 << 20)).decode()})
    assert status == 413 and "upload limit" in doc["error"]
    # a client that writes all of its body before reading (urllib): the rest is read and dropped, so it
    # reads the JSON 413 rather than a reset, up to 4 x the limit
    for size in (3 << 20, 7 << 20):
        status, doc, _ = call(base, "knn-service", raw=b'{"text": "' + b"x" * size + b'"}')
        assert status == 413 and "request body is over the limit" in doc["error"], size


@pytest.mark.parametrize("times", [1.5, 3, 100])
def test_a_body_of_any_size_over_the_limit_is_a_json_413_read_no_further(served, times):
    """waitress refuses it from its Content-Length, with our JSON: the test sends the headers and at
    most 1 MiB of the body (the server answers before reading it, so little more is sent)."""
    _, svc, _ = served
    limit = svc.settings.max_body_bytes
    size = int(limit * times)
    head = (f"POST /knn-service HTTP/1.1\r\nHost: 127.0.0.1:{svc.port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {size}").encode()
    status, headers, body, sent = raw_http(svc.port, head, [b"x" * (64 << 10)] * 16)
    assert status == 413 and headers["content-type"] == "application/json", (status, headers, body)
    doc = json.loads(body)
    assert doc["status"] == 413 and f"over the limit of {limit:,} bytes" in doc["error"] and "--max-body-mb" in doc["error"]
    # with Expect: 100-continue (curl's way for big bodies) it is refused before any of the body is sent
    status, headers, body, sent = raw_http(svc.port, head + b"\r\nExpect: 100-continue")
    assert status == 413 and b"100 Continue" not in body and "--max-body-mb" in json.loads(body)["error"]
    status, doc, _ = call(base := f"http://127.0.0.1:{svc.port}/", "indices-list")  # the service is unharmed
    assert status == 200 and doc == ["photos"], base


def test_a_chunked_body_over_the_limit_is_a_json_413_once_past_it(served):
    _, svc, _ = served
    limit = svc.settings.max_body_bytes
    chunk = 64 << 10
    head = (f"POST /knn-service HTTP/1.1\r\nHost: 127.0.0.1:{svc.port}\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked").encode()
    # 3 x the limit in chunks, never the last chunk: an answer means the server refused it on its way
    parts = [f"{chunk:x}\r\n".encode() + b"x" * chunk + b"\r\n"] * (3 * limit // chunk)
    status, headers, body, _ = raw_http(svc.port, head, parts)
    assert status == 413 and headers["content-type"] == "application/json"
    assert "--max-body-mb" in json.loads(body)["error"]
    # a chunked body within the limit reaches the app
    ok = json.dumps({"text": "a red circle", "num_images": 1}).encode()
    status, headers, body, _ = raw_http(svc.port, head + b"\r\nConnection: close", [f"{len(ok):x}\r\n".encode() + ok + b"\r\n0\r\n\r\n"])
    assert status == 200 and len(json.loads(body)) == 1


@pytest.mark.parametrize("head,status,words", [
    (b"GARBAGE", 400, "bad request"),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (300 << 10), 431, "headers are too large"),
    (b"POST /knn-service HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip", 501, "not implemented"),
    (b"POST /knn-service HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2", 400, "content-length"),
])
def test_waitress_own_errors_answer_json(served, head, status, words):
    _, svc, _ = served
    got, headers, body, _ = raw_http(svc.port, head)
    assert got == status and headers["content-type"] == "application/json", (got, headers, body)
    doc = json.loads(body)
    assert doc["status"] == status and words in doc["error"].lower(), doc


def test_bad_chunked_encoding_answers_json(served):
    _, svc, _ = served
    head = f"POST /knn-service HTTP/1.1\r\nHost: 127.0.0.1:{svc.port}\r\nTransfer-Encoding: chunked".encode()
    got, headers, body, _ = raw_http(svc.port, head, [b"zz\r\nxx\r\n0\r\n\r\n"])
    assert got == 400 and headers["content-type"] == "application/json"
    assert "chunk" in json.loads(body)["error"].lower()


@pytest.mark.parametrize("body,words", [
    ({"ids": "0"}, "list"), ({"ids": [0, 12]}, "not a row"), ({"ids": [-1]}, "not a row"),
    ({"ids": ["../../etc/passwd"]}, "not a row"), ({"ids": [0], "indice_name": "nope"}, "no index named"),
])
def test_bad_metadata_requests(served, body, words):
    base, _, _ = served
    status, doc, _ = call(base, "metadata", body)
    assert 400 <= status < 500 and words in doc["error"]


def test_decode_pool_times_out_and_recovers():
    from pipeline.data.images import DecodeOptions
    from pipeline.serve.decode import DecodePool
    from pipeline.wire.messages import ItemError

    big = Image.new("RGB", (6000, 6000), (200, 10, 10))
    buf = io.BytesIO()
    big.save(buf, "PNG")
    pool = DecodePool(1, timeout_s=0.001)
    try:
        with pytest.raises(ItemError) as exc:
            pool.call("crop", buf.getvalue(), DecodeOptions())
        # the deadline is the decode's: the child's start (its imports) is not counted in it
        assert exc.value.reason == "timeout" and "decoding took longer" in exc.value.message
        pool.timeout_s = 60
        small = io.BytesIO()
        Image.new("RGB", (300, 200), (0, 90, 0)).save(small, "JPEG")
        crop = pool.call("crop", small.getvalue(), DecodeOptions())
        assert crop.shape == (224, 224, 3) and crop.dtype == np.uint8
    finally:
        pool.close()


def test_token_required_and_thumbnail_signatures(run, tmp_path):
    out, _ = run
    svc = Service([str(out)], Settings(token="s3cret", cache_dir=tmp_path))
    svc.start()
    base = f"http://127.0.0.1:{svc.port}/"
    try:
        status, doc, hdrs = call(base, "indices-list")
        assert status == 401 and "bearer token" in doc["error"] and hdrs["www-authenticate"] == "Bearer"
        assert call(base, "indices-list", headers={"Authorization": "Bearer wrong"})[0] == 401
        auth = {"Authorization": "Bearer s3cret"}
        status, got, _ = call(base, "knn-service", {"text": "x", "num_images": 1}, headers=auth)
        assert status == 200
        url = got[0]["url"]
        assert "?sig=" in url
        assert call(url, "")[0] == 200  # the signed URL works without the header (for <img src>)
        assert call(url.split("?")[0], "")[0] == 401
        assert call(url[:-1] + ("0" if url[-1] != "0" else "1"), "")[0] == 401
        assert call(base, "")[0] == 200  # the page itself asks for the token
    finally:
        svc.close()


def test_token_in_the_path_for_clients_that_cannot_send_headers(run, tmp_path):
    """clip-front sends no headers: `back=http://HOST:PORT/t/TOKEN` authorises by the path; the
    answers never repeat the token (thumbnails are signed URLs without it)."""
    out, _ = run
    svc = Service([str(out)], Settings(token="s3cret", cache_dir=tmp_path))
    svc.start()
    base = f"http://127.0.0.1:{svc.port}/"
    try:
        status, doc, _ = call(base + "t/s3cret/", "indices-list")
        assert status == 200 and doc == ["photos"]
        status, got, _ = call(base + "t/s3cret/", "knn-service", {"text": "x", "num_images": 2})
        assert status == 200 and len(got) == 2
        assert all(g["url"].startswith(base + "thumb/photos/") and "s3cret" not in g["url"] for g in got)
        assert call(got[0]["url"], "")[0] == 200
        status, meta, _ = call(base + "t/s3cret/", "metadata", {"ids": [got[1]["id"]]})
        assert status == 200 and "s3cret" not in json.dumps(meta)
        for wrong in ("t/s3cre/", "t/s3cretx/", "t/", "t//", "x/s3cret/", "t/s3cret"):
            status, doc, _ = call(base + wrong, "indices-list")
            assert status in (401, 404) and "s3cret" not in json.dumps(doc), (wrong, status, doc)
        assert call(base + "t/s3cre/", "indices-list")[0] == 401
    finally:
        svc.close()
    # without --token the prefix means nothing: it is not a path of the service
    svc = Service([str(out)], Settings(cache_dir=tmp_path))
    svc.start()
    try:
        assert call(f"http://127.0.0.1:{svc.port}/t/s3cret/", "indices-list")[0] == 404
    finally:
        svc.close()


def test_other_host_names_refused_on_loopback(served):
    base, _, _ = served
    status, doc, _ = call(base, "indices-list", headers={"Host": "rebound.example:80"})
    assert status == 403 and "DNS" not in doc["error"] and "not this service's address" in doc["error"]
    port = base.rstrip("/").rsplit(":", 1)[1]
    assert call(base, "indices-list", headers={"Host": f"localhost:{port}"})[0] == 200


def test_cors_only_for_named_origins(run, tmp_path):
    out, _ = run
    svc = Service([str(out)], Settings(cache_dir=tmp_path, cors_origins=("http://127.0.0.1:9",)))
    svc.start()
    base = f"http://127.0.0.1:{svc.port}/"
    try:
        _, _, hdrs = call(base, "indices-list", headers={"Origin": "http://127.0.0.1:9"})
        assert hdrs.get("access-control-allow-origin") == "http://127.0.0.1:9"
        _, _, hdrs = call(base, "indices-list", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in hdrs
        status, _, hdrs = call(base, "knn-service", method="OPTIONS", headers={  # a preflight
            "Origin": "http://127.0.0.1:9", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type"})
        assert status == 200 and hdrs.get("access-control-allow-origin") == "http://127.0.0.1:9"
        assert "POST" in hdrs.get("access-control-allow-methods", "")
    finally:
        svc.close()


def test_index_is_used_when_built(tmp_path, photos, tiny_model):
    pytest.importorskip("faiss")
    out = make_run(tmp_path, photos, tiny_model, name="indexed")
    r = subprocess.run(cli("index", str(out), "--kind", "flat"), capture_output=True, text=True, env=cli_env(), cwd=ROOT)
    assert r.returncode == 0, r.stderr
    svc = Service([str(out)], Settings(cache_dir=tmp_path / "c"))
    exact = Service([str(out)], Settings(cache_dir=tmp_path / "c"), use_index=False)
    try:
        ix, ex = svc.indices[0], exact.indices[0]
        assert ix.search_kind.startswith("faiss Flat") and ex.search_kind == "exact"
        q = np.asarray(ix.emb[2], dtype=np.float32)
        s1, r1 = ix.search(q, 5)
        s2, r2 = ex.search(q, 5)
        assert r1.tolist() == r2.tolist()
        np.testing.assert_allclose(s1, s2, atol=1e-5)
    finally:
        svc.close()
        exact.close()


def test_cli_warns_off_loopback_and_refuses_bad_runs(run, tmp_path):
    out, _ = run
    proc = subprocess.Popen(cli("serve", str(out), "--host", "0.0.0.0", "--port", "0", "--cache-dir", str(tmp_path)),
                            stderr=subprocess.PIPE, text=True, env=cli_env(), cwd=ROOT)
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("Serving on"):
                break
        text = "".join(lines)
        assert "warning: listening on 0.0.0.0" in text and "no --token set" in text, text
        assert "SYNTHETIC" in text
    finally:
        proc.terminate()
        proc.wait(30)
    (tmp_path / "a" / "photos").mkdir(parents=True)
    cases = [([str(out), str(tmp_path / "a" / "photos")], "would both be served as index 'photos'"),
             ([str(tmp_path / "nothing")], "is not a directory"),
             ([str(tmp_path)], "holds no clip-pipeline run")]
    for args, words in cases:
        r = subprocess.run(cli("serve", *args, "--port", "0"), capture_output=True, text=True, env=cli_env(), cwd=ROOT)
        assert r.returncode == 2 and words in r.stderr and r.stderr.startswith("error: "), r.stderr
    code = "import sys; sys.modules['waitress'] = None; from pipeline.cli import main; sys.argv[1:] = ['serve', %r]; main()"
    r = subprocess.run([sys.executable, "-c", code % str(out)], capture_output=True, text=True, env=cli_env(), cwd=ROOT)
    assert r.returncode == 2 and "pip install 'clip-pipeline[serve]'" in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_an_image_model_that_fails_to_open_is_a_503_and_text_still_works(run, tmp_path, monkeypatch):
    from pipeline.backends.cpu import CpuBackend

    out, paths = run

    def broken(cls, cfg, device):
        raise RuntimeError("the device is gone")

    monkeypatch.setattr(CpuBackend, "open_device", classmethod(broken))
    svc = Service([str(out)], Settings(cache_dir=tmp_path))
    svc.start()
    base = f"http://127.0.0.1:{svc.port}/"
    try:
        for _ in range(2):  # the second is answered from the remembered failure
            status, doc, _ = call(base, "knn-service", {"image": b64(paths[0])})
            assert status == 503 and "image queries are not available" in doc["error"], doc
            assert "RuntimeError: the device is gone" in doc["error"]
        status, got, _ = call(base, "knn-service", {"text": "x", "num_images": 1})
        assert status == 200 and len(got) == 1
    finally:
        svc.close()
