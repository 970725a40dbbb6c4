"""Give diffusers' own classes the flashpack methods, so no subclass is needed."""

from __future__ import annotations


def patch_diffusers_auto_model() -> None:
    """Add ``save_pretrained_flashpack`` / ``from_pretrained_flashpack`` to diffusers' base classes.

    ``ModelMixin`` and ``DiffusionPipeline`` (so every model and pipeline) get both
    methods, and ``diffusers.AutoModel`` gets ``from_pretrained_flashpack``, which
    builds the class the directory's config names. Classes that define the methods
    themselves keep theirs.
    """
    import diffusers
    from diffusers import DiffusionPipeline, ModelMixin

    from .model import FlashPackDiffusersModelMixin
    from .pipeline import FlashPackDiffusionPipeline

    for target, source in ((ModelMixin, FlashPackDiffusersModelMixin), (DiffusionPipeline, FlashPackDiffusionPipeline)):
        for method in ("save_pretrained_flashpack", "from_pretrained_flashpack"):
            if method not in target.__dict__:
                setattr(target, method, source.__dict__[method])
    auto_model = getattr(diffusers, "AutoModel", None)
    if auto_model is not None and "from_pretrained_flashpack" not in auto_model.__dict__:
        auto_model.from_pretrained_flashpack = FlashPackDiffusersModelMixin.__dict__["from_pretrained_flashpack"]
