"""diffusers pipelines: every model component as config + flashpack file, the rest saved as usual."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import os
import sys
import types
from typing import Any, Callable, Dict, List, Optional, Tuple, Type, TypeVar, Union

import torch
from diffusers import DiffusionPipeline, ModelMixin

from ..._warnings import warn
from ...commands import checkpoint_tensor_sizes
from ...ops import DEFAULT_ALIGN_BYTES, DeviceLike, _device, _footer_blocks, read_metadata
from .._hub import (FLASHPACK_FILE, SPREADING_DEVICE_MAPS, AutoDeviceMap, library_class, of_variant, parse_dtype,
                    resolve_pipeline_directory, take_load_kwargs, tied_second_names, unwrapped, upload_directory,
                    warn_unused_save_kwargs, written_whole)
from . import model as diffusers_model

P = TypeVar("P", bound=DiffusionPipeline)
DtypeOrPerComponent = Optional[Union[torch.dtype, str, Dict[str, Union[torch.dtype, str]]]]


def _transformers_model_class() -> Optional[type]:
    if importlib.util.find_spec("transformers") is None:
        return None
    from transformers import PreTrainedModel

    return PreTrainedModel


def _for_component(value: DtypeOrPerComponent, name: str) -> Any:
    if isinstance(value, dict):
        return value.get(name, value.get("default"))
    return value


def _parsed(value: DtypeOrPerComponent) -> Any:
    """A dtype, or one per component, with names (``"fp16"``) read as dtypes."""
    if isinstance(value, dict):
        return {name: parse_dtype(dtype) for name, dtype in value.items()}
    return parse_dtype(value)


def _component_entries(config: Dict[str, Any]) -> Dict[str, Any]:
    """model_index.json's components: name -> (library, class name), or (None, None) for an absent one."""
    return {name: value for name, value in config.items()
            if not name.startswith("_") and isinstance(value, (list, tuple)) and len(value) == 2}


def save_pipeline_flashpack(
    pipeline: DiffusionPipeline,
    save_directory: Union[str, "os.PathLike[str]"],
    *,
    target_dtype: DtypeOrPerComponent = None,
    safe_serialization: bool = True,
    variant: Optional[str] = None,
    max_shard_size: Optional[Union[int, str]] = None,
    is_main_process: bool = True,
    align_bytes: int = DEFAULT_ALIGN_BYTES,
    num_workers: int = 0,
    silent: bool = True,
    push_to_hub: bool = False,
    commit_message: Optional[str] = None,
    create_pr: bool = False,
    token: Optional[str] = None,
    repo_id: Optional[str] = None,
    private: Optional[bool] = None,
    checksum: bool = False,
    **kwargs: Any,
) -> None:
    """Save a pipeline: ``model_index.json``, and one subfolder per component.

    Models (diffusers and transformers) are written as ``config.json`` +
    ``model.flashpack``; schedulers, tokenizers and feature extractors with their own
    ``save_pretrained``. Everything is written into a hidden folder of ``save_directory``
    first and renamed into place once every component is written: a save that fails halfway
    leaves the pipeline that was there as it was, and needs room for both until it ends.

    Args:
        pipeline: any diffusers pipeline.
        save_directory: created if needed.
        target_dtype: one dtype for every model, or ``{"unet": torch.float16,
            "default": torch.bfloat16}``.
        safe_serialization, variant, max_shard_size: passed to the ``save_pretrained``
            of components that are not models and take them.
        is_main_process, align_bytes, num_workers, push_to_hub, commit_message,
            create_pr, token, repo_id, private, checksum: as for single models.
        silent: unused, kept for compatibility with the reference package.
        **kwargs: ignored, with a warning that names them.

    Raises:
        ValueError, TypeError: a ``target_dtype`` (or one of its entries) that is no dtype
            or dtype name, checked before anything is written; or as for single models.
        RuntimeError: a file could not be written; the pipeline that was there is kept.

    Example:
        >>> save_pipeline_flashpack(pipe, "sd-dir", target_dtype={"unet": torch.float16})
    """
    warn_unused_save_kwargs(kwargs, "save_pretrained_flashpack")
    save_directory = os.fspath(save_directory)
    if not is_main_process:
        return
    for name, dtype in (target_dtype.items() if isinstance(target_dtype, dict) else [("", target_dtype)]):
        try:
            parse_dtype(dtype)  # checked before anything is written
        except (TypeError, ValueError) as e:
            raise type(e)(f"save_pretrained_flashpack: target_dtype{f' for {name!r}' if name else ''}: {e}") from None
    os.makedirs(save_directory, exist_ok=True)
    with written_whole(save_directory) as staging:
        _save_components(pipeline, staging, target_dtype=target_dtype, safe_serialization=safe_serialization,
                         variant=variant, max_shard_size=max_shard_size, align_bytes=align_bytes,
                         num_workers=num_workers, checksum=checksum)
    if push_to_hub:
        upload_directory(save_directory, repo_id, private, token, commit_message, create_pr)


