#!/usr/bin/env python3
"""Disk -> GPU: flashpack_ops against safetensors, torch.load and the reference flashpack.

Loads a 3.5 GB LLM-shaped bf16 state dict (74 tensors) and 20,000 small bf16 tensors to the
GPU with every loader, from the page cache (warm) and with the page cache dropped (cold),
in one run on one machine, next to that machine's ceilings: pinned host -> GPU copy speed
and parallel disk reads. Every load is timed between two torch.cuda.synchronize() calls,
checked bit for bit against the saved tensors, and reported as the median of --runs. Last,
each loader's first load in a fresh process ("first"): what a cold start pays on top of
CUDA's own start-up.

Writes bench.json (every number) and bench.png (load time per loader, GB/s vs size) into
--out, and prints a short table last. Run by benchmarks/gpu_check.sh; see docs/cuda.md.

    python benchmarks/bench_gpu.py --out /tmp/bench            # on a GPU machine, as root
    python benchmarks/bench_gpu.py --out /tmp/dry --cpu-dry-run # the script's logic, tiny, on a CPU
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import mmap
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
import traceback
from typing import Callable, Dict, List, Optional

import torch

GB = 1e9
MiB = 1 << 20
MAIN_LOADERS = ["flashpack_ops", "safetensors", "torch.load", "flashpack 0.4.5"]
PEERS = MAIN_LOADERS[1:]
# flashpack_ops with one route or setting forced, next to its default ("auto": copies out of
# the mapped file when it is cached, O_DIRECT reads when not). The warm rows run on the
# cached file, the cold ones after the page cache is emptied.
VARIANTS = {
    # read() into the ring: the warm default until the mapped route took its place.
    "flashpack_ops[buffered]": dict(route="buffered"),
    "flashpack_ops[buffered 32 threads]": dict(route="buffered", num_threads=32),
    "flashpack_ops[register]": dict(route="register"),
    "flashpack_ops[8 threads]": dict(num_threads=8),
    "flashpack_ops[32 threads]": dict(num_threads=32),
    "flashpack_ops[4MiB chunks]": dict(chunk_bytes=4 * MiB),
    "flashpack_ops[16MiB/512MiB]": dict(chunk_bytes=16 * MiB, pinned_bytes=512 * MiB),
    "flashpack_ops[2 streams]": dict(num_streams=2),
    # Workers that sleep while their copies finish, instead of spinning (the default).
    "flashpack_ops[blocking sync]": dict(env={"FLASHPACK_CUDA_BLOCKING_SYNC": "1"}),
    # The mapped route with a share of its chunks registered for the GPU to read out of the
    # page cache, beside the copies of the rest: less host memory traffic, more driver calls.
    "flashpack_ops[mapped, 12% registered]": dict(route="mapped", env={"FLASHPACK_CUDA_REGISTER_PERCENT": "12"}),
    "flashpack_ops[mapped, 25% registered]": dict(route="mapped", env={"FLASHPACK_CUDA_REGISTER_PERCENT": "25"}),
    "flashpack_ops[mapped, 50% registered]": dict(route="mapped", env={"FLASHPACK_CUDA_REGISTER_PERCENT": "50"}),
}
SMALL_VARIANTS = {
    "flashpack_ops[buffered]": dict(route="buffered"),
    "flashpack_ops[register]": dict(route="register"),
    # The index read before the blocks move, as before it was read beside them.
    "flashpack_ops[index first]": dict(env={"FLASHPACK_INDEX_AHEAD_BYTES": str(1 << 40)}),
}
COLD_VARIANTS = {
    "flashpack_ops[buffered]": dict(route="buffered"),
    "flashpack_ops[direct 32 threads]": dict(route="direct", num_threads=32),
    "flashpack_ops[direct 32MiB/1GiB]": dict(route="direct", chunk_bytes=32 * MiB, pinned_bytes=1024 * MiB),
}
FORMATS = {"flashpack_ops": "fp", "safetensors": "st", "torch.load": "pt", "flashpack 0.4.5": "ref"}
SUFFIX = {"fp": ".flashpack", "st": ".safetensors", "pt": ".pt", "ref": ".ref.flashpack"}


def log(*args):
    print(*args, flush=True)


# ---- data ------------------------------------------------------------------------------------


def llm_shapes(layers: int, hidden: int, inter: int, vocab: int) -> Dict[str, tuple]:
    """A Llama-style decoder: embedding, `layers` x 9 tensors, final norm (74 for 8 layers)."""
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (hidden,)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{name}.weight"] = (hidden, hidden)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
        shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
    shapes["model.norm.weight"] = (hidden,)
    return shapes


def make_tensors(shapes: Dict[str, tuple], gen_device: str, seed: int) -> Dict[str, torch.Tensor]:
    g = torch.Generator(device=gen_device).manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        out[name] = torch.randn(shape, dtype=torch.bfloat16, device=gen_device, generator=g).cpu()
    return out


def nbytes(tensors: Dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def reference_flashpack():
    """The reference package, or None (logged) where it cannot be imported: its rows are then
    left out and the rest of the benchmark still runs."""
    try:
        import flashpack
        import flashpack.deserialization
        return flashpack
    except Exception as e:  # ImportError, or a dependency of its own failing at import
        log(f"  reference flashpack not importable, its rows are left out: {type(e).__name__}: {e}")
        return None


def save_all(tensors: Dict[str, torch.Tensor], stem: str, timings: Optional[dict] = None) -> Dict[str, str]:
    import flashpack_ops
    import safetensors.torch

    flashpack = reference_flashpack()
    paths = {fmt: stem + SUFFIX[fmt] for fmt in SUFFIX if fmt != "ref" or flashpack is not None}
    savers = {
        "fp": lambda p: flashpack_ops.save_file(tensors, p),
        "st": lambda p: safetensors.torch.save_file(tensors, p),
        "pt": lambda p: torch.save(tensors, p),
    }
    if flashpack is not None:
        savers["ref"] = lambda p: flashpack.pack_to_file(tensors, p, target_dtype=None, silent=True)
    for fmt, save in savers.items():
        if timings is not None:
            # NOTE: each timed save starts with no dirty pages left by the one before (as in
            # bench_cpu.py): a writer that follows 10 GB of its peers' unwritten pages is held
            # back by the kernel's write-back throttling, whoever it is.
            os.sync()
        t0 = time.perf_counter()
        save(paths[fmt])
        if timings is not None:
            timings[fmt] = time.perf_counter() - t0
    if timings is not None:
        # flashpack_ops flushes to disk (fsync) before it returns, which no peer does; the
        # same save without the flush is the like-for-like number.
        scratch = paths["fp"] + ".nosync"
        os.sync()
        t0 = time.perf_counter()
        flashpack_ops.save_file(tensors, scratch, durable=False)
        timings["fp_nosync"] = time.perf_counter() - t0
        os.remove(scratch)
        # The durable save again, through a mapping of the file (the default) and with every
        # range written by pwrite() instead, alternating, twice each: what the mapping gains
        # on this machine. (Once each, the second and last saves of a run, they gave 2.42 s
        # and 1.76 s on the H200 host, where the mapping had halved the save without fsync.)
        runs: Dict[str, List[float]] = {"fp_mapped": [], "fp_pwrite": []}
        for _ in range(2):
            for key, mapped in (("fp_mapped", "1"), ("fp_pwrite", "0")):
                os.sync()
                t0 = time.perf_counter()
                with_environment({"FLASHPACK_SAVE_MAPPED": mapped}, lambda: flashpack_ops.save_file(tensors, scratch))
                runs[key].append(time.perf_counter() - t0)
                os.remove(scratch)
        timings.update({key: statistics.median(times) for key, times in runs.items()})
    return paths


# ---- loaders ---------------------------------------------------------------------------------


def make_loaders(device: torch.device) -> Dict[str, Callable[[Dict[str, str]], Dict[str, torch.Tensor]]]:
    import flashpack_ops
    import safetensors.torch

    loaders = {
        "flashpack_ops": lambda paths: flashpack_ops.load_file(paths["fp"], device),
        "safetensors": lambda paths: safetensors.torch.load_file(paths["st"], device=str(device)),
        "torch.load": lambda paths: torch.load(paths["pt"], mmap=True, map_location=device, weights_only=True),
    }
    flashpack = reference_flashpack()
    if flashpack is not None:
        def reference(paths):
            storage, meta = flashpack.deserialization.read_flashpack_file(paths["ref"], device=device)
            return dict(flashpack.deserialization.iterate_from_flash_tensor(storage, meta))

        loaders["flashpack 0.4.5"] = reference
    for name, kwargs in {**VARIANTS, **COLD_VARIANTS, **SMALL_VARIANTS}.items():
        loaders[name] = lambda paths, kw=kwargs: with_environment(
            kw.get("env", {}), lambda: flashpack_ops.load_file(
                paths["fp"], device, **{k: v for k, v in kw.items() if k != "env"}))
    return loaders


def with_environment(variables: Dict[str, str], fn: Callable[[], Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """fn() with `variables` set in the environment, as they were afterwards."""
    saved = {k: os.environ.get(k) for k in variables}
    os.environ.update(variables)
    try:
        return fn()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---- checks ----------------------------------------------------------------------------------


class Expected:
    """The saved tensors, where they can be compared fast: on the GPU unless --host-checks."""

    def __init__(self, tensors: Dict[str, torch.Tensor], device: torch.device, host_checks: bool):
        self.names = sorted(tensors)
        self.shapes = {n: tuple(t.shape) for n, t in tensors.items()}
        self.host = tensors
        self.on_device = device.type == "cuda" and not host_checks
        if self.on_device:
            self.flat = torch.cat([tensors[n].reshape(-1) for n in self.names]).view(torch.int16).to(device)

    def check(self, out: Dict[str, torch.Tensor]) -> Optional[str]:
        """None if `out` holds exactly the saved bits, else what differs."""
        if sorted(out) != self.names:
            return f"names differ: {len(out)} loaded, {len(self.names)} saved"
        for n in self.names:
            t = out[n]
            if tuple(t.shape) != self.shapes[n] or t.dtype != torch.bfloat16:
                return f"{n}: {t.dtype} {tuple(t.shape)}, saved bfloat16 {self.shapes[n]}"
        if self.on_device:
            flat = torch.cat([out[n].reshape(-1) for n in self.names]).view(torch.int16)
            return None if torch.equal(flat, self.flat) else "bytes differ"
        for n in self.names:
            if not torch.equal(out[n].cpu().view(torch.int16), self.host[n].view(torch.int16)):
                return f"{n}: bytes differ"
        return None


# ---- the machine -----------------------------------------------------------------------------


def evict(files: List[str]):
    """Drops the files' pages from the page cache (no root needed); written pages are flushed
    first, as only clean pages can be dropped."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def drop_caches(files: List[str], whole: bool = True) -> str:
    """Empties the page cache; returns how. Root drops every cache (unless not `whole`),
    others evict `files`."""
    if whole and subprocess.run(["sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"],
                                capture_output=True).returncode == 0:
        return "drop_caches"
    evict(files)
    return "fadvise"


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_LOW_BIT = bytes(b & 1 for b in range(256))


