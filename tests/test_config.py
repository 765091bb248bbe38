"""The configuration (pipeline/config.py): overrides, bounds and refusals before any work, and the
README's configuration reference generated from it and kept current (with the quick start)."""

from __future__ import annotations

import dataclasses
import os
import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cli, cli_env, invoke
from robust_helpers import good_corpus

from pipeline import config
from pipeline.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _gen():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gen_config_docs
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    return gen_config_docs


def test_every_config_key_has_a_doc():
    missing = [key for key, f in config.iter_keys() if not f.metadata.get("doc", "").strip()]
    assert not missing, f"config keys without a doc (add metadata doc in pipeline/config.py): {missing}"


def test_readme_reference_is_up_to_date():
    gen = _gen()
    assert gen.render(README) == README, (
        "README.md's configuration reference is out of date: run python3 scripts/gen_config_docs.py")


def test_every_key_appears_in_the_readme_reference():
    gen = _gen()
    section = README.split(gen.BEGIN, 1)[1].split(gen.END, 1)[0]
    for name, cls in config.SECTIONS.items():
        assert f"#### `[{name}]`" in section
        for f in dataclasses.fields(cls):
            assert f"| `{f.name}` |" in section, f"{name}.{f.name} is not documented in README.md"


def test_check_mode_detects_a_stale_readme(tmp_path):
    gen = _gen()
    stale = README.replace("| `threads` |", "| `threads_old` |")
    assert gen.render(stale) != stale
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_config_docs.py"), "--check"],
                       cwd=ROOT, capture_output=True, text=True, check=False, timeout=60)
    assert p.returncode == 0, p.stderr


def test_readme_quick_start_is_two_commands_and_one_test_command():
    qs = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = qs.split("```sh\n", 1)[1].split("```", 1)[0].strip().splitlines()
    assert block == ["python3 -m pip install -e '.[test]'", "clip-pipeline run --config configs/cpu.toml"]
    assert "`python3 -m pytest -q`" in qs


def test_readme_lists_every_command_and_dependency():
    from pipeline.cli import cli

    for name in cli.list_commands(None):
        assert f"clip-pipeline {name}" in README, name
    setup = (ROOT / "setup.cfg").read_text()
    reqs = setup.split("install_requires =", 1)[1].split("\n[", 1)[0].split()
    for req in reqs:
        pkg = req.split(">")[0].split("<")[0].split("=")[0]
        rng = req[len(pkg):]
        assert f"| {pkg} | {rng} |" in README, f"README's dependency table lacks {pkg} {rng}"


# -- the README's code blocks run as written --------------------------------------------------------

def _blocks(lang: str) -> list[str]:
    return [body for kind, body in re.findall(r"^```(\w*)\n(.*?)^```", README, re.MULTILINE | re.DOTALL)
            if kind == lang]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _run_python_blocks(cwd: Path) -> None:
    blocks = _blocks("python")
    assert blocks, "README.md has no python code block"
    for code in blocks:
        p = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=_env(), capture_output=True, text=True,
                           timeout=120, check=False)
        assert p.returncode == 0, f"README python block failed:\n{code}\n{p.stderr[-2000:]}"


def test_readme_fenced_blocks_are_shell_python_or_plain_text():
    kinds = {kind for kind, _ in re.findall(r"^```(\w*)\n(.*?)^```", README, re.MULTILINE | re.DOTALL)}
    assert kinds <= {"sh", "python", ""}, kinds  # a new kind needs a runner below


def test_readme_python_blocks_run(tmp_path):
    """The Python API snippet, run as written, against a run at out/cpu-demo (fake backend here;
    the slow test below makes it with the quick start's real command)."""
    p = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "--config", str(ROOT / "configs" / "cpu.toml"),
                        "-i", str(ROOT / "samples" / "images"), "-o", str(tmp_path / "out" / "cpu-demo"),
                        "--set", 'infer.backend="fake"', "--set", 'model.build=""', "--quiet"],
                       cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 0, p.stderr
    _run_python_blocks(tmp_path)


