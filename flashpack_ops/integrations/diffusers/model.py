"""diffusers: save a ``ModelMixin`` (UNet, VAE, transformer) as config + flashpack file, and load it back."""

from __future__ import annotations

import json
import os
from typing import Any, Callable, List, Optional, Type, TypeVar, Union

import diffusers
import torch
from diffusers import ModelMixin

from ...api import _reset_parameters, assign_from_file, prefetching
from ...mixin import FlashPackMixin, init_empty_parameters
from ...ops import DEFAULT_ALIGN_BYTES, DeviceLike, read_metadata
from .._hub import (build_and_load_dtypes, checked_save_directory, configs_written_last, dispatch_placed,
                    dropped_on_load, initialise_left_out, library_class, loading_info, locate_flashpack,
                    mismatched_entries, parse_dtype, place_model, refuse_adapters, take_load_kwargs, tied_names,
                    unwrapped, upload_directory, warn_unused_save_kwargs, write_weights)

M = TypeVar("M", bound=ModelMixin)

def dtype_argument() -> str:
    """The name diffusers' ``from_pretrained`` gives its dtype argument (``dtype`` from 0.42 on)."""
    major, minor = (int(x) for x in diffusers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (0, 42) else "torch_dtype"


def keeps_in_float32(model: ModelMixin, dtype: Optional[torch.dtype]) -> Optional[Callable[[str], bool]]:
    """Which tensors diffusers' ``from_pretrained(dtype=dtype)`` keeps in float32, or None for
    none: those of the modules a model lists in ``_keep_in_fp32_modules`` (Wan's norms and
    embedders), a name matching where one of its dotted parts is such a module, whatever
    the dtype, as diffusers matches it."""
    modules = getattr(model, "_keep_in_fp32_modules", None)
    if dtype is None or not modules:
        return None
    modules = [modules] if isinstance(modules, str) else list(modules)
    return lambda name: any(module in name.split(".") for module in modules)


def _with_class_name(config_json: str, name: str) -> str:
    """A config's JSON (diffusers' ``to_json_string``) with ``_class_name`` set to ``name``."""
    config = json.loads(config_json)
    if config.get("_class_name") == name:
        return config_json
    config["_class_name"] = name
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


def _name_library_class(model: ModelMixin, config_path: str) -> None:
    """Record the diffusers class in config.json (``_class_name``), not a subclass that only adds
    flashpack methods, so that diffusers' AutoModel and other loaders can import it."""
    with open(config_path, encoding="utf-8") as f:
        written = f.read()
    named = _with_class_name(written, library_class(type(model), ModelMixin).__name__)
    if named != written:
        with open(config_path, "w", encoding="utf-8") as f:
            f.write(named)


def save_pretrained_flashpack(
    model: ModelMixin,
    save_directory: Union[str, "os.PathLike[str]"],
    *,
    is_main_process: bool = True,
    push_to_hub: bool = False,
    target_dtype: Optional[Union[torch.dtype, str]] = None,
    align_bytes: int = DEFAULT_ALIGN_BYTES,
    silent: bool = True,
    num_workers: int = 0,
    commit_message: Optional[str] = None,
    create_pr: bool = False,
    token: Optional[str] = None,
    repo_id: Optional[str] = None,
    private: Optional[bool] = None,
    ignore_names: Optional[List[str]] = None,
    ignore_prefixes: Optional[List[str]] = None,
    ignore_suffixes: Optional[List[str]] = None,
    checksum: bool = False,
    **kwargs: Any,
) -> None:
    """Write ``config.json`` and ``model.flashpack`` to a directory (created if needed).

    Args:
        model: any diffusers model.
        save_directory: the directory.
        is_main_process: only the main process writes (distributed training).
        target_dtype: convert the floating-point tensors to this dtype (or its name,
            ``"bfloat16"``, ``"bf16"``), except those the model keeps in float32, as
            ``from_pretrained(dtype=...)`` does.
        push_to_hub, repo_id, private, token, commit_message, create_pr: upload the
            directory to the Hugging Face Hub afterwards.
        align_bytes, num_workers: as in :func:`flashpack_ops.pack_to_file`.
        silent: unused, kept for compatibility with the reference package.
        checksum: store CRC-32C checksums, for ``verify_file`` and ``load_file(verify=True)``.
        ignore_names, ignore_prefixes, ignore_suffixes: tensors to leave out of the file.
        **kwargs: ``save_pretrained``'s other arguments (``safe_serialization``,
            ``max_shard_size``...), taken so that calls switch over unchanged, and ignored
            with a warning that names them.

    Raises:
        NotADirectoryError: ``save_directory`` is a file.
        ValueError: ``target_dtype`` names no dtype or is not a floating-point one, the
            model holds PEFT adapter layers, or a tensor cannot be stored.
        TypeError: ``target_dtype`` is neither a dtype nor a str.
        RuntimeError: the file could not be written.

    Example:
        >>> save_pretrained_flashpack(unet, "sd-dir/unet", target_dtype=torch.float16)
    """
    warn_unused_save_kwargs(kwargs, "save_pretrained_flashpack")
    save_directory = checked_save_directory(save_directory)
    # "bf16", "torch.float16": checked before anything is written
    target_dtype = parse_dtype(target_dtype, "save_pretrained_flashpack: target_dtype")
    model = unwrapped(model)  # a torch.compile'd model saves as the model it compiles
    refuse_adapters(model, "save_pretrained_flashpack")
    if is_main_process:
        os.makedirs(save_directory, exist_ok=True)
        with configs_written_last(save_directory) as staging:
            model.save_config(staging)
            _name_library_class(model, os.path.join(staging, "config.json"))
            write_weights(model, save_directory, target_dtype=target_dtype, align_bytes=align_bytes,
                          num_workers=num_workers, ignore_names=ignore_names, ignore_prefixes=ignore_prefixes,
                          ignore_suffixes=ignore_suffixes, keep_float32=keeps_in_float32(model, target_dtype),
                          checksum=checksum)
    if push_to_hub and is_main_process:
        upload_directory(save_directory, repo_id, private, token, commit_message, create_pr)


def _is_generic(model_class: type) -> bool:
    """Whether ``model_class`` leaves the class to the config (``ModelMixin``, ``AutoModel``)."""
    return model_class is ModelMixin or model_class.__name__ == "AutoModel" or not hasattr(model_class, "from_config")


def _transformers_class(config: dict, model_dir: str, subfolder: Optional[str]) -> Optional[type]:
    """The transformers class diffusers' ``AutoModel`` loads a folder as (a pipeline's text
    encoder), or None for a diffusers model: the class the pipeline's ``model_index.json``
    names for ``subfolder`` (``["transformers", "T5EncoderModel"]``), else, for a config with a
    ``model_type`` and no ``_class_name``, the one transformers' ``AutoModel`` picks."""
    if subfolder:
        root = model_dir
        for _ in os.path.normpath(subfolder).split(os.sep):
            root = os.path.dirname(root)
        try:
            with open(os.path.join(root, "model_index.json"), encoding="utf-8") as f:
                entry = json.load(f).get(subfolder)
        except (OSError, ValueError, AttributeError):
            entry = None
        if isinstance(entry, list) and len(entry) == 2 and entry[0] is not None and entry[1] is not None:
            if entry[0] != "transformers":
                return None
            import transformers

            found = getattr(transformers, entry[1], None)
            if isinstance(found, type):
                return found
    if "_class_name" in config or "model_type" not in config:
        return None
    from transformers import AutoConfig, AutoModel
    from transformers.models.auto.auto_factory import _get_model_class

    return _get_model_class(AutoConfig.from_pretrained(model_dir), AutoModel._model_mapping)


def _concrete_class(model_class: type, config: dict, model_dir: str) -> type:
    """The class to build: ``model_class``, or the one the config names for a generic class."""
    if _is_generic(model_class):
        name = str(config.get("_class_name", "")).removeprefix("FlashPack")
        found = getattr(diffusers, name, None) if name else None
        if found is None:
            raise ValueError(f"{model_dir}/config.json names the model class '{name}', which diffusers "
                             f"{diffusers.__version__} does not have")
        return found
    return model_class


def from_pretrained_flashpack(
    model_class: Type[M],
    pretrained_model_name_or_path: Union[str, "os.PathLike[str]"],
    device: Optional[DeviceLike] = None,
    *,
    torch_dtype: Optional[Union[torch.dtype, str]] = None,
    dtype: Optional[Union[torch.dtype, str]] = None,
    silent: bool = True,
    strict: Optional[bool] = None,
    strict_params: bool = True,
    strict_buffers: bool = False,
    keep_flash_ref_on_model: bool = False,
    ignore_names: Optional[List[str]] = None,
    ignore_prefixes: Optional[List[str]] = None,
    ignore_suffixes: Optional[List[str]] = None,
    coerce_dtype: bool = False,
    copy: bool = False,
    subfolder: Optional[str] = None,
    revision: Optional[str] = None,
    local_dir: Optional[str] = None,
    local_files_only: bool = False,
    cache_dir: Optional[str] = None,
    token: Optional[Union[str, bool]] = None,
    force_download: bool = False,
    **kwargs: Any,
) -> M:
    """Build ``model_class`` from a directory's ``config.json`` and load its ``model.flashpack``.

    The model is built with its parameters on the meta device, then every parameter
    views the loaded memory: the weights are never held twice.

    Args:
        model_class: a diffusers model class (``UNet2DConditionModel``); ``ModelMixin``
            or ``AutoModel`` picks the class the config names, or, as diffusers' ``AutoModel``
            does, a transformers model (a pipeline's ``subfolder="text_encoder"``: the class
            ``model_index.json`` names; a folder of its own: the one its ``model_type`` gives),
            loaded by :func:`flashpack_ops.integrations.transformers.from_pretrained_flashpack`.
        pretrained_model_name_or_path: a directory, or a Hub repo id.
        device: where the weights go; the CPU by default.
        torch_dtype, dtype: convert the file's floating-point tensors to this dtype
            (a copy). By default the model takes the file's dtype (most of its floating-point
            bytes; diffusers' ``from_pretrained`` takes float32): every floating tensor loads
            in it, except in the modules the model keeps in float32.
        subfolder: the model lies in this subfolder (``"unet"``).
        revision, local_dir, local_files_only, cache_dir, token, force_download: for
            downloads from the Hub.
        strict, strict_params, strict_buffers, ignore_names, ignore_prefixes,
            ignore_suffixes, coerce_dtype, keep_flash_ref_on_model, silent, copy: as in
            :func:`flashpack_ops.assign_from_file`.
        device_map: in place of ``device``: one device for the whole model, or a map of
            module names to devices (``"auto"`` and the like: the map accelerate infers,
            within ``max_memory``), each device loading only its modules' entries, with
            accelerate's hooks added as from_pretrained adds them.
        output_loading_info: also return ``{"missing_keys", "unexpected_keys", ...}``.
        ignore_mismatched_sizes: entries the model holds in another shape are left out and
            initialised (``reset_parameters``), with a warning, as from_pretrained does; an
            error otherwise.
        use_distributed_loading, distributed_sharded, rank, local_rank, world_size: as in
            :func:`flashpack_ops.assign_from_file`.
        **kwargs: config entries to override. from_pretrained's arguments that only choose
            or tune the weights' download are accepted and have no effect; those that would
            change what is loaded (``quantization_config``...) raise ValueError.

    Returns:
        The model, in eval mode (and the loading info).

    Raises:
        FileNotFoundError: no ``model.flashpack`` in the directory.
        HubUnavailableError: a repo id while offline, with no cached copy.
        ValueError: the file does not match the model (names listed), or an argument
            from_pretrained_flashpack cannot honour.

    Example:
        >>> unet = from_pretrained_flashpack(UNet2DConditionModel, "sd-dir", subfolder="unet", device="cuda")
    """
    what = f"{model_class.__name__}.from_pretrained_flashpack"
    path = locate_flashpack(pretrained_model_name_or_path, subfolder, revision=revision, cache_dir=cache_dir,
                            local_dir=local_dir, token=token, local_files_only=local_files_only,
                            force_download=force_download)
    model_dir = os.path.dirname(path)
    config_path = os.path.join(model_dir, "config.json")
    try:
        with open(config_path, encoding="utf-8") as f:
            config_json = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):  # as diffusers' load_config says it
        raise OSError(f"It looks like the config file at '{config_path}' is not a valid JSON file.") from None
    transformers_class = _transformers_class(config_json, model_dir, subfolder) if _is_generic(model_class) else None
    if transformers_class is not None:
        # A transformers model (a pipeline's text encoder), as diffusers' AutoModel loads it.
        from ..transformers import from_pretrained_flashpack as transformers_from_pretrained_flashpack

        return transformers_from_pretrained_flashpack(
            transformers_class, pretrained_model_name_or_path, device, torch_dtype=torch_dtype, dtype=dtype,
            silent=silent, strict=strict, strict_params=strict_params, strict_buffers=strict_buffers,
            keep_flash_ref_on_model=keep_flash_ref_on_model, ignore_names=ignore_names,
            ignore_prefixes=ignore_prefixes, ignore_suffixes=ignore_suffixes, coerce_dtype=coerce_dtype, copy=copy,
            subfolder=subfolder, revision=revision, local_dir=local_dir, local_files_only=local_files_only,
            cache_dir=cache_dir, token=token, force_download=force_download, **kwargs)
    model_class = _concrete_class(model_class, config_json, model_dir)
    ignore_mismatched_sizes = kwargs.pop("ignore_mismatched_sizes", False)
    device, distributed = take_load_kwargs(kwargs, device, what)
    output_loading_info = kwargs.pop("output_loading_info", False)
    # The file streams in while the model is built, where the load is of the whole file.
    whole_file = not (keep_flash_ref_on_model or distributed.get("use_distributed_loading")
                      or ignore_names or ignore_prefixes or ignore_suffixes or ignore_mismatched_sizes)
    with prefetching(path, device, copy, whole_file) as prefetched:
        config = model_class.load_config(model_dir)
        build_dtype, load_dtype = build_and_load_dtypes(path, dtype, torch_dtype, what)
        # Without a dtype the model takes the file's: its floating tensors all load in that one
        # dtype (a file in one dtype without a copy), except the modules the model keeps in
        # float32, as diffusers keeps them under dtype=torch.float16.
        keep_float32 = keeps_in_float32(model_class, load_dtype) if load_dtype is not None else \
            keeps_in_float32(model_class, build_dtype) if build_dtype in (torch.float16, torch.bfloat16) else None
        load_dtype = load_dtype or build_dtype
        with init_empty_parameters(build_dtype):
            model = model_class.from_config(config, **kwargs)
        # Entries of another shape are left out and initialised as missing ones are, as
        # from_pretrained(ignore_mismatched_sizes=True) does.
        index = read_metadata(path)["index"]
        mismatched = mismatched_entries(model, index) if ignore_mismatched_sizes else []
        dropped = dropped_on_load(model, [entry["name"] for entry in index])
        device = place_model(model, device)
        zero_filled: List[str] = []
        assign_from_file(
            model, path, device=device if device is not None else "cpu", strict=strict, strict_params=strict_params,
            strict_buffers=strict_buffers, keep_flash_ref_on_model=keep_flash_ref_on_model, silent=silent,
            ignore_names=list(ignore_names or []) + tied_names(model, [name for name, _, _ in mismatched]) + dropped,
            ignore_prefixes=ignore_prefixes,
            ignore_suffixes=ignore_suffixes, coerce_dtype=coerce_dtype, dtype=load_dtype, copy=copy,
            _keep_float32=keep_float32, _zero_filled=zero_filled if mismatched else None,
            _prefetched=prefetched, **distributed,
        )
    initialise_left_out(model, path, what, zero_filled, mismatched, _reset_parameters, "reset_parameters()")
    dispatch_placed(model, device)
    model.register_to_config(_name_or_path=os.fspath(pretrained_model_name_or_path))
    model.eval()
    if not output_loading_info:
        return model
    info = loading_info(model, path, mismatched=mismatched)
    info["unexpected_keys"] = [name for name in info["unexpected_keys"] if name not in dropped]
    return model, info


