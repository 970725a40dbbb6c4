"""transformers integration: ``FlashPackTransformersModelMixin`` and functions for any model class."""

from .model import FlashPackTransformersModelMixin, from_pretrained_flashpack, save_pretrained_flashpack
from .patch import patch_transformers_auto_model

__all__ = [
    "FlashPackTransformersModelMixin",
    "from_pretrained_flashpack",
    "save_pretrained_flashpack",
    "patch_transformers_auto_model",
]
