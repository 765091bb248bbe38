"""Every error a user can cause: exit status 2 (usage/config) and a message naming what to fix."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import invoke

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "samples" / "images"
FAKE = ["--set", 'infer.backend="fake"']



def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("toml,names", [
    ("[infer]\nthreds = 2\n", ["infer.threds", "threads"]),
    ("[infer]\nthreads = \"two\"\n", ["infer.threads", "int", "'two'"]),
    ("[infer]\nthreads = 0\n", ["infer.threads", ">= 1"]),
    ("[output]\ndtype = \"float64\"\n", ["output.dtype", "'float32'"]),
    ("[outputs]\ndir = \"x\"\n", ["[outputs]", "known:"]),
    ("[input]\npaths = \"photos\"\n", ["input.paths", "list"]),
    ("[infer]\nbackend = \"cuda\"\n", ["infer.backend", "'cpu'"]),
    ("infer = 3\n", ["[infer]", "table"]),
])
def test_bad_config_values_name_the_key(tmp_path, toml, names):
    cfg = write(tmp_path / "c.toml", toml)
    r = invoke("run", "--config", cfg, "--dry-run")
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error: ")
    for n in names:
        assert n in r.output, (n, r.output)


def test_missing_config_file(tmp_path):
    r = invoke("run", "--config", tmp_path / "nope.toml")
    assert r.exit_code == 2 and f"config file {tmp_path / 'nope.toml'} does not exist" in r.output


def test_invalid_toml_names_the_file_and_line(tmp_path):
    cfg = write(tmp_path / "bad.toml", "[infer]\nthreads = = 2\n")
    r = invoke("run", "--config", cfg)
    assert r.exit_code == 2 and str(cfg) in r.output and "not valid TOML" in r.output and "line 2" in r.output


@pytest.mark.parametrize("assignment,names", [
    ("infer.threads", ["--set 'infer.threads'", "section.key=value"]),
    ("threads=2", ["--set 'threads=2'", "infer.threads=2"]),
    ("gpu.threads=2", ["unknown section [gpu]"]),
    ("infer.nope=2", ["infer.nope"]),
])
def test_bad_set_syntax(assignment, names):
    r = invoke("run", "-i", SAMPLES, "--dry-run", "--set", assignment)
    assert r.exit_code == 2, r.output
    for n in names:
        assert n in r.output, (n, r.output)


def test_missing_input_dir(tmp_path):
    r = invoke("run", "-i", tmp_path / "photos", "-o", tmp_path / "o", *FAKE, "--dry-run")
    assert r.exit_code == 2 and f"input path {tmp_path / 'photos'} does not exist" in r.output and "--input" in r.output


def test_no_inputs_configured(tmp_path):
    r = invoke("run", "-o", tmp_path / "o", *FAKE, "--dry-run")
    assert r.exit_code == 2 and "input.paths is empty" in r.output and "--input" in r.output


def test_missing_model_without_build(tmp_path):
    model = tmp_path / "m.onnx"
    r = invoke("run", "-i", SAMPLES, "-o", tmp_path / "o", "--set", f'model.path="{model}"', "--dry-run")
    assert r.exit_code == 2
    assert f"model file {model} does not exist (config key model.path)" in r.output and "model.build" in r.output


@pytest.mark.parametrize("device", ["gpu:0", "cpu0", "cpu:x"])
def test_bad_device_name(tmp_path, device):
    r = invoke("run", "-i", SAMPLES, "-o", tmp_path / "o", *FAKE, "-d", device, "--dry-run")
    assert r.exit_code == 2 and "infer.devices" in r.output and repr(device) in r.output and "cpu:0" in r.output


def test_device_listed_twice(tmp_path):
    r = invoke("run", "-i", SAMPLES, "-o", tmp_path / "o", *FAKE, "-d", "cpu:0", "-d", "cpu:0", "--dry-run")
    assert r.exit_code == 2 and "lists a device twice" in r.output


def test_output_is_a_file(tmp_path):
    (tmp_path / "o").write_text("x")
    r = invoke("run", "-i", SAMPLES, "-o", tmp_path / "o", *FAKE, "--dry-run")
    assert r.exit_code == 2 and f"output path {tmp_path / 'o'} exists and is not a directory" in r.output


def test_non_empty_foreign_output_dir(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    r = invoke("run", "-i", SAMPLES, "-o", out, *FAKE, "--quiet")
    assert r.exit_code == 2
    assert f"output directory {out} is not empty and holds no clip-pipeline run" in r.output
    assert (out / "thesis.tex").read_text() == "precious"


def _finished_run(tmp_path) -> Path:
    imgs = tmp_path / "imgs"
    shutil.copytree(SAMPLES, imgs)
    out = tmp_path / "o"
    r = invoke("run", "-i", imgs, "-o", out, *FAKE, "--quiet")
    assert r.exit_code == 0, r.output
    return out


def test_resume_with_different_config_names_the_difference(tmp_path):
    out = _finished_run(tmp_path)
    r = invoke("run", "-i", tmp_path / "imgs", "-o", out, *FAKE, "--set", "output.shard_size=7", "--quiet")
    assert r.exit_code == 2
    assert "different output.shard_size (4096 there, 7 now)" in r.output and "--restart" in r.output
    r = invoke("run", "-i", tmp_path / "imgs", "-o", out, *FAKE, "--set", 'output.on_existing="error"', "--quiet")
    assert r.exit_code == 2 and "output.on_existing = 'error'" in r.output and "--restart" in r.output


def test_inspect_and_report_on_a_non_run_dir(tmp_path):
    for cmd in ("inspect", "report"):
        r = invoke(cmd, tmp_path)
        assert r.exit_code == 2 and f"{tmp_path} holds no clip-pipeline run" in r.output, r.output
        r = invoke(cmd, tmp_path / "missing")
        assert r.exit_code == 2 and f"{tmp_path / 'missing'} does not exist" in r.output
    (tmp_path / "manifest.json").write_text("{broken")
    r = invoke("inspect", tmp_path)
    assert r.exit_code == 2 and "manifest.json is damaged" in r.output and "--restart" in r.output


def test_unknown_option_is_usage_error():
    r = invoke("run", "--thread", "2")
    assert r.exit_code == 2 and "--thread" in r.output


def test_error_reaches_stderr_of_the_real_command(tmp_path):
    """The same message through the installed entry point's code path, as a user sees it."""
    cfg = write(tmp_path / "c.toml", "[infer]\nthreds = 2\n")
    p = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "--config", str(cfg)], cwd=ROOT,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, check=False,
                       timeout=60)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.startswith("error: unknown config key infer.threds (known keys in [infer]: ")
    assert "threads" in p.stderr and len(p.stderr.strip().splitlines()) == 1

