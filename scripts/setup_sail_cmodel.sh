#!/usr/bin/env bash
# Build SOPHGO's real SAIL (sophon-sail v3.10.7: Handle/Tensor/Engine, Bmcv, EngineImagePreProcess)
# against the BM1684X cmodel that the TPU-MLIR wheel ships, so `sail.runtime = "cmodel"` and the
# differential conformance tests run the real library with the chip replaced by its software model.
#
#   scripts/setup_sail_cmodel.sh          # build (or say it is up to date) and install
#   scripts/setup_sail_cmodel.sh --check  # only import it in the venv and print what it found
#
# Needs (exits 1 with a one-line reason otherwise):
#   * the TPU-MLIR venv (scripts/setup_tpu_mlir.sh): ${CLIP_PIPELINE_TPU_MLIR_VENV:-~/.cache/clip-pipeline/tpu-mlir-venv}
#   * the vendored sources: ${CLIP_PIPELINE_SAIL_CMODEL_SRC:-<repo>/../shared/vendor/sail-cmodel}
#     (sophon-sail ec3a2d6, a libsophon 06c7ffe subset with the prebuilt VPP model, a patch; see its README)
#   * cmake >= 3.16, ninja, g++ (CI installs cmake and ninja from PyPI when they are missing)
# Offline. Output: ${CLIP_PIPELINE_SAIL_CMODEL:-<dir of the venv>/sail-cmodel}/
#   lib/   libbmcv.so (libsophon's bmcv built for the cmodel), libvpp_cmodel.so, tpu_module/
#   site/sophon/sail.cpython-310-x86_64-linux-gnu.so + __init__.py (sets TPUKERNEL_FIRMWARE_PATH)
#   stamp  hash of the inputs: a second run with the same inputs is instant
# and a .pth in the venv's site-packages, so `from sophon import sail` works in the venv's Python.
# Runs at `nice -n 19`, 2 parallel jobs (SAIL_CMODEL_JOBS); ~3 min on 2 cores.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${CLIP_PIPELINE_TPU_MLIR_VENV:-$HOME/.cache/clip-pipeline/tpu-mlir-venv}"
SRC="${CLIP_PIPELINE_SAIL_CMODEL_SRC:-$ROOT/../shared/vendor/sail-cmodel}"
OUT="${CLIP_PIPELINE_SAIL_CMODEL:-$(dirname "$VENV")/sail-cmodel}"
JOBS="${SAIL_CMODEL_JOBS:-2}"
PY="$VENV/bin/python"

say() { echo "[setup_sail_cmodel] $*"; }
die() { echo "[setup_sail_cmodel] $*" >&2; exit 1; }

CHECK_ONLY=0
case "${1:-}" in
  --check) CHECK_ONLY=1 ;;
  -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
  "") ;;
  *) echo "unknown argument: $1 (try --help)" >&2; exit 2 ;;
esac

[ -x "$PY" ] || die "no TPU-MLIR venv at $VENV (run scripts/setup_tpu_mlir.sh first, or set CLIP_PIPELINE_TPU_MLIR_VENV)"
T="$("$PY" -c 'import os, tpu_mlir; print(os.path.dirname(tpu_mlir.__file__))' 2>/dev/null)" \
  || die "tpu_mlir is not importable in $PY (re-run scripts/setup_tpu_mlir.sh)"
PYTAG="$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
[ "$PYTAG" = 3.10 ] || die "$PY is Python $PYTAG, expected 3.10 (the TPU-MLIR venv)"
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
PTH="$SITE/clip_pipeline_sail_cmodel.pth"

check() {
  # one line: what was imported from where, and that the cmodel device opens
  "$PY" - "$OUT/site" <<'EOF'
import os, sys
from sophon import sail
where = os.path.dirname(sail.__file__)
assert where.startswith(sys.argv[1]), f"sophon.sail comes from {where}, not {sys.argv[1]} (PYTHONPATH?)"
for name in ("Handle", "Engine", "Tensor", "Bmcv", "BMImage", "EngineImagePreProcess"):
    assert hasattr(sail, name), f"this sophon.sail has no {name}"
sail.set_print_flag(False)
n = sail.get_available_tpu_num()
h = sail.Handle(0)
print(f"[setup_sail_cmodel] ok: sophon.sail from {where}, {n} cmodel device(s), dev 0 opens")
EOF
}

if [ "$CHECK_ONLY" = 1 ]; then
  [ -f "$OUT/stamp" ] || die "not built yet: run scripts/setup_sail_cmodel.sh"
  check
  exit 0