def cached_fraction(path: str) -> Optional[float]:
    """The share of the file's pages in the page cache (mincore), None where it cannot be told.
    After a drop it says whether a cold run really read from the disk: neither drop_caches nor
    fadvise drops pages that a live mapping holds."""
    size = os.path.getsize(path)
    if size == 0:
        return 0.0
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr is None or addr == ctypes.c_void_p(-1).value:
            return None
        try:
            pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
            vec = (ctypes.c_ubyte * pages)()
            if _libc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
                return None
            return bytes(vec).translate(_LOW_BIT).count(1) / pages  # bit 0: the page is cached
        finally:
            _libc.munmap(ctypes.c_void_p(addr), size)
    finally:
        os.close(fd)


def cached_after_drop(files: List[str]) -> Optional[float]:
    fractions = [cached_fraction(f) for f in files]
    return None if None in fractions else max(fractions)


def read_file_gbps(path: str, threads: int, direct: bool, chunk: int = 64 * MiB) -> float:
    """Reads the whole file with `threads` parallel preads (no GPU): the disk or page cache ceiling."""
    size = os.path.getsize(path)
    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
    fd = os.open(path, flags)
    offsets = list(range(0, size, chunk))
    lock = threading.Lock()
    errors = []
    # Buffers made and faulted in before the clock starts, as a loader's ring is: the first
    # read into a fresh mapping zero-fills every page it touches, which is not reading.
    buffers = [mmap.mmap(-1, chunk) for _ in range(threads)]  # page-aligned, as O_DIRECT needs
    for buf in buffers:
        for page in range(0, chunk, mmap.PAGESIZE):
            buf[page] = 0
    start = threading.Barrier(threads + 1)

    def worker(buf):
        try:
            start.wait()
            while True:
                with lock:
                    if not offsets:
                        return
                    off = offsets.pop()
                os.preadv(fd, [buf], off)
        except Exception as e:
            errors.append(e)

    try:
        pool = [threading.Thread(target=worker, args=(buf,)) for buf in buffers]
        for t in pool:
            t.start()
        start.wait()
        t0 = time.perf_counter()
        for t in pool:
            t.join()
        dt = time.perf_counter() - t0
    finally:
        os.close(fd)
        for buf in buffers:
            buf.close()
    if errors:
        raise errors[0]
    return size / GB / dt


