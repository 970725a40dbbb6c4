"""The reference package's ``flashpack.serialization`` names, for code that imports them
from there."""

from .api import pack_to_file  # noqa: F401
