"""diffusers integration: model and pipeline mixins, and functions for any model or pipeline class."""

from .model import FlashPackDiffusersModelMixin, from_pretrained_flashpack, save_pretrained_flashpack
from .patch import patch_diffusers_auto_model
from .pipeline import FlashPackDiffusionPipeline, load_pipeline_flashpack, save_pipeline_flashpack

__all__ = [
    "FlashPackDiffusersModelMixin",
    "FlashPackDiffusionPipeline",
    "from_pretrained_flashpack",
    "save_pretrained_flashpack",
    "load_pipeline_flashpack",
    "save_pipeline_flashpack",
    "patch_diffusers_auto_model",
]
