"""Loading one flashpack file into every process of a ``torch.distributed`` job.

Two ways, both over the job's own process group (gloo for CPU tensors, NCCL for CUDA):

* **broadcast** (default): rank ``src`` reads the file and broadcasts it; the other ranks
  only receive (they need not see the file at all: the footer comes from ``src`` too).
* **sharded**: every rank reads about 1/N of each block and the ranks all-gather the
  pieces, so the disk (or network file system) serves the file once, N readers at a time.

Blocks travel as raw bytes (``uint8``), so every dtype works with every backend, window by
window, the next window being read while the current one moves. The tensors come back as
``load_file`` returns them: each with a storage of its own over its block, tied entries
sharing one. Failures are agreed on before bytes move: if one rank cannot read, every rank
raises instead of waiting forever in a collective.
"""

from __future__ import annotations

import json
import os
import zlib
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist

from .ops import DeviceLike, PathLike, _device, _identity, _path

# NOTE: 256 MiB per collective (per rank for an all-gather) is the band where transfers run
# at link speed while the next window's read still overlaps the current transfer; the
# reference measured 128-256 MiB best on 8 H200s.
DEFAULT_WINDOW_BYTES = 256 << 20

# Sharded pieces start on multiples of this, a multiple of every element size and of the
# 4096-byte block alignment, so each piece is a page-aligned read.
SHARD_ALIGN_BYTES = 4096

# The strategy names the reference accepts. Both give the same tensors; flashpack_ops uses
# windowed all-gathers for either.
SHARD_STRATEGIES = ("contiguous", "windows")


class _Block(NamedTuple):
    dtype: torch.dtype
    offset: int  # bytes from the start of the file
    nbytes: int


class _Entry(NamedTuple):
    name: str
    shape: Tuple[int, ...]
    offset: int  # elements from the start of the block
    length: int  # elements
    block: int


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype '{name}'")
    return dtype


def _layout(footer: str) -> Tuple[List[_Block], List[_Entry]]:
    """Blocks and entries of a footer that the C++ reader has already validated."""
    meta = json.loads(footer)
    if meta["format"] == "flashpack_v3":
        dtype = _dtype(meta["target_dtype"])
        blocks = [_Block(dtype, 0, int(meta["total_elems"]) * dtype.itemsize)]
    else:
        blocks = [_Block(_dtype(b["dtype"]), int(b["offset_bytes"]), int(b["length_bytes"]))
                  for b in meta["macroblocks"]]
    v3 = meta["format"] == "flashpack_v3"  # one block, as the C++ reader takes it
    entries = [_Entry(r["name"], tuple(int(d) for d in r["shape"]), int(r["offset"]), int(r["length"]),
                      0 if v3 else int(r.get("macroblock", 0)))
               for r in meta["index"]]
    return blocks, entries


def _allocate(layout: List[_Block], entries: List[_Entry], device: torch.device) -> List[Optional[torch.Tensor]]:
    """A uint8 buffer per block some non-empty tensor views: the only bytes worth moving.
    The same on every rank, since it follows from the footer alone."""
    needed = [False] * len(layout)
    for e in entries:
        if e.length > 0:
            needed[e.block] = True
    return [torch.empty(spec.nbytes, dtype=torch.uint8, device=device) if need else None
            for spec, need in zip(layout, needed)]


def _tensors(blocks: List[Optional[torch.Tensor]], layout: List[_Block], entries: List[_Entry],
             device: torch.device) -> Dict[str, torch.Tensor]:
    """The entries over their blocks, as load_file builds them: each tensor on a storage of
    its own over its bytes (sharing the block's memory), tied entries on the same one."""
    out: Dict[str, torch.Tensor] = {}
    storages: Dict[Tuple[int, int, int], torch.UntypedStorage] = {}
    for e in entries:
        dtype = layout[e.block].dtype
        if e.length == 0:
            out[e.name] = torch.empty(e.shape, dtype=dtype, device=device)
            continue
        key = (e.block, e.offset, e.length)
        storage = storages.get(key)
        if storage is None:
            start = e.offset * dtype.itemsize
            # A slice of an untyped storage is a new storage over the same memory.
            storage = storages[key] = blocks[e.block].untyped_storage()[start:start + e.length * dtype.itemsize]
        out[e.name] = torch.empty(0, dtype=dtype, device=device).set_(storage, 0, e.shape)
    return out


