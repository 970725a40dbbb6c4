"""Conversions behind the ``flashpack`` command: checkpoints in, flashpack files out, and back."""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import glob
import importlib
import json
import math
import os
import pickle
import re
import secrets
import shutil
import stat
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ._warnings import warn
from .api import filter_state_dict
from .integrations._hub import (FLASHPACK_FILE, OTHER_FRAMEWORKS, TORCH_WEIGHTS, check_regular_file, has_variant,
                                looks_like_repo_id, parse_dtype, repo_files, resolve_directory,
                                resolve_pipeline_directory, safetensors_entries, unread_weights)
from .ops import _identity, _path, load_file, read_metadata, save_file

TORCH_EXTENSIONS = TORCH_WEIGHTS
# A sharded checkpoint's index: model.safetensors.index.json, or a variant's,
# model.safetensors.index.fp16.json (transformers' and diffusers' name for it).
_INDEX = re.compile(r"\.index(\.[^./]+)?\.json$")
WEIGHT_EXTENSIONS = (".safetensors",) + TORCH_EXTENSIONS
# Names a flashpack file must not take: other readers would take it for their format, and it
# could be the very checkpoint being converted.
_OTHER_FORMATS = WEIGHT_EXTENSIONS + (".json",)


def _progress(iterable: Any, desc: str, total: Optional[int] = None, quiet: bool = False) -> Any:
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, disable=quiet, leave=False)


def _torch_load(path: str, mmap: bool) -> Any:
    """torch.load with weights_only; its errors, which do not name the file (and, for a file
    that is no checkpoint, suggest weights_only=False), name it and keep only the reason."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        text = str(e)
        reason = text.split("WeightsUnpickler error: ", 1)[-1].split("Check the documentation", 1)[0].strip()
        raise ValueError(f"{path}: torch.load(weights_only=True) cannot read it: {reason}") from None
    except RuntimeError as e:
        if mmap and "mmap" in str(e):  # only the legacy (pre-zip) format cannot be mapped
            raise
        raise ValueError(f"{path} is not a readable torch checkpoint: {str(e).splitlines()[0]}") from None
    except (EOFError, LookupError, ValueError, TypeError, AttributeError) as e:
        # The unpickler's own failures on a file that is not a pickle (empty, truncated, other
        # bytes): "Ran out of input", or a bare KeyError of a memo number, naming no file.
        reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        raise ValueError(f"{path} is not a readable torch checkpoint (empty, truncated or not a torch file): "
                         f"{reason}") from None


def _torch_state_dict(path: str) -> Dict[str, torch.Tensor]:
    try:
        obj = _torch_load(path, mmap=True)
    except RuntimeError:  # the legacy (pre-zip) format, which cannot be mapped
        obj = _torch_load(path, mmap=False)
    obj = _model_part(obj)
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    others = [name for name, value in obj.items() if not isinstance(value, torch.Tensor)]
    if others:
        raise _non_tensors(path, others)
    return obj


_MODEL_KEYS = ("state_dict", "model_state_dict", "model", "module")


def _model_part(obj: Any) -> Any:
    """The model's state dict in a training checkpoint: Lightning's and PyTorch's own ("Saving
    and Loading a General Checkpoint") hold it under one of these keys, beside the optimizer's."""
    if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in _MODEL_KEYS:
            if isinstance(obj.get(key), dict):
                return obj[key]
    return obj


def _non_tensors(path: str, names: List[str]) -> ValueError:
    return ValueError(f"{path} holds entries that are not tensors: {names[:10]}"
                      + (f" and {len(names) - 10} more" if len(names) > 10 else ""))


def is_distributed_checkpoint(directory: str) -> bool:
    """Whether ``directory`` is a torch.distributed.checkpoint (DCP) checkpoint: a ``.metadata``
    file beside ``.distcp`` files, as ``dcp.save`` writes them (FSDP2 and tensor-parallel training)."""
    return os.path.isfile(os.path.join(directory, ".metadata")) and \
        any(name.endswith(".distcp") for name in os.listdir(directory))


class _MetadataUnpickler(pickle.Unpickler):
    """Reads a DCP ``.metadata`` file (a pickle) building only what such a file holds: its
    dataclasses, dtypes, sizes and paths. ``pickle.load``, as torch reads it, would run whatever
    code a checkpoint from elsewhere carried."""

    _OTHERS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
               ("torch.distributed.checkpoint.filesystem", "_StorageInfo")}
    _PATHS = ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath")

    def __init__(self, file: Any, path: str):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch.distributed.checkpoint.metadata":
            found = getattr(importlib.import_module(module), name, None)
            if isinstance(found, type):
                return found
        elif module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        elif (module, name) in self._OTHERS or (module.split(".")[0] == "pathlib" and name in self._PATHS):
            return getattr(importlib.import_module(module), name)
        raise ValueError(f"{self.path} is not a torch.distributed.checkpoint metadata file: it would build "
                         f"{module}.{name}, which such a file does not hold (refused: unpickling it could run code)")


