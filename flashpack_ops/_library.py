"""Finds and loads the compiled flashpack ops library (flashpack_ops/_C*.so)."""

import glob
import os

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))


def library_path() -> str:
    """The path of the compiled ops library, for LibTorch programs and torch.ops.load_library.

    Returns:
        str: the absolute path of ``flashpack_ops/_C*.so``.

    Raises:
        ImportError: if the library has not been built, with the command that builds it.

    Example:
        >>> torch.ops.load_library(library_path())
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
    """Whether the library was built with the CUDA load path (a GPU is still needed to use it).

    Returns:
        bool: True for a ``CUDAExtension`` build (``-DWITH_CUDA``).

    Example:
        >>> device = "cuda" if has_cuda() and torch.cuda.is_available() else "cpu"
    """
    load()
    return bool(torch.ops.flashpack.built_with_cuda())
