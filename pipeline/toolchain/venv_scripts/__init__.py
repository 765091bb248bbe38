"""Scripts that run INSIDE the TPU-MLIR Python 3.10 venv (started by pipeline.toolchain via
subprocess; never imported by the main interpreter). A package only so that they ship with it."""
