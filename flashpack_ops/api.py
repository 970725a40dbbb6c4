"""The reference ``flashpack`` package's API, on top of the flashpack_ops operators."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Union

import torch

from .ops import DEFAULT_ALIGN_BYTES, DeviceLike, PathLike, load_file, read_metadata, save_file


def _is_ignored(name: str, names=None, prefixes=None, suffixes=None) -> bool:
    return bool(
        (names and name in names)
        or (prefixes and any(name.startswith(p) for p in prefixes))
        or (suffixes and any(name.endswith(s) for s in suffixes))
    )


def pack_to_file(
    state_dict_or_model: Union[Dict[str, torch.Tensor], torch.nn.Module],
    destination_path: PathLike,
    target_dtype: Optional[torch.dtype] = None,
    name_order: Optional[List[str]] = None,
    align_bytes: int = DEFAULT_ALIGN_BYTES,
    silent: bool = True,
    num_workers: int = 0,
) -> None:
    """Pack a state dict, or a module's state dict, into a flashpack file.

    Args:
        state_dict_or_model: the tensors, or an ``nn.Module`` whose ``state_dict()`` is saved.
        destination_path: the file to write (atomically).
        target_dtype: if given, every tensor is converted to it (as the reference does).
        name_order: if given, only these names, in this order; else the dict's order.
        align_bytes: alignment of each tensor within its block.
        silent: unused, kept for compatibility.
        num_workers: writer threads, 0 for the default.

    Raises:
        ValueError: nothing to pack, or a tensor that cannot be stored.
    """
    if isinstance(state_dict_or_model, torch.nn.Module):
        state_dict = state_dict_or_model.state_dict()
    else:
        state_dict = state_dict_or_model
    if name_order is not None:
        state_dict = {name: state_dict[name] for name in name_order if name in state_dict}
    if not state_dict:
        raise ValueError("No tensors to pack.")
    save_file(state_dict, destination_path, target_dtype=target_dtype, align_bytes=align_bytes,
              num_threads=num_workers)


def get_flashpack_file_metadata(path: PathLike) -> Dict[str, Any]:
    """The footer of a flashpack file (format, blocks, index), validated.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: it is not a valid flashpack file.
    """
    return read_metadata(path)


def is_flashpack_file(path: PathLike) -> bool:
    """Whether ``path`` is a readable, valid flashpack file."""
    try:
        read_metadata(path)
        return True
    except (OSError, ValueError, RuntimeError):
        return False


def revert_from_file(path: PathLike, silent: bool = True) -> Dict[str, torch.Tensor]:
    """Read a flashpack file into ordinary CPU tensors (not backed by the file)."""
    return load_file(path, "cpu", copy=True)


def _default_device(model: torch.nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def assign_from_file(
    model: torch.nn.Module,
    path: PathLike,
    device: Optional[DeviceLike] = None,
    strict: Optional[bool] = None,
    strict_params: bool = True,
    strict_buffers: bool = False,
    keep_flash_ref_on_model: bool = False,
    silent: bool = True,
    num_streams: int = 0,
    chunk_bytes: int = 0,
    ignore_names: Optional[List[str]] = None,
    ignore_prefixes: Optional[List[str]] = None,
    ignore_suffixes: Optional[List[str]] = None,
    use_distributed_loading: bool = False,
    distributed_sharded: bool = False,
    distributed_shard_strategy: Optional[str] = None,
    rank: Optional[int] = None,
    local_rank: Optional[int] = None,
    world_size: Optional[int] = None,
    coerce_dtype: bool = False,
) -> None:
    """Load a flashpack file into ``model``'s parameters and buffers, without copies.

    Each parameter becomes an ``nn.Parameter`` viewing the loaded block (keeping its
    ``requires_grad``); each buffer becomes the loaded view. Works on models built on the
    meta device.

    Args:
        model: the module to fill.
        path: the flashpack file.
        device: where to load; defaults to the model's device (cpu for a meta model).
        strict: if set, overrides both strict_params and strict_buffers.
        strict_params: raise if a parameter of the model is not in the file.
        strict_buffers: raise if a buffer of the model is not in the file.
        ignore_names, ignore_prefixes, ignore_suffixes: file entries to skip.
        coerce_dtype: convert a buffer to the model's dtype when the file's differs.

    Raises:
        ValueError: strict and names are missing or unexpected (listing them), or a
            shape does not match.
    """
    if use_distributed_loading:
        raise NotImplementedError("flashpack_ops.assign_from_file: distributed loading is not available yet")
    if device is None:
        device = _default_device(model)
        if device.type == "meta":
            device = torch.device("cpu")
    tensors = load_file(path, device)
    if keep_flash_ref_on_model:
        model._flash_shared_storage = tensors

    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    assigned_params, assigned_buffers, unexpected = set(), set(), []
    for name, view in tensors.items():
        if _is_ignored(name, ignore_names, ignore_prefixes, ignore_suffixes):
            continue
        module_path, _, attr = name.rpartition(".")
        if name in params:
            module = model.get_submodule(module_path)
            old = params[name]
            if old.shape != view.shape:
                raise ValueError(f"{path}: '{name}' has shape {tuple(view.shape)} in the file but "
                                 f"{tuple(old.shape)} in {type(model).__name__}")
            setattr(module, attr, torch.nn.Parameter(view, requires_grad=old.requires_grad))
            assigned_params.add(name)
        elif name in buffers:
            module = model.get_submodule(module_path)
            old = buffers[name]
            if old is not None and old.dtype != view.dtype:
                if not coerce_dtype:
                    raise TypeError(f"{path}: dtype mismatch for buffer '{name}': model={old.dtype} vs file={view.dtype}")
                view = view.to(old.dtype)
            module._buffers[attr] = view
            assigned_buffers.add(name)
        else:
            unexpected.append(name)

    is_strict_params = strict_params if strict is None else strict
    is_strict_buffers = strict_buffers if strict is None else strict
    missing_params = sorted(n for n in params if n not in assigned_params
                            and not _is_ignored(n, ignore_names, ignore_prefixes, ignore_suffixes))
    missing_buffers = sorted(n for n in buffers if n not in assigned_buffers
                             and not _is_ignored(n, ignore_names, ignore_prefixes, ignore_suffixes))
    problems = []
    if (strict or strict_params or strict_buffers) and unexpected and strict is not False:
        problems.append(f"{len(unexpected)} unexpected names in the file: {unexpected}")
    if is_strict_params and missing_params:
        problems.append(f"missing {len(missing_params)} parameters: {missing_params}")
    if is_strict_buffers and missing_buffers:
        problems.append(f"missing {len(missing_buffers)} buffers: {missing_buffers}")
    if problems:
        raise ValueError(f"Error while assigning {path} to {type(model).__name__}: " + "; ".join(problems))
