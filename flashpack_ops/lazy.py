"""``safe_open``: safetensors' reading API over a flashpack file, for code written for it."""

from __future__ import annotations

import ctypes
import mmap
import os
import weakref
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from .ops import _SAME_WIDTH_INT, PathLike, _device, _identity, _path, load_file, read_metadata

# safetensors' names for the dtypes it stores; others go by torch's name.
_SAFETENSORS_DTYPES = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.uint16: "U16",
    torch.int32: "I32", torch.uint32: "U32", torch.int64: "I64", torch.uint64: "U64", torch.float16: "F16",
    torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64", torch.complex64: "C64",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
for _name, _code in (("float8_e4m3fnuz", "F8_E4M3FNUZ"), ("float8_e5m2fnuz", "F8_E5M2FNUZ"),
                     ("float8_e8m0fnu", "F8_E8M0"), ("float4_e2m1fn_x2", "F4")):
    if hasattr(torch, _name):  # newer dtypes
        _SAFETENSORS_DTYPES[getattr(torch, _name)] = _code


# Dtypes whose clone() has a kernel (the common ones; the rest go through integer views).
_CLONES = {torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
           torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128}


class safe_open:  # noqa: N801 - safetensors' name, so that code written for it runs unchanged
    """Open a flashpack file and read tensors by name, as ``safetensors.safe_open`` does.

    The file is mapped, not read: reading a few tensors (or slices of one) of a large file
    reads only their bytes. ``get_tensor`` and slices return fresh tensors: changing one
    changes nothing else. On the CPU, ``get_tensor`` gives each tensor of 64 KiB or more a
    private mapping of its own bytes of the file (copy-on-write, like ``load_file``'s views),
    and copies smaller ones, so reading every tensor costs little memory beyond the file's
    pages in the page cache. Like those views, such a tensor follows a program that rewrites the
    file in place, and reading it after the file is truncated kills the process with SIGBUS
    (replacing the file, as ``save_file`` does, is safe): see docs/security.md. For the whole file,
    ``load_file(path)`` and ``load_file(path, "cuda")`` are much faster.

    Args:
        filename: a flashpack file (either format).
        framework: ``"pt"`` (PyTorch), the only framework.
        device: where tensors go: ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or a GPU index.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: another framework, the meta device or one not available here, or not a
            valid flashpack file (the message names the file, the entry and the problem).

    Where it differs from safetensors: a name the file lacks raises ``KeyError`` (not
    ``SafetensorError``), and ``metadata()`` is None for a file saved with ``metadata={}``.

    Example:
        >>> with safe_open("model.flashpack", framework="pt", device="cpu") as f:
        ...     embed = f.get_tensor("embed.weight")
        ...     rows = f.get_slice("lm_head.weight")[:1024]
    """

    def __init__(self, filename: PathLike, framework: str = "pt", device: Union[str, int, torch.device] = "cpu"):
        self._path = os.fspath(filename)
        if framework not in ("pt", "torch", "pytorch"):
            raise ValueError(f"cannot open '{self._path}' for framework {framework!r}: flashpack_ops reads "
                             "PyTorch tensors only (framework=\"pt\")")
        self._device = _device(device, f"cannot open '{self._path}'")
        if self._device.type == "meta":  # as safetensors refuses it: a meta tensor reads nothing
            raise ValueError(f"cannot open '{self._path}' for {self._device}: the meta device holds no data")
        if self._device.type not in ("cpu", "cuda"):
            # Another accelerator (xpu, mps...): said now, not at the first get_tensor.
            try:
                torch.empty(0, device=self._device)
            except Exception as error:  # noqa: BLE001 - each backend fails in its own way
                raise ValueError(f"cannot open '{self._path}' for {self._device}: the device is not available "
                                 f"here ({type(error).__name__}: {error})") from None
        if self._device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"cannot open '{self._path}' for {self._device}: no CUDA device is available "
                             "(torch.cuda.is_available() is False)")
        if self._device.type == "cuda" and (self._device.index or 0) >= torch.cuda.device_count():
            # Said now, as load_file says it, not by the first get_tensor's CUDA error.
            raise ValueError(f"cannot open '{self._path}' for {self._device}: only {torch.cuda.device_count()} "
                             "CUDA device(s) are visible")
        # The metadata is read apart from the load: the same file before and after, so that a
        # file replaced meanwhile (an atomic save) cannot pair one file's metadata with
        # another's tensors.
        for _ in range(3):
            before = _identity(load_path := _path(self._path, must_exist=True))
            self._metadata: Optional[Dict[str, str]] = dict(torch.ops.flashpack.metadata(load_path)) or None
            self._tensors: Optional[Dict[str, torch.Tensor]] = load_file(load_path, "cpu")
            # get_tensor maps each tensor's bytes from this descriptor: the file read above.
            self._file: Optional[_OpenFile] = _OpenFile(load_path) if self._device.type == "cpu" else None
            if self._file is not None:
                stat = os.fstat(self._file.fd)
                if (stat.st_dev, stat.st_ino) != before[:2]:
                    self._file.close()
                    continue
                self._offsets = _file_offsets(read_metadata(load_path), self._tensors)
            if _identity(load_path) == before:
                return
            if self._file is not None:
                self._file.close()
        raise RuntimeError(f"'{self._path}' was replaced three times while it was opened; open it again")

    def __enter__(self) -> "safe_open":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        # The map stays alive as long as a returned view does.
        self._tensors = None
        if self._file is not None:
            self._file.close()

    def __reduce__(self) -> Any:
        # Refused, as safetensors refuses it (copy.copy and copy.deepcopy too): a copy would hold
        # this process's number for the open file, which in another process, or here once the
        # handle is closed, names another file or none (get_tensor would map that file's bytes),
        # and every tensor of the file besides.
        raise TypeError(f"cannot pickle 'safe_open' object ('{self._path}'): it holds an open file; open the "
                        "file in the process that reads it (in a DataLoader worker: in the dataset's __getitem__ "
                        "or its worker_init_fn)")

    def _open(self) -> Dict[str, torch.Tensor]:
        if self._tensors is None:
            raise ValueError(f"'{self._path}' is closed (used after its with block)")
        return self._tensors

    def _entry(self, name: str) -> torch.Tensor:
        tensors = self._open()
        if name not in tensors:
            raise KeyError(f"'{self._path}' has no tensor named '{name}'")
        return tensors[name]

    def keys(self) -> List[str]:
        """The tensor names, sorted (as safetensors lists them)."""
        return sorted(self._open())

    def offset_keys(self) -> List[str]:
        """The tensor names by where their bytes lie in the file, as safetensors orders them
        (blocks are by dtype, so names of one dtype come together; tied names in index
        order; empty tensors, which hold no bytes, last)."""
        tensors = self._open()
        # Every tensor views one mapping of the file: addresses order as file offsets do.
        return sorted(tensors, key=lambda name: (tensors[name].numel() == 0, tensors[name].data_ptr()))

    def metadata(self) -> Optional[Dict[str, str]]:
        """The string pairs saved with the file (``save_file(..., metadata=...)``), or None."""
        self._open()
        return None if self._metadata is None else dict(self._metadata)  # the caller's own, as safetensors gives it

    def get_tensor(self, name: str) -> torch.Tensor:
        """The tensor ``name``, on the device given at open. Raises KeyError if there is none."""
        tensor = self._entry(name)
        if self._file is not None and tensor.dtype in _CLONES and tensor.nbytes >= _MAPPED_BYTES:
            mapped = _map_private(self._file.fd, self._offsets[name], tensor)
            if mapped is not None:
                return mapped
        return _copy(tensor, ..., self._device)

    def get_tensors(self) -> Dict[str, torch.Tensor]:
        """Every tensor, by name in ``offset_keys()`` order, as ``get_tensor`` gives each."""
        return {name: self.get_tensor(name) for name in self.offset_keys()}

    def get_slice(self, name: str) -> "_Slice":
        """A handle on ``name`` that reads only what it is indexed with: ``f.get_slice(n)[:, 0:128]``."""
        return _Slice(self._entry(name), self._device)