def read_distributed_checkpoint(directory: str) -> Dict[str, torch.Tensor]:
    """The model's tensors in a torch.distributed.checkpoint (DCP) directory, whole (each
    tensor put together from the ranks' shards), read in this one process: the state dict
    ``dcp.save`` was given, or its model part (under ``model``, ``state_dict``... at any depth,
    as ``{"app": {"model": ..., "optim": ...}}``). Only the model's tensors are read: not the
    optimizer's state, nor any pickled object.

    Raises:
        ValueError: the metadata is not a DCP one, the checkpoint holds no model part to pick,
            or the model part holds entries other than tensors.
    """
    # As torch's own dcp_to_torch_save reads a checkpoint into a dict built from its metadata
    # (dcp.load fills only the keys of the dict it is given).
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.metadata import StorageMeta, TensorStorageMetadata
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    class Reader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            path = os.path.join(directory, ".metadata")
            try:
                with open(path, "rb") as f:
                    metadata = _MetadataUnpickler(f, path).load()
            except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, IndexError) as e:
                raise ValueError(f"{path} is not a readable torch.distributed.checkpoint metadata file: "
                                 f"{type(e).__name__}: {e}") from None
            if type(metadata).__name__ != "Metadata" or not isinstance(getattr(metadata, "state_dict_metadata", None),
                                                                        dict):
                raise ValueError(f"{path} is not a torch.distributed.checkpoint metadata file")
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    reader = Reader(directory)
    metadata = reader.read_metadata()
    planner_data = metadata.planner_data or {}
    paths = {key: tuple(planner_data.get(key) or (key,)) for key in metadata.state_dict_metadata}
    # Down the nesting to the model's part: the level where every entry is a leaf.
    prefix: Tuple[Any, ...] = ()
    while True:
        below = [p[len(prefix):] for p in paths.values() if p[:len(prefix)] == prefix]
        if all(len(rest) == 1 for rest in below):
            break
        heads = list(dict.fromkeys(rest[0] for rest in below if len(rest) > 1))
        pick = next((key for key in _MODEL_KEYS if key in heads), heads[0] if len(heads) == 1 else None)
        if pick is None:
            where = f" under {'.'.join(map(str, prefix))}" if prefix else ""
            raise ValueError(f"{directory}: which part of this checkpoint is the model? It holds {heads}{where}, and "
                             f"none is named {', '.join(_MODEL_KEYS[:-1])} or {_MODEL_KEYS[-1]}")
        prefix += (pick,)
    chosen = {key: p for key, p in paths.items() if p[:len(prefix)] == prefix}
    others = [p[-1] for key, p in chosen.items() if not isinstance(metadata.state_dict_metadata[key],
                                                                    TensorStorageMetadata)]
    if others:
        raise _non_tensors(directory, others)
    if not chosen:
        raise ValueError(f"{directory}: the checkpoint holds no tensors")
    state: Dict[str, Any] = {}
    try:
        _load_state_dict(state, storage_reader=reader, planner=_EmptyStateDictLoadPlanner(keys=set(chosen)),
                         no_dist=True)
    except CheckpointException as error:  # a BaseException, holding each rank's own error
        causes = [f[0] if isinstance(f, tuple) else f for f in (getattr(error, "failures", None) or {}).values()]
        cause = causes[0] if causes and isinstance(causes[0], BaseException) else error
        reason = (str(cause).strip().splitlines() or [""])[0]
        # torch's reader fails as the damage leads it: RuntimeError, or EOFError with no words.
        said = f"{type(cause).__name__}: {reason}" if reason else type(cause).__name__
        raise ValueError(f"{directory}: torch.distributed.checkpoint cannot read its tensors (a .distcp file "
                         f"truncated or damaged?): {said}") from None
    for part in prefix:
        state = state[part]
    return {str(name): tensor for name, tensor in state.items()}


def _is_safetensors(path: str) -> bool:
    """Whether the file starts as safetensors files do: a little-endian u64 header length that
    fits the file, then the header's JSON object. torch files start with a zip or pickle
    signature instead."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:] == b"{" and int.from_bytes(head[:8], "little") <= os.path.getsize(path) - 8


def _is_index(name: str) -> bool:
    return _INDEX.search(name) is not None


def read_state_dict_file(path: str) -> Dict[str, torch.Tensor]:
    """The tensors of a .safetensors, .bin, .pt, .pth or .ckpt file (torch files load with weights_only)."""
    if path.endswith(".flashpack"):
        raise ValueError(f"{path} is already a flashpack file")
    check_regular_file(path)
    if path.endswith(".safetensors") or (path.endswith(TORCH_EXTENSIONS) and _is_safetensors(path)):
        # By content too: a safetensors file saved under a torch name (model.bin) is common.
        from safetensors import SafetensorError
        from safetensors.torch import load_file as load_safetensors

        try:
            return load_safetensors(path)
        except SafetensorError as e:  # its messages do not name the file
            raise ValueError(f"{path} is not a valid safetensors file: {e}") from None
        except FileNotFoundError:
            # What safetensors says of any file it cannot open: opened here, to give the reason
            # (permission denied).
            with open(path, "rb"):
                pass
            raise
    if path.endswith(TORCH_EXTENSIONS):
        return _torch_state_dict(path)
    raise ValueError(f"{path}: unknown checkpoint type; expected one of {', '.join(WEIGHT_EXTENSIONS)}, "
                     "a sharded checkpoint's .index.json, or a model directory")


def _weight_map(index_path: str) -> Dict[str, str]:
    """The ``weight_map`` of a sharded checkpoint's index (tensor name -> shard), each shard a
    file name beside the index or below it, as save_pretrained writes them.

    Raises:
        ValueError: the index is not JSON, has no weight_map, or names a shard that is not a
            string, or a path (absolute, or through ``..``) leading out of the index's folder.
    """
    check_regular_file(index_path)
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{index_path} is not a valid JSON file: {e}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index_path} has no weight_map")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or os.path.isabs(shard) or \
                os.path.normpath(shard).split(os.sep)[0] in (os.pardir, os.curdir):
            raise ValueError(f"{index_path} maps '{name}' to {shard!r}, which is not a shard file beside the index")
    return weight_map


def read_sharded(index_path: str, quiet: bool = False) -> Dict[str, torch.Tensor]:
    """Every shard a Hugging Face ``*.index.json`` lists, merged into one state dict."""
    weight_map = _weight_map(index_path)
    directory = os.path.dirname(index_path)
    shards = list(dict.fromkeys(weight_map.values()))
    missing = [s for s in shards if not os.path.exists(os.path.join(directory, s))]
    if missing:
        raise FileNotFoundError(f"{index_path} lists shards that are not in {directory}: {missing}")
    state_dict: Dict[str, torch.Tensor] = {}
    for shard in _progress(shards, "reading shards", quiet=quiet):
        state_dict.update(read_state_dict_file(os.path.join(directory, shard)))
    absent = [name for name in weight_map if name not in state_dict]
    if absent:
        raise ValueError(f"{index_path} maps names that no shard holds: {absent[:10]}")
    return state_dict


def checkpoint_metadata(path: str) -> Optional[Dict[str, str]]:
    """The metadata of a .safetensors checkpoint ({"format": "pt"}...), kept by convert: one
    file's, or what every shard of an index holds alike. None for torch files and for shards
    that disagree."""
    if _is_index(path):
        shards = sorted(set(_weight_map(path).values()))
        files = [os.path.join(os.path.dirname(path), shard) for shard in shards]
    else:
        files = [path]
    if not files or not all(f.endswith(".safetensors") or _is_safetensors(f) for f in files):
        return None
    # Imported only now: torch checkpoints convert without safetensors installed.
    from safetensors import safe_open as safetensors_open

    found = []
    for file in files:
        with safetensors_open(file, framework="pt") as f:
            found.append(f.metadata())
    if not found[0] or any(m != found[0] for m in found):
        return None
    return dict(sorted(found[0].items()))  # safetensors' order varies from run to run


def _weights_in_directory(directory: str, variant: Optional[str]) -> str:
    """The one checkpoint (an index.json, or a single weights file) a directory holds."""
    names = sorted(os.listdir(directory))
    if variant:
        found = _one_checkpoint(directory, names, lambda name: f".{variant}." in name)
    else:
        found = _one_checkpoint(directory, names, lambda name: not has_variant(name))
        if found is None:
            # A stem with dots (Meta's consolidated.00.pth, my.model.safetensors) looks like a
            # variant; when nothing else is there, such a file is the checkpoint.
            found = _one_checkpoint(directory, names, lambda name: True)
    if found is None:
        what = f" for variant '{variant}'" if variant else ""
        raise FileNotFoundError(f"{directory} holds no checkpoint{what} (.safetensors, .bin, .pt, .ckpt or "
                                ".index.json)")
    return found


def _one_checkpoint(directory: str, names: Sequence[str], matches: Callable[[str], bool]) -> Optional[str]:
    """The single index or weights file among ``names`` that ``matches``; None if there is none."""
    for kind in (".safetensors", TORCH_EXTENSIONS):
        indexes = [n for n in names if _is_index(n) and matches(n) and n[:_INDEX.search(n).start()].endswith(kind)]
        if len(indexes) == 1:
            return os.path.join(directory, indexes[0])
        files = [n for n in names if n.endswith(kind) and matches(n)]
        if len(files) == 1:
            return os.path.join(directory, files[0])
        if len(indexes) + len(files) > 1:
            raise ValueError(f"{directory} holds several checkpoints ({', '.join(indexes + files)}); "
                             "convert one file, or its .index.json")
    return None


def _destination_file(destination: Optional[str], default: str) -> str:
    if destination is None:
        return default
    if os.path.isdir(destination) or destination.endswith(os.sep):
        return os.path.join(destination, FLASHPACK_FILE)
    return destination


def _save(state_dict: Dict[str, torch.Tensor], destination: str, ignore: Dict[str, Any], **kwargs: Any) -> None:
    """Writes the converted tensors, floating-point ones in the target dtype, creating the
    destination's directory as save_pretrained does (and removing what it created when the
    save fails: a tensor the format cannot store, a full disk)."""
    directory = os.path.dirname(os.path.abspath(destination))
    created = []
    parent = directory
    while not os.path.exists(parent):
        created.append(parent)
        parent = os.path.dirname(parent)
    os.makedirs(directory, exist_ok=True)
    try:
        save_file(filter_state_dict(state_dict, **ignore), destination, floating_only=True, **kwargs)
    except BaseException:
        for folder in created:  # innermost first; rmdir leaves a folder something else wrote to
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        raise


def _checkpoint_files(path: str) -> List[str]:
    """``path``, and the shards it lists when it is an ``.index.json``."""
    if not _is_index(path):
        return [path]
    shards = dict.fromkeys(_weight_map(path).values())
    return [path] + [os.path.join(os.path.dirname(path), shard) for shard in shards]


def _check_destination(destination: str, sources: Sequence[str] = ()) -> None:
    """Refuse to write a flashpack file under another format's name, or over a source checkpoint."""
    if destination.lower().endswith(_OTHER_FORMATS):
        raise ValueError(f"{destination}: a flashpack file must not take the extension "
                         f"{os.path.splitext(destination)[1]} of another format; name it .flashpack")
    if os.path.exists(destination):
        for source in sources:
            if os.path.exists(source) and os.path.samefile(destination, source):
                raise ValueError(f"{destination} is the checkpoint being converted ({source}); writing over it "
                                 "would destroy it: give another destination")


