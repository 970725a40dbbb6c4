#!/usr/bin/env bash
# Set-up in one command: a virtual environment in .venv with torch and the test
# dependencies, flashpack_ops built into it, then the quickstart example.
#
#   TORCH_SPEC   the torch to install (default torch==2.13.0; on a machine that already
#                has the torch it wants, set TORCH_SPEC="" to keep it)
#   PYTHON       the interpreter to make the venv with (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC-torch==2.13.0}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate

# torch first, by exact version: nothing later may pull another build of it.
if [ -n "$TORCH_SPEC" ]; then
  python -m pip install -q "$TORCH_SPEC"
fi
python -m pip install -q setuptools wheel ninja
# The reference package, which the compatibility tests compare against, installs a command
# named `flashpack` too: installed first, so that the package installed after it owns it.
python -m pip install -q "flashpack==0.4.5"
# The package and its test dependencies; --no-build-isolation builds against the torch
# installed above instead of downloading another one into a build environment.
python -m pip install -q --no-build-isolation -e ".[test]"

python examples/quickstart.py