fi

SAIL_TGZ="$SRC/sophon-sail-ec3a2d6.tar.gz"
LIBS_TGZ="$SRC/libsophon-06c7ffe-subset.tar.gz"
PATCH="$SRC/sail-cmodel-bmcv.patch"
STUBS="$SRC/bmcv_cmodel_stubs.cpp"
for f in "$SAIL_TGZ" "$LIBS_TGZ" "$PATCH" "$STUBS"; do
  [ -f "$f" ] || die "vendored SAIL sources missing: $f (set CLIP_PIPELINE_SAIL_CMODEL_SRC to the sail-cmodel dir)"
done
for tool in cmake ninja g++ patch; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool not found (cmake and ninja: python3 -m pip install cmake ninja; g++/patch: apt-get install g++ patch)"
done
for f in libbmlib.so libbmrt.so libcmodel_bm1684x.so libbm1684x_kernel_module.so; do
  [ -e "$T/lib/$f" ] || die "the TPU-MLIR wheel has no $T/lib/$f (tpu_mlir version changed?)"
done
BMLIB_H="$T/cross_toolchains/ppl_compile/deps/runtime/bmlib/include/bmlib_runtime.h"
[ -f "$BMLIB_H" ] || die "the TPU-MLIR wheel has no $BMLIB_H"

# Everything the result depends on; a change anywhere rebuilds.
STAMP="$( { sha256sum "$SAIL_TGZ" "$LIBS_TGZ" "$PATCH" "$STUBS" "$0" "$BMLIB_H" | cut -d' ' -f1
            echo "$T" "$PYTAG" "$OUT"; sha256sum "$T/lib/libbmlib.so" "$T/lib/libbmrt.so" | cut -d' ' -f1; } | sha256sum | cut -d' ' -f1)"
if [ -f "$OUT/stamp" ] && [ "$(cat "$OUT/stamp")" = "$STAMP" ] && [ -f "$PTH" ]; then
  say "up to date: $OUT (stamp ${STAMP:0:12}); --check imports it"
  exit 0
fi

say "building real SAIL for the BM1684X cmodel into $OUT (nice 19, $JOBS jobs, ~3 min)"
rm -f "$OUT/stamp"
W="$OUT/work"
# a work dir left by a run with the same inputs that failed later (e.g. at the import check) is
# reused: ninja then only redoes what is missing
if [ "$(cat "$W/inputs" 2>/dev/null)" != "$STAMP" ]; then
  rm -rf "$W"
  mkdir -p "$W"
  tar xzf "$SAIL_TGZ" -C "$W"
  tar xzf "$LIBS_TGZ" -C "$W"
  patch -s -p1 -d "$W/sophon-sail" < "$PATCH"
  echo "$STAMP" > "$W/inputs"
fi
rm -rf "$OUT/lib" "$OUT/site"
mkdir -p "$OUT/lib/tpu_module" "$OUT/site/sophon"
L="$W/libsophon"

# 1. A libsophon-style dir for SAIL's CMake: runtime + bmcv headers, the wheel's bmlib/bmrt.
rm -rf "$W/sophon"
mkdir -p "$W/sophon/include" "$W/sophon/lib"
cp "$L/bmlib/include/bmcpu_dev.h" "$L"/tpu-runtime/include/{bmdef.h,bmruntime_interface.h,bmruntime_cpp.h} \
   "$BMLIB_H" "$L"/bmvid/bmcv/include/{bmcv_api.h,bmcv_api_ext.h} "$W/sophon/include/"
for f in libbmlib.so libbmlib.so.0 libbmrt.so libbmrt.so.1.0; do
  [ -e "$T/lib/$f" ] && ln -s "$T/lib/$f" "$W/sophon/lib/$f"
done

