"""The README's configuration reference is generated from pipeline/config.py and kept current."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

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
