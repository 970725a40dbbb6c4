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
# With a CUDA build of torch, find_package(Torch) looks for a CUDA toolkit, NVRTC included.
# Point it at the toolkit nvcc belongs to (nvcc may be a wrapper script elsewhere), and at
# the NVRTC that torch's wheel brings where that toolkit has none.
mapfile -t CUDA_HINTS < <("$PYTHON" - <<'EOF'
import glob, os, shutil
import torch
if torch.version.cuda:
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        homes += [os.path.dirname(os.path.dirname(p)) for p in (nvcc, os.path.realpath(nvcc))]
    homes.append("/usr/local/cuda")
    home = next((h for h in homes if h and os.path.exists(os.path.join(h, "bin", "nvcc"))
                 and os.path.exists(os.path.join(h, "include", "cuda_runtime.h"))), None)
    if home:
        print(f"-DCUDA_TOOLKIT_ROOT_DIR={home}")
        print(f"-DCMAKE_CUDA_COMPILER={os.path.join(home, 'bin', 'nvcc')}")
        if not glob.glob(os.path.join(home, "lib*", "libnvrtc.so*")):
            site = os.path.dirname(os.path.dirname(torch.__file__))
            wheel = sorted(glob.glob(os.path.join(site, "nvidia", "*", "lib", "libnvrtc.so*")))
            if wheel:
                print(f"-DCUDA_nvrtc_LIBRARY={wheel[0]}")
EOF
)
# A build folder that came along when the checkout was copied or moved still names the
# source folder it was made for, and cmake refuses it: start that one afresh.
CACHED_SOURCE="$(sed -n 's/^CMAKE_HOME_DIRECTORY:INTERNAL=//p' "$BUILD/CMakeCache.txt" 2>/dev/null || true)"
if [[ -n "$CACHED_SOURCE" && ! "$CACHED_SOURCE" -ef "$HERE" ]]; then
  rm -rf "$BUILD"
fi
cmake -S "$HERE" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" \
  -DFLASHPACK_OPS_LIBRARY="$OPS_LIBRARY" "${CUDA_HINTS[@]}" >/dev/null
cmake --build "$BUILD" -j "${JOBS:-2}"

"$PYTHON" "$HERE/make_inputs.py" "$DIR"

PROGRAM="$BUILD/flashpack_example"
if ldd "$PROGRAM" | grep -E 'libpython|libtorch_python'; then
  echo "FAILED: $PROGRAM links Python" >&2
  exit 1
fi
echo "ok: ldd shows no libpython or libtorch_python"
"$PROGRAM" "$DIR"
