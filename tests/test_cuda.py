"""The CUDA load path (csrc/cuda/): files reach the GPU bit for bit by every route, with
bounded pinned memory, on the caller's stream, from several threads at once.

These tests need a GPU and a CUDA build of flashpack_ops; elsewhere they are skipped.
tests/cuda_emulator/ runs them on a machine without a GPU, against an emulated CUDA runtime.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

import flashpack_ops
from conftest import STORABLE_DTYPES, assert_same, random_tensor
from flashpack_ops import cuda_stats, load_file, read_metadata, release_pinned_memory, save_file

HAS_GPU = torch.cuda.is_available()

pytestmark = [
    pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
    pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental"),
]

needs_cuda_build = pytest.mark.skipif(
    not flashpack_ops.has_cuda(), reason="flashpack_ops was built without CUDA (see test_built_with_cuda)"
)

KiB = 1 << 10
MiB = 1 << 20
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ROUTE_COUNTERS = {"direct": "bytes_direct", "buffered": "bytes_buffered", "mapped": "bytes_mapped",
                  "register": "bytes_registered"}


def emulated() -> bool:
    return HAS_GPU and torch.cuda.get_device_name(0).endswith("(fake cudart)")


def assert_loaded(loaded, expected, device=None):
    device = device or torch.device("cuda", torch.cuda.current_device())
    assert list(loaded) == list(expected)
    for name, t in loaded.items():
        assert t.device == device, name
        assert_same(t, expected[name], name)


def payload_bytes(path) -> int:
    meta = read_metadata(path)
    if meta["format"] == "flashpack_v3":
        return meta["total_elems"] * getattr(torch, meta["target_dtype"]).itemsize
    return sum(b["length_bytes"] for b in meta["macroblocks"])


def stats_delta(before):
    after = cuda_stats()
    return {k: after[k] - before[k] for k in after}


def mixed_dict(seed, scale=1):
    """Several dtypes, sizes that are no multiple of any chunk, a 0-d and an empty tensor."""
    return {
        "embed": random_tensor((1000 * scale + 3, 37), torch.bfloat16, seed),
        "norm": random_tensor((4097,), torch.float32, seed + 1),
        "scalar": random_tensor((), torch.float64, seed + 2),
        "empty": random_tensor((0, 5), torch.float16, seed + 3),
        "ids": random_tensor((333 * scale,), torch.int64, seed + 4),
        "mask": random_tensor((77,), torch.bool, seed + 5),
        "proj": random_tensor((513, 129), torch.bfloat16, seed + 6),
    }


def filesystem_type(path) -> str:
    path = os.path.realpath(path)
    best, kind = "", ""
    with open("/proc/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            mount_point = fields[1]
            if (path == mount_point or path.startswith(mount_point.rstrip("/") + "/")) and len(mount_point) > len(best):
                best, kind = mount_point, fields[2]
    return kind


def supports_o_direct(directory) -> bool:
    """Whether files in `directory` can be read with O_DIRECT, tried on a probe file."""
    probe = os.path.join(directory, "o_direct_probe")
    with open(probe, "wb") as f:
        f.write(b"\0" * 8192)
    return direct_reads_work(probe)


def direct_reads_work(path) -> bool:
    """Whether the filesystem holding `path` serves O_DIRECT reads (tmpfs, for one, does not)."""
    import mmap

    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except (OSError, AttributeError):  # AttributeError: no O_DIRECT on this platform
        return False
    try:
        os.preadv(fd, [mmap.mmap(-1, 4096)], 0)  # an anonymous mapping: page-aligned, as O_DIRECT needs
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def cold_route_counter(path) -> str:
    """The counter a load of `path` out of the disk moves: O_DIRECT's, where the filesystem has it."""
    return "bytes_direct" if direct_reads_work(path) else "bytes_buffered"


