#!/usr/bin/env bash
# Create the Python 3.10 venv that clip-pipeline uses for TPU-MLIR (BM1684X compiler + simulator).
#
#   scripts/setup_tpu_mlir.sh            # venv at ${CLIP_PIPELINE_TPU_MLIR_VENV:-~/.cache/clip-pipeline/tpu-mlir-venv}
#   PYTHON310=/path/to/python3.10 scripts/setup_tpu_mlir.sh
#   scripts/setup_tpu_mlir.sh --check    # only re-apply the fixes and run the smoke check
#
# Installs tpu_mlir[onnx]==1.30.2 (~2 GB; the wheel is Python 3.10 only) + psutil + numpy<2, plus
# pyzmq and msgpack for the simulator device's pipeline workers (infer.backend = "sim"), then
# applies two fixes (idempotent, safe to re-run; see docs/tpu-mlir.md):
#   1. the wheel bundles an old glibc (libc.so.6, libm.so.6, libpthread.so.0) in
#      tpu_mlir/lib/third_party/, which its tools put on LD_LIBRARY_PATH; on a newer system glibc
#      every tool then fails ("GLIBC_2.36 not found", "stack smashing detected"). They are moved to
#      tpu_mlir/lib/third_party.glibc-disabled/.
#   2. transform/OnnxOpt.py imports torch at top level only to turn an input into a numpy array;
#      the import is made optional, with an np.array fallback (no CPU torch for 3.10 needed).
#   3. run_calibration (INT8/mixed) imports three calibration modules with an unused top-level
#      'import torch'; those imports are made optional the same way.
set -euo pipefail

TPU_MLIR_VERSION=1.30.2
VENV="${CLIP_PIPELINE_TPU_MLIR_VENV:-$HOME/.cache/clip-pipeline/tpu-mlir-venv}"
CHECK_ONLY=0
case "${1:-}" in
  --check) CHECK_ONLY=1 ;;
  -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
  "") ;;
  *) echo "unknown argument: $1 (try --help)" >&2; exit 2 ;;
esac

say() { echo "[setup_tpu_mlir] $*"; }
die() { echo "[setup_tpu_mlir] ERROR: $*" >&2; exit 1; }