def _save_components(pipeline: DiffusionPipeline, save_directory: str, *, target_dtype: DtypeOrPerComponent,
                     safe_serialization: bool, variant: Optional[str], max_shard_size: Optional[Union[int, str]],
                     align_bytes: int, num_workers: int, checksum: bool) -> None:
    """Every component in its subfolder of ``save_directory``, then ``model_index.json``."""
    transformers_model = _transformers_model_class()
    for name in _component_entries(dict(pipeline.config)):
        component = getattr(pipeline, name, None)
        if component is None:
            continue
        component = unwrapped(component)  # a torch.compile'd model saves as the model it compiles
        sub_directory = os.path.join(save_directory, name)
        dtype = _for_component(target_dtype, name)
        if isinstance(component, ModelMixin):
            diffusers_model.save_pretrained_flashpack(component, sub_directory, target_dtype=dtype,
                                                      align_bytes=align_bytes, num_workers=num_workers,
                                                      checksum=checksum)
        elif transformers_model is not None and isinstance(component, transformers_model):
            from ..transformers import save_pretrained_flashpack

            save_pretrained_flashpack(component, sub_directory, target_dtype=dtype, align_bytes=align_bytes,
                                      num_workers=num_workers, checksum=checksum)
        elif hasattr(component, "save_pretrained"):
            accepted = inspect.signature(component.save_pretrained).parameters
            options = {"safe_serialization": safe_serialization, "variant": variant, "max_shard_size": max_shard_size}
            component.save_pretrained(sub_directory, **{k: v for k, v in options.items()
                                                        if k in accepted and v is not None})
        else:
            warn(f"flashpack_ops: pipeline component '{name}' ({type(component).__name__}) has no "
                 "save_pretrained and is not saved")
    pipeline.save_config(save_directory)
    _name_library_classes(pipeline, os.path.join(save_directory, "model_index.json"))


def _library_class(cls: type) -> type:
    """The class a loader imports for ``cls``: for a model or a pipeline, see ``library_class``;
    for another component (a scheduler, a tokenizer), the first class of its MRO that diffusers
    or transformers define (``cls`` if none)."""
    transformers_model = _transformers_model_class()
    for root in (ModelMixin, DiffusionPipeline, transformers_model):
        if root is not None and issubclass(cls, root):
            return library_class(cls, root)
    for base in cls.__mro__:
        if base.__module__.split(".")[0] in ("diffusers", "transformers"):
            return base
    return cls


def _name_library_classes(pipeline: DiffusionPipeline, index_path: str) -> None:
    """Record library classes in model_index.json, not subclasses that only add flashpack methods.

    Any loader, ``DiffusionPipeline.from_pretrained`` included, can then import every class.
    """
    with open(index_path, encoding="utf-8") as f:
        index = json.load(f)
    with open(index_path, "w", encoding="utf-8") as f:
        json.dump(_with_library_classes(pipeline, index), f, indent=2, sort_keys=True)
        f.write("\n")


def _with_library_classes(pipeline: DiffusionPipeline, index: Dict[str, Any]) -> Dict[str, Any]:
    """``index`` (model_index.json's contents) naming the library classes of the pipeline and
    of its components."""
    index["_class_name"] = _library_class(type(pipeline)).__name__
    for name, entry in _component_entries(index).items():
        component = getattr(pipeline, name, None)
        if component is not None and entry[0] is not None:
            cls = _library_class(type(unwrapped(component)))
            if cls is not type(component):
                index[name] = [cls.__module__.split(".")[0], cls.__name__]
    return index


