"""What the Hugging Face integrations share: finding a model directory, the file in it, dtypes."""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import re
import secrets
import shlex
import shutil
import stat
import tempfile
from typing import Any, Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from .._warnings import warn
from ..api import DevicePlacement, describe_missing, filter_state_dict, initialize_missing
from ..ops import _device, _footer_blocks, read_metadata, save_file

FLASHPACK_FILE = "model.flashpack"

# Arguments of from_pretrained (transformers', diffusers' and the reference's) that choose among
# weight files, place or tune the download, or tune loading: a flashpack directory has one file,
# loaded whole, so they change nothing and from_pretrained_flashpack drops them rather than pass
# them on to the model's constructor.
IGNORED_LOAD_KWARGS = ("proxies", "local_dir_use_symlinks", "low_cpu_mem_usage", "use_safetensors", "variant",
                       "num_streams", "chunk_bytes", "resume_download", "mirror", "_fast_init", "weights_only",
                       "disable_mmap", "offload_folder", "offload_state_dict", "offload_buffers",
                       "tqdm_class", "_commit_hash", "_from_auto", "_from_pipeline", "adapter_name",
                       "allow_all_kernels", "use_flashpack", "flashpack_kwargs")

# Arguments that would change what is loaded, with their defaults: any other value is refused,
# since silently loading the model as saved (not quantized, not sharded...) would be wrong.
UNSUPPORTED_LOAD_KWARGS = {"quantization_config": None, "gguf_file": None, "key_mapping": None, "tp_plan": None,
                           "tp_size": None, "device_mesh": None, "distributed_config": None, "adapter_kwargs": None,
                           "state_dict": None, "from_tf": False, "from_flax": False, "use_kernels": False,
                           "kernel_config": None}

# Passed on to assign_from_file.
DISTRIBUTED_LOAD_KWARGS = ("use_distributed_loading", "distributed_sharded", "distributed_shard_strategy", "rank",
                           "local_rank", "world_size")

SPREADING_DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")

# Other frameworks' weights, which neither torch's loaders nor a conversion read; with
# safetensors and torch files, what a load from a model.flashpack reads none of: a download
# from the Hub leaves them out.
OTHER_FRAMEWORKS = ("*.h5", "*.msgpack", "*.ot", "*.onnx", "*.onnx_data", "*.tflite", "*.gguf", "*.mlmodel",
                    "*.mlpackage/*", "*.pdparams", "*.npz")
OTHER_WEIGHTS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt") + OTHER_FRAMEWORKS

_REPO_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


class HubUnavailableError(OSError):
    """The Hugging Face Hub cannot be reached: a repo id to download with nothing cached, or an
    upload (``push_to_hub``) while offline."""


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
    ignore_patterns: Optional[list] = None,
) -> str:
    """A local model directory as is, or a Hub repo id downloaded (or found in the cache), its
    files chosen by ``allow_patterns`` and ``ignore_patterns`` (huggingface_hub's).

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
                                 allow_patterns=allow_patterns, ignore_patterns=ignore_patterns)
    except LocalEntryNotFoundError:
        offline = _offline_variable()
        reason = (f"{offline} is set" if offline else
                  "only the local cache was searched" if local_files_only else "no network connection")
        raise HubUnavailableError(f"cannot download '{name}' from the Hugging Face Hub ({reason}) and it is not in "
                                  "the local cache; pass a local directory or connect to the network") from None


def _offline_variable() -> str:
    """The environment variable that keeps huggingface_hub offline ('' if it is online).

    huggingface_hub reads TRANSFORMERS_OFFLINE where HF_HUB_OFFLINE is not set.
    """
    from huggingface_hub import constants

    if not constants.is_offline_mode():
        return ""
    if not os.environ.get("HF_HUB_OFFLINE") and os.environ.get("TRANSFORMERS_OFFLINE"):
        return "TRANSFORMERS_OFFLINE"
    return "HF_HUB_OFFLINE"


def flashpack_file_in(directory: str, subfolder: Optional[str] = None) -> str:
    """``directory[/subfolder]/model.flashpack``, or a FileNotFoundError that says how to make one."""
    model_dir = os.path.join(directory, subfolder) if subfolder else directory
    path = os.path.join(model_dir, FLASHPACK_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found; write it with save_pretrained_flashpack() or "
                                f"`flashpack convert {model_dir}`")
    warn_if_stale(path)
    return path


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


# The weights from_pretrained reads beside a config (model.safetensors, its variants and
# shards: model.fp16-00001-of-00002.safetensors; diffusers' diffusion_pytorch_model...):
# other safetensors files (a revert's ema.safetensors, model_ema) are no version of this model.
_CHECKPOINT = re.compile(r"(model|diffusion_pytorch_model)(\.[\w-]+?)?(-\d{5}-of-\d{5})?\.safetensors")
# Rows compared at most, over entries spread through the file: a fine-tune or a merge changes
# many tensors, and the check must stay cheap when the weights are the same (milliseconds).
_STALE_SAMPLES = 256


# safetensors' own bound on a header's length: a damaged length field reads no more than this.
_MAX_SAFETENSORS_HEADER = 100_000_000


def check_regular_file(path: str) -> None:
    """Raises ValueError where ``path`` is a FIFO, a device or a socket: opening a FIFO waits
    for a writer, forever where none comes (a model directory unpacked from an archive may
    hold one)."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        what = "a directory" if stat.S_ISDIR(mode) else "not a regular file (a FIFO, device or socket)"
        raise ValueError(f"{path} is {what}, not a checkpoint file")