is_py310() { [ -x "$1" ] && [ "$("$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" = "3.10" ]; }

find_python310() {
  if [ -n "${PYTHON310:-}" ]; then
    is_py310 "$PYTHON310" || die "\$PYTHON310=$PYTHON310 is not a Python 3.10 interpreter."
    echo "$PYTHON310"; return
  fi
  local c root
  if command -v pyenv >/dev/null 2>&1; then
    root="$(pyenv root)"
    for c in $(ls -d "$root"/versions/3.10.*/bin/python3.10 2>/dev/null | sort -V -r); do
      is_py310 "$c" && { echo "$c"; return; }
    done
  fi
  for c in "$HOME"/.pyenv/versions/3.10.*/bin/python3.10 "$(command -v python3.10 || true)"; do
    [ -n "$c" ] && is_py310 "$c" && { echo "$c"; return; }
  done
  die "Python 3.10 not found (tpu_mlir ships only cp310 wheels).
  Install it (e.g. 'pyenv install 3.10.13') or point \$PYTHON310 at a python3.10 interpreter."
}

if [ "$CHECK_ONLY" = 0 ]; then
  if [ -x "$VENV/bin/python" ] && is_py310 "$VENV/bin/python"; then
    say "reusing venv $VENV"
  else
    [ -e "$VENV" ] && die "$VENV exists but is not a Python 3.10 venv; remove it or set CLIP_PIPELINE_TPU_MLIR_VENV."
    PY=$(find_python310)
    say "creating venv $VENV with $PY"
    mkdir -p "$(dirname "$VENV")"
    "$PY" -m venv "$VENV" || die "'$PY -m venv' failed (is the venv module available?)"
  fi
  say "installing tpu_mlir[onnx]==$TPU_MLIR_VERSION psutil 'numpy<2' pyzmq msgpack (first time: a few minutes, ~2 GB)"
  if ! "$VENV/bin/python" -m pip install --disable-pip-version-check \
      "tpu_mlir[onnx]==$TPU_MLIR_VERSION" psutil "numpy<2" "pyzmq>=25,<28" "msgpack>=1.0,<2"; then
    die "pip could not install tpu_mlir[onnx]==$TPU_MLIR_VERSION into $VENV.
  The package comes from PyPI (a ~312 MB cp310 manylinux wheel): check network access to PyPI/your index."
  fi
else
  [ -x "$VENV/bin/python" ] || die "no venv at $VENV; run without --check first."
fi

PKG=$("$VENV/bin/python" -c 'import importlib.util as u; s = u.find_spec("tpu_mlir"); print(list(s.submodule_search_locations)[0] if s else "")')
[ -n "$PKG" ] || die "tpu_mlir is not installed in $VENV; run this script without --check."
say "tpu_mlir at $PKG"

# Fix 1: the bundled glibc.
TP="$PKG/lib/third_party"
DISABLED="$PKG/lib/third_party.glibc-disabled"
mkdir -p "$DISABLED"
for f in libc.so.6 libm.so.6 libpthread.so.0; do
  if [ -e "$TP/$f" ] || [ -L "$TP/$f" ]; then
    mv -f "$TP/$f" "$DISABLED/$f"
    say "fix 1: moved bundled $f out of lib/third_party/"
  fi
done

# Fix 2: optional torch import in OnnxOpt.py.
ONNXOPT="$PKG/python/transform/OnnxOpt.py"
[ -f "$ONNXOPT" ] || die "$ONNXOPT not found: unexpected tpu_mlir layout (expected $TPU_MLIR_VERSION)."
"$VENV/bin/python" - "$ONNXOPT" <<'PY'
import re, sys
path = sys.argv[1]
src = open(path).read()
marker = "# clip-pipeline: optional torch"
if marker in src:
    print("[setup_tpu_mlir] fix 2: OnnxOpt.py already patched")
    sys.exit(0)
new, n1 = re.subn(r"^import torch\n",
                  "try:  " + marker + "\n    import torch\nexcept ImportError:\n    torch = None\n",
                  src, count=1, flags=re.M)
old_use = "torch.tensor(inputs[name]).numpy()"
n2 = new.count(old_use)
new = new.replace(old_use, "(np.array(inputs[name]) if torch is None else torch.tensor(inputs[name]).numpy())")
if n1 != 1 or n2 < 1:
    sys.exit("[setup_tpu_mlir] ERROR: OnnxOpt.py does not look like tpu_mlir 1.30.2's "
             f"(top-level 'import torch': {n1}, uses: {n2}); not patched")
open(path, "w").write(new)
print(f"[setup_tpu_mlir] fix 2: OnnxOpt.py torch import made optional ({n2} use(s) patched)")
PY

# Fix 3: run_calibration (INT8/mixed bmodels) imports calibration/kld_calibrator.py,
# simple_tunner.py and transformer_pattern.py, each of which has a top-level 'import torch' that
# the default calibration path never uses (kld_calibrator imports torch.quantization lazily, only
# for debug_cmd 'use_torch_observer_for_cali'). The imports are made optional, as in fix 2.
for rel in calibration/kld_calibrator.py calibration/simple_tunner.py calibration/transformer_pattern.py; do
  F="$PKG/python/$rel"
  [ -f "$F" ] || die "$F not found: unexpected tpu_mlir layout (expected $TPU_MLIR_VERSION)."
  "$VENV/bin/python" - "$F" <<'PY'
import re, sys
path = sys.argv[1]
src = open(path).read()
marker = "# clip-pipeline: optional torch"
if marker in src:
    print(f"[setup_tpu_mlir] fix 3: {path.split('/python/')[-1]} already patched")
    sys.exit(0)
new, n = re.subn(r"^import torch\n",
                 "try:  " + marker + "\n    import torch  # noqa: F401\nexcept ImportError:\n    torch = None\n",
                 src, count=1, flags=re.M)
if n != 1:
    sys.exit(f"[setup_tpu_mlir] ERROR: {path} has no top-level 'import torch'; not patched")
open(path, "w").write(new)
print(f"[setup_tpu_mlir] fix 3: {path.split('/python/')[-1]} torch import made optional")
PY
done

# Smoke check: versions, imports, and the tools start against the system glibc.
say "smoke check"
"$VENV/bin/python" - "$PKG" <<'PY' || die "smoke check failed (see above)"
import importlib.metadata as md, subprocess, sys, os
pkg = sys.argv[1]
np_ver = md.version("numpy")
assert np_ver.startswith("1."), f"numpy {np_ver}: need numpy<2 (pyruntime_bm returns NaNs with 2.x)"
sys.path.insert(0, os.path.join(pkg, "python"))
import pyruntime_bm  # noqa: F401  (the BM1684X runtime + simulator)
import zmq, msgpack  # noqa: F401,E401  (the simulator device's pipeline worker)
from transform import OnnxOpt  # noqa: F401  (fails if the torch fix is missing)
from calibration import kld_calibrator, simple_tunner, transformer_pattern  # noqa: F401,E401  (fix 3)
from calibration import search_qtable  # noqa: F401  (compile --quantize mixed: run_calibration --search fast_search)
bindir = os.path.dirname(sys.executable)
env = dict(os.environ, PATH=bindir + os.pathsep + os.environ.get("PATH", ""))
for tool in ("model_transform", "model_deploy", "model_tool"):
    exe = os.path.join(bindir, tool)
    assert os.path.exists(exe), f"{tool} missing from {bindir}"
r = subprocess.run([os.path.join(bindir, "model_tool")], env=env, capture_output=True, text=True)
out = r.stdout + r.stderr
assert "GLIBC" not in out and "stack smashing" not in out, out[-800:]
r = subprocess.run([os.path.join(bindir, "model_transform"), "--help"], env=env,
                   capture_output=True, text=True)
assert r.returncode == 0, (r.stdout + r.stderr)[-800:]
print(f"[setup_tpu_mlir] ok: tpu_mlir {md.version('tpu_mlir')}, numpy {np_ver}, "
      f"python {sys.version.split()[0]}; pyruntime_bm, OnnxOpt, model_tool, model_transform work")
PY
say "done. venv: $VENV"
[ "$VENV" = "$HOME/.cache/clip-pipeline/tpu-mlir-venv" ] || say "use it with: export CLIP_PIPELINE_TPU_MLIR_VENV=$VENV"
