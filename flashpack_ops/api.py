"""The reference ``flashpack`` package's API, on top of the flashpack_ops operators."""

from __future__ import annotations

import contextlib
import math
import os
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple, TypeVar, Union

import torch

from ._warnings import warn
from .distributed import SHARD_STRATEGIES, load_blocks_distributed, load_file_distributed, maybe_init_distributed
from .ops import (_SAME_WIDTH_INT, DEFAULT_ALIGN_BYTES, DeviceLike, PathLike, _check_arguments, _device, _dtype,
                  _identity, _is_dtensor, _path, load_file, read_metadata, save_file)

_READ_ATTEMPTS = 3

T = TypeVar("T")


def _read_unchanged(path: str, read: Callable[[], T]) -> T:
    """``read()``, run again while the file at ``path`` was replaced (a save renames a new file
    over it) or modified during it: for reads that open the path more than once (the footer,
    then the tensors; one load per device), which must all see one file."""
    for _ in range(_READ_ATTEMPTS):
        before = _identity(path)
        result = read()
        if _identity(path) == before:
            return result
    raise RuntimeError(f"'{path}' was replaced or modified while being read, {_READ_ATTEMPTS} times in a row; "
                       "load it once it is no longer being written")


class Prefetch:
    """``load_file(path, device, copy=copy)`` on a thread of its own, started before the model
    it fills is built: the file streams in while the model's ``__init__`` runs (the op lets go
    of the GIL). Handed to ``assign_from_file(..., _prefetched=)``, which takes its tensors
    where it would have loaded the same ones itself, and lets them go otherwise.

    The thread loads on the caller's current CUDA device and stream, as a load on the calling
    thread would (each thread has its own), so the tensors are ready on that stream.
    """

    def __init__(self, path: PathLike, device: torch.device, copy: bool):
        device = self._indexed(device)
        self.path, self.device, self.copy = path, device, copy
        stream = torch.cuda.current_stream(device) if device.type == "cuda" else None

        def load() -> Dict[str, torch.Tensor]:
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                return load_file(path, device, copy=copy)

        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flashpack-prefetch")
        self._future: Optional[Future] = executor.submit(load)
        executor.shutdown(wait=False)  # the thread ends with its one load

    @staticmethod
    def _indexed(device: torch.device) -> torch.device:
        # "cuda" is the current GPU of the thread that asks: the caller's, not the loading thread's.
        return torch.device("cuda", torch.cuda.current_device()) if device.type == "cuda" and device.index is None \
            else device

    def matches(self, path: PathLike, device: torch.device, copy: bool) -> bool:
        return (os.fspath(path), self._indexed(device), copy) == (os.fspath(self.path), self.device, self.copy)

    def result(self) -> Dict[str, torch.Tensor]:
        """The loaded tensors (waits for them), or the load's error; once."""
        future, self._future = self._future, None
        return future.result()

    def drop(self) -> None:
        """Waits for the load, if it has not been taken, and lets its tensors (or its error) go:
        its memory is free again before another load of the file starts."""
        future, self._future = self._future, None
        if future is not None:
            future.exception()


@contextlib.contextmanager
def prefetching(path: PathLike, device: Any, copy: bool, whole_file: bool) -> Iterator[Optional[Prefetch]]:
    """A Prefetch of the file to ``device`` (None: the CPU) for the block, where the load will
    be of the whole file (``whole_file``) and does work worth overlapping: a copy to a GPU, or
    into fresh CPU memory (a CPU load otherwise maps the file in a millisecond); else None, a
    device map or an unknown device included (the load itself then says why). On leaving the
    block, a load not taken is waited for and let go."""
    prefetched = None
    if whole_file and not isinstance(device, Mapping):
        try:
            target = _device(device, "")
        except (TypeError, ValueError, RuntimeError):
            target = None
        if target is not None and ((target.type == "cuda" and torch.cuda.is_available()
                                    and (target.index or 0) < torch.cuda.device_count())
                                   or (target.type == "cpu" and copy)):
            prefetched = Prefetch(path, target, copy)
    try:
        yield prefetched
    finally:
        if prefetched is not None:
            prefetched.drop()


def _ignores_no_bytes(index: List[Dict[str, Any]], ignored: Callable[[str], bool]) -> bool:
    """Whether every entry ``ignored`` leaves out repeats the bytes of an entry it keeps (a tied
    tensor's second name) or has none: the whole file's tensors then take no more memory than
    the kept ones."""
    def where(entry):
        return entry.get("macroblock", 0), entry["offset"], entry["length"]

    kept = {where(entry) for entry in index if not ignored(entry["name"])}
    return all(entry["length"] == 0 or where(entry) in kept for entry in index if ignored(entry["name"]))


def _is_ignored(name: str, names=None, prefixes=None, suffixes=None) -> bool:
    # One name given as a str is one name, not its characters ("head." would match "emb.").
    names, prefixes, suffixes = ((v,) if isinstance(v, str) else v for v in (names, prefixes, suffixes))
    return bool(
        (names and name in names)
        or (prefixes and any(name.startswith(p) for p in prefixes))
        or (suffixes and any(name.endswith(s) for s in suffixes))
    )


def filter_state_dict(
    state_dict: Dict[str, torch.Tensor],
    ignore_names: Optional[List[str]] = None,
    ignore_prefixes: Optional[List[str]] = None,
    ignore_suffixes: Optional[List[str]] = None,
) -> Dict[str, torch.Tensor]:
    """``state_dict`` without the names given, the names starting or ending as given."""
    if not (ignore_names or ignore_prefixes or ignore_suffixes):
        return state_dict
    return {name: t for name, t in state_dict.items()
            if not _is_ignored(name, ignore_names, ignore_prefixes, ignore_suffixes)}