# 2. libbmcv for the cmodel: libsophon's bmcv source with USING_CMODEL; VPP ops through the
#    prebuilt libvpp_cmodel.so, TPU-kernel ops through the wheel's cmodel (via libbmlib).
B="$W/bmcv-build"
mkdir -p "$B"
{
  echo "cflags = -std=c++11 -O1 -fPIC -w -DUSING_CMODEL -DCMODEL_CHIPID=0x1686 -DPCIE_MODE_ENABLE_CPU" \
       "-DCONFIG_NPU_SHIFT=6 -DCONFIG_EU_SHIFT=4 -DCONFIG_LOCAL_MEM_ADDRWIDTH=19 -DCONFIG_GLOBAL_MEM_SIZE=0x100000000" \
       "-I$L/bmvid/3rdparty/libbmcv/include -I$L/bmvid/bmcv/include -I$L/bmvid/bmcv/src -I$L/bmvid/vpp/driver/include/bm1684"
  echo "rule cxx"
  echo "  command = g++ \$cflags -c \$in -o \$out"
  echo "rule link"
  echo "  command = g++ -shared -o \$out -Wl,-soname,libbmcv.so.0 \$in -L$L/bmvid/3rdparty/libbmcv/lib/pcie -lvpp_cmodel -L$T/lib -lbmlib -ldl -lpthread '-Wl,-rpath,\$\$ORIGIN' -Wl,-rpath,$T/lib"
  objs=""
  for c in "$L"/bmvid/bmcv/src/*.cpp "$L"/bmvid/bmcv/src/bm1684*/*.cpp "$STUBS"; do
    o="$B/$(echo "${c#"$W"/}" | tr '/' '_').o"
    echo "build $o: cxx $c"
    objs="$objs $o"
  done
  echo "build $B/libbmcv.so: link$objs"
} > "$B/build.ninja"
nice -n 19 ninja -C "$B" -j "$JOBS" >"$B/log" 2>&1 || { tail -30 "$B/log" >&2; die "libbmcv (cmodel) failed to build; log: $B/log"; }
rm -f "$OUT/lib/libbmcv.so"; cp "$B/libbmcv.so" "$OUT/lib/libbmcv.so"
ln -s libbmcv.so "$OUT/lib/libbmcv.so.0"
cp "$L/bmvid/3rdparty/libbmcv/lib/pcie/libvpp_cmodel.so" "$OUT/lib/"
# bmcv checks that this path exists beside its own library; on the cmodel its content is unused
ln -s "$T/lib/libbm1684x_kernel_module.so" "$OUT/lib/tpu_module/libbm1684x_kernel_module.so"

# 3. SAIL with Bmcv + EngineImagePreProcess, without OpenCV/FFmpeg (the patch makes that build),
#    linked to the cmodel libbmcv and the wheel's runtime, with rpaths to both.
S="$W/sail-build"
nice -n 19 cmake -S "$W/sophon-sail" -B "$S" -G Ninja -DONLY_RUNTIME=ON -DBUILD_TYPE=pcie \
  -DLIBSOPHON_BASIC_PATH="$W/sophon" -DPYTHON_EXECUTABLE="$PY" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_CXX_FLAGS=-DUSE_BMCV=1 \
  -DCMAKE_SHARED_LINKER_FLAGS="-L$OUT/lib -Wl,--no-as-needed -lbmcv -Wl,-rpath,$OUT/lib -Wl,-rpath,$T/lib" \
  >"$S.configure.log" 2>&1 || { tail -30 "$S.configure.log" >&2; die "SAIL cmake configure failed; log: $S.configure.log"; }
# only the Python module: the C++ library target would compile every source a second time
nice -n 19 ninja -C "$S" -j "$JOBS" pysail >"$S.log" 2>&1 || { tail -30 "$S.log" >&2; die "SAIL failed to build; log: $S.log"; }
SO="$(find "$S" -name 'sail.cpython-310*.so' | head -1)"
[ -n "$SO" ] || die "the SAIL build made no sail.cpython-310*.so; log: $S.log"
cp "$SO" "$OUT/site/sophon/"
cat > "$OUT/site/sophon/__init__.py" <<EOF
"""SOPHGO's SAIL (sophon-sail ec3a2d6) built by scripts/setup_sail_cmodel.sh for the BM1684X cmodel.

Not a chip: libbmlib runs the TPU-MLIR wheel's software model of the BM1684X (dev_id 0 only), and
Bmcv's VPP runs libsophon's VPP model. No JPEG Decoder (the JPU has no software model).
"""
import os

#: where the chip's software model lives (libbmlib reads it when a device is opened)
CMODEL_FIRMWARE = "$T/lib/libcmodel_bm1684x.so"
os.environ.setdefault("TPUKERNEL_FIRMWARE_PATH", CMODEL_FIRMWARE)
CMODEL = True
EOF
echo "$OUT/site" > "$PTH"
check
echo "$STAMP" > "$OUT/stamp"
rm -rf "$W"  # ~0.3 GB of objects; the stamp makes the next run instant
say "done: $OUT"
