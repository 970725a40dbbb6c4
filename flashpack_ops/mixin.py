"""``FlashPackMixin``: save any ``nn.Module`` to a flashpack file and build it back from one."""

from __future__ import annotations

import contextlib
import inspect
import threading
from typing import Any, Callable, ClassVar, Iterator, List, Optional, Type, TypeVar

import torch

from ._warnings import warn
from .api import assign_from_file, pack_to_file, prefetching
from .ops import DEFAULT_ALIGN_BYTES, DeviceLike, PathLike

_META_INIT_LOCK = threading.RLock()
# How deep the current thread is in init_empty_parameters: only such a thread gets meta parameters.
_BUILDING = threading.local()
# The dtypes torch accepts as its default dtype.
_DEFAULT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# from_flashpack returns an instance of the class it is called on: Net.from_flashpack gives a Net.
_M = TypeVar("_M", bound="FlashPackMixin")


@contextlib.contextmanager
def init_empty_parameters(dtype: Optional[torch.dtype] = None) -> Iterator[None]:
    """Build modules with every parameter on the meta device and every buffer real.

    Parameters take no memory and their initialisers do no work; buffers keep the
    values ``__init__`` computes (rotary ``inv_freq``, ``position_ids``), which a file
    does not hold when they are not persistent.

    NOTE: ``with torch.device("meta")`` alone would also put those computed buffers on
    the meta device, and nothing generic can recompute them afterwards. Registering
    each parameter on the meta device as it is created keeps construction free of
    weight memory and weight init while buffers come out right.

    Args:
        dtype: if given (float16, bfloat16, float32 or float64), the default dtype while building, as
            ``from_pretrained(torch_dtype=...)`` does.

    Example:
        >>> with init_empty_parameters():
        ...     model = torch.nn.Linear(4096, 4096)
        >>> model.weight.is_meta
        True
    """
    register_parameter = torch.nn.Module.register_parameter

    def register_on_meta(module: torch.nn.Module, name: str, param: Optional[torch.nn.Parameter]) -> None:
        register_parameter(module, name, param)
        if not getattr(_BUILDING, "depth", 0):
            return  # another thread building a model of its own meanwhile, or no build at all: left alone
        param = module._parameters.get(name)
        if param is not None and not param.is_meta and type(param) is torch.nn.Parameter:
            meta = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
            meta.__dict__.update(param.__dict__)
            module._parameters[name] = meta

    # NOTE: the patch is on the class, so every thread calls it while it is in place; only
    # a thread inside init_empty_parameters gets meta parameters. (The default dtype is
    # process-wide too, as in transformers' own from_pretrained.) One build at a time holds
    # the lock. Other code patches the class as well (accelerate's init_empty_weights) and
    # puts back what it found, whichever thread it runs on: the original is put back only
    # while ours is still in place (else theirs would be left for good), and ours, if put
    # back after we left, does nothing (else a later build on this thread would be on meta).
    # The default dtype is set, and put back, only where a dtype other than the current one
    # is asked for: put back unasked, it would undo what another thread set meanwhile (a
    # from_pretrained(dtype=torch.bfloat16) building), leaving its dtype the default for good.
    with _META_INIT_LOCK:
        previous_dtype = torch.get_default_dtype()
        set_dtype = dtype in _DEFAULT_DTYPES and dtype != previous_dtype
        torch.nn.Module.register_parameter = register_on_meta
        _BUILDING.depth = getattr(_BUILDING, "depth", 0) + 1
        try:
            if set_dtype:
                torch.set_default_dtype(dtype)
            yield
        finally:
            _BUILDING.depth -= 1
            if torch.nn.Module.register_parameter is register_on_meta:
                torch.nn.Module.register_parameter = register_parameter
            if set_dtype:
                torch.set_default_dtype(previous_dtype)