def _import_class(library: str, class_name: str) -> type:
    """The class model_index.json names; FlashPack subclasses resolve to the class they extend.

    Only diffusers, transformers and diffusers' pipeline modules are imported, as diffusers
    imports them: another library the file names is looked up among the modules already
    imported, never imported because the file names it (importing a module runs its code)."""
    modules = [sys.modules[library]] if isinstance(sys.modules.get(library), types.ModuleType) else []
    pipelines = [f"diffusers.pipelines.{library}"] if isinstance(library, str) and library.isidentifier() else []
    for module_name in pipelines + ["diffusers", "transformers"]:
        try:
            modules.append(importlib.import_module(module_name))
        except ImportError:
            continue
    for name in (class_name, class_name.removeprefix("FlashPack")):
        for module in modules:
            found = getattr(module, name, None)
            if isinstance(found, type):
                return found
    raise ValueError(f"model_index.json names the class {library}.{class_name}, which cannot be imported (a library "
                     "other than diffusers and transformers must be imported first; code that ships with the "
                     "pipeline loads from its component's folder with trust_remote_code=True)")


def _component_class(directory: str, name: str, library: str, class_name: str, trust_remote_code: bool) -> type:
    """The class of a component; one defined in a file of its own folder (``["my_unet", "MyUNet"]``
    beside ``unet/my_unet.py``) is imported from there, as diffusers imports it."""
    folder = os.path.join(directory, name)
    if os.path.isfile(os.path.join(folder, f"{library}.py")):
        from diffusers.utils.dynamic_modules_utils import get_class_from_dynamic_module

        return get_class_from_dynamic_module(folder, module_file=f"{library}.py", class_name=class_name,
                                             trust_remote_code=trust_remote_code)
    return _import_class(library, class_name)


def _variant_in(sub_directory: str, variant: Optional[str]) -> Optional[str]:
    """``variant`` where the component's folder holds files of it, else None: diffusers loads a
    component without them from its usual files (``_identify_model_variants``)."""
    if variant is None or not os.path.isdir(sub_directory):
        return None
    return variant if any(of_variant(name, variant) for name in os.listdir(sub_directory)) else None


def _load_component(component_class: type, directory: str, name: str, device: Optional[DeviceLike],
                    dtype: Any, load_kwargs: Dict[str, Any], usual_kwargs: Dict[str, Any]) -> Any:
    """One component: from its flashpack file with ``load_kwargs``, or else with its own
    ``from_pretrained`` (a model given ``usual_kwargs``: the checkpoint's ``variant``...)."""
    sub_directory = os.path.join(directory, name)
    transformers_model = _transformers_model_class()
    if os.path.isfile(os.path.join(sub_directory, FLASHPACK_FILE)):
        # Loaded from the component's folder, as diffusers loads it: the model records that
        # folder as its name_or_path.
        if issubclass(component_class, ModelMixin):
            return diffusers_model.from_pretrained_flashpack(component_class, sub_directory, device, torch_dtype=dtype,
                                                             **load_kwargs)
        if transformers_model is not None and issubclass(component_class, transformers_model):
            from ..transformers import from_pretrained_flashpack

            return from_pretrained_flashpack(component_class, sub_directory, device, torch_dtype=dtype, **load_kwargs)
        raise ValueError(f"{sub_directory} holds a {FLASHPACK_FILE} but {component_class.__name__} is neither a "
                         "diffusers nor a transformers model")
    if not hasattr(component_class, "from_pretrained"):
        raise ValueError(f"pipeline component '{name}' ({component_class.__name__}) has no from_pretrained")
    location = sub_directory if os.path.isdir(sub_directory) else directory
    if isinstance(component_class, type) and issubclass(component_class, torch.nn.Module):
        is_transformers = transformers_model is not None and issubclass(component_class, transformers_model)
        dtype = parse_dtype(dtype)  # "fp16", as the flashpack components take it; "auto" as None
        options = {} if dtype is None else {"dtype" if is_transformers else diffusers_model.dtype_argument(): dtype}
        usual_kwargs = dict(usual_kwargs, variant=_variant_in(sub_directory, usual_kwargs.get("variant")))
        return component_class.from_pretrained(location, **options, **usual_kwargs).to(device or "cpu")
    return component_class.from_pretrained(location)