def dirty_bytes() -> int:
    """The page cache's dirty bytes (/proc/meminfo), 0 where unknown. A load must not dirty
    the file it reads: some drivers mark the pages of registered host memory dirty when they
    unregister it, even for read-only registrations, which would make the kernel write the
    whole file back to disk after each load."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("Dirty:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def h2d_gbps(device: torch.device, nbytes_: int, runs: int) -> Optional[float]:
    if device.type != "cuda":
        return None
    src = torch.empty(nbytes_, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes_, dtype=torch.uint8, device=device)
    times = []
    for k in range(runs + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        if k:
            times.append(time.perf_counter() - t0)
    del src, dst
    # Give the pinned buffer back, or torch's host cache would count it in the peaks below.
    empty_host_cache = getattr(torch._C, "_host_emptyCache", None)
    if empty_host_cache is not None:
        empty_host_cache()
    return nbytes_ / GB / statistics.median(times)


def machine(device: torch.device) -> dict:
    info = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpus": os.cpu_count(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                        cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        info["commit"] = None
    # A copy of the tree without its .git folder says which commit it is through FLASHPACK_COMMIT.
    info["commit"] = info["commit"] or os.environ.get("FLASHPACK_COMMIT") or None
    for mod in ("flashpack", "safetensors"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            info[mod] = None
    return info


def first_load(loader: str, paths: Dict[str, str], device: torch.device) -> dict:
    """In a process that has loaded nothing yet: the time of its first load, after CUDA is up.

    What a server pays at a cold start beyond CUDA's own start-up, which every loader pays alike:
    pinned memory, streams, allocator and registration set up on first use. The result is then
    checked bit for bit against the same tensors read on the CPU from another file format.
    """
    import flashpack_ops
    import safetensors.torch

    torch.zeros(1, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    load = make_loaders(device)[loader]
    t0 = time.perf_counter()
    out = load(paths)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    expected = (safetensors.torch.load_file(paths["st"]) if loader == "flashpack_ops"
                else flashpack_ops.load_file(paths["fp"]))
    # On the host: the same under tests/cuda_emulator, which runs no kernels.
    problem = Expected(expected, device, host_checks=True).check(out)
    return {"seconds": seconds, "problem": problem}


def repeated_loads(path: str, device: torch.device, runs: int) -> dict:
    """Warm loads of one flashpack file in a row in this process, each result freed before the
    next, as an evaluation loop does: the median time and minor page faults per load.

    Run in a child process, once as it is and once with glibc's heap trimming held back:
    freeing a result of 20,000 tensors can give megabytes of heap back to the system, which
    the next load then faults in again, page by page.
    """
    import resource

    import flashpack_ops

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    torch.zeros(1, device=device)
    flashpack_ops.load_file(path, device)  # untimed: the pool, the streams
    times, faults = [], []
    for _ in range(runs):
        sync()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        out = flashpack_ops.load_file(path, device)
        sync()
        times.append(time.perf_counter() - t0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        del out
    return {"median_s": statistics.median(times), "faults": statistics.median(faults)}


# ---- the benchmark ---------------------------------------------------------------------------


class Bench:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.t_start = time.perf_counter()
        self.results: List[dict] = []
        self.report = {"machine": machine(self.device), "args": vars(args), "ceilings": {}, "saves": {},
                       "results": self.results, "skipped": [], "errors": []}
        self.loaders = make_loaders(self.device)
        self.datasets: Dict[str, dict] = {}

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def out_of_time(self) -> bool:
        return self.args.deadline_s > 0 and time.perf_counter() - self.t_start > self.args.deadline_s

    def save_report(self):
        path = os.path.join(self.args.out, "bench.json")
        with open(path + ".tmp", "w") as f:
            json.dump(self.report, f, indent=1)
        os.replace(path + ".tmp", path)

    def add_dataset(self, key: str, tensors: Dict[str, torch.Tensor], stem: str, save_timings: Optional[dict] = None):
        paths = save_all(tensors, stem, save_timings)
        self.datasets[key] = {"paths": paths, "bytes": nbytes(tensors), "count": len(tensors),
                              "expected": Expected(tensors, self.device, self.args.host_checks)}

    def drop_dataset(self, key: str):
        for p in self.datasets.pop(key)["paths"].values():
            os.remove(p)

    def stats(self) -> dict:
        import flashpack_ops

        s = dict(flashpack_ops.cuda_stats()) if self.device.type == "cuda" else {}
        if self.device.type == "cuda" and hasattr(torch.cuda, "host_memory_stats"):
            try:
                h = torch.cuda.host_memory_stats()
                s["torch_pinned_peak_bytes"] = next(
                    (h[k] for k in ("allocated_bytes.peak", "allocated_bytes.all.peak") if k in h), 0)
            except Exception:
                pass
        return s

    def unmapped(self, timeout_s: float = 5.0):
        """Waits until flashpack_ops has unmapped its registered mappings (it does so after a load
        returns): their time then counts in this run's steps, and the next run starts clean."""
        import flashpack_ops

        if self.device.type != "cuda":
            return
        deadline = time.perf_counter() + timeout_s
        while flashpack_ops.cuda_stats().get("unmapping_bytes", 0) and time.perf_counter() < deadline:
            time.sleep(0.001)

    def reset_peaks(self):
        import flashpack_ops

        if self.device.type == "cuda":
            flashpack_ops.cuda_stats(reset_peaks=True)
            if hasattr(torch.cuda, "reset_peak_host_memory_stats"):
                try:
                    torch.cuda.reset_peak_host_memory_stats()
                except Exception:
                    pass

    def measure(self, loader: str, key: str, cold: bool) -> Optional[dict]:
        if loader not in self.loaders:
            return None  # the reference, where it cannot be imported (logged once)
        ds = self.datasets[key]
        load = self.loaders[loader]
        row = self.new_row(loader, key, "cold" if cold else "warm")
        files = list(ds["paths"].values())
        try:
            if not cold:
                out = load(ds["paths"])  # untimed: fills the page cache and any pool
                problem = ds["expected"].check(out)
                del out
                self.unmapped()
                if problem:
                    row["problems"].append(f"untimed load: {problem}")
            for _ in range(self.args.runs):
                # The previous run's tensors first: pages a live mapping holds stay cached.
                gc.collect()
                if cold:
                    row["cache_drop"] = drop_caches(files, whole=not self.args.cpu_dry_run)
                    row.setdefault("cached_after_drop", []).append(cached_after_drop(files))
                self.reset_peaks()
                before = self.stats()
                dirty = dirty_bytes()
                self.sync()
                t0 = time.perf_counter()
                out = load(ds["paths"])
                self.sync()
                row["times_s"].append(time.perf_counter() - t0)
                row.setdefault("dirtied_bytes", []).append(dirty_bytes() - dirty)
                self.unmapped()
                after = self.stats()
                row["stats"].append({k: after[k] - before.get(k, 0) if k.startswith(("bytes_", "ns_")) or k == "loads"
                                     else after[k] for k in after})
                problem = ds["expected"].check(out)
                del out
                if problem:
                    row["problems"].append(problem)
        except Exception as e:
            row["problems"].append(f"{type(e).__name__}: {e}")
            traceback.print_exc()
        row["bitexact"] = not row["problems"]
        if row["times_s"]:
            row["median_s"] = statistics.median(row["times_s"])
            row["gbps"] = ds["bytes"] / GB / row["median_s"]
        peaks = [s.get("pinned_peak_bytes", 0) for s in row["stats"]] + [s.get("registered_peak_bytes", 0) for s in row["stats"]]
        row["flashpack_pinned_peak_bytes"] = max(peaks) if peaks else None
        torch_peaks = [s.get("torch_pinned_peak_bytes", 0) for s in row["stats"]]
        row["torch_pinned_peak_bytes"] = max(torch_peaks) if torch_peaks else None
        self.add_row(row)
        return row

    def new_row(self, loader: str, key: str, cache: str) -> dict:
        ds = self.datasets[key]
        return {"loader": loader, "dataset": key, "cache": cache, "bytes": ds["bytes"], "tensors": ds["count"],
                "times_s": [], "bitexact": True, "problems": [], "stats": []}

    def add_row(self, row: dict):
        status = "ok" if row["bitexact"] else "NOT BIT-EXACT: " + "; ".join(row["problems"])[:300]
        log(f"  {row['loader']:48s} {row['dataset']:10s} {row['cache']}: "
            + (f"{row['median_s']:.3f} s  {row['gbps']:6.2f} GB/s  " if "median_s" in row else "")
            + status)
        self.results.append(row)
        self.save_report()  # row by row: a run stopped mid-section keeps what it measured

    def section(self, name: str, fn: Callable[[], None], required: bool = False):
        if not required and self.out_of_time():
            log(f"-- {name}: skipped (past the {self.args.deadline_s:.0f} s deadline)")
            self.report["skipped"].append(name)
            return
        log(f"-- {name} (t={time.perf_counter() - self.t_start:.0f} s)")
        try:
            fn()
        except Exception as e:
            traceback.print_exc()
            self.report["errors"].append(f"{name}: {type(e).__name__}: {e}")
        self.save_report()

    # Sections, most important first.

    def setup(self):
        a = self.args
        gen_device = "cuda" if self.device.type == "cuda" and not a.host_checks else "cpu"
        os.makedirs(a.workdir, exist_ok=True)
        self.report["machine"]["workdir_fs"] = fs_type(a.workdir)
        shapes = llm_shapes(a.llm_layers, a.hidden, a.intermediate, a.vocab)
        self.llm = make_tensors(shapes, gen_device, seed=1)
        self.add_dataset("llm", self.llm, os.path.join(a.workdir, "llm"), self.report["saves"])
        h, w = (int(x) for x in a.small_shape.split(","))
        small = make_tensors({f"blocks.{k}.weight": (h, w) for k in range(a.small_count)}, gen_device, seed=2)
        self.add_dataset("small", small, os.path.join(a.workdir, "small"))
        self.report["saves"] = {k: {"s": v, "gbps": self.datasets["llm"]["bytes"] / GB / v}
                                for k, v in self.report["saves"].items()}
        for key, ds in self.datasets.items():
            log(f"  {key}: {ds['count']} tensors, {ds['bytes'] / GB:.3f} GB")
        subprocess.run(["sync"])

    def warm_ceilings(self):
        c = self.report["ceilings"]
        c["h2d_pinned_gbps"] = h2d_gbps(self.device, self.args.h2d_bytes, self.args.runs)
        fp = self.datasets["llm"]["paths"]["fp"]
        read_file_gbps(fp, 16, False)
        c["warm_read_16_threads_gbps"] = read_file_gbps(fp, 16, False)
        log("  " + ", ".join(f"{k} {v:.2f}" for k, v in c.items() if v is not None))

    def cold_ceilings(self):
        c = self.report["ceilings"]
        fp = self.datasets["llm"]["paths"]["fp"]
        for threads, direct in ((8, False), (16, False), (8, True)):
            key = f"cold_read_{threads}_{'direct' if direct else 'buffered'}_gbps"
            c["cold_drop"] = drop_caches([fp], whole=not self.args.cpu_dry_run)
            c[key.replace("_gbps", "_cached_after_drop")] = cached_after_drop([fp])
            try:
                c[key] = read_file_gbps(fp, threads, direct)
            except OSError as e:
                c[key] = None
                self.report["errors"].append(f"{key}: {e}")
            log(f"  {key} {c[key]}")

    def run_loaders(self, names, key, cold):
        for loader in names:
            self.measure(loader, key, cold)
            if loader.startswith("flashpack_ops[") and self.device.type == "cuda":
                # A setting with a larger ring leaves it idle in the pool: the rows after it
                # would report its size as theirs.
                import flashpack_ops

                flashpack_ops.release_pinned_memory()

    def small_steps(self):
        """Where a warm load of the 20,000 small tensors spends its time: the ops that stop
        earlier (load_blocks: the index and the copies; load_list: and a view per tensor;
        load_named: and the names) against load_file (and the dict), each timed with the time
        inside the op (cuda_stats' ns_loads), then the same index and views without copies
        (load_list to the CPU, a mapping)."""
        import flashpack_ops

        path = self.datasets["small"]["paths"]["fp"]
        device = str(self.device)
        steps = {
            "load_blocks": lambda: torch.ops.flashpack.load_blocks(path, device),
            "load_list": lambda: torch.ops.flashpack.load_list(path, device),
            "load_named": lambda: torch.ops.flashpack.load_named(path, device),
            "load_file": lambda: flashpack_ops.load_file(path, device),
            "load_list to cpu": lambda: torch.ops.flashpack.load_list(path, "cpu"),
        }
        # Inside the op: the index (read beside the copies for an index this large), the
        # copies' wall time and the views, each a median over the runs.
        parts = {"ns_index": "index", "ns_copy": "copy", "ns_views": "views"}
        out = self.report["small_steps"] = {}
        for name, step in steps.items():
            step()  # untimed: the page cache, the pool
            times, inside = [], []
            split = {key: [] for key in parts}
            for _ in range(max(self.args.runs, 5)):
                gc.collect()
                before = self.stats()
                self.sync()
                t0 = time.perf_counter()
                result = step()
                self.sync()
                times.append(time.perf_counter() - t0)
                after = self.stats()
                inside.append((after.get("ns_loads", 0) - before.get("ns_loads", 0)) / 1e9)
                for key in parts:
                    split[key].append((after.get(key, 0) - before.get(key, 0)) / 1e9)
                del result
            out[name] = {"median_s": statistics.median(times), "inside_op_s": statistics.median(inside)}
            out[name].update({f"{label}_s": statistics.median(split[key]) for key, label in parts.items()})
            log(f"  {name}: {out[name]['median_s'] * 1e3:.1f} ms ({out[name]['inside_op_s'] * 1e3:.1f} ms inside the op: "
                + ", ".join(f"{label} {out[name][label + '_s'] * 1e3:.1f}" for label in parts.values()) + ")")

    def heap_trimming(self):
        """The 20,000 small tensors loaded 15 times in a row in a fresh process, with glibc's
        default heap trimming and with 256 MiB kept (GLIBC_TUNABLES), two processes each,
        alternating: how much of a repeated load is page faults on heap the previous result
        gave back when it was freed."""
        path = self.datasets["small"]["paths"]["fp"]
        # Warm, as the docstring says: the cold sections before this emptied the page cache.
        read_file_gbps(path, 16, False)
        kept = "glibc.malloc.trim_threshold=268435456"  # the README's advice: 256 MiB
        out = self.report["heap_trimming"] = {"default": [], "kept": []}
        for _ in range(2):
            for name, tunables in (("default", None), ("kept", kept)):
                env = {"GLIBC_TUNABLES": tunables} if tunables else {}
                out[name].append(self.child(["--repeated-loads", path], timeout=120, env=env))
        for name, results in out.items():
            log(f"  heap trimming {name}: " + ", ".join(
                f"{r['median_s'] * 1e3:.1f} ms, {r['faults']:.0f} faults" for r in results))

    def size_sweep(self):
        a = self.args
        gen_device = "cuda" if self.device.type == "cuda" and not a.host_checks else "cpu"
        for layers in a.sweep_layers:
            if self.out_of_time():
                self.report["skipped"].append(f"size sweep {layers} layers")
                continue
            key = f"llm_L{layers}"
            shapes = llm_shapes(layers, a.hidden, a.intermediate, a.vocab)
            tensors = {n: self.llm[n] for n in shapes} if all(n in self.llm for n in shapes) else \
                make_tensors(shapes, gen_device, seed=3)
            self.add_dataset(key, tensors, os.path.join(a.workdir, key))
            self.run_loaders(MAIN_LOADERS, key, cold=False)
            self.drop_dataset(key)

    def child(self, args: List[str], timeout: float, env: Optional[Dict[str, str]] = None) -> dict:
        """Runs this script in a process of its own on this device, with `env` added to the
        environment: the JSON line it prints last. RuntimeError if it fails or times out."""
        cmd = [sys.executable, os.path.abspath(__file__), *args, "--device", str(self.device)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  env={**os.environ, **(env or {})})
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"timed out after {timeout:.0f} s") from None
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not lines:
            raise RuntimeError(f"exit {done.returncode}: {done.stderr.strip()[-300:]}")
        return json.loads(lines[-1])

    def fresh_processes(self):
        """The first load of each loader in a process of its own (one run each: a first load
        happens once per process), the page cache warm."""
        ds = self.datasets["llm"]
        for loader in MAIN_LOADERS:
            if loader not in self.loaders:
                continue
            if self.out_of_time():
                self.report["skipped"].append(f"first load in a fresh process: {loader}")
                continue
            row = self.new_row(loader, "llm", "first")
            # Warm, as the docstring says: the cold sections before this may have left a file
            # out of the page cache (O_DIRECT reads bypass it).
            read_file_gbps(ds["paths"][FORMATS[loader]], 16, False)
            try:
                result = self.child(["--first-load", loader, "--paths", json.dumps(ds["paths"])], timeout=60)
            except RuntimeError as e:
                row["problems"].append(str(e))
            else:
                row["times_s"] = [result["seconds"]]
                row["median_s"] = result["seconds"]
                row["gbps"] = ds["bytes"] / GB / result["seconds"]
                if result["problem"]:
                    row["problems"].append(result["problem"])
            row["bitexact"] = not row["problems"]
            self.add_row(row)

    def run(self):
        a = self.args
        self.section("setup", self.setup, required=True)
        self.section("ceilings, warm", self.warm_ceilings, required=True)
        self.section("llm, warm", lambda: self.run_loaders(MAIN_LOADERS, "llm", cold=False), required=True)
        # Cheap, and what the defaults are chosen from: before anything slow.
        self.section("llm, warm, flashpack_ops settings", lambda: self.run_loaders(list(VARIANTS), "llm", cold=False))
        self.section("small, warm", lambda: self.run_loaders(MAIN_LOADERS, "small", cold=False))
        # The 20,000-tensor target, on the route the default would fall back to (a second of work).
        self.section("small, warm, flashpack_ops settings",
                     lambda: self.run_loaders(list(SMALL_VARIANTS), "small", cold=False))
        self.section("small, warm, step by step", self.small_steps)
        # NOTE: the cold load is a target, as the warm ones are: it runs even past the deadline
        # (about 40 s at 3.5 GB, inside the margin gpu_check.sh leaves after the deadline).
        if not a.no_cold:
            self.section("ceilings, cold", self.cold_ceilings, required=True)
            self.section("llm, cold", lambda: self.run_loaders(MAIN_LOADERS, "llm", cold=True), required=True)
            self.section("small, cold", lambda: self.run_loaders(MAIN_LOADERS, "small", cold=True))
            self.section("llm, cold, flashpack_ops settings", lambda: self.run_loaders(list(COLD_VARIANTS), "llm", cold=True))
        self.section("small, warm, repeated loads with and without heap trimming", self.heap_trimming)
        self.section("size sweep, warm", self.size_sweep)
        self.section("llm, first load in a fresh process", self.fresh_processes)
        self.report["elapsed_s"] = time.perf_counter() - self.t_start
        self.save_report()
        plot(self.report, os.path.join(a.out, "bench.png"))
        summary = table(self.report)
        with open(os.path.join(a.out, "summary.txt"), "w") as f:
            f.write(summary + "\n")
        if not a.keep_files:
            for key in list(self.datasets):
                self.drop_dataset(key)
        log("")
        log(summary)


