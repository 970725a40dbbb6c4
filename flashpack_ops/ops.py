"""Typed Python wrappers around the ``torch.ops.flashpack`` operators."""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import numbers
import os
import sys
from typing import Any, Dict, Iterable, List, Mapping, NoReturn, Optional, Tuple, Union

import torch
from torch.utils._python_dispatch import _disable_current_modes

from . import _library

_library.load()

# Not a string: a forward reference in an alias is resolved in the namespace of whichever
# module uses it (typing.get_type_hints), and "os" is not in every one of them (mixin.py).
PathLike = Union[str, os.PathLike[str]]
DeviceLike = Union[str, int, torch.device]

DEFAULT_ALIGN_BYTES = 128


def _path(path: PathLike, *, must_exist: bool) -> str:
    path = os.fspath(path)
    if isinstance(path, bytes):
        path = os.fsdecode(path)  # as open() takes it; not UTF-8, it is refused below
    if not isinstance(path, str):
        raise TypeError(f"path must be a str, bytes or os.PathLike, got {type(path).__name__}")
    if "\0" in path:
        # The OS would read the path only up to the NUL: "model\0.x" would be "model".
        raise ValueError(f"{path!r}: the path contains a NUL byte")
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        # A Linux file name may hold any bytes (os.fsdecode keeps the others as surrogates);
        # the operators take a str as UTF-8 and would fail with torch's own type error.
        raise ValueError(f"{path!r}: the path is not valid UTF-8, which the flashpack operators need; rename "
                         "the file") from None
    if must_exist:
        try:
            os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            raise FileNotFoundError(errno.ENOENT, "flashpack file not found", path) from None
        except OSError:
            pass  # a loop of links, a folder this process may not search: the reader names the cause
    return path


def _identity(path: str) -> Tuple[int, int, int, int, int]:
    """What changes when the file at ``path`` is replaced (a save renames a new file over
    it) or rewritten in place: for reads that open the path more than once. The inode
    number alone is not enough (a file system reuses a freed one at once), nor are size
    and mtime (two saves within one timestamp tick): the change time is compared too."""
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _device(device: Optional[DeviceLike], what: str = "", argument: str = "device") -> torch.device:
    """``device`` as a torch.device (an int is a GPU index). ``what`` says which call and file
    the device is for: torch's own errors name neither, and a misspelt device is a RuntimeError
    there, not the ValueError of any other wrong argument value."""
    if device is None:
        return torch.device("cpu")
    prefix = f"{what}: " if what else ""
    if not isinstance(device, (str, numbers.Integral, torch.device)):
        raise TypeError(f"{prefix}{argument} must be a str, an int or a torch.device, got {_type_name(device)}")
    try:
        # numpy's integers are GPU indices too, as torch.device takes them.
        return torch.device("cuda", int(device)) if isinstance(device, numbers.Integral) else torch.device(device)
    except RuntimeError as error:
        reason = str(error).splitlines()[0]
        if reason.startswith("Expected one of"):  # torch lists every device type it knows
            reason = "unknown device type"
        raise ValueError(f"{prefix}{argument}={device!r} is not a device "
                         f"(\"cpu\", \"cuda\", \"cuda:1\" or a GPU index; {reason})") from None


_ROUTES = ("auto", "direct", "buffered", "mapped", "register")
_ROUTE_CHOICES = "auto, direct, buffered, mapped or register"  # as errors list them

# Integer dtypes by width: views through them index, copy and compare the bits of any dtype
# (float8, sub-byte and bits dtypes lack kernels of their own).
_SAME_WIDTH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _dtype(dtype: Union[None, str, torch.dtype], what: str) -> Optional[torch.dtype]:
    """``torch.bfloat16`` or its name (``"bfloat16"``, ``"torch.bfloat16"``), as the command line takes it."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    found = getattr(torch, str(dtype).removeprefix("torch."), None) if isinstance(dtype, str) else None
    if not isinstance(found, torch.dtype):
        raise ValueError(f"{what}: {dtype!r} is not a torch dtype (torch.bfloat16 or \"bfloat16\", say)")
    return found


def _check_arguments(what: str, ints: Mapping[str, Any] = {}, bools: Mapping[str, Any] = {}) -> None:
    """Integer and boolean arguments, checked before they reach an operator: its own check is a
    RuntimeError that prints the schema and names neither the file nor what to pass. Their
    values (a negative thread count) are the operators' to check."""
    for name, value in ints.items():
        if not isinstance(value, numbers.Integral):
            raise TypeError(f"{what}: {name} must be an int, got {_type_name(value)} {value!r}")
        if not -2**63 <= value < 2**63:
            raise ValueError(f"{what}: {name}={value} does not fit in 64 bits")
    for name, value in bools.items():
        # bool, numpy's bool, or 0 and 1, as the operators take them.
        if not isinstance(value, numbers.Integral) and not _is_numpy_bool(value):
            raise TypeError(f"{what}: {name} must be a bool, got {_type_name(value)} {value!r}")