class _Slice:
    """What ``safe_open.get_slice`` returns: shape and dtype without reading, and indexing."""

    def __init__(self, tensor: torch.Tensor, device: torch.device):
        self._tensor, self._device = tensor, device

    def get_shape(self) -> List[int]:
        """The tensor's shape, as indexing takes it. For ``float4_e2m1fn_x2`` (``"F4"``) that is
        torch's shape, two values per element, where safetensors counts single values."""
        return list(self._tensor.shape)

    def get_dtype(self) -> str:
        """safetensors' name for the dtype (``"F32"``, ``"BF16"``...); torch's for the dtypes
        safetensors lacks (``"complex32"``, ``"uint4"``)."""
        dtype = self._tensor.dtype
        return _SAFETENSORS_DTYPES.get(dtype, str(dtype).removeprefix("torch."))

    def __getitem__(self, index: Any) -> torch.Tensor:
        # A copy, as safetensors gives (contiguous, where its column slices may not be).
        return _copy(self._tensor, index, self._device)


# NOTE: a mapping costs about 15-25 us to make (a system call, and the Python objects that
# unmap it), a copy about 12 us for 4 KiB, 25 us for 32 KiB, 400 us for 4 MiB (2-core VM):
# smaller tensors are copied, which also keeps the number of mappings (vm.max_map_count) low.
_MAPPED_BYTES = 64 << 10


