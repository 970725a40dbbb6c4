"""transformers: ``from_pretrained(directory, device_map=...)`` against ``from_pretrained_flashpack``.

Builds a Llama-shaped model from a config (about 1.2B parameters, no download), writes it
once with ``save_pretrained`` (safetensors) and once with ``save_pretrained_flashpack``,
then times loading each onto the device, warm (files in the page cache, after one untimed
load) and cold (the files' pages dropped before every load), in one run. Every loaded
model is checked bit for bit against the other. Prints a table last, and with --profile
after it, where one more warm load of each loader spends its time.

    python benchmarks/bench_transformers.py                          # 1b, cuda, bfloat16
    python benchmarks/bench_transformers.py --size tiny --device cpu  # a quick check anywhere

Cold loads drop the files' pages with posix_fadvise(DONTNEED), which needs no root (with
--drop-caches, the whole page cache where /proc/sys/vm/drop_caches takes the write: as root,
outside a container that makes /proc/sys read-only; elsewhere the files' pages, as without it).
The table says which was done.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import io
import os
import pstats
import statistics
import subprocess
import tempfile
import time
import unittest.mock
from typing import Callable, Dict, List

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from flashpack_ops import cuda_stats
from flashpack_ops.integrations.transformers import from_pretrained_flashpack, save_pretrained_flashpack
from flashpack_ops.integrations.transformers import model as transformers_model

SIZES = {
    # The shape of Llama 3.2 1B: 1.24B parameters, 2.5 GB in bfloat16.
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, max_position_embeddings=8192),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True, max_position_embeddings=256),
}


NO_PREFETCH = "flashpack from_pretrained_flashpack, no prefetch"


def without_prefetch(load: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """load() with from_pretrained_flashpack loading the file after building the model, as
    it did before it prefetched."""
    @contextlib.contextmanager
    def no_prefetch(*args, **kwargs):
        yield None

    with unittest.mock.patch.object(transformers_model, "prefetching", no_prefetch):
        return load()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def drop_file_pages(directories: List[str], whole_cache: bool) -> str:
    """Drops the page cache, or the files' pages where that is refused; returns which."""
    os.sync()
    if whole_cache:
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
            return "drop_caches"
        except OSError:  # not root, or /proc/sys mounted read-only
            pass
    for directory in directories:
        for name in os.listdir(directory):
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    return "fadvise"


def fill_page_cache(directories: List[str]) -> None:
    """Reads every file of the directories through the page cache, as a warm load finds them
    (a cold flashpack load reads with O_DIRECT and leaves nothing cached behind it)."""
    for directory in directories:
        for name in os.listdir(directory):
            with open(os.path.join(directory, name), "rb", buffering=0) as f:
                while f.read(64 << 20):
                    pass


def release(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def time_loads(load: Callable[[], torch.nn.Module], device: str, runs: int, cold: bool,
               directories: List[str], whole_cache: bool, how: List[str], routes: List[str]) -> List[float]:
    times = []
    for _ in range(runs):
        # The previous model first, then the page cache: pages a live mapping holds stay cached.
        release(device)
        if cold:
            how.append(drop_file_pages(directories, whole_cache))
        before = cuda_stats()
        sync(device)
        start = time.perf_counter()
        model = load()
        sync(device)
        times.append(time.perf_counter() - start)
        routes.append(route_taken(before, cuda_stats()))
        del model
    release(device)
    return times


def route_taken(before: Dict[str, int], after: Dict[str, int]) -> str:
    """The routes a flashpack CUDA load's bytes took ("" for any other load): cuda_stats
    counts them in ``bytes_<route>``."""
    return "+".join(key[len("bytes_"):] for key, value in after.items()
                    if key.startswith("bytes_") and value > before.get(key, 0))


def where_time_goes(name: str, load: Callable[[], torch.nn.Module], device: str) -> None:
    """One more warm load under cProfile, then one under torch.profiler: which Python calls
    and which native calls (CUDA runtime calls among them) took the load's time."""
    release(device)
    before = cuda_stats()
    profile = cProfile.Profile()
    sync(device)
    start = time.perf_counter()
    profile.enable()
    model = load()
    sync(device)
    profile.disable()
    total = time.perf_counter() - start
    after = cuda_stats()
    del model
    loads = after.get("loads", 0) - before.get("loads", 0)
    inside = "; ".join(f"{key[3:]} {(after[key] - before[key]) / 1e6:.1f} ms" for key in after
                       if key.startswith("ns_") and after[key] != before[key])
    print(f"\n=== where {name} spends a warm load: {total:.3f} s under cProfile"
          + (f"; {loads} flashpack CUDA load(s): {inside}" if loads else ""))
    for order in ("cumulative", "tottime"):
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats(order).print_stats(12)
        table = text.getvalue()
        print(f"--- by {order} time\n" + table[table.find("   ncalls"):].rstrip())
    release(device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    try:
        with torch.profiler.profile(activities=activities) as profiler:
            model = load()
            sync(device)
        del model
        print("--- native calls, by their own time (torch.profiler)")
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=48))
    except Exception as exc:  # noqa: BLE001 - a profiler this build lacks: the numbers above stand
        print(f"--- torch.profiler failed: {type(exc).__name__}: {exc}")
    release(device)


