"""search (exact chunked top-k), index (faiss), and their bad inputs."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, cli, cli_env

from pipeline.config import Config
from pipeline.data.rundir import atomic_write_json, write_shard
from pipeline.output import load_embeddings
from pipeline.query.search import brute_force_topk, exact_topk, search_out


def write_synthetic_run(out: Path, emb: np.ndarray, shard_size: int, *, status: str = "complete",
                        skip: tuple[int, ...] = ()) -> list[str]:
    """An output directory as `clip-pipeline run` lays it out, from given vectors (no pipeline)."""
    (out / "embeddings").mkdir(parents=True, exist_ok=True)
    paths = [f"/data/img_{i:06d}.jpg" for i in range(len(emb))]
    shards = []
    for k, a in enumerate(range(0, len(emb), shard_size)):
        if k in skip:
            continue
        write_shard(out, k, [p.encode() for p in paths[a:a + shard_size]], emb[a:a + shard_size], [])
        shards.append(k)
    cfg = Config().to_dict()
    cfg["output"]["dtype"] = str(emb.dtype)
    cfg["output"]["shard_size"] = shard_size
    atomic_write_json(out / "manifest.json", {
        "format": "clip-pipeline/1", "status": status, "config": cfg, "shard_size": shard_size,
        "model": {"sha256": "0" * 64}, "counts": {"total": len(emb)}, "inputs": {"listed": len(emb)},
        "shards": shards, "synthetic_weights": True})
    return paths


def unit_rows(rng, n, d, dtype=np.float32):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("block_rows", [7, 256, 100_000])
def test_exact_topk_equals_brute_force(tmp_path, dtype, block_rows):
    rng = np.random.default_rng(0)
    emb = unit_rows(rng, 3000, 48, dtype)
    queries = rng.standard_normal((13, 48)).astype(np.float32)
    cuts = [0, 1000, 1001, 1001, 2999, 3000]  # an empty part, a one-row part
    parts = []
    for i, (a, b) in enumerate(zip(cuts, cuts[1:], strict=False)):
        np.save(tmp_path / f"p{i}.npy", emb[a:b])
        parts.append(np.load(tmp_path / f"p{i}.npy", mmap_mode="r"))
    scores, rows = exact_topk(parts, queries, 10, block_rows=block_rows)
    ref_s, ref_r = brute_force_topk(emb, queries, 10)
    np.testing.assert_array_equal(rows, ref_r)
    np.testing.assert_allclose(scores, ref_s, rtol=0, atol=1e-5)


def test_exact_topk_sorted_data_and_k_larger_than_rows():
    emb = np.arange(1, 101, dtype=np.float32)[:, None] * np.ones((1, 4), np.float32)  # scores grow with the row
    q = np.ones((2, 4), np.float32)
    scores, rows = exact_topk([emb[:50], emb[50:]], q, 5, block_rows=8)
    assert rows.tolist() == [[99, 98, 97, 96, 95]] * 2
    scores, rows = exact_topk([emb[:3]], q, 10)
    assert rows.shape == (2, 3) and rows[0].tolist() == [2, 1, 0]


def test_search_out_matches_brute_force_with_paths(tmp_path):
    rng = np.random.default_rng(1)
    emb = unit_rows(rng, 1000, 32, np.float16)
    paths = write_synthetic_run(tmp_path / "out", emb, 128)
    q = unit_rows(rng, 5, 32)
    res = search_out(tmp_path / "out", q, k=7, block_rows=100)
    _, ref = brute_force_topk(emb, q, 7)
    assert [[h.row for h in hits] for hits in res.hits] == ref.tolist()
    assert [[h.path for h in hits] for hits in res.hits] == [[paths[r] for r in row] for row in ref]
    assert res.rows_searched == 1000 and res.notes == []


def test_search_incomplete_out_searches_what_is_there_and_says_so(tmp_path):
    rng = np.random.default_rng(2)
    emb = unit_rows(rng, 500, 16)
    paths = write_synthetic_run(tmp_path / "out", emb, 100, status="interrupted", skip=(2,))
    q = emb[[250, 10]]  # row 250 lives in the missing shard
    res = search_out(tmp_path / "out", q, k=3)
    assert res.rows_searched == 400
    assert len(res.notes) == 1 and "incomplete" in res.notes[0] and "400" in res.notes[0] and "500" in res.notes[0]
    assert all(h.path != paths[250] for h in res.hits[0])
    assert res.hits[1][0].path == paths[10]
    r = subprocess.run(cli("search", str(tmp_path / "out"), "--vectors", str(_save(tmp_path, q)), "-k", "2"),
                       capture_output=True, text=True, env=cli_env(), cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "incomplete run (status: interrupted)" in r.stderr


def _save(tmp_path, arr) -> Path:
    p = tmp_path / "q.npy"
    np.save(p, arr)
    return p


def test_cli_search_vectors_json_and_bad_vectors(tmp_path):
    rng = np.random.default_rng(3)
    emb = unit_rows(rng, 300, 24)
    paths = write_synthetic_run(tmp_path / "out", emb, 64)
    r = subprocess.run(cli("search", str(tmp_path / "out"), "--vectors", str(_save(tmp_path, emb[[5, 77]])),
                           "-k", "3", "--json"), capture_output=True, text=True, env=cli_env(), cwd=ROOT)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert [q["hits"][0]["path"] for q in doc["queries"]] == [paths[5], paths[77]]
    assert doc["exact"] is True and doc["rows_searched"] == 300
    assert "SYNTHETIC" in r.stderr
    np.save(tmp_path / "wrong.npy", np.zeros((2, 7), np.float32))
    for args, msg in [(["--vectors", str(tmp_path / "wrong.npy")], "7 dimensions"),
                      (["--vectors", str(tmp_path / "missing.npy")], "no such file"),
                      ([], "give at least one query")]:
        r = subprocess.run(cli("search", str(tmp_path / "out"), *args), capture_output=True, text=True,
                           env=cli_env(), cwd=ROOT)
        assert r.returncode == 2 and msg in r.stderr, r.stderr
    r = subprocess.run(cli("search", str(tmp_path), "--vectors", str(tmp_path / "q.npy")), capture_output=True,
                       text=True, env=cli_env(), cwd=ROOT)
    assert r.returncode == 2 and "no manifest.json" in r.stderr


@pytest.fixture(scope="module")
def image_run(tmp_path_factory, tiny_model, photos):
    d = tmp_path_factory.mktemp("imgrun")
    images = photos
    r = subprocess.run(cli("run", "-i", str(photos[0].parent), "-o", str(d / "out"), "--progress", "none",
                           "--set", f'model.path="{tiny_model}"', "--set", "output.shard_size=5",
                           "--set", 'output.dtype="float16"'), capture_output=True, text=True, env=cli_env(), cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return d, images


def test_cli_search_image_finds_itself(image_run):
    d, images = image_run
    r = subprocess.run(cli("search", str(d / "out"), "--image", str(images[3]), "--image", str(images[7]),
                           "-k", "4", "--json"), capture_output=True, text=True, env=cli_env(), cwd=ROOT)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    for q, img in zip(doc["queries"], (images[3], images[7]), strict=True):
        assert q["hits"][0]["path"] == str(img)
        assert q["hits"][0]["score"] > 0.99  # float16 storage of a unit vector against itself
        assert [h["score"] for h in q["hits"]] == sorted((h["score"] for h in q["hits"]), reverse=True)


def test_cli_search_bad_query_image_and_other_model(image_run, tmp_path):
    d, images = image_run
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    other = tmp_path / "other.onnx"
    from pipeline.model.modelgen import build_clip_image_onnx

    build_clip_image_onnx(other, arch="tiny", seed=1)
    cases = [
        (["--image", str(tmp_path / "broken.jpg")], "cannot be used"),
        (["--image", str(tmp_path / "absent.jpg")], "does not exist"),
        (["--image", str(images[0]), "--model", str(other)], "is not the model that made"),
    ]
    for args, msg in cases:
        r = subprocess.run(cli("search", str(d / "out"), *args), capture_output=True, text=True, env=cli_env(), cwd=ROOT)
        assert r.returncode == 2, r.stderr
        assert msg in r.stderr and r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr


# -- index -------------------------------------------------------------------------------------

def test_flat_index_round_trips_paths_and_equals_exact(tmp_path):
    pytest.importorskip("faiss")
    from pipeline.query.index import build_index, search_index

    rng = np.random.default_rng(4)
    emb = unit_rows(rng, 700, 32, np.float16)
    write_synthetic_run(tmp_path / "out", emb, 128)
    info = build_index(tmp_path / "out", "auto", log=lambda m: None)
    assert info["kind"] == "flat" and info["rows"] == 700 and info["recall_at_10"] == 1.0
    idx_paths = (tmp_path / "out" / "index" / "index.paths").read_text().splitlines()
    assert idx_paths == load_embeddings(tmp_path / "out")[0]
    q = unit_rows(rng, 6, 32)
    a = search_index(tmp_path / "out", q, 5)
    b = search_out(tmp_path / "out", q, 5)
    assert [[h.path for h in hits] for hits in a.hits] == [[h.path for h in hits] for hits in b.hits]


def test_ivfpq_index_recall_and_cli(tmp_path):
    pytest.importorskip("faiss")
    rng = np.random.default_rng(5)
    centres = unit_rows(rng, 50, 64)
    emb = centres[rng.integers(0, 50, 12000)] + 0.05 * rng.standard_normal((12000, 64)).astype(np.float32)
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    paths = write_synthetic_run(tmp_path / "out", emb, 4096)
    r = subprocess.run(cli("index", str(tmp_path / "out"), "--kind", "ivf-pq", "--json"), capture_output=True,
                       text=True, env=cli_env(), cwd=ROOT)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["factory"].startswith("IVF") and ",PQ4" in info["factory"]
    assert 0.0 <= info["recall_at_10"] <= 1.0 and info["recall_queries"] == 100
    r = subprocess.run(cli("search", str(tmp_path / "out"), "--index", "--vectors", str(_save(tmp_path, emb[[9]])),
                           "--json", "-k", "3"), capture_output=True, text=True, env=cli_env(), cwd=ROOT)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["exact"] is False and "approximate search" in r.stderr
    assert all(h["path"] == paths[h["row"]] for h in doc["queries"][0]["hits"])
    # too few rows for ivf-pq, and a stale index
    write_synthetic_run(tmp_path / "small", emb[:300], 100)
    r = subprocess.run(cli("index", str(tmp_path / "small"), "--kind", "ivf-pq"), capture_output=True, text=True,
                       env=cli_env(), cwd=ROOT)
    assert r.returncode == 2 and "too few" in r.stderr and "--kind flat" in r.stderr


def test_search_index_missing_and_stale(tmp_path):
    pytest.importorskip("faiss")
    from pipeline.query.index import build_index, search_index

    rng = np.random.default_rng(6)
    emb = unit_rows(rng, 300, 16)
    write_synthetic_run(tmp_path / "out", emb, 100, status="interrupted", skip=(2,))
    r = subprocess.run(cli("search", str(tmp_path / "out"), "--index", "--vectors", str(_save(tmp_path, emb[:1]))),
                       capture_output=True, text=True, env=cli_env(), cwd=ROOT)
    assert r.returncode == 2 and "clip-pipeline index" in r.stderr
    build_index(tmp_path / "out", "flat", log=lambda m: None)
    write_synthetic_run(tmp_path / "out", emb, 100)  # the run went on: shard 2 exists now
    res = search_index(tmp_path / "out", emb[:1], 3)
    assert any("rebuild it" in n for n in res.notes)


# -- shard names: byte order = id order, also past 99,999 shards (autofaiss reads sorted *.npy) ---

def test_shard_names_sort_in_id_order_past_99999():
    from pipeline.data.rundir import parse_shard_name, shard_name

    ks = [0, 1, 9, 10, 99_998, 99_999, 100_000, 100_001, 999_999, 1_000_000, 123_456_789, 9_999_999_999]
    names = [shard_name(k) for k in ks]
    assert names[:2] == ["part-00000", "part-00001"] and names[6] == "part-x0000100000"
    assert sorted(names) == names and sorted(n + ".npy" for n in names) == [n + ".npy" for n in names]
    assert [parse_shard_name(n) for n in names] == ks
    assert parse_shard_name("part-x00042") is None and parse_shard_name("part-1e5") is None
    assert parse_shard_name("other") is None


def test_sorted_npy_files_concatenate_to_load_embeddings(tmp_path):
    """What autofaiss (embedding-reader) does with OUT/embeddings: glob *.npy, sort the names,
    concatenate. It must equal load_embeddings' rows, shards past 99,999 included."""
    from pipeline.data.rundir import EMB_DIR, completed_shards

    out = tmp_path / "out"
    (out / EMB_DIR).mkdir(parents=True)
    rng = np.random.default_rng(7)
    blocks = {}
    for k in (0, 1, 99_999, 100_000, 100_001, 1_000_000):
        blocks[k] = rng.standard_normal((3, 8)).astype(np.float32)
        write_shard(out, k, [f"/img/{k}_{i}.jpg".encode() for i in range(3)], blocks[k], [])
    atomic_write_json(out / "manifest.json", {"format": "clip-pipeline/1", "status": "complete", "config": {}})
    assert completed_shards(out) == sorted(blocks)
    files = sorted((out / EMB_DIR).glob("*.npy"))
    autofaiss_order = np.concatenate([np.load(f) for f in files])
    paths, emb = load_embeddings(out)
    np.testing.assert_array_equal(autofaiss_order, np.asarray(emb))
    np.testing.assert_array_equal(np.asarray(emb), np.concatenate([blocks[k] for k in sorted(blocks)]))
    assert paths[9] == "/img/100000_0.jpg"