def _read_config(directory: str, name: str) -> Optional[Dict[str, Any]]:
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a valid JSON file: {e}") from None
    if not isinstance(config, dict):
        # Else taken for no config (a directory of weights only), or failing on a name the error omits.
        text = json.dumps(config)
        raise ValueError(f"{path} holds {text if len(text) <= 40 else text[:40] + '...'}, not a JSON object")
    return config


def _is_diffusers_config(config: Optional[Dict[str, Any]]) -> bool:
    return config is not None and "_class_name" in config and "architectures" not in config


def flashpack_in(path: str) -> str:
    """The flashpack file a command is given: ``path``, or the ``model.flashpack`` of a model
    directory. A pipeline directory holds one per component: the error names them."""
    if not os.path.isdir(path):
        return path
    if not os.path.isfile(os.path.join(path, FLASHPACK_FILE)) and os.path.isfile(os.path.join(path, "model_index.json")):
        components = sorted(name for name in os.listdir(path) if os.path.isfile(os.path.join(path, name, FLASHPACK_FILE)))
        raise ValueError(f"{path} is a pipeline directory: it holds a {FLASHPACK_FILE} per model component "
                         f"({', '.join(components) or 'none here'}); give one of those folders")
    return os.path.join(path, FLASHPACK_FILE)


def _library_model_class(config: Dict[str, Any], directory: str, use_transformers: bool,
                         use_diffusers: bool, variant: Optional[str] = None) -> Optional[type]:
    """The transformers or diffusers class a config.json describes, or None for neither."""
    is_diffusers = use_diffusers or ("_class_name" in config and not use_transformers)
    is_transformers = use_transformers or (not is_diffusers and
                                           ("architectures" in config or "transformers_version" in config))
    if is_diffusers:
        import diffusers

        name = str(config.get("_class_name", ""))
        cls = getattr(diffusers, name.removeprefix("FlashPack"), None)
        if not isinstance(cls, type):
            raise ValueError(f"{directory}/config.json names the model class '{name}', which diffusers "
                             f"{diffusers.__version__} does not have")
        return cls
    if is_transformers:
        import transformers

        architectures = config.get("architectures") or []
        if not isinstance(architectures, list) or not all(isinstance(name, str) for name in architectures):
            raise ValueError(f"{directory}/config.json: \"architectures\" is {architectures!r}, not a list of class "
                             "names (such as [\"LlamaForCausalLM\"])")
        cls = getattr(transformers, architectures[0], None) if architectures else transformers.AutoModel
        if cls is None and config.get("auto_map"):
            raise ValueError(f"{directory}/config.json names the architecture '{architectures[0]}', whose code ships "
                             "with the model (auto_map); convert does not run a model's own code: load it with "
                             "from_pretrained(..., trust_remote_code=True) and save it with save_pretrained_flashpack")
        if cls is None:
            cls = _class_holding_the_checkpoint(config, directory, variant)
        if cls is None:
            raise ValueError(f"{directory}/config.json names the architecture '{architectures[0]}', which "
                             f"transformers {transformers.__version__} does not have (a subclass's name, as "
                             "save_pretrained records it? Set \"architectures\" there to the transformers class "
                             "it extends, such as \"LlamaForCausalLM\")")
        return cls
    return None


def _checkpoint_names(directory: str, variant: Optional[str]) -> List[str]:
    """The names of the tensors a model directory's checkpoint holds, from its index or the
    files' headers (a torch file is mapped, not read)."""
    weights = _weights_in_directory(directory, variant)
    if _is_index(weights):
        return list(_weight_map(weights))
    if weights.endswith(".safetensors") or _is_safetensors(weights):
        return list(safetensors_entries(weights))
    return list(_torch_state_dict(weights))


