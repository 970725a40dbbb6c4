"""Hugging Face integrations (transformers, diffusers), imported on use: flashpack_ops needs neither."""

import importlib.util

from ._hub import HubUnavailableError


def patch_integrations() -> None:
    """Add ``from_pretrained_flashpack`` to the auto classes of the installed libraries.

    After it, ``transformers.AutoModelForCausalLM.from_pretrained_flashpack(directory)``
    and ``diffusers.AutoModel.from_pretrained_flashpack(directory)`` pick the model class
    from the directory's config, as ``from_pretrained`` does. Every transformers
    ``PreTrainedModel`` and diffusers ``ModelMixin`` and ``DiffusionPipeline`` gets
    ``save_pretrained_flashpack`` and ``from_pretrained_flashpack``. A library that is not
    installed is left alone; calling it again changes nothing.

    Example:
        >>> patch_integrations()
        >>> model = transformers.AutoModelForCausalLM.from_pretrained_flashpack("llama-fp", device="cuda")
    """
    if importlib.util.find_spec("transformers") is not None:
        from .transformers import patch_transformers_auto_model

        patch_transformers_auto_model()
    if importlib.util.find_spec("diffusers") is not None:
        from .diffusers import patch_diffusers_auto_model

        patch_diffusers_auto_model()


__all__ = ["HubUnavailableError", "patch_integrations"]
