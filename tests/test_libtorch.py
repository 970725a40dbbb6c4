"""The LibTorch example (torchscript/): a C++ program with no Python in it, built and run by run.sh."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

import flashpack_ops
from conftest import torchscript_refusal

REPO = os.path.dirname(os.path.dirname(os.path.abspath(flashpack_ops.__file__)))
RUN = os.path.join(REPO, "torchscript", "run.sh")


def _missing() -> str:
    """What the example needs and this machine lacks ('' if nothing)."""
    if not os.path.exists(RUN):
        return f"no {RUN}: flashpack_ops is installed, not a source checkout"
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    missing = [name for name, found in (("cmake", shutil.which("cmake")), ("a C++ compiler", compiler),
                                        ("ldd", shutil.which("ldd"))) if not found]
    return f"needs {' and '.join(missing)} to build the LibTorch example" if missing else ""


MISSING = _missing() or torchscript_refusal()


@pytest.mark.skipif(bool(MISSING), reason=MISSING)
def test_libtorch_program_loads_and_runs_scripted_model(tmp_path):
    run = subprocess.run(["bash", RUN, str(tmp_path)], env=dict(os.environ, PYTHON=sys.executable),
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "ok: ldd shows no libpython or libtorch_python" in run.stdout
    assert "ok: no libpython or libtorch_python in the process" in run.stdout
    assert "all checks passed" in run.stdout, run.stdout
    if torch.cuda.is_available() and flashpack_ops.has_cuda():
        # Where there is a GPU, the program's CUDA checks run too, none skipped.
        assert "ok: flashpack::load to cuda" in run.stdout, run.stdout
        assert "ok: the scripted model runs on the GPU" in run.stdout, run.stdout

    # Written by the C++ program, read here: one format on both sides.
    weight = torch.arange(12, dtype=torch.float32).reshape(3, 4) / 8 - 0.5
    table = torch.arange(6).reshape(2, 3).to(torch.bfloat16)
    written = flashpack_ops.load_file(tmp_path / "from_cpp.flashpack")
    assert list(written) == ["doubled", "table"]
    assert torch.equal(written["doubled"], weight * 2)
    assert written["table"].dtype == torch.bfloat16 and torch.equal(written["table"], table)


@pytest.mark.skipif(bool(MISSING), reason=MISSING)
def test_libtorch_program_builds_where_a_build_folder_came_from_elsewhere(tmp_path):
    # run.sh builds inside torchscript/, so a checkout copied or moved after a build brings a
    # CMake cache that names the folder it was made for, which cmake refuses to reuse.
    checkout = tmp_path / "checkout"
    shutil.copytree(os.path.dirname(RUN), checkout / "torchscript", ignore=shutil.ignore_patterns("build"))
    shutil.copytree(os.path.join(REPO, "csrc"), checkout / "csrc")  # flashpack_api.h
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "CMakeLists.txt").write_text("cmake_minimum_required(VERSION 3.18)\nproject(elsewhere NONE)\n")
    subprocess.run(["cmake", "-S", str(elsewhere), "-B", str(checkout / "torchscript" / "build" / "library")],
                   check=True, capture_output=True)
    env = dict(os.environ, PYTHON=sys.executable,
               PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    run = subprocess.run(["bash", str(checkout / "torchscript" / "run.sh"), str(tmp_path / "data")], env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "all checks passed" in run.stdout, run.stdout