def load_pipeline_flashpack(
    pipeline_class: Type[P],
    pretrained_model_name_or_path: Union[str, "os.PathLike[str]"],
    device: Optional[DeviceLike] = None,
    *,
    torch_dtype: DtypeOrPerComponent = None,
    dtype: DtypeOrPerComponent = None,
    silent: bool = True,
    strict: Optional[bool] = None,
    strict_params: bool = True,
    strict_buffers: bool = False,
    ignore_names: Optional[List[str]] = None,
    ignore_prefixes: Optional[List[str]] = None,
    ignore_suffixes: Optional[List[str]] = None,
    coerce_dtype: bool = False,
    copy: bool = False,
    revision: Optional[str] = None,
    cache_dir: Optional[str] = None,
    local_dir: Optional[str] = None,
    token: Optional[Union[str, bool]] = None,
    local_files_only: bool = False,
    force_download: bool = False,
    _task_class: Optional[Callable[[str, Dict[str, Any]], type]] = None,
    **kwargs: Any,
) -> P:
    """Load a pipeline saved by :func:`save_pipeline_flashpack` (or the reference package).

    Every component with a ``model.flashpack`` is built on the meta device and loaded
    from it; the others load with their own ``from_pretrained``.

    Args:
        pipeline_class: the pipeline class; ``DiffusionPipeline`` (or
            ``FlashPackDiffusionPipeline``) picks the one ``model_index.json`` names.
        pretrained_model_name_or_path: a directory, or a Hub repo id.
        device: where the models go; the CPU by default.
        torch_dtype, dtype: one dtype for every model or ``{"unet": ..., "default": ...}``;
            by default each model keeps its file's dtypes (``dtype`` is diffusers' newer
            name for ``torch_dtype``).
        strict, strict_params, strict_buffers, ignore_names, ignore_prefixes,
            ignore_suffixes, coerce_dtype, silent, copy: applied to every model component.
        revision, cache_dir, local_dir, token, local_files_only, force_download: for the Hub.
        **kwargs: components to use instead of loading them (``scheduler=...``), and
            arguments of the pipeline's ``__init__``. ``device_map`` is one device for
            every component, or ``"balanced"``: whole components spread over the GPUs as
            diffusers spreads them (within ``max_memory``; what fits on no GPU in turn
            goes to the CPU), recorded in ``pipeline.hf_device_map``. ``custom_pipeline``
            (a local ``.py`` file or folder) and components whose code lies in their own
            folder load as diffusers loads them, with ``trust_remote_code=True``.
            from_pretrained's other loading options are taken as for single models.

    Returns:
        The pipeline.

    Raises:
        FileNotFoundError: no ``model_index.json``.
        HubUnavailableError: a repo id while offline, with no cached copy.

    Example:
        >>> pipe = load_pipeline_flashpack(DiffusionPipeline, "sd-dir", device="cuda")
    """
    if dtype is not None and torch_dtype is not None and _parsed(dtype) != _parsed(torch_dtype):
        raise ValueError(f"{pipeline_class.__name__}.from_pretrained_flashpack: dtype={dtype!r} and "
                         f"torch_dtype={torch_dtype!r} disagree; pass one of them")
    torch_dtype = dtype if dtype is not None else torch_dtype
    what = f"{pipeline_class.__name__}.from_pretrained_flashpack"
    strategy = kwargs.get("device_map")
    # For components without a flashpack file, loaded the usual way (a pipeline converted in part).
    usual = {name: kwargs[name] for name in ("variant", "use_safetensors") if kwargs.get(name) is not None}
    ignore_mismatched_sizes = kwargs.pop("ignore_mismatched_sizes", False)
    device, distributed = take_load_kwargs(kwargs, device, what)
    spreading = isinstance(strategy, str) and strategy in SPREADING_DEVICE_MAPS
    if isinstance(device, dict) or (spreading and strategy != "balanced"):
        raise ValueError(f"{what}: a pipeline loads every component to one device, or spreads whole components "
                         f"over the GPUs with device_map='balanced' as diffusers does; got device_map={strategy!r} "
                         "(pass device=, or load the components one by one with a device_map each)")
    directory = resolve_pipeline_directory(pretrained_model_name_or_path, passed=list(kwargs),
                                           variant=usual.get("variant"), use_safetensors=usual.get("use_safetensors"),
                                           revision=revision, cache_dir=cache_dir, local_dir=local_dir, token=token,
                                           local_files_only=local_files_only, force_download=force_download)
    if not os.path.isfile(os.path.join(directory, "model_index.json")):
        raise FileNotFoundError(f"{directory} has no model_index.json; is it a diffusers pipeline directory?")
    config = DiffusionPipeline.load_config(directory)
    custom_pipeline = kwargs.pop("custom_pipeline", None)
    trust_remote_code = kwargs.pop("trust_remote_code", False)
    custom_revision = kwargs.pop("custom_revision", None)
    if _task_class is not None:  # an AutoPipeline class: that task's pipeline of the saved one's family
        pipeline_class = _task_class(config["_class_name"], kwargs)
    elif custom_pipeline is not None or isinstance(config["_class_name"], (list, tuple)):
        # Code of the user's own (a file, or the directory's), found and trusted as diffusers does.
        from diffusers.pipelines.pipeline_loading_utils import _get_pipeline_class, _resolve_custom_pipeline_and_cls

        custom_pipeline, custom_class_name = _resolve_custom_pipeline_and_cls(directory, config, custom_pipeline)
        if pipeline_class is FlashPackDiffusionPipeline:
            pipeline_class = DiffusionPipeline
        pipeline_class = _get_pipeline_class(pipeline_class, config=config,
                                             custom_pipeline=custom_pipeline and os.fspath(custom_pipeline),
                                             class_name=custom_class_name, cache_dir=cache_dir,
                                             revision=custom_revision, trust_remote_code=trust_remote_code)
    elif pipeline_class in (DiffusionPipeline, FlashPackDiffusionPipeline):
        pipeline_class = _import_class("diffusers", config["_class_name"])
    expected_modules, optional_kwargs = pipeline_class._get_signature_keys(pipeline_class)
    load_kwargs = dict(silent=silent, strict=strict, strict_params=strict_params, strict_buffers=strict_buffers,
                       ignore_names=ignore_names, ignore_prefixes=ignore_prefixes, ignore_suffixes=ignore_suffixes,
                       coerce_dtype=coerce_dtype, copy=copy, ignore_mismatched_sizes=ignore_mismatched_sizes,
                       **distributed)
    # The components the pipeline takes, as diffusers loads them: another name of the file
    # ("../elsewhere", an absolute path) is no folder of the pipeline, and is not read.
    entries = _component_entries(config)
    unexpected = sorted(name for name in entries if name not in expected_modules and name not in optional_kwargs)
    if unexpected:
        warn(f"flashpack_ops: {os.path.join(directory, 'model_index.json')} names components "
             f"{pipeline_class.__name__} does not take: {unexpected}; ignoring them")
        entries = {name: entry for name, entry in entries.items() if name not in unexpected}
    balanced = isinstance(device, AutoDeviceMap)
    placed = (_balanced_placement(directory, entries, kwargs, torch_dtype, device.max_memory, what,
                                  usual.get("variant"), trust_remote_code) if balanced else None)
    init: Dict[str, Any] = {}
    for name, (library, class_name) in entries.items():
        if name in kwargs:
            init[name] = kwargs.pop(name)
        elif library is None or class_name is None:
            init[name] = None
        else:
            where = _device((placed or {}).get(name, "cpu")) if balanced else device
            init[name] = _load_component(_component_class(directory, name, library, class_name, trust_remote_code),
                                         directory, name, where,
                                         _for_component(torch_dtype, name), load_kwargs, usual)
    for name, value in config.items():
        if not name.startswith("_") and name not in init and name in optional_kwargs:
            init[name] = value
    init.update({k: kwargs.pop(k) for k in list(kwargs) if k in expected_modules or k in optional_kwargs})
    # Optional components model_index.json does not name (a directory saved without them) are
    # None, as diffusers' from_pretrained gives them.
    for name in getattr(pipeline_class, "_optional_components", None) or []:
        if name in expected_modules and name not in init:
            init[name] = None
    if kwargs:
        warn(f"flashpack_ops: {pipeline_class.__name__} does not take {sorted(kwargs)}; ignoring them")
    pipeline = pipeline_class(**{k: v for k, v in init.items() if k in expected_modules or k in optional_kwargs})
    pipeline.register_to_config(_name_or_path=os.fspath(pretrained_model_name_or_path))
    if balanced:
        pipeline.hf_device_map = placed  # as diffusers records it (pipeline.reset_device_map() undoes it)
    return pipeline