def warm_route_counter() -> str:
    """The counter a load of a cached file moves: the mapped route's, where the kernel can
    populate a mapping (MADV_POPULATE_READ, Linux 5.14); the route reads buffered elsewhere."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    page = mmap.mmap(-1, mmap.PAGESIZE)
    view = ctypes.c_char.from_buffer(page)
    supported = libc.madvise(ctypes.addressof(view), mmap.PAGESIZE, 22) == 0  # 22: MADV_POPULATE_READ
    del view
    page.close()
    return "bytes_mapped" if supported else "bytes_buffered"


def evict_from_page_cache(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.fixture
def mixed(tmp_path):
    tensors = mixed_dict(1234)
    path = tmp_path / "mixed.flashpack"
    save_file(tensors, path)
    return path, tensors


# ---- build --------------------------------------------------------------------------------


def test_built_with_cuda():
    # A GPU machine must not silently test a CPU-only build.
    assert flashpack_ops.has_cuda(), "torch sees a GPU but flashpack_ops was built without CUDA: rebuild with nvcc"


# ---- correctness ----------------------------------------------------------------------------


@needs_cuda_build
@pytest.mark.parametrize("dtype", STORABLE_DTYPES, ids=str)
def test_every_dtype_is_bit_exact(tmp_path, dtype):
    tensors = {"a": random_tensor((3, 5), dtype, 1), "b": random_tensor((4099,), dtype, 2)}
    path = tmp_path / "t.flashpack"
    save_file(tensors, path)
    assert_loaded(load_file(path, "cuda"), tensors)


@needs_cuda_build
def test_all_dtypes_in_one_file(tmp_path):
    tensors = {str(d): random_tensor((17, 3), d, k) for k, d in enumerate(STORABLE_DTYPES)}
    path = tmp_path / "all.flashpack"
    save_file(tensors, path)
    for route in ROUTE_COUNTERS:
        assert_loaded(load_file(path, "cuda", route=route), tensors)


@needs_cuda_build
@pytest.mark.parametrize("chunk_bytes", [4 * KiB, 12 * KiB, 64 * KiB, 1 * MiB, 0], ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("route", sorted(ROUTE_COUNTERS))
def test_sizes_that_are_no_multiple_of_the_chunk(mixed, chunk_bytes, route):
    path, tensors = mixed
    assert_loaded(load_file(path, "cuda", chunk_bytes=chunk_bytes, route=route), tensors)


@needs_cuda_build
def test_load_list_and_load_agree(mixed):
    path, tensors = mixed
    as_list = torch.ops.flashpack.load_list(str(path), torch.device("cuda"))
    assert_loaded(dict(zip(tensors, as_list)), tensors)


@needs_cuda_build
def test_read_flashpack_file_streams_the_blocks(mixed):
    # The reference's block-level API (flashpack::load_blocks): the blocks the CPU maps,
    # moved by the CUDA branch, and the saved tensors as views of them.
    path, tensors = mixed
    before = cuda_stats()
    storage, meta = flashpack_ops.read_flashpack_file(path, "cuda")
    delta = stats_delta(before)
    assert delta["loads"] == 1
    assert sum(delta[c] for c in ROUTE_COUNTERS.values()) == payload_bytes(path)
    assert storage.device == torch.device("cuda", torch.cuda.current_device())
    cpu_storage, _ = flashpack_ops.read_flashpack_file(path)
    assert len(storage) == len(cpu_storage)
    for k in range(len(storage)):
        assert_same(storage.block(k).cpu(), cpu_storage.block(k), f"block {k}")
    assert_loaded(dict(flashpack_ops.iterate_from_flash_tensor(storage, meta)), tensors)


@needs_cuda_build
def test_tied_tensors_share_memory(tmp_path):
    shared = random_tensor((64, 33), torch.float32, 1)
    tensors = {"embed.weight": shared, "other": random_tensor((5,), torch.float32, 2), "lm_head.weight": shared}
    path = tmp_path / "tied.flashpack"
    save_file(tensors, path)
    loaded = load_file(path, "cuda")
    assert_loaded(loaded, tensors)
    assert loaded["embed.weight"].data_ptr() == loaded["lm_head.weight"].data_ptr()


@needs_cuda_build
@pytest.mark.parametrize("route", sorted(ROUTE_COUNTERS))
def test_named_entries_move_only_their_bytes(tmp_path, route):
    if route == "direct" and not supports_o_direct(tmp_path):
        pytest.skip(f"{tmp_path} ({filesystem_type(tmp_path)}) has no O_DIRECT")
    tensors = mixed_dict(21, scale=8)
    tensors["big"] = random_tensor((4 * MiB,), torch.float32, 22)
    tensors["tail"] = random_tensor((100,), torch.bfloat16, 23)
    tensors["head"] = tensors["embed"]
    path = tmp_path / "part.flashpack"
    save_file(tensors, path)
    names = ["tail", "scalar", "head", "empty", "embed"]
    wanted = sum(tensors[name].nbytes for name in ("embed", "scalar", "tail"))
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated()
    before = cuda_stats()
    loaded = load_file(path, "cuda", names=names, route=route, chunk_bytes=64 * KiB, pinned_bytes=256 * KiB)
    delta = stats_delta(before)
    if route == "register" and delta["register_fallbacks"]:
        pytest.skip("this driver refuses cudaHostRegister(ReadOnly) on file mappings; the load staged instead")
    assert_loaded(loaded, {name: t for name, t in tensors.items() if name in names})
    assert loaded["embed"].data_ptr() == loaded["head"].data_ptr()
    # What lies between selected entries of one block is read too when it is small (here
    # "proj", between "embed" and "tail"); the 16 MiB entry is neither read nor allocated.
    moved = delta[ROUTE_COUNTERS[route]]
    assert wanted <= moved < wanted + 1 * MiB, delta
    assert torch.cuda.memory_allocated() - allocated < wanted + 2 * MiB


@needs_cuda_build
def test_twenty_thousand_small_tensors(tmp_path):
    tensors = {f"layers.{k}.weight": random_tensor((k % 7 + 1, 9), torch.bfloat16, k) for k in range(20_000)}
    path = tmp_path / "many.flashpack"
    save_file(tensors, path)
    loaded = load_file(path, "cuda")
    assert_loaded(loaded, tensors)
    # One block, one allocation: every tensor lies within the payload's span.
    starts = [t.data_ptr() for t in loaded.values()]
    ends = [t.data_ptr() + t.numel() * t.element_size() for t in loaded.values()]
    assert max(ends) - min(starts) <= payload_bytes(path)


@needs_cuda_build
@pytest.mark.parametrize("case", ["blocks first", "index first", "blocks named twice"])
def test_a_large_index_is_read_while_the_blocks_move(tmp_path, case):
    from test_format_errors import assert_loads, block_of, expected_entries, footer_by_hand, large_index, write_raw

    values = torch.arange(4 * 2000, dtype=torch.float32)
    index = large_index(2000)
    block = block_of(values, offset_bytes=256)
    members = [("format", "flashpack_v4"), ("macroblocks", [block]), ("index", index)]
    if case == "index first":
        members = [members[0], members[2], members[1]]
    elif case == "blocks named twice":  # the blocks moved ahead are not the file's: the load starts over
        members = [members[0], ("macroblocks", [dict(block, offset_bytes=0)]), members[2], members[1]]
    payload = torch.full((64,), -1.0).numpy().tobytes() + values.numpy().tobytes()
    path = write_raw(tmp_path / "large.flashpack", payload, footer_by_hand(*members))
    before = cuda_stats()
    assert_loads(path, expected_entries(index, values), gpus=["cuda"])
    after = cuda_stats()
    assert after["ns_index"] > before["ns_index"] and after["ns_copy"] > before["ns_copy"]
    assert after["ns_views"] > before["ns_views"]


@needs_cuda_build
def test_a_bad_entry_at_the_end_of_a_large_index_is_said_by_a_cuda_load(tmp_path):
    from test_format_errors import block_of, large_index, v4, write_raw

    values = torch.arange(4 * 2000, dtype=torch.float32)
    index = large_index(2000)
    index[-1]["shape"] = [2, 3]
    block = block_of(values)
    path = write_raw(tmp_path / "bad.flashpack", values.numpy().tobytes(), v4(index, [block]))
    allocated = torch.cuda.memory_allocated()
    for route in ROUTE_COUNTERS:
        with pytest.raises(ValueError, match="the shape holds 6 elements") as info:
            load_file(path, "cuda", route=route)
        assert path in str(info.value)
    assert torch.cuda.memory_allocated() == allocated


@needs_cuda_build
@pytest.mark.skipif(not emulated(), reason="failing a copy on purpose needs tests/cuda_emulator")
@pytest.mark.parametrize("index", ["bad", "good"])
def test_a_bad_large_index_is_said_before_a_failed_copy(tmp_path, index):
    # The blocks move while the index is read: when both fail, the index is what the load says,
    # as where it is read before anything moves; a good index leaves the copy's error.
    script = r"""
import sys, torch
from test_format_errors import block_of, large_index, v4, write_raw
from flashpack_ops import cuda_stats, load_file
values = torch.arange(4 * 200_000, dtype=torch.float32)
index = large_index(2000)
if sys.argv[2] == "bad":
    index[-1]["shape"] = [2, 3]
