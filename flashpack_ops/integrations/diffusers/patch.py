"""Give diffusers' own classes the flashpack methods, so no subclass is needed."""

from __future__ import annotations

from typing import Any


def patch_diffusers_auto_model() -> None:
    """Add ``save_pretrained_flashpack`` / ``from_pretrained_flashpack`` to diffusers' base classes.

    ``ModelMixin`` and ``DiffusionPipeline`` (so every model and pipeline) get both
    methods; ``diffusers.AutoModel`` gets ``from_pretrained_flashpack``, which builds the
    class the directory's config names, and the AutoPipeline classes
    (``AutoPipelineForText2Image``, ``...Image2Image``, ``...Inpainting``, ``...Text2Audio``) one
    that loads their task's pipeline. Classes that define the methods themselves keep theirs.
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
    from diffusers.pipelines import auto_pipeline

    for auto_name, mapping_name in _AUTO_PIPELINES:
        auto_class, mapping = getattr(diffusers, auto_name, None), getattr(auto_pipeline, mapping_name, None)
        if auto_class is not None and mapping is not None and "from_pretrained_flashpack" not in auto_class.__dict__:
            auto_class.from_pretrained_flashpack = _auto_pipeline_loader(mapping)


# diffusers' AutoPipeline classes and the task each maps a saved pipeline's family to.
_AUTO_PIPELINES = (
    ("AutoPipelineForText2Image", "AUTO_TEXT2IMAGE_PIPELINES_MAPPING"),
    ("AutoPipelineForImage2Image", "AUTO_IMAGE2IMAGE_PIPELINES_MAPPING"),
    ("AutoPipelineForInpainting", "AUTO_INPAINT_PIPELINES_MAPPING"),
    ("AutoPipelineForText2Audio", "AUTO_TEXT2AUDIO_PIPELINES_MAPPING"),
)


def _auto_pipeline_loader(mapping: Any) -> classmethod:
    def from_pretrained_flashpack(cls: type, pretrained_model_name_or_path: Any, device: Any = None,
                                  **kwargs: Any) -> Any:
        """Load, as ``from_pretrained`` does for this AutoPipeline class, the pipeline of its
        task in the family of the one saved (StableDiffusionPipeline's files as a
        StableDiffusionImg2ImgPipeline), with ``load_pipeline_flashpack``."""
        from diffusers import DiffusionPipeline

        from .pipeline import load_pipeline_flashpack

        return load_pipeline_flashpack(DiffusionPipeline, pretrained_model_name_or_path, device,
                                       _task_mapping=mapping, **kwargs)

    return classmethod(from_pretrained_flashpack)
