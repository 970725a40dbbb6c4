"""What the Hugging Face integrations share: finding a model directory, the file in it, dtypes."""

from __future__ import annotations

import os
import re
from typing import Any, Optional, Tuple, Union

import torch

from ..api import filter_state_dict, pack_to_file
from ..ops import read_metadata

FLASHPACK_FILE = "model.flashpack"

# Arguments of from_pretrained (and of the reference's loaders) that choose among weight files or
# tune their loading: a flashpack directory has one file, so from_pretrained_flashpack accepts
# and drops them rather than pass them on to the model's constructor.
IGNORED_LOAD_KWARGS = ("proxies", "local_dir_use_symlinks", "low_cpu_mem_usage", "use_safetensors", "variant",
                       "num_streams", "chunk_bytes", "use_distributed_loading", "distributed_sharded",
                       "distributed_shard_strategy", "rank", "local_rank", "world_size")

_REPO_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


class HubUnavailableError(OSError):
    """A repo id was given but the Hugging Face Hub cannot be reached and nothing is cached."""


def looks_like_repo_id(name: str) -> bool:
    return bool(_REPO_ID.match(name)) and not name.startswith((".", "-")) and ".." not in name


def resolve_directory(
    name_or_path: Union[str, "os.PathLike[str]"],
    *,
    revision: Optional[str] = None,
    cache_dir: Optional[str] = None,
    local_dir: Optional[str] = None,
    token: Optional[Union[str, bool]] = None,
    local_files_only: bool = False,
    force_download: bool = False,
    allow_patterns: Optional[list] = None,
) -> str:
    """A local model directory as is, or a Hub repo id downloaded (or found in the cache).

    Raises:
        NotADirectoryError: a path that exists but is a file.
        FileNotFoundError: neither a directory nor something that can be a repo id.
        HubUnavailableError: a repo id while offline, with no cached copy.
    """
    name = os.fspath(name_or_path)
    if os.path.isdir(name):
        return name
    if os.path.exists(name):
        raise NotADirectoryError(f"{name} is a file; expected a model directory or a Hugging Face Hub repo id")
    if not looks_like_repo_id(name):
        raise FileNotFoundError(f"{name}: no such directory, and not a Hugging Face Hub repo id")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        raise ImportError(f"{name} is not a local directory; downloading it from the Hugging Face Hub needs "
                          "huggingface_hub (pip install huggingface_hub)") from None
    try:
        return snapshot_download(name, revision=revision, cache_dir=cache_dir, local_dir=local_dir, token=token,
                                 local_files_only=local_files_only, force_download=force_download,
                                 allow_patterns=allow_patterns)
    except LocalEntryNotFoundError:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        reason = ("HF_HUB_OFFLINE is set" if offline else
                  "only the local cache was searched" if local_files_only else "no network connection")
        raise HubUnavailableError(f"cannot download '{name}' from the Hugging Face Hub ({reason}) and it is not in "
                                  "the local cache; pass a local directory or connect to the network") from None


def flashpack_file_in(directory: str, subfolder: Optional[str] = None) -> str:
    """``directory[/subfolder]/model.flashpack``, or a FileNotFoundError that says how to make one."""
    model_dir = os.path.join(directory, subfolder) if subfolder else directory
    path = os.path.join(model_dir, FLASHPACK_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found; write it with save_pretrained_flashpack() or "
                                f"`flashpack convert {model_dir}`")
    return path


def locate_flashpack(name_or_path: Union[str, "os.PathLike[str]"], subfolder: Optional[str] = None,
                     **hub: Any) -> str:
    """The ``model.flashpack`` of a local model directory or a Hub repo id (``hub``: resolve_directory's options)."""
    patterns = [f"{subfolder}/*"] if subfolder else None
    return flashpack_file_in(resolve_directory(name_or_path, allow_patterns=patterns, **hub), subfolder)


def checked_save_directory(save_directory: Union[str, "os.PathLike[str]"]) -> str:
    """``save_directory`` as a str, refusing an existing file."""
    save_directory = os.fspath(save_directory)
    if os.path.isfile(save_directory):
        raise NotADirectoryError(f"{save_directory} is a file; save_pretrained_flashpack needs a directory")
    return save_directory


def write_weights(model: torch.nn.Module, save_directory: str, *, target_dtype: Optional[torch.dtype],
                  align_bytes: int, num_workers: int, ignore_names: Any, ignore_prefixes: Any,
                  ignore_suffixes: Any) -> None:
    """The model's state dict, less the ignored names, as ``save_directory/model.flashpack``."""
    state_dict = filter_state_dict(model.state_dict(), ignore_names, ignore_prefixes, ignore_suffixes)
    pack_to_file(state_dict, os.path.join(save_directory, FLASHPACK_FILE), target_dtype=target_dtype,
                 align_bytes=align_bytes, num_workers=num_workers)


def parse_dtype(dtype: Any) -> Optional[torch.dtype]:
    """``torch.bfloat16``, ``"bfloat16"``, ``"torch.bfloat16"`` or ``"bf16"`` to a dtype; None and "auto" to None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if not isinstance(dtype, str):
        raise TypeError(f"dtype must be a torch.dtype or a string, got {type(dtype).__name__}")
    name = dtype.removeprefix("torch.")
    if name == "auto":
        return None
    name = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32",
            "fp64": "float64", "double": "float64"}.get(name, name)
    result = getattr(torch, name, None)
    if not isinstance(result, torch.dtype):
        raise ValueError(f"unknown dtype '{dtype}'")
    return result


def file_floating_dtype(path: str) -> Optional[torch.dtype]:
    """The floating-point dtype holding most of the file's bytes (what ``dtype="auto"`` loads as)."""
    meta = read_metadata(path)
    if "macroblocks" in meta:
        blocks = [(b["length_bytes"], b["dtype"]) for b in meta["macroblocks"]]
    else:
        blocks = [(0, meta.get("target_dtype", ""))]
    for _, name in sorted(blocks, reverse=True):
        dtype = getattr(torch, name, None)
        if isinstance(dtype, torch.dtype) and dtype.is_floating_point and dtype.itemsize >= 2:
            return dtype
    return None


def build_and_load_dtypes(path: str, dtype: Any, torch_dtype: Any) -> Tuple[Optional[torch.dtype], Optional[torch.dtype]]:
    """(dtype to build the model under, dtype to convert the file's floats to, None for none)."""
    requested = parse_dtype(dtype if dtype is not None else torch_dtype)
    return (requested or file_floating_dtype(path)), requested


def upload_directory(save_directory: str, repo_id: Optional[str], private: Optional[bool], token: Optional[str],
                     commit_message: Optional[str], create_pr: bool) -> None:
    """Create the Hub repo if needed (named after the directory by default) and upload the directory."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id or os.path.basename(os.path.abspath(save_directory)), exist_ok=True,
                              private=private).repo_id
    api.upload_folder(folder_path=save_directory, repo_id=repo_id, commit_message=commit_message or "Upload flashpack",
                      create_pr=create_pr)
