#!/usr/bin/env bash
# Create the private venv in which the tests run clip-retrieval's own metadata readers and autofaiss
# against this project's clip-retrieval layout (tests/data/test_inputs.py; issue #27, item 7).
#
#   scripts/setup_clip_retrieval_venv.sh   # venv at ${CLIP_PIPELINE_CLIP_RETRIEVAL_VENV:-~/.cache/clip-pipeline/clip-retrieval-venv}
#
# clip-retrieval 2.45.0 is installed with --no-deps (its full dependency list pulls torch, clip,
# img2dataset, ...); what its metadata readers and clip_back module import is installed by name.
# autofaiss pins numpy<2, which is why this is a venv of its own and not the project's interpreter.
set -euo pipefail

VENV="${CLIP_PIPELINE_CLIP_RETRIEVAL_VENV:-$HOME/.cache/clip-pipeline/clip-retrieval-venv}"
PY="${PYTHON:-python3}"
say() { echo "[setup_clip_retrieval_venv] $*"; }

"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check \
  "autofaiss==2.18.0" "pandas<3" "pyarrow>=12,<22" "h5py>=3" "tqdm" "fire" "fsspec" \
  "flask" "flask_restful" "flask_cors" "prometheus_client" "Pillow"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps "clip-retrieval==2.45.0"
# the smoke check: clip_back's metadata readers import, and autofaiss's CLI answers
# (the package's __init__ imports every command, torch included: the test imports clip_back alone,
# as tests/clip_retrieval_readers.py does)
"$VENV/bin/python" - <<'PY'
import importlib.util, sys, types
pkg = types.ModuleType("clip_retrieval")
pkg.__path__ = list(importlib.util.find_spec("clip_retrieval").submodule_search_locations)
sys.modules["clip_retrieval"] = pkg
from clip_retrieval.clip_back import parquet_to_hdf5, Hdf5MetadataProvider, ArrowMetadataProvider, ParquetMetadataProvider
PY
"$VENV/bin/autofaiss" build_index --help >/dev/null
say "done. python: $VENV/bin/python"
