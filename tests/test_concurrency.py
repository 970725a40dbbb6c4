"""Loads and saves from many threads at once: exact results, no deadlock, no torn files.

The ops release the GIL, so these threads really run the C++ loaders side by side, each of
which starts its own reader threads. Every wait has a timeout, so a deadlock fails the test
instead of hanging it.
"""

from __future__ import annotations

import contextlib
import random
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import flashpack_ops

THREADS = 8
TIMEOUT_S = 120

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"))]


def state_dict(seed: int, scale: int = 1):
    g = torch.Generator().manual_seed(seed)
    return {
        "embed": torch.randn(256 * scale, 64, generator=g),
        "attn.qkv": torch.randn(64, 192 * scale, generator=g).to(torch.bfloat16),
        "norm": torch.randn(64, generator=g).half(),
        "step": torch.tensor(seed, dtype=torch.int64),
        "mask": torch.rand(100 + seed, generator=g) > 0.5,
        **{f"layers.{i}.bias": torch.randn(i + seed + 1, generator=g) for i in range(50)},
    }


def equal(loaded: dict, expected: dict) -> bool:
    return list(loaded) == list(expected) and all(
        a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.cpu(), b) for a, b in zip(loaded.values(), expected.values()))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("concurrent")
    out = []
    for seed in range(4):
        sd = state_dict(seed, scale=1 + seed)
        path = str(d / f"m{seed}.flashpack")
        flashpack_ops.save_file(sd, path)
        out.append((path, sd))
    return out


def run_threads(fn, n=THREADS):
    """Runs fn(thread index) on n threads released together; returns their results."""
    start = threading.Barrier(n)

    def body(i):
        start.wait(timeout=TIMEOUT_S)
        return fn(i)

    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(body, i) for i in range(n)]
        return [f.result(timeout=TIMEOUT_S) for f in futures]


@pytest.mark.parametrize("device", DEVICES)
def test_threads_loading_same_and_different_files(files, device):
    def worker(i):
        rng = random.Random(i)
        mismatches = []
        for k in range(25):
            # Half the threads hammer one file, the others pick at random.
            path, expected = files[0] if i % 2 == 0 else rng.choice(files)
            copy = device == "cpu" and rng.random() < 0.5
            loaded = flashpack_ops.load_file(path, device, copy=copy, num_threads=rng.choice([0, 1, 4]))
            assert all(t.device.type == device for t in loaded.values())
            if not equal(loaded, expected):
                mismatches.append((path, copy, k))
        return mismatches

    assert run_threads(worker) == [[]] * THREADS


def test_concurrent_save_and_load_of_one_path(tmp_path):
    """Loaders see the old or the new file, never a mixture: the save writes a temporary
    file and renames it, and rename switches the path from one complete inode to another."""
    path = str(tmp_path / "live.flashpack")
    versions = [state_dict(10, scale=8), state_dict(11, scale=12)]
    flashpack_ops.save_file(versions[0], path)
    saves = 60
    done = threading.Event()

    def worker(i):
        if i == 0:  # the saver
            try:
                for k in range(saves):
                    flashpack_ops.save_file(versions[(k + 1) % 2], path)
            finally:
                done.set()
            return {}
        seen = {0: 0, 1: 0}
        rng = random.Random(i)
        while not done.is_set():
            loaded = flashpack_ops.load_file(path, copy=rng.random() < 0.5)
            match = [v for v in (0, 1) if equal(loaded, versions[v])]
            assert match, "a load saw a file that is neither the old nor the new one"
            seen[match[0]] += 1
        return seen

    results = run_threads(worker, n=5)
    totals = {v: sum(r.get(v, 0) for r in results[1:]) for v in (0, 1)}
    assert totals[0] > 0 and totals[1] > 0, f"the loads did not overlap the saves: {totals}"


def test_mapped_tensors_survive_the_file_being_replaced(tmp_path):
    """A mapped load keeps the old inode alive: saving over the path does not change tensors
    already loaded from it."""
    path = str(tmp_path / "m.flashpack")
    old, new = state_dict(1, scale=4), state_dict(2, scale=4)
    flashpack_ops.save_file(old, path)
    mapped = flashpack_ops.load_file(path)
    flashpack_ops.save_file(new, path)
    assert equal(mapped, old)
    assert equal(flashpack_ops.load_file(path), new)


@contextlib.contextmanager
def saved_over_in_turn(path, versions):
    """While inside, a thread saves each (tensors, metadata) of ``versions`` over ``path`` in
    turn, as fast as it can (atomic saves, no fsync)."""
    stop = threading.Event()

    def writer():
        k = 0
        while not stop.is_set():
            tensors, metadata = versions[k % len(versions)]
            flashpack_ops.save_file(tensors, path, metadata=metadata, durable=False)
            k += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(TIMEOUT_S)


