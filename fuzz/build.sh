#!/usr/bin/env bash
# Builds the fuzz targets (fuzz/build/fuzz_footer, fuzz/build/fuzz_load) with libFuzzer,
# AddressSanitizer and UndefinedBehaviorSanitizer, against the torch of $PYTHON.
# Needs clang with its runtime libraries; on Debian 12: apt-get install clang libclang-rt-14-dev
set -euo pipefail
cd "$(dirname "$0")/.."

CXX=${CXX:-clang++}
PYTHON=${PYTHON:-python3}
OUT=fuzz/build
mkdir -p "$OUT"

TORCH_DIR=$("$PYTHON" -c 'import os, torch; print(os.path.dirname(torch.__file__))')
ABI=$("$PYTHON" -c 'import torch; print(int(torch.compiled_with_cxx11_abi()))')
# NOTE: -O1 keeps the sanitizers' reports readable and the targets fast enough for
# thousands of runs a second; vptr checks are off because libtorch's classes come
# from an uninstrumented library and trip them falsely.
FLAGS=(-std=c++20 -g -O1 -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize=vptr
       -fno-sanitize-recover=all -D_GLIBCXX_USE_CXX11_ABI="$ABI" -Icsrc
       -isystem "$TORCH_DIR/include" -isystem "$TORCH_DIR/include/torch/csrc/api/include")
LIBS=(-L"$TORCH_DIR/lib" -Wl,-rpath,"$TORCH_DIR/lib" -ltorch_cpu -lc10)

# The code under test is instrumented for coverage; only the harnesses link libFuzzer's main.
pids=()
for src in json format io bus_guard checksum load_cpu; do
  "$CXX" "${FLAGS[@]}" -fsanitize=fuzzer-no-link -c "csrc/$src.cpp" -o "$OUT/$src.o" & pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done

"$CXX" "${FLAGS[@]}" -fsanitize=fuzzer fuzz/fuzz_footer.cpp "$OUT"/{json,format,io,bus_guard,checksum}.o \
  "${LIBS[@]}" -o "$OUT/fuzz_footer"
"$CXX" "${FLAGS[@]}" -fsanitize=fuzzer fuzz/fuzz_load.cpp "$OUT"/{json,format,io,bus_guard,checksum,load_cpu}.o \
  "${LIBS[@]}" -o "$OUT/fuzz_load"
echo "built $OUT/fuzz_footer $OUT/fuzz_load"
