"""eval linear-probe on generated CIFAR pickles and ImageFolder trees (tiny random-weight model)."""

from __future__ import annotations

import json
import pickle
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT, cli, cli_env
from shapes import write_cifar, write_imagefolder

pytest.importorskip("sklearn")


def probe(tiny_model, *args):
    return subprocess.run(cli("eval", "linear-probe", "--set", f'model.path="{tiny_model}"', "--threads", "1", *args),
                          capture_output=True, text=True, env=cli_env(), cwd=ROOT)


def test_linear_probe_cifar_pickles_random_weights(tmp_path, tiny_model):
    root = write_cifar(tmp_path)
    r = probe(tiny_model, "--train", str(root / "train"), "--test", str(root / "test"), "--c-grid", "30,300",
              "--work", str(tmp_path / "work"), "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["n_train"] == 300 and res["n_test"] == 100 and res["classes"] == 10
    assert res["top1"] >= 0.9, res
    assert res["top5"] >= res["top1"]
    assert str(res["C"]) in {f"{float(c):g}" for c in res["sweep"]} or f"{res['C']:.6g}" in res["sweep"]
    assert res["validation_top1"] == max(res["sweep"].values())
    assert len(res["sweep"]) == 4  # the grid, then one finer step either side of the best
    assert res["synthetic_weights"] is True and "80.08%" in res["note"]
    assert (tmp_path / "work" / "features-train" / "manifest.json").exists()  # the work dir is a normal run


def test_linear_probe_imagefolder_text_output(tmp_path, tiny_model):
    write_imagefolder(tmp_path / "train", 30, seed=0)
    write_imagefolder(tmp_path / "test", 10, seed=1)
    r = probe(tiny_model, "--train", str(tmp_path / "train"), "--test", str(tmp_path / "test"), "--c-grid", "100,1000")
    assert r.returncode == 0, r.stderr
    lines = dict(line.split(": ", 1) for line in r.stdout.splitlines() if ": " in line)
    assert float(lines["top-1 accuracy"]) >= 0.9, r.stdout
    assert "chosen C = " in r.stdout and "SYNTHETIC" in r.stdout and "needs the real CLIP weights" in r.stdout


def test_test_classes_absent_from_training(tmp_path, tiny_model):
    write_imagefolder(tmp_path / "train", 3, seed=0, classes=[0, 1, 2])
    write_imagefolder(tmp_path / "test", 2, seed=1, classes=[1, 2, 5, 7])
    r = probe(tiny_model, "--train", str(tmp_path / "train"), "--test", str(tmp_path / "test"))
    assert r.returncode == 2
    assert "classes absent from the training set" in r.stderr and "circle_5" in r.stderr and "cross_8" not in r.stderr
    assert "(4 test images)" in r.stderr and r.stderr.count("error:") == 1
    root = write_cifar(tmp_path / "c", n_train=2, n_test=1, test_classes=[0, 9])
    with open(root / "train", "rb") as fh:  # a training set without class 9
        d = pickle.load(fh)
    keep = [i for i, y in enumerate(d[b"fine_labels"]) if y != 9]
    d[b"data"], d[b"fine_labels"] = d[b"data"][keep], [d[b"fine_labels"][i] for i in keep]
    with open(root / "train", "wb") as fh:
        pickle.dump(d, fh)
    r = probe(tiny_model, "--train", str(root / "train"), "--test", str(root / "test"))
    assert r.returncode == 2 and "bar_9" in r.stderr and "(1 test images)" in r.stderr, r.stderr


def test_bad_dataset_arguments(tmp_path, tiny_model):
    root = write_cifar(tmp_path, n_train=1, n_test=1)
    (tmp_path / "junk").write_bytes(b"not a pickle")
    (tmp_path / "empty").mkdir()
    cases = [
        (["--train", str(tmp_path / "nope"), "--test", str(root / "test")], "does not exist"),
        (["--train", str(tmp_path / "junk"), "--test", str(root / "test")], "is not a CIFAR python pickle"),
        (["--train", str(root), "--test", str(root / "test")], "give its files"),
        (["--train", str(tmp_path / "empty"), "--test", str(root / "test")], "no class subdirectories"),
        (["--train", str(root / "train"), "--test", str(root / "test"), "--c-grid", "x"], "--c-grid"),
    ]
    for args, msg in cases:
        r = probe(tiny_model, *args)
        assert r.returncode == 2 and msg in r.stderr, (args, r.stderr)


def test_zero_shot_matches_classify_on_the_same_features(tmp_path, tiny_model):
    import csv

    write_imagefolder(tmp_path / "test", 4, seed=2)
    r = subprocess.run(cli("eval", "zero-shot", "--set", f'model.path="{tiny_model}"', "--test", str(tmp_path / "test"),
                           "--work", str(tmp_path / "work"), "--json"), capture_output=True, text=True, env=cli_env(), cwd=ROOT)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["n_test"] == 40 and res["classes"] == 10 and res["synthetic_weights"] is True
    assert 0 <= res["top1"] <= res["top5"] <= 1
    # the same features through `classify` (the text engineer's command) give the same top-1
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(n.replace("_", " ") + "\n" for n in sorted(p.name for p in (tmp_path / "test").iterdir())))
    r = subprocess.run(cli("classify", str(tmp_path / "work" / "features-test"), "--labels", str(labels),
                           "-o", str(tmp_path / "zs")), capture_output=True, text=True, env=cli_env(), cwd=ROOT)
    assert r.returncode == 0, r.stderr
    with open(tmp_path / "zs" / "predictions.csv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    correct = sum(Path(row["path"]).parent.name.replace("_", " ") == row["label_1"] for row in rows)
    assert len(rows) == 40 and correct / 40 == pytest.approx(res["top1"])
    (tmp_path / "bad.txt").write_text("no placeholder\n")
    r = subprocess.run(cli("eval", "zero-shot", "--test", str(tmp_path / "test"), "--templates", str(tmp_path / "bad.txt")),
                       capture_output=True, text=True, env=cli_env(), cwd=ROOT)
    assert r.returncode == 2 and "needs a {}" in r.stderr