def test_read_flashpack_file_never_mixes_two_files(tmp_path):
    # read_flashpack_file reads the footer and the blocks in two calls; a save that renames
    # a new file over the path between them must not pair one file's names with the other's
    # bytes. The two files have the same layout with the names swapped, so a mix loads
    # without error and only the values tell.
    path = str(tmp_path / "swapped.flashpack")
    a = {"x": torch.full((256,), 1.0), "y": torch.full((256,), 2.0)}
    b = {"y": a["y"], "x": a["x"]}
    flashpack_ops.save_file(a, path, durable=False)
    loads = given_up = 0
    with saved_over_in_turn(path, [(b, None), (a, None)]):
        for _ in range(3000):
            try:
                storage, meta = flashpack_ops.read_flashpack_file(path)
            except RuntimeError as exc:  # replaced during each of its attempts: said plainly
                assert "was replaced or modified while being read" in str(exc)
                given_up += 1
                continue
            loaded = dict(flashpack_ops.iterate_from_flash_tensor(storage, meta))
            assert torch.equal(loaded["x"], a["x"]) and torch.equal(loaded["y"], a["y"])
            loads += 1
    # Enough loads went through for the check above to mean something, however busy the
    # machine (how many give up depends on how the two threads are scheduled).
    assert loads >= 10, (loads, given_up)


def test_safe_open_pairs_a_files_metadata_with_its_own_tensors(tmp_path):
    # safe_open reads the metadata and the tensors apart; a file saved over the path between
    # them must not pair one file's metadata with the other's tensors.
    path = str(tmp_path / "tagged.flashpack")
    versions = [({"w": torch.full((256,), float(k))}, {"version": str(k)}) for k in range(2)]
    flashpack_ops.save_file(versions[0][0], path, metadata=versions[0][1], durable=False)
    opened = given_up = 0
    with saved_over_in_turn(path, versions):
        for _ in range(1000):
            try:
                with flashpack_ops.safe_open(path, framework="pt") as f:
                    version = int(f.metadata()["version"])
                    assert torch.equal(f.get_tensor("w"), versions[version][0]["w"])
                opened += 1
            except RuntimeError as exc:  # replaced during each of its attempts: said plainly
                assert "was replaced three times while it was opened" in str(exc)
                given_up += 1
    assert opened >= 10, (opened, given_up)


def test_assign_from_file_with_a_device_map_never_mixes_two_files(tmp_path):
    # A device_map spanning several devices loads the file once per device; a save that
    # renames a new file over the path between those loads must not give the model one
    # file's weights on one device and the other's on the next. "cpu" and "cpu:0" are two
    # devices to the map, so two loads, on any machine (as "cuda:0" and "cpu" would be).
    path = str(tmp_path / "placed.flashpack")

    def model(value):
        net = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 16))
        with torch.no_grad():
            for param in net.parameters():
                param.fill_(value)
        return net

    versions = [(model(float(k)).state_dict(), None) for k in (1, 2)]
    flashpack_ops.save_file(versions[0][0], path, durable=False)
    loads = given_up = 0
    with saved_over_in_turn(path, versions):
        for _ in range(2000):
            net = model(0.0)
            try:
                flashpack_ops.assign_from_file(net, path, device={"0": "cpu", "1": "cpu:0"})
            except RuntimeError as exc:  # replaced during each of its attempts: said plainly
                assert "was replaced or modified while being read" in str(exc)
                given_up += 1
                continue
            loaded = net.state_dict()
            assert any(equal(loaded, tensors) for tensors, _ in versions), \
                {name: tensor.flatten()[0].item() for name, tensor in loaded.items()}
            loads += 1
    assert loads >= 10, (loads, given_up)