def _is_numpy_bool(value: Any) -> bool:
    """Whether ``value`` is numpy's bool (``np.True_``), which is no ``numbers.Integral``."""
    cls = type(value)
    return cls.__module__ == "numpy" and cls.__name__ in ("bool", "bool_")


def _type_name(value: Any) -> str:
    """The name of ``value``'s type, with its module where it is not a builtin: numpy's bool
    is ``numpy.bool``, not a ``bool`` that reads as the type asked for."""
    cls = type(value)
    return cls.__name__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def _is_dtensor(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (FSDP2, tensor parallelism): this rank's part of a tensor
    split over a device mesh. No tensor is one before torch.distributed.tensor is imported,
    so the check imports nothing."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(tensor, dtensor.DTensor)


def _refuse_dtensor(tensor: torch.Tensor, what: str) -> None:
    # A DTensor has no storage of its own: the operator would refuse it as a tensor without
    # data, without saying how to get the whole tensor.
    if _is_dtensor(tensor):
        raise ValueError(
            f"{what} is a DTensor, split over a device mesh as {tuple(tensor.placements)}: gather it with "
            ".full_tensor() on every rank, or take the state dict with torch.distributed.checkpoint.state_dict."
            "get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)), and save that")


def save_file(
    tensors: Mapping[str, torch.Tensor],
    path: PathLike,
    *,
    target_dtype: Optional[torch.dtype] = None,
    align_bytes: int = DEFAULT_ALIGN_BYTES,
    num_threads: int = 0,
    checksum: bool = False,
    durable: bool = True,
    floating_only: bool = True,
    metadata: Optional[Mapping[str, str]] = None,
) -> None:
    """Save a dict of tensors to a flashpack file.

    The file is written to a temporary file beside ``path``, flushed to disk and renamed
    over ``path``: if anything fails, ``path`` keeps its old content and no temporary
    file is left. A file that is replaced keeps its permissions; when ``path`` is a
    symbolic link, the file it points to is replaced, as ``open(path, "w")`` would.
    Tensors that are the same tensor over the same memory (tied weights: same data,
    shape, strides and dtype) are stored once; other views sharing memory (``w`` and
    ``w.view(-1)``) are stored each with its own bytes.

    Args:
        tensors: names to tensors, on any device, contiguous or not. The file keeps the
            dict's order.
        path: the destination file.
        target_dtype: if given, the floating-point tensors are converted to this
            floating-point dtype (see ``floating_only``).
        align_bytes: alignment of each tensor within its block (blocks are page-aligned).
        num_threads: writer threads; 0 picks a default (``FLASHPACK_NUM_THREADS``).
        checksum: also store a CRC-32C of every 16 MiB of the payload in the footer, for
            ``load_file(..., verify=True)`` and ``verify_file``. Other readers ignore it.
        durable: flush the file and its directory entry to disk (fsync) before returning,
            so that not even a power loss can lose it. ``False`` skips the flushes, for
            scratch files: the replacement is still atomic for every other process.
        floating_only: convert only the floating-point tensors to ``target_dtype``, as
            ``nn.Module.to(dtype)`` does: integer, bool and complex tensors keep their dtype
            (position ids stay exact). ``False`` converts every tensor, as the reference's
            ``pack_to_file`` does; a complex tensor is never converted to a real dtype.
        metadata: string pairs kept in the footer, as safetensors' ``save_file`` takes them
            (``{"format": "pt"}``); ``read_metadata(path)["metadata"]`` and
            ``safe_open(path).metadata()`` give them back. Other readers ignore them.

    Raises:
        ValueError: a tensor cannot be stored (quantized, sparse, nested, on the meta device,
            without data in memory, a lazy module's uninitialized parameter), naming it; a
            ``target_dtype`` that is not a torch dtype or would lose values (an integer one
            with ``floating_only``, a real one for a complex tensor); ``align_bytes`` outside
            0 to 2^30 or a negative ``num_threads``.
        TypeError: ``tensors`` is not a mapping; a name that is not a ``str`` or a value that
            is not a tensor, naming it; a metadata key or value that is not a ``str``; an
            integer or boolean option of another type.
        RuntimeError: the file could not be written (disk full, permissions), naming it.

    Example:
        >>> save_file({"w": torch.ones(2, 3)}, "model.flashpack")
    """
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors must be a mapping of str to Tensor, got {type(tensors).__name__}")
    path = _path(path, must_exist=False)
    for name, tensor in tensors.items():
        # Named here: the operator's own check would only say the dict's type is wrong.
        if not isinstance(name, str):
            raise TypeError(f"cannot save '{path}': the name {name!r} is a {type(name).__name__}, not a str")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"cannot save '{path}': '{name}' is a {type(tensor).__name__}, not a Tensor")
        if isinstance(tensor, torch.nn.parameter.UninitializedTensorMixin):
            # A lazy module's parameter before its first forward: an empty placeholder whose
            # shape is not known yet. The operator would store it as an empty tensor, a file
            # no model of the real sizes loads (safetensors and the reference package refuse it too).
            raise ValueError(f"cannot save '{path}': '{name}' is an uninitialized (lazy) "
                             f"{type(tensor).__name__}: run the model once, or build it with its sizes, before "
                             "saving it")
        _refuse_dtensor(tensor, f"cannot save '{path}': '{name}'")
        try:
            name.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"cannot save '{path}': the name {name!r} cannot be written as UTF-8 "
                             f"({exc.reason})") from None
    target_dtype = _dtype(target_dtype, f"cannot save '{path}': target_dtype")
    _check_arguments(f"cannot save '{path}'", ints={"align_bytes": align_bytes, "num_threads": num_threads},
                     bools={"checksum": checksum, "durable": durable, "floating_only": floating_only})
    if metadata is not None:
        if not isinstance(metadata, Mapping):
            raise TypeError(f"cannot save '{path}': metadata must be a mapping of str to str, got "
                            f"{type(metadata).__name__}")
        for key, value in metadata.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise TypeError(f"cannot save '{path}': metadata must map str to str; {key!r}: {value!r} does not")
            for text in (key, value):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as exc:
                    raise ValueError(f"cannot save '{path}': the metadata {text!r} cannot be written as UTF-8 "
                                     f"({exc.reason})") from None
        metadata = dict(metadata)
    torch.ops.flashpack.save(
        dict(tensors), path, target_dtype=target_dtype,
        align_bytes=align_bytes, num_threads=num_threads, checksum=checksum, durable=durable,
        floating_only=floating_only, metadata=metadata,
    )