def _control_device(device: torch.device) -> torch.device:
    """Where the small agreement tensors live: NCCL moves only CUDA tensors."""
    if dist.get_backend() == "nccl":
        if device.type != "cuda":
            raise ValueError(f"distributed flashpack loading with the NCCL backend needs a cuda device, got {device}")
        return device
    return torch.device("cpu")


def _agree(values: List[int], ctrl: torch.device) -> Tuple[List[int], List[int]]:
    """The maximum and the minimum over all ranks of each value, in one all-reduce."""
    t = torch.tensor(values + [-v for v in values], dtype=torch.int64, device=ctrl)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    got = t.tolist()
    n = len(values)
    return got[:n], [-v for v in got[n:]]


def _raise_together(error: Optional[BaseException], ctrl: torch.device, path: str, what: str) -> None:
    """Raises on every rank if `error` happened on any: this rank's own error, or one
    saying that `what` failed elsewhere."""
    if _agree([int(error is not None)], ctrl)[0][0]:
        if error is not None:
            raise error
        raise RuntimeError(f"'{path}': {what} failed on another rank (this rank's part succeeded); "
                           "see that rank's error")


class _InFlight:
    """Asynchronous collectives, at most two at a time: the transfer of one window overlaps
    the read of the next. Each works in place, in the output block, so no window's bytes are
    held anywhere else meanwhile."""

    def __init__(self):
        self._works = []

    def add(self, work) -> None:
        self._works.append(work)
        if len(self._works) > 2:
            self._works.pop(0).wait()

    def wait_all(self) -> None:
        while self._works:
            self._works.pop(0).wait()


def _read(path: str, offset: int, length: int, device: torch.device, num_threads: int) -> torch.Tensor:
    return torch.ops.flashpack.read_range(path, offset, length, device, num_threads=num_threads)


class _Loaded(NamedTuple):
    footer: str
    layout: List[_Block]
    entries: List[_Entry]
    blocks: List[Optional[torch.Tensor]]  # uint8; None where no non-empty tensor lies


def _load_broadcast(path: str, device: torch.device, src: int, window_bytes: int, num_threads: int,
                    verify: bool, ctrl: torch.device) -> _Loaded:
    rank = dist.get_rank()
    status: List[Optional[str]] = [None, None]  # [footer, error]
    error: Optional[BaseException] = None
    identity = None
    if rank == src:
        try:
            path = _path(path, must_exist=True)
            identity = _identity(path)
            status[0] = torch.ops.flashpack.read_footer(path)
            if verify:
                torch.ops.flashpack.verify(path, num_threads=num_threads)
        except Exception as exc:  # re-raised below, once every rank knows
            error = exc
            status = [None, f"{type(exc).__name__}: {exc}"]
    dist.broadcast_object_list(status, src=src, device=ctrl if ctrl.type == "cuda" else None)
    if status[1] is not None:
        if error is not None:
            raise error
        raise RuntimeError(f"'{path}': loading on rank {src} failed: {status[1]}")

    try:
        layout, entries = _layout(status[0])
        blocks = _allocate(layout, entries, device)
    except Exception as exc:  # out of memory, most likely
        error = exc
    _raise_together(error, ctrl, path, "allocating the blocks")

    in_flight = _InFlight()
    try:
        for k, block in enumerate(blocks):
            if block is None:
                continue
            for start in range(0, block.numel(), window_bytes):
                window = block[start:start + window_bytes]
                if rank == src:
                    try:
                        window.copy_(_read(path, layout[k].offset + start, window.numel(), device, num_threads))
                    except Exception as exc:
                        error = exc
                _raise_together(error, ctrl, path, f"reading macroblock {k}")
                in_flight.add(dist.broadcast(window, src=src, async_op=True))
    finally:
        in_flight.wait_all()
    if rank == src:
        error = _changed_error(path, identity)
    _raise_together(error, ctrl, path, f"reading on rank {src}")
    return _Loaded(status[0], layout, entries, blocks)


