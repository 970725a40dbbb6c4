#!/usr/bin/env bash
# Makes sure clang++ can build libFuzzer targets with ASan and UBSan, installing clang with
# apt-get where it cannot (Debian and Ubuntu; as root, or through sudo).
set -euo pipefail

probe() {
  local out
  out=$(mktemp)
  echo 'extern "C" int LLVMFuzzerTestOneInput(const unsigned char*, unsigned long) { return 0; }' |
    clang++ -x c++ -fsanitize=fuzzer,address,undefined - -o "$out" 2>/dev/null
  local status=$?
  rm -f "$out"
  return $status
}

if command -v clang++ >/dev/null && probe; then
  echo "clang++ builds fuzz targets: $(clang++ --version | head -n 1)"
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
$SUDO apt-get update -q
$SUDO apt-get install -y -q clang
if ! probe; then
  # libFuzzer and the sanitizer runtimes are a package of their own on newer distributions.
  version=$(clang++ --version | sed -n 's/.*clang version \([0-9]*\).*/\1/p' | head -n 1)
  $SUDO apt-get install -y -q "libclang-rt-$version-dev" || $SUDO apt-get install -y -q libclang-rt-dev
fi
probe || { echo "clang++ still cannot build libFuzzer targets" >&2; exit 1; }
echo "clang++ builds fuzz targets: $(clang++ --version | head -n 1)"