def pack_to_file(
    state_dict_or_model: Union[Dict[str, torch.Tensor], torch.nn.Module],
    destination_path: PathLike,
    target_dtype: Optional[torch.dtype] = None,
    name_order: Optional[List[str]] = None,
    align_bytes: int = DEFAULT_ALIGN_BYTES,
    silent: bool = True,
    num_workers: int = 0,
    checksum: bool = False,
    *,
    floating_only: bool = False,
) -> None:
    """Pack a state dict, or a module's state dict, into a flashpack file (the reference's function).

    Args:
        state_dict_or_model: the tensors, or an ``nn.Module`` whose ``state_dict()`` is saved.
        destination_path: the file to write (atomically).
        target_dtype: if given, every tensor is converted to it (as the reference does),
            except that a complex tensor is never converted to a real dtype (ValueError).
        name_order: if given, only these names, in this order; else the dict's order.
        align_bytes: alignment of each tensor within its block.
        silent: unused, kept for compatibility.
        num_workers: writer threads, 0 for the default.
        checksum: store checksums for ``verify_file`` (see ``save_file``).
        floating_only: ``target_dtype`` converts floating-point tensors only (see ``save_file``).

    Raises:
        ValueError: nothing to pack, or a tensor that cannot be stored.
        TypeError: ``state_dict_or_model`` is neither a mapping nor an ``nn.Module``; else
            as ``save_file``.
        RuntimeError: as ``save_file``.

    Example:
        >>> pack_to_file(model, "model.flashpack", torch.bfloat16)
    """
    if isinstance(state_dict_or_model, torch.nn.Module):
        state_dict = state_dict_or_model.state_dict()
    elif isinstance(state_dict_or_model, Mapping):
        state_dict = state_dict_or_model
    else:
        raise TypeError(f"pack_to_file: cannot save {os.fspath(destination_path)}: expected a state dict or an "
                        f"nn.Module, got {type(state_dict_or_model).__name__}")
    if name_order is not None:
        state_dict = {name: state_dict[name] for name in name_order if name in state_dict}
    if not state_dict:
        # The reference's words first, for code that matches them.
        raise ValueError(f"No tensors to pack. (pack_to_file: nothing to write to {os.fspath(destination_path)}"
                         + (": name_order names none of the state dict's tensors)" if name_order is not None else ")"))
    # As the reference does (save_file, like torch.save, does not).
    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(destination_path))), exist_ok=True)
    save_file(state_dict, destination_path, target_dtype=target_dtype, align_bytes=align_bytes,
              num_threads=num_workers, checksum=checksum, floating_only=floating_only)


def get_flashpack_file_metadata(path: PathLike) -> Dict[str, Any]:
    """The footer of a flashpack file (format, blocks, index), validated; ``read_metadata``.

    Args:
        path: a flashpack file (either format).

    Returns:
        Dict[str, Any]: the footer, as ``read_metadata`` returns it.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: it is not a valid flashpack file.
        RuntimeError: it could not be read.

    Example:
        >>> get_flashpack_file_metadata("model.flashpack")["format"]
        'flashpack_v4'
    """
    return read_metadata(path)


def is_flashpack_file(path: PathLike) -> bool:
    """Whether ``path`` is a readable, valid flashpack file.

    Args:
        path: any path (or value: what is not a path is no flashpack file).

    Returns:
        bool: True if its footer reads and validates; never raises for a bad file.

    Example:
        >>> is_flashpack_file("model.flashpack"), is_flashpack_file("model.safetensors")
        (True, False)
    """
    try:
        read_metadata(path)
        return True
    except (OSError, ValueError, RuntimeError, TypeError):  # TypeError: None, a number: not a file either
        return False


def revert_from_file(path: PathLike, silent: bool = True) -> Dict[str, torch.Tensor]:
    """Read a flashpack file into ordinary CPU tensors, not backed by the file.

    The names of a tensor the file stores once (tied weights) get copies of their own,
    which ``safetensors.torch.save_file`` takes (the reference gives them one memory).

    Args:
        path: a flashpack file (either format).
        silent: unused, kept for compatibility.

    Returns:
        Dict[str, torch.Tensor]: every entry, in the file's order.

    Raises:
        FileNotFoundError, ValueError, RuntimeError: as ``load_file``.

    Example:
        >>> safetensors.torch.save_file(revert_from_file("model.flashpack"), "model.safetensors")
    """
    from .lazy import _copy

    tensors = load_file(path, "cpu", copy=True)
    seen = set()
    for name, tensor in tensors.items():
        where = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if where in seen and tensor.numel():
            tensors[name] = _copy(tensor, ..., tensor.device)
        seen.add(where)
    return tensors


@dataclass
class FlashTensorStorage:
    """The blocks of a flashpack file: one 1-D tensor per block (macroblock), of the
    block's dtype, as the reference's ``read_flashpack_file`` returns them.

    ``iterate_from_flash_tensor`` turns them and the file's metadata into named tensors.

    Args:
        blocks: one 1-D tensor per block, in the file's block order.
        backing_arrays: the reference's field for its numpy memory maps; always None here.

    Example:
        >>> storage, meta = read_flashpack_file("model.flashpack")
        >>> len(storage), storage.block(0).dtype, storage.device
    """

    blocks: List[torch.Tensor]
    backing_arrays: Optional[list] = None

    def block(self, idx: int) -> torch.Tensor:
        """The 1-D tensor of block ``idx`` (IndexError past the last)."""
        return self.blocks[idx]

    def __len__(self) -> int:
        return len(self.blocks)

    @property
    def device(self) -> torch.device:
        """The blocks' device; the CPU when there are none."""
        return self.blocks[0].device if self.blocks else torch.device("cpu")


def _with_macroblocks(meta: Dict[str, Any]) -> Dict[str, Any]:
    # As the reference returns it: every index entry names its block, 0 in a flashpack_v3 file.
    for record in meta["index"]:
        record.setdefault("macroblock", 0)
    return meta


def _as_given(metadata: Optional[Dict[str, Any]], footer: Dict[str, Any], path: str) -> Dict[str, Any]:
    """The footer to return: the file's own, or, where the caller passes metadata (the
    reference then returns it as given, so that a filtered index iterates only its names),
    the file's entries for the names its index lists, in its order. Each must describe the
    entry as the file's footer does: other offsets or shapes would read other bytes."""
    if not metadata:  # as the reference takes it: an empty dict is none
        return footer
    entries = {record["name"]: record for record in footer["index"]}
    chosen = []
    for record in metadata.get("index") or []:
        name = record.get("name") if isinstance(record, dict) else None
        own = entries.get(name)
        if own is None:
            raise ValueError(f"'{path}': the metadata passed lists {name!r}, which the file does not hold")
        differing = [key for key in ("shape", "offset", "length", "dtype", "macroblock")
                     if key in record and key in own and _list_or_value(record[key]) != _list_or_value(own[key])]
        if differing:
            raise ValueError(f"'{path}': the metadata passed gives '{name}' another {', '.join(differing)} than the "
                             "file's footer; pass the metadata read from this file")
        chosen.append(own)
    return dict(footer, index=chosen)