def load_file(
    path: PathLike,
    device: DeviceLike = "cpu",
    *,
    copy: bool = False,
    num_threads: int = 0,
    chunk_bytes: int = 0,
    pinned_bytes: int = 0,
    num_streams: int = 0,
    route: str = "auto",
    verify: bool = False,
    names: Optional[Iterable[str]] = None,
) -> Dict[str, torch.Tensor]:
    """Load a flashpack file as a dict of tensors, in the file's order.

    On the CPU the tensors are views into a private memory map of the file (nothing is
    copied; writing to a tensor never changes the file). On CUDA the payload is streamed
    to the GPU. Tied tensors come back as views of the same memory.

    Args:
        path: a file written by flashpack_ops or the reference ``flashpack`` package.
        device: ``"cpu"``, ``"cuda"`` (the current device), ``"cuda:N"`` or an index.
        copy: CPU only; read into fresh memory instead of mapping the file. The memory is one
            allocation per block, as on CUDA: it is freed once no tensor of the block is alive
            (keep ``t.clone()`` of a small tensor to let the rest go).
        num_threads: reader threads; 0 picks a default (``FLASHPACK_NUM_THREADS``).
        chunk_bytes: CUDA only; bytes per read or registration (``FLASHPACK_CHUNK_BYTES``).
        pinned_bytes: CUDA only; pinned host memory this load may hold, 256 MiB by
            default (``FLASHPACK_PINNED_BYTES``).
        num_streams: CUDA only; copy streams, 4 by default (``FLASHPACK_NUM_STREAMS``).
        route: CUDA only; ``"auto"`` (``"mapped"``, copies out of a mapping of the file, if
            it is in the page cache, else ``"direct"``, O_DIRECT reads), ``"buffered"``,
            ``"mapped"``, ``"direct"`` or ``"register"`` (``FLASHPACK_CUDA_ROUTE``). See
            docs/cuda.md.
        verify: check the payload against the checksums stored by ``save_file(...,
            checksum=True)`` before returning (on the host, also for CUDA; the whole file,
            also with ``names``).
        names: load only these entries: only their bytes are read and, on CUDA, only they
            take GPU memory (entries less than 1 MiB apart are read as one range). For
            one stage of a pipeline, or one GPU's part of a model. All entries if None.

    Returns:
        Dict[str, torch.Tensor]: the tensors, bit for bit as saved.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a valid flashpack file; the message names the file,
            the entry and the problem. With ``verify``: the payload does not match its
            checksums, or none were stored. With ``names``: a name the file lacks. Also an
            unknown ``device`` or ``route``, a negative count, or CUDA asked for where
            there is none.
        TypeError: ``names`` is a ``str`` or holds something else, ``device`` is neither a
            str, an int nor a torch.device, or an integer or boolean option has another type.
        RuntimeError: the file could not be read (a directory, no permission).

    Example:
        >>> state_dict = load_file("model.flashpack", device="cuda")

    Under ``torch.compile`` (``fullgraph=True`` included) this traces as
    ``flashpack::load_list``, and the names, read from the file's index when compiling,
    are zipped back. The file is read each time the compiled code runs; if it was saved
    since with another layout (names, shapes, dtypes or tied tensors), the load raises
    ValueError: call ``torch.compiler.reset()`` to trace it again.
    """
    if route not in _ROUTES:
        # Checked here for every device: the CPU path has no use for it and would not say.
        raise ValueError(f"cannot load '{os.fspath(path)}': unknown route {route!r} (expected {_ROUTE_CHOICES})")
    _check_arguments(f"cannot load '{os.fspath(path)}'",
                     ints={"num_threads": num_threads, "chunk_bytes": chunk_bytes, "pinned_bytes": pinned_bytes,
                           "num_streams": num_streams}, bools={"copy": copy, "verify": verify})
    if names is not None:
        if isinstance(names, str) or not isinstance(names, Iterable):
            raise TypeError(f"cannot load '{os.fspath(path)}': names must be a list of entry names, not the "
                            f"{type(names).__name__} {names!r}")
        names = tuple(names)
        if not all(isinstance(name, str) for name in names):
            raise TypeError(f"cannot load '{os.fspath(path)}': names must all be str")
    if torch.compiler.is_compiling() or torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.PROXY) is not None:
        # Dynamo cannot trace an op returning a dict, nor make_fx one returning names (str[]);
        # load_list returns the same tensors.
        path = _path(path, must_exist=False)
        selection = names
        layout = _traced_layout(path, names)
        if layout is None:
            # The file cannot be read now: the op breaks the graph, runs and says why.
            torch.ops.flashpack.load_list(path, _device(device, f"cannot load '{path}'"), names=names)
            raise RuntimeError(f"'{path}' could not be read when this code was compiled and can be now: call "
                               "torch.compiler.reset() to trace it again")
        names, firsts, shapes, signature = layout
        if selection == () and not verify:
            # An empty selection reads nothing. With verify=True it still checks the whole
            # file, so the op runs (eagerly, between graphs: see _load_list_fake).
            return {}
        # distinct: one tensor per group of tied entries, since a custom operator's outputs
        # must not alias each other. A tied name then takes the very tensor of the first name
        # of its group: the graph knows they are one, and an in-place update through one
        # name shows through the other, as in eager mode.
        tensors = torch.ops.flashpack.load_list(
            path, _device(device, f"cannot load '{path}'"), copy=copy, num_threads=num_threads,
            chunk_bytes=chunk_bytes, pinned_bytes=pinned_bytes, num_streams=num_streams, route=route, verify=verify,
            expect_layout=signature, distinct=True, names=names,
        )
        position = {k: n for n, k in enumerate(k for k, first in enumerate(firsts) if first == k)}
        out = {}
        for name, first, shape in zip(names, firsts, shapes):
            tensor = tensors[position[first]]
            # Tied entries share bytes, not always a shape (another writer's [6] and [2, 3]).
            out[name] = tensor if tuple(tensor.shape) == shape else tensor.view(shape)
        return out
    # Two lists zipped here: a dict made by the op costs about a sixth more for many tensors.
    with _collector_paused():
        keys, tensors = torch.ops.flashpack.load_named(
            _path(path, must_exist=True), _device(device, f"cannot load '{os.fspath(path)}'"), copy=copy,
            num_threads=num_threads, chunk_bytes=chunk_bytes, pinned_bytes=pinned_bytes, num_streams=num_streams,
            route=route, verify=verify, names=names,
        )
        return dict(zip(keys, tensors))