def _class_holding_the_checkpoint(config: Dict[str, Any], directory: str, variant: Optional[str]) -> Optional[type]:
    """For a config.json whose architecture transformers does not have (a subclass's name, as
    save_pretrained records it: ``class FlashLlama(LlamaForCausalLM, ...)``), the one class of
    its model type whose tensors are the checkpoint's, each class built on the meta device to
    compare names; None where no single class matches."""
    import transformers
    from transformers.models.auto import modeling_auto

    model_type = config.get("model_type")
    candidates = []
    for mapping in dir(modeling_auto):
        if mapping.startswith("MODEL") and mapping.endswith("_MAPPING_NAMES"):
            found = getattr(modeling_auto, mapping).get(model_type)
            for name in [found] if isinstance(found, str) else list(found or ()):
                if name not in candidates and hasattr(transformers, name):
                    candidates.append(name)
    if not candidates:
        return None
    try:
        names = set(_checkpoint_names(directory, variant))
        model_config = transformers.AutoConfig.from_pretrained(directory)
    except (OSError, ValueError):
        return None
    matching = []
    for name in candidates:
        cls = getattr(transformers, name)
        try:
            with torch.device("meta"):
                model = cls(model_config)
        except Exception:  # noqa: BLE001 - a class this config cannot build is not the one
            continue
        held = dict(model.state_dict(keep_vars=True))
        if not names <= held.keys():
            continue
        # What the checkpoint lacks must be a tied second name of a tensor it holds.
        present = {id(held[n]) for n in names}
        if all(id(tensor) in present for n, tensor in held.items() if n not in names):
            matching.append(cls)
    if len(matching) != 1:
        return None
    warn(f"{directory}/config.json names the architecture '{config['architectures'][0]}', which transformers "
         f"does not have; its checkpoint holds the tensors of {matching[0].__name__}, which converts it")
    return matching[0]


def checkpoint_tensor_sizes(path: str) -> Optional[List[Tuple[int, torch.dtype]]]:
    """(element count, dtype) of each tensor of a safetensors or torch checkpoint file, from
    the safetensors header or the torch file mapped onto the meta device: no tensor data is
    read. None when the file is neither (or holds no state dict)."""
    if path.endswith(".safetensors"):
        from .lazy import _SAFETENSORS_DTYPES

        by_code = {code: dtype for dtype, code in _SAFETENSORS_DTYPES.items()}
        return [(math.prod(shape), by_code[code]) for code, shape in safetensors_entries(path).values()
                if code in by_code]
    try:
        state = torch.load(path, map_location="meta", weights_only=True, mmap=True)
    except Exception:  # not a zip-format torch file, or not a state dict: unknown
        return None
    if not isinstance(state, dict):
        return None
    return [(t.numel(), t.dtype) for t in state.values() if isinstance(t, torch.Tensor)]


def _stored_float_dtype(directory: str, variant: Optional[str]) -> Optional[torch.dtype]:
    """The floating dtype holding most bytes of a directory's weights (None if unknown).

    diffusers loads weights in float32 unless told otherwise; a float16 checkpoint should
    stay float16 when converted.
    """
    try:
        weights = _weights_in_directory(directory, variant)
    except (FileNotFoundError, ValueError):
        return None
    if _is_index(weights):
        weights = os.path.join(directory, sorted(set(_weight_map(weights).values()))[0])
    tensors = checkpoint_tensor_sizes(weights) if os.path.isfile(weights) else None
    sizes: Dict[torch.dtype, int] = {}
    for numel, dtype in tensors or []:
        if dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            sizes[dtype] = sizes.get(dtype, 0) + numel * dtype.itemsize
    return max(sizes, key=sizes.get) if sizes else None


def _quiet_libraries() -> None:
    """Silence the progress bars transformers and diffusers draw while loading."""
    for library in ("transformers", "diffusers"):
        try:
            __import__(f"{library}.utils.logging", fromlist=["disable_progress_bar"]).disable_progress_bar()
        except (ImportError, AttributeError):
            pass


def _convert_model_directory(model_class: type, directory: str, destination: str, dtype: Optional[torch.dtype],
                             variant: Optional[str], ignore: Dict[str, Any], checksum: bool) -> str:
    is_transformers = model_class.__module__.startswith("transformers")
    library = importlib.import_module(model_class.__module__.split(".")[0])
    verbosity = library.logging.get_verbosity()
    # Its report of unused or missing tensors would precede the one-line error below.
    library.logging.set_verbosity_error()
    try:
        if is_transformers:
            from .integrations.transformers import save_pretrained_flashpack

            # The stored dtype, as for diffusers models and pipelines: dtype="auto" would take
            # config.json's, which for a float16 variant beside float32 weights says float32.
            # Found with another dtype too: the index's entries are checked before the load reads them.
            stored = _stored_float_dtype(directory, variant)
            model, info = model_class.from_pretrained(directory, dtype=dtype or stored or "auto", variant=variant,
                                                      output_loading_info=True)
        else:
            from .integrations.diffusers import save_pretrained_flashpack
            from .integrations.diffusers.model import dtype_argument

            stored = _stored_float_dtype(directory, variant)
            model, info = model_class.from_pretrained(directory, variant=variant, output_loading_info=True,
                                                      **{dtype_argument(): dtype or stored})
    finally:
        library.logging.set_verbosity(verbosity)
    # The model built from config.json must take the checkpoint whole: a tensor it leaves out
    # would be lost (AutoModel, for a config naming no architecture, builds the base of a
    # model without its head). One the checkpoint lacks (a pooler, a head) from_pretrained
    # initialises at random: it is left out of the file, and from_pretrained_flashpack(...,
    # strict=False) initialises it as from_pretrained does.
    unused, lacking = sorted(info.get("unexpected_keys") or []), sorted(info.get("missing_keys") or [])
    built = (f"config.json names no architecture, and AutoModel builds a {type(model).__name__}"
             if model_class.__name__ == "AutoModel" else f"config.json names {model_class.__name__}")
    if unused:
        raise ValueError(f"{directory}: {built}, which does not match the checkpoint: {len(unused)} tensors it has "
                         f"no place for ({', '.join(unused[:5])}{', ...' if len(unused) > 5 else ''}); name the "
                         "model's class in config.json (\"architectures\") or convert the weights file itself")
    if lacking:
        warn(f"{directory}: the checkpoint lacks {len(lacking)} tensors {type(model).__name__} has "
             f"({', '.join(lacking[:5])}{', ...' if len(lacking) > 5 else ''}); they are left out of the file: "
             "load it with strict=False to initialise them as from_pretrained does")
        ignore = dict(ignore, ignore_names=list(ignore.get("ignore_names") or []) + lacking)
    recorded = _recorded_dtypes(directory, [""]) if _in_place(destination, directory) else {}
    save_pretrained_flashpack(model, destination, target_dtype=dtype, checksum=checksum, **ignore)
    _restore_dtypes(directory, recorded)
    return os.path.join(destination, FLASHPACK_FILE)