class FlashPackDiffusersModelMixin(ModelMixin, FlashPackMixin):
    """Adds ``save_pretrained_flashpack`` and ``from_pretrained_flashpack`` to a diffusers model.

    Example:
        >>> class FlashUNet(UNet2DConditionModel, FlashPackDiffusersModelMixin):
        ...     pass
        >>> unet = FlashUNet.from_pretrained_flashpack("sd-dir", subfolder="unet", device="cuda")
    """

    flashpack_init_method: Optional[str] = "from_config"

    def to_json_string(self) -> str:
        """The config as diffusers writes it, naming the diffusers class this one extends
        (``UNet2DConditionModel``, not ``FlashUNet``): a plain ``save_pretrained`` then gives a
        directory that diffusers loads where this subclass does not exist."""
        return _with_class_name(super().to_json_string(), library_class(type(self), ModelMixin).__name__)

    def save_pretrained_flashpack(self, save_directory: Union[str, "os.PathLike[str]"], **kwargs: Any) -> None:
        """See :func:`flashpack_ops.integrations.diffusers.save_pretrained_flashpack`."""
        save_pretrained_flashpack(self, save_directory, **kwargs)

    @classmethod
    def from_pretrained_flashpack(cls: Type[M], pretrained_model_name_or_path: Union[str, "os.PathLike[str]"],
                                  device: Optional[DeviceLike] = None, **kwargs: Any) -> M:
        """See :func:`flashpack_ops.integrations.diffusers.from_pretrained_flashpack`."""
        return from_pretrained_flashpack(cls, pretrained_model_name_or_path, device, **kwargs)
