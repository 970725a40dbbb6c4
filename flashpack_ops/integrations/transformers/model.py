"""transformers: save a ``PreTrainedModel`` as config + flashpack file, and load it back."""

from __future__ import annotations

import contextlib
import json
import os
import re
from copy import deepcopy
from typing import Any, Callable, ContextManager, Dict, Iterator, List, Optional, Tuple, Type, TypeVar, Union

import torch
import transformers
from transformers import AutoConfig, GenerationConfig, PretrainedConfig, PreTrainedModel

from ..._warnings import warn
from ...api import DevicePlacement, assign_from_file, initialize_missing, prefetching
from ...mixin import FlashPackMixin, init_empty_parameters
from ...ops import DEFAULT_ALIGN_BYTES, DeviceLike, _device, load_file, read_metadata
from .._hub import (aliases, build_and_load_dtypes, checked_save_directory, configs_written_last, dispatch_placed,
                    dropped_on_load, initialise_left_out, library_class, loading_info, locate_flashpack,
                    mismatched_entries, parse_dtype, place_model, refuse_adapters, take_load_kwargs, tied_names,
                    unwrapped, upload_directory, warn_unused_save_kwargs, with_unplaced_params, write_weights)

M = TypeVar("M", bound=PreTrainedModel)

_TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])


def _no_init_weights() -> ContextManager[None]:
    """transformers' switch that skips weight init (and tying) while building.

    NOTE: init on meta parameters does no arithmetic but still costs one dispatch per
    tensor: about 60 ms for a 1B model, as long as loading its 2.5 GB to a GPU takes.
    Buffers are unaffected: ``__init__`` computes them before any init runs.
    """
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


def keeps_in_float32(model: PreTrainedModel, dtype: Optional[torch.dtype]) -> Optional[Callable[[str], bool]]:
    """Which tensors ``from_pretrained(dtype=dtype)`` keeps in float32, or None for none.

    Models list modules whose precision matters (T5's ``wo``) in ``_keep_in_fp32_modules``
    (kept for float16) and ``_keep_in_fp32_modules_strict`` (for float16 and bfloat16);
    a name matches as transformers matches it, a regular-expression search with ``*`` as ``.*``.
    """
    modules = set()
    if dtype == torch.float16:
        modules |= set(getattr(model, "_keep_in_fp32_modules", None) or [])
    if dtype in (torch.float16, torch.bfloat16):
        modules |= set(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    if not modules:
        return None
    pattern = re.compile("|".join(f"(?:{m.replace('*', '.*')})" for m in sorted(modules)))
    return lambda name: pattern.search(name) is not None


def _match_to_file(model: PreTrainedModel, index: List[Dict[str, Any]]) -> Tuple[torch.nn.Module, List[str]]:
    """The module to load the file into and the file's names to leave out, as from_pretrained
    matches a checkpoint to a model: a base model (``BertModel``) takes the ``bert.*`` tensors
    of a checkpoint saved with a head (``BertForMaskedLM``) and leaves the head out; a model with
    a head loads a base checkpoint into its base (``model.bert``), the head left to the caller;
    and names
    the class lists in ``_keys_to_ignore_on_load_unexpected`` (T5EncoderModel: the decoder)
    are left out, as is a second name for a tensor the model loads under its first (T5's
    ``lm_head.weight``, tied to ``shared.weight``: the same bytes, nothing would be lost).
    ``index``: the file's footer index."""
    in_file = [entry["name"] for entry in index]
    target: torch.nn.Module = model
    prefix = getattr(model, "base_model_prefix", "") or ""
    in_model = set(model.state_dict())
    wrapped = False
    file_has_prefix = any(n.startswith(prefix + ".") for n in in_file)
    model_has_prefix = any(n.startswith(prefix + ".") for n in in_model)
    if prefix and file_has_prefix and not model_has_prefix:
        # Named after the model, so that errors name the class the caller asked for.
        target = type(type(model).__name__, (torch.nn.Module,), {})()
        target.add_module(prefix, model)  # the file's names, prefix included, now match
        in_model = set(target.state_dict())
        wrapped = True
    elif prefix and model_has_prefix and not file_has_prefix and isinstance(getattr(model, prefix, None),
                                                                             torch.nn.Module):
        target = getattr(model, prefix)
        in_model = set(target.state_dict())
    patterns = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []]
    loaded = {(e.get("macroblock", 0), e["offset"], tuple(e["shape"])) for e in index if e["name"] in in_model}

    def leave_out(entry: Dict[str, Any]) -> bool:
        name = entry["name"]
        if name in in_model:
            return False
        return ((wrapped and not name.startswith(prefix + ".")) or any(p.search(name) for p in patterns)
                or (entry["length"] > 0 and (entry.get("macroblock", 0), entry["offset"], tuple(entry["shape"])) in loaded))

    return target, [entry["name"] for entry in index if leave_out(entry)]


