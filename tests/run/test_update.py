"""run --update (issue #18): only new inputs are embedded, appended as new shards; existing rows and
ids never change; removed inputs are recorded; renamed/copied files are skipped by content hash."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import cli, cli_env
from imagegen import make_images, write_shard

from pipeline import config as cfgmod
from pipeline.config import ConfigError
from pipeline.data.rundir import EMB_DIR
from pipeline.output import iter_shards, listed_inputs, load_embeddings
from pipeline.query.inspection import verify
from pipeline.run.progress import Progress
from pipeline.run.supervisor import Supervisor
from pipeline.run.update import run_update


def load(out, inputs_, model, **sets):
    overrides = [f"{k}={v}" for k, v in sets.items()]
    return cfgmod.load(None, [f'model.path="{model}"', "model.batch_size=4", "output.shard_size=4",
                              "infer.batch_timeout_ms=20", *overrides],
                       input_paths=[str(p) for p in inputs_], output_dir=str(out))


def snapshot(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (out / EMB_DIR).iterdir()}


def test_update_after_add_delete_rename_embeds_every_current_input_once(tmp_path, tiny_model):
    imgs = tmp_path / "imgs"
    made = make_images(imgs, 10)
    (imgs / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "out"
    cfg = load(out, [imgs], tiny_model)
    assert Supervisor(cfg, progress=Progress("none")).run().exit_code == 3
    before = snapshot(out)
    old_paths, old_emb = load_embeddings(out)
    old_emb = np.asarray(old_emb)
    # add 5 (one sorts first), delete 2, rename 1
    make_images(imgs / "new", 4, seed=9)
    make_images(imgs / "0first", 1, seed=11)
    made[3].unlink()
    made[5].unlink()
    made[7].rename(imgs / "renamed.jpg")
    res = run_update(cfg, progress=Progress("none"), log=lambda m: None)
    assert res.exit_code == 0, res.message
    assert "6 new input(s) embedded" in res.message and "3 removed since" in res.message
    after = snapshot(out)
    assert {n: after[n] for n in before} == before  # no existing shard file changed
    paths, emb = load_embeddings(out)
    assert paths[:len(old_paths)] == old_paths
    np.testing.assert_array_equal(np.asarray(emb)[:len(old_paths)], old_emb)
    # every current input has exactly one row; removed ones are recorded
    current = sorted(str(p) for p in imgs.rglob("*.*") if p.name != "broken.jpg")
    rows = Counter(paths)
    assert all(rows[p] == 1 for p in current), [p for p in current if rows[p] != 1]
    removed = (out / "updates" / "u-0001.removed.txt").read_text().splitlines()
    assert sorted(removed) == sorted(str(p) for p in (made[3], made[5], made[7]))
    # new shards come after the old ones, ids continue at the next shard boundary
    ks = [s.index for s in iter_shards(out)]
    assert ks == list(range(len(ks))) and ks[-1] >= 3
    fail_ids = [json.loads(line)["id"] for line in (out / "failures.jsonl").read_text().splitlines()]
    assert fail_ids == [0]  # broken.jpg sorts first
    ids = dict(listed_inputs(out))
    assert ids[12] == str(imgs / "0first" / "img_000.jpg").encode()  # 11 listed -> next shard starts at id 12
    assert verify(out) == []
    # a second update with nothing new is a no-op on the shards
    snap = snapshot(out)
    res = run_update(cfg, progress=Progress("none"), log=lambda m: None)
    assert res.exit_code == 0 and "Nothing new to embed" in res.message, res.message
    assert snapshot(out) == snap
    # a plain re-run of the same command sees nothing added or removed, and changes nothing
    res = Supervisor(cfg, progress=Progress("none")).run()
    assert res.exit_code == 3 and "Note" not in res.message, res.message
    assert snapshot(out) == snap and load_embeddings(out)[0] == paths and verify(out) == []


def test_content_hash_skips_renamed_and_copied_files(tmp_path, tiny_model):
    imgs = tmp_path / "imgs"
    made = make_images(imgs, 6)
    out = tmp_path / "out"
    cfg = load(out, [imgs], tiny_model, **{"output.content_hash": "true"})
    assert Supervisor(cfg, progress=Progress("none")).run().exit_code == 0
    assert len((out / EMB_DIR / "part-00000.hashes").read_text().splitlines()) == 4
    made[1].rename(imgs / "moved.jpg")
    shutil.copy(made[2], imgs / "copy.jpg")
    make_images(imgs / "fresh", 1, seed=5)
    res = run_update(cfg, progress=Progress("none"), log=lambda m: None)
    assert res.exit_code == 0, res.message
    assert "1 new input(s) embedded" in res.message and "2 skipped as the content" in res.message
    aliases = [json.loads(x) for x in (out / "updates" / "u-0001.aliases.jsonl").read_text().splitlines()]
    assert {(Path(a["path"]).name, Path(a["same_as"]).name) for a in aliases} == {
        ("moved.jpg", made[1].name), ("copy.jpg", made[2].name)}
    paths, _ = load_embeddings(out)
    assert len(paths) == 7


def test_update_refuses_an_unfinished_run_or_another_model(tmp_path, tiny_model):
    make_images(tmp_path / "imgs", 3)
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="needs a finished run"):
        run_update(load(out, [tmp_path / "imgs"], tiny_model), log=lambda m: None)
    assert Supervisor(load(out, [tmp_path / "imgs"], tiny_model), progress=Progress("none")).run().exit_code == 0
    with pytest.raises(ConfigError, match="different preprocess_mode"):
        run_update(load(out, [tmp_path / "imgs"], tiny_model, **{"preprocess.mode": '"fast"'}), log=lambda m: None)
    proc = subprocess.run(cli("run", "--update", "--restart", "--input", str(tmp_path / "imgs"), "--output", str(out)),
                          capture_output=True, text=True, env=cli_env())
    assert proc.returncode == 2 and "--update and --restart" in proc.stderr, proc.stderr


def test_update_from_the_command_line_with_tar_shards(tmp_path, tiny_model):
    imgs = make_images(tmp_path / "imgs", 6)
    shards = tmp_path / "shards"
    shards.mkdir()
    write_shard(shards / "00000.tar", imgs[:3])
    base = ["--input", str(shards), "--output", str(tmp_path / "out"), "--set", f'model.path="{tiny_model}"',
            "--set", "output.shard_size=2", "--progress", "none"]
    assert subprocess.run(cli("run", *base), env=cli_env(), capture_output=True).returncode == 0
    write_shard(shards / "00001.tar", imgs[3:])
    proc = subprocess.run(cli("run", "--update", *base), env=cli_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "3 new input(s) embedded" in proc.stdout
    paths, emb = load_embeddings(tmp_path / "out")
    assert [p.split("/")[-2:] for p in paths] == [["00000.tar", f"{i:09d}.jpg"] for i in range(3)] + \
        [["00001.tar", f"{i:09d}{imgs[3 + i].suffix}"] for i in range(3)]


# -- an updated output stays one run: counts, the manifest, recovery (issue #27 item 5) ---------------

def _fake_cli(*args: str, env_extra: dict | None = None, progress: str = "none") -> subprocess.CompletedProcess:
    return subprocess.run(cli(*args, "--set", 'infer.backend="fake"', "--set", "output.shard_size=4",
                              "--set", "model.batch_size=4", "--progress", progress),
                          env=cli_env(**(env_extra or {})), capture_output=True, text=True, timeout=180)


def _updated_outputs(tmp_path: Path, *names: str) -> tuple[list[Path], list[str]]:
    """Finished fake-backend runs (one per name) over the same 10 photos (shard size 4), then 9 new
    inputs, one of them broken: an update fills 3 shards. Returns (the outputs, the input arguments)."""
    imgs = tmp_path / "imgs"
    make_images(imgs, 10)
    outs = [tmp_path / name for name in names]
    for out in outs:
        r = _fake_cli("run", "--input", str(imgs), "--output", str(out))
        assert r.returncode == 0, r.stderr
    make_images(imgs / "new", 8, seed=7)
    (imgs / "new" / "zz_broken.jpg").write_bytes(b"not an image")
    return outs, ["--input", str(imgs)]


def _files(out: Path) -> dict[str, bytes]:
    """Every file of OUT but report.json, the manifest's timestamps removed."""
    files = {}
    for p in sorted(out.rglob("*")):
        if p.is_file() and p.name != "report.json":
            data = p.read_bytes()
            if p.name == "manifest.json":
                m = json.loads(data)
                for k in ("created", "updated"):
                    m.pop(k, None)
                m["config"]["output"].pop("dir")  # compared across directories
                data = json.dumps(m, sort_keys=True).encode()
            files[str(p.relative_to(out))] = data
    return files


