#!/usr/bin/env bash
# Builds the LibTorch example and runs it; exits non-zero if any check fails.
#
#   torchscript/run.sh [--from-sources] [DIR]
#
# By default the program links the library Python uses (flashpack_ops/_C*.so, which must
# be built); --from-sources builds csrc/ here instead. DIR receives the inputs Python writes
# (default: the build folder). Environment: PYTHON (default python3), JOBS (default 2).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
PYTHON="${PYTHON:-python3}"
# Works from a source checkout as well as an installed package.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

FROM_SOURCES=0
if [[ "${1:-}" == "--from-sources" ]]; then
  FROM_SOURCES=1
  shift
fi

if [[ $FROM_SOURCES == 1 ]]; then
  OPS_LIBRARY=""
  BUILD="$HERE/build/sources"
else
  OPS_LIBRARY="$("$PYTHON" -c 'import flashpack_ops; print(flashpack_ops.library_path())')"
  BUILD="$HERE/build/library"
fi
DIR="${1:-$BUILD/data}"

TORCH_PREFIX="$("$PYTHON" -c 'import torch; print(torch.utils.cmake_prefix_path)')"
cmake -S "$HERE" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" \
  -DFLASHPACK_OPS_LIBRARY="$OPS_LIBRARY" >/dev/null
cmake --build "$BUILD" -j "${JOBS:-2}"

"$PYTHON" "$HERE/make_inputs.py" "$DIR"

PROGRAM="$BUILD/flashpack_example"
if ldd "$PROGRAM" | grep -E 'libpython|libtorch_python'; then
  echo "FAILED: $PROGRAM links Python" >&2
  exit 1
fi
echo "ok: ldd shows no libpython or libtorch_python"
"$PROGRAM" "$DIR"