block = block_of(values)
path = write_raw(sys.argv[1], values.numpy().tobytes(), v4(index, [block]))
allocated = torch.cuda.memory_allocated()
try:
    load_file(path, "cuda", chunk_bytes=64 * 1024, pinned_bytes=256 * 1024)
except (ValueError, RuntimeError) as e:
    print(type(e).__name__, e)
else:
    raise AssertionError("the load did not fail")
assert torch.cuda.memory_allocated() == allocated and cuda_stats()["pinned_bytes"] <= 256 * 1024
"""
    env = dict(os.environ, FAKE_CUDA_FAIL_UPLOAD_AT="4",
               PYTHONPATH=os.pathsep.join(filter(None, [os.path.join(REPO, "tests"), os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "f.flashpack"), index], env=env,
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    said = out.stdout.strip()
    if index == "bad":
        assert said.startswith("ValueError") and "the shape holds 6 elements" in said, said
    else:
        assert said.startswith("RuntimeError") and "cuda:0" in said, said


@needs_cuda_build
def test_file_larger_than_the_ring(tmp_path):
    tensors = mixed_dict(7, scale=40)  # ~3 MiB, a 256 KiB ring
    path = tmp_path / "big.flashpack"
    save_file(tensors, path)
    assert payload_bytes(path) > 8 * 256 * KiB
    for route in ROUTE_COUNTERS:
        assert_loaded(load_file(path, "cuda", route=route, pinned_bytes=256 * KiB, chunk_bytes=32 * KiB), tensors)


@needs_cuda_build
def test_reference_flashpack_files_load(tmp_path):
    flashpack = pytest.importorskip("flashpack", reason="the reference flashpack package is not installed")
    one_dtype = {f"w{k}": random_tensor((k * 31 + 1, 3), torch.bfloat16, k) for k in range(9)}
    several = {**one_dtype, "ids": random_tensor((101,), torch.int64, 10), "f": random_tensor((7, 7), torch.float32, 11)}
    for name, tensors, fmt in (("v3", one_dtype, "flashpack_v3"), ("v4", several, "flashpack_v4")):
        path = tmp_path / f"{name}.flashpack"
        flashpack.pack_to_file(tensors, str(path), target_dtype=None, align_bytes=128)
        meta = read_metadata(path)
        assert meta["format"] == fmt and meta["align_bytes"] == 128
        for route in ROUTE_COUNTERS:
            loaded = load_file(path, "cuda", route=route, chunk_bytes=8 * KiB)
            # The reference writes largest first; compare by name.
            assert_loaded(loaded, {k: tensors[k] for k in loaded})
            assert set(loaded) == set(tensors)


# ---- routes and the proof that the CUDA branch ran ----------------------------------------


@needs_cuda_build
def test_the_cuda_branch_moves_every_payload_byte(mixed):
    # Fails if load(..., "cuda") were a CPU load followed by .to("cuda"): the counters
    # only move inside csrc/cuda/.
    path, tensors = mixed
    before = cuda_stats()
    assert_loaded(load_file(path, "cuda"), tensors)
    delta = stats_delta(before)
    assert delta["loads"] == 1
    assert sum(delta[c] for c in ROUTE_COUNTERS.values()) == payload_bytes(path)


@needs_cuda_build
@pytest.mark.parametrize("route", sorted(ROUTE_COUNTERS))
def test_each_route_when_forced(tmp_path, route):
    if route == "direct" and not supports_o_direct(tmp_path):
        pytest.skip(f"{tmp_path} ({filesystem_type(tmp_path)}) has no O_DIRECT")
    tensors = mixed_dict(8, scale=8)
    path = tmp_path / "r.flashpack"
    save_file(tensors, path)
    before = cuda_stats()
    assert_loaded(load_file(path, "cuda", route=route, chunk_bytes=64 * KiB, pinned_bytes=256 * KiB), tensors)
    delta = stats_delta(before)
    if route == "register" and delta["register_fallbacks"]:
        pytest.skip("this driver refuses cudaHostRegister(ReadOnly) on file mappings; the load staged instead")
    assert delta[ROUTE_COUNTERS[route]] == payload_bytes(path), delta
    # The time went into this route's steps, and is counted.
    steps = ("ns_register", "ns_unregister") if route == "register" else ("ns_read",)
    assert delta["ns_loads"] > 0 and all(delta[step] > 0 for step in steps), delta
    assert all(delta[step] == 0 for step in ("ns_read", "ns_register", "ns_unregister") if step not in steps), delta


@needs_cuda_build
@pytest.mark.parametrize("percent", [0, 25, 50, 100])
def test_the_mapped_route_registers_the_share_of_chunks_asked_for(tmp_path, monkeypatch, percent):
    # FLASHPACK_CUDA_REGISTER_PERCENT: that share of the mapped route's chunks is registered
    # for the GPU to read out of the page cache, the rest copied as before.
    tensors = mixed_dict(40, scale=40)
    path = tmp_path / "h.flashpack"
    save_file(tensors, path)
    monkeypatch.setenv("FLASHPACK_CUDA_REGISTER_PERCENT", str(percent))
    ring, chunk = 256 * KiB, 64 * KiB
    release_pinned_memory()
    cuda_stats(reset_peaks=True)
    before = cuda_stats()
    assert_loaded(load_file(path, "cuda", route="mapped", chunk_bytes=chunk, pinned_bytes=ring), tensors)
    delta = stats_delta(before)
    if percent and delta["register_fallbacks"]:
        pytest.skip("this driver refuses cudaHostRegister(ReadOnly) on file mappings; every chunk was copied")
    total = payload_bytes(path)
    assert delta["bytes_registered"] + delta["bytes_mapped"] == total, delta
    # Chunks hold up to `chunk` bytes each (less where blocks begin and end).
    assert abs(delta["bytes_registered"] - total * percent / 100) <= 2 * chunk, (delta, total)
    assert (delta["ns_register"] > 0) == (delta["ns_unregister"] > 0) == (percent > 0), delta
    stats = cuda_stats()
    assert stats["registered_bytes"] == 0, stats  # every range unregistered
    assert stats["pinned_peak_bytes"] <= ring and stats["registered_peak_bytes"] <= ring, stats
    assert (stats["registered_peak_bytes"] > 0) == (percent > 0), stats


@needs_cuda_build
@pytest.mark.parametrize("value, message", [
    ("150", r"FLASHPACK_CUDA_REGISTER_PERCENT='150' is not a percentage \(0 to 100\)"),
    ("half", r"FLASHPACK_CUDA_REGISTER_PERCENT='half' is not a non-negative integer"),
])
def test_a_bad_register_percent_is_named(mixed, monkeypatch, value, message):
    path, _ = mixed
    monkeypatch.setenv("FLASHPACK_CUDA_REGISTER_PERCENT", value)
    with pytest.raises(ValueError, match=message):
        load_file(path, "cuda")


@needs_cuda_build
def test_route_from_the_environment(mixed, monkeypatch):
    path, tensors = mixed
    monkeypatch.setenv("FLASHPACK_CUDA_ROUTE", "buffered")
    before = cuda_stats()
    assert_loaded(load_file(path, "cuda"), tensors)
    assert stats_delta(before)["bytes_buffered"] == payload_bytes(path)


@needs_cuda_build
def test_auto_copies_a_cached_file_out_of_its_mapping(mixed):
    path, tensors = mixed
    load_file(path, "cuda", route="buffered")  # now certainly in the page cache
    before = cuda_stats()
    assert_loaded(load_file(path, "cuda"), tensors)
    delta = stats_delta(before)
    assert delta[warm_route_counter()] == payload_bytes(path), delta
    assert delta["bytes_direct"] == delta["bytes_registered"] == delta["register_fallbacks"] == 0, delta


@needs_cuda_build
def test_auto_reads_an_uncached_file_with_o_direct(tmp_path):
    if filesystem_type(tmp_path) in ("tmpfs", "ramfs"):
        pytest.skip(f"{tmp_path} is in memory: its pages cannot leave the page cache")
    tensors = mixed_dict(40, scale=40)
    path = tmp_path / "cold.flashpack"
    save_file(tensors, path)
    for _ in range(2):  # O_DIRECT leaves the file out of the page cache: the next load reads the disk too
        evict_from_page_cache(path)
        before = cuda_stats()
        assert_loaded(load_file(path, "cuda"), tensors)
        delta = stats_delta(before)
        assert delta["bytes_registered"] == 0 and delta[cold_route_counter(path)] == payload_bytes(path), delta



def mapped(path) -> bool:
    with open("/proc/self/maps") as maps:
        return any(line.rstrip("\n").endswith(" " + str(path)) for line in maps)


@needs_cuda_build
def test_a_registered_mapping_is_unmapped_after_the_load(mixed):
    # Registering filled in the mapping's page tables; it is unmapped off the load's path,
    # but unmapped all the same.
    path, tensors = mixed
    before = cuda_stats()
    assert_loaded(load_file(path, "cuda", route="register"), tensors)
    if stats_delta(before)["register_fallbacks"]:
        pytest.skip("this driver refuses cudaHostRegister(ReadOnly) on file mappings")
    deadline = time.monotonic() + 60
    while (cuda_stats()["unmapping_bytes"] or mapped(path)) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert cuda_stats()["unmapping_bytes"] == 0 and not mapped(path)
    assert stats_delta(before)["ns_unmap"] > 0


def cuda_runtime():
    """The CUDA runtime this process runs (the emulator's where it is preloaded), or None."""
    import ctypes

    runtime = ctypes.CDLL(None)
    if not hasattr(runtime, "cudaLaunchHostFunc"):
        with open("/proc/self/maps") as maps:
            found = next((line.split()[-1] for line in maps if "libcudart.so" in line), None)
        if found is None:
            return None
        runtime = ctypes.CDLL(found)
    runtime.cudaLaunchHostFunc.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    return runtime


@needs_cuda_build
def test_a_load_does_not_queue_behind_work_on_torchs_stream_pool(mixed):
    # Every stream of torch's pool (which torch.cuda.Stream() and NCCL take theirs from) is
    # held up on the host until the end: the load's copies must not wait behind them.
    import ctypes

    path, tensors = mixed
    runtime = cuda_runtime()
    if runtime is None:
        pytest.skip("no CUDA runtime library to call cudaLaunchHostFunc through (torch links it statically)")
    # Once first, so that the load below allocates nothing (a staging ring, device memory,
    # its copy streams): only the copies' streams are in question.
    load_file(path, "cuda", route="buffered")
    libc = ctypes.CDLL(None)
    gate = ctypes.create_string_buffer(64)  # a sem_t
    assert libc.sem_init(gate, 0, 0) == 0
    pool = [torch.cuda.Stream() for _ in range(64)]  # the pool hands out its 32 streams in turn
    held = 0
    loaded = {}
    loader = threading.Thread(target=lambda: loaded.update(load_file(path, "cuda", route="buffered")), daemon=True)
    try:
        for stream in pool:
            assert runtime.cudaLaunchHostFunc(stream.cuda_stream, ctypes.cast(libc.sem_wait, ctypes.c_void_p),
                                              ctypes.addressof(gate)) == 0
            held += 1
        loader.start()
        loader.join(timeout=30)  # milliseconds when it works; forever when it does not
        done = not loader.is_alive()
        still_held = not any(stream.query() for stream in pool)
    finally:
        for _ in range(held):
            libc.sem_post(gate)
        if loader.ident is not None:  # started
            loader.join(timeout=60)
        for stream in pool:
            stream.synchronize()
    assert done, "the load waited for work queued on torch's stream pool"
    assert still_held
    torch.cuda.synchronize()
    assert_loaded(loaded, tensors)

UNWRITABLE_LOAD_SCRIPT = r"""
import json, sys, flashpack_ops
from flashpack_ops import cuda_stats, load_file
before = cuda_stats()
try:
    load_file(sys.argv[1], "cuda", num_threads=int(sys.argv[2]), chunk_bytes=int(sys.argv[3]))
except RuntimeError as e:
    print("failed:", repr(e))
    sys.exit(0)
after = cuda_stats()
print(json.dumps({k: after[k] - before[k] for k in after}))
"""


def load_as_another_owner(path, env=None, num_threads=0, chunk_bytes=0):
    """Loads `path` to cuda in a child process that may neither write nor own others'
    files; returns the CUDA stats' change, or the error's text."""
    env = dict(env or os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    try:
        out = subprocess.run([sys.executable, "-c", UNWRITABLE_LOAD_SCRIPT, str(path), str(num_threads),
                              str(chunk_bytes)], preexec_fn=without_owner_rights, capture_output=True, text=True,
                             timeout=300, cwd=path.parent, env=env)
    except subprocess.SubprocessError as e:  # raised in the child before exec: no CAP_SETPCAP here
        pytest.skip(f"cannot start a process without CAP_DAC_OVERRIDE and CAP_FOWNER here: {e}")
    assert out.returncode == 0, out.stderr
    last = out.stdout.splitlines()[-1]
    return last if last.startswith("failed:") else json.loads(last)


def another_owners_file(tmp_path, seed):
    """A file of several MiB that another user owns and no one may write."""
    path = tmp_path / "theirs.flashpack"
    save_file(mixed_dict(seed, scale=40), path)
    os.chown(path, 65534, 65534)
    os.chmod(path, 0o444)
    return path


def without_owner_rights():
    """For a child process run as root: drops CAP_DAC_OVERRIDE and CAP_FOWNER from its
    capability bounding set, so that after exec it may neither write nor own others' files,
    as a user loading a checkpoint someone else saved."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 3):  # CAP_DAC_OVERRIDE, CAP_FOWNER
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@needs_cuda_build
@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="takes a file from another owner: needs root")
@pytest.mark.parametrize("cached", [False, True], ids=["cold", "cached"])
def test_auto_tells_the_page_cache_of_a_file_it_may_not_write(tmp_path, cached):
    # For such a file, mincore says every page is cached: a cached file read with O_DIRECT
    # would come from the disk, a cold one read buffered loses a third of the disk's speed.
    if not cached and filesystem_type(tmp_path) in ("tmpfs", "ramfs"):
        pytest.skip(f"{tmp_path} is in memory: its pages cannot leave the page cache")
    path = another_owners_file(tmp_path, seed=41)
    if cached:
        load_file(path, "cuda", route="buffered")  # reads every page through the cache
    else:
        evict_from_page_cache(path)
    delta = load_as_another_owner(path)
    moved = warm_route_counter() if cached else cold_route_counter(path)
    assert delta[moved] == payload_bytes(path), delta


@needs_cuda_build
@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="takes a file from another owner: needs root")
def test_auto_reads_a_file_it_may_not_write_in_memory_as_cached():
    # In /dev/shm (tmpfs) the page cache cannot be asked page by page (no RWF_NOWAIT reads),
    # and mincore tells nothing of another owner's file; but the file is memory.
    if not os.path.isdir("/dev/shm") or filesystem_type("/dev/shm") != "tmpfs":
        pytest.skip("no tmpfs at /dev/shm")
    import pathlib
    import tempfile

    with tempfile.TemporaryDirectory(dir="/dev/shm") as directory:
        os.chmod(directory, 0o755)
        path = another_owners_file(pathlib.Path(directory), seed=43)
        delta = load_as_another_owner(path)
        assert delta[warm_route_counter()] == payload_bytes(path) and delta["bytes_direct"] == 0, delta


@needs_cuda_build
@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="takes a file from another owner: needs root")
@pytest.mark.skipif(not emulated(), reason="failing a load after its route is chosen needs tests/cuda_emulator")
def test_a_file_it_may_not_write_stays_cold_to_the_next_load_after_a_check(tmp_path):
    # Checking the page cache reads in the pages it asks about. A load that checked and then
    # failed (or another rank's load, checking at the same moment) must not make the file
    # look cached to the next check.
    if filesystem_type(tmp_path) in ("tmpfs", "ramfs"):
        pytest.skip(f"{tmp_path} is in memory: its pages cannot leave the page cache")
    # NOTE: a probe that misses starts reading its page in, and on a disk that answers within
    # microseconds (a VM's, backed by its host's page cache) that read can finish before the
    # probe looks again, which then counts as a hit. On the 2-core VM enough of them did so
    # to call the file cached in one load of 40 run alone, and more often right after other
    # tests. Pages the earlier check left cached would do so every time: the test passes on
    # the first of six tries that comes out cold.
    deltas = []
    for attempt in range(6):
        folder = tmp_path / str(attempt)
        folder.mkdir()
        path = another_owners_file(folder, seed=42)
        evict_from_page_cache(path)
        failed = load_as_another_owner(path, env=dict(os.environ, FAKE_CUDA_FAIL_UPLOAD_AT="1"), num_threads=1,
                                       chunk_bytes=64 * KiB)
        assert str(failed).startswith("failed:"), failed
        deltas.append(load_as_another_owner(path))
        if deltas[-1][cold_route_counter(path)] == payload_bytes(path):
            return
    raise AssertionError(f"the file looked cached to every load after a check: {deltas}")


# ---- pinned memory ----------------------------------------------------------------------------


@needs_cuda_build
@pytest.mark.parametrize("route", ["buffered", "mapped", "register"])
def test_pinned_memory_stays_within_the_ring(tmp_path, route):
    ring = 512 * KiB
    tensors = mixed_dict(40, scale=40)
    path = tmp_path / "p.flashpack"
    save_file(tensors, path)
    release_pinned_memory()
    cuda_stats(reset_peaks=True)
    assert_loaded(load_file(path, "cuda", route=route, pinned_bytes=ring, chunk_bytes=64 * KiB), tensors)
    stats = cuda_stats()
    assert stats["pinned_peak_bytes"] <= ring and stats["registered_peak_bytes"] <= ring, stats
    assert stats["registered_bytes"] == 0, stats  # every range unregistered
    if route != "register":
        assert 0 < stats["pinned_bytes"] <= ring, stats  # the ring, kept for the next load
    release_pinned_memory()
    assert cuda_stats()["pinned_bytes"] == 0


@needs_cuda_build
def test_default_ring_is_bounded_whatever_the_file_size(tmp_path):
    tensors = mixed_dict(40, scale=40)
    path = tmp_path / "d.flashpack"
    save_file(tensors, path)
    release_pinned_memory()
    cuda_stats(reset_peaks=True)
    for route in ROUTE_COUNTERS:
        assert_loaded(load_file(path, "cuda", route=route), tensors)
    stats = cuda_stats()
    assert stats["pinned_peak_bytes"] <= 256 * MiB and stats["registered_peak_bytes"] <= 256 * MiB, stats


@needs_cuda_build
def test_pinned_bytes_from_the_environment(mixed, monkeypatch):
    path, tensors = mixed
    monkeypatch.setenv("FLASHPACK_PINNED_BYTES", str(64 * KiB))
    monkeypatch.setenv("FLASHPACK_CHUNK_BYTES", str(16 * KiB))
    monkeypatch.setenv("FLASHPACK_NUM_STREAMS", "3")
    release_pinned_memory()
    cuda_stats(reset_peaks=True)
    assert_loaded(load_file(path, "cuda", route="buffered"), tensors)
    assert 0 < cuda_stats()["pinned_peak_bytes"] <= 64 * KiB


@needs_cuda_build
@pytest.mark.parametrize("route", ["buffered", "mapped", "register"])
def test_workers_that_sleep_while_copies_finish_load_the_same(mixed, monkeypatch, route):
    path, tensors = mixed
    monkeypatch.setenv("FLASHPACK_CUDA_BLOCKING_SYNC", "1")
    monkeypatch.setenv("FLASHPACK_PINNED_BYTES", str(64 * KiB))  # many waits for a slot
    monkeypatch.setenv("FLASHPACK_CHUNK_BYTES", str(16 * KiB))
    assert_loaded(load_file(path, "cuda", route=route), tensors)


# ---- streams, threads, devices -------------------------------------------------------------------


@needs_cuda_build
def test_load_on_a_non_default_stream(mixed):
    path, tensors = mixed
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        loaded = load_file(path, "cuda")
        # Used on the caller's stream with no synchronization of our own.
        assert_loaded(loaded, tensors)
    torch.cuda.synchronize()


@needs_cuda_build
def test_two_loads_at_once_from_two_threads(tmp_path):
    files = []
    for k in range(2):
        tensors = mixed_dict(20 + 10 * k, scale=20)
        path = tmp_path / f"t{k}.flashpack"
        save_file(tensors, path)
        files.append((path, tensors))
    release_pinned_memory()
    cuda_stats(reset_peaks=True)
    ring = 256 * KiB
    results, errors = [None, None], []
    barrier = threading.Barrier(2)

    def work(k):
        try:
            barrier.wait()
            for route in ("buffered", "register", "mapped", "buffered"):
                results[k] = load_file(files[k][0], "cuda", route=route, pinned_bytes=ring, chunk_bytes=32 * KiB)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a load did not finish (deadlock?)"
    assert not errors, errors
    for k in range(2):
        assert_loaded(results[k], files[k][1])
    stats = cuda_stats()
    assert stats["pinned_peak_bytes"] <= 2 * ring, stats  # one ring per running load, never more
    assert stats["registered_bytes"] == 0


@needs_cuda_build
@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda", 0), 0], ids=str)
def test_device_forms(mixed, device):
    path, tensors = mixed
    assert_loaded(load_file(path, device), tensors, torch.device("cuda", 0))


@needs_cuda_build
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_means_the_current_device(mixed):
    path, tensors = mixed
    with torch.cuda.device(1):
        loaded = load_file(path, "cuda")
    assert_loaded(loaded, tensors, torch.device("cuda", 1))
    assert_loaded(load_file(path, "cuda:1"), tensors, torch.device("cuda", 1))


@pytest.mark.skipif(emulated(), reason="needs kernels that take time on a stream (the emulator runs none)")
@pytest.mark.parametrize("target_dtype", [None, torch.bfloat16])
def test_save_reads_what_the_callers_stream_wrote(tmp_path, target_dtype):
    # The save's worker threads copy GPU tensors to the host: on the caller's stream, so
    # after the kernels queued there, not on each thread's default stream.
    side = torch.cuda.Stream()
    tensor = torch.zeros(1 << 20, device="cuda")
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # about 0.1 s of the side stream's time
        tensor.fill_(7.0)
        save_file({"t": tensor}, tmp_path / "t.flashpack", target_dtype=target_dtype)
    torch.cuda.synchronize()
    expected = torch.full((1 << 20,), 7.0, dtype=target_dtype or torch.float32)
    assert_same(load_file(tmp_path / "t.flashpack")["t"], expected, "t")


# ---- errors --------------------------------------------------------------------------------------


@needs_cuda_build
def test_a_missing_device_is_named(mixed):
    path, _ = mixed
    n = torch.cuda.device_count()
    with pytest.raises(ValueError, match=rf"mixed.flashpack' to cuda:{n}: only {n} CUDA device"):
        load_file(path, f"cuda:{n}")


def test_safe_open_names_a_missing_device_at_open(mixed):
    path, _ = mixed
    n = torch.cuda.device_count()
    for device in (f"cuda:{n}", n):
        with pytest.raises(ValueError, match=rf"mixed.flashpack' for cuda:{n}: only {n} CUDA device"):
            flashpack_ops.safe_open(path, framework="pt", device=device)


@needs_cuda_build
def test_a_corrupt_file_is_named(tmp_path, mixed):
    path, _ = mixed
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # the magic
    bad = tmp_path / "bad.flashpack"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"flashpack::load: '.*bad.flashpack': not a flashpack file"):
        load_file(bad, "cuda")


@needs_cuda_build
def test_a_truncated_payload_is_named(tmp_path, mixed):
    path, _ = mixed
    data = path.read_bytes()
    bad = tmp_path / "short.flashpack"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"short.flashpack"):
        load_file(bad, "cuda")


@needs_cuda_build
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"route": "fast"}, r"unknown route 'fast' \(expected auto, direct, buffered, mapped or register\)"),
        ({"chunk_bytes": -1}, r"chunk_bytes must be >= 0"),
        ({"pinned_bytes": -5}, r"pinned_bytes must be >= 0"),
        ({"num_streams": -2}, r"num_streams must be >= 0"),
        ({"num_threads": -1}, r"num_threads must be >= 0"),
    ],
)
def test_bad_options_are_named(mixed, kwargs, message):
    path, _ = mixed
    with pytest.raises(ValueError, match=message):
        load_file(path, "cuda", **kwargs)


@needs_cuda_build
def test_a_bad_environment_variable_is_named(mixed, monkeypatch):
    path, _ = mixed
    monkeypatch.setenv("FLASHPACK_CHUNK_BYTES", "8MB")
    with pytest.raises(ValueError, match=r"FLASHPACK_CHUNK_BYTES='8MB' is not a non-negative integer"):
        load_file(path, "cuda")


TRUNCATION_SCRIPT = r"""
import os, sys, threading, time, torch
from flashpack_ops import load_file, save_file
path, attempts, route = sys.argv[1], int(sys.argv[2]), sys.argv[3]
tensors = {f"w{k}": torch.full((256 * 1024,), k, dtype=torch.float32) for k in range(16)}  # 16 MiB
loaded = failed = 0
for attempt in range(attempts):
    save_file(tensors, path, durable=False)  # a new file each time, its pages cached
    cut = threading.Timer((attempt % 20) * 0.0005, os.truncate, (path, 4096))
    cut.start()
    try:
        out = load_file(path, "cuda", route=route, chunk_bytes=256 * 1024, pinned_bytes=2 << 20)
    except (RuntimeError, ValueError) as e:
        assert path in str(e), e
        failed += 1
    else:
        assert all(torch.equal(out[k].cpu(), t) for k, t in tensors.items())
        loaded += 1
    cut.join()
print(loaded, failed)
"""


@needs_cuda_build
@pytest.mark.parametrize("route", ["mapped", "buffered"])
def test_a_file_truncated_while_it_loads_is_an_error_not_a_crash(tmp_path, route):
    # The file is cut to 4 KiB at a different moment of each load: a load either finished
    # first (bit-exact) or raises an error naming the file. The mapped route copies out of a
    # mapping, where reading a truncated page raises SIGBUS, which must not kill the process.
    out = subprocess.run([sys.executable, "-c", TRUNCATION_SCRIPT, str(tmp_path / "t.flashpack"), "60", route],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, (out.returncode, out.stderr[-3000:])
    loaded, failed = map(int, out.stdout.split())
    assert loaded + failed == 60 and failed > 0, out.stdout


HANDLER_SCRIPT = r"""
import faulthandler, signal, sys, torch
from flashpack_ops import cuda_stats, load_file, save_file
path = sys.argv[1]
tensors = {"w": torch.arange(1 << 20, dtype=torch.float32)}
save_file(tensors, path)
def route():
    before = cuda_stats()
    out = load_file(path, "cuda", route="mapped")
    assert torch.equal(out["w"].cpu(), tensors["w"])
    after = cuda_stats()
    return "mapped" if after["bytes_mapped"] > before["bytes_mapped"] else "buffered"
steps = [route()]
faulthandler.enable()  # its SIGBUS handler replaces the load's guard
steps.append(route())
faulthandler.disable()  # and gives it back
steps.append(route())
signal.signal(signal.SIGBUS, lambda *args: None)
steps.append(route())
signal.signal(signal.SIGBUS, signal.SIG_DFL)  # the default: the next mapped load guards again
steps.append(route())
print(" ".join(steps))
"""


@needs_cuda_build
def test_the_mapped_route_copies_only_under_its_sigbus_guard(tmp_path):
    # A SIGBUS handler installed after the first mapped load takes the signal from its guard:
    # a truncated file would then kill the process mid-copy, so those loads read with pread.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONFAULTHANDLER"}
    out = subprocess.run([sys.executable, "-c", HANDLER_SCRIPT, str(tmp_path / "h.flashpack")],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["mapped", "buffered", "mapped", "buffered", "mapped"], out.stdout


FOREIGN_SIGBUS_SCRIPT = r"""
import mmap, os, signal, sys, torch
from flashpack_ops import load_file, save_file
path = sys.argv[1]
save_file({"w": torch.ones(1 << 20)}, path)
assert torch.equal(load_file(path, "cuda", route="mapped")["w"].cpu(), torch.ones(1 << 20))  # its handler is in
print("loaded", flush=True)
if sys.argv[2] == "kill":
    os.kill(os.getpid(), signal.SIGBUS)
else:
    with open(path, "r+b") as f:
        m = mmap.mmap(f.fileno(), 0)
        f.truncate(0)
        m[100]  # past the end of the file now: SIGBUS
print("survived", flush=True)
"""


@needs_cuda_build
@pytest.mark.parametrize("how, faulthandler", [("fault", False), ("fault", True), ("kill", False)],
                         ids=["fault", "fault-faulthandler", "kill"])
def test_a_sigbus_outside_a_load_still_ends_the_process(tmp_path, how, faulthandler):
    # The mapped route's SIGBUS handler only catches faults in the range a worker is copying:
    # any other ends the process as before, through Python's faulthandler where it is on.
    flags = ["-X", "faulthandler"] if faulthandler else []
    env = {k: v for k, v in os.environ.items() if k != "PYTHONFAULTHANDLER"}
    out = subprocess.run([sys.executable, *flags, "-c", FOREIGN_SIGBUS_SCRIPT, str(tmp_path / "b.flashpack"), how],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert out.stdout.split() == ["loaded"] and out.returncode == -signal.SIGBUS, (out.returncode, out.stderr[-3000:])
    if faulthandler:
        assert "Fatal Python error: Bus error" in out.stderr, out.stderr[-3000:]


@needs_cuda_build
def test_nothing_is_held_after_a_failed_load(tmp_path, mixed):
    path, _ = mixed
    bad = tmp_path / "short.flashpack"
    data = path.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    before = cuda_stats()
    for route in ROUTE_COUNTERS:
        with pytest.raises(ValueError):
            load_file(bad, "cuda", route=route)
    after = cuda_stats()
    assert after["registered_bytes"] == 0 and after["pinned_bytes"] <= max(before["pinned_bytes"], 256 * MiB)


# ---- emulator only: registration refused -------------------------------------------------------------

REFUSAL_SCRIPT = r"""
import sys, torch, flashpack_ops
from flashpack_ops import cuda_stats, load_file, save_file
g = torch.Generator().manual_seed(0)
t = {"a": torch.randint(0, 256, (300_000,), dtype=torch.uint8, generator=g).view(torch.float32),
     "b": torch.randint(0, 256, (4099,), dtype=torch.uint8, generator=g)}
save_file(t, sys.argv[1])
before = cuda_stats()
out = load_file(sys.argv[1], "cuda", route=sys.argv[2], chunk_bytes=64 * 1024, pinned_bytes=256 * 1024)
after = cuda_stats()
for k in t:
    assert torch.equal(out[k].cpu().view(torch.uint8), t[k].view(torch.uint8)), k
print(after["register_fallbacks"] - before["register_fallbacks"], after["bytes_buffered"] - before["bytes_buffered"],
      after["registered_bytes"], after["bytes_registered"] - before["bytes_registered"])
"""


@needs_cuda_build
@pytest.mark.skipif(not emulated(), reason="forcing the driver to refuse registration needs tests/cuda_emulator")
@pytest.mark.parametrize("refuse_at", ["1", "3"], ids=["first-chunk", "mid-load"])
def test_refused_registration_falls_back_to_staging(tmp_path, refuse_at):
    env = dict(os.environ, FAKE_CUDA_REFUSE_REGISTER_AT=refuse_at)
    out = subprocess.run([sys.executable, "-c", REFUSAL_SCRIPT, str(tmp_path / "f.flashpack"), "register"], env=env,
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    fallbacks, buffered, registered_now, registered_moved = map(int, out.stdout.split())
    assert fallbacks == 1 and buffered == 300_000 + 4099 and registered_now == 0
    # Chunks copied before the refusal count for the route that finished the load only.
    assert registered_moved == 0
    # Why, said once: the driver's own words.
    assert "cudaHostRegister of bytes" in out.stderr and "refused" in out.stderr


@needs_cuda_build
@pytest.mark.skipif(not emulated(), reason="refusing the staging ring's registration needs tests/cuda_emulator")
@pytest.mark.parametrize("route", ["buffered", "direct"])
def test_a_ring_the_driver_will_not_register_is_allocated_pinned(tmp_path, route):
    # Where host memory cannot be registered, the staging ring comes from cudaHostAlloc: the
    # load is the same, and the ring is freed as the registered one is.
    script = REFUSAL_SCRIPT + r"""
ring = after["pinned_bytes"]
assert 0 < ring <= 256 * 1024, after
from flashpack_ops import release_pinned_memory
assert release_pinned_memory() == ring and cuda_stats()["pinned_bytes"] == 0
"""
    env = dict(os.environ, FAKE_CUDA_REFUSE_WRITABLE_REGISTER="1")
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "f.flashpack"), route], env=env,
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    fallbacks, buffered, registered_now, _ = map(int, out.stdout.split())
    assert fallbacks == 0 and registered_now == 0 and buffered <= 300_000 + 4099


@needs_cuda_build
@pytest.mark.skipif(not emulated(), reason="hiding read-only registration support needs tests/cuda_emulator")
def test_no_read_only_registration_stages(tmp_path):
    env = dict(os.environ, FAKE_CUDA_NO_READONLY_REGISTER="1")
    out = subprocess.run([sys.executable, "-c", REFUSAL_SCRIPT, str(tmp_path / "f.flashpack"), "register"], env=env,
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    fallbacks, buffered, _, _ = map(int, out.stdout.split())
    assert fallbacks == 1 and buffered == 300_000 + 4099


MAPPED_REGISTER_SCRIPT = REFUSAL_SCRIPT.split("before = cuda_stats()")[0] + r"""
before = cuda_stats()
out = load_file(sys.argv[1], "cuda", route="mapped", chunk_bytes=64 * 1024, pinned_bytes=256 * 1024, num_threads=1)
after = cuda_stats()
for k in t:
    assert torch.equal(out[k].cpu().view(torch.uint8), t[k].view(torch.uint8)), k
print(after["register_fallbacks"] - before["register_fallbacks"], after["bytes_registered"] - before["bytes_registered"],
      after["bytes_mapped"] - before["bytes_mapped"], after["registered_bytes"])
"""


@needs_cuda_build
@pytest.mark.skipif(not emulated(), reason="forcing the driver to refuse registration needs tests/cuda_emulator")
@pytest.mark.parametrize("refusal", [{"FAKE_CUDA_REFUSE_REGISTER_AT": "1"}, {"FAKE_CUDA_REFUSE_REGISTER_AT": "3"},
                                     {"FAKE_CUDA_NO_READONLY_REGISTER": "1"}],
                         ids=["first-chunk", "mid-load", "unsupported"])
def test_the_mapped_route_copies_what_the_driver_will_not_register(tmp_path, refusal):
    # Chunks registered before the refusal stay registered until their copies finish; that
    # chunk and every later one are copied, and the load is whole.
    env = dict(os.environ, FLASHPACK_CUDA_REGISTER_PERCENT="100", **refusal)
    out = subprocess.run([sys.executable, "-c", MAPPED_REGISTER_SCRIPT, str(tmp_path / "f.flashpack")], env=env,
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    fallbacks, registered, copied, registered_now = map(int, out.stdout.split())
    assert fallbacks == 1 and registered_now == 0
    assert registered + copied == 300_000 + 4099
    # One worker fills the chunks in file order: the first two, of 64 KiB each, went before
    # a refusal of the third registration.
    assert registered == {"1": 0, "3": 2 * 64 * 1024}.get(refusal.get("FAKE_CUDA_REFUSE_REGISTER_AT"), 0)
    if "FAKE_CUDA_REFUSE_REGISTER_AT" in refusal:
        assert "cudaHostRegister of bytes" in out.stderr and "copied instead" in out.stderr


@needs_cuda_build
@pytest.mark.skipif(not emulated(), reason="failing cudaHostUnregister on purpose needs tests/cuda_emulator")
@pytest.mark.parametrize("route, percent", [("register", "0"), ("mapped", "100")])
def test_a_range_that_stays_registered_keeps_its_mapping(tmp_path, route, percent):
    # Unmapping a range the driver still holds would leave it pinned over addresses a later
    # mapping can take: the load fails, naming the file, and the mapping stays.
    script = REFUSAL_SCRIPT.split("before = cuda_stats()")[0] + r"""
try:
    load_file(sys.argv[1], "cuda", route=sys.argv[2], chunk_bytes=64 * 1024, pinned_bytes=256 * 1024)
    raise SystemExit("the load did not fail")
except RuntimeError as e:
    assert sys.argv[1] in str(e), e
import time
time.sleep(0.5)  # an unmap, were one wrongly started, would be done by now
with open("/proc/self/maps") as maps:
    assert any(line.rstrip().endswith(sys.argv[1]) for line in maps), "the mapping is gone"
s = cuda_stats()
assert s["registered_bytes"] > 0 and s["unmapping_bytes"] == 0, s
print("ok")
"""
    env = dict(os.environ, FAKE_CUDA_FAIL_UNREGISTER_AT="2", FLASHPACK_CUDA_REGISTER_PERCENT=percent)
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "f.flashpack"), route], env=env,
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@needs_cuda_build
@pytest.mark.skipif(not emulated(), reason="failing a copy on purpose needs tests/cuda_emulator")
@pytest.mark.parametrize("route, percent", [("buffered", "0"), ("mapped", "0"), ("mapped", "50"), ("register", "0")])
def test_a_failed_copy_releases_everything(tmp_path, route, percent):
    script = REFUSAL_SCRIPT.split("before = cuda_stats()")[0] + r"""
from flashpack_ops import release_pinned_memory
try:
    load_file(sys.argv[1], "cuda", route=sys.argv[2], chunk_bytes=64 * 1024, pinned_bytes=256 * 1024)
except RuntimeError as e:
    assert sys.argv[1] in str(e) and "cuda:0" in str(e), e
else:
    raise AssertionError("the load did not fail")
s = cuda_stats()
assert s["registered_bytes"] == 0 and s["pinned_bytes"] <= 256 * 1024, s
assert release_pinned_memory() == s["pinned_bytes"] and cuda_stats()["pinned_bytes"] == 0
out = load_file(sys.argv[1], "cuda", route=sys.argv[2])  # the process is still healthy
assert torch.equal(out["b"].cpu(), t["b"])
print("ok")
"""
    env = dict(os.environ, FAKE_CUDA_FAIL_UPLOAD_AT="4", FLASHPACK_CUDA_REGISTER_PERCENT=percent)
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "f.flashpack"), route], env=env,
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