def _balanced_placement(directory: str, entries: Dict[str, Any], passed: Dict[str, Any],
                        torch_dtype: DtypeOrPerComponent, max_memory: Optional[Dict[Any, Any]],
                        what: str, variant: Optional[str] = None,
                        trust_remote_code: bool = False) -> Optional[Dict[str, Any]]:
    """``device_map="balanced"`` as diffusers plans it: the model components, largest first,
    dealt to the GPUs in turn (0, 1, ..., 1, 0, ...) within ``max_memory``, a component the
    GPU in turn cannot hold to the CPU. Returns ``{component: GPU index or "cpu"}``, or None
    when ``max_memory`` names no GPU (every component then loads to the CPU, as diffusers
    loads it).

    A component's size is what it will take once loaded: its tensors (a tied one once) in
    the dtype the load gives them, read from the flashpack index or the checkpoint's header;
    no model is built for the purpose."""
    try:
        from accelerate.utils import compute_module_sizes, get_max_memory
        from diffusers.pipelines.pipeline_loading_utils import _assign_components_to_devices
    except ImportError as e:
        raise ImportError(f"{what}: device_map='balanced' needs accelerate, and a diffusers that places components "
                          f"over GPUs ({e})") from None
    gpus = {k: v for k, v in get_max_memory(max_memory).items() if k != "cpu"}
    if not gpus:
        return None
    sizes: Dict[str, int] = {}
    for name, (library, class_name) in entries.items():
        dtype = parse_dtype(_for_component(torch_dtype, name))
        if name in passed:
            if isinstance(passed[name], torch.nn.Module):
                sizes[name] = compute_module_sizes(passed[name], dtype=dtype)[""]
        elif library is not None and class_name is not None:
            component_class = _component_class(directory, name, library, class_name, trust_remote_code)
            size = _component_bytes(os.path.join(directory, name), component_class, dtype, variant)
            if size is not None:
                sizes[name] = size
    gpus = dict(sorted(gpus.items(), key=lambda item: item[1], reverse=True))
    by_size = dict(sorted(sizes.items(), key=lambda item: item[1], reverse=True))
    placed: Dict[str, Any] = {}
    for gpu, components in _assign_components_to_devices(by_size, gpus, device_mapping_strategy="balanced").items():
        placed.update(dict.fromkeys(components, gpu))
    return placed


