#!/usr/bin/env bash
# Fetch the CLIP ViT-B/32 image encoder as ONNX and as BM1684X bmodels into models/, the way
# Sophgo's samples do: the `dfss` tool from PyPI ("download_from_sophon_sftp") pulls archives from
# Sophgo's public SFTP (sail-api.md §6; CLIP-TPU scripts/download.sh, sophon-demo
# sample/CLIP/scripts/download.sh). Whether those archives are still online is UNCONFIRMED.
#
#   scripts/download.sh                 # CLIP-TPU archive: image 1b/8b/16b/32b bmodels + ONNX
#   SOURCE=sophon-demo scripts/download.sh   # sophon-demo archive (BM1684X 1b only)
#
# Environment: DOWNLOAD_TIMEOUT (seconds per dfss call, default 900), DFSS_PIP_INDEX (pip index for
# installing dfss, e.g. https://pypi.tuna.tsinghua.edu.cn/simple as Sophgo's scripts use),
# SKIP_MAGIC_CHECK=1 (accept bmodels whose first bytes are not the magic checked below).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
MODELS="$ROOT/models"
SOURCE="${SOURCE:-clip-tpu}"
TIMEOUT="${DOWNLOAD_TIMEOUT:-900}"
PY="${PYTHON:-python3}"

die() { echo "download.sh: error: $*" >&2; exit 1; }

case "$SOURCE" in
  clip-tpu)    ARCHIVE="ezoo/clip/models.zip" ;;                 # CTPU:scripts/download.sh
  sophon-demo) ARCHIVE="sophon-demo/CLIP/models.zip" ;;          # DEMO:sample/CLIP/scripts/download.sh
  *) die "SOURCE must be clip-tpu or sophon-demo, not '$SOURCE'" ;;
esac

command -v unzip >/dev/null || die "unzip is not installed (apt-get install unzip)"

if ! "$PY" -c "import dfss" 2>/dev/null; then
  echo "== installing dfss (Sophgo's download tool) from PyPI"
  pip_args=(install --upgrade dfss)
  [ -n "${DFSS_PIP_INDEX:-}" ] && pip_args+=(-i "$DFSS_PIP_INDEX")
  timeout 300 "$PY" -m pip "${pip_args[@]}" \
    || die "could not install dfss with pip (offline? set DFSS_PIP_INDEX to a reachable index, or copy the models into $MODELS by hand)"
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/clip-download.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

echo "== fetching open@sophgo.com:$ARCHIVE (timeout ${TIMEOUT}s)"
set +e
( cd "$WORK" && timeout "$TIMEOUT" "$PY" -m dfss --url="open@sophgo.com:$ARCHIVE" )
rc=$?
set -e
zip="$WORK/$(basename "$ARCHIVE")"
if [ $rc -eq 124 ]; then
  die "dfss timed out after ${TIMEOUT}s fetching $ARCHIVE: no connection to Sophgo's SFTP server (offline or firewalled?). Download it elsewhere and unzip it so that $MODELS/BM1684X/*.bmodel and $MODELS/onnx/*.onnx exist."
fi
if [ $rc -ne 0 ] || [ ! -s "$zip" ]; then
  die "dfss could not fetch $ARCHIVE (exit $rc; offline, or the archive moved?). Download it elsewhere and unzip it so that $MODELS/BM1684X/*.bmodel and $MODELS/onnx/*.onnx exist."
fi

echo "== unpacking"
unzip -q -o "$zip" -d "$WORK/unz" || die "$zip is not a valid zip archive (partial download?)"
src="$(find "$WORK/unz" -type d -name BM1684X -print -quit)"
[ -n "$src" ] || die "the archive has no BM1684X directory; contents: $(cd "$WORK/unz" && find . -maxdepth 3 | head -20 | tr '\n' ' ')"
mkdir -p "$MODELS/BM1684X" "$MODELS/onnx"
cp -f "$src"/*.bmodel "$MODELS/BM1684X/" 2>/dev/null || die "no .bmodel files under $src"
onnx_dir="$(find "$WORK/unz" -type d -name onnx -print -quit)"
[ -n "$onnx_dir" ] && cp -f "$onnx_dir"/*.onnx "$MODELS/onnx/" 2>/dev/null || true
proj="$(find "$WORK/unz" -name 'text_projection_512_512.npy' -print -quit)"
[ -n "$proj" ] && cp -f "$proj" "$MODELS/"

echo "== checking"
# bmodel magic: the file starts with uint32 0xFF55AAEE little-endian (TPU-MLIR/libsophon
# bmodel.cpp: "net compiler bmodel magic is 0xFF55AAEE"; 0xFF55AAFF for old bmtap2 files).
magic_ok() { local m; m="$(head -c 4 "$1" | od -An -tx1 | tr -d ' \n')"; [ "$m" = "eeaa55ff" ] || [ "$m" = "ffaa55ff" ]; }
n=0
for f in "$MODELS"/BM1684X/clip_image_vitb32_bm1684x_*.bmodel; do
  [ -e "$f" ] || continue
  [ -s "$f" ] || die "$f is empty"
  if ! magic_ok "$f"; then
    [ "${SKIP_MAGIC_CHECK:-0}" = 1 ] || die "$f does not start with the bmodel magic (got $(head -c 4 "$f" | od -An -tx1)); SKIP_MAGIC_CHECK=1 to accept it"
    echo "warning: $f: unexpected magic, accepted (SKIP_MAGIC_CHECK=1)" >&2
  fi
  echo "ok  $(du -h "$f" | cut -f1)  ${f#$ROOT/}"
  n=$((n + 1))
done
[ $n -gt 0 ] || die "no clip_image_vitb32_bm1684x_*.bmodel arrived in $MODELS/BM1684X"
for f in "$MODELS"/onnx/clip_image_vitb32.onnx; do
  [ -e "$f" ] || { echo "note: no ONNX image encoder in this archive" >&2; continue; }
  [ -s "$f" ] || die "$f is empty"
  # an ONNX ModelProto starts with field 1 (ir_version, varint): byte 0x08
  [ "$(head -c 1 "$f" | od -An -tx1 | tr -d ' ')" = "08" ] || die "$f does not look like an ONNX file"
  echo "ok  $(du -h "$f" | cut -f1)  ${f#$ROOT/}"
done
want="$MODELS/BM1684X/clip_image_vitb32_bm1684x_f16_32b.bmodel"
[ -s "$want" ] || echo "note: ${want#$ROOT/} (configs/bm1684x.toml) is not in this archive; point model.path at one of the files above" >&2
echo "done."
