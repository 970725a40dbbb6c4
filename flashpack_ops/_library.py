"""Finds and loads the compiled flashpack ops library (flashpack_ops/_C*.so)."""

import glob
import os

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))


def library_path() -> str:
    """The path of the compiled ops library, for LibTorch programs and torch.ops.load_library.

    Raises:
        ImportError: if the library has not been built, with the command that builds it.
    """
    found = sorted(glob.glob(os.path.join(_HERE, "_C*.so")))
    if not found:
        raise ImportError(
            "flashpack_ops: the compiled library (flashpack_ops/_C*.so) was not found. Build it with\n"
            "    pip install --no-build-isolation .\n"
            "or, for development in the source tree,\n"
            "    python setup.py build_ext --inplace"
        )
    return found[0]


def load() -> None:
    if not hasattr(torch.ops, "flashpack") or not hasattr(torch.ops.flashpack, "load"):
        torch.ops.load_library(library_path())


def has_cuda() -> bool:
    """Whether the library was built with the CUDA load path (a GPU is still needed to use it)."""
    load()
    return bool(torch.ops.flashpack.built_with_cuda())