@contextlib.contextmanager
def _collector_paused():
    # NOTE: a load makes two Python objects per tensor (its name and the tensor), and every
    # 700 new objects start a pass of Python's cyclic garbage collector over the young ones,
    # now and then over the whole heap: 20,000 tensors took 10% longer on average, and a
    # load that met a full pass took 90 ms instead of 21. None of these objects is garbage,
    # so the passes are put off until the load returns. A collector turned off by the caller
    # stays off.
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def cuda_stats(reset_peaks: bool = False) -> Dict[str, int]:
    """Counters of the CUDA load path, for tests and benchmarks.

    Keys: ``pinned_bytes`` / ``pinned_peak_bytes`` (pinned staging memory held by the
    process-wide pool now / at most), ``registered_bytes`` / ``registered_peak_bytes``
    (file pages registered with the driver), ``loads`` (CUDA loads completed), and the bytes
    copied to GPUs after an O_DIRECT read (``bytes_direct``), a buffered read
    (``bytes_buffered``), a copy out of the mapped file (``bytes_mapped``) or straight from
    the registered page cache (``bytes_registered``),
    and ``register_fallbacks`` (loads that staged because the driver refused or cannot do registration);
    ``ns_loads``, ``ns_index``, ``ns_copy``, ``ns_views``, ``ns_read``, ``ns_register``,
    ``ns_unregister`` and ``ns_wait``: time spent loading, and in each step summed over
    threads (nanoseconds, see docs/cuda.md);
    ``ns_unmap``: unmapping registered mappings, after their loads returned, and
    ``unmapping_bytes``: the bytes of those mappings not unmapped yet.
    The byte and time counters only grow: compare them before and after a load.

    Args:
        reset_peaks: restart both peaks from the current values (after reading them).

    Returns:
        Dict[str, int]: the counters; empty if flashpack_ops was built without CUDA.

    Example:
        >>> before = cuda_stats().get("bytes_registered", 0)  # empty dict on a CPU-only build
    """
    return dict(torch.ops.flashpack.cuda_stats(reset_peaks))