def _changed_error(path: str, identity) -> Optional[BaseException]:
    """The footer and every window are read by separate calls: a save that replaced the file
    in between would mix two files' bytes."""
    try:
        if _identity(path) == identity:
            return None
    except OSError:
        pass
    return RuntimeError(f"'{path}' was replaced or modified while being loaded; load it again once it is no "
                        "longer being written")


def _plan_windows(nbytes: int, world: int, window_bytes: int) -> Tuple[List[Tuple[int, int]], int]:
    """Windows ``(start, piece)`` tiling a block: rank r reads ``[start + r*piece, start +
    (r+1)*piece)``. Pieces shrink toward the end so that what is left over, which every rank
    reads itself, is under ``world * SHARD_ALIGN_BYTES``. Returns the windows and where that
    leftover starts."""
    windows = []
    pos = 0
    while nbytes - pos >= world * SHARD_ALIGN_BYTES:
        piece = min(window_bytes, (nbytes - pos) // world // SHARD_ALIGN_BYTES * SHARD_ALIGN_BYTES)
        windows.append((pos, piece))
        pos += world * piece
    return windows, pos


def _all_gather(output: torch.Tensor, piece: torch.Tensor):
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return gather(output, piece, async_op=True)


def _load_sharded(path: str, device: torch.device, window_bytes: int, num_threads: int, verify: bool,
                  ctrl: torch.device) -> _Loaded:
    rank, world = dist.get_rank(), dist.get_world_size()

    # Everything that can fail on one rank alone happens before the first collective that
    # moves data: reading the footer, allocating, the leftovers every rank reads itself.
    error: Optional[BaseException] = None
    file_crc = 0
    identity = None
    try:
        path = _path(path, must_exist=True)
        identity = _identity(path)
        footer = torch.ops.flashpack.read_footer(path)
        # Every rank reads its own copy of the file: the footer, and a sample of the bytes
        # (each block's first page and the leftover every rank reads), must be the same on
        # every rank, or each would gather a mix of several files.
        file_crc = zlib.crc32(footer.encode())
        layout, entries = _layout(footer)
        blocks = _allocate(layout, entries, device)
        plans = []
        for k, block in enumerate(blocks):
            if block is None:
                continue
            windows, rest = _plan_windows(block.numel(), world, window_bytes)
            plans.extend((k, start, piece) for start, piece in windows)
            head = _read(path, layout[k].offset, min(SHARD_ALIGN_BYTES, block.numel()), torch.device("cpu"), 1)
            file_crc = zlib.crc32(head.numpy().tobytes(), file_crc)
            if rest < block.numel():
                block[rest:].copy_(_read(path, layout[k].offset + rest, block.numel() - rest, device, num_threads))
                file_crc = zlib.crc32(block[rest:].cpu().numpy().tobytes(), file_crc)
        if verify and rank == 0:
            torch.ops.flashpack.verify(path, num_threads=num_threads)
    except Exception as exc:  # re-raised below, once every rank knows
        error = exc
    high, low = _agree([int(error is not None), file_crc], ctrl)
    if high[0]:
        if error is not None:
            raise error
        raise RuntimeError(f"'{path}': reading the footer, allocating or reading failed on another rank "
                           "(this rank's part succeeded); see that rank's error")
    if high[1] != low[1]:
        raise ValueError(f"'{path}' differs between ranks (their footers or sampled bytes do not match); every "
                         "rank must read the same file")

    in_flight = _InFlight()
    try:
        for k, start, piece in plans:
            # In place: this rank's piece goes to its own slot of the output, which the gather
            # then fills around it (NCCL and gloo both take an input inside the output).
            mine = blocks[k][start + rank * piece:start + (rank + 1) * piece]
            try:
                mine.copy_(_read(path, layout[k].offset + start + rank * piece, piece, device, num_threads))
            except Exception as exc:
                error = exc
            _raise_together(error, ctrl, path, f"reading macroblock {k}")
            in_flight.add(_all_gather(blocks[k][start:start + world * piece], mine))
    finally:
        in_flight.wait_all()
    _raise_together(_changed_error(path, identity), ctrl, path, "reading")
    return _Loaded(footer, layout, entries, blocks)


def _load(path: PathLike, device: Optional[DeviceLike], src: int, sharded: bool, window_bytes: int,
          num_threads: int, verify: bool, check: Optional[Callable[[], None]] = None) -> Tuple[_Loaded, torch.device]:
    """The load every rank agrees on. ``check``: the caller's own checks of its arguments,
    made where a refusal fails every rank."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"a distributed load of '{path}' needs an initialized torch.distributed "
                           "process group (call torch.distributed.init_process_group first)")
    # One rank's bad argument, or ranks that disagree on how to load, must fail on every rank
    # before the first collective that moves data: otherwise the others wait in it until the
    # process group times out, or the collectives mismatch and a rank aborts.
    error: Optional[BaseException] = None
    ctrl = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    try:
        path = os.fspath(path)
        if check is not None:
            check()
        for name, value in (("src", src), ("window_bytes", window_bytes)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"load_file_distributed: {name} must be an int, got {value!r}")
            if not -2**62 < value < 2**62:
                raise ValueError(f"load_file_distributed: {name} is out of range: {value}")
        if not isinstance(sharded, bool):
            raise TypeError(f"load_file_distributed: sharded must be a bool, got {sharded!r}")
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        device = _device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            # torch.cuda.current_device() would fail with torch's assertion instead.
            raise ValueError(f"cannot load '{path}' to {device}: no CUDA device is available "
                             "(torch.cuda.is_available() is False); load to cpu")
        if device.type not in ("cpu", "cuda"):
            # A rank that reads nothing would otherwise take the broadcast of a meta tensor.
            raise ValueError(f"cannot load '{path}' to {device}: only cpu and cuda are supported")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        ctrl = _control_device(device)
        if window_bytes < SHARD_ALIGN_BYTES:
            raise ValueError(f"window_bytes must be at least {SHARD_ALIGN_BYTES}, got {window_bytes}")
    except Exception as exc:  # raised below, once every rank knows
        error = exc
    if error is not None:  # the values agreed on below may be what was refused
        src, window_bytes, sharded = 0, SHARD_ALIGN_BYTES, False
    high, low = _agree([int(error is not None), int(sharded), src, window_bytes], ctrl)
    if high[0]:
        if error is not None:
            raise error
        raise RuntimeError(f"'{os.fspath(path) if isinstance(path, (str, os.PathLike)) else path}': "
                           "load_file_distributed's arguments were refused on another rank; see that rank's error")
    for k, name in ((1, "sharded"), (2, "src"), (3, "window_bytes")):
        if high[k] != low[k]:
            raise ValueError(f"load_file_distributed: {name} differs between ranks ({low[k]} to {high[k]}); pass "
                             "the same value on every rank")
    if not sharded:
        return _load_broadcast(path, device, src, window_bytes, num_threads, verify, ctrl), device
    window_bytes -= window_bytes % SHARD_ALIGN_BYTES
    return _load_sharded(path, device, window_bytes, num_threads, verify, ctrl), device


def load_file_distributed(
    path: PathLike,
    device: Optional[DeviceLike] = None,
    *,
    src: int = 0,
    sharded: bool = False,
    window_bytes: int = DEFAULT_WINDOW_BYTES,
    num_threads: int = 0,
    verify: bool = False,
    _check: Optional[Callable[[], None]] = None,
) -> Dict[str, torch.Tensor]:
    """Load a flashpack file on every rank of the default process group.

    Every rank must call it with the same arguments (``path`` only has to name the same
    file). With ``sharded=False`` only rank ``src`` touches the file.

    Args:
        path: the flashpack file.
        device: where the tensors go on this rank; defaults to the current CUDA device
            under NCCL and to the CPU otherwise.
        src: with ``sharded=False``, the rank that reads the file and broadcasts it.
        sharded: every rank reads its share of each block and the ranks all-gather.
        window_bytes: bytes per broadcast, or per rank per all-gather when ``sharded``
            (then rounded down to a multiple of 4096).
        num_threads: reader threads per rank; 0 picks a default (``FLASHPACK_NUM_THREADS``).
        verify: check the file against its checksums first, on rank ``src`` (rank 0 when
            sharded), which reads the whole file once more for it.

    Returns:
        Dict[str, torch.Tensor]: the same tensors on every rank, in the file's order, bit
        for bit as ``load_file`` returns them.

    Raises:
        RuntimeError: no process group is initialized, or the load failed on another rank.
        ValueError: the file is invalid, differs between ranks, or NCCL was asked for a
            CPU device.

    Example:
        >>> dist.init_process_group("nccl")
        >>> torch.cuda.set_device(local_rank)
        >>> state_dict = load_file_distributed("model.flashpack", sharded=True)
    """
    loaded, device = _load(path, device, src, sharded, window_bytes, num_threads, verify, _check)
    return _tensors(loaded.blocks, loaded.layout, loaded.entries, device)


def load_blocks_distributed(
    path: PathLike,
    device: Optional[DeviceLike] = None,
    *,
    src: int = 0,
    sharded: bool = False,
    window_bytes: int = DEFAULT_WINDOW_BYTES,
    num_threads: int = 0,
    verify: bool = False,
    _check: Optional[Callable[[], None]] = None,
) -> Tuple[List[torch.Tensor], Dict[str, Any]]:
    """``load_file_distributed``, returning the blocks and the footer instead of the tensors.

    Args:
        path, device, src, sharded, window_bytes, num_threads, verify: as for
            ``load_file_distributed``.

    Returns:
        Tuple[List[torch.Tensor], Dict[str, Any]]: one 1-D tensor per block, of the block's
        dtype (as ``torch.ops.flashpack.load_blocks`` gives them on one process), and the
        file's footer; ``iterate_from_flash_tensor`` turns them into named tensors.

    Raises:
        RuntimeError, ValueError: as ``load_file_distributed``.

    Example:
        >>> blocks, footer = load_blocks_distributed("model.flashpack", sharded=True)
    """
    loaded, device = _load(path, device, src, sharded, window_bytes, num_threads, verify, _check)
    blocks = []
    for spec, block in zip(loaded.layout, loaded.blocks):
        if block is None:
            # No non-empty tensor lies in this block, so it was not moved: none of its bytes
            # is ever read.
            block = torch.zeros(spec.nbytes, dtype=torch.uint8, device=device)
        blocks.append(block.view(spec.dtype))
    return blocks, json.loads(loaded.footer)


def maybe_init_distributed(rank: Optional[int] = None, local_rank: Optional[int] = None,
                           world_size: Optional[int] = None) -> bool:
    """Start the default process group from arguments or the torchrun environment, if needed.

    Does nothing if a group exists or the world has one process. Uses NCCL (and selects
    ``cuda:local_rank``) when CUDA is available, gloo otherwise.

    Returns:
        bool: whether a process group is initialized afterwards.
    """
    if dist.is_initialized():
        return True
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    local_rank = int(os.environ.get("LOCAL_RANK", rank)) if local_rank is None else local_rank
    if world_size <= 1:
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", init_method="env://", rank=rank, world_size=world_size,
                                device_id=torch.device("cuda", local_rank))
    else:
        dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world_size)
    return True
