"""Typed Python wrappers around the ``torch.ops.flashpack`` operators."""

from __future__ import annotations

import errno
import json
import os
from typing import Any, Dict, Mapping, Optional, Union

import torch

from . import _library

_library.load()

PathLike = Union[str, "os.PathLike[str]"]
DeviceLike = Union[str, int, torch.device]

DEFAULT_ALIGN_BYTES = 128


def _path(path: PathLike, *, must_exist: bool) -> str:
    path = os.fspath(path)
    if not isinstance(path, str):
        raise TypeError(f"path must be a str or os.PathLike[str], got {type(path).__name__}")
    if must_exist and not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, "flashpack file not found", path)
    return path


def _device(device: DeviceLike) -> torch.device:
    if isinstance(device, int):
        return torch.device("cuda", device)
    return torch.device(device)


def save_file(
    tensors: Mapping[str, torch.Tensor],
    path: PathLike,
    *,
    target_dtype: Optional[torch.dtype] = None,
    align_bytes: int = DEFAULT_ALIGN_BYTES,
    num_threads: int = 0,
) -> None:
    """Save a dict of tensors to a flashpack file.

    The file is written to a temporary file beside ``path``, flushed to disk and renamed
    over ``path``: if anything fails, ``path`` keeps its old content and no temporary
    file is left. Tensors that are the same memory (tied weights) are stored once.

    Args:
        tensors: names to tensors, on any device, contiguous or not. The file keeps the
            dict's order.
        path: the destination file.
        target_dtype: if given, every tensor is converted to this dtype.
        align_bytes: alignment of each tensor within its block (blocks are page-aligned).
        num_threads: writer threads; 0 picks a default (``FLASHPACK_NUM_THREADS``).

    Raises:
        ValueError: a tensor cannot be stored (quantized, sparse, on the meta device), naming it.
        RuntimeError: the file could not be written (disk full, permissions), naming it.

    Example:
        >>> save_file({"w": torch.ones(2, 3)}, "model.flashpack")
    """
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors must be a mapping of str to Tensor, got {type(tensors).__name__}")
    torch.ops.flashpack.save(
        dict(tensors), _path(path, must_exist=False), target_dtype=target_dtype,
        align_bytes=align_bytes, num_threads=num_threads,
    )


def load_file(
    path: PathLike,
    device: DeviceLike = "cpu",
    *,
    copy: bool = False,
    num_threads: int = 0,
) -> Dict[str, torch.Tensor]:
    """Load a flashpack file as a dict of tensors, in the file's order.

    On the CPU the tensors are views into a private memory map of the file (nothing is
    copied; writing to a tensor never changes the file). On CUDA the payload is streamed
    to the GPU. Tied tensors come back as views of the same memory.

    Args:
        path: a file written by flashpack_ops or the reference ``flashpack`` package.
        device: ``"cpu"``, ``"cuda"`` (the current device), ``"cuda:N"`` or an index.
        copy: CPU only; read into fresh memory instead of mapping the file.
        num_threads: reader threads; 0 picks a default (``FLASHPACK_NUM_THREADS``).

    Returns:
        Dict[str, torch.Tensor]: the tensors, bit for bit as saved.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a valid flashpack file; the message names the file,
            the entry and the problem.
        RuntimeError: the file could not be read.

    Example:
        >>> state_dict = load_file("model.flashpack", device="cuda")
    """
    return torch.ops.flashpack.load(
        _path(path, must_exist=True), _device(device), copy=copy, num_threads=num_threads
    )


def read_metadata(path: PathLike) -> Dict[str, Any]:
    """The footer of a flashpack file as a dict, validated without reading the payload.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a valid flashpack file.
    """
    return json.loads(torch.ops.flashpack.read_footer(_path(path, must_exist=True)))