def release_pinned_memory() -> int:
    """Free the pinned staging memory the CUDA path keeps between loads.

    Returns:
        int: the bytes freed (0 without CUDA, or when no load has run).

    Example:
        >>> freed = release_pinned_memory()
    """
    return int(torch.ops.flashpack.release_pinned_memory())


def verify_file(path: PathLike, *, num_threads: int = 0) -> None:
    """Check a flashpack file's payload against the checksums stored in its footer.

    Reads the whole payload (with several threads) and compares the CRC-32C of each
    16 MiB chunk of each block with the one ``save_file(..., checksum=True)`` stored.

    Args:
        path: a flashpack file saved with ``checksum=True``.
        num_threads: reader threads; 0 picks a default (``FLASHPACK_NUM_THREADS``).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a chunk does not match (the message names the file, the block, the
            byte range and the tensors in it), no checksums were stored, or the file is
            not a valid flashpack file.
        TypeError: ``num_threads`` is not an int.
        RuntimeError: the file could not be read.

    Example:
        >>> verify_file("model.flashpack")  # returns None when every byte matches
    """
    path = _path(path, must_exist=True)
    _check_arguments(f"cannot verify '{path}'", ints={"num_threads": num_threads})
    torch.ops.flashpack.verify(path, num_threads=num_threads)


def read_metadata(path: PathLike) -> Dict[str, Any]:
    """The footer of a flashpack file as a dict, validated without reading the payload.

    Args:
        path: a flashpack file (either format).

    Returns:
        Dict[str, Any]: the footer: ``format``, ``align_bytes``, ``index`` (each entry's
        ``name``, ``shape``, ``offset``, ``length``), ``macroblocks`` in a flashpack_v4 file,
        and ``metadata`` where ``save_file(..., metadata=)`` stored some.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a valid flashpack file.
        RuntimeError: the file could not be read (a directory, no permission).

    Example:
        >>> [entry["name"] for entry in read_metadata("model.flashpack")["index"]]
    """
    return json.loads(torch.ops.flashpack.read_footer(_path(path, must_exist=True)))


# torch.compile and torch.export: fake implementations, run when tracing. The file's
# footer gives every name, shape and dtype, so a graph knows the outputs of a load
# without reading the payload.