def _extras(target: torch.nn.Module, index: List[Dict[str, Any]], left_out: List[str]) -> List[str]:
    """Entries of the file that ``target`` does not have (a T5 v1.1 checkpoint's own lm_head,
    for a T5EncoderModel), where it has everything else: from_pretrained leaves them out and
    lists them as unexpected. Where a parameter is missing too, none: the error then lists
    both, with its hint at a prefix."""
    in_file = {entry["name"] for entry in index}
    parameters = aliases(target.named_parameters(remove_duplicate=False))
    if any(not in_file.intersection(names) for names in parameters.values()):
        return []
    in_model, skipped = set(target.state_dict()), set(left_out)
    return sorted(in_file - in_model - skipped)


def _retie(model: PreTrainedModel) -> None:
    """Ties the model's tied weights again, keeping any pair _tie_as_the_file_holds untied."""
    if _TRANSFORMERS_MAJOR >= 5 and getattr(model, "all_tied_weights_keys", None) is not None:
        model.tie_weights(recompute_mapping=False)
    else:
        model.tie_weights()


def _renamed_by_transformers(model: PreTrainedModel, names: List[str]) -> bool:
    """Whether transformers' own conversion of checkpoints (a MoE's experts fused, LLaVA's
    language_model moved) would rename any of ``names`` as from_pretrained loads them."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping

        transforms = get_model_conversion_mapping(model)
    except Exception:  # noqa: BLE001 - transformers 4, or a model it has no mapping for
        return False
    for name in names[:100]:
        for transform in transforms:
            try:
                if transform.rename_source_key(name)[1] is not None:
                    return True
            except Exception:  # noqa: BLE001 - a transform that cannot say
                continue
    return False


@contextlib.contextmanager
def _renamed_checkpoint_hint(model: PreTrainedModel, path: str) -> Iterator[None]:
    """A file holding a checkpoint's names that transformers renames as it loads them (a file
    converted from the weights file of a MoE or LLaVA checkpoint) and so does not match the
    model: the error also says that a conversion of the directory renames them
    (``flashpack convert DIR`` loads it with from_pretrained first)."""
    try:
        yield
    except ValueError as error:
        in_model = set(model.state_dict())
        unknown = [entry["name"] for entry in read_metadata(path)["index"] if entry["name"] not in in_model]
        if not unknown or not _renamed_by_transformers(model, unknown):
            raise
        directory = os.path.dirname(path) or "."
        raise ValueError(f"{error}; transformers renames {model.config.model_type} checkpoints as it loads them, "
                         f"which a flashpack file made from the weights file keeps as saved: convert the model "
                         f"directory instead (`flashpack convert {directory}`), which loads it as "
                         "from_pretrained does") from None


def _tie_as_the_file_holds(model: PreTrainedModel, path: str, index: List[Dict[str, Any]], what: str,
                           named_in_model: Callable[[str], str],
                           cast: Callable[[str, torch.Tensor], torch.Tensor]) -> None:
    """Ties the model's tied weights (building it skipped that), as from_pretrained does from
    transformers 5 on: a name the file holds apart from the rest of its group, with other
    values (after ``cast``, the load's dtype conversion), stays untied (the config says tied,
    the checkpoint does not: T5 v1.1 and flan-t5 have an lm_head of their own), so that the
    file's own tensor loads; a warning says so, as transformers does. ``named_in_model`` turns
    the file's names into the model's (_match_to_file's prefix)."""
    tied = getattr(model, "all_tied_weights_keys", None)
    if not tied or _TRANSFORMERS_MAJOR < 5:
        model.tie_weights()
        return
    index_in_model = {named_in_model(entry["name"]): entry for entry in index}

    def where(entry: Dict[str, Any]) -> Tuple[Any, ...]:
        return entry.get("macroblock", 0), entry["offset"], tuple(entry["shape"]), entry.get("dtype")

    groups: Dict[str, List[str]] = {}
    for target, source in tied.items():
        groups.setdefault(source, []).append(target)
    apart = []
    for source, targets in groups.items():
        # Each name the file holds is compared with the group's first: the source, or where
        # the file lacks it, the first target it holds (which the source is then tied to).
        held = [name for name in [source] + targets if name in index_in_model]
        for name in held[1:]:
            first, other = index_in_model[held[0]], index_in_model[name]
            if where(first) == where(other):
                continue
            # Views of the mapped file: only these two tensors' bytes are read.
            values = load_file(path, names=[first["name"], other["name"]])
            a, b = cast(held[0], values[first["name"]]), cast(name, values[other["name"]])
            if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
                apart.append((name, held[0]))
    for name, first in apart:
        warn(f"{what}: the config ties {name} to {first}, but {path} holds both, with different values: they are "
             "not tied, and each loads its own (set tie_word_embeddings=False in the config to silence this)")
        tied.pop(name)
    _retie(model)


def _mark_initialized(model: torch.nn.Module) -> None:
    """Marks every module and tensor initialised (``_is_hf_initialized``), as from_pretrained
    leaves a model from transformers 5 on: a later ``post_init()`` (after adding a head, say)
    then initialises only what is new, not the weights just loaded."""
    for module in model.modules():
        module._is_hf_initialized = True
        # NOTE: the module's own dicts, not parameters(recurse=False): half the time (0.5 ms
        # against 1.0 of a 1B Llama's 20 ms load to the CPU, on a 2-core VM).
        for tensor in (*module._parameters.values(), *module._buffers.values()):
            if tensor is not None:
                tensor._is_hf_initialized = True


def _map_onto(target: torch.nn.Module, model: PreTrainedModel, prefix: str, device: Any) -> Any:
    """A device map of ``model``'s module names, given in the names of ``target``, the module
    _match_to_file loads the file into: the model's base (``model.bert``: the map's ``bert.*``
    keys, the head's left out), or a module holding the model under its prefix. A device
    passes as it is."""
    if not isinstance(device, dict) or target is model:
        return device
    if target is getattr(model, prefix, None):
        # The base: "" and then the prefix itself (more specific) place what no deeper key does.
        onto = {"": device[key] for key in ("", prefix) if key in device}
        onto.update({key[len(prefix) + 1:]: value for key, value in device.items() if key.startswith(prefix + ".")})
        return onto
    return {f"{prefix}.{key}" if key else prefix: value for key, value in device.items()}


def _complete_head(model: PreTrainedModel, base: str, path: str, device: Any, strict: bool,
                   what: str) -> List[str]:
    """After a base checkpoint filled the base of a model with a head: tie the head to the base
    where the model ties them, then refuse what is left of the head (strict) or zero-fill it
    on its device (``device``, or where the ``{module: device}`` map puts it; returns its names,
    for initialize_missing)."""
    _retie(model)
    head = [name for name, p in model.named_parameters() if p.is_meta]
    if head and strict:
        raise ValueError(f"{what}: {path} holds a {base} without the head {type(model).__name__} adds: "
                         f"{len(head)} parameters missing from the file: {', '.join(head)} (from_pretrained would "
                         "initialise them at random; so does strict=False)")
    placement = DevicePlacement(device, what) if isinstance(device, dict) else None
    default = None if placement is not None else _device(device)

    def device_of(name: str, old: torch.Tensor) -> torch.device:
        if placement is None:
            return default
        placed = placement(name)
        return placed if placed is not None else old.device

    names_of = aliases(model.named_parameters(remove_duplicate=False))
    for name in head:
        old = model.get_parameter(name)
        new = torch.nn.Parameter(torch.zeros(old.shape, dtype=old.dtype, device=device_of(name, old)),
                                 requires_grad=old.requires_grad)
        for alias in names_of[id(old)]:  # a tied head parameter (BERT's decoder bias) stays tied
            module_name, _, attr = alias.rpartition(".")
            model.get_submodule(module_name)._parameters[attr] = new
    for module_name, module in model.named_modules():
        for name, buffer in module._buffers.items():
            full = f"{module_name}.{name}" if module_name else name
            if buffer is not None and buffer.device != device_of(full, buffer):
                module._buffers[name] = buffer.to(device_of(full, buffer))
    return head


def save_pretrained_flashpack(
    model: PreTrainedModel,
    save_directory: Union[str, "os.PathLike[str]"],
    *,
    is_main_process: bool = True,
    push_to_hub: bool = False,
    target_dtype: Optional[Union[torch.dtype, str]] = None,
    align_bytes: int = DEFAULT_ALIGN_BYTES,
    silent: bool = True,
    commit_message: Optional[str] = None,
    create_pr: bool = False,
    token: Optional[str] = None,
    repo_id: Optional[str] = None,
    private: Optional[bool] = None,
    num_workers: int = 0,
    ignore_names: Optional[List[str]] = None,
    ignore_prefixes: Optional[List[str]] = None,
    ignore_suffixes: Optional[List[str]] = None,
    checksum: bool = False,
    **kwargs: Any,
) -> None:
    """Write ``config.json`` (and ``generation_config.json``) and ``model.flashpack`` to a directory.

    Args:
        model: any transformers model.
        save_directory: created if needed.
        is_main_process: only the main process writes (distributed training).
        push_to_hub, repo_id, private, token, commit_message, create_pr: upload the
            directory to the Hugging Face Hub afterwards.
        target_dtype: convert the floating-point tensors to this dtype, or its name
            (``"bfloat16"``, ``"bf16"``; the config records it), except those the model
            keeps in float32 at that dtype, as ``from_pretrained(dtype=...)`` does.
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
        >>> save_pretrained_flashpack(model, "llama-dir", target_dtype=torch.bfloat16)
    """
    warn_unused_save_kwargs(kwargs, "save_pretrained_flashpack")
    save_directory = checked_save_directory(save_directory)
    # "bf16", "torch.float16": checked before anything is written
    target_dtype = parse_dtype(target_dtype, "save_pretrained_flashpack: target_dtype")
    model = unwrapped(model)  # a torch.compile'd model saves as the model it compiles
    refuse_adapters(model, "save_pretrained_flashpack")
    if is_main_process:
        os.makedirs(save_directory, exist_ok=True)
        config = deepcopy(model.config)
        # As save_pretrained records them: the dtype the weights are saved in (a model moved
        # to bfloat16 after its load is saved as bfloat16), and the class, so that the Auto
        # classes and `flashpack convert` know the model (and its head) from the directory.
        config.dtype = str(target_dtype or model.dtype).removeprefix("torch.")
        config.architectures = [library_class(type(model), PreTrainedModel).__name__]
        with configs_written_last(save_directory) as staging:
            if getattr(model, "_auto_class", None) is not None:
                # A model whose code ships with it: its code goes with it, as save_pretrained copies it.
                from transformers.dynamic_module_utils import custom_object_save

                custom_object_save(model, staging, config=config)
            config.save_pretrained(staging)
            if model.can_generate() and getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(staging)
            write_weights(model, save_directory, target_dtype=target_dtype, align_bytes=align_bytes,
                          num_workers=num_workers, ignore_names=ignore_names, ignore_prefixes=ignore_prefixes,
                          ignore_suffixes=ignore_suffixes, keep_float32=keeps_in_float32(model, target_dtype),
                          checksum=checksum)
    if push_to_hub and is_main_process:
        upload_directory(save_directory, repo_id, private, token, commit_message, create_pr)


def _init_weights_of(model: PreTrainedModel) -> Callable[[torch.nn.Module], None]:
    """What from_pretrained initialises a module with: the ``_init_weights`` of the nearest
    PreTrainedModel holding it (a vision tower's own, with its own config, inside a
    multimodal model), as ``initialize_weights`` applies them."""
    owner: Dict[int, PreTrainedModel] = {}

    def init(module: torch.nn.Module) -> None:
        if not owner:  # on first use: most loads initialise nothing
            for _, sub in model.named_modules():  # parents first: a nested PreTrainedModel claims its own
                if isinstance(sub, PreTrainedModel):
                    for held in sub.modules():
                        owner[id(held)] = sub
        owner.get(id(module), model)._init_weights(module)

    return init


def _recompute_non_persistent_buffers(model: PreTrainedModel) -> None:
    """Computes the non-persistent buffers again with the model's ``_init_weights``, as
    from_pretrained does once the weights are in. ``__init__`` computed them under the load's
    default dtype (bfloat16, float16): a table it builds in that dtype's arithmetic (GPT-J's
    sinusoidal positions) differs from the one from_pretrained computes in float32 after the
    build. Every other tensor of the model is out of the inits' reach meanwhile. A buffer no
    init computed again (an init that failed, which leaves what it reached at zero) keeps the
    values ``__init__`` gave it."""
    buffers = {f"{module_name}.{name}" if module_name else name: module._buffers[name]
               for module_name, module in model.named_modules()
               for name in sorted(module._non_persistent_buffers_set)
               if module._buffers.get(name) is not None and not module._buffers[name].is_meta}
    if not buffers:
        return
    built = {name: buffer.clone() for name, buffer in buffers.items()}
    with torch.no_grad():
        for name in initialize_missing(model, list(buffers), _init_weights_of(model)):
            buffers[name].copy_(built[name])


def _whole_model_dtype(dtype: Any, what: str) -> Any:
    """A dtype per sub-config (``{"text_config": ..., "": ...}``) gives the whole model its
    ``""`` entry, or the default dtype, as from_pretrained does from transformers 5."""
    if not isinstance(dtype, dict):
        return dtype
    unknown = [key for key in dtype if not isinstance(key, str)]
    if unknown:
        raise TypeError(f"{what}: the keys of a dtype dict are sub-config names, got {unknown[0]!r}")
    # A bad name fails here, as a plain dtype would.
    whole = parse_dtype(dtype.get("", torch.get_default_dtype()), f"{what}: dtype")
    if any(parse_dtype(value, f"{what}: dtype") != whole for value in dtype.values()):
        warn(f"{what}: a dtype per sub-config is not supported: the whole model loads as {whole} "
             "(the dict's \"\" entry, or the default dtype), as from_pretrained loads it")
    return whole


def from_pretrained_flashpack(
    model_class: Type[M],
    pretrained_model_name_or_path: Union[str, "os.PathLike[str]"],
    device: Optional[DeviceLike] = None,
    *,
    torch_dtype: Optional[Union[torch.dtype, str, Dict[str, Any]]] = None,
    dtype: Optional[Union[torch.dtype, str, Dict[str, Any]]] = None,
    config: Optional[PretrainedConfig] = None,
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
    """Build ``model_class`` from a directory's config and load its ``model.flashpack``.

    The model is built with its parameters on the meta device and every parameter
    then views the loaded memory: the weights are never held twice. Non-persistent
    buffers (rotary ``inv_freq``) are computed by the model's ``__init__`` as usual.

    Args:
        model_class: a transformers model class (``LlamaForCausalLM``).
        pretrained_model_name_or_path: a directory, or a Hub repo id (downloaded with
            huggingface_hub, or taken from its cache).
        device: where the weights go; the CPU by default.
        torch_dtype, dtype: convert the file's floating-point tensors to this dtype
            (a copy). By default the model takes the file's dtype (most of its floating-point
            bytes): every floating tensor loads in it, except in the modules the model keeps
            in float32, as ``from_pretrained`` casts to the model's dtype. A dict of dtypes per
            sub-config gives the whole model its ``""`` entry, as from_pretrained does.
        config: use this config instead of the directory's.
        subfolder: the model lies in this subfolder of the directory or repo.
        revision, local_dir, local_files_only, cache_dir, token, force_download: for
            downloads from the Hub.
        strict, strict_params, strict_buffers, ignore_names, ignore_prefixes,
            ignore_suffixes, coerce_dtype, keep_flash_ref_on_model, silent, copy: as in
            :func:`flashpack_ops.assign_from_file`.
        device_map: in place of ``device``: one device for the whole model (``"cuda"``,
            ``0``, ``{"": "cuda:1"}``), or a map of module names to devices
            (``{"model.embed_tokens": 0, "model.layers": 1, ...}``), or ``"auto"`` and the
            like, planned as from_pretrained plans them (within ``max_memory``). Each device
            loads only its modules' entries; accelerate's hooks are added as from_pretrained
            adds them.
        output_loading_info: also return ``{"missing_keys", "unexpected_keys", ...}``.
        generation_config: use this instead of the directory's ``generation_config.json``.
        ignore_mismatched_sizes: entries the model holds in another shape (``num_labels=5``
            over a checkpoint saved for 2) are left out and initialised, with a warning, as
            from_pretrained does; an error otherwise.
        use_distributed_loading, distributed_sharded, rank, local_rank, world_size: as in
            :func:`flashpack_ops.assign_from_file`.
        **kwargs: config attributes to override, or arguments of the model's ``__init__``.
            from_pretrained's arguments that only choose or tune the weights' download
            (``low_cpu_mem_usage``, ``use_safetensors``, ``variant``...) are accepted and
            have no effect; those that would change what is loaded (``quantization_config``,
            ``tp_plan``, ``gguf_file``...) raise ValueError.

    Returns:
        The model, in eval mode, as ``from_pretrained`` returns it (and the loading info).

    Raises:
        FileNotFoundError: no ``model.flashpack`` in the directory.
        HubUnavailableError: a repo id while offline, with no cached copy.
        ValueError: the file does not match the model (names listed), or an argument
            from_pretrained_flashpack cannot honour.

    Example:
        >>> model = from_pretrained_flashpack(LlamaForCausalLM, "llama-dir", device="cuda")
    """
    what = f"{model_class.__name__}.from_pretrained_flashpack"
    ignore_mismatched_sizes = kwargs.pop("ignore_mismatched_sizes", False)
    device, distributed = take_load_kwargs(kwargs, device, what)
    output_loading_info = kwargs.pop("output_loading_info", False)
    generation_config = kwargs.pop("generation_config", None)
    # The class is given: no model code to fetch (a custom generate() is, as from_pretrained does).
    trust_remote_code = kwargs.pop("trust_remote_code", False)
    path = locate_flashpack(pretrained_model_name_or_path, subfolder, revision=revision, cache_dir=cache_dir,
                            local_dir=local_dir, token=token, local_files_only=local_files_only,
                            force_download=force_download)
    model_dir = os.path.dirname(path)
    # The file streams in while the config is read and the model built (about 10 ms for a 1B
    # model on the 2-core VM; loading its 2.5 GB to an H200 takes some 57 ms), where the load
    # will be of the whole file to one device; a load that turns out otherwise lets it go first.
    whole_file = not (keep_flash_ref_on_model or distributed.get("use_distributed_loading")
                      or ignore_names or ignore_prefixes or ignore_suffixes or ignore_mismatched_sizes)
    with prefetching(path, device, copy, whole_file) as prefetched:
        config_kwargs = dict(kwargs)  # from_pretrained applies them to the generation config too
        if config is not None:
            config = deepcopy(config)  # as from_pretrained takes it: the caller's object is left alone
        else:
            config_class = model_class.config_class
            if config_class is None or config_class is PretrainedConfig:
                # AutoConfig picks the class by model_type; a config without one is a plain
                # PretrainedConfig, as from_pretrained reads it.
                with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
                    config_class = AutoConfig if "model_type" in json.load(f) else PretrainedConfig
            config, kwargs = config_class.from_pretrained(model_dir, return_unused_kwargs=True, **kwargs)
        config.name_or_path = os.fspath(pretrained_model_name_or_path)
        dtype, torch_dtype = _whole_model_dtype(dtype, what), _whole_model_dtype(torch_dtype, what)
        build_dtype, load_dtype = build_and_load_dtypes(path, dtype, torch_dtype, what)
        dtype_kwarg = "dtype" if _TRANSFORMERS_MAJOR >= 5 else "torch_dtype"
        kwargs[dtype_kwarg] = build_dtype
        with init_empty_parameters(build_dtype), _no_init_weights():
            model = model_class._from_config(config, **kwargs)
        index = read_metadata(path)["index"]  # read once: every decision below is about one file
        target, left_out = _match_to_file(model, index)
        prefix = getattr(model, "base_model_prefix", "") or ""
        wrapper = target is not model and target is not getattr(model, prefix, None)  # holds the model under prefix

        def named_in_model(name: str) -> str:
            if wrapper:
                return name.removeprefix(prefix + ".")
            return f"{prefix}.{name}" if target is not model else name

        # Without a dtype (or "auto") the model takes the file's: its floating tensors all load in
        # that one dtype, as from_pretrained casts every one to the model's, except the modules
        # it keeps in float32 (T5's wo). A file in one dtype loads without a copy.
        load_dtype = load_dtype or build_dtype
        keep_float32 = keeps_in_float32(model, load_dtype)

        def cast(name: str, tensor: torch.Tensor) -> torch.Tensor:
            if not tensor.is_floating_point():
                return tensor
            if keep_float32 and keep_float32(name):
                return tensor.to(torch.float32)
            return tensor if load_dtype is None else tensor.to(load_dtype)  # None: a file without floats

        _tie_as_the_file_holds(model, path, index, what, named_in_model, cast)  # then the file fills each tied group once
        # Entries of another shape (a classifier saved for 2 labels, built for 5) are left out and
        # initialised as missing ones are, as from_pretrained(ignore_mismatched_sizes=True) does;
        # with every other name of their tied group.
        mismatched = mismatched_entries(target, index) if ignore_mismatched_sizes else []
        if strict is None:  # strict=True refuses them, strict=False takes them without a word
            extras = _extras(target, index, left_out)
            if extras:
                warn(f"{what}: {len(extras)} entries of {path} that {type(model).__name__} does not have are left out, as "
                     f"from_pretrained leaves them out: {', '.join(extras[:20])}{' ...' if len(extras) > 20 else ''}")
                left_out = left_out + extras
        device = place_model(model, device)
        zero_filled: List[str] = []
        with _renamed_checkpoint_hint(model, path):
            assign_from_file(
                target, path, device=_map_onto(target, model, prefix, with_unplaced_params(model, device))
                if device is not None else "cpu",
                strict=strict, strict_params=strict_params,
                strict_buffers=strict_buffers, keep_flash_ref_on_model=keep_flash_ref_on_model, silent=silent,
                ignore_names=list(ignore_names or []) + left_out + tied_names(target, [n for n, _, _ in mismatched]),
                ignore_prefixes=ignore_prefixes, ignore_suffixes=ignore_suffixes,
                coerce_dtype=coerce_dtype, dtype=load_dtype, copy=copy, _keep_float32=keep_float32,
                _zero_filled=zero_filled, _model_prefix=f"{prefix}." if wrapper else "", _prefetched=prefetched,
                **distributed,
            )
        if keep_flash_ref_on_model and target is not model:
            model._flash_shared_storage = target._flash_shared_storage
            model._flash_shared_storage_meta = target._flash_shared_storage_meta
        zero_filled = [named_in_model(name) for name in zero_filled]
        mismatched = [(named_in_model(name), in_file, in_model) for name, in_file, in_model in mismatched]
        if target is not model and not wrapper:  # the base of a model with a head
            zero_filled += _complete_head(model, type(target).__name__, path, device if device is not None else "cpu",
                                          strict is not False and (strict or strict_params), what)
        _recompute_non_persistent_buffers(model)
        initialise_left_out(model, path, what, zero_filled, mismatched, _init_weights_of(model), "from_pretrained")
        _mark_initialized(model)
        dispatch_placed(model, device)
        if model.can_generate() and hasattr(model, "adjust_generation_fn"):
            # As from_pretrained: the one given, or generation_config.json, or else the generation
            # settings an older config.json holds (BART's num_beams...), with the keyword arguments.
            model.adjust_generation_fn(generation_config, False, False, model_dir, cache_dir=None, force_download=False,
                                       proxies=None, local_files_only=True, token=None, revision=None, subfolder="",
                                       trust_remote_code=trust_remote_code, **config_kwargs)
        elif generation_config is not None:
            model.generation_config = generation_config
        elif model.can_generate() and os.path.isfile(os.path.join(model_dir, "generation_config.json")):
            model.generation_config = GenerationConfig.from_pretrained(model_dir)
        model.eval()
        if not output_loading_info:
            return model
        info = loading_info(target, path, missing=zero_filled, mismatched=mismatched)
        # What the class expects to find and drop (T5EncoderModel: the decoder) is not unexpected.
        dropped = set(dropped_on_load(model, info["unexpected_keys"]))
        info["unexpected_keys"] = [name for name in info["unexpected_keys"] if name not in dropped]
        if _TRANSFORMERS_MAJOR >= 5:  # from_pretrained gives sets of names from 5.0 on
            info = {key: set(value) if key != "error_msgs" else value for key, value in info.items()}
        return model, info


class FlashPackTransformersModelMixin(PreTrainedModel, FlashPackMixin):
    """Adds ``save_pretrained_flashpack`` and ``from_pretrained_flashpack`` to a transformers model.

    Example:
        >>> class FlashLlama(LlamaForCausalLM, FlashPackTransformersModelMixin):
        ...     pass
        >>> FlashLlama(config).save_pretrained_flashpack("llama-dir")
        >>> model = FlashLlama.from_pretrained_flashpack("llama-dir", device="cuda")
    """

    flashpack_init_method: Optional[str] = "_from_config"

    def save_pretrained_flashpack(self, save_directory: Union[str, "os.PathLike[str]"], **kwargs: Any) -> None:
        """See :func:`flashpack_ops.integrations.transformers.save_pretrained_flashpack`."""
        save_pretrained_flashpack(self, save_directory, **kwargs)

    @classmethod
    def from_pretrained_flashpack(cls: Type[M], pretrained_model_name_or_path: Union[str, "os.PathLike[str]"],
                                  device: Optional[DeviceLike] = None, **kwargs: Any) -> M:
        """See :func:`flashpack_ops.integrations.transformers.from_pretrained_flashpack`."""
        return from_pretrained_flashpack(cls, pretrained_model_name_or_path, device, **kwargs)