# A process that may start no more threads (RLIMIT_NPROC reached, a container's pids.max):
# loads, checks and saves run on the caller's thread alone, with the same results.
NO_THREADS = textwrap.dedent(
    """
    import os, resource, sys, tempfile, threading
    import torch
    import flashpack_ops

    torch.set_num_threads(1)  # as DataLoader workers do: ATen's own pool would need threads too
    root = os.geteuid() == 0
    if root:  # root is exempt from RLIMIT_NPROC
        os.setgid(65534)
        os.setuid(65534)
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
    try:
        threading.Thread(target=print).start()
        sys.exit("a thread could still be started")
    except RuntimeError:
        pass
    g = torch.Generator().manual_seed(0)
    sd = {f"w{i}": torch.randn(1000 + i, generator=g) for i in range(16)}
    sd["h"] = torch.arange(77, dtype=torch.float16)
    with tempfile.TemporaryDirectory(dir="/tmp" if root else None) as d:
        path = os.path.join(d, "m.flashpack")
        flashpack_ops.save_file(sd, path, num_threads=8, checksum=True)
        flashpack_ops.save_file(sd, path + ".bf16", num_threads=8, target_dtype=torch.bfloat16)
        flashpack_ops.verify_file(path, num_threads=8)
        for kwargs in [{}, {"copy": True}, {"verify": True}, {"copy": True, "verify": True}]:
            loaded = flashpack_ops.load_file(path, num_threads=8, **kwargs)
            assert list(loaded) == list(sd) and all(torch.equal(loaded[k], sd[k]) for k in sd), kwargs
        loaded = flashpack_ops.load_file(path + ".bf16", copy=True, num_threads=8)
        assert all(torch.equal(loaded[k], sd[k].bfloat16()) for k in sd if k != "h")
        assert sorted(os.listdir(d)) == ["m.flashpack", "m.flashpack.bf16"]
    print("ok")
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs RLIMIT_NPROC")
def test_loads_and_saves_work_where_no_thread_can_be_started():
    r = subprocess.run([sys.executable, "-c", NO_THREADS], capture_output=True, text=True, timeout=TIMEOUT_S)
    if r.returncode != 0 and "Operation not permitted" in r.stderr:
        pytest.skip("cannot drop root's privileges here")
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr


def test_building_without_a_dtype_leaves_another_threads_default_dtype_alone(tmp_path):
    # Another thread builds under bfloat16 (as from_pretrained(dtype=torch.bfloat16) does) and
    # puts float32 back while from_flashpack, asked for no dtype, is building: float32 stays.
    from flashpack_ops import FlashPackMixin

    building, restored = threading.Event(), threading.Event()

    class Net(torch.nn.Module, FlashPackMixin):
        def __init__(self, wait=False):
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)
            if wait:
                building.set()
                assert restored.wait(TIMEOUT_S)

    path = str(tmp_path / "net.flashpack")
    Net().save_flashpack(path)
    bf16_set = threading.Event()

    def other():
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            bf16_set.set()
            assert building.wait(TIMEOUT_S)
        finally:
            torch.set_default_dtype(previous)
            restored.set()

    assert torch.get_default_dtype() == torch.float32
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(other)
        assert bf16_set.wait(TIMEOUT_S)
        try:
            model = Net.from_flashpack(path, wait=True)
        finally:
            restored.set()
            future.result(timeout=TIMEOUT_S)
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)
    assert default == torch.float32
    assert model.fc.weight.dtype == torch.float32



@pytest.mark.parametrize("load_first", [True, False])
def test_building_beside_another_patch_of_register_parameter_leaves_no_meta_behind(load_first):
    # accelerate's init_empty_weights patches nn.Module.register_parameter too, and puts back
    # what it found. Entered and left across a build on another thread (load_first: the build
    # enters first and the patch leaves last; else the patch enters first and leaves while
    # the build runs), it must leave no patch at work: later models, on either thread, are
    # built on the CPU.
    from flashpack_ops.mixin import init_empty_parameters

    original = torch.nn.Module.register_parameter
    step = {name: threading.Event() for name in ("patched", "building", "loaded", "unpatched")}

    @contextlib.contextmanager
    def patch_register_parameter():  # what accelerate.init_empty_weights does
        saved = torch.nn.Module.register_parameter

        def on_meta(module, name, param):
            saved(module, name, param)
            if module._parameters.get(name) is not None:
                module._parameters[name] = torch.nn.Parameter(module._parameters[name].to("meta"))

        torch.nn.Module.register_parameter = on_meta
        try:
            yield
        finally:
            torch.nn.Module.register_parameter = saved

    class Net(torch.nn.Module):
        def __init__(self, wait_for):
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)
            step["building"].set()
            assert step[wait_for].wait(TIMEOUT_S)

    def other():
        if load_first:
            assert step["building"].wait(TIMEOUT_S)
        with patch_register_parameter():
            step["patched"].set()
            assert step["loaded" if load_first else "building"].wait(TIMEOUT_S)
        step["unpatched"].set()

    def build():
        with init_empty_parameters():
            model = Net("patched" if load_first else "unpatched")
        step["loaded"].set()
        return model

    try:
        with ThreadPoolExecutor(1) as other_pool, ThreadPoolExecutor(1) as loader:
            future = other_pool.submit(other)
            if not load_first:
                assert step["patched"].wait(TIMEOUT_S)
            model = loader.submit(build).result(timeout=TIMEOUT_S)
            future.result(timeout=TIMEOUT_S)
            assert model.fc.weight.is_meta
            # A later, ordinary model on the thread that loaded, and on this one.
            assert not loader.submit(lambda: torch.nn.Linear(2, 2).weight.is_meta).result(timeout=TIMEOUT_S)
            assert not torch.nn.Linear(2, 2).weight.is_meta
    finally:
        torch.nn.Module.register_parameter = original
