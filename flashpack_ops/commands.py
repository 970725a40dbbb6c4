"""Conversions behind the ``flashpack`` command: checkpoints in, flashpack files out, and back."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Sequence, Union

import torch

from .api import filter_state_dict
from .integrations._hub import FLASHPACK_FILE, looks_like_repo_id, parse_dtype, resolve_directory
from .ops import load_file, save_file

TORCH_EXTENSIONS = (".bin", ".pt", ".pth", ".ckpt")
WEIGHT_EXTENSIONS = (".safetensors",) + TORCH_EXTENSIONS

# Files a conversion never reads: other frameworks' weights.
_HUB_IGNORE = ["*.h5", "*.msgpack", "*.onnx", "*.onnx_data", "*.tflite", "*.ot", "*.gguf", "*.mlmodel"]


def _progress(iterable: Any, desc: str, total: Optional[int] = None, quiet: bool = False) -> Any:
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, disable=quiet, leave=False)


def _torch_state_dict(path: str) -> Dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):  # only the legacy (pre-zip) format cannot be mapped
            raise
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model", "module"):  # Lightning and training checkpoints
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    others = [name for name, value in obj.items() if not isinstance(value, torch.Tensor)]
    if others:
        raise ValueError(f"{path} holds entries that are not tensors: {others[:10]}"
                         + (f" and {len(others) - 10} more" if len(others) > 10 else ""))
    return obj


def read_state_dict_file(path: str) -> Dict[str, torch.Tensor]:
    """The tensors of a .safetensors, .bin, .pt, .pth or .ckpt file (torch files load with weights_only)."""
    if path.endswith(".flashpack"):
        raise ValueError(f"{path} is already a flashpack file")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file as load_safetensors

        return load_safetensors(path)
    if path.endswith(TORCH_EXTENSIONS):
        return _torch_state_dict(path)
    raise ValueError(f"{path}: unknown checkpoint type; expected one of {', '.join(WEIGHT_EXTENSIONS)}, "
                     "a sharded checkpoint's .index.json, or a model directory")


def read_sharded(index_path: str, quiet: bool = False) -> Dict[str, torch.Tensor]:
    """Every shard a Hugging Face ``*.index.json`` lists, merged into one state dict."""
    with open(index_path, encoding="utf-8") as f:
        weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index_path} has no weight_map")
    directory = os.path.dirname(index_path)
    shards = list(dict.fromkeys(weight_map.values()))
    missing = [s for s in shards if not os.path.isfile(os.path.join(directory, s))]
    if missing:
        raise FileNotFoundError(f"{index_path} lists shards that are not in {directory}: {missing}")
    state_dict: Dict[str, torch.Tensor] = {}
    for shard in _progress(shards, "reading shards", quiet=quiet):
        state_dict.update(read_state_dict_file(os.path.join(directory, shard)))
    absent = [name for name in weight_map if name not in state_dict]
    if absent:
        raise ValueError(f"{index_path} maps names that no shard holds: {absent[:10]}")
    return state_dict


def _weights_in_directory(directory: str, variant: Optional[str]) -> str:
    """The one checkpoint (an index.json, or a single weights file) a directory holds."""
    def matches(name: str) -> bool:
        return (f".{variant}." in name) if variant else not _has_variant(name)

    names = sorted(os.listdir(directory))
    for kind in (".safetensors", TORCH_EXTENSIONS):
        indexes = [n for n in names if n.endswith(".index.json") and matches(n)
                   and n[: -len(".index.json")].endswith(kind)]
        if len(indexes) == 1:
            return os.path.join(directory, indexes[0])
        files = [n for n in names if n.endswith(kind) and matches(n)]
        if len(files) == 1:
            return os.path.join(directory, files[0])
        if len(indexes) + len(files) > 1:
            raise ValueError(f"{directory} holds several checkpoints ({', '.join(indexes + files)}); "
                             "convert one file, or its .index.json")
    what = f" for variant '{variant}'" if variant else ""
    raise FileNotFoundError(f"{directory} holds no checkpoint{what} (.safetensors, .bin, .pt, .ckpt or .index.json)")


def _has_variant(name: str) -> bool:
    # model.fp16.safetensors, diffusion_pytorch_model.fp16-00001-of-00002.safetensors
    stem = name.split(".index.json")[0]
    return stem.count(".") >= 2


def _destination_file(destination: Optional[str], default: str) -> str:
    if destination is None:
        return default
    if os.path.isdir(destination) or destination.endswith(os.sep):
        return os.path.join(destination, FLASHPACK_FILE)
    return destination


def _read_config(directory: str, name: str) -> Optional[Dict[str, Any]]:
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _library_model_class(config: Dict[str, Any], directory: str, use_transformers: bool,
                         use_diffusers: bool) -> Optional[type]:
    """The transformers or diffusers class a config.json describes, or None for neither."""
    is_diffusers = use_diffusers or ("_class_name" in config and not use_transformers)
    is_transformers = use_transformers or (not is_diffusers and
                                           ("architectures" in config or "transformers_version" in config))
    if is_diffusers:
        import diffusers

        name = str(config.get("_class_name", ""))
        cls = getattr(diffusers, name.removeprefix("FlashPack"), None)
        if cls is None:
            raise ValueError(f"{directory}/config.json names the model class '{name}', which diffusers "
                             f"{diffusers.__version__} does not have")
        return cls
    if is_transformers:
        import transformers

        architectures = config.get("architectures") or []
        cls = getattr(transformers, architectures[0], None) if architectures else transformers.AutoModel
        if cls is None:
            raise ValueError(f"{directory}/config.json names the architecture '{architectures[0]}', which "
                             f"transformers {transformers.__version__} does not have")
        return cls
    return None


_SAFETENSORS_FLOATS = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


def _stored_float_dtype(directory: str, variant: Optional[str]) -> Optional[torch.dtype]:
    """The floating dtype holding most bytes of a directory's safetensors weights (None if unknown).

    diffusers loads weights in float32 unless told otherwise; a float16 checkpoint should
    stay float16 when converted.
    """
    try:
        weights = _weights_in_directory(directory, variant)
    except (FileNotFoundError, ValueError):
        return None
    if weights.endswith(".index.json"):
        with open(weights, encoding="utf-8") as f:
            shards = sorted(set(json.load(f).get("weight_map", {}).values()))
        weights = os.path.join(directory, shards[0]) if shards else ""
    if not weights.endswith(".safetensors") or not os.path.isfile(weights):
        return None
    with open(weights, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    sizes: Dict[torch.dtype, int] = {}
    for name, entry in header.items():
        if name != "__metadata__" and entry.get("dtype") in _SAFETENSORS_FLOATS:
            dtype = _SAFETENSORS_FLOATS[entry["dtype"]]
            sizes[dtype] = sizes.get(dtype, 0) + entry["data_offsets"][1] - entry["data_offsets"][0]
    return max(sizes, key=sizes.get) if sizes else None


def _quiet_libraries() -> None:
    """Silence the progress bars transformers and diffusers draw while loading."""
    for library in ("transformers", "diffusers"):
        try:
            __import__(f"{library}.utils.logging", fromlist=["disable_progress_bar"]).disable_progress_bar()
        except (ImportError, AttributeError):
            pass


def _convert_model_directory(model_class: type, directory: str, destination: str, dtype: Optional[torch.dtype],
                             variant: Optional[str], ignore: Dict[str, Any]) -> str:
    is_transformers = model_class.__module__.startswith("transformers")
    if is_transformers:
        from .integrations.transformers import save_pretrained_flashpack

        model = model_class.from_pretrained(directory, dtype="auto", variant=variant)
    else:
        from .integrations.diffusers import save_pretrained_flashpack
        from .integrations.diffusers.model import dtype_argument

        stored = dtype or _stored_float_dtype(directory, variant)
        model = model_class.from_pretrained(directory, variant=variant, **{dtype_argument(): stored})
    save_pretrained_flashpack(model, destination, target_dtype=dtype, **ignore)
    return os.path.join(destination, FLASHPACK_FILE)


def _convert_pipeline_directory(directory: str, destination: str, dtype: Optional[torch.dtype],
                                variant: Optional[str]) -> str:
    from diffusers import DiffusionPipeline

    from .integrations.diffusers import save_pipeline_flashpack

    config = _read_config(directory, "model_index.json") or {}
    stored = {name: _stored_float_dtype(os.path.join(directory, name), variant) for name in config
              if not name.startswith("_") and os.path.isdir(os.path.join(directory, name))}
    dtypes = {name: dtype or value for name, value in stored.items() if dtype or value}
    from .integrations.diffusers.model import dtype_argument

    pipeline = DiffusionPipeline.from_pretrained(
        directory, variant=variant, **{dtype_argument(): dict(dtypes, default=dtype or torch.float32)})
    save_pipeline_flashpack(pipeline, destination, target_dtype=dtype)
    return destination


def convert_to_flashpack(
    model_or_state_dict_or_path_or_repo_id: Union[str, "os.PathLike[str]", torch.nn.Module, Dict[str, torch.Tensor]],
    destination_path: Optional[str] = None,
    dtype: Optional[Union[torch.dtype, str]] = None,
    ignore_names: Optional[Sequence[str]] = None,
    ignore_prefixes: Optional[Sequence[str]] = None,
    ignore_suffixes: Optional[Sequence[str]] = None,
    use_transformers: bool = False,
    use_diffusers: bool = False,
    silent: bool = True,
    *,
    subfolder: Optional[str] = None,
    variant: Optional[str] = None,
    revision: Optional[str] = None,
    **kwargs: Any,
) -> str:
    """Convert a checkpoint to flashpack and return what was written.

    Sources:
        - a state dict or an ``nn.Module`` (``destination_path`` required);
        - a ``.safetensors``, ``.bin``, ``.pt``, ``.pth`` or ``.ckpt`` file, or a sharded
          checkpoint's ``*.index.json``: one ``.flashpack`` file (beside it by default);
        - a transformers or diffusers model directory (a ``config.json``): the model is
          loaded with its library and written as ``config.json`` + ``model.flashpack``
          (into the same directory by default), ready for ``from_pretrained_flashpack``;
        - a diffusers pipeline directory (a ``model_index.json``): every component;
        - a directory with only weights (and perhaps an index): one ``.flashpack`` file;
        - a Hugging Face Hub repo id, downloaded with huggingface_hub (``destination_path``
          required), then as the directory.

    Args:
        dtype: convert every tensor to this dtype (``torch.bfloat16`` or ``"bf16"``).
        ignore_names, ignore_prefixes, ignore_suffixes: tensors to leave out.
        use_transformers, use_diffusers: force the library for a model directory.
        silent: no progress bars.
        subfolder: the model lies in this subfolder of the directory or repo.
        variant: read ``*.{variant}.safetensors`` weights (``"fp16"``).
        revision: the Hub revision.

    Raises:
        FileNotFoundError, ValueError: the source cannot be read, with the reason.
        HubUnavailableError: a repo id while offline, with no cached copy.
    """
    target_dtype = parse_dtype(dtype)
    ignore = dict(ignore_names=list(ignore_names or []), ignore_prefixes=list(ignore_prefixes or []),
                  ignore_suffixes=list(ignore_suffixes or []))
    source = model_or_state_dict_or_path_or_repo_id
    if isinstance(source, (torch.nn.Module, dict)):
        if destination_path is None:
            raise ValueError("convert_to_flashpack: a model or state dict needs a destination_path")
        state_dict = source.state_dict() if isinstance(source, torch.nn.Module) else source
        save_file(filter_state_dict(state_dict, **ignore), destination_path, target_dtype=target_dtype)
        return destination_path

    source = os.fspath(source)
    if os.path.isfile(source):
        if source.endswith(".index.json"):
            state_dict = read_sharded(source, quiet=silent)
            default = os.path.join(os.path.dirname(source), FLASHPACK_FILE)
        else:
            state_dict = read_state_dict_file(source)
            default = os.path.splitext(source)[0] + ".flashpack"
        destination = _destination_file(destination_path, default)
        save_file(filter_state_dict(state_dict, **ignore), destination, target_dtype=target_dtype)
        return destination

    if not os.path.isdir(source):
        if not looks_like_repo_id(source):
            raise FileNotFoundError(f"{source}: no such file or directory, and not a Hugging Face Hub repo id")
        if destination_path is None:
            raise ValueError(f"converting the Hub repo '{source}' needs a destination directory")
        patterns = [f"{subfolder}/*", "*.json"] if subfolder else None
        directory = resolve_directory(source, revision=revision, allow_patterns=patterns)
    else:
        directory = source
    model_dir = os.path.join(directory, subfolder) if subfolder else directory
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"{model_dir}: no such directory")
    # A local directory is converted in place by default: from_pretrained_flashpack reads it as is.
    destination = destination_path if destination_path is not None else model_dir

    if not any(n.endswith(WEIGHT_EXTENSIONS + (".index.json",)) for n in os.listdir(model_dir)) and \
            _read_config(model_dir, "model_index.json") is None:
        raise FileNotFoundError(f"{model_dir} holds no checkpoint to convert (.safetensors, .bin, .pt, .ckpt or "
                                ".index.json)")
    if silent:
        _quiet_libraries()
    if _read_config(model_dir, "model_index.json") is not None:
        return _convert_pipeline_directory(model_dir, destination, target_dtype, variant)
    config = _read_config(model_dir, "config.json")
    model_class = _library_model_class(config, model_dir, use_transformers, use_diffusers) if config else None
    if model_class is not None:
        return _convert_model_directory(model_class, model_dir, destination, target_dtype, variant, ignore)
    weights = _weights_in_directory(model_dir, variant)
    state_dict = read_sharded(weights, quiet=silent) if weights.endswith(".index.json") else read_state_dict_file(weights)
    output = _destination_file(destination, os.path.join(model_dir, FLASHPACK_FILE))
    save_file(filter_state_dict(state_dict, **ignore), output, target_dtype=target_dtype)
    return output


def revert_from_flashpack(path: Union[str, "os.PathLike[str]"], destination_path: Optional[str] = None,
                          silent: bool = True) -> str:
    """Write a flashpack file back as ``.safetensors`` (the default) or a torch file (.pt, .bin...).

    Tied tensors stay shared in a torch file; safetensors stores each name on its own.

    Raises:
        ValueError: an unknown destination extension, or a dtype safetensors cannot store.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, FLASHPACK_FILE)
    destination = destination_path or (os.path.splitext(path)[0] + ".safetensors")
    if not destination.endswith(WEIGHT_EXTENSIONS):
        raise ValueError(f"{destination}: unknown extension; use .safetensors or one of {', '.join(TORCH_EXTENSIONS)}")
    # NOTE: the loaded tensors view a private map of the file; both writers stream from it
    # page by page, so reverting a large file needs no second copy in memory.
    tensors = load_file(path, "cpu")
    if destination.endswith(".safetensors"):
        from safetensors.torch import save_file as save_safetensors

        seen, unique = set(), {}
        for name, tensor in _progress(tensors.items(), "reverting", total=len(tensors), quiet=silent):
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
            unique[name] = tensor.clone() if key in seen and tensor.numel() else tensor
            seen.add(key)
        try:
            save_safetensors(unique, destination)
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"safetensors cannot store {path}: {e}; write a .pt file instead") from None
    else:
        torch.save(tensors, destination)
    return destination


def summarize(path: str) -> Dict[str, Any]:
    """A flashpack file's footer plus what a person wants first: sizes, counts, dtypes."""
    from .ops import read_metadata

    meta = read_metadata(path)
    index = meta.get("index", [])
    if "macroblocks" in meta:
        blocks = meta["macroblocks"]
    else:
        itemsize = torch.empty(0, dtype=getattr(torch, meta["target_dtype"])).element_size()
        blocks = [{"dtype": meta["target_dtype"], "offset_bytes": 0,
                   "length_bytes": int(meta["total_elems"]) * itemsize, "length_elems": int(meta["total_elems"])}]
    elements = sum(int(r["length"]) for r in index)
    return {"path": path, "file_bytes": os.path.getsize(path), "format": meta["format"],
            "align_bytes": meta.get("align_bytes"), "tensors": len(index), "elements": elements,
            "blocks": blocks, "index": index}