def test_a_plain_run_over_an_updated_output_counts_the_update_and_keeps_it(tmp_path):
    [out], inputs = _updated_outputs(tmp_path, "out")
    args = [*inputs, "--output", str(out)]
    r = _fake_cli("run", "--update", *args)
    assert r.returncode == 3 and "8 new input(s) embedded" in r.stdout, r.stdout + r.stderr
    after_update = _files(out)
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"] == {"embedded": 18, "failed": 1, "total": 19} and m["shards"] == [0, 1, 2, 3, 4, 5]
    assert [u["update"] for u in m["updates"]] == [1]
    # inspect and --dry-run count the update's inputs and shards
    r = subprocess.run(cli("inspect", str(out)), env=cli_env(), capture_output=True, text=True, timeout=60)
    assert "19 listed, 18 embedded, 1 failed" in r.stdout and "shards:   6 of 6 complete" in r.stdout, r.stdout
    r = _fake_cli("run", "--dry-run", *args)
    assert r.returncode == 0 and "complete: 6 of 6 shards" in r.stdout, r.stdout + r.stderr
    # a plain run of the same command: nothing to do, the counts include the update, nothing is lost
    r = _fake_cli("run", *args)
    assert r.returncode == 3, r.stderr
    assert "Embedded 18 of 19 images" in r.stdout and "of 10" not in r.stdout, r.stdout
    assert _files(out) == after_update
    assert verify(out) == []
    # report --all lists the update among the runs over this directory
    r = subprocess.run(cli("report", str(out), "--all"), env=cli_env(), capture_output=True, text=True, timeout=60)
    assert "3 runs over this output directory" in r.stdout, r.stdout
    assert "update 1" in r.stdout and "9 inputs this run" in r.stdout, r.stdout
    # an update that only records a removed input is listed by the manifest at once (no later
    # "finished publishing" for it)
    next(Path(inputs[1]).glob("img_*.jpg")).unlink()
    r = _fake_cli("run", "--update", *args)
    assert r.returncode == 0 and "Nothing new to embed" in r.stdout and "1 input(s) removed" in r.stdout, r.stdout
    assert [u["update"] for u in json.loads((out / "manifest.json").read_text())["updates"]] == [1, 2]
    r = _fake_cli("run", *args, progress="log")
    assert r.returncode == 3 and "finished publishing" not in r.stderr, r.stderr