def _call_with_accepted_kwargs(init_fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    try:
        params = inspect.signature(init_fn).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return init_fn(*args, **kwargs)
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        dropped = sorted(k for k in kwargs if k not in params)
        if dropped:
            warn(f"flashpack_ops: {getattr(init_fn, '__qualname__', init_fn)} does not take {dropped}; "
                 "ignoring them")
        kwargs = {k: v for k, v in kwargs.items() if k in params}
    return init_fn(*args, **kwargs)


class FlashPackMixin:
    """Adds ``save_flashpack`` and ``from_flashpack`` to an ``nn.Module`` subclass.

    ``from_flashpack`` builds the module with its parameters on the meta device (no
    memory, no init work), then points every parameter at the loaded memory: the
    weights exist once, in the blocks the file was loaded into.

    Class attributes (all optional):
        flashpack_init_method: name of a classmethod that builds the module
            (``"from_config"``); the class itself by default.
        flashpack_ignore_names, flashpack_ignore_prefixes, flashpack_ignore_suffixes:
            names to skip when loading, used when the call passes none.
        flashpack_coerce_dtype: default of ``coerce_dtype``.

    Example:
        >>> class Net(torch.nn.Module, FlashPackMixin):
        ...     def __init__(self, width):
        ...         super().__init__()
        ...         self.fc = torch.nn.Linear(width, width)
        >>> Net(64).save_flashpack("net.flashpack")
        >>> net = Net.from_flashpack("net.flashpack", 64, device="cpu")
    """

    flashpack_coerce_dtype: ClassVar[bool] = False
    flashpack_init_method: ClassVar[Optional[str]] = None
    flashpack_ignore_names: ClassVar[Optional[List[str]]] = None
    flashpack_ignore_prefixes: ClassVar[Optional[List[str]]] = None
    flashpack_ignore_suffixes: ClassVar[Optional[List[str]]] = None

    @classmethod
    def from_flashpack(
        cls: Type[_M],
        path: PathLike,
        *args: Any,
        device: Optional[DeviceLike] = None,
        silent: bool = True,
        strict: Optional[bool] = None,
        strict_params: bool = True,
        strict_buffers: bool = False,
        keep_flash_ref_on_model: bool = False,
        ignore_names: Optional[List[str]] = None,
        ignore_prefixes: Optional[List[str]] = None,
        ignore_suffixes: Optional[List[str]] = None,
        num_streams: int = 0,
        chunk_bytes: int = 0,
        use_distributed_loading: bool = False,
        distributed_sharded: bool = False,
        distributed_shard_strategy: Optional[str] = None,
        rank: Optional[int] = None,
        local_rank: Optional[int] = None,
        world_size: Optional[int] = None,
        coerce_dtype: bool = False,
        init_fn: Optional[Callable[..., Any]] = None,
        copy: bool = False,
        **kwargs: Any,
    ) -> _M:
        """Build the module and load a flashpack file into it, in evaluation mode.

        Args:
            path: the flashpack file.
            *args, **kwargs: passed to the constructor (or ``init_fn``); keyword
                arguments it does not take are dropped with a warning.
            device: where the weights go (``"cpu"``, ``"cuda"``, ``"cuda:1"``); the CPU
                by default.
            strict, strict_params, strict_buffers, ignore_names, ignore_prefixes,
                ignore_suffixes, coerce_dtype, keep_flash_ref_on_model, silent, copy: as in
                :func:`flashpack_ops.assign_from_file`.
            init_fn: builds the module instead of the class (or ``flashpack_init_method``).
            use_distributed_loading, distributed_sharded, distributed_shard_strategy, rank,
                local_rank, world_size: load over torch.distributed, as in
                :func:`flashpack_ops.assign_from_file`; ``rank``, ``local_rank`` and
                ``world_size`` also go to the constructor if it takes them.
            num_streams, chunk_bytes: accepted for compatibility with the reference package.

        Returns:
            The module, in ``eval()`` mode like ``from_pretrained``; parameters keep the
            ``requires_grad`` the constructor gave them.

        Raises:
            ValueError: names missing or unexpected (strict), or a shape mismatch.
            FileNotFoundError: ``path`` does not exist.
            TypeError: the constructor (or ``init_fn``) did not return an ``nn.Module``.

        Example:
            >>> net = Net.from_flashpack("net.flashpack", 64, device="cuda")
        """
        if init_fn is None:
            method = cls.flashpack_init_method
            init_fn = getattr(cls, method) if method and hasattr(cls, method) else cls
        try:
            accepted = inspect.signature(init_fn).parameters
        except (TypeError, ValueError):
            accepted = {}
        # As the reference does: given to a constructor that takes them, never warned about.
        for name, value in (("rank", rank), ("local_rank", local_rank), ("world_size", world_size)):
            if name in accepted:
                kwargs.setdefault(name, value)
        ignore_names = ignore_names or cls.flashpack_ignore_names
        ignore_prefixes = ignore_prefixes or cls.flashpack_ignore_prefixes
        ignore_suffixes = ignore_suffixes or cls.flashpack_ignore_suffixes
        # The file streams in while the model is built, where the load is of the whole file.
        whole_file = not (keep_flash_ref_on_model or use_distributed_loading
                          or ignore_names or ignore_prefixes or ignore_suffixes)
        with prefetching(path, device, copy, whole_file) as prefetched:
            with init_empty_parameters():
                model = _call_with_accepted_kwargs(init_fn, args, kwargs)
            if not isinstance(model, torch.nn.Module):
                raise TypeError(f"flashpack_ops: {cls.__name__}.from_flashpack needs an nn.Module, "
                                f"the constructor returned {type(model).__name__}")
            assign_from_file(
                model, path, device=device if device is not None else "cpu", strict=strict,
                strict_params=strict_params, strict_buffers=strict_buffers,
                keep_flash_ref_on_model=keep_flash_ref_on_model, silent=silent,
                ignore_names=ignore_names, ignore_prefixes=ignore_prefixes, ignore_suffixes=ignore_suffixes,
                use_distributed_loading=use_distributed_loading, distributed_sharded=distributed_sharded,
                distributed_shard_strategy=distributed_shard_strategy, rank=rank, local_rank=local_rank,
                world_size=world_size, coerce_dtype=coerce_dtype or cls.flashpack_coerce_dtype, copy=copy,
                _prefetched=prefetched,
            )
        # from_pretrained returns models in eval mode; dropout left on would corrupt inference.
        return model.eval()

    def save_flashpack(
        self,
        destination_path: PathLike,
        target_dtype: Optional[torch.dtype] = None,
        name_order: Optional[List[str]] = None,
        align_bytes: int = DEFAULT_ALIGN_BYTES,
        silent: bool = True,
        num_workers: int = 0,
    ) -> None:
        """Save the module's ``state_dict()`` to a flashpack file (atomically).

        Args:
            destination_path: the file to write.
            target_dtype: convert the floating-point tensors to this dtype (e.g.
                ``torch.bfloat16``), as ``module.to(dtype)`` does; integer and bool buffers
                keep theirs, so the module loads the file back.
            name_order: only these names, in this order; the state dict's order by default.
            align_bytes: alignment of each tensor in its block.
            silent: unused, kept for compatibility.
            num_workers: writer threads; 0 picks a default.

        Raises:
            ValueError: a tensor cannot be stored (e.g. still on the meta device).
            TypeError: the class is not an ``nn.Module``.
            RuntimeError: the file could not be written.

        Example:
            >>> Net(64).save_flashpack("net.flashpack", target_dtype=torch.bfloat16)
        """
        if not isinstance(self, torch.nn.Module):
            raise TypeError(f"FlashPackMixin.save_flashpack needs an nn.Module, got {type(self).__name__}")
        pack_to_file(self, destination_path, target_dtype=target_dtype, name_order=name_order,
                     align_bytes=align_bytes, silent=silent, num_workers=num_workers, floating_only=True)
