"""flashpack_ops: built to load PyTorch state dicts from disk to GPU at the speed of the hardware.

The core is the ``torch.ops.flashpack`` operators (``load``, ``save``), usable from
Python, TorchScript and torch.compile. This package adds typed wrappers and an API
compatible with the reference ``flashpack`` package, so ``import flashpack_ops as
flashpack`` runs code written for it.
"""

from ._library import has_cuda, library_path
from .ops import cuda_stats, load_file, read_metadata, release_pinned_memory, save_file, verify_file
from .distributed import load_blocks_distributed, load_file_distributed
from .api import (
    FlashTensorStorage,
    assign_from_file,
    get_flashpack_file_metadata,
    is_flashpack_file,
    iterate_from_flash_tensor,
    pack_to_file,
    read_flashpack_file,
    read_flashpack_file_distributed,
    revert_from_file,
)
from .lazy import safe_open
from .mixin import FlashPackMixin
from .integrations import patch_integrations
# As the reference exposes them: flashpack.serialization.pack_to_file with no import of its own.
from . import deserialization, serialization  # noqa: E402

__version__ = version = "0.1.0"
__version_tuple__ = version_tuple = (0, 1, 0)
__commit_id__ = commit_id = None  # the reference package's names for the same facts

__all__ = [
    "load_file",
    "save_file",
    "read_metadata",
    "verify_file",
    "safe_open",
    "load_file_distributed",
    "load_blocks_distributed",
    "pack_to_file",
    "assign_from_file",
    "revert_from_file",
    "get_flashpack_file_metadata",
    "is_flashpack_file",
    "read_flashpack_file",
    "read_flashpack_file_distributed",
    "iterate_from_flash_tensor",
    "FlashTensorStorage",
    "FlashPackMixin",
    "patch_integrations",
    "has_cuda",
    "cuda_stats",
    "release_pinned_memory",
    "library_path",
    "__version__",
    "__version_tuple__",
    "version",
    "version_tuple",
    "__commit_id__",
    "commit_id",
]