def _list_or_value(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def read_flashpack_file(
    path: PathLike,
    device: DeviceLike = "cpu",
    chunk_bytes: int = 0,
    num_streams: int = 0,
    silent: bool = True,
    metadata: Optional[Dict[str, Any]] = None,
    *,
    copy: bool = False,
) -> Tuple[FlashTensorStorage, Dict[str, Any]]:
    """Read a flashpack file's blocks, with the reference's arguments and results.

    On the CPU the blocks map the file (nothing is copied); on CUDA they are streamed to
    the GPU as ``load_file`` does (``torch.ops.flashpack.load_blocks``).

    Args:
        path: a flashpack file.
        device: where the blocks go.
        chunk_bytes, num_streams: CUDA tuning, as for ``load_file``; 0 picks the default.
        silent: unused, kept for compatibility.
        metadata: a footer read before (``get_flashpack_file_metadata``), perhaps with
            fewer index entries: the result's index lists those (as the reference returns
            what it is given), each checked against the file's own footer.
        copy: on the CPU, blocks in memory of their own rather than mappings of the file
            (as ``load_file``'s ``copy``).

    Returns:
        Tuple[FlashTensorStorage, Dict[str, Any]]: the blocks, and the footer (every index
        entry with its ``macroblock``, as the reference gives it).

    Raises:
        FileNotFoundError, ValueError, RuntimeError: as ``load_file``.
        TypeError: ``chunk_bytes``, ``num_streams`` or ``copy`` of the wrong type.

    Example:
        >>> storage, meta = read_flashpack_file("model.flashpack", "cuda")
        >>> state_dict = dict(iterate_from_flash_tensor(storage, meta))
    """
    path = _path(path, must_exist=True)
    _check_arguments(f"cannot load '{path}'", ints={"chunk_bytes": chunk_bytes, "num_streams": num_streams},
                     bools={"copy": copy})
    # The blocks and the footer are read by two calls: a save that replaces the file between
    # them would pair one file's index with the other's bytes, so both must see one file.
    footer, blocks = _read_unchanged(path, lambda: (
        read_metadata(path),
        torch.ops.flashpack.load_blocks(path, _device(device, f"cannot load '{path}'"), copy=copy,
                                        chunk_bytes=chunk_bytes, num_streams=num_streams)))
    return FlashTensorStorage(list(blocks)), _as_given(metadata, _with_macroblocks(footer), path)


def _check_shard_strategy(strategy: Optional[str], argument: str) -> None:
    """A sharded read's strategy, checked as the reference checks it (any case, spaces around);
    both give the same blocks. Not read, so not checked, when the read is not sharded."""
    if strategy is not None and (not isinstance(strategy, str) or strategy.strip().lower() not in SHARD_STRATEGIES):
        raise ValueError(f"unknown {argument} {strategy!r}; expected one of {', '.join(SHARD_STRATEGIES)}")


def read_flashpack_file_distributed(
    path: PathLike,
    device: DeviceLike = "cuda",
    src: int = 0,
    chunk_bytes: int = 0,
    num_streams: int = 0,
    silent: bool = True,
    metadata: Optional[Dict[str, Any]] = None,
    sharded: bool = False,
    shard_strategy: Optional[str] = None,
) -> Tuple[FlashTensorStorage, Dict[str, Any]]:
    """``read_flashpack_file`` on every rank of the default process group.

    Rank ``src`` reads the file and broadcasts it; with ``sharded=True`` every rank reads
    its share and the ranks all-gather (see ``load_file_distributed``). Other ranks need
    not see the file unless ``sharded``.

    Args:
        path: the flashpack file (only rank ``src`` reads it unless ``sharded``).
        device: where the blocks go on this rank.
        src: the rank that reads and broadcasts, without ``sharded``.
        sharded: every rank reads its share of each block and the ranks all-gather.
        shard_strategy: the reference's ``"contiguous"`` or ``"windows"``; both give the
            same blocks.
        chunk_bytes, num_streams, silent: accepted for compatibility.
        metadata: as for ``read_flashpack_file`` (the footer comes from the file, on rank
            ``src``; what a rank passes chooses the entries it returns).

    Returns:
        Tuple[FlashTensorStorage, Dict[str, Any]]: the same blocks and footer on every rank.

    Raises:
        RuntimeError: no process group is initialized, or the load failed on another rank.
        ValueError: the file is invalid, or the arguments are.

    Example:
        >>> storage, meta = read_flashpack_file_distributed("model.flashpack", "cuda", sharded=True)
    """
    # Checked where a refusal fails every rank, not only this one (the others would wait).
    blocks, footer = load_blocks_distributed(
        path, device, src=src, sharded=sharded,
        _check=(lambda: _check_shard_strategy(shard_strategy, "shard_strategy")) if sharded else None)
    return FlashTensorStorage(blocks), _as_given(metadata, _with_macroblocks(footer), os.fspath(path))


def iterate_from_flash_tensor(
    flash_tensor: Union[FlashTensorStorage, torch.Tensor],
    metadata: Dict[str, Any],
    ignore_names: Optional[List[str]] = None,
    ignore_prefixes: Optional[List[str]] = None,
    ignore_suffixes: Optional[List[str]] = None,
) -> Iterator[Tuple[str, torch.Tensor]]:
    """The named tensors of a file, as views into its blocks, in index order.

    Args:
        flash_tensor: the blocks from ``read_flashpack_file``, or a single block tensor.
        metadata: the file's footer (as returned with the blocks).
        ignore_names, ignore_prefixes, ignore_suffixes: names to skip.

    Yields:
        Tuple[str, torch.Tensor]: each name and its tensor, with the shape it was saved
        with (0-d tensors stay 0-d).

    Raises:
        ValueError: an index entry does not fit the blocks given.

    Example:
        >>> storage, meta = read_flashpack_file("model.flashpack")
        >>> state_dict = dict(iterate_from_flash_tensor(storage, meta, ignore_prefixes=["lm_head."]))
    """
    storage = flash_tensor if isinstance(flash_tensor, FlashTensorStorage) else FlashTensorStorage([flash_tensor])
    for record in metadata["index"]:
        name = record["name"]
        if _is_ignored(name, ignore_names, ignore_prefixes, ignore_suffixes):
            continue
        index = int(record.get("macroblock", 0))
        offset, length, shape = int(record["offset"]), int(record["length"]), tuple(record["shape"])
        if not 0 <= index < len(storage):
            raise ValueError(f"index entry '{name}' is in macroblock {index}, but there are {len(storage)} blocks")
        block = storage.block(index)
        if offset < 0 or length < 0 or offset + length > block.numel() or math.prod(shape) != length:
            raise ValueError(f"index entry '{name}' (offset {offset}, length {length}, shape {list(shape)}) does not "
                             f"fit macroblock {index} of {block.numel()} elements")
        yield name, block.narrow(0, offset, length).view(shape)


def _default_device(model: torch.nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if not isinstance(device, torch.device):
        device = next((t.device for t in model.parameters()), torch.device("cpu"))
    # A model built on the meta device has nowhere real to go but the CPU.
    return torch.device("cpu") if device.type == "meta" else device


class _Slot:
    """One tensor of the model and every name it is reachable by (tied weights share a slot)."""

    __slots__ = ("names", "old", "is_param", "persistent", "source", "value")

    def __init__(self, name: str, old: torch.Tensor, is_param: bool, persistent: bool):
        self.names = [name]
        self.old = old
        self.is_param = is_param
        self.persistent = persistent  # in state_dict(); a non-persistent buffer is never missing
        self.source: Optional[str] = None  # the file entry that fills it
        self.value: Optional[torch.Tensor] = None


def _model_slots(model: torch.nn.Module) -> Dict[str, _Slot]:
    """Every parameter and buffer name of ``model`` mapped to its slot; aliases share one."""
    by_name: Dict[str, _Slot] = {}
    by_id: Dict[int, _Slot] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        prefix = module_name + "." if module_name else ""
        entries = [(n, t, True, True) for n, t in module._parameters.items()]
        entries += [(n, t, False, n not in module._non_persistent_buffers_set) for n, t in module._buffers.items()]
        for attr, tensor, is_param, persistent in entries:
            if tensor is None:
                continue
            name = prefix + attr
            slot = by_id.get(id(tensor))
            if slot is None:
                slot = by_id[id(tensor)] = _Slot(name, tensor, is_param, persistent)
            else:
                slot.names.append(name)
                slot.persistent = slot.persistent or persistent
            by_name[name] = slot
    # Activation checkpointing (torch.distributed's checkpoint_wrapper) puts each wrapped module
    # under _checkpoint_wrapped_module, and its state dict leaves that part out of the names:
    # the file's names reach the same slots. slot.names keeps the model's own names, by which
    # the tensors are set.
    for name, slot in list(by_name.items()):
        alias = name.replace(_CHECKPOINT_WRAPPED, "")
        if alias != name:
            by_name.setdefault(alias, slot)
    return by_name


_CHECKPOINT_WRAPPED = "_checkpoint_wrapped_module."


def _extra_states(model: torch.nn.Module) -> Dict[str, torch.nn.Module]:
    """``{prefix}_extra_state`` for each module with extra state of its own (it overrides
    ``set_extra_state``): what its ``get_extra_state`` puts in a state dict, a tensor to hand
    back to ``set_extra_state``, as load_state_dict hands it."""
    return {f"{name}.{_EXTRA_STATE}" if name else _EXTRA_STATE: module
            for name, module in model.named_modules()
            if type(module).set_extra_state is not torch.nn.Module.set_extra_state}


_EXTRA_STATE = "_extra_state"


def _set_tensor(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    module_path, _, attr = name.rpartition(".")
    setattr(model.get_submodule(module_path), attr, value)


def initialize_missing(model: torch.nn.Module, names: List[str],
                       init: Callable[[torch.nn.Module], Any]) -> List[str]:
    """Initialise tensors a file lacked (just zero-filled, on their device) as building the
    model would have: ``init(module)`` (``reset_parameters``, or transformers'
    ``_init_weights``) on each module that holds one and on each module above it, deepest
    first, as construction runs them (a parent's init may set its children's tensors:
    ``MultiheadAttention`` zeroes ``out_proj.bias``, a CLIP attention scales its ``q_proj``).
    Such inits set every tensor in reach in place, so meanwhile every other parameter and
    buffer of the model is swapped for a meta stand-in: no loaded weight is touched;
    submodules an init replaces are put back. ``init`` raises NoInit for a module it has
    nothing for. Returns the names left at zero: those no init wrote (a module without
    ``reset_parameters`` under a parent whose init does not set it), and those in reach of
    an init that failed, unless a later one wrote them again."""
    # By identity: a tensor reachable under a second path (a module shared by two parents)
    # is the missing one all the same, and must not be stood in for.
    missing_ids = {id(_tensor_at(model, name)) for name in names}
    holders = {name.rpartition(".")[0] for name in names}
    chain = {path for holder in holders for path in _paths_above(holder)}
    modules = list(model.named_modules(remove_duplicate=False))
    # Deepest first; siblings in the model's own order, so that the outcome never depends on
    # how a set happens to iterate.
    position: Dict[str, int] = {}
    for k, (module_name, _) in enumerate(modules):
        position.setdefault(module_name, k)
    deepest_first = sorted(chain, key=lambda path: (-(path.count(".") + bool(path)), position.get(path, 0)))
    children = [(module, dict(module._modules)) for _, module in modules]
    stand_ins: List[Tuple[Dict[str, Any], str, torch.Tensor]] = []
    placed: Dict[str, Tuple[Dict[str, Any], str, torch.Tensor]] = {}
    unreachable = set()  # modules whose init could reach a tensor that has no stand-in
    partial: set = set()  # names a failed init wrote and no later init wrote again
    try:
        for module_name, module in modules:
            prefix = module_name + "." if module_name else ""
            for store in (module._parameters, module._buffers):
                for attr, tensor in list(store.items()):
                    if tensor is None:
                        continue
                    if id(tensor) in missing_ids:
                        placed.setdefault(prefix + attr, (store, attr, tensor))
                        continue
                    try:
                        meta = tensor.detach().to("meta")
                    except Exception:  # noqa: BLE001 - quantized tensors and some subclasses have none
                        # Out of reach of the inits only if none of them can get to it: those of
                        # this module and of the modules above it.
                        unreachable.update(path for path in _paths_above(module_name) if path in chain)
                        continue
                    stand_in = torch.nn.Parameter(meta, tensor.requires_grad) if store is module._parameters else meta
                    stand_ins.append((store, attr, tensor))
                    store[attr] = stand_in
        versions = {name: placed[name][2]._version for name in names}
        # NOTE: an init sets the tensors of its module and of the modules below it, so each is
        # checked only for the names in its reach (under any name its module or tensor also
        # has): checking every name after every init made thousands of missing tensors take
        # minutes (quadratic).
        reach: Dict[str, List[str]] = {path: [] for path in chain}
        holders_of: Dict[int, set] = {}
        for key, (_, _, tensor) in placed.items():
            holders_of.setdefault(id(tensor), set()).add(key.rpartition(".")[0])
        for name in names:
            above = set()
            for holder in holders_of[id(placed[name][2])]:
                above.update(_paths_above(holder))
            for path in above:
                if path in reach:
                    reach[path].append(name)
        with torch.no_grad():
            for path in deepest_first:
                if path in unreachable:
                    continue
                in_reach = reach[path]
                before = {name: placed[name][2]._version for name in in_reach}
                try:
                    init(model.get_submodule(path))
                    ran = True
                except NoInit:  # nothing to run: nothing written
                    continue
                except Exception:  # noqa: BLE001 - the model's own init code
                    ran = False
                written = set()
                for name in in_reach:
                    store, attr, tensor = placed[name]
                    if store.get(attr) is not tensor:
                        # An init that made a new tensor rather than fill ours: ours takes its values.
                        try:
                            tensor.copy_(store[attr])
                        except Exception:  # noqa: BLE001 - a new tensor made from a stand-in: no values
                            pass
                        store[attr] = tensor
                    if tensor._version != before[name]:
                        written.add(name)
                # What an init that failed half-way may have written (through `.data` too, which
                # no version shows: everything in its reach) is not to be trusted, until a later
                # (enclosing) init writes it again.
                if ran:
                    partial -= written
                else:
                    partial |= written | {name for name in in_reach
                                          if not path or name.startswith(path + ".")}
    finally:
        # An init that builds new submodules (self.proj = Linear(...)) would drop the loaded
        # ones: they are put back (what the init set in the new ones is lost).
        for module, saved in children:
            if module._modules.keys() != saved.keys() or any(module._modules[k] is not v for k, v in saved.items()):
                module._modules.clear()
                module._modules.update(saved)
        for store, attr, tensor in reversed(stand_ins):
            store[attr] = tensor
    left_zero = []
    with torch.no_grad():
        for name in names:
            tensor = placed[name][2]
            if name in partial:
                tensor.zero_()
                left_zero.append(name)
            elif tensor._version == versions[name] and _all_zero(tensor):
                # Not written by any init (same version; `.data` writes do not count, so the
                # values decide too): a buffer reset_parameters() does not know, say.
                left_zero.append(name)
    return left_zero


def _paths_above(module_name: str) -> List[str]:
    """The module itself and every module above it, as paths: ``"a.b"`` gives ``""``, ``"a"``, ``"a.b"``."""
    parts = module_name.split(".") if module_name else []
    return [".".join(parts[:n]) for n in range(len(parts) + 1)]


def _tensor_at(model: torch.nn.Module, name: str) -> Optional[torch.Tensor]:
    module_path, _, attr = name.rpartition(".")
    module = model.get_submodule(module_path)
    return module._parameters.get(attr, module._buffers.get(attr))


def _all_zero(tensor: torch.Tensor) -> bool:
    # On the bits, through an integer view of the same width: float8, sub-byte and complex
    # dtypes have no any() of their own.
    tensor = tensor.detach()
    if tensor.is_complex():
        tensor = torch.view_as_real(tensor)
    return not bool(tensor.view(_SAME_WIDTH_INT[tensor.element_size()]).any())


def describe_missing(names: List[str], left_zero: List[str], how: str) -> str:
    """What a warning says of the tensors initialise_missing was given."""
    zero = set(left_zero)
    initialised = [name for name in names if name not in zero]
    said = []
    if initialised:
        said.append(_format_names(f"tensors initialised as {how} initialises them", initialised, most=20))
    if left_zero:
        said.append(_format_names("tensors zero-filled", left_zero, most=20))
    return "; ".join(said)


class NoInit(Exception):
    """Raised by an init given to initialize_missing for a module it has nothing to run on."""


def _reset_parameters(module: torch.nn.Module) -> None:
    # What building the module gives its tensors (torch's layers have it; MultiheadAttention
    # and Transformer layers under a private name).
    reset = getattr(module, "reset_parameters", None) or getattr(module, "_reset_parameters", None)
    if reset is None:
        raise NoInit
    reset()


def _as_parameter(value: torch.Tensor, old: torch.Tensor) -> torch.nn.Parameter:
    # A subclass of Parameter that only adds methods or tags keeps its class, as
    # load_state_dict keeps it; one that builds itself otherwise (its own __new__) cannot be
    # rebuilt from a tensor alone and becomes a plain Parameter.
    cls = type(old) if isinstance(old, torch.nn.Parameter) and type(old).__new__ is torch.nn.Parameter.__new__ \
        else torch.nn.Parameter
    param = cls(value, requires_grad=old.requires_grad)
    # Keep what libraries hang on parameters (transformers' init flags, optimizer tags).
    param.__dict__.update(getattr(old, "__dict__", {}))
    return param


def _unwrapped(model: torch.nn.Module, tensors: Dict[str, torch.Tensor]) -> torch.nn.Module:
    """The model a torch.compile or DataParallel wrapper holds, when the file's names
    are the wrapped model's own (``fc.weight``, not ``_orig_mod.fc.weight`` or ``module.fc.weight``),
    as ``save_flashpack`` and ``model.module.state_dict()`` write them."""
    while True:
        if isinstance(model, torch.nn.DataParallel):  # (DistributedDataParallel is refused before)
            inner, prefix = model.module, "module."
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):  # torch.compile's OptimizedModule
            inner, prefix = model._orig_mod, "_orig_mod."
        else:
            return model
        if any(name.startswith(prefix) for name in tensors):
            return model
        model = inner


def _separate_shared_memory(slots: List[_Slot]) -> None:
    """Gives a slot a copy of its loaded view where it shares bytes with another slot's: a
    file written from a model with tied weights, loaded into one whose weights are separate
    (``tie_word_embeddings=False``), must not leave two parameters over the same memory
    (training one would change the other), as ``load_state_dict`` would not."""
    spans = []
    for k, slot in enumerate(slots):
        value = slot.value
        if value is not None and value.numel() > 0:
            start = value.data_ptr()
            spans.append((value.device.type, value.device.index or 0, start,
                          start + value.numel() * value.element_size(), k))
    spans.sort()
    reach: Optional[Tuple[str, int, int]] = None  # (device type, index, end of the bytes taken so far)
    for device_type, index, start, end, k in spans:
        if reach is not None and reach[:2] == (device_type, index) and start < reach[2]:
            slots[k].value = slots[k].value.clone()
            continue
        if reach is None or reach[:2] != (device_type, index) or end > reach[2]:
            reach = (device_type, index, end)


class DevicePlacement:
    """Where each tensor of a model goes under a ``device_map`` (``{module name: device}``, as
    accelerate and ``from_pretrained`` take it; ``""`` names the whole model): the device of
    the longest key that is the tensor's name or the name of a module holding it."""

    def __init__(self, device_map: Mapping[str, Any], what: str):
        self.map: Dict[str, torch.device] = {}
        for key, value in device_map.items():
            if value == "disk" or not isinstance(key, str):
                raise ValueError(f"{what}: device_map {{{key!r}: {value!r}}}: offloading to disk is not supported"
                                 if value == "disk" else f"{what}: device_map keys are module names, got {key!r}")
            try:
                device = torch.device("cuda", value) if isinstance(value, int) else torch.device(value)
            except (RuntimeError, TypeError) as e:
                raise ValueError(f"{what}: device_map {{{key!r}: {value!r}}}: not a device ({e})") from None
            if device.type == "meta":
                raise ValueError(f"{what}: device_map {{{key!r}: {value!r}}}: cannot load onto the meta device")
            self.map[key] = device
        self.devices = list(dict.fromkeys(self.map.values()))

    def __call__(self, name: str) -> Optional[torch.device]:
        parts = name.split(".")
        for n in range(len(parts), -1, -1):
            device = self.map.get(".".join(parts[:n]))
            if device is not None:
                return device
        return None


def _load_placed(path: PathLike, names: List[str], placement: DevicePlacement,
                 wanted: Callable[[str], bool], copy: bool = False) -> Dict[str, torch.Tensor]:
    """The file's tensors (``names``, in the file's order), each loaded to its device under
    ``placement``: one load per device, of its entries only. Entries ``wanted`` refuses, and
    those no key of the map covers, are mapped on the CPU (free: nothing is read) so that the
    caller still sees every name the file holds."""
    groups: Dict[torch.device, List[str]] = {}
    for name in names:
        device = placement(name) if wanted(name) else None
        groups.setdefault(device if device is not None else torch.device("cpu"), []).append(name)
    loaded: Dict[str, torch.Tensor] = {}
    for device, group in groups.items():
        loaded.update(load_file(path, device, names=group, copy=copy))
    return {name: loaded[name] for name in names}


def _prefix_hint(missing: List[str], unexpected: List[str]) -> str:
    """When the file holds every missing name under one prefix, or without the model's first
    one, a hint saying so: the file was saved from a model that holds this one under a name,
    or from a part of this model."""
    if not missing or not unexpected:
        return ""
    in_file = set(unexpected)
    first = missing[0]
    for name in unexpected:
        prefix = name[:-len(first)]
        if name.endswith("." + first) and all(prefix + m in in_file for m in missing):
            return (f" (the file holds the missing names under '{prefix}': it was saved from a model holding "
                    "this one under that name; load that model, or save this part on its own)")
    head = first.split(".", 1)[0] + "."
    if "." in first and all(m.startswith(head) and m[len(head):] in in_file for m in missing):
        return (f" (the file holds the missing names without '{head}': it was saved from that part of this model "
                "alone)")
    return ""


def _format_names(kind: str, names: List[str], most: Optional[int] = None) -> str:
    """``"3 kind: a, b, c"``; past ``most`` names, the rest as a count."""
    if most is not None and len(names) > most:
        return f"{len(names)} {kind}: {', '.join(names[:most])} and {len(names) - most} more"
    return f"{len(names)} {kind}: {', '.join(names)}"


def assign_from_file(
    model: torch.nn.Module,
    path: PathLike,
    device: Optional[Union[DeviceLike, Mapping[str, DeviceLike]]] = None,
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
    *,
    dtype: Optional[torch.dtype] = None,
    copy: bool = False,
    _keep_float32: Optional[Callable[[str], bool]] = None,
    _zero_filled: Optional[List[str]] = None,
    _model_prefix: str = "",
    _prefetched: Optional[Prefetch] = None,
) -> None:
    """Load a flashpack file into ``model``'s parameters and buffers, without copies.

    Each parameter becomes an ``nn.Parameter`` viewing the loaded memory (same
    ``requires_grad``, same attributes); each buffer becomes the loaded view. Nothing is
    copied unless a dtype conversion is asked for. Tied tensors (one tensor under several
    names) stay tied: every name gets the same new ``Parameter``. The model may be built
    on the meta device; tensors the file does not hold are moved to ``device`` (buffers
    computed in ``__init__`` keep their values). Tensors still on the meta device and missing
    from the file, which only a non-strict load allows, are initialised as building the
    model would have: by their module's ``reset_parameters()`` (then each enclosing
    module's), with every loaded tensor out of reach; what no ``reset_parameters()`` sets is
    zero-filled; a warning names both. Non-persistent buffers of a model built entirely
    under ``torch.device("meta")`` are in no file: an error, unless ``strict=False`` (build
    with ``mixin.init_empty_parameters()`` to keep them as ``__init__`` computes them).
    Everything is checked before the model is touched: on error the model is unchanged.

    Args:
        model: the module to fill.
        path: the flashpack file (ours or the reference package's).
        device: where to load; defaults to the model's device (the CPU for a meta model).
            Or a device map, ``{module name: device}`` as accelerate and ``from_pretrained``
            take it (``""`` for the rest of the model): each device then loads only its
            modules' entries (``load_file(..., names=...)``). It places the tensors; running
            the model across devices needs accelerate's hooks (``dispatch_model``), which
            ``from_pretrained_flashpack`` adds as ``from_pretrained`` does.
        strict: if set, overrides ``strict_params`` and ``strict_buffers``; ``False``
            also accepts entries of the file the model does not have.
        strict_params: raise if a parameter of the model is not in the file.
        strict_buffers: raise if a buffer of the model is not in the file.
        keep_flash_ref_on_model: keep the loaded blocks on the model, as the reference does:
            ``model._flash_shared_storage`` (a ``FlashTensorStorage``) and
            ``model._flash_shared_storage_meta`` (the footer); ``iterate_from_flash_tensor``
            turns them back into the named tensors.
        silent: print nothing (a summary otherwise).
        ignore_names, ignore_prefixes, ignore_suffixes: names to skip, in the file and
            in the model.
        coerce_dtype: convert a buffer to the model's dtype when the file's differs;
            otherwise a floating buffer takes the file's dtype, as parameters do.
        dtype: convert the file's floating-point tensors to this dtype (a copy).
        copy: on the CPU, load into memory of the process's own rather than views of a
            mapping of the file, for a model that must not change when the file is
            rewritten in place (``cp`` over it) or truncated; replacing the file (a rename,
            as ``save_file`` and ``save_pretrained_flashpack`` do) is safe either way.
        use_distributed_loading, distributed_sharded, rank, local_rank, world_size: load
            over torch.distributed (see ``load_file_distributed``):
            rank 0 reads and broadcasts, or with ``distributed_sharded`` every rank reads
            its share and the ranks all-gather. Starts the process group from ``rank``,
            ``local_rank``, ``world_size`` or the torchrun environment if none exists.
        distributed_shard_strategy: the reference's names, ``"contiguous"`` or
            ``"windows"``, are accepted; both load the same tensors.
        num_streams, chunk_bytes: accepted for compatibility; the operators pick their
            own threads and chunks.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: names missing from the file or unexpected in it (all listed), a shape or
            dtype that does not match, or non-persistent buffers on the meta device.
        FileNotFoundError, RuntimeError: as ``load_file``.

    Example:
        >>> with torch.device("meta"):
        ...     model = torch.nn.Linear(4, 4)
        >>> assign_from_file(model, "linear.flashpack", device="cpu")
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"flashpack_ops.assign_from_file: cannot load {os.fspath(path)} into a "
                        f"{type(model).__name__}: the model must be an nn.Module")

    sharded = next(((name, tensor) for name, tensor in (*model.named_parameters(), *model.named_buffers())
                    if _is_dtensor(tensor)), None)
    if sharded is not None:
        # FSDP2 and tensor parallelism keep this rank's shard in each DTensor parameter and
        # their own references to it: assigning would put the whole tensor in its place, and
        # the model would no longer be sharded. Their loading copies into the shards.
        raise ValueError(f"flashpack_ops.assign_from_file: cannot load {os.fspath(path)} into "
                         f"{type(model).__name__} by assignment: '{sharded[0]}' is a DTensor, split over a device "
                         f"mesh as {tuple(sharded[1].placements)}. Load the file into the shards in place: "
                         "torch.distributed.checkpoint.state_dict.set_model_state_dict(model, "
                         "flashpack_ops.load_file(path), options=StateDictOptions(full_state_dict=True))")

    ddp = next((m for m in model.modules() if isinstance(m, torch.nn.parallel.DistributedDataParallel)), None)
    if ddp is not None:
        # DDP averages the gradients of the parameters it was built with, through hooks on
        # them: parameters assigned in their place would train on each rank's own gradients,
        # and the ranks would drift apart without an error.
        raise ValueError(f"flashpack_ops.assign_from_file: cannot load {os.fspath(path)} into "
                         f"{type(model).__name__} by assignment: it holds a {type(ddp).__name__}, which averages the "
                         "gradients of the parameters it was built with, not of new ones put in their place. Load "
                         "the model before wrapping it, or copy the file into its parameters: "
                         "model.module.load_state_dict(flashpack_ops.load_file(path))")
    fsdp = sys.modules.get("torch.distributed.fsdp")  # (no model holds one before it is imported)
    fsdp1 = None if fsdp is None else next((m for m in model.modules()
                                            if isinstance(m, fsdp.FullyShardedDataParallel)), None)
    if fsdp1 is not None:
        # FSDP (the first) keeps this rank's shard of its modules' parameters flattened into one
        # of its own: the model has none of the file's names to assign to.
        raise ValueError(f"flashpack_ops.assign_from_file: cannot load {os.fspath(path)} into "
                         f"{type(model).__name__} by assignment: it holds a {type(fsdp1).__name__}, which keeps "
                         "its parameters flattened and sharded. Load the model before wrapping it, or copy the "
                         "file into its shards: model.load_state_dict(flashpack_ops.load_file(path))")

    def check_strategy() -> None:  # on every rank at once, where the load's arguments are agreed
        if distributed_sharded:
            _check_shard_strategy(distributed_shard_strategy, "distributed_shard_strategy")

    def ignored(name: str) -> bool:
        return _is_ignored(name, ignore_names, ignore_prefixes, ignore_suffixes)

    if dtype is not None:
        # Checked here: a name would reach Tensor.to() as a device, an integer dtype would turn
        # the weights into integers, and either error would blame the file or the device.
        dtype = _dtype(dtype, f"flashpack_ops.assign_from_file: cannot load {path}: dtype")
        if not dtype.is_floating_point:
            raise ValueError(f"flashpack_ops.assign_from_file: cannot load {path}: dtype={dtype} is not a "
                             "floating-point dtype: the file's floating-point tensors converted to it would lose "
                             "their values")
    placement = None
    if isinstance(device, Mapping):
        placement = DevicePlacement(device, "flashpack_ops.assign_from_file")
        if len(placement.devices) == 1 and "" in placement.map:
            device, placement = placement.devices[0], None
    if placement is None:
        device = _default_device(model) if device is None else \
            _device(device, f"flashpack_ops.assign_from_file: cannot load {path}")
        if device.type == "meta":
            raise ValueError(f"flashpack_ops.assign_from_file: cannot load {path} onto the meta device")
    elif keep_flash_ref_on_model or use_distributed_loading:
        raise ValueError(f"flashpack_ops.assign_from_file: a device_map loads {path} in parts, module by module; "
                         "keep_flash_ref_on_model and use_distributed_loading need the whole file on one device "
                         "(pass device=, or a map whose \"\" key takes the rest)")
    else:
        file_names = [entry["name"] for entry in read_metadata(path)["index"]]
        if _unwrapped(model, dict.fromkeys(file_names)) is not model:
            raise ValueError(f"flashpack_ops.assign_from_file: {path} holds the names of the model that "
                             f"{type(model).__name__} wraps; pass that model itself with a device_map")
        # As accelerate checks a device map: every tensor of the state dict has a place.
        uncovered = [name for name, slot in _model_slots(model).items()
                     if placement(name) is None and (slot.is_param or slot.persistent) and not ignored(name)]
        if uncovered:
            raise ValueError("flashpack_ops.assign_from_file: the device_map places no module holding "
                             + _format_names("tensors of the model", uncovered, most=20).split(": ", 1)[1]
                             + f" (add their modules, or \"\" for the rest, to load {path})")
    distributed = use_distributed_loading and maybe_init_distributed(rank, local_rank, world_size)
    if use_distributed_loading and not distributed:
        check_strategy()  # one process: no ranks to agree with, and no sharded load to check it
    storage = meta = None
    prefetched, _prefetched = _prefetched, None
    if prefetched is not None and (placement is not None or keep_flash_ref_on_model or distributed
                                   or not prefetched.matches(path, device, copy)):
        prefetched.drop()  # loaded otherwise: its memory goes before the load below takes its own
        prefetched = None
    if placement is not None:
        # One load per device, and the names read before them: all from one file, or a save
        # landing between two loads would give the model weights of two files.
        path = _path(path, must_exist=True)
        tensors = _read_unchanged(path, lambda: _load_placed(
            path, [entry["name"] for entry in read_metadata(path)["index"]], placement,
            lambda name: not ignored(name), copy=copy))
    elif keep_flash_ref_on_model:
        # The blocks themselves, so that the model can hold them; the tensors are views of them.
        if distributed:
            storage, meta = read_flashpack_file_distributed(path, device, sharded=distributed_sharded,
                                                            shard_strategy=distributed_shard_strategy)
        else:
            storage, meta = read_flashpack_file(path, device, copy=copy)
        tensors = dict(iterate_from_flash_tensor(storage, meta))
    elif distributed:
        tensors = load_file_distributed(path, device, sharded=distributed_sharded, _check=check_strategy)
    elif ignore_names or ignore_prefixes or ignore_suffixes:
        # What is ignored is not read, nor given GPU memory (a head or a tower left out). The
        # names and the tensors are read by two calls, from one file. A prefetched load of the
        # whole file serves where all that is left out is second names of tied tensors.
        path = _path(path, must_exist=True)
        if prefetched is not None and _ignores_no_bytes(read_metadata(path)["index"], ignored):
            tensors = prefetched.result()
        else:
            if prefetched is not None:
                prefetched.drop()
            tensors = _read_unchanged(path, lambda: load_file(
                path, device, copy=copy, names=[entry["name"] for entry in read_metadata(path)["index"]
                                                if not ignored(entry["name"])]))
    else:
        tensors = prefetched.result() if prefetched is not None else load_file(path, device, copy=copy)

    target = _unwrapped(model, tensors)
    if target is not model:
        # Assigned in the wrapped model, the only one whose names the file holds; the
        # attributes below still go on the model the caller passed.
        assign_target, model = model, target
    else:
        assign_target = model
    slots = _model_slots(model)
    extra_states = _extra_states(model)
    unexpected, mismatched, states = [], [], []
    for name, view in tensors.items():
        if ignored(name):
            continue
        slot = slots.get(name)
        if slot is None and name in extra_states:
            states.append((extra_states[name], view))  # handed over with the tensors, once all is checked
            continue
        if slot is None:
            unexpected.append(name)
            continue
        if isinstance(slot.old, torch.nn.parameter.UninitializedTensorMixin):
            mismatched.append(f"'{name}' is an uninitialized (lazy) tensor in the model: run the model once, or "
                              "build it with its sizes, before loading into it")
            continue
        if view.shape != slot.old.shape:
            mismatched.append(f"'{name}' has shape {tuple(view.shape)} in the file but "
                              f"{tuple(slot.old.shape)} in the model")
            continue
        if slot.source is not None:
            continue  # a tied tensor the file stores under another name too
        if not slot.persistent and not slot.old.is_meta:
            # A non-persistent buffer (rotary inv_freq) is computed by the model, in its own
            # dtype: an older file's copy is left out, as load_state_dict leaves it out.
            continue
        if view.is_floating_point():
            if _keep_float32 is not None and _keep_float32(name):
                view = view.to(torch.float32)
            elif dtype is not None:
                view = view.to(dtype)
        if slot.is_param and slot.old.requires_grad and not (view.is_floating_point() or view.is_complex()):
            mismatched.append(f"parameter '{name}' requires grad but is {view.dtype} in the file (only floating "
                              "point and complex tensors can require grad)")
            continue
        if not slot.is_param and view.dtype != slot.old.dtype:
            if coerce_dtype:
                view = view.to(slot.old.dtype)
            elif not (view.is_floating_point() and slot.old.is_floating_point()):
                mismatched.append(f"buffer '{name}' is {view.dtype} in the file but {slot.old.dtype} in the "
                                  "model (pass coerce_dtype=True to convert it)")
                continue
        slot.source, slot.value = name, view

    unique = list({id(s): s for s in slots.values()}.values())
    # A tensor the file holds in another shape or dtype is reported as such, not as missing too.
    present = set(tensors)
    missing_params = [s.names[0] for s in unique if s.source is None and s.is_param
                      and not all(ignored(n) for n in s.names) and not any(n in present for n in s.names)]
    missing_buffers = [s.names[0] for s in unique if s.source is None and not s.is_param and s.persistent
                       and not all(ignored(n) for n in s.names) and not any(n in present for n in s.names)]
    # A module's extra state the file lacks: a parameter of sorts, as load_state_dict counts it.
    missing_params += [name for name in extra_states if name not in present and not ignored(name)]
    check_params = strict_params if strict is None else strict
    check_buffers = strict_buffers if strict is None else strict
    problems = list(mismatched)
    # _model_prefix: the name under which a module made for the load holds the caller's model;
    # what the model lacks is named as the model names it.
    as_named = [name.removeprefix(_model_prefix) for name in missing_params + missing_buffers]
    if check_params and missing_params:
        problems.append(_format_names("parameters missing from the file", as_named[:len(missing_params)]))
    if check_buffers and missing_buffers:
        problems.append(_format_names("buffers missing from the file", as_named[len(missing_params):]))
    if unexpected and strict is not False and (check_params or check_buffers):
        problems.append(_format_names(f"names in the file that {type(model).__name__} does not have", unexpected))
    if problems:
        hint = _prefix_hint(as_named, unexpected)
        raise ValueError(f"Error while assigning {path} to {type(model).__name__}: " + "; ".join(problems) + hint)

    _separate_shared_memory(unique)

    def slot_device(slot: _Slot) -> torch.device:
        if placement is None:
            return device
        # A non-persistent buffer no key covers stays where the model built it.
        placed = placement(slot.names[0])
        return placed if placed is not None else torch.device("cpu") if slot.old.is_meta else slot.old.device

    # Every new tensor is made before the first is assigned: on any error the model is unchanged.
    zero_filled, computed, assignments = [], [], []
    for slot in unique:
        value = slot.value
        if value is None:
            if slot.old.is_meta:
                # In the dtype the loaded tensors take, so that the model computes in one dtype.
                fill_dtype = slot.old.dtype
                if fill_dtype.is_floating_point:
                    if _keep_float32 is not None and _keep_float32(slot.names[0]):
                        fill_dtype = torch.float32
                    elif dtype is not None:
                        fill_dtype = dtype
                value = torch.zeros(slot.old.shape, dtype=fill_dtype, device=slot_device(slot))
                zero_filled.append(slot.names[0])
                if not slot.is_param and not slot.persistent:
                    computed.append(slot.names[0])
            elif slot.old.device != slot_device(slot):
                value = slot.old.detach().to(slot_device(slot))
            else:
                continue
        if slot.is_param:
            value = _as_parameter(value, slot.old)
        assignments.append((slot.names, value))
    if computed and strict is not False:
        # A model built under torch.device("meta"): what __init__ computes is in no file, and
        # zeros in its place (rotary frequencies) give wrong outputs, not an error.
        raise ValueError(f"Error while assigning {path} to {type(model).__name__}: "
                         + _format_names("non-persistent buffers on the meta device, which no file holds", computed,
                                         most=20)
                         + "; build the model with only its parameters on the meta device "
                         "(flashpack_ops.mixin.init_empty_parameters()) so that __init__ computes them, or pass "
                         "strict=False to have them initialised or zero-filled")
    for names, value in assignments:
        for name in names:
            _set_tensor(model, name, value)
    for module, state in states:
        module.set_extra_state(state)

    if _zero_filled is not None:
        _zero_filled.extend(zero_filled)  # the caller initialises them and says so
    elif zero_filled:
        left_zero = initialize_missing(model, zero_filled, _reset_parameters)
        hint = ""
        if not set(computed).isdisjoint(left_zero):
            # A model built under torch.device("meta"): no file holds what __init__ computes.
            hint = ("; non-persistent buffers are in no file, build the model with only its parameters on the "
                    "meta device (flashpack_ops.mixin.init_empty_parameters()) so that __init__ computes them")
        warn(f"flashpack_ops.assign_from_file: {describe_missing(zero_filled, left_zero, 'reset_parameters()')}"
             f" (tensors of {type(model).__name__} not in {path}){hint}")
    if keep_flash_ref_on_model:
        assign_target._flash_shared_storage = storage
        assign_target._flash_shared_storage_meta = meta
    if not silent:
        loaded = sum(1 for s in unique if s.source is not None)
        where = device if placement is None else ", ".join(map(str, placement.devices))
        print(f"flashpack_ops: assigned {loaded} tensors from {path} to {type(model).__name__} on {where}"
              + (f", ignored {len(unexpected)} names not in the model" if unexpected else ""))