def _selected(index: List[Dict[str, Any]], names: Optional[Iterable[str]], op: str, path: str) -> List[Dict[str, Any]]:
    """The index entries a load of ``names`` returns (all if None), in index order; the
    error select_entries() in csrc/format.cpp raises for names the file lacks."""
    if names is None:
        return index
    names = list(names)
    wanted = dict.fromkeys(names)
    chosen = [entry for entry in index if entry["name"] in wanted]
    found = {entry["name"] for entry in chosen}
    missing = [name for name in wanted if name not in found]
    if missing:
        listed = ", ".join(f"'{name}'" for name in missing[:5])
        if len(missing) > 5:
            listed += f" and {len(missing) - 5} more"
        # The entry a str passed as names spells, or a run of several such characters.
        characters = len(names) > 1 and all(len(name) == 1 for name in names) and (
            "".join(names) in {entry["name"] for entry in index} or len(missing) > 1)
        hint = "; a str passed as names is taken as a list of its characters: pass a list of names" if characters \
            else ""
        raise ValueError(f"{op}: '{path}' has no entr{'y' if len(missing) == 1 else 'ies'} {listed} (of the names "
                         f"asked for{hint})")
    return chosen


def _traced_layout(
    path: str, names: Optional[Tuple[str, ...]] = None,
) -> Optional[Tuple[Tuple[str, ...], Tuple[int, ...], Tuple[Tuple[int, ...], ...], str]]:
    """What load_file's compiled form builds its dict from, read once when tracing: the
    names of the entries loaded (``names``, or all) in index order, for each the index of
    the first of them it is tied to (itself if none) and its shape, and the whole file's
    layout signature load_list then checks the file against. None if the file cannot be
    read or lacks a name (an error raised here would reach the caller as Dynamo's own)."""
    # Outside any tracing mode: torch.export would otherwise record the reads in its graph.
    try:
        with _disable_current_modes():
            footer = json.loads(torch.ops.flashpack.read_footer(path))
            signature = torch.ops.flashpack.layout_signature(path)
        index = _selected(footer["index"], names, "flashpack::load_list", path)
    except (ValueError, RuntimeError):
        return None
    return (tuple(entry["name"] for entry in index), tuple(_tie_groups(index)),
            tuple(tuple(entry["shape"]) for entry in index), signature)


def _tie_groups(index: List[Dict[str, Any]]) -> List[int]:
    """For each index entry, the first entry it shares its bytes with (itself if none): the
    ties the real op makes (same block, offset and length; empty entries share nothing)."""
    firsts, first_of = [], {}
    for k, entry in enumerate(index):
        key = (entry.get("macroblock", 0), entry["offset"], entry["length"])
        firsts.append(first_of.setdefault(key, k) if entry["length"] > 0 else k)
    return firsts


# NOTE: load_file calls _traced_layout before any op of its own, so Dynamo must know it is
# constant before the first trace. torch.compiler.assume_constant_result sets this very
# attribute, but importing it imports Dynamo (0.7 s) with flashpack_ops; _fake_views makes
# the public call too, so the mark holds whatever Dynamo's internals become.
_traced_layout._dynamo_marked_constant = True  # type: ignore[attr-defined]


def _raise_as(op: str, error: Exception) -> NoReturn:
    # The fakes read the footer through read_footer; a bad file must fail as the real
    # op does, with the real op's name in front of the same message.
    message = str(error)
    prefix = "flashpack::read_footer: "
    if message.startswith(prefix):
        raise type(error)(op + ": " + message[len(prefix):]) from None
    raise error


def _refuse(message: str) -> NoReturn:
    """A fake's ValueError for what the real op refuses too. Under Dynamo it breaks the
    graph instead (a ValueError would surface as Dynamo's own TorchRuntimeError, which
    ``except ValueError`` misses): the real op then runs eagerly and raises the real error,
    or does what a graph cannot (fullgraph=True reports this message)."""
    if torch._guards.TracingContext.try_get() is not None:
        from torch._subclasses.fake_tensor import UnsupportedOperatorException

        raise UnsupportedOperatorException(message)
    raise ValueError(message)


def _check_options(op: str, path: str, num_threads: int = 0, chunk_bytes: int = 0, pinned_bytes: int = 0,
                   num_streams: int = 0, route: str = "auto") -> None:
    """The real op's checks of its options (check_options in csrc/flashpack.cpp), in its words:
    a traced program must not take what every run of it would refuse."""
    for name, value in (("num_threads", num_threads), ("chunk_bytes", chunk_bytes), ("pinned_bytes", pinned_bytes),
                        ("num_streams", num_streams)):
        if value < 0:
            _refuse(f"{op}: cannot load '{path}': {name} must be >= 0 (0 picks the default), got {value}")
    if route not in _ROUTES:
        _refuse(f"{op}: cannot load '{path}': unknown route {route!r} (expected {_ROUTE_CHOICES})")


