"""The reference package's ``flashpack.deserialization`` names, for code that imports them
from there."""

from .api import (  # noqa: F401
    FlashTensorStorage,
    assign_from_file,
    get_flashpack_file_metadata,
    is_flashpack_file,
    iterate_from_flash_tensor,
    read_flashpack_file,
    read_flashpack_file_distributed,
    revert_from_file,
)
