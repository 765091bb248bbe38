"""Inputs people already have (issue #18): file lists (text, escaped form, parquet) and webdataset
tar shards (grouping, sidecars, failures with reasons, streamed, equal to the same images on disk)."""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import cli, cli_env
from imagegen import make_images, write_shard

from pipeline import config as cfgmod
from pipeline.config import ConfigError
from pipeline.data import inputs
from pipeline.data.listing import iter_inputs
from pipeline.output import load_embeddings
from pipeline.run.progress import Progress
from pipeline.run.supervisor import Supervisor
from pipeline.wire import pathcodec


def run_pipeline(out, model, inputs_=(), **sets):
    overrides = [f"{k}={v}" for k, v in sets.items()]
    cfg = cfgmod.load(None, [f'model.path="{model}"', "model.batch_size=4", "output.shard_size=8",
                             "infer.batch_timeout_ms=20", *overrides],
                      input_paths=[str(p) for p in inputs_], output_dir=str(out))
    return Supervisor(cfg, progress=Progress("none")).run()


# -- file lists --------------------------------------------------------------------------------

def test_text_list_plain_escaped_relative_and_crlf(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    weird = b"latin1\xff\xfe name\nwith newline.jpg"
    (d / "a.jpg").write_bytes(b"x")
    (d / os.fsdecode(weird)).write_bytes(b"x")
    lst = tmp_path / "files.txt"
    lst.write_bytes(b"imgs/a.jpg\r\n\n" + pathcodec.encode(os.fsencode(str(d)) + b"/" + weird).encode() + b"\n"
                    + str(d / "missing.jpg").encode())
    got = list(inputs.iter_list(str(lst)))
    assert got == [os.fsencode(str(d / "a.jpg")), os.fsencode(str(d)) + b"/" + weird, os.fsencode(str(d / "missing.jpg"))]


@pytest.mark.parametrize("content, what", [
    (b"ok.jpg\n\xff\xfe.jpg\n", "line 2: not valid UTF-8"),
    (b"ok.jpg\nok2.jpg\n\"unterminated.jpg\n", "line 3: quoted path"),
    (b"a\x00b\n", "line 1: holds a NUL byte"),
])
def test_text_list_errors_name_file_and_line(tmp_path, content, what):
    lst = tmp_path / "files.txt"
    lst.write_bytes(content)
    with pytest.raises(ConfigError) as exc:
        list(inputs.iter_list(str(lst)))
    assert str(lst) in str(exc.value) and what in str(exc.value), exc.value


def test_parquet_list_column_and_errors(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    p = tmp_path / "files.parquet"
    pq.write_table(pa.table({"path": ["/x/a.jpg", "rel/b.jpg"], "caption": ["a", "b"]}), p)
    assert list(inputs.iter_list(str(p))) == [b"/x/a.jpg", os.fsencode(str(tmp_path / "rel/b.jpg"))]
    with pytest.raises(ConfigError, match=r"has no column 'file' \(columns: path, caption\); set input.list_column"):
        list(inputs.iter_list(str(p), "file"))
    pq.write_table(pa.table({"path": ["/x/a.jpg", None]}), p)
    with pytest.raises(ConfigError, match="row 2"):
        list(inputs.iter_list(str(p)))


def test_run_from_a_list_after_paths_and_bad_list_exits_2_naming_the_line(tmp_path, tiny_model):
    imgs = make_images(tmp_path / "imgs", 6)
    more = make_images(tmp_path / "more", 3, seed=5)
    lst = tmp_path / "files.txt"
    lst.write_text("".join(f"{p}\n" for p in reversed(more)))
    res = run_pipeline(tmp_path / "out", tiny_model, [tmp_path / "imgs"], **{"input.list": json.dumps(str(lst))})
    assert res.exit_code == 0, res.message
    paths, emb = load_embeddings(tmp_path / "out")
    assert paths == [str(p) for p in sorted(imgs)] + [str(p) for p in reversed(more)]
    bad = tmp_path / "bad.txt"
    bad.write_bytes(f"{more[0]}\n".encode() + b"\xff.jpg\n")
    proc = subprocess.run(cli("run", "--list", str(bad), "--output", str(tmp_path / "o2"), "--set",
                              f'model.path="{tiny_model}"'), capture_output=True, text=True, env=cli_env())
    assert proc.returncode == 2, proc.stderr
    assert f"input list {bad}, line 2: not valid UTF-8" in proc.stderr and "Traceback" not in proc.stderr


# -- tar shards --------------------------------------------------------------------------------

def test_tar_samples_grouped_by_key_in_tar_order(tmp_path):
    imgs = make_images(tmp_path / "imgs", 3)
    tar = tmp_path / "shard.tar"
    keys = write_shard(tar, imgs, extra=[("capt_only.txt", b"no image here"), ("x.cls", b"3")])
    refs = list(iter_inputs((str(tar),), ("jpg",)))
    assert refs == [os.fsencode(f"{tar}/{k}{img.suffix}") for k, img in zip(keys, imgs)] + \
        [os.fsencode(f"{tar}/capt_only"), os.fsencode(f"{tar}/x")]
    assert inputs.split_key(b"dir/a.b.jpg") == (b"dir/a", b"b.jpg")
    assert inputs.split_ref(refs[0]) == (os.fsencode(str(tar)), os.fsencode(f"{keys[0]}{imgs[0].suffix}"))
    assert inputs.split_ref(os.fsencode(str(tmp_path / "imgs" / "a.jpg"))) is None


def test_a_directory_of_tars_is_walked_and_tars_are_read_never_extracted(tmp_path, tiny_model):
    imgs = make_images(tmp_path / "imgs", 11, seed=2)
    shards = tmp_path / "shards"
    shards.mkdir()
    write_shard(shards / "00000.tar", imgs[:6])
    write_shard(shards / "00001.tar", imgs[6:])
    before = sorted(p.name for p in shards.rglob("*"))
    res = run_pipeline(tmp_path / "out_tar", tiny_model, [shards])
    assert res.exit_code == 0, res.message
    assert sorted(p.name for p in shards.rglob("*")) == before  # nothing extracted beside the shards
    res = run_pipeline(tmp_path / "out_dir", tiny_model, [tmp_path / "imgs"])
    assert res.exit_code == 0, res.message
    tpaths, temb = load_embeddings(tmp_path / "out_tar")
    dpaths, demb = load_embeddings(tmp_path / "out_dir")
    assert len(tpaths) == 11 and tpaths[0] == f"{shards}/00000.tar/000000000{imgs[0].suffix}"
    np.testing.assert_array_equal(np.asarray(temb), np.asarray(demb))  # the same bytes, the same rows


def test_tar_failures_have_reasons_and_the_rest_is_embedded(tmp_path, tiny_model):
    imgs = make_images(tmp_path / "imgs", 4, seed=7)
    tar = tmp_path / "bad.tar"
    write_shard(tar, imgs, extra=[("k_text.txt", b"caption only"), ("k_text.json", b"{}"),
                                  ("k_cls.cls", b"7"),
                                  ("k_corrupt.jpg", b"\xff\xd8\xff\xe0 this is not a jpeg"),
                                  ("k_notimg.png", b"plain text, not a picture")])
    # a second shard cut off in the middle of its last image member
    cut = tmp_path / "cut.tar"
    write_shard(cut, imgs[:3])
    data = cut.read_bytes()
    with tarfile.open(cut) as tf:
        last = [m for m in tf.getmembers() if m.name.endswith((".jpg", ".png"))][-1]
    cut.write_bytes(data[:last.offset_data + last.size // 2])
    # a third whose 4th header is garbage: samples before it are embedded, the rest is one failure
    bad_hdr = tmp_path / "badheader.tar"
    write_shard(bad_hdr, imgs[:2])
    raw = bytearray(bad_hdr.read_bytes())
    with tarfile.open(bad_hdr) as tf:
        fourth = tf.getmembers()[3]
    raw[fourth.offset:fourth.offset + 512] = b"\x07" * 512
    bad_hdr.write_bytes(bytes(raw))
    res = run_pipeline(tmp_path / "out", tiny_model, [tar, cut, bad_hdr])
    assert res.exit_code == 3, res.message
    paths, emb = load_embeddings(tmp_path / "out")
    fails = {Path(f["path"]).name if "@" not in f["path"] else "@": f
             for f in map(json.loads, (tmp_path / "out" / "failures.jsonl").read_text().splitlines())}
    assert fails["k_text"]["reason"] == "no_image" and "k_text.txt, k_text.json" in fails["k_text"]["message"]
    assert fails["k_cls"]["reason"] == "no_image"
    assert fails["k_corrupt.jpg"]["reason"] in ("corrupt", "truncated")
    assert fails["k_notimg.png"]["reason"] == "not_an_image"
    assert fails[f"000000002{imgs[2].suffix}"]["reason"] == "tar_truncated"
    assert fails["@"]["reason"] == "tar_corrupt" and fails["@"]["path"].startswith(str(bad_hdr))
    # embedded: the 4 good samples of bad.tar, 2 of cut.tar, the first of badheader.tar
    assert len(paths) == 4 + 2 + 1 and emb.shape[0] == 7
    assert paths[:4] == [f"{tar}/{i:09d}{img.suffix}" for i, img in enumerate(imgs)]


def test_tar_member_reader_reads_with_one_seek(tmp_path):
    imgs = make_images(tmp_path / "imgs", 2)
    tar = tmp_path / "s.tar"
    write_shard(tar, imgs)
    r = inputs.TarReader()
    ref = os.fsencode(f"{tar}/000000001{imgs[1].suffix}")
    assert r.read_image(ref, 1 << 30) == imgs[1].read_bytes()
    side = r.sidecars(ref)
    assert side["txt"] == b"caption 1" and json.loads(side["json"])["i"] == 1
    r.close()


# -- metadata and the clip-retrieval layout --------------------------------------------------

def read_like_clip_retrieval(out: Path):
    """What clip-retrieval reads: autofaiss takes img_emb/*.npy in name order (embedding_reader),
    clip back concatenates metadata/*.parquet sorted by name (ParquetMetadataProvider)."""
    pq = pytest.importorskip("pyarrow.parquet")
    pa = pytest.importorskip("pyarrow")
    embs = [np.load(p) for p in sorted((out / "img_emb").glob("*.npy"))]
    tables = [pq.read_table(p) for p in sorted((out / "metadata").glob("*.parquet"))]
    return np.concatenate(embs), pa.concat_tables(tables, promote_options="default").to_pylist()


def test_clip_retrieval_layout_rows_align_with_metadata(tmp_path, tiny_model):
    pytest.importorskip("pyarrow")
    imgs = make_images(tmp_path / "imgs", 13, seed=4)
    tar = tmp_path / "s.tar"
    write_shard(tar, imgs[:9], extra=[("k_text.txt", b"caption only")])
    res = run_pipeline(tmp_path / "out", tiny_model, [tar, tmp_path / "imgs" / imgs[9].name,
                                                       tmp_path / "imgs" / imgs[10].name],
                       **{"output.layout": '"clip-retrieval"'})
    assert res.exit_code == 3, res.message  # k_text: no_image
    out = tmp_path / "out"
    paths, emb = load_embeddings(out)
    cr_emb, meta = read_like_clip_retrieval(out)
    np.testing.assert_array_equal(cr_emb, np.asarray(emb))
    assert [m["image_path"] for m in meta] == paths and len(meta) == 11
    for i, m in enumerate(meta[:9]):
        assert m["tar"] == str(tar) and m["key"] == f"{i:09d}" and m["caption"] == f"caption {i}"
        assert m["url"] == f"http://x/{i}" and m["i"] == i  # json fields flattened, like clip-retrieval
    from PIL import Image
    for m, img in zip(meta, imgs[:11]):
        assert (m["width"], m["height"]) == Image.open(img).size
    assert meta[9]["tar"] is None and meta[9]["caption"] is None
    # hard links, not copies: the same bytes, and the per-shard parquet beside each .npy
    first = sorted((out / "img_emb").glob("*.npy"))[0]
    assert first.name == "img_emb_00000.npy" and os.path.samefile(first, out / "embeddings" / "part-00000.npy")
    assert sorted(p.name for p in (out / "metadata").iterdir())[0] == "metadata_00000.parquet"


def test_metadata_backfilled_when_switched_on_for_a_finished_run(tmp_path, tiny_model):
    pq = pytest.importorskip("pyarrow.parquet")
    make_images(tmp_path / "imgs", 10)
    assert run_pipeline(tmp_path / "out", tiny_model, [tmp_path / "imgs"]).exit_code == 0
    assert not list((tmp_path / "out" / "embeddings").glob("*.parquet"))
    res = run_pipeline(tmp_path / "out", tiny_model, [tmp_path / "imgs"], **{"output.metadata": "true"})
    assert res.exit_code == 0, res.message
    paths, _ = load_embeddings(tmp_path / "out")
    got = [r["image_path"] for k in (0, 1) for r in pq.read_table(
        tmp_path / "out" / "embeddings" / f"part-{k:05d}.parquet").to_pylist()]
    assert got == paths


def clip_retrieval_python() -> str | None:
    """The private venv's python with clip-retrieval 2.45.0 and autofaiss
    (scripts/setup_clip_retrieval_venv.sh, run by .ci/run), or None."""
    py = os.environ.get("CLIP_PIPELINE_CLIP_RETRIEVAL_PYTHON") or str(
        Path(os.environ.get("CLIP_PIPELINE_CLIP_RETRIEVAL_VENV",
                            Path.home() / ".cache" / "clip-pipeline" / "clip-retrieval-venv")) / "bin" / "python")
    return py if Path(py).exists() else None


def test_clip_retrieval_readers_get_each_ids_url_and_path_in_a_mixed_run(tmp_path, tiny_model):
    """Issue #27 item 7: shards without tar samples had no `url` column, so clip back's hdf5 reader
    returned another row's URL (and IndexError past the short column), its arrow reader and
    pyarrow.dataset failed or dropped the column. Every metadata file now has one schema; this
    runs clip-retrieval's own readers (private venv) and checks url and image_path for every id,
    then the README's autofaiss command."""
    pytest.importorskip("pyarrow")
    py = clip_retrieval_python()
    if py is None:
        pytest.skip("no clip-retrieval venv: run scripts/setup_clip_retrieval_venv.sh "
                    "(or set CLIP_PIPELINE_CLIP_RETRIEVAL_PYTHON)")
    imgs = make_images(tmp_path / "a", 8, seed=21) + make_images(tmp_path / "c", 5, seed=22)
    tar_imgs = make_images(tmp_path / "t", 9, seed=23)
    # the 9th sample: "i" as text (a type that differs across shards), no url
    write_shard(tmp_path / "s.tar", tar_imgs[:8],
                extra=[(f"{8:09d}{tar_imgs[8].suffix}", tar_imgs[8].read_bytes()),
                       (f"{8:09d}.json", json.dumps({"i": "eight", "extra": [1, 2]}).encode())])
    # ids 0-7 plain files (shard 0: no json at all), 8-15 tar (shard 1), 16 tar + 17-21 plain (shard 2)
    res = run_pipeline(tmp_path / "out", tiny_model, [tmp_path / "a", tmp_path / "s.tar", tmp_path / "c"],
                       **{"output.layout": '"clip-retrieval"'})
    assert res.exit_code == 0, res.message
    out = tmp_path / "out"
    paths, _ = load_embeddings(out)
    assert len(paths) == 22 and len(imgs) == 13
    want = []
    for p in paths:
        key = p.split(".tar/")[1].split(".")[0] if ".tar/" in p else None
        want.append([f"http://x/{int(key)}" if key is not None and int(key) < 8 else None, p])
    pq = pytest.importorskip("pyarrow.parquet")
    schemas = {str(pq.read_schema(f)) for d in ("metadata", "embeddings") for f in (out / d).glob("*.parquet")}
    assert len(schemas) == 1, schemas  # one schema in every metadata file and per-shard parquet

    (tmp_path / "r").mkdir()
    proc = subprocess.run([py, str(Path(__file__).parents[1] / "clip_retrieval_readers.py"), str(out), str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["rows"] == 22
    for reader in ("parquet", "hdf5", "arrow", "dataset"):
        assert got[reader] == want, f"clip-retrieval's {reader} reader: {got[reader]}"

    # the README's autofaiss command, as written (OUT replaced), with the venv's autofaiss
    from conftest import ROOT

    readme = (ROOT / "README.md").read_text()
    import re
    import shlex

    m = re.search(r"`(autofaiss build_index [^`]*)`", readme.replace("\n  ", " "))
    assert m, "the README's autofaiss command is gone"
    cmd = shlex.split(" ".join(m.group(1).split()).replace("OUT/", f"{out}/"))
    env = {**os.environ, "PATH": f"{Path(py).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    check = subprocess.run([py, "-c", "import faiss, sys; print(faiss.read_index(sys.argv[1]).ntotal)",
                            str(tmp_path / "knn.index")], capture_output=True, text=True)
    assert check.stdout.strip() == "22", check.stdout + check.stderr


def test_autofaiss_indexes_the_clip_retrieval_layout(tmp_path, tiny_model):
    """clip-retrieval's indexing step itself (autofaiss) over img_emb/ plus its metadata reading.
    autofaiss pins numpy<2, so it usually lives in its own interpreter: CLIP_PIPELINE_AUTOFAISS_PYTHON."""
    import importlib.util
    import sys

    py = os.environ.get("CLIP_PIPELINE_AUTOFAISS_PYTHON") or (
        sys.executable if importlib.util.find_spec("autofaiss") else clip_retrieval_python())
    if not py:
        pytest.skip("autofaiss is not installed (run scripts/setup_clip_retrieval_venv.sh, or set "
                    "CLIP_PIPELINE_AUTOFAISS_PYTHON to a python that has it)")
    imgs = make_images(tmp_path / "imgs", 21, seed=12)
    write_shard(tmp_path / "s.tar", imgs)
    res = run_pipeline(tmp_path / "out", tiny_model, [tmp_path / "s.tar"], **{"output.layout": '"clip-retrieval"'})
    assert res.exit_code == 0, res.message
    from conftest import ROOT

    proc = subprocess.run([py, str(ROOT / "scripts" / "check_clip_retrieval_layout.py"), str(tmp_path / "out")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["index_rows"] == got["metadata_rows"] == got["nearest_is_self"] == 21
    assert {"image_path", "caption", "url", "width", "height"} <= set(got["columns"])
