#!/usr/bin/env bash
# Runs a command against the emulated CUDA runtime (fake_cudart.cpp), e.g.
#   tests/cuda_emulator/run.sh python -m pytest tests/test_cuda.py
# from a venv holding a CUDA build of torch and a CUDA build of flashpack_ops (nvcc is
# needed to build them, a GPU is not). The emulator is built into build/cuda-emulator/.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${FAKE_CUDA_BUILD_DIR:-$here/../../build/cuda-emulator}"
cuda_include="${CUDA_HOME:-/usr/local/cuda}/include"
mkdir -p "$out"
if [[ ! -f "$out/libfake_cudart.so" || "$here/fake_cudart.cpp" -nt "$out/libfake_cudart.so" ]]; then
  g++ -O2 -g -shared -fPIC -std=c++17 -Wall -Wextra -Wno-unused-parameter -I"$cuda_include" \
    "$here/fake_cudart.cpp" -Wl,--version-script="$here/libcudart.map" -pthread -o "$out/libfake_cudart.so"
fi
if [[ ! -f "$out/libcuda.so.1" || "$here/fake_libcuda.c" -nt "$out/libcuda.so.1" ]]; then
  gcc -O2 -shared -fPIC -Wall "$here/fake_libcuda.c" -o "$out/libcuda.so.1"
fi
export LD_LIBRARY_PATH="$out${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LD_PRELOAD="$out/libfake_cudart.so${LD_PRELOAD:+:$LD_PRELOAD}"
export FAKE_CUDA_DELAY_US="${FAKE_CUDA_DELAY_US:-200}"
exec "$@"
