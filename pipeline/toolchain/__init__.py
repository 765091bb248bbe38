"""TPU-MLIR toolchain driver: compile ONNX image encoders to BM1684X bmodels and run them on the
BM1684X simulator, from the main interpreter. TPU-MLIR itself lives in a Python 3.10 venv made by
``scripts/setup_tpu_mlir.sh``; nothing here imports ``tpu_mlir``."""
from .env import DEFAULT_VENV, VENV_ENV, TpuMlirMissing, find_venv, tpu_mlir_dir, venv_dir, venv_python
from .runner import BmodelRunner, SimulatorError, run_bmodel

__all__ = [
    "DEFAULT_VENV", "VENV_ENV", "TpuMlirMissing", "find_venv", "tpu_mlir_dir", "venv_dir",
    "venv_python", "BmodelRunner", "SimulatorError", "run_bmodel",
]
