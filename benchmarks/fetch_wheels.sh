#!/usr/bin/env bash
# Fills .whl/ at the repository root (git-ignored) with the wheels benchmarks/gpu_check.sh
# installs on a GPU machine without a network: the reference flashpack 0.4.5, accelerate, click,
# ninja, diffusers and requests (for diffusers' integration's GPU tests: a machine whose
# huggingface_hub no longer needs requests may lack it), and what the plot and the memory
# readings import, for that machine's Python.
# Run it where PyPI can be reached, then copy the tree with .whl/ to the GPU machine.
#
#   benchmarks/fetch_wheels.sh              # wheels for CPython 3.12 (PYTHON_VERSION=3.11, ...)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
PYTHON_VERSION="${PYTHON_VERSION:-3.12}"
mkdir -p .whl
# Pure-Python wheels, and ninja's (one binary for every Python).
"$PY" -m pip download -q --no-deps -d .whl flashpack==0.4.5 accelerate==1.15.0 click ninja \
  diffusers==0.42.1 importlib_metadata zipp requests urllib3 idna certifi
# Compiled wheels for the GPU machine's Python, whatever Python runs this.
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  -d .whl matplotlib contourpy kiwisolver pillow fonttools cycler pyparsing python-dateutil six psutil \
  charset_normalizer
ls .whl