def safetensors_entries(checkpoint: str) -> Dict[str, Tuple[str, List[int]]]:
    """name -> (dtype, shape) from a safetensors file's header; no tensor is read."""
    check_regular_file(checkpoint)
    with open(checkpoint, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if size > min(os.path.getsize(checkpoint) - 8, _MAX_SAFETENSORS_HEADER):
            raise ValueError(f"{checkpoint}: not a safetensors file (its header length says {size} bytes)")
        text = f.read(size)
    try:
        header = json.loads(text)
        return {name: (entry["dtype"], list(entry["shape"])) for name, entry in header.items()
                if name != "__metadata__"}
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"{checkpoint}: not a safetensors file (its header: {type(e).__name__}: {e})") from None


def _differing_entry(path: str, checkpoints: Sequence[str]) -> Optional[Tuple[str, str]]:
    """(checkpoint, entry) for the first of a few hundred entries, spread over the flashpack
    file, whose first, middle or last row differs from the checkpoints'; None where those
    agree. A checkpoint that holds an entry in another dtype is another precision (the float32
    original beside a file converted from its float16 variant), whose values differ without
    being other weights: it is not compared."""
    from safetensors import safe_open as safetensors_open

    from ..lazy import _SAFETENSORS_DTYPES
    from ..ops import load_file

    stored = load_file(path)  # views into a mapping: only the rows compared are read
    holder: Dict[str, str] = {}
    for checkpoint in checkpoints:
        entries = safetensors_entries(checkpoint)
        shared = [name for name in entries if name in stored]
        if any(entries[name][0] != _SAFETENSORS_DTYPES.get(stored[name].dtype) for name in shared):
            continue
        holder.update((name, checkpoint) for name in shared if entries[name][1] == list(stored[name].shape))
    names = [name for name in stored if name in holder]
    # Spread from the first entry to the last (a partial fine-tune changes the last layers).
    count = min(len(names), _STALE_SAMPLES)
    picks = sorted({round(k * (len(names) - 1) / max(count - 1, 1)) for k in range(count)}) if names else []
    chosen: Dict[str, List[str]] = {}
    for k in picks:
        chosen.setdefault(holder[names[k]], []).append(names[k])
    for checkpoint, sample in chosen.items():
        with safetensors_open(checkpoint, framework="pt") as other:
            for name in sample:
                mine, found = stored[name], other.get_slice(name)
                if mine.dim() == 0:
                    pairs = [(mine, other.get_tensor(name))]
                else:
                    rows = sorted({0, mine.shape[0] // 2, mine.shape[0] - 1}) if mine.shape[0] else []
                    pairs = [(mine[row:row + 1], found[row:row + 1]) for row in rows]
                if any(not torch.equal(_bytes(a), _bytes(b)) for a, b in pairs):
                    return checkpoint, name
    return None


def warn_if_stale(path: str) -> None:
    """Warn where a directory's safetensors checkpoint was written after its ``model.flashpack``
    and holds other weights: a model saved again with ``save_pretrained`` (fine-tuned, merged)
    over a directory converted before, whose flashpack file still holds the old weights. The
    files' times only say where to look; rows of a few hundred tensors decide. Links (the Hub's
    cache) are left alone: their times are the download's. Best effort: whatever cannot be
    read (a directory that cannot be listed) says nothing, and never fails the load."""
    try:
        if os.path.islink(path):
            return
        model_dir, made = os.path.dirname(path), os.stat(path).st_mtime
        newer = []
        for name in sorted(os.listdir(model_dir)):
            checkpoint = os.path.join(model_dir, name)
            if _CHECKPOINT.fullmatch(name) and \
                    not os.path.islink(checkpoint) and os.path.isfile(checkpoint) and \
                    os.stat(checkpoint).st_mtime > made:
                newer.append(checkpoint)
        found = _differing_entry(path, newer) if newer else None
    except Exception:  # noqa: BLE001 - a file that cannot be read says nothing about this one
        return
    if found is not None:
        checkpoint, entry = found
        warn(f"{path} is older than {os.path.basename(checkpoint)} beside it and holds other weights ('{entry}' "
             f"differs): the directory was saved again after it was converted, and {FLASHPACK_FILE} is loaded as "
             f"it is. Convert again (`flashpack convert {model_dir}`) or remove {FLASHPACK_FILE}")


def resolve_model_directory(name_or_path: Union[str, "os.PathLike[str]"], subfolder: Optional[str] = None,
                            **hub: Any) -> str:
    """A model's directory (or its repo's, the model in ``subfolder``), downloaded without the
    weights a flashpack load does not read: a repo that also holds safetensors or torch files
    costs the flashpack file's download only."""
    return resolve_directory(name_or_path, allow_patterns=[f"{subfolder}/*"] if subfolder else None,
                             ignore_patterns=list(OTHER_WEIGHTS), **hub)


def repo_files(repo_id: str, revision: Optional[str] = None, token: Any = None, cache_dir: Optional[str] = None,
               local_files_only: bool = False) -> Optional[List[str]]:
    """The files of a Hub repo: from the Hub, or (offline, or ``local_files_only``) from the
    listing the cache keeps (huggingface_hub 1.x keeps none); None when neither answers.

    The repo's info comes first, as ``snapshot_download`` asks for it: one request, tried once,
    so a machine without network gets its answer at once (a listing is retried for seconds)."""
    if not local_files_only:
        try:
            from huggingface_hub import HfApi

            api = HfApi(token=token)
            siblings = api.repo_info(repo_id, revision=revision).siblings
            # NOTE: the Hub may cut the info's file list short for large repos (snapshot_download
            # lists the tree above 1,000 files); by then the network is known to answer.
            if siblings is not None and len(siblings) < 1000:
                return [sibling.rfilename for sibling in siblings]
            return list(api.list_repo_files(repo_id, revision=revision))
        except Exception:  # offline, or the Hub's refusal: the download itself then says which
            pass
    try:
        from huggingface_hub import get_cached_repo_tree

        return [f.path for f in get_cached_repo_tree(repo_id, revision=revision, cache_dir=cache_dir)]
    except Exception:
        return None


TORCH_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt")


def has_variant(name: str) -> bool:
    """``model.fp16.safetensors``, ``diffusion_pytorch_model.fp16-00001-of-00002.safetensors``."""
    return name.split(".index.json")[0].count(".") >= 2


def of_variant(name: str, variant: Optional[str]) -> bool:
    """Whether a weights file is the one the loaders read for ``variant`` (None: no variant)."""
    if variant is None:
        return not has_variant(name)
    return f".{variant}." in name or f".{variant}-" in name


def unread_weights(files: Sequence[str], folders: Sequence[str], variant: Optional[str],
                   use_safetensors: Optional[bool] = None) -> List[str]:
    """The weights files in ``folders`` (direct children; "" for the top) that a loader does
    not read there: other variants' files (a folder without files of ``variant`` is read
    without one, as diffusers reads it), and of the two formats the one the loaders pass
    over: torch files beside safetensors ones, or with ``use_safetensors=False`` the
    safetensors beside torch files. A folder where nothing matches is left whole."""
    weights = (".safetensors",) + TORCH_WEIGHTS
    unread: List[str] = []
    for folder in folders:
        names = [f for f in files if os.path.dirname(f) == folder and f.endswith(weights)]
        chosen = variant if variant and any(of_variant(os.path.basename(f), variant) for f in names) else None
        read = [f for f in names if of_variant(os.path.basename(f), chosen)]
        if not read:
            continue
        if use_safetensors is False and any(f.endswith(TORCH_WEIGHTS) for f in read):
            passed_over: Tuple[str, ...] = (".safetensors",)
        elif use_safetensors is not False and any(f.endswith(".safetensors") for f in read):
            passed_over = TORCH_WEIGHTS
        else:
            passed_over = ()
        unread += [f for f in names if f not in read or (passed_over and f.endswith(passed_over))]
    return unread


def resolve_pipeline_directory(name_or_path: Union[str, "os.PathLike[str]"], passed: Sequence[str] = (),
                               variant: Optional[str] = None, use_safetensors: Optional[bool] = None,
                               flashpack: bool = True, files: Optional[List[str]] = None, **hub: Any) -> str:
    """A pipeline's directory, downloaded with what its load reads: the index, and the folders
    of the components it names and was not ``passed``; of those, the flashpack file and config
    of each component that has one, and of the others the weights from_pretrained reads
    (``variant``, safetensors before torch files). A component with no folder of its own
    reads the top of the repo, as diffusers does. In three passes: the index, the flashpack
    files, the rest. ``flashpack=False`` (a conversion) takes no flashpack file; ``files``, the
    repo's listing where the caller has it already."""
    name = os.fspath(name_or_path)
    if os.path.isdir(name) or not looks_like_repo_id(name):
        return resolve_directory(name, **hub)
    first = resolve_directory(name, allow_patterns=["model_index.json"], **hub)
    index_path = os.path.join(first, "model_index.json")
    if not os.path.isfile(index_path):
        return first  # no pipeline: the caller says so
    snapshot = os.path.basename(os.path.normpath(first))
    if hub.get("local_dir") is None and re.fullmatch(r"[0-9a-f]{40}", snapshot):
        hub["revision"] = snapshot  # the commit the first pass read, whatever the branch holds by now
    with open(index_path, encoding="utf-8") as f:
        index = json.load(f)
    if not isinstance(index, dict):
        raise ValueError(f"{index_path}: not a pipeline's model_index.json (a JSON {type(index).__name__}, "
                         "not an object)")
    components = sorted(key for key, value in index.items() if not key.startswith("_") and key not in passed
                        and isinstance(value, list) and len(value) == 2 and value[0] is not None)
    folders = [glob.escape(c) for c in components]
    converted = set()
    if flashpack and folders:
        second = resolve_directory(name, allow_patterns=[f"{c}/{FLASHPACK_FILE}" for c in folders], **hub)
        converted = {c for c in components if os.path.isfile(os.path.join(second, c, FLASHPACK_FILE))}
    ignored = list(OTHER_FRAMEWORKS) + [f"{glob.escape(c)}/{pattern}" for c in sorted(converted)
                                        for pattern in OTHER_WEIGHTS + (FLASHPACK_FILE,)]
    if not flashpack:
        ignored.append("*.flashpack")
    others = [c for c in components if c not in converted]
    allowed: Optional[List[str]] = ["model_index.json", "*.py"] + [f"{c}/*" for c in folders]
    if others:
        if files is None:
            files = repo_files(name, hub.get("revision"), hub.get("token"), hub.get("cache_dir"),
                               hub.get("local_files_only", False))
        if files is None:
            allowed = None  # no listing: a component at the top of the repo cannot be told apart
        else:
            read = list(others)
            if any(not any(f.startswith(f"{c}/") for f in files) for c in others):
                # A component without a folder: its files lie at the top of the repo.
                allowed += [glob.escape(f) for f in files if "/" not in f]
                read.append("")
            ignored += [glob.escape(f) for f in unread_weights(files, read, variant, use_safetensors)]
    return resolve_directory(name, allow_patterns=allowed, ignore_patterns=ignored, **hub)


def locate_flashpack(name_or_path: Union[str, "os.PathLike[str]"], subfolder: Optional[str] = None,
                     **hub: Any) -> str:
    """The ``model.flashpack`` of a local model directory or a Hub repo id (``hub``: resolve_directory's options)."""
    directory = resolve_model_directory(name_or_path, subfolder, **hub)
    name = os.fspath(name_or_path)
    if os.path.isdir(name) or os.path.isfile(os.path.join(directory, subfolder or "", FLASHPACK_FILE)):
        return flashpack_file_in(directory, subfolder)
    # The download left out the repo's other weights: convert from the repo itself.
    held = f"{subfolder}/{FLASHPACK_FILE}" if subfolder else FLASHPACK_FILE
    option = f" --subfolder {shlex.quote(subfolder)}" if subfolder else ""
    raise FileNotFoundError(f"the Hub repo '{name}' holds no {held}; convert it with "
                            f"`flashpack convert {name} DIRECTORY{option}` and load that directory")


def library_class(cls: type, root: type) -> type:
    """The class loaders know ``cls`` by, for configs (``architectures``, ``_class_name``,
    ``model_index.json``): the first class of its MRO that diffusers or transformers define
    below ``root`` (``ModelMixin``, ``PreTrainedModel``, ``DiffusionPipeline``). A subclass that
    only adds methods (``class FlashLlama(LlamaForCausalLM, FlashPackTransformersModelMixin)``)
    is known by the library class it extends; a class of the user's own, by its own name."""
    for base in cls.__mro__:
        if base is root:
            break
        if base.__module__.split(".")[0] in ("diffusers", "transformers") and issubclass(base, root):
            return base
    return cls


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside torch.compile's and (Distributed)DataParallel's wrappers, as
    save_pretrained saves it: its config, its class and its tensors' own names."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None and isinstance(model, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
            inner = model.module
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def checked_save_directory(save_directory: Union[str, "os.PathLike[str]"]) -> str:
    """``save_directory`` as a str, refusing an existing file."""
    save_directory = os.fspath(save_directory)
    if os.path.isfile(save_directory):
        raise NotADirectoryError(f"{save_directory} is a file; save_pretrained_flashpack needs a directory")
    return save_directory


def refuse_adapters(model: torch.nn.Module, what: str) -> None:
    """A model holding PEFT adapter layers (a PeftModel, or its base model reached through it)
    would be saved under the adapters' names (``q_proj.base_layer.weight``, ``lora_A...``),
    which no load of the model's class takes: refused before anything is written."""
    for name, module in model.named_modules():
        if type(module).__module__.split(".")[0] == "peft":
            where = f" ('{name}')" if name else ""
            raise ValueError(f"{what}: the model holds PEFT adapter layers{where}; merge them into it first "
                             "(model = model.merge_and_unload()) and save that, or save the adapter alone with its "
                             "save_pretrained()")


@contextlib.contextmanager
def configs_written_last(save_directory: str) -> Iterator[str]:
    """A folder in ``save_directory`` to write the config files into; once the block ends
    without error (the weights written) they are renamed into ``save_directory``. A save whose
    weights fail (a full disk) leaves the directory's config and weights as they were, never a
    new config beside the old weights, which would load as another model without a word."""
    staging = tempfile.mkdtemp(prefix=".flashpack-config-", dir=save_directory)
    try:
        yield staging
        for name in sorted(os.listdir(staging)):
            os.replace(os.path.join(staging, name), os.path.join(save_directory, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def written_whole(save_directory: str) -> Iterator[str]:
    """A folder in ``save_directory`` to write a whole save of several files into (a pipeline:
    each component's weights and config, then ``model_index.json``); once the block ends without
    error, its files are renamed into ``save_directory``, the top folder's last. A save that fails
    halfway (a full disk at the third component) leaves the directory as it was, never new
    components beside old ones, which would load as another pipeline without a word. The new
    files need room beside the old ones until then."""
    staging = tempfile.mkdtemp(prefix=".flashpack-save-", dir=save_directory)
    moved: List[Tuple[str, str]] = []  # (file beside its target, target)
    try:
        yield staging
        written = []
        for root, _, names in os.walk(staging):
            written += [os.path.relpath(os.path.join(root, name), staging) for name in names]
        # Weights before configs in each folder, the folders before the top one (model_index.json).
        written.sort(key=lambda path: (os.path.dirname(path) == "", path.endswith(".json"), path))
        # First each file beside the one it replaces, then the renames, which cannot fail
        # halfway: a component folder linked to another filesystem takes a copy (a rename
        # there is EXDEV), and what it is linked to is written, as a direct save writes it.
        for path in written:
            destination = os.path.join(save_directory, path)
            os.makedirs(os.path.dirname(destination), exist_ok=True)
            target = os.path.realpath(destination)
            beside = os.path.join(os.path.dirname(target),
                                  f".flashpack-{secrets.token_hex(4)}-{os.path.basename(target)}")
            source = os.path.join(staging, path)
            if os.path.isfile(target):
                shutil.copymode(target, source)  # a file replaced keeps its permissions
            try:
                os.replace(source, beside)
            except OSError as e:
                if e.errno != errno.EXDEV:
                    raise
                shutil.copy2(source, beside)
                fd = os.open(beside, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            moved.append((beside, target))
        folders = {os.path.dirname(target) for _, target in moved}
        for beside, target in moved:
            os.replace(beside, target)
        moved.clear()
        for folder in folders:
            fsync_directory(folder)
    finally:
        for beside, _ in moved:
            with contextlib.suppress(OSError):
                os.remove(beside)
        shutil.rmtree(staging, ignore_errors=True)


def fsync_directory(directory: str) -> None:
    """Make the renames into ``directory`` durable, where its filesystem can sync a directory."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno != errno.EINVAL:  # a filesystem without directory sync
            raise
    finally:
        os.close(fd)


def write_weights(model: torch.nn.Module, save_directory: str, *, target_dtype: Optional[torch.dtype],
                  align_bytes: int, num_workers: int, ignore_names: Any, ignore_prefixes: Any,
                  ignore_suffixes: Any, keep_float32: Optional[Callable[[str], bool]] = None,
                  checksum: bool = False) -> None:
    """The model's state dict, less the ignored names, as ``save_directory/model.flashpack``.

    ``target_dtype`` converts the floating-point tensors only, as ``model.to(dtype)`` and
    ``from_pretrained(dtype=...)`` do: integer buffers (a BatchNorm's ``num_batches_tracked``)
    keep their dtype, so the model loads the file back. Names ``keep_float32`` accepts become
    float32 instead.
    """
    state_dict = filter_state_dict(model.state_dict(), ignore_names, ignore_prefixes, ignore_suffixes)
    if not state_dict:
        # The reference's words first, for code that matches them.
        why = (f"the ignore options leave none of {type(model).__name__}'s tensors"
               if ignore_names or ignore_prefixes or ignore_suffixes else f"{type(model).__name__} has no tensors")
        raise ValueError(f"No tensors to pack. (save_pretrained_flashpack: {why} to write to "
                         f"{os.path.join(save_directory, FLASHPACK_FILE)})")
    if target_dtype is not None and keep_float32 is not None:
        # Two target dtypes: converted here, tensor by tensor (the writer converts to one); a
        # tied tensor is converted once, so the file still stores it once.
        converted: Dict[Tuple[int, torch.dtype], torch.Tensor] = {}
        for name, t in state_dict.items():
            if t.is_floating_point():
                dtype = torch.float32 if keep_float32(name) else target_dtype
                if (id(t), dtype) not in converted:
                    converted[id(t), dtype] = t.to(dtype)
                state_dict[name] = converted[id(t), dtype]
        target_dtype = None
    save_file(state_dict, os.path.join(save_directory, FLASHPACK_FILE), target_dtype=target_dtype,
              align_bytes=align_bytes, num_threads=num_workers, floating_only=True, checksum=checksum)


def warn_unused_save_kwargs(kwargs: Dict[str, Any], what: str) -> None:
    """save_pretrained_flashpack takes save_pretrained's other arguments (safe_serialization,
    max_shard_size...) so that calls switch over as they are, but says which had no effect: a
    misspelt target_dtype would otherwise save in the model's dtype without a word."""
    if kwargs:
        warn(f"{what}: {sorted(kwargs)} have no effect on a flashpack directory; ignoring them")


class AutoDeviceMap(NamedTuple):
    """``device_map="auto"`` (or "balanced", "balanced_low_0", "sequential") with several GPUs:
    a map accelerate infers once the model is built (see ``place_model``)."""

    strategy: str
    max_memory: Optional[Dict[Any, Any]]


def _device_of_map(device_map: Any, what: str, max_memory: Optional[Dict[Any, Any]]) -> Any:
    """What a ``device_map`` asks for: one device, a map over several (``{module: device}``),
    or an AutoDeviceMap to infer with the model."""
    if isinstance(device_map, dict):
        devices = set(device_map.values())
        if len(devices) > 1:
            _require_accelerate(what)
            DevicePlacement(device_map, what)  # checked now; the map goes on with its own values,
            return dict(device_map)  # which accelerate reads ("cpu" is offloaded, not run there)
        device_map = devices.pop() if devices else "cpu"
    if isinstance(device_map, str) and device_map in SPREADING_DEVICE_MAPS:
        if torch.cuda.is_available():
            # Planned as from_pretrained plans it, once the model is built: over the GPUs, and
            # onto the CPU for what does not fit (max_memory included).
            if torch.cuda.device_count() > 1 or max_memory is not None:
                _require_accelerate(what)
            if _has_accelerate():
                return AutoDeviceMap(device_map, max_memory)
            # One GPU and no accelerate to plan with: the whole model goes to it.
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    if isinstance(device_map, int):
        return torch.device("cuda", device_map)
    if device_map == "disk":
        raise ValueError(f"{what}: device_map='disk' (offloading) is not supported; pass device= instead")
    return _device(device_map, what, "device_map")


def _has_accelerate() -> bool:
    import importlib.util

    return importlib.util.find_spec("accelerate") is not None


def _require_accelerate(what: str) -> None:
    try:
        import accelerate  # noqa: F401
    except ImportError:
        raise ImportError(f"{what}: a device_map over several devices needs accelerate for the hooks that move "
                          "activations between them, as from_pretrained does (pip install accelerate)") from None


def place_model(model: torch.nn.Module, device: Any) -> Any:
    """The device, or the ``{module: device}`` map, that ``assign_from_file`` loads ``model``
    to: an AutoDeviceMap becomes the map from_pretrained would infer for the model (built on
    meta): transformers' own planner for its models, accelerate's for the others, with the
    model's ``_no_split_modules`` kept whole."""
    if not isinstance(device, AutoDeviceMap):
        return device
    plan = _plan(model, device)
    if "disk" in plan.values():
        raise ValueError(f"{type(model).__name__} does not fit in the memory of the GPUs and the CPU together "
                         f"(device_map={device.strategy!r}); offloading to disk is not supported")
    # A plan of one device is that device: no hooks, and a checkpoint of the model's base
    # loads into a model with a head as with device= (from_pretrained dispatches only plans
    # over several devices too).
    return _device(next(iter(plan.values()))) if len(set(plan.values())) == 1 else plan


def _plan(model: torch.nn.Module, device: AutoDeviceMap) -> Dict[str, Any]:
    try:
        from transformers import PreTrainedModel
        from transformers.integrations.accelerate import _get_device_map
    except ImportError:  # not installed, or a release that plans elsewhere: accelerate's plan
        _get_device_map = None
    if _get_device_map is not None and isinstance(model, PreTrainedModel):
        try:
            return _get_device_map(model, device.strategy, device.max_memory, None)
        except TypeError:  # another signature in another release: accelerate's plan below
            pass
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory, get_max_memory

    no_split = list(getattr(model, "_no_split_modules", None) or [])
    if device.strategy == "sequential":
        max_memory = get_max_memory(device.max_memory)
    else:
        max_memory = get_balanced_memory(model, max_memory=device.max_memory, no_split_module_classes=no_split,
                                         low_zero=device.strategy == "balanced_low_0")
    return infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)


def with_unplaced_params(model: torch.nn.Module, device: Any) -> Any:
    """The map to load with: ``device``, plus the CPU for each tensor of the state dict that
    the map leaves without a place, when the model has transformers' ``_no_placement_params``.
    Its planner may leave those parameters out on purpose (the names are relative to a layer
    it cannot split), and from_pretrained then puts whatever the map does not place on the
    CPU (``expand_device_map``) instead of refusing the map."""
    if not isinstance(device, dict) or not getattr(model, "_no_placement_params", None):
        return device
    placement = DevicePlacement(device, f"{type(model).__name__}.from_pretrained_flashpack")
    extra = {name: "cpu" for name in model.state_dict() if placement(name) is None}
    return {**device, **extra} if extra else device


def dispatch_placed(model: torch.nn.Module, device: Any) -> None:
    """Adds accelerate's hooks to a model loaded over several devices, as from_pretrained does
    for such a device_map: each module's inputs are moved to its device."""
    if not isinstance(device, dict) or len(set(device.values())) < 2:
        return
    import contextlib
    import inspect

    from accelerate import dispatch_model

    kwargs: Dict[str, Any] = {}
    skip = getattr(model, "_skip_keys_device_placement", None)
    if skip is not None and "skip_keys" in inspect.signature(dispatch_model).parameters:
        kwargs["skip_keys"] = skip
    unchecked = contextlib.nullcontext()
    if getattr(model, "_no_placement_params", None):
        # As from_pretrained: the map may leave those parameters out; accelerate would refuse it.
        from transformers.integrations.accelerate import skip_device_map_check

        unchecked = skip_device_map_check()
    with unchecked:
        dispatch_model(model, device_map=device, **kwargs)


def take_load_kwargs(kwargs: Dict[str, Any], device: Any, what: str) -> Tuple[Any, Dict[str, Any]]:
    """Takes from_pretrained's loading arguments out of ``kwargs`` (what remains goes to the config
    and the model's constructor): drops those that change nothing, refuses those it cannot honour,
    turns ``device_map`` into a device, a ``{module: device}`` map over several devices, or an
    AutoDeviceMap (``place_model`` resolves it). Returns that and the distributed-loading options.

    Raises:
        ValueError: an argument that would change what is loaded, or a device_map that
            contradicts ``device`` or offloads to disk.
        ImportError: a device_map over several devices without accelerate installed.
    """
    for name in IGNORED_LOAD_KWARGS:
        kwargs.pop(name, None)
    for name, default in UNSUPPORTED_LOAD_KWARGS.items():
        value = kwargs.pop(name, default)
        if value is not default and value != default:
            raise ValueError(f"{what}: {name}={value!r} is not supported: a flashpack file is loaded as it was saved "
                             f"(load with from_pretrained for {name})")
    device_map = kwargs.pop("device_map", None)
    max_memory = kwargs.pop("max_memory", None)
    if device_map is not None:
        mapped = _device_of_map(device_map, what, max_memory)
        if device is not None and (not isinstance(mapped, torch.device) or _device(device) != mapped):
            raise ValueError(f"{what}: device={device!r} and device_map={device_map!r} disagree; pass one of them")
        device = mapped
    distributed = {name: kwargs.pop(name) for name in DISTRIBUTED_LOAD_KWARGS if name in kwargs}
    return device, distributed


def first_names(index: Sequence[Dict[str, Any]]) -> Dict[str, str]:
    """Each name of a flashpack index with the first name whose bytes it repeats (same block,
    offset and length: a tied tensor's second names), or itself."""
    firsts: Dict[Tuple[int, int, int], str] = {}
    return {entry["name"]: firsts.setdefault((entry.get("macroblock", 0), entry["offset"], entry["length"]),
                                              entry["name"]) if entry["length"] else entry["name"]
            for entry in index}


def tied_second_names(index: Sequence[Dict[str, Any]]) -> set:
    """The names of a flashpack index that repeat an earlier entry's bytes: the second names
    of a tied tensor."""
    return {name for name, first in first_names(index).items() if first != name}


def aliases(named: Iterable[Tuple[str, torch.Tensor]]) -> Dict[int, List[str]]:
    """The names of each tensor of ``named`` (``named_parameters(remove_duplicate=False)``,
    ``state_dict(keep_vars=True).items()``), by the tensor's id: a tied tensor has several."""
    names: Dict[int, List[str]] = {}
    for name, tensor in named:
        names.setdefault(id(tensor), []).append(name)
    return names


Mismatch = Tuple[str, torch.Size, torch.Size]


def mismatched_entries(model: torch.nn.Module, index: Sequence[Dict[str, Any]]) -> List[Mismatch]:
    """The entries of a flashpack index that ``model`` holds in another shape, as
    from_pretrained lists them (``mismatched_keys``): (name, shape in the file, shape in the
    model). A second name of a tensor the model ties too (lm_head.weight beside the
    embedding) is reported once, under its first."""
    tensors = model.state_dict(keep_vars=True)
    firsts = first_names(index)
    mismatched = []
    for entry in index:
        name, shape = entry["name"], torch.Size(entry["shape"])
        if name not in tensors or shape == tensors[name].shape:
            continue
        if firsts[name] != name and tensors.get(firsts[name]) is tensors[name]:
            continue  # reported under its first name
        mismatched.append((name, shape, tensors[name].shape))
    return mismatched


def tied_names(model: torch.nn.Module, names: Sequence[str]) -> List[str]:
    """``names`` and every other name of ``model`` under which the same tensor is held."""
    tensors = model.state_dict(keep_vars=True)
    by_tensor = aliases(tensors.items())
    every = dict.fromkeys(names)
    for name in names:
        if name in tensors:
            every.update(dict.fromkeys(by_tensor[id(tensors[name])]))
    return list(every)


def initialise_left_out(model: torch.nn.Module, path: str, what: str, zero_filled: List[str],
                        mismatched: Sequence[Mismatch], init: Callable[[torch.nn.Module], None], how: str) -> None:
    """Initialises with ``init`` the tensors a load zero-filled (the file lacks them, or holds
    them in another shape under ``ignore_mismatched_sizes``), and says which in warnings."""
    reshaped = {name for name, _, _ in mismatched}
    if zero_filled:
        left_zero = initialize_missing(model, zero_filled, init)
        missing = [name for name in zero_filled if name not in reshaped]
        if missing:
            warn(f"{what}: {describe_missing(missing, left_zero, how)} (not in {path})")
    if mismatched:
        said = ", ".join(f"{name} ({tuple(file_shape)} in the file, {tuple(model_shape)} in the model)"
                         for name, file_shape, model_shape in mismatched[:20])
        more = f" and {len(mismatched) - 20} more" if len(mismatched) > 20 else ""
        warn(f"{what}: {len(mismatched)} tensors of another shape in {path} initialised as from_pretrained("
             f"ignore_mismatched_sizes=True) initialises them: {said}{more}")


def dropped_on_load(model: torch.nn.Module, names: Iterable[str]) -> List[str]:
    """The ``names`` the model does not have that its class expects to find in a checkpoint and
    drop (``_keys_to_ignore_on_load_unexpected``: T5EncoderModel's decoder, an older Wan
    checkpoint's ``norm_added_q``), as from_pretrained drops them without a word."""
    patterns = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []]
    if not patterns:
        return []
    in_model = set(model.state_dict())
    return [name for name in names if name not in in_model and any(p.search(name) for p in patterns)]


def loading_info(model: torch.nn.Module, path: str, missing: Optional[List[str]] = None,
                 mismatched: Sequence[Mismatch] = ()) -> Dict[str, Any]:
    """What ``from_pretrained(..., output_loading_info=True)`` returns beside the model.

    ``model`` is the module the file's names were matched against; ``missing``, when the
    caller knows them, the tensors the load initialised because the file lacks them, named
    as in the returned model (a head added to a base checkpoint; not a weight tied to one
    the file holds). Otherwise they are the model's names the file does not hold."""
    index = read_metadata(path)["index"]
    in_file = {entry["name"] for entry in index}
    in_model = set(model.state_dict())
    reshaped = {name for name, _, _ in mismatched}
    missing = sorted(in_model - in_file) if missing is None else sorted(set(missing) - reshaped)
    # A tied tensor's second names (lm_head.weight beside the embedding) are not reported:
    # save_pretrained does not write them, so from_pretrained never finds them unexpected.
    return {"missing_keys": missing, "unexpected_keys": sorted(in_file - in_model - tied_second_names(index)),
            "mismatched_keys": list(mismatched), "error_msgs": []}


def parse_dtype(dtype: Any, argument: Optional[str] = None) -> Optional[torch.dtype]:
    """``torch.bfloat16``, ``"bfloat16"``, ``"torch.bfloat16"`` or ``"bf16"`` to a dtype; None and "auto" to None.
    ``argument`` (``"from_pretrained_flashpack: torch_dtype"``) begins the error, where the
    caller adds no context of its own."""
    prefix = f"{argument}: " if argument else ""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if not isinstance(dtype, str):
        raise TypeError(f"{argument or 'dtype'} must be a torch.dtype or a string, got {type(dtype).__name__}")
    name = dtype.removeprefix("torch.")
    if name == "auto":
        return None
    name = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32",
            "fp64": "float64", "double": "float64"}.get(name, name)
    result = getattr(torch, name, None)
    if not isinstance(result, torch.dtype):
        raise ValueError(f"{prefix}unknown dtype '{dtype}' (torch.bfloat16, \"bfloat16\" or \"bf16\", say)")
    return result


def file_floating_dtype(path: str) -> Optional[torch.dtype]:
    """The floating-point dtype holding most of the file's bytes (what ``dtype="auto"`` loads as)."""
    meta = read_metadata(path)
    # By "format", as the reader takes the file: a flashpack_v3 footer is one block of its
    # "target_dtype" whatever other keys (another writer's "macroblocks") it holds.
    blocks = [(elements * getattr(torch, name).itemsize, name) for name, elements in _footer_blocks(meta)]
    for _, name in sorted(blocks, reverse=True):
        dtype = getattr(torch, name)
        if dtype.is_floating_point and dtype.itemsize >= 2:
            return dtype
    return None


def build_and_load_dtypes(path: str, dtype: Any, torch_dtype: Any,
                          what: str = "from_pretrained_flashpack") -> Tuple[Optional[torch.dtype], Optional[torch.dtype]]:
    """(dtype to build the model under, dtype to convert the file's floats to, None for none).
    ``torch_dtype`` is the older name of ``dtype``: given both, they must agree."""
    if dtype is not None and torch_dtype is not None and \
            parse_dtype(dtype, f"{what}: dtype") != parse_dtype(torch_dtype, f"{what}: torch_dtype"):
        raise ValueError(f"{what}: dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree; pass one of them")
    requested = parse_dtype(dtype if dtype is not None else torch_dtype,
                            f"{what}: {'dtype' if dtype is not None else 'torch_dtype'}")
    return (requested or file_floating_dtype(path)), requested


def upload_directory(save_directory: str, repo_id: Optional[str], private: Optional[bool], token: Optional[str],
                     commit_message: Optional[str], create_pr: bool) -> None:
    """Create the Hub repo if needed (named after the directory by default) and upload the directory.

    Raises:
        HubUnavailableError: the Hub cannot be reached (offline mode, no network); the
            directory stays saved. The Hub's own errors (a missing token, no rights) pass on.
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    name = repo_id or os.path.basename(os.path.abspath(save_directory))
    if not looks_like_repo_id(name):
        raise ValueError(f"cannot upload {save_directory} to the Hugging Face Hub: '{name}' (from the directory's "
                         "name) is not a repo id; it is saved: pass repo_id=\"org/name\" to upload it")
    commit_message = commit_message or "Upload flashpack"
    try:
        repo_id = api.create_repo(name, exist_ok=True, private=private).repo_id
        # The staging folders of a save killed before it ended are not part of the model.
        api.upload_folder(folder_path=save_directory, repo_id=repo_id, commit_message=commit_message,
                          create_pr=create_pr, ignore_patterns=[".flashpack-*", "*/.flashpack-*"])
    except Exception as error:
        # huggingface_hub raises ConnectionError in offline mode, and its HTTP client's own
        # transport errors (httpx, requests, urllib3) when the network is down; an HTTP status
        # (no token, no rights) is the Hub's answer and passes on.
        unreachable = {"TransportError", "ConnectionError", "Timeout", "NewConnectionError", "MaxRetryError"}
        if not isinstance(error, (ConnectionError, TimeoutError)) and \
                not any(cls.__name__ in unreachable for cls in type(error).__mro__):
            raise
        command = ["hf", "upload", name, save_directory, ".", "--private" if private else None,
                   "--create-pr" if create_pr else None, "--commit-message", commit_message]
        raise HubUnavailableError(f"cannot upload {save_directory} to the Hugging Face Hub as '{name}' ({error}); "
                                  f"it is saved: upload it later with `{shlex.join(c for c in command if c)}`") from error