def _fake_footer(op: str, path: str, device: torch.device) -> Tuple[Dict[str, Any], List[Tuple[str, int]]]:
    """The footer and each block's (dtype name, elements), after the checks load_any() in
    csrc/flashpack.cpp makes, in the same order and words."""
    if device.type == "cuda" and not torch.ops.flashpack.built_with_cuda():
        if torch.cuda.is_available():
            _refuse(f"{op}: cannot load '{path}' to {device}: flashpack_ops was built without CUDA "
                    "(rebuild with a CUDA build of torch and nvcc on the PATH)")
        _refuse(f"{op}: cannot load '{path}' to {device}: no CUDA device is available "
                "(torch.cuda.is_available() is False); load to cpu")
    if device.type not in ("cpu", "cuda"):
        _refuse(f"{op}: cannot load '{path}' to {device}: only cpu and cuda are supported")
    try:
        # Outside the fake mode: it would log every bad file as a failed meta kernel.
        with _disable_current_modes():
            footer = json.loads(torch.ops.flashpack.read_footer(path))
    except (ValueError, RuntimeError) as error:
        if torch._guards.TracingContext.try_get() is not None:
            # Under Dynamo, an error here would surface as its own TorchRuntimeError, which
            # `except ValueError` misses: break the graph instead, so that the real op runs
            # eagerly and raises the real error (fullgraph=True reports this message).
            from torch._subclasses.fake_tensor import UnsupportedOperatorException

            message = str(error).removeprefix("flashpack::read_footer: ")
            raise UnsupportedOperatorException(f"{op}: {message}") from None
        _raise_as(op, error)
    return footer, _footer_blocks(footer)


def _footer_blocks(footer: Dict[str, Any]) -> List[Tuple[str, int]]:
    """Each block of a footer read_footer has validated, as (dtype name, elements), as the
    C++ reader (and the reference) takes them: by "format", so that a flashpack_v3 footer is
    one block of "target_dtype" whatever other keys (another writer's "macroblocks") it holds."""
    if footer["format"] == "flashpack_v3":
        return [(footer["target_dtype"], footer["total_elems"])]
    return [(block["dtype"], block["length_elems"]) for block in footer["macroblocks"]]


def _fake_views(op: str, path: str, device: torch.device,
                selection: Optional[List[str]] = None) -> Tuple[List[str], List[torch.Tensor], List[int]]:
    """The names and fake tensors of a load (of the entries in ``selection``, or all), and
    for each the first of them it is tied to."""
    footer, blocks = _fake_footer(op, path, device)
    try:
        index = _selected(footer["index"], selection, op, path)
    except ValueError as error:
        _refuse(str(error))
    # Like the real op, each entry has a storage of its own, except tied entries (same
    # block, offset and length), which share one: aliasing between outputs is the same.
    names, tensors, firsts = [], [], _tie_groups(index)
    for k, (entry, first) in enumerate(zip(index, firsts)):
        dtype = getattr(torch, blocks[entry.get("macroblock", 0)][0])
        if first == k:
            tensor = torch.empty(entry["shape"], dtype=dtype, device=device)
        else:
            tensor = torch.empty(0, dtype=dtype, device=device)
            tensor.set_(tensors[first].untyped_storage(), 0, entry["shape"])
        names.append(entry["name"])
        tensors.append(tensor)
    # load_file() zips these names in while Dynamo traces it. Marking _traced_layout
    # imports Dynamo (0.7 s), so it is done here, where a trace is already under way,
    # rather than when flashpack_ops is imported.
    torch.compiler.assume_constant_result(_traced_layout)
    return names, tensors, firsts


def _is_exporting() -> bool:
    # torch 2.6 has no torch.compiler.is_exporting (its export cannot keep a load of no entries).
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return is_exporting is not None and is_exporting()


@torch.library.register_fake("flashpack::load_list")
def _load_list_fake(path, device=torch.device("cpu"), *, copy=False, num_threads=0, chunk_bytes=0, pinned_bytes=0,
                    num_streams=0, route="auto", verify=False, expect_layout=None, distinct=False, names=None):
    op = "flashpack::load_list"
    _check_options(op, path, num_threads, chunk_bytes, pinned_bytes, num_streams, route)
    selection = names
    names, tensors, firsts = _fake_views(op, path, device, selection)
    if not tensors and torch._guards.TracingContext.try_get() is not None and not _is_exporting():
        # A load that returns nothing (a file without entries, names=[]) is still a check: of
        # the file's layout, its existence, its checksums with verify=True. Inductor cannot
        # lower an operator that returns no tensor (it finds no device for it): under
        # torch.compile the load breaks the graph and runs eagerly, as a verify does (an
        # exported program keeps it as a node).
        from torch._subclasses.fake_tensor import UnsupportedOperatorException

        raise UnsupportedOperatorException(f"{op}: '{path}': a load of no entries runs eagerly, between graphs")
    if distinct:
        return [t for k, t in enumerate(tensors) if firsts[k] == k]
    tied = [(names[first], names[k]) for k, first in enumerate(firsts) if first != k]
    if tied:
        # A traced graph takes a custom operator's outputs as separate memory (torch.compile
        # refuses outputs that alias); the real op would return one storage twice.
        _refuse(f"{op}: '{path}' has tied entries ('{tied[0][0]}' and '{tied[0][1]}' share their bytes), which "
                "a traced graph cannot take as separate outputs: pass distinct=True, or use "
                "flashpack_ops.load_file(), which ties the names back")
    return tensors


