"""``patch_integrations`` where the reference package defines it (``flashpack.integrations.patch``)."""

from . import patch_integrations

__all__ = ["patch_integrations"]