def _component_bytes(sub_directory: str, component_class: type, dtype: Optional[torch.dtype],
                     variant: Optional[str] = None) -> Optional[int]:
    """The bytes a component's tensors take once loaded, floating ones converted to ``dtype``
    (given) or as the load leaves them: a flashpack file's as stored, a diffusers model's
    checkpoint in float32 (diffusers' default), a transformers model's as stored. None for a
    component without weights (a scheduler, a tokenizer)."""
    path = os.path.join(sub_directory, FLASHPACK_FILE)
    if os.path.isfile(path):
        tensors = _flashpack_tensors(path)
    elif isinstance(component_class, type) and issubclass(component_class, torch.nn.Module):
        tensors = _checkpoint_tensors(sub_directory, variant)
        if dtype is None and issubclass(component_class, ModelMixin):
            dtype = torch.float32
    else:
        return None
    if tensors is None:
        return None
    return sum(numel * (dtype.itemsize if dtype is not None and stored.is_floating_point else stored.itemsize)
               for numel, stored in tensors)


def _flashpack_tensors(path: str) -> List[Tuple[int, torch.dtype]]:
    """(element count, dtype) of each tensor a flashpack file holds, a tied one once."""
    meta = read_metadata(path)
    blocks = _footer_blocks(meta)  # by "format": a flashpack_v3 file is one block
    v3 = meta["format"] == "flashpack_v3"
    tied = tied_second_names(meta["index"])
    return [(entry["length"], getattr(torch, blocks[0 if v3 else entry.get("macroblock", 0)][0]))
            for entry in meta["index"] if entry["length"] and entry["name"] not in tied]