def test_a_damaged_update_shard_is_kept_and_named_not_deleted_by_a_resume(tmp_path):
    """A resume redoes a damaged shard of its own listing; one an update added cannot be redone (its
    inputs are in the update's listing), so the run stops with exit 2 naming it, and keeps it."""
    [out], inputs = _updated_outputs(tmp_path, "out")
    args = [*inputs, "--output", str(out)]
    assert _fake_cli("run", "--update", *args).returncode == 3
    m = json.loads((out / "manifest.json").read_text())
    assert m["shards"] == [0, 1, 2, 3, 4, 5]
    victim = sorted((out / EMB_DIR).glob("*00004*.npy"))[0]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the embeddings: the checksum says so
    victim.write_bytes(bytes(data))
    r = _fake_cli("run", *args)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "00004" in r.stderr and "update 1" in r.stderr and "--restart" in r.stderr, r.stderr
    assert victim.read_bytes() == bytes(data)  # kept for the user to restore, not deleted
    # the run's own shards are still redone as before
    own = sorted((out / EMB_DIR).glob("*00001*.npy"))[0]
    victim.write_bytes(bytes(data[:-1]) + bytes([data[-1] ^ 0xFF]))
    own.write_bytes(own.read_bytes()[:-1] + bytes([own.read_bytes()[-1] ^ 0xFF]))
    r = _fake_cli("run", *args)
    assert r.returncode == 3 and "is damaged" in r.stderr, r.stdout + r.stderr
    assert verify(out) == []


def test_update_killed_mid_publish_is_finished_by_the_next_run(tmp_path):
    """The update dies after moving its 2nd shard into place (the next plain run finishes it), or
    after the last move and before the run's files are refreshed (the next --update finishes it):
    deaths injected by tests/fault_injection. Either way the output ends byte-identical to an update
    that was never interrupted (before: "Nothing new to embed", the manifest without the update,
    an empty failures.jsonl, and inspect --verify failing)."""
    (ref, *outs), inputs = _updated_outputs(tmp_path, "ref", "shard2", "refresh")
    r = _fake_cli("run", "--update", *inputs, "--output", str(ref))
    assert r.returncode == 3, r.stderr
    for out, death, again in zip(outs, ("shard:2", "refresh"), ([], ["--update"])):
        args = [*inputs, "--output", str(out)]
        r = _fake_cli("run", "--update", *args, env_extra={"CLIP_PIPELINE_TEST_DIE_IN_PUBLISH": death})
        assert r.returncode == 86, r.stdout + r.stderr  # the hook's os._exit
        assert _files(out) != _files(ref)
        r = _fake_cli("run", *again, *args, progress="log")
        assert r.returncode == (0 if again else 3), r.stdout + r.stderr
        assert "finished publishing update 1" in r.stderr, r.stdout + r.stderr
        assert _files(out) == _files(ref), death
        assert verify(out) == [], death
