"""Shared helpers for the test suite: every storable dtype, random tensors, bit-exact checks."""

import atexit
import os
import shutil
import sys
import tempfile
import time
import warnings

import pytest
import torch

import flashpack_ops  # noqa: F401  (registers torch.ops.flashpack)

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

# The code of the trust_remote_code models the tests load is copied by transformers into
# HF_MODULES_CACHE (~/.cache/huggingface/modules): a folder of the run's own instead, set
# before transformers is imported and gone when the run ends.
os.environ["HF_MODULES_CACHE"] = tempfile.mkdtemp(prefix="flashpack-tests-modules-")
atexit.register(shutil.rmtree, os.environ["HF_MODULES_CACHE"], ignore_errors=True)

# torch.compile checks that a custom operator's outputs do not alias, on a compiled
# function's first call: a warning by default, an error where the CI environment variable
# is set and in future releases. The suite holds the ops to the error everywhere.
import torch._functorch.config  # noqa: E402

if hasattr(torch._functorch.config, "error_on_custom_op_aliasing"):  # not in torch 2.8 and older
    torch._functorch.config.error_on_custom_op_aliasing = True

# FLASHPACK_NATIVE_STACKS=1 (benchmarks/gpu_check.sh sets it): a test process that dies of a
# fatal signal prints every thread's native stack, where faulthandler prints Python frames only.
if os.environ.get("FLASHPACK_NATIVE_STACKS") == "1" and hasattr(torch._C, "_set_print_stack_traces_on_fatal_signal"):
    torch._C._set_print_stack_traces_on_fatal_signal(True)

# Every dtype torch has that holds plain bits (quantized dtypes carry scale and zero
# point and are refused with a clear error instead).
STORABLE_DTYPES = [
    getattr(torch, name)
    for name in [
        "bool", "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64",
        "float16", "bfloat16", "float32", "float64", "complex32", "complex64", "complex128", "bcomplex32",
        "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu",
        "float4_e2m1fn_x2", "bits1x8", "bits2x4", "bits4x2", "bits8", "bits16",
        "uint1", "uint2", "uint3", "uint4", "uint5", "uint6", "uint7",
        "int1", "int2", "int3", "int4", "int5", "int6", "int7",
    ]
    if hasattr(torch, name)
]

_SAME_WIDTH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def random_tensor(shape, dtype, seed=0, device="cpu"):
    """A tensor of `shape` and `dtype` filled with random bits (valid values for bool)."""
    gen = torch.Generator().manual_seed(seed)
    numel = 1
    for d in shape:
        numel *= d
    if dtype == torch.bool:
        return torch.randint(0, 2, tuple(shape), generator=gen, dtype=torch.uint8).bool().to(device)
    esize = torch.empty(0, dtype=dtype).element_size()
    raw = torch.randint(0, 256, (numel * esize,), generator=gen, dtype=torch.uint8)
    return raw.view(dtype).reshape(tuple(shape)).to(device)


def bits(t):
    """The tensor's bytes as a flat uint8 tensor on the CPU (NaN-safe, works for every dtype)."""
    t = t.detach()
    esize = t.element_size()
    if esize in _SAME_WIDTH_INT:
        t = t.view(_SAME_WIDTH_INT[esize])
    return t.cpu().contiguous().reshape(-1).view(torch.uint8)


def assert_same(actual, expected, name=""):
    """Same dtype, same shape, same bits."""
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.equal(bits(actual), bits(expected)), f"{name}: values differ"


def assert_same_dict(actual, expected):
    assert list(actual) == list(expected)
    for name in expected:
        assert_same(actual[name], expected[name], name)


def bytes_read_by_this_process() -> int:
    """Linux's count of the bytes this process's threads have read (``rchar``)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def wait_for_reads(start: int, size: int, timeout_s: float = 10.0) -> int:
    """Waits until the process has read ``size`` bytes since ``start`` (another thread's
    reads, while this one waits), at most ``timeout_s``; returns the bytes read since."""
    deadline = time.monotonic() + timeout_s
    while bytes_read_by_this_process() - start < size and time.monotonic() < deadline:
        time.sleep(0.001)
    return bytes_read_by_this_process() - start


def torchscript_refusal() -> str:
    """Why this torch will not script a function ('' if it will): TorchScript is deprecated."""

    def probe(x: torch.Tensor) -> torch.Tensor:
        return x + 1

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.jit.script(probe)
    except Exception as error:  # whatever a torch that dropped TorchScript raises
        return f"torch {torch.__version__} refuses TorchScript ({type(error).__name__}: {error})"
    return ""


@pytest.fixture
def tmp_file(tmp_path):
    return str(tmp_path / "model.flashpack")


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A Hub on localhost serving ``hub.root/org/name`` (see hub_server.py), with a cache of its own."""
    constants = pytest.importorskip("huggingface_hub.constants")
    from hub_server import Hub

    (tmp_path / "hub").mkdir()
    server = Hub(tmp_path / "hub")
    monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        server.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)  # huggingface_hub reads it as HF_HUB_OFFLINE
    yield server
    server.close()


# scripts/setup.sh installs every test dependency (".[test]" and the reference package), so
# in CI a test skipped because a module failed to import hides a broken install: the tests
# of that integration would stop running while the run stays green. Where the CI variable
# is set, such a skip fails instead; elsewhere it stays a skip.
def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def _fail_import_skip(report) -> None:
    """Turns a skip that pytest.importorskip raised into a failure, in CI only."""
    if not _in_ci() or not report.skipped or not isinstance(report.longrepr, tuple):
        return
    reason = str(report.longrepr[2])
    if "could not import" in reason:
        report.outcome = "failed"
        report.longrepr = f"CI is set and every test dependency should be installed, but {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_import_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_import_skip(outcome.get_result())
