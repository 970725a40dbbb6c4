"""Build flashpack_ops: one Python-agnostic shared library holding the flashpack ops.

Environment flags (read once, here):
  FLASHPACK_FORCE_CUDA=1   build the CUDA path even if torch reports no GPU (needs nvcc)
  FLASHPACK_NO_CUDA=1      build the CPU-only library even where CUDA is available (wins over
                           FLASHPACK_FORCE_CUDA, so that one command can ask for a CPU build
                           in an environment that forces CUDA)
  FLASHPACK_DEBUG=1        -O0 -g, for debuggers and sanitizers
"""

import glob
import os
import shutil

import setuptools
from setuptools import find_packages, setup


def _cuda_home_with_headers():
    # torch takes CUDA_HOME from the directory above `which nvcc`; where nvcc is a link or a
    # wrapper script (/usr/local/bin/nvcc) that directory has no CUDA headers.
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    candidates = [os.path.dirname(os.path.dirname(p)) for p in (nvcc, os.path.realpath(nvcc))]
    for home in candidates + ["/usr/local/cuda"]:
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH") and _cuda_home_with_headers():
    os.environ["CUDA_HOME"] = _cuda_home_with_headers()

import torch  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

# pyproject.toml's torch>=2.6, said here too: `python setup.py install` does not check it, and
# an older torch would fail deep in the C++ build.
if torch.__version__ < (2, 6):
    raise RuntimeError(f"flashpack_ops needs torch 2.6 or newer; this environment has torch {torch.__version__}")

FORCE_CUDA = os.environ.get("FLASHPACK_FORCE_CUDA", "0") == "1"
NO_CUDA = os.environ.get("FLASHPACK_NO_CUDA", "0") == "1"
DEBUG = os.environ.get("FLASHPACK_DEBUG", "0") == "1"
# CUDA needs a CUDA build of torch and nvcc; a GPU is only needed to run, not to build.
WITH_CUDA = not NO_CUDA and torch.version.cuda is not None and CUDA_HOME is not None
if FORCE_CUDA and not NO_CUDA and not WITH_CUDA:
    raise RuntimeError("FLASHPACK_FORCE_CUDA=1 but torch has no CUDA or nvcc was not found")
print(
    f"flashpack_ops build: torch {torch.__version__}, WITH_CUDA={WITH_CUDA} "
    f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME}), DEBUG={DEBUG}"
)

HERE = os.path.dirname(os.path.abspath(__file__))


def extension():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cxx = ["-O0", "-g"] if DEBUG else ["-O3"]
    cxx += ["-Wall", "-Wno-unused-parameter"]
    # NOTE: calls between the library's own functions go straight to them, not through the
    # PLT as calls another library could interpose on would: the footer parser runs a few
    # such calls per JSON value, and loading 20,000 tensors' index took a sixth longer.
    cxx += ["-fno-semantic-interposition"]
    kwargs = dict(
        name="flashpack_ops._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        # NOTE: the library has no Python.h and is loaded with torch.ops.load_library,
        # so one build serves every CPython and LibTorch-only programs alike.
        py_limited_api=True,
    )
    if WITH_CUDA:
        kwargs["sources"] += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        return CUDAExtension(**kwargs, define_macros=[("WITH_CUDA", None)],
                             extra_compile_args={"cxx": cxx + ["-DWITH_CUDA"], "nvcc": ["-O3"]})
    return CppExtension(**kwargs, extra_compile_args={"cxx": cxx})


def license_field():
    # setuptools 77 and later take an SPDX expression and deprecate the old field (builds
    # with it stop being supported in 2027); older ones know only the old field.
    major = int(setuptools.__version__.split(".")[0])
    return {"license_expression": "MIT"} if major >= 77 else {"license": "MIT"}


setup(
    **license_field(),
    packages=find_packages(include=["flashpack_ops", "flashpack_ops.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},  # as requires-python
)