@torch.library.register_fake("flashpack::load")
def _load_fake(path, device=torch.device("cpu"), *, copy=False, num_threads=0, chunk_bytes=0, pinned_bytes=0,
               num_streams=0, route="auto", verify=False, names=None):
    # Dynamo cannot put an op returning a dict in a graph; with this fake it breaks the
    # graph there instead of failing, and opcheck and export can run the op.
    _check_options("flashpack::load", path, num_threads, chunk_bytes, pinned_bytes, num_streams, route)
    names, tensors, _ = _fake_views("flashpack::load", path, device, names)
    return dict(zip(names, tensors))


@torch.library.register_fake("flashpack::load_named")
def _load_named_fake(path, device=torch.device("cpu"), *, copy=False, num_threads=0, chunk_bytes=0, pinned_bytes=0,
                     num_streams=0, route="auto", verify=False, names=None):
    _check_options("flashpack::load_named", path, num_threads, chunk_bytes, pinned_bytes, num_streams, route)
    names, tensors, _ = _fake_views("flashpack::load_named", path, device, names)
    return names, tensors


@torch.library.register_fake("flashpack::load_blocks")
def _load_blocks_fake(path, device=torch.device("cpu"), *, copy=False, num_threads=0, chunk_bytes=0,
                      pinned_bytes=0, num_streams=0, route="auto", verify=False):
    _check_options("flashpack::load_blocks", path, num_threads, chunk_bytes, pinned_bytes, num_streams, route)
    _, blocks = _fake_footer("flashpack::load_blocks", path, device)
    return [torch.empty(elems, dtype=getattr(torch, dtype), device=device) for dtype, elems in blocks]


@torch.library.register_fake("flashpack::save")
def _save_fake(tensors, path, *, target_dtype=None, align_bytes=DEFAULT_ALIGN_BYTES, num_threads=0,
               checksum=False, durable=True, floating_only=True, metadata=None):
    # A save has no output for a graph to keep, so a graph would be free to drop it
    # (Inductor does), or to move it past a load of the same file. Refusing fake tensors
    # makes Dynamo break the graph here and run the save eagerly, in program order.
    from torch._subclasses.fake_tensor import UnsupportedOperatorException

    raise UnsupportedOperatorException(
        f"flashpack::save writes '{path}': torch.compile runs it eagerly, between graphs")


@torch.library.register_fake("flashpack::verify")
def _verify_fake(path, *, num_threads=0):
    # Like a save, a check has no output for a graph to keep, and dropping it would drop
    # the error it exists to raise: it runs eagerly, between graphs.
    from torch._subclasses.fake_tensor import UnsupportedOperatorException

    raise UnsupportedOperatorException(f"flashpack::verify reads '{path}': torch.compile runs it eagerly")


@torch.library.register_fake("flashpack::read_range")
def _read_range_fake(path, offset, length, device=torch.device("cpu"), *, num_threads=0):
    if num_threads < 0:
        _refuse(f"flashpack::read_range: num_threads must be >= 0 (0 picks the default), got {num_threads}")
    if device.type not in ("cpu", "cuda"):
        _refuse(f"flashpack::read_range: cannot read '{path}' to {device}: only cpu and cuda are supported")
    if offset < 0 or length < 0:
        _refuse(f"flashpack::read_range: '{path}': cannot read {length} bytes at offset {offset}")
    return torch.empty(length, dtype=torch.uint8, device=device)


# NOTE: a graph drops a call whose result nothing uses; a load is worth running for itself
# (verify=True exists to raise), and every run must read the file as it is then.
for _op in ("load", "load_list", "load_blocks", "read_range"):
    torch.fx.node.has_side_effect(getattr(torch.ops.flashpack, _op).default)
