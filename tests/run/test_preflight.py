"""Pre-start checks shared by `run` and `run --dry-run` (pipeline/run/preflight.py), as pure functions."""

from __future__ import annotations

import pytest

from pipeline import config
from pipeline.run.preflight import compare_inputs, describe_run, fingerprint_refusal, model_refusal_before_build

FP = {"model_sha256": "a" * 64, "backend": "cpu", "preprocess_mode": "reference", "shard_size": 4096,
      "inputs": ["/photos"], "dtype": "float32"}


def test_fingerprint_refusal_names_config_keys_and_values():
    assert fingerprint_refusal("/o", FP, dict(FP)) is None
    msg = fingerprint_refusal("/o", FP, {**FP, "preprocess_mode": "fast", "model_sha256": "b" * 64})
    assert "different model.path (a model with sha256 aaaaaaaaaaaa there, bbbbbbbbbbbb now); " in msg
    assert "preprocess.mode ('reference' there, 'fast' now)" in msg
    assert "preprocess_mode" not in msg and "model_sha256" not in msg
    assert msg.startswith("output directory /o holds a run") and "--restart" in msg
    msg = fingerprint_refusal("/o", FP, {**FP, "inputs": ["/photos", "/more"]})
    assert "input.paths (['/photos'] there, ['/photos', '/more'] now)" in msg


def _cfg(**model):
    return config.from_dict({"model": {"path": "/nowhere/new.onnx", "build": "vit-b32", **model}})


def test_a_model_to_be_built_is_refused_before_building_when_it_cannot_match():
    from pipeline.model.modelgen import BUILDER

    real = {"model": {"path": "/m/real.onnx", "sha256": "c" * 64, "info": {}}}
    msg = model_refusal_before_build(_cfg(), "/o", real)
    assert "different model.path (/m/real.onnx there" in msg and "/nowhere/new.onnx" in msg
    assert "Nothing was built" in msg and "--restart" in msg
    same = {"model": {"path": "/m/old.onnx", "sha256": "d" * 64,
                      "info": {"synthetic": True, "builder": BUILDER, "arch": "vit-b32", "seed": 0, "input_kind": "float"}}}
    assert model_refusal_before_build(_cfg(), "/o", same) is None  # same bytes: building is right
    assert model_refusal_before_build(_cfg(seed=1), "/o", same) is not None
    assert model_refusal_before_build(_cfg(build=""), "/o", real) is None  # nothing would be built


def _manifest(status, total, listed, done, shard_size=5, embedded=0, failed=0):
    return {"status": status, "shard_size": shard_size, "counts": {"total": total, "embedded": embedded, "failed": failed},
            "inputs": {"listed": listed, "listing_complete": total is not None}}


def test_describe_run_states():
    assert describe_run(_manifest("complete", 14, 14, None, embedded=12, failed=2), [0, 1, 2]) == \
        "complete: 3 of 3 shards, 14 inputs (12 embedded, 2 failed)"
    assert describe_run(_manifest("interrupted", 14, 14, None), [0]) == \
        "interrupted: 1 of 3 shards complete, 14 inputs listed"
    line = describe_run(_manifest("running", None, 7, None), [0])
    assert line.startswith("interrupted (the process was killed") and "listing not finished (7 inputs so far)" in line


ROOTS = [b"/p/b", b"/p/a"]  # input.paths order, not sorted
LISTING = [b"/p/b/1.jpg", b"/p/b/x/2.jpg", b"/p/a/3.jpg", b"/p/a/4.jpg"]


@pytest.mark.parametrize("walk,added,removed", [
    (LISTING, 0, 0),
    ([b"/p/b/0-first.jpg", *LISTING], 1, 0),               # sorts first: the case resumes used to miss
    ([*LISTING, b"/p/a/5.jpg"], 1, 0),
    ([b"/p/b/1.jpg", b"/p/a/3.jpg", b"/p/a/4.jpg"], 0, 1),
    ([b"/p/b/1.jpg", b"/p/b/x/2.jpg", b"/p/b/y.jpg", b"/p/a/4.jpg"], 1, 1),
    ([], 0, 4),
])
def test_compare_inputs_streams_in_walk_order(walk, added, removed):
    ch = compare_inputs(lambda: iter(LISTING), lambda: iter(walk), ROOTS)
    assert (ch.added, ch.removed) == (added, removed)
    assert bool(ch) == bool(added or removed)


def test_compare_inputs_falls_back_to_sets_for_an_unordered_listing():
    unordered = [LISTING[2], LISTING[0], LISTING[3], LISTING[1]]
    ch = compare_inputs(lambda: iter(unordered), lambda: iter([*LISTING, b"/p/a/9.jpg"]), ROOTS)
    assert (ch.added, ch.removed, ch.first_added) == (1, 0, [b"/p/a/9.jpg"])


def test_changes_summary_shows_names_in_their_text_form():
    ch = compare_inputs(lambda: iter(LISTING), lambda: iter([*LISTING[:3], b"/p/a/new\n\xff.jpg"]), ROOTS)
    assert ch.summary() == '1 input(s) added ("/p/a/new\\n\\xff.jpg") and 1 removed (/p/a/4.jpg)'
