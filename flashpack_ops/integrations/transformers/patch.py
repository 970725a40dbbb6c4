"""``AutoModel*.from_pretrained_flashpack``: pick the model class from the config, as ``from_pretrained`` does."""

from __future__ import annotations

import os
from typing import Any, Optional, Union

from ...ops import DeviceLike
from .._hub import resolve_model_directory


def _auto_from_pretrained_flashpack(
    cls: Any,
    pretrained_model_name_or_path: Union[str, "os.PathLike[str]"],
    device: Optional[DeviceLike] = None,
    *,
    subfolder: Optional[str] = None,
    revision: Optional[str] = None,
    cache_dir: Optional[str] = None,
    token: Optional[Union[str, bool]] = None,
    local_files_only: bool = False,
    force_download: bool = False,
    trust_remote_code: bool = False,
    torch_dtype: Any = None,
    dtype: Any = None,
    **kwargs: Any,
) -> Any:
    from transformers import AutoConfig
    from transformers.models.auto.auto_factory import _get_model_class

    from .model import from_pretrained_flashpack

    directory = resolve_model_directory(pretrained_model_name_or_path, subfolder, revision=revision,
                                        cache_dir=cache_dir, token=token, local_files_only=local_files_only,
                                        force_download=force_download)
    model_dir = os.path.join(directory, subfolder) if subfolder else directory
    config = kwargs.pop("config", None)
    if config is None:
        config, kwargs = AutoConfig.from_pretrained(model_dir, return_unused_kwargs=True,
                                                    trust_remote_code=trust_remote_code, **kwargs)
    auto_map = getattr(config, "auto_map", None) or {}
    if trust_remote_code and cls.__name__ in auto_map:
        # A model whose code ships with it, as from_pretrained loads it (trust_remote_code=True).
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        model_class = get_class_from_dynamic_module(auto_map[cls.__name__], model_dir)
    elif type(config) in cls._model_mapping:
        model_class = _get_model_class(config, cls._model_mapping)
    else:
        hint = " (its code ships with it: pass trust_remote_code=True)" if cls.__name__ in auto_map else ""
        raise ValueError(f"{cls.__name__} has no model class for {type(config).__name__} (from {model_dir}){hint}")
    return from_pretrained_flashpack(model_class, directory, device, config=config, subfolder=subfolder,
                                     torch_dtype=torch_dtype, dtype=dtype, **kwargs)


def patch_transformers_auto_model() -> None:
    """Give transformers' classes the flashpack methods, so no subclass is needed.

    Every auto class (``AutoModelForCausalLM``...) gets a ``from_pretrained_flashpack``
    that picks the model class from the config, as ``from_pretrained`` does; every
    ``PreTrainedModel`` gets ``save_pretrained_flashpack`` and ``from_pretrained_flashpack``
    (classes that define them keep theirs).

    Example:
        >>> patch_transformers_auto_model()
        >>> model = AutoModelForCausalLM.from_pretrained_flashpack("llama-dir", device="cuda")
    """
    from transformers import PreTrainedModel
    from transformers.models.auto.auto_factory import _BaseAutoModelClass

    from .model import FlashPackTransformersModelMixin

    for method in ("save_pretrained_flashpack", "from_pretrained_flashpack"):
        if method not in PreTrainedModel.__dict__:
            setattr(PreTrainedModel, method, FlashPackTransformersModelMixin.__dict__[method])
    _BaseAutoModelClass.from_pretrained_flashpack = classmethod(_auto_from_pretrained_flashpack)
