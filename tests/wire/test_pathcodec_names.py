"""A run's output is readable with any UTF-8 line reader, whatever the input file names (issue #14)."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
from imagegen import encode, photo
from robust_helpers import run_cli
from test_pathcodec import HOSTILE

from pipeline.output import load_embeddings
from pipeline.wire import pathcodec

ROOT = Path(__file__).resolve().parents[2]


def _strict_json_lines(path: Path) -> list:
    data = path.read_bytes()
    text = data.decode("utf-8")  # strict
    lines = text.splitlines()  # every Unicode line break: one record per line even so
    assert len(lines) == data.count(b"\n")
    out = []
    for line in lines:
        value = json.loads(line)
        flat = json.dumps(value, ensure_ascii=False)
        flat.encode("utf-8")  # no lone surrogates anywhere (strict parsers in other languages reject them)
        out.append(value)
    return out


def test_hostile_names_round_trip_through_a_run(tmp_path):
    d = os.fsencode(tmp_path / "in")
    os.makedirs(d)
    names = sorted({h.replace(b"/", b"_") + b".jpg" for h in HOSTILE})
    for i, name in enumerate(names):
        with open(os.path.join(d, name), "wb") as fh:
            fh.write(encode(photo(48, 40, i)) if i % 7 else b"")  # every 7th is empty: a failure with that name
    bad = {os.path.join(d, n) for i, n in enumerate(names) if i % 7 == 0}
    out = tmp_path / "out"
    r = run_cli(tmp_path / "in", out, "--set", "output.shard_size=5", "--set", "output.pickle=true")
    assert r.returncode == 3, r.stderr
    rows: list[bytes] = []
    for npy in sorted((out / "embeddings").glob("part-*.npy")):
        paths_file = npy.with_suffix(".paths")
        with open(paths_file, encoding="utf-8") as fh:  # strict UTF-8, universal newlines
            lines = fh.read().splitlines()
        assert len(lines) == np.load(npy).shape[0], paths_file
        rows += [pathcodec.decode(line) for line in lines]
    assert sorted(rows) == sorted(set(os.path.join(d, n) for n in names) - bad)
    assert all(os.path.exists(p) for p in rows)
    listing = [pathcodec.decode(v) for v in _strict_json_lines(out / "listing.jsonl")]
    assert listing == sorted(os.path.join(d, n) for n in names)
    failures = _strict_json_lines(out / "failures.jsonl")
    assert {pathcodec.decode(f["path"]) for f in failures} == bad
    paths, emb = load_embeddings(out)
    assert [pathcodec.decode(p) for p in paths] == rows
    data = pickle.loads((out / "embeddings.pkl").read_bytes())
    assert data["img_path"] == paths
    for p in data["img_path"]:
        p.encode("utf-8")  # strict: every img_path is valid UTF-8 text
    np.testing.assert_array_equal(data["embedding"], np.asarray(emb))
    from pipeline.query.inspection import verify

    assert verify(out) == []
