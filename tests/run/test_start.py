"""What a run starts from (pipeline/run/start.py): the output's hold, and a run whose output vanishes."""

from __future__ import annotations

from robust_helpers import good_corpus, start_cli, wait_for


def test_output_deleted_mid_run_is_exit_4_and_nothing_is_recreated(tmp_path):
    good_corpus(tmp_path / "in", 200)
    out = tmp_path / "out"
    p = start_cli(tmp_path / "in", out, **{"fake.latency_ms_per_batch": 300})
    wait_for(lambda: (out / "embeddings" / "part-00000.npy").exists(), 60, "the first shard")
    import shutil

    shutil.rmtree(out)
    _stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 4, stderr
    assert f"the output directory {out} was deleted or moved during the run" in stderr and "Traceback" not in stderr
    assert not out.exists()