def _links_out(path: str, directory: str) -> bool:
    """Whether ``path`` is a link leading out of ``directory``, other than the Hub cache's link
    from a snapshot (``.../snapshots/<commit>/...``) to the blob holding the file."""
    if not os.path.islink(path):
        return False
    target = os.path.realpath(path)
    roots = [os.path.realpath(directory)]
    # The snapshot as named, or as it lies where the name is a link to it (~/models/x -> the cache's).
    for folder in dict.fromkeys((os.path.abspath(directory), os.path.realpath(directory))):
        while os.path.dirname(folder) != folder:
            if os.path.basename(os.path.dirname(folder)) == "snapshots":
                roots.append(os.path.realpath(os.path.join(os.path.dirname(folder), os.pardir, "blobs")))
            folder = os.path.dirname(folder)
    return not any(os.path.commonpath([root, target]) == root for root in roots)


def _copy_companions(directory: str, destination: str) -> None:
    """Into a new destination, the model directory's other files (its tokenizer, chat template,
    processor configs, model card), so that the converted directory serves as the original
    did; not weights of any kind, hidden files, folders, nor what the conversion wrote."""
    if _in_place(destination, directory):
        return
    for name in sorted(os.listdir(directory)):
        source = os.path.join(directory, name)
        if name.startswith(".") or not os.path.isfile(source) or os.path.exists(os.path.join(destination, name)):
            continue
        if name.endswith(WEIGHT_EXTENSIONS + (".flashpack",)) or _is_index(name) or \
                any(fnmatch.fnmatch(name, pattern) for pattern in OTHER_FRAMEWORKS):
            continue
        if _links_out(source, directory):
            # Whoever made the directory chose what it names: a file elsewhere is not the model's.
            warn(f"{source} is a link to {os.path.realpath(source)}, outside {directory}: not copied")
            continue
        shutil.copy2(source, os.path.join(destination, name))  # a Hub cache's link: its file


def _in_place(destination: str, directory: str) -> bool:
    return os.path.isdir(destination) and os.path.samefile(destination, directory)


def _refuse_link_out(path: str, directory: str) -> None:
    """Refuse to write ``path``, a file written into a directory the command was given (in
    place, or under a default name), where it is a link leading out of ``directory``: the write
    would replace the file the link names, which whoever made the directory chose."""
    if not os.path.islink(path):
        return
    root, target = os.path.realpath(directory), os.path.realpath(path)
    if os.path.commonpath([root, target]) != root:
        raise ValueError(f"{path} is a link to {target}, outside {directory}: writing it would replace that file; "
                         "remove the link or give another destination")


def _component_folders(directory: str, index: Dict[str, Any]) -> List[str]:
    """The names in a pipeline's model_index.json that are folders of it. Component names are
    the pipeline's arguments: another name ("../elsewhere", an absolute path) is no folder of it."""
    return [name for name in index if not name.startswith("_") and name.isidentifier()
            and os.path.isdir(os.path.join(directory, name))]


def _refuse_links_out_of_pipeline(directory: str, config: Dict[str, Any]) -> None:
    """``_refuse_link_out`` for what a pipeline's conversion in place writes: model_index.json
    and the files of its components' folders, but for a model's checkpoint, which is read and
    never written (a download may link its large files to the Hub cache)."""
    from .integrations.diffusers.pipeline import (ModelMixin, _component_entries, _import_class,
                                                  _transformers_model_class)

    models = tuple(cls for cls in (ModelMixin, _transformers_model_class()) if cls is not None)
    _refuse_link_out(os.path.join(directory, "model_index.json"), directory)
    entries = _component_entries(config)
    for name in _component_folders(directory, entries):
        library, class_name = entries[name]
        folder = os.path.join(directory, name)
        _refuse_link_out(folder, directory)
        try:
            is_model = isinstance(library, str) and isinstance(class_name, str) and \
                issubclass(_import_class(library, class_name), models)
        except ValueError:  # a class diffusers cannot load either: every file is checked
            is_model = False
        for entry in sorted(os.listdir(folder)):
            if not (is_model and (entry.endswith(WEIGHT_EXTENSIONS) or _is_index(entry))):
                _refuse_link_out(os.path.join(folder, entry), directory)


def _recorded_dtypes(directory: str, folders: Sequence[str]) -> Dict[str, Tuple[Optional[str], Any]]:
    """For a conversion in place: the dtype each folder's transformers config.json records
    (its key, and value), to write back once converted. The folder's other weights are still
    loaded by it: from_pretrained would load float32 weights as float16 after their float16
    variant was converted. A flashpack load takes the file's own dtype and does not read it."""
    recorded: Dict[str, Tuple[Optional[str], Any]] = {}
    for folder in folders:
        config = _read_config(os.path.join(directory, folder), "config.json")
        if config is None:
            continue
        # transformers 5's name, or 4's; (None, None) for a config that records none (an
        # older one), which must stay without.
        key = next((k for k in ("dtype", "torch_dtype") if k in config), None)
        recorded[folder] = (key, config.get(key) if key else None)
    return recorded


def _restore_dtypes(directory: str, recorded: Dict[str, Tuple[Optional[str], Any]]) -> None:
    for folder, (key, value) in recorded.items():
        path = os.path.join(directory, folder, "config.json")
        config = _read_config(os.path.dirname(path), "config.json") or {}
        now = next(((k, config[k]) for k in ("dtype", "torch_dtype") if k in config), (None, None))
        if now != (key, value):
            config.pop("dtype", None)
            config.pop("torch_dtype", None)
            if key is not None:
                config[key] = value
            text = json.dumps(config, indent=2, sort_keys=True) + "\n"  # as transformers writes it

            def write(temporary: str, text: str = text) -> None:
                with open(temporary, "w", encoding="utf-8") as f:
                    f.write(text)

            _write_replacing(path, write)


def _convert_pipeline_directory(directory: str, destination: str, dtype: Optional[torch.dtype],
                                variant: Optional[str], ignore: Dict[str, Any], checksum: bool) -> str:
    config = _read_config(directory, "model_index.json") or {}
    if any(ignore.values()):
        # save_pipeline_flashpack takes no ignore_* (its **kwargs would drop them unseen).
        models = [name for name in _component_folders(directory, config)
                  if any(n.endswith(WEIGHT_EXTENSIONS) for n in os.listdir(os.path.join(directory, name)))]
        raise ValueError(f"{directory}: the ignore options are not supported for a pipeline directory; convert "
                         f"the component they apply to with --subfolder ({', '.join(models) or 'its name'})")

    from diffusers import DiffusionPipeline

    from .integrations.diffusers import save_pipeline_flashpack

    stored = {name: _stored_float_dtype(os.path.join(directory, name), variant)
              for name in _component_folders(directory, config)}
    dtypes = {name: dtype or value for name, value in stored.items() if dtype or value}
    from .integrations.diffusers.model import dtype_argument

    pipeline = DiffusionPipeline.from_pretrained(
        directory, variant=variant, **{dtype_argument(): dict(dtypes, default=dtype or torch.float32)})
    recorded = _recorded_dtypes(directory, [name for name in pipeline.components
                                            if os.path.isdir(os.path.join(directory, name))]) \
        if _in_place(destination, directory) else {}
    save_pipeline_flashpack(pipeline, destination, target_dtype=dtype, checksum=checksum)
    _restore_dtypes(directory, recorded)
    return destination