@pytest.mark.slow
def test_readme_shell_blocks_run_as_written(tmp_path):
    """Every `clip-pipeline` line of the README's sh blocks, in a fresh directory holding what a
    clone holds (configs/, samples/), then the Python snippet on its output. `pip install` lines
    are the environment this test already runs in (CI runs them on a clean clone)."""
    for name in ("configs", "samples"):
        shutil.copytree(ROOT / name, tmp_path / name)
    ran = 0
    for block in _blocks("sh"):
        for line in block.strip().splitlines():
            if line.startswith("python3 -m pip install"):
                continue
            assert line.startswith("clip-pipeline "), f"README sh line with no runner here: {line}"
            args = line.split()[1:]
            p = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=tmp_path, env=_env(),
                               capture_output=True, text=True, timeout=1200, check=False)
            assert p.returncode == 0, f"{line}\n{p.stderr[-2000:]}"
            ran += 1
    assert ran >= 1
    _run_python_blocks(tmp_path)


def test_config_overrides_and_errors():
    cfg = config.load(None, ["infer.threads=2", 'infer.devices=["cpu:0","cpu:1"]', "output.normalize=false"])
    assert cfg.infer.threads == 2 and cfg.infer.devices == ("cpu:0", "cpu:1") and not cfg.output.normalize
    with pytest.raises(config.ConfigError, match="infer.thread"):
        config.load(None, ["infer.thread=2"])
    with pytest.raises(config.ConfigError, match="output.shard_size: must be >= 1"):
        config.load(None, ["output.shard_size=0"])
    with pytest.raises(config.ConfigError, match="preprocess.mode"):
        config.load(None, ['preprocess.mode="quick"'])
    with pytest.raises(config.ConfigError, match="section.key=value"):
        config.load(None, ["threads=2"])


@pytest.mark.parametrize("key", ["run.stall_timeout_s", "preprocess.decode_timeout_s", "run.start_timeout_s"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_timeouts_are_refused(key, value):
    """A NaN stall timeout passed `>= min` (every comparison with NaN is false) and switched the
    watchdog off: a hang."""
    with pytest.raises(ConfigError, match=rf"{key}: must be a finite number"):
        config.load(None, [f"{key}={value}"])


def test_absurd_worker_count_and_image_size_are_refused_before_work(tmp_path):
    good_corpus(tmp_path / "in", 2)
    for key, value in (("workers.decode", 100000), ("model.image_size", 100000)):
        r = subprocess.run(cli("run", "--dry-run", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "o"),
                               "--set", "infer.backend=\"fake\"", "--set", f"{key}={value}"),
                           cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, (key, r.stdout, r.stderr)
        assert f"config key {key}: must be <= 1024" in r.stderr and "Traceback" not in r.stderr


def test_workers_over_the_open_file_limit_are_refused(tmp_path):
    """workers.decode within the cap but over `ulimit -n`: exit 2 naming the key and the limit,
    not an EMFILE traceback once hundreds of processes are up."""
    good_corpus(tmp_path / "in", 2)

    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    r = subprocess.run(cli("run", "--dry-run", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "o"),
                           "--set", "infer.backend=\"fake\"", "--set", "workers.decode=200"),
                       cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=60, preexec_fn=low_limit)
    assert r.returncode == 2, r.stderr
    assert "workers.decode=200" in r.stderr and "ulimit -n" in r.stderr and "256" in r.stderr


def test_empty_output_is_refused_not_replaced_by_the_config_dir(tmp_path):
    good_corpus(tmp_path / "in", 2)
    r = invoke("run", "-i", tmp_path / "in", "--output", "", "--set", 'infer.backend="fake"', "--progress", "none")
    assert r.exit_code == 2, r.output
    assert "output.dir (--output) is empty" in r.output
    assert not (ROOT / "out").exists() or not (ROOT / "out" / "manifest.json").exists()


def test_missing_relative_input_in_a_config_says_what_it_resolved_against(tmp_path, monkeypatch):
    conf = tmp_path / "conf" / "c.toml"
    conf.parent.mkdir()
    conf.write_text('[input]\npaths = ["images"]\n[infer]\nbackend = "fake"\n')
    monkeypatch.chdir(tmp_path)
    r = invoke("run", "--config", conf, "-o", tmp_path / "o", "--dry-run")
    assert r.exit_code == 2
    assert f"resolves against the current directory, {tmp_path}" in r.output


def test_readme_says_which_python_and_how_to_make_a_venv():
    text = (ROOT / "README.md").read_text()
    quick = text[text.index("## Quick start"):text.index("## Commands")]
    assert "Python 3.11 or newer" in quick and "python3 -m venv" in quick
    assert "is coming" not in text and "--no-build-isolation" in text