def directory_bytes(directory: str, suffix: str) -> int:
    return sum(os.path.getsize(os.path.join(directory, n)) for n in os.listdir(directory) if n.endswith(suffix))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="1b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--runs", type=int, default=3, help="timed loads per loader and cache state")
    parser.add_argument("--workdir", default=None, help="where to write the two checkpoints (a temp dir)")
    parser.add_argument("--drop-caches", action="store_true", help="cold: drop the whole page cache (root)")
    parser.add_argument("--no-cold", action="store_true", help="skip the cold loads")
    parser.add_argument("--profile", action="store_true",
                        help="after the table, profile one more warm load per loader: where its time goes")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    device = args.device

    workdir = args.workdir or tempfile.mkdtemp(prefix="flashpack-bench-")
    hf_dir, fp_dir = os.path.join(workdir, "safetensors"), os.path.join(workdir, "flashpack")
    config = LlamaConfig(**SIZES[args.size])
    print(f"building a {args.size} Llama ({args.dtype}) in {workdir} ...", flush=True)
    torch.manual_seed(0)
    build_on = device if device.startswith("cuda") else "cpu"
    with torch.device(build_on):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    parameters = sum(p.numel() for p in model.parameters())
    model.save_pretrained(hf_dir)
    save_pretrained_flashpack(model, fp_dir)
    del model
    release(device)
    sizes = {"safetensors": directory_bytes(hf_dir, ".safetensors"), "flashpack": directory_bytes(fp_dir, ".flashpack")}

    device_map = device if device.startswith("cuda") else "cpu"
    loaders: Dict[str, Callable[[], torch.nn.Module]] = {
        "transformers from_pretrained": lambda: LlamaForCausalLM.from_pretrained(
            hf_dir, device_map=device_map, dtype=dtype),
        "flashpack from_pretrained_flashpack": lambda: from_pretrained_flashpack(
            LlamaForCausalLM, fp_dir, device=device),
        # The file loaded after the model is built, not while: what prefetching gains.
        NO_PREFETCH: lambda: without_prefetch(lambda: from_pretrained_flashpack(LlamaForCausalLM, fp_dir,
                                                                                device=device)),
    }
    files = {"transformers from_pretrained": sizes["safetensors"],
             "flashpack from_pretrained_flashpack": sizes["flashpack"], NO_PREFETCH: sizes["flashpack"]}

    # Every loader gives the same model, bit for bit. A difference is reported on the result's
    # last line rather than stopping the run: the timings are still worth having, and the
    # difference is then the thing to look at.
    differ: List[str] = []
    same_logits = True
    ids = torch.arange(16, device=device).reshape(1, 16)
    first = None
    for load in loaders.values():
        model = load()
        if first is None:
            first = model
            continue
        a, b = first.state_dict(), model.state_dict()
        differ += sorted(set(a) ^ set(b)) + [k for k in a if k in b and not torch.equal(a[k], b[k])]
        with torch.no_grad():
            same_logits &= torch.equal(first(ids).logits, model(ids).logits)
        del model, a, b
        release(device)
    check = ("the models are the same, bit for bit (weights and logits)" if not differ and same_logits else
             f"NOT BIT-EXACT: {len(differ)} tensors differ ({differ[:5]}), logits "
             f"{'equal' if same_logits else 'differ'}")
    print(check, flush=True)
    del first
    release(device)

    # Warm for both loaders, then cold for both: a run stopped early still has a comparison.
    results = {name: [None, None] for name in loaders}
    how: List[str] = []
    for column, cold in enumerate([False] if args.no_cold else [False, True]):
        for name, load in loaders.items():
            routes: List[str] = []
            times = time_loads(load, device, args.runs, cold, [hf_dir, fp_dir], args.drop_caches, how, routes)
            results[name][column] = statistics.median(times)
            took = f" (route: {', '.join(routes)})" if any(routes) else ""
            print(f"  {name}: {'cold' if cold else 'warm'} {times}{took}", flush=True)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() \
        or os.environ.get("FLASHPACK_COMMIT", "unknown")
    card = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    print()
    print(f"{args.size} Llama, {parameters / 1e9:.2f}B parameters, {args.dtype}, onto {device} ({card}), "
          f"torch {torch.__version__}, commit {commit}, median of {args.runs}"
          + (f"; cold: page cache emptied by {'/'.join(sorted(set(how)))}" if how else ""))
    print("| loader | file | warm s | warm GB/s | cold s | cold GB/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, (warm, cold) in results.items():
        gb = files[name] / 1e9
        cold_text = f"{cold:.3f} | {gb / cold:.2f}" if cold else "- | -"
        print(f"| {name} | {gb:.2f} GB | {warm:.3f} | {gb / warm:.2f} | {cold_text} |")
    base, ours = results["transformers from_pretrained"], results["flashpack from_pretrained_flashpack"]
    speedups = f"warm {base[0] / ours[0]:.1f}x" + (f", cold {base[1] / ours[1]:.1f}x" if ours[1] else "")
    print(f"from_pretrained_flashpack vs from_pretrained: {speedups}; {check}", flush=True)
    unfetched = results[NO_PREFETCH]
    print(f"prefetching (the file loaded while the model is built): warm {ours[0]:.3f} s against "
          f"{unfetched[0]:.3f} s without" + (f", cold {ours[1]:.3f} s against {unfetched[1]:.3f} s" if ours[1] else ""),
          flush=True)
    if args.profile:
        fill_page_cache([hf_dir, fp_dir])  # the cold runs above left the files out of it
        for name, load in loaders.items():
            if name != NO_PREFETCH:
                where_time_goes(name, load, device)


if __name__ == "__main__":
    main()
