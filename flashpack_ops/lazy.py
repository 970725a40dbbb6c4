"""``safe_open``: safetensors' reading API over a flashpack file, for code written for it."""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Union

import torch

from .ops import _SAME_WIDTH_INT, PathLike, _device, _identity, _path, load_file

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
    reads only their bytes. ``get_tensor`` and slices return fresh tensors, as safetensors'
    do: changing one changes nothing else. For the whole file, ``load_file(path)`` (views of
    the mapped file, no copy) and ``load_file(path, "cuda")`` are much faster.

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
            if _identity(load_path) == before:
                return
        raise RuntimeError(f"'{self._path}' was replaced three times while it was opened; open it again")

    def __enter__(self) -> "safe_open":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        # The map stays alive as long as a returned view does.
        self._tensors = None

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
        return _copy(self._entry(name), ..., self._device)

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