def fs_type(path: str) -> str:
    path = os.path.realpath(path)
    best, kind = "", "?"
    with open("/proc/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            mp = fields[1]
            if (path == mp or path.startswith(mp.rstrip("/") + "/")) and len(mp) >= len(best):
                best, kind = mp, fields[2]
    return kind


# ---- reporting -------------------------------------------------------------------------------


def find(report, loader, dataset, cache):
    for r in report["results"]:
        if r["loader"] == loader and r["dataset"] == dataset and r["cache"] == cache and "median_s" in r:
            return r
    return None


def steps(row) -> str:
    """The median run's time per step of the CUDA path (cuda_stats), in ms, summed over threads."""
    runs = [s for s in row.get("stats", []) if "ns_loads" in s]
    if not runs:
        return ""
    run = sorted(runs, key=lambda s: s["ns_loads"])[len(runs) // 2]
    names = {"ns_index": "index", "ns_copy": "copy", "ns_views": "views", "ns_read": "read", "ns_register": "reg",
             "ns_unregister": "unreg", "ns_wait": "wait", "ns_unmap": "unmap (after)"}
    # The route the bytes took (auto picks one per load): cuda_stats counts them in bytes_<route>.
    took = "+".join(k[len("bytes_"):] for k, v in run.items() if k.startswith("bytes_") and v)
    return " ".join([f"[{took}]"] * bool(took) + [f"{label} {run[k] / 1e6:.1f}" for k, label in names.items() if run.get(k)])


def table(report) -> str:
    m = report["machine"]
    c = report["ceilings"]
    lines = [f"flashpack_ops disk -> GPU, {m.get('gpu', m['device'])}, torch {m['torch']}, {m['cpus']} CPUs, "
             f"commit {m.get('commit')}, {m['date']}, workdir on {m.get('workdir_fs')}",
             "median of %d runs; GB/s = tensor bytes / time; (Nx) = peer time / flashpack_ops time" % report["args"]["runs"]]

    def fmt(v, unit="GB/s"):
        return f"{v:.2f} {unit}" if isinstance(v, (int, float)) else "n/a"

    lines.append("ceilings: pinned H2D " + fmt(c.get("h2d_pinned_gbps")) + " | page-cache read, 16 threads "
                 + fmt(c.get("warm_read_16_threads_gbps")) + " | cold read: 8 buffered " + fmt(c.get("cold_read_8_buffered_gbps"))
                 + ", 16 buffered " + fmt(c.get("cold_read_16_buffered_gbps")) + ", 8 O_DIRECT "
                 + fmt(c.get("cold_read_8_direct_gbps")))
    drops = sorted({r["cache_drop"] for r in report["results"] if r.get("cache_drop")})
    cached = [f for r in report["results"] for f in r.get("cached_after_drop", [])]
    if drops:
        lines.append("cold: page cache emptied by " + "/".join(drops) + "; after each drop, "
                     + ("share of a file's pages still cached: at most "
                        f"{100 * max(cached):.1f}%" if cached and None not in cached else "what was cached is unknown"))
    header = f"{'dataset':18s} {'cache':5s} " + " ".join(f"{n:>24s}" for n in MAIN_LOADERS)
    lines += ["", header, "-" * len(header)]
    datasets = []
    for r in report["results"]:
        if (r["dataset"], r["cache"]) not in datasets:
            datasets.append((r["dataset"], r["cache"]))
    for dataset, cache in datasets:
        base = find(report, "flashpack_ops", dataset, cache)
        if base is None:
            continue
        cells = []
        for loader in MAIN_LOADERS:
            r = find(report, loader, dataset, cache)
            if r is None:
                cells.append(f"{'n/a':>24s}")
                continue
            flag = "" if r["bitexact"] else " BAD"
            ratio = "" if loader == "flashpack_ops" else f" ({r['median_s'] / base['median_s']:.1f}x)"
            cells.append(f"{r['median_s']:7.3f}s {r['gbps']:6.2f}GB/s{ratio}{flag}".rjust(24))
        label = f"{dataset} {base['bytes'] / GB:.2f}GB"
        lines.append(f"{label:18s} {cache:5s} " + " ".join(cells))
    variants = [r for r in report["results"] if r["loader"].startswith("flashpack_ops[") and "median_s" in r]
    if variants:
        lines.append("")
        lines.append("flashpack_ops settings; time per step in ms, summed over threads (median run):")
        defaults = [r for r in report["results"]
                    if r["loader"] == "flashpack_ops" and r["dataset"] in ("llm", "small") and "median_s" in r]
        for r in defaults + variants:
            lines.append(f"  {r['loader']:48s} {r['dataset']:6s} {r['cache']:5s} {r['median_s']:7.3f} s "
                         f"{r['gbps']:6.2f} GB/s  {steps(r)}{'' if r['bitexact'] else '  NOT BIT-EXACT'}")
    saves = report.get("saves") or {}
    if "fp" in saves:
        names = {"fp": "flashpack_ops", "fp_nosync": "flashpack_ops durable=False", "st": "safetensors",
                 "pt": "torch.save", "ref": "flashpack 0.4.5"}
        # Peer time / ours: against the durable save (fsync), and against the one without the
        # flush that no peer does either (like for like).
        base, like = saves["fp"]["s"], saves.get("fp_nosync", {}).get("s")
        ours = f"flashpack_ops {base:.2f} s" + (f" ({like:.2f} s with durable=False)" if like else "")
        peers = [f"{names.get(k, k)} {v['s']:.2f} s ({v['s'] / base:.2f}x"
                 + (f", {v['s'] / like:.2f}x like for like)" if like else ")")
                 for k, v in saves.items() if k not in ("fp", "fp_nosync", "fp_mapped", "fp_pwrite")]
        lines.append("")
        lines.append("save llm: " + ", ".join([ours] + peers))
        if "fp_pwrite" in saves and "fp_mapped" in saves:
            mapped, written = saves["fp_mapped"]["s"], saves["fp_pwrite"]["s"]
            lines.append(f"  the same durable save, alternating, median of 2: through a mapping of the file (the "
                         f"default) {mapped:.2f} s, with pwrite() {written:.2f} s ({written / mapped:.2f}x)")
    # Dirty page-cache growth during a load: near 0 unless the load marked the file dirty.
    dirtied = [(min(r["dirtied_bytes"]), r) for r in report["results"] if r.get("dirtied_bytes")]
    suspects = [f"{r['loader']} {r['dataset']} {r['cache']} {d / MiB:.0f} MiB" for d, r in dirtied
                if d > r["bytes"] // 4]
    if dirtied:
        lines.append("")
        lines.append("page cache dirtied by a load (min over runs): " + ("; ".join(suspects) if suspects else
                     f"none (at most {max(d for d, _ in dirtied) / MiB:.0f} MiB)"))
    # The defaults' bound: a setting row asks for a ring of its own size.
    pinned = [r["flashpack_pinned_peak_bytes"] for r in report["results"]
              if r["loader"] == "flashpack_ops" and r.get("flashpack_pinned_peak_bytes")]
    ref_pinned = [r["torch_pinned_peak_bytes"] for r in report["results"]
                  if r["loader"] == "flashpack 0.4.5" and r.get("torch_pinned_peak_bytes")]
    lines.append("")
    lines.append("peak pinned/registered host memory: flashpack_ops " + (f"{max(pinned) / MiB:.0f} MiB" if pinned else "n/a")
                 + ", flashpack 0.4.5 " + (f"{max(ref_pinned) / MiB:.0f} MiB" if ref_pinned else "n/a"))
    small_steps = report.get("small_steps")
    if small_steps:
        lines.append("small warm, step by step, ms (inside the op): " + ", ".join(
            f"{name} {v['median_s'] * 1e3:.1f}" + (f" ({v['inside_op_s'] * 1e3:.1f})" if v["inside_op_s"] else "")
            for name, v in small_steps.items()))
        whole = small_steps.get("load_file", {})
        if whole.get("inside_op_s"):
            lines.append("small warm load_file, inside the op, ms: index {:.1f} (beside the copies), copy {:.1f}, "
                         "views {:.1f}".format(*(whole.get(k, 0) * 1e3 for k in ("index_s", "copy_s", "views_s"))))
        heap = report.get("heap_trimming")
        if heap and all(heap.values()):
            lines.append("small warm, 15 loads in a row in a fresh process, ms (minor faults per load): " + ", ".join(
                f"heap {name} " + " / ".join(f"{r['median_s'] * 1e3:.1f} ({r['faults']:.0f})" for r in results)
                for name, results in heap.items()))
    bad = [f"{r['loader']} {r['dataset']} {r['cache']}" for r in report["results"] if not r["bitexact"]]
    lines.append("bit-exact: " + ("every load" if not bad else "FAILED for " + ", ".join(bad)))
    # The targets in benchmarks/RESULTS.md, where measured.
    warm = find(report, "flashpack_ops", "llm", "warm")
    cold = find(report, "flashpack_ops", "llm", "cold")
    small = find(report, "flashpack_ops", "small", "warm")
    checks = []
    if warm:
        checks.append(f"warm >= 45 GB/s: {'PASS' if warm['gbps'] >= 45 else 'MISS'} ({warm['gbps']:.1f})")
    if cold:
        checks.append(f"cold >= 2.0 GB/s: {'PASS' if cold['gbps'] >= 2.0 else 'MISS'} ({cold['gbps']:.2f})")
        ceiling = max((v for k, v in c.items() if k.startswith("cold_read_") and isinstance(v, (int, float))),
                      default=None)
        if ceiling:
            share = cold["gbps"] / ceiling
            checks.append(f"cold >= 90% of the read ceiling: {'PASS' if share >= 0.9 else 'MISS'} ({100 * share:.0f}%)")
    if small:
        checks.append(f"small warm <= 0.05 s: {'PASS' if small['median_s'] <= 0.05 else 'MISS'} ({small['median_s']:.3f})")
    saves = report.get("saves") or {}
    if "st" in saves and ("fp_nosync" in saves or "fp" in saves):
        ours = saves.get("fp_nosync", saves["fp"])["s"]  # like for like: safetensors does not fsync
        ratio = saves["st"]["s"] / ours
        checks.append(f"save >= safetensors: {'PASS' if ratio >= 1 else 'MISS'} ({ratio:.2f}x)")
    if checks and m["device"].startswith("cuda"):
        lines.append("targets: " + "; ".join(checks))
    # The fastest way this run found for each case, the default included: what a default
    # should become.
    for dataset, cache in (("llm", "warm"), ("llm", "cold"), ("small", "warm")):
        rows = [r for r in report["results"] if r["dataset"] == dataset and r["cache"] == cache and "median_s" in r
                and (r["loader"] == "flashpack_ops" or r["loader"].startswith("flashpack_ops["))]
        if len(rows) > 1:
            best = min(rows, key=lambda r: r["median_s"])
            lines.append(f"fastest setting, {dataset} {cache}: {best['loader']} {best['gbps']:.2f} GB/s "
                         f"({best['median_s']:.3f} s)")
    if report["skipped"] or report["errors"]:
        lines.append("skipped: " + (", ".join(report["skipped"]) or "-") + "; errors: " + (" | ".join(report["errors"]) or "-"))
    return "\n".join(lines)


def plot(report, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        log(f"no plot: matplotlib is not importable ({e})")
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 5.5))
    order = [("llm", "warm"), ("llm", "cold"), ("llm", "first"), ("small", "warm"), ("small", "cold")]
    groups = [(d, c) for d, c in order if find(report, "flashpack_ops", d, c)]
    width = 0.8 / len(MAIN_LOADERS)
    for k, loader in enumerate(MAIN_LOADERS):
        values = [(find(report, loader, d, c) or {}).get("median_s", 0) for d, c in groups]
        left.bar([g + k * width for g in range(len(groups))], values, width, label=loader)
    left.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
    left.set_xticklabels([f"{d} {c}" for d, c in groups])
    left.set_ylabel("load time to GPU (s, median)")
    left.set_yscale("log")
    left.legend()
    left.set_title("load time per loader (lower is better)")
    for loader in MAIN_LOADERS:
        pts = sorted((r["bytes"] / GB, r["gbps"]) for r in report["results"]
                     if r["loader"] == loader and r["cache"] == "warm" and r["dataset"].startswith("llm") and "gbps" in r)
        if pts:
            right.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=loader)
    h2d = report["ceilings"].get("h2d_pinned_gbps")
    if h2d:
        right.axhline(h2d, linestyle="--", color="gray", label="pinned H2D ceiling")
    page_cache = report["ceilings"].get("warm_read_16_threads_gbps")
    if page_cache:
        right.axhline(page_cache, linestyle=":", color="gray", label="page-cache read ceiling, 16 threads")
    right.set_xlabel("state dict size (GB)")
    right.set_ylabel("GB/s (warm)")
    right.set_title("throughput vs size, page cache warm")
    right.legend()
    m = report["machine"]
    fig.suptitle(f"{m.get('gpu', m['device'])}, torch {m['torch']}, commit {m.get('commit')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    log(f"plot: {path}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="folder for bench.json, bench.png, summary.txt")
    p.add_argument("--workdir", default="/var/tmp/flashpack_bench", help="where the files go (a real disk)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--llm-layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--small-count", type=int, default=20_000)
    p.add_argument("--small-shape", default="128,128")
    p.add_argument("--sweep-layers", type=int, nargs="*", default=[1, 4], help="smaller dicts for GB/s vs size")
    p.add_argument("--h2d-bytes", type=int, default=2 << 30)
    p.add_argument("--deadline-s", type=float, default=0, help="skip optional sections after this many seconds")
    p.add_argument("--no-cold", action="store_true")
    p.add_argument("--host-checks", action="store_true", help="make and compare tensors on the host (no kernels)")
    p.add_argument("--keep-files", action="store_true")
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="tiny sizes on the CPU: checks the script, measures nothing (and drops only its files' pages)")
    p.add_argument("--summarize", metavar="BENCH_JSON", help="only print the table (and plot) of an earlier run")
    p.add_argument("--first-load", metavar="LOADER", help=argparse.SUPPRESS)  # the child of fresh_processes
    p.add_argument("--paths", help=argparse.SUPPRESS)
    p.add_argument("--repeated-loads", metavar="PATH", help=argparse.SUPPRESS)  # the child of heap_trimming
    a = p.parse_args(argv)
    if a.repeated_loads:
        print(json.dumps(repeated_loads(a.repeated_loads, torch.device(a.device), 15)), flush=True)
        return
    if a.first_load:
        print(json.dumps(first_load(a.first_load, json.loads(a.paths), torch.device(a.device))), flush=True)
        return
    if not a.out:
        p.error("--out is required")
    if a.summarize:
        with open(a.summarize) as f:
            report = json.load(f)
        plot(report, os.path.join(a.out, "bench.png"))
        summary = table(report)
        with open(os.path.join(a.out, "summary.txt"), "w") as f:
            f.write(summary + "\n")
        log(summary)
        return
    if a.cpu_dry_run:
        a.device, a.host_checks = "cpu", True
        a.hidden, a.intermediate, a.vocab, a.small_count, a.small_shape = 256, 688, 2000, 500, "16,16"
        a.h2d_bytes = 1 << 20
    os.makedirs(a.out, exist_ok=True)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("bench_gpu.py: no CUDA device; use --cpu-dry-run to check the script on a CPU")
    Bench(a).run()
    if not a.keep_files:
        shutil.rmtree(a.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