class _OpenFile:
    """A read-only descriptor of the opened file, closed by close() or when collected."""

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self._finalizer = weakref.finalize(self, os.close, self.fd)

    def close(self) -> None:
        self._finalizer()


def _file_offsets(footer: Dict[str, Any], tensors: Dict[str, torch.Tensor]) -> Dict[str, int]:
    """Each entry's first byte in the file: its block's start plus its offset, in elements of
    the block's dtype. A flashpack_v3 file has one block, at byte 0, whatever other keys
    (another writer's "macroblocks") its footer holds: the format decides, as for the reader."""
    v3 = footer["format"] == "flashpack_v3"
    return {entry["name"]: (0 if v3 else footer["macroblocks"][entry.get("macroblock", 0)]["offset_bytes"])
            + entry["offset"] * tensors[entry["name"]].element_size()
            for entry in footer["index"] if entry["name"] in tensors}


_libc: Optional[Tuple[Any, Any]] = None


def _mmap_functions() -> Optional[Tuple[Any, Any]]:
    global _libc
    if _libc is None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.mmap.restype = ctypes.c_void_p
            libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                  ctypes.c_int64]
            libc.munmap.restype = ctypes.c_int
            libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
            _libc = (libc.mmap, libc.munmap)
        except (OSError, AttributeError):
            _libc = ()
    return _libc or None


def _map_private(fd: int, offset: int, like: torch.Tensor) -> Optional[torch.Tensor]:
    """``like``'s bytes, at ``offset`` in the file, in a private mapping of their own: no copy
    is made, and writes to the tensor reach neither the file nor any other tensor. None where
    the mapping cannot be made (the caller then copies)."""
    functions = _mmap_functions()
    if functions is None:
        return None
    map_, unmap = functions
    nbytes = like.numel() * like.element_size()
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    length = offset - start + nbytes
    address = map_(None, length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE, fd, start)
    if address is None or address == ctypes.c_void_p(-1).value:
        return None
    memory = (ctypes.c_ubyte * length).from_address(address)
    # Unmapped when the last tensor over these bytes is freed (torch.frombuffer holds memory),
    # and never at exit: weakref.finalize runs its pending finalizers then, while objects torn
    # down later (a __del__, a daemon thread) may still read the tensor. The process's end
    # unmaps it.
    weakref.finalize(memory, unmap, address, length).atexit = False
    flat = torch.frombuffer(memory, dtype=torch.uint8, count=nbytes, offset=offset - start)
    return flat.view(like.dtype).view(like.shape)


def _copy(tensor: torch.Tensor, index: Any, device: torch.device) -> torch.Tensor:
    """A contiguous copy of ``tensor[index]`` on ``device``. Indexing and copy kernels lack
    some dtypes (the sub-byte ones): their bits are indexed and copied as integers."""
    if index is ... and device.type == "cpu" and tensor.dtype in _CLONES:
        # NOTE: get_tensor's case, once per tensor of a file: no indexing, no views.
        return tensor.clone()
    width = _SAME_WIDTH_INT.get(tensor.element_size())
    part = (tensor.view(width) if width is not None else tensor)[index]
    if device.type == "cpu":
        part = part.clone(memory_format=torch.contiguous_format)
    else:
        part = part.to(device, memory_format=torch.contiguous_format)
    return part.view(tensor.dtype) if width is not None else part