def test_cli_search_text_equals_embed_text_vectors(image_run, tmp_path):
    d, _ = image_run
    r = subprocess.run(cli("embed-text", "--run", str(d / "out"), "-t", "a red circle", "-t", "a dog", "-o",
                           str(tmp_path / "t")), capture_output=True, text=True, env=cli_env(), cwd=ROOT)
    assert r.returncode == 0, r.stderr
    r1 = subprocess.run(cli("search", str(d / "out"), "--text", "a red circle", "--text", "a dog", "-k", "4", "--json"),
                        capture_output=True, text=True, env=cli_env(), cwd=ROOT)
    r2 = subprocess.run(cli("search", str(d / "out"), "--vectors", str(tmp_path / "t" / "embeddings.npy"), "-k", "4",
                            "--json"), capture_output=True, text=True, env=cli_env(), cwd=ROOT)
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr + r2.stderr
    q1, q2 = json.loads(r1.stdout)["queries"], json.loads(r2.stdout)["queries"]
    assert q1[0]["query"] == "text 'a red circle'"
    assert [[h["path"] for h in q["hits"]] for q in q1] == [[h["path"] for h in q["hits"]] for q in q2]
    other = tmp_path / "other-text.onnx"
    from pipeline.text.model import build_clip_text_onnx

    build_clip_text_onnx(other, arch="tiny", seed=5)
    r = subprocess.run(cli("search", str(d / "out"), "--text", "x", "--text-model", str(other)),
                       capture_output=True, text=True, env=cli_env(), cwd=ROOT)
    assert r.returncode == 2 and r.stderr.startswith("error: "), r.stderr


def test_ivfpq_exact_rerank_raises_recall_and_scores_are_exact(tmp_path):
    pytest.importorskip("faiss")
    from pipeline.query.index import build_index, search_index

    rng = np.random.default_rng(8)
    centres = unit_rows(rng, 40, 64)
    emb = centres[rng.integers(0, 40, 12000)] + 0.08 * rng.standard_normal((12000, 64)).astype(np.float32)
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float16)
    write_synthetic_run(tmp_path / "out", emb, 4096)
    info = build_index(tmp_path / "out", "ivf-pq", log=lambda m: None)
    assert info["rerank_factor"] == 10 and info["recall_at_10"] >= info["recall_at_10_codes_only"]
    q = unit_rows(rng, 8, 64)
    res = search_index(tmp_path / "out", q, 5)
    for qv, hits in zip(q, res.hits, strict=True):
        exact = [float(np.asarray(emb[h.row], np.float32) @ qv) for h in hits]
        np.testing.assert_allclose([h.score for h in hits], exact, rtol=0, atol=1e-5)  # true inner products
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    raw = search_index(tmp_path / "out", q, 5, exact_rerank=False)
    assert any("codes only" in n for n in raw.notes) and any("re-scored exactly" in n for n in res.notes)