def _not_converted(files: Optional[List[str]], variant: Optional[str]) -> List[str]:
    """Files of a Hub repo (its listing, None if unknown) a conversion does not read, as
    download ignore patterns: other frameworks' weights, flashpack files, and in each folder
    the weights from_pretrained would not read either (other variants', torch files beside
    safetensors)."""
    ignored = list(OTHER_FRAMEWORKS) + ["*.flashpack"]
    if files is None:
        return ignored
    folders = sorted({os.path.dirname(f) for f in files})
    return ignored + [glob.escape(f) for f in unread_weights(files, folders, variant)]


def convert_to_flashpack(
    model_or_state_dict_or_path_or_repo_id: Union[str, "os.PathLike[str]", torch.nn.Module, Dict[str, torch.Tensor]],
    destination_path: Optional[Union[str, "os.PathLike[str]"]] = None,
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
    checksum: bool = False,
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
        - a torch.distributed.checkpoint (DCP) directory (``.metadata`` and ``.distcp`` files, as
          FSDP2 and tensor-parallel training save them): its model part, whole, in one
          ``.flashpack`` file (inside it by default);
        - a Hugging Face Hub repo id, downloaded with huggingface_hub (``destination_path``
          required), then as the directory.

    Args:
        model_or_state_dict_or_path_or_repo_id: the source, one of those above.
        destination_path: the ``.flashpack`` file to write, or for a model or pipeline
            directory (or a repo id) the directory; by default beside a source file, and
            into a local model directory itself.
        dtype: convert the floating-point tensors to this dtype (``torch.bfloat16`` or ``"bf16"``).
            A model or pipeline directory then needs another destination: its rewritten
            config.json would tell ``from_pretrained`` to load the original weights so too.
        ignore_names, ignore_prefixes, ignore_suffixes: tensors to leave out.
        use_transformers, use_diffusers: force the library for a model directory.
        silent: no progress bars.
        subfolder: the model lies in this subfolder of the directory or repo.
        variant: read ``*.{variant}.safetensors`` weights (``"fp16"``).
        revision: the Hub revision.
        checksum: store CRC-32C checksums for ``verify_file`` (in every file written).

    Returns:
        str: the file written, or the directory for a model or pipeline directory.

    Raises:
        FileNotFoundError, ValueError: the source cannot be read, or the destination is a source
            checkpoint or has another format's extension, with the reason.
        HubUnavailableError: a repo id while offline, with no cached copy.

    Example:
        >>> convert_to_flashpack("model.safetensors", dtype="bf16")
        'model.flashpack'
    """
    if destination_path is not None:
        destination_path = os.fspath(destination_path)
    target_dtype = parse_dtype(dtype)
    if target_dtype is not None and not target_dtype.is_floating_point:
        raise ValueError(f"dtype {dtype}: {target_dtype} is not a floating-point dtype; the floating-point tensors "
                         "converted to it would lose their values")
    ignore = dict(ignore_names=list(ignore_names or []), ignore_prefixes=list(ignore_prefixes or []),
                  ignore_suffixes=list(ignore_suffixes or []))
    source = model_or_state_dict_or_path_or_repo_id
    if isinstance(source, (torch.nn.Module, dict)) or os.path.isfile(source):
        # They pick the model in a directory or repo: given a file or tensors, they would be
        # dropped unseen (variant="fp16" beside the float32 file would write the float32 weights).
        what = f"the file {os.fspath(source)}" if not isinstance(source, (torch.nn.Module, dict)) else \
            f"a {type(source).__name__}"
        for option, value in (("subfolder", subfolder), ("variant", variant), ("revision", revision)):
            if value:
                raise ValueError(f"convert_to_flashpack: {option}= applies to a model directory or a Hub repo id, "
                                 f"not to {what}; convert the file that holds the weights you want")
    if isinstance(source, (torch.nn.Module, dict)):
        if destination_path is None:
            raise ValueError("convert_to_flashpack: a model or state dict needs a destination_path")
        _check_destination(destination_path)
        state_dict = source.state_dict() if isinstance(source, torch.nn.Module) else source
        _save(state_dict, destination_path, ignore, target_dtype=target_dtype, checksum=checksum)
        return destination_path

    source = os.fspath(source)
    if os.path.isfile(source):
        is_index = _is_index(source)
        default = os.path.join(os.path.dirname(source), FLASHPACK_FILE) if is_index else \
            os.path.splitext(source)[0] + ".flashpack"
        destination = _destination_file(destination_path, default)
        _check_destination(destination, _checkpoint_files(source))
        if destination_path is None or _in_place(os.path.dirname(destination) or ".", os.path.dirname(source) or "."):
            _refuse_link_out(destination, os.path.dirname(source) or ".")
        state_dict = read_sharded(source, quiet=silent) if is_index else read_state_dict_file(source)
        _save(state_dict, destination, ignore, target_dtype=target_dtype, checksum=checksum,
              metadata=checkpoint_metadata(source))
        return destination

    if not os.path.isdir(source):
        if os.path.exists(source):
            check_regular_file(source)  # neither a file nor a folder: a FIFO, a device or a socket, refused by name
        # A name like a file's is a missing file, even where it could pass for a repo id.
        if source.endswith(WEIGHT_EXTENSIONS + (".flashpack",)) or _is_index(source):
            raise FileNotFoundError(f"{source}: no such file or directory")
        if not looks_like_repo_id(source):
            raise FileNotFoundError(f"{source}: no such file or directory, and not a Hugging Face Hub repo id")
        if destination_path is None:
            raise ValueError(f"converting the Hub repo '{source}' needs a destination directory")
        files = repo_files(source, revision)
        if not subfolder and files is not None and "model_index.json" in files:
            # A pipeline: its components' folders, as its load reads them.
            directory = resolve_pipeline_directory(source, variant=variant, flashpack=False, files=files,
                                                   revision=revision)
        else:
            patterns = [f"{subfolder}/*", "*.json"] if subfolder else None
            directory = resolve_directory(source, revision=revision, allow_patterns=patterns,
                                          ignore_patterns=_not_converted(files, variant))
    else:
        directory = source
    model_dir = os.path.join(directory, subfolder) if subfolder else directory
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"{model_dir}: no such directory")
    # A local directory is converted in place by default: from_pretrained_flashpack reads it as is.
    destination = destination_path if destination_path is not None else model_dir

    if is_distributed_checkpoint(model_dir):
        output = _destination_file(destination, os.path.join(model_dir, FLASHPACK_FILE))
        _check_destination(output)
        if destination_path is None or _in_place(os.path.dirname(output) or ".", model_dir):
            _refuse_link_out(output, model_dir)
        _save(read_distributed_checkpoint(model_dir), output, ignore, target_dtype=target_dtype, checksum=checksum)
        return output
    if not any(n.endswith(WEIGHT_EXTENSIONS) or _is_index(n) for n in os.listdir(model_dir)) and \
            _read_config(model_dir, "model_index.json") is None:
        raise FileNotFoundError(f"{model_dir} holds no checkpoint to convert (.safetensors, .bin, .pt, .ckpt, "
                                ".index.json or a torch.distributed.checkpoint)")
    if silent:
        _quiet_libraries()
    is_pipeline = _read_config(model_dir, "model_index.json") is not None
    config = None if is_pipeline else _read_config(model_dir, "config.json")
    model_class = _library_model_class(config, model_dir, use_transformers, use_diffusers, variant) if config else None
    if is_pipeline or model_class is not None:
        what = "pipeline" if is_pipeline else "model"
        if destination.endswith(".flashpack"):
            raise ValueError(f"{destination}: a {what} directory converts to a directory (its config beside "
                             f"{FLASHPACK_FILE}, for from_pretrained_flashpack); give a directory name")
        if target_dtype is not None and _in_place(destination, model_dir):
            # The rewritten config.json would describe the new dtype, and from_pretrained would
            # then load the original weights beside it in that dtype without a word.
            raise ValueError(f"{model_dir}: converting a {what} directory to {target_dtype} in place would rewrite "
                             "its config for the original weights too; give a destination directory")
        if _in_place(destination, model_dir):
            folders = [model_dir]
            if is_pipeline:
                index = _read_config(model_dir, "model_index.json") or {}
                _refuse_links_out_of_pipeline(model_dir, index)
                folders = [os.path.join(model_dir, name) for name in _component_folders(model_dir, index)]
            else:
                _refuse_link_out(os.path.join(model_dir, FLASHPACK_FILE), model_dir)
            for folder in folders:  # a model.flashpack linked to the checkpoint beside it
                _check_destination(os.path.join(folder, FLASHPACK_FILE), [
                    os.path.join(folder, name) for name in os.listdir(folder) if name.endswith(WEIGHT_EXTENSIONS)])
        if is_pipeline:
            return _convert_pipeline_directory(model_dir, destination, target_dtype, variant, ignore, checksum)
        written = _convert_model_directory(model_class, model_dir, destination, target_dtype, variant, ignore,
                                           checksum)
        _copy_companions(model_dir, destination)
        return written
    weights = _weights_in_directory(model_dir, variant)
    output = _destination_file(destination, os.path.join(model_dir, FLASHPACK_FILE))
    _check_destination(output, _checkpoint_files(weights))
    if destination_path is None or _in_place(os.path.dirname(output) or ".", model_dir):
        _refuse_link_out(output, model_dir)
    state_dict = read_sharded(weights, quiet=silent) if _is_index(weights) else read_state_dict_file(weights)
    _save(state_dict, output, ignore, target_dtype=target_dtype, checksum=checksum,
          metadata=checkpoint_metadata(weights))
    return output


def revert_from_flashpack(path: Union[str, "os.PathLike[str]"],
                          destination_path: Optional[Union[str, "os.PathLike[str]"]] = None,
                          silent: bool = True) -> str:
    """Write a flashpack file back as ``.safetensors`` (the default) or a torch file (.pt, .bin...).

    Tied tensors stay shared in a torch file; safetensors stores each name on its own.

    Args:
        path: the flashpack file, or a model directory holding ``model.flashpack``.
        destination_path: the file to write (its extension picks the format), or a
            directory to write it into; by default the source's name with ``.safetensors``.
        silent: no progress bar.

    Returns:
        str: the file written.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        FileExistsError: no ``destination_path`` was given and the default one exists.
        ValueError: an unknown destination extension, or a dtype safetensors cannot store.

    Example:
        >>> revert_from_flashpack("model.flashpack", "model.pt")
        'model.pt'
    """
    path = flashpack_in(os.fspath(path))
    # The source is checked first: given a .safetensors file by mistake, the error says so,
    # not that the default destination (the very same file) exists.
    identity = _identity(_path(path, must_exist=True))
    file_metadata = torch.ops.flashpack.metadata(path)
    if os.path.basename(path) == FLASHPACK_FILE and \
            _is_diffusers_config(_read_config(os.path.dirname(path) or ".", "config.json")):
        # The weights file a diffusers model's from_pretrained looks for beside its config (a
        # file of another name, ema.flashpack, is not the model's: it keeps its own name).
        default = os.path.join(os.path.dirname(path), "diffusion_pytorch_model.safetensors")
    else:
        default = os.path.splitext(path)[0] + ".safetensors"
    destination = os.fspath(destination_path) if destination_path else default
    # A directory, as convert takes one (an existing one, or a name ending in a separator,
    # created if missing): the file goes in it under its default name.
    into_directory = bool(destination_path) and (os.path.isdir(destination) or destination.endswith(os.sep))
    named = bool(destination_path) and not into_directory
    if into_directory:
        destination = os.path.join(destination, os.path.basename(default))
    if not named and os.path.isfile(path) and os.path.exists(destination):
        # Most likely the checkpoint this file was converted from: only an explicit name replaces it.
        raise FileExistsError(f"{destination} already exists; give the destination explicitly to overwrite it")
    if not named:
        _refuse_link_out(destination, os.path.dirname(destination) or ".")
    if not destination.endswith(WEIGHT_EXTENSIONS):
        raise ValueError(f"{destination}: unknown extension; use .safetensors or one of {', '.join(TORCH_EXTENSIONS)}")
    if os.path.exists(destination) and os.path.samefile(destination, path):
        # The tensors view the file's mapping: writing over it would pull the pages from under them.
        raise ValueError(f"{destination} is the file being reverted ({path}); give another destination")
    # NOTE: the loaded tensors view a private map of the file; both writers stream from it
    # page by page, so reverting a large file needs no second copy in memory.
    tensors = load_file(path, "cpu")
    if _identity(path) != identity:
        # A save renamed another file over it between the two reads: its tensors and the
        # metadata read first may not belong together.
        raise RuntimeError(f"{path} was replaced while it was being read; revert it again")
    tensors = _as_checkpoint_names(path, tensors)
    if into_directory:
        os.makedirs(os.path.dirname(destination), exist_ok=True)
    if destination.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import save_file as save_safetensors

        if "__metadata__" in tensors:
            # The key a .safetensors header keeps for its metadata: a tensor under that name
            # would make a header no reader accepts.
            raise ValueError(f"safetensors cannot store {path}: a tensor is named '__metadata__', the key a "
                             ".safetensors header keeps for its metadata; write a .pt file instead")
        # safetensors refuses names that share memory: a tied name gets its own copy.
        seen, unique = set(), {}
        with _progress(tensors.items(), "reverting", total=len(tensors), quiet=silent) as items:
            for name, tensor in items:
                key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
                try:
                    unique[name] = tensor.clone() if key in seen and tensor.numel() else tensor
                except RuntimeError as e:  # sub-byte dtypes have no copy kernel, nor a safetensors dtype
                    raise ValueError(f"safetensors cannot store {path}: '{name}' is {tensor.dtype} ({e}); write a "
                                     ".pt file instead") from None
                seen.add(key)
        # The file's metadata (a converted checkpoint's), with the "format" save_pretrained
        # writes where it has none: transformers checks it when loading.
        metadata = {"format": "pt", **file_metadata}
        try:
            _write_replacing(destination, lambda temporary: save_safetensors(unique, temporary, metadata=metadata))
        except (ValueError, TypeError, KeyError, SafetensorError) as e:
            # SafetensorError: what its writer itself refuses (a 0-d float4_e2m1fn_x2, half a byte).
            raise ValueError(f"safetensors cannot store {path}: {e}; write a .pt file instead") from None
    else:
        try:
            _write_replacing(destination, lambda temporary: torch.save(tensors, temporary))
        except KeyError as e:  # torch.save's table of dtypes lacks the sub-byte ones
            raise ValueError(f"torch.save cannot store {path}: {e.args[0] if e.args else e}") from None
    return destination


def _write_replacing(destination: str, write: Callable[[str], None]) -> None:
    """``write(temporary)``, then the temporary file renamed onto ``destination`` (a link's
    target, where it is one), as save_file writes: a write that fails leaves the old file as it
    was and no partial file behind."""
    target = os.path.realpath(destination)
    directory, base = os.path.split(target)
    # Refused before anything is written, as save_file refuses them: the rename would put a
    # regular file in place of a directory, a device, a FIFO or a socket, or fail only after
    # the whole file was written.
    # A name too long for the file system fails here too (ENAMETOOLONG).
    try:
        old = os.stat(target)
    except FileNotFoundError:
        old = None
    if old is not None and stat.S_ISDIR(old.st_mode):
        raise IsADirectoryError(errno.EISDIR, f"cannot write {destination}: it is a directory")
    if old is not None and not stat.S_ISREG(old.st_mode):
        raise OSError(errno.EINVAL, f"cannot write {destination}: it is not a regular file (a device, FIFO or socket)")
    # A name near the file system's limit (255 bytes) leaves no room for the suffix: shortened.
    stem = os.fsencode(base)[:200].decode(errors="ignore") if isinstance(base, str) else base
    temporary = os.path.join(directory, f".{stem}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    # 0666: the umask gives the file its usual permissions; a file replaced keeps its own,
    # given before any byte is written.
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
        # Said of the destination and its directory, not of a temporary name the caller never gave.
        raise type(e)(e.errno, f"cannot write {destination}: {e.strerror}", directory or ".") from None
    try:
        try:
            if old is not None:
                os.fchmod(fd, old.st_mode & 0o7777)
            mode = os.fstat(fd).st_mode & 0o7777
        finally:
            os.close(fd)
        write(temporary)
        os.chmod(temporary, mode)  # the writer may have put a file of its own there (safetensors does)
        try:
            os.replace(temporary, target)
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise
            raise OSError(errno.EBUSY, f"cannot write {destination}: it is a mount point (a file mounted on its own, "
                          "as `docker run -v file:file` mounts one), which a rename cannot replace; the old file is "
                          "intact. Write inside a mounted directory instead") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _as_checkpoint_names(path: str, tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The tensors under the names save_pretrained writes, for a transformers model whose
    checkpoints transformers renames as it loads them (a MoE's experts fused, LLaVA's
    language_model moved): the file holds the loaded model's names, which other readers of
    Hub checkpoints do not know. transformers' own reverse conversion gives them back. Other
    files, and models without such renames, keep their names."""
    config = _read_config(os.path.dirname(path) or ".", "config.json")
    if os.path.basename(path) != FLASHPACK_FILE or not config or _is_diffusers_config(config) or \
            "model_type" not in config:
        return tensors
    try:
        import transformers
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # no transformers, or one without renames (4.x)
        return tensors
    if get_checkpoint_conversion_mapping(config["model_type"]) is None:
        return tensors
    model_class = _library_model_class(config, os.path.dirname(path) or ".", True, False)
    with torch.device("meta"):
        model = model_class(transformers.AutoConfig.from_pretrained(os.path.dirname(path) or "."))
    return revert_weight_conversion(model, tensors)


def summarize(path: str) -> Dict[str, Any]:
    """A flashpack file's footer plus what a person wants first: sizes, counts, dtypes."""
    meta = read_metadata(path)
    index = meta.get("index", [])
    # By "format", as the C++ reader takes the footer: a flashpack_v3 footer is one block of its
    # "target_dtype", whatever other keys (another writer's "macroblocks") it holds.
    if meta["format"] != "flashpack_v3":
        blocks = meta["macroblocks"]
    else:
        itemsize = torch.empty(0, dtype=getattr(torch, meta["target_dtype"])).element_size()
        blocks = [{"dtype": meta["target_dtype"], "offset_bytes": 0,
                   "length_bytes": int(meta["total_elems"]) * itemsize, "length_elems": int(meta["total_elems"])}]
    # Tied entries (same block, offset and length) are stored once and counted once.
    stored = {(r.get("macroblock", 0), r["offset"], r["length"]) for r in index if int(r["length"]) > 0}
    elements = sum(int(length) for _, _, length in stored)
    tied = sum(1 for r in index if int(r["length"]) > 0) - len(stored)
    # Saved with checksums: the index's, and every block's (a file without blocks has the first only).
    checksums = "index_crc32c" in meta and all("checksums" in block for block in blocks)
    return {"path": path, "file_bytes": os.path.getsize(path), "format": meta["format"],
            "align_bytes": meta.get("align_bytes"), "tensors": len(index), "tied": tied, "elements": elements,
            "checksums": checksums,
            "blocks": blocks, "index": index, "metadata": dict(torch.ops.flashpack.metadata(path))}
