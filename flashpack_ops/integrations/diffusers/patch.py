"""Give diffusers' own classes the flashpack methods, so no subclass is needed."""

from __future__ import annotations

from typing import Any, Dict, Optional


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

    for auto_name, mapping_name, task in _AUTO_PIPELINES:
        auto_class, mapping = getattr(diffusers, auto_name, None), getattr(auto_pipeline, mapping_name, None)
        if auto_class is not None and mapping is not None and "from_pretrained_flashpack" not in auto_class.__dict__:
            auto_class.from_pretrained_flashpack = _auto_pipeline_loader(auto_name, mapping, task)


# diffusers' AutoPipeline classes, the task each maps a saved pipeline's family to, and the
# part of a saved pipeline's class name that names its task ("StableDiffusionImg2ImgPipeline").
_AUTO_PIPELINES = (
    ("AutoPipelineForText2Image", "AUTO_TEXT2IMAGE_PIPELINES_MAPPING", None),
    ("AutoPipelineForImage2Image", "AUTO_IMAGE2IMAGE_PIPELINES_MAPPING", "Img2Img"),
    ("AutoPipelineForInpainting", "AUTO_INPAINT_PIPELINES_MAPPING", "Inpaint"),
    ("AutoPipelineForText2Audio", "AUTO_TEXT2AUDIO_PIPELINES_MAPPING", None),
)


def _task_class_name(auto_name: str, task: Optional[str], saved: str, kwargs: Dict[str, Any]) -> str:
    """The class name the AutoPipeline class's from_pretrained looks up for a saved pipeline
    of class ``saved``: with ``controlnet=`` its ControlNet pipeline (ControlNet Union for a
    ``ControlNetUnionModel``), with ``enable_pag=True`` (taken out of ``kwargs``) its PAG
    pipeline, as diffusers' AutoPipeline classes name them."""
    if auto_name == "AutoPipelineForText2Audio":
        return saved
    import diffusers

    if task is not None and task in saved:
        to_replace = f"{task}Pipeline"
    elif "ControlPipeline" in saved:
        to_replace = "ControlPipeline"
    else:
        to_replace = "Pipeline"
    text2image = auto_name == "AutoPipelineForText2Image"
    name = saved
    if "controlnet" in kwargs:
        union = getattr(diffusers, "ControlNetUnionModel", None)
        controlnet = "ControlNetUnion" if union is not None and isinstance(kwargs["controlnet"], union) else "ControlNet"
        name = name.replace(to_replace, f"{controlnet}Pipeline" if text2image else controlnet + to_replace)
    if kwargs.pop("enable_pag", False):
        name = name.replace(to_replace, "PAGPipeline" if text2image else "PAG" + to_replace)
    if to_replace == "ControlPipeline" and not text2image:
        name = name.replace(to_replace, f"Control{task}Pipeline")
    return name


def _auto_pipeline_loader(auto_name: str, mapping: Any, task: Optional[str]) -> classmethod:
    def task_class(saved: str, kwargs: Dict[str, Any]) -> type:
        from diffusers.pipelines.auto_pipeline import _get_task_class

        return _get_task_class(mapping, _task_class_name(auto_name, task, saved, kwargs))

    def from_pretrained_flashpack(cls: type, pretrained_model_name_or_path: Any, device: Any = None,
                                  **kwargs: Any) -> Any:
        """Load, as ``from_pretrained`` does for this AutoPipeline class, the pipeline of its
        task in the family of the one saved (StableDiffusionPipeline's files as a
        StableDiffusionImg2ImgPipeline; with ``controlnet=`` or ``enable_pag=True``, its
        ControlNet or PAG pipeline), with ``load_pipeline_flashpack``."""
        from diffusers import DiffusionPipeline

        from .pipeline import load_pipeline_flashpack

        return load_pipeline_flashpack(DiffusionPipeline, pretrained_model_name_or_path, device,
                                       _task_class=task_class, **kwargs)

    return classmethod(from_pretrained_flashpack)
