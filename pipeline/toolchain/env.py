"""Locating the TPU-MLIR Python 3.10 venv and running things inside it.

The main interpreter (3.11) never imports ``tpu_mlir``: every TPU-MLIR step runs in the venv that
``scripts/setup_tpu_mlir.sh`` creates, through ``subprocess``.
"""
from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

VENV_ENV = "CLIP_PIPELINE_TPU_MLIR_VENV"
DEFAULT_VENV = Path.home() / ".cache" / "clip-pipeline" / "tpu-mlir-venv"
TPU_MLIR_VERSION = "1.30.2"
SETUP_HINT = "run scripts/setup_tpu_mlir.sh"
SCRIPTS_DIR = Path(__file__).resolve().parent / "venv_scripts"


class TpuMlirMissing(RuntimeError):
    """The TPU-MLIR venv (Python 3.10 + tpu_mlir) is not available."""


def missing_message(venv: Path, problem: str) -> str:
    return (
        f"TPU-MLIR is not available: {problem}.\n"
        f"  venv looked for: {venv} (set ${VENV_ENV} to use another)\n"
        f"  To create it, {SETUP_HINT} (needs Python 3.10: pyenv's 3.10.x or $PYTHON310; "
        f"installs tpu_mlir[onnx]=={TPU_MLIR_VERSION}, ~2 GB)."
    )


def venv_dir(venv: str | os.PathLike | None = None) -> Path:
    """The venv path to use: argument, else $CLIP_PIPELINE_TPU_MLIR_VENV, else the default."""
    if venv:
        return Path(venv).expanduser()
    env = os.environ.get(VENV_ENV)
    return Path(env).expanduser() if env else DEFAULT_VENV


def venv_python(venv: str | os.PathLike | None = None) -> Path:
    """Path of the venv's interpreter (not checked; see :func:`find_venv`)."""
    return venv_dir(venv) / "bin" / "python"


@functools.lru_cache(maxsize=8)
def _probe(py: str) -> tuple[str, str, str]:
    """(python version, tpu_mlir package dir, numpy version) of a venv interpreter."""
    code = (
        "import sys, importlib.util, importlib.metadata as m\n"
        "s = importlib.util.find_spec('tpu_mlir')\n"
        "print('%d.%d' % sys.version_info[:2])\n"
        "print(list(s.submodule_search_locations)[0] if s else '')\n"
        "print(m.version('numpy'))\n"
    )
    out = subprocess.run([py, "-c", code], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise TpuMlirMissing(f"{py} failed to start: {out.stderr.strip()[-500:]}")
    lines = out.stdout.strip().splitlines()
    return lines[0], lines[1] if len(lines) > 1 else "", lines[2] if len(lines) > 2 else ""


def find_venv(venv: str | os.PathLike | None = None) -> Path:
    """Return the TPU-MLIR venv directory, or raise :class:`TpuMlirMissing` with a fix."""
    d = venv_dir(venv)
    py = d / "bin" / "python"
    if not py.exists():
        raise TpuMlirMissing(missing_message(d, f"no interpreter at {py}"))
    try:
        ver, pkg, npver = _probe(str(py))
    except (OSError, subprocess.SubprocessError, TpuMlirMissing) as e:
        raise TpuMlirMissing(missing_message(d, f"cannot run {py} ({e})")) from None
    if ver != "3.10":
        raise TpuMlirMissing(missing_message(d, f"{py} is Python {ver}, tpu_mlir needs 3.10"))
    if not pkg:
        raise TpuMlirMissing(missing_message(d, "package tpu_mlir is not installed in it"))
    if npver.split(".")[0] != "1":
        raise TpuMlirMissing(missing_message(
            d, f"numpy {npver} in it; pyruntime_bm needs numpy<2 (silent NaNs otherwise)"))
    return d


def tpu_mlir_dir(venv: str | os.PathLike | None = None) -> Path:
    """The installed ``tpu_mlir`` package directory inside the venv."""
    d = find_venv(venv)
    return Path(_probe(str(d / "bin" / "python"))[1])


def venv_env(venv: str | os.PathLike | None = None) -> dict[str, str]:
    """Environment for running the venv's tools: its bin/ first on PATH."""
    d = find_venv(venv)
    env = dict(os.environ)
    env["PATH"] = f"{d / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(d)
    env.pop("PYTHONPATH", None)
    env.pop("PYTHONHOME", None)
    return env


def venv_script(name: str) -> Path:
    """Path of one of the helper scripts that run inside the venv."""
    return SCRIPTS_DIR / name
