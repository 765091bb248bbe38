"""The README's configuration reference is generated from pipeline/config.py and kept current."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import config

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

    for name in cli.commands:
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
