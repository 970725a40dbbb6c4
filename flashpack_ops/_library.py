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
        path = library_path()
        try:
            torch.ops.load_library(path)
        except OSError as e:
            # Most often a build against another torch (LibTorch's C++ ABI changes with every
            # release): the dynamic loader's own message names the missing symbol.
            cause = e.__cause__ if e.__cause__ is not None else e
            raise ImportError(
                f"flashpack_ops: the compiled library {path} could not be loaded: {cause}\n"
                f"It must be built against the torch it runs with (here torch {torch.__version__}). "
                "Build it again with\n"
                "    pip install --no-build-isolation --force-reinstall --no-deps .\n"
                "or, for development in the source tree,\n"
                "    python setup.py build_ext --inplace"
            ) from e


def has_cuda() -> bool:
    """Whether the library was built with the CUDA load path (a GPU is still needed to use it).

    Returns:
        bool: True for a ``CUDAExtension`` build (``-DWITH_CUDA``).

    Example:
        >>> device = "cuda" if has_cuda() and torch.cuda.is_available() else "cpu"
    """
    load()
    return bool(torch.ops.flashpack.built_with_cuda())