def _checkpoint_tensors(sub_directory: str, variant: Optional[str]) -> Optional[List[Tuple[int, torch.dtype]]]:
    """(element count, dtype) of each tensor of a model folder's checkpoint, read from the
    safetensors headers (or a torch file mapped onto the meta device): the files of
    ``variant`` (``model.fp16.safetensors``), or those without one, safetensors before torch
    files. None when there are none."""
    if not os.path.isdir(sub_directory):
        return None
    names = sorted(os.listdir(sub_directory))
    variant = _variant_in(sub_directory, variant)
    for suffix in (".safetensors", ".bin"):
        files = [os.path.join(sub_directory, f) for f in names if f.endswith(suffix) and of_variant(f, variant)]
        if files:
            break
    else:
        return None
    tensors: List[Tuple[int, torch.dtype]] = []
    for file in files:
        tensors += checkpoint_tensor_sizes(file) or []
    return tensors


class FlashPackDiffusionPipeline(DiffusionPipeline):
    """Adds ``save_pretrained_flashpack`` and ``from_pretrained_flashpack`` to a diffusers pipeline.

    Example:
        >>> class FlashSD(StableDiffusionPipeline, FlashPackDiffusionPipeline):
        ...     pass
        >>> pipe = FlashSD.from_pretrained_flashpack("sd-dir", device="cuda")
        >>> pipe.save_pretrained_flashpack("sd-copy")
    """

    def to_json_string(self) -> str:
        """``model_index.json`` as diffusers writes it, naming the diffusers classes that this
        pipeline and its components extend (``StableDiffusionPipeline``, not ``FlashSD``;
        ``UNet2DConditionModel``, not ``FlashUNet``): a plain ``save_pretrained`` then gives a
        directory that diffusers loads where those subclasses do not exist."""
        return json.dumps(_with_library_classes(self, json.loads(super().to_json_string())), indent=2,
                          sort_keys=True) + "\n"

    def save_pretrained_flashpack(
        self,
        save_directory: Union[str, "os.PathLike[str]"],
        safe_serialization: bool = True,
        variant: Optional[str] = None,
        max_shard_size: Optional[Union[int, str]] = None,
        push_to_hub: bool = False,
        commit_message: Optional[str] = None,
        create_pr: bool = False,
        token: Optional[str] = None,
        repo_id: Optional[str] = None,
        private: Optional[bool] = None,
        is_main_process: bool = True,
        align_bytes: int = DEFAULT_ALIGN_BYTES,
        silent: bool = True,
        num_workers: int = 0,
        target_dtype: DtypeOrPerComponent = None,
        **kwargs: Any,
    ) -> None:
        """See :func:`flashpack_ops.integrations.diffusers.save_pipeline_flashpack`.

        The arguments may be given by position, in the reference package's order (that of
        ``DiffusionPipeline.save_pretrained``: ``safe_serialization``, ``variant``, ...).
        """
        save_pipeline_flashpack(self, save_directory, safe_serialization=safe_serialization, variant=variant,
                                max_shard_size=max_shard_size, push_to_hub=push_to_hub,
                                commit_message=commit_message, create_pr=create_pr, token=token, repo_id=repo_id,
                                private=private, is_main_process=is_main_process, align_bytes=align_bytes,
                                silent=silent, num_workers=num_workers, target_dtype=target_dtype, **kwargs)

    @classmethod
    def from_pretrained_flashpack(cls: Type[P], pretrained_model_name_or_path: Union[str, "os.PathLike[str]"],
                                  device: Optional[DeviceLike] = None, **kwargs: Any) -> P:
        """See :func:`flashpack_ops.integrations.diffusers.load_pipeline_flashpack`."""
        return load_pipeline_flashpack(cls, pretrained_model_name_or_path, device, **kwargs)
