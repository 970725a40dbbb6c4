"""CPU benchmark: saving an LLM-shaped bf16 state dict, and saving and loading 20,000 small tensors.

Compares flashpack_ops with safetensors, torch.save/torch.load(mmap=True) and the reference
`flashpack` package in one run, and prints ratios (peer time / our time: > 1 means we are
faster). Loads are warm (one untimed load first); every load is checked bit for bit. Saves
include what each writer does to make the file durable: flashpack_ops and the reference
fsync (flashpack_ops unless durable=False), safetensors and torch.save do not.

    python benchmarks/bench_cpu.py                      # 20,000 tensors, ~1 GB save
    python benchmarks/bench_cpu.py --small 2000 --llm-gb 0.1 --repeat 3   # quick
"""

import argparse
import datetime
import functools
import json
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time

import torch

import flashpack_ops


def llm_state_dict(target_bytes):
    """Llama-shaped bf16 weights: embeddings, attention and MLP per layer, norms, tied head."""
    hidden, inter, vocab = 2048, 5632, 32000
    sd = {"model.embed_tokens.weight": torch.randn(vocab, hidden).bfloat16()}
    per_layer = (4 * hidden * hidden + 3 * hidden * inter + 2 * hidden) * 2
    layers = max(1, int((target_bytes - vocab * hidden * 2) // per_layer))
    for i in range(layers):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[p + f"self_attn.{name}.weight"] = torch.randn(hidden, hidden).bfloat16()
        sd[p + "mlp.gate_proj.weight"] = torch.randn(inter, hidden).bfloat16()
        sd[p + "mlp.up_proj.weight"] = torch.randn(inter, hidden).bfloat16()
        sd[p + "mlp.down_proj.weight"] = torch.randn(hidden, inter).bfloat16()
        sd[p + "input_layernorm.weight"] = torch.ones(hidden).bfloat16()
        sd[p + "post_attention_layernorm.weight"] = torch.ones(hidden).bfloat16()
    sd["model.norm.weight"] = torch.ones(hidden).bfloat16()
    return sd


def small_state_dict(count):
    # ~32 KiB each, as in the GPU measurements (20,000 tensors, 655 MB).
    return {f"blocks.{i}.weight": torch.randn(16384).bfloat16() for i in range(count)}


def nbytes(sd):
    return sum(t.numel() * t.element_size() for t in sd.values())


def median_time(fn, repeat, check=None, warm=True):
    if warm:
        out = fn()
        if check:
            check(out)
        del out
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        del out
    return statistics.median(times)


def interleaved_median_times(fns, repeat, check=None):
    """Median time of each of ``fns`` (name -> callable), the runs interleaved round by round.

    NOTE: reads that allocate fresh memory (hundreds of MB per run) pay for the allocator's
    state the previous run left; running each reader's repeats back to back would charge the
    first one for growing the heap. One untimed round warms both."""
    times = {name: [] for name in fns}
    for round_ in range(repeat + 1):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            out = fn()
            elapsed = time.perf_counter() - t0
            if round_ == 0:
                if check:
                    check(out)
            else:
                times[name].append(elapsed)
            del out
    return {name: statistics.median(runs) for name, runs in times.items()}


def same(loaded, expected):
    """Bit-exact check (every tensor here is bf16, so compare the int16 bits)."""
    assert set(loaded) == set(expected)
    for k, t in expected.items():
        assert torch.equal(loaded[k].view(torch.int16), t.view(torch.int16)), k


def writers():
    import safetensors.torch
    out = {
        "flashpack_ops": lambda sd, p: flashpack_ops.save_file(sd, p),
        "flashpack_ops durable=False": lambda sd, p: flashpack_ops.save_file(sd, p, durable=False),
        "safetensors": lambda sd, p: safetensors.torch.save_file(sd, p),
        "torch.save": lambda sd, p: torch.save(sd, p),
    }
    try:
        import flashpack
        out["reference flashpack"] = lambda sd, p: flashpack.pack_to_file(sd, p, target_dtype=None)
    except ImportError:
        pass
    return out


def readers():
    import safetensors.torch
    out = {
        "flashpack_ops": lambda p: flashpack_ops.load_file(p),
        "safetensors": lambda p: safetensors.torch.load_file(p),
        "torch.load(mmap)": lambda p: torch.load(p, mmap=True, weights_only=True),
    }
    try:
        from flashpack.deserialization import iterate_from_flash_tensor, read_flashpack_file

        def reference(p):
            storage, meta = read_flashpack_file(p)
            return dict(iterate_from_flash_tensor(storage, meta))
        out["reference flashpack"] = reference
    except ImportError:
        pass
    return out


def one_by_one_readers():
    """Every tensor read by name through safe_open, as weight loaders written for safetensors do."""
    import safetensors

    def read(open_file):
        def run(p):
            with open_file(p, framework="pt") as f:
                return {name: f.get_tensor(name) for name in f.keys()}
        return run
    return {"flashpack_ops": read(flashpack_ops.safe_open), "safetensors": read(safetensors.safe_open)}


FILE_OF = {"flashpack_ops": "ops.flashpack", "flashpack_ops durable=False": "ops.flashpack", "safetensors": "st.safetensors", "torch.save": "t.pt",
           "torch.load(mmap)": "t.pt", "reference flashpack": "ref.flashpack"}


def save_times(sd, workdir, repeat):
    """Median save time of each writer. Rounds interleave the writers, and each save starts
    with no dirty pages left from the one before (os.sync), so no writer pays for another's
    write-back; the first round only warms the page cache and the allocator."""
    runs = {name: [] for name in writers()}
    for _ in range(repeat + 1):
        for name, write in writers().items():
            path = os.path.join(workdir, FILE_OF[name])
            os.sync()
            t0 = time.perf_counter()
            write(sd, path)
            runs[name].append(time.perf_counter() - t0)
    return {name: statistics.median(times[1:]) for name, times in runs.items()}


def commit():
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       cwd=os.path.dirname(os.path.abspath(__file__))).strip()
    except Exception:
        return "unknown"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", type=int, default=20_000, help="number of small tensors (default 20000)")
    ap.add_argument("--llm-gb", type=float, default=1.0, help="size of the LLM-shaped dict in GB (default 1)")
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per case; the median is reported")
    ap.add_argument("--dir", default=None, help="where to write the files (default: a temporary directory)")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args()

    workdir = args.dir or tempfile.mkdtemp(prefix="flashpack_bench_")
    os.makedirs(workdir, exist_ok=True)
    results = {"machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores",
               "date": datetime.date.today().isoformat(), "commit": commit(), "torch": torch.__version__,
               "cases": {}}
    try:
        # --- saves of the LLM-shaped dict ---
        llm = llm_state_dict(args.llm_gb * 1e9)
        results["cases"][f"save {nbytes(llm) / 1e9:.2f} GB bf16 ({len(llm)} tensors)"] = \
            save_times(llm, workdir, args.repeat)
        del llm

        # --- saves, then loads, of many small tensors ---
        small = small_state_dict(args.small)
        results["cases"][f"save {len(small)} small tensors ({nbytes(small) / 1e6:.0f} MB)"] = \
            save_times(small, workdir, args.repeat)
        load_times = {}
        for name, write in writers().items():
            write(small, os.path.join(workdir, FILE_OF[name]))  # the last write of a path wins
        for name, read in readers().items():
            path = os.path.join(workdir, FILE_OF[name])
            load_times[name] = median_time(lambda: read(path), args.repeat, check=lambda d: same(d, small))
        results["cases"][f"load {len(small)} small tensors ({nbytes(small) / 1e6:.0f} MB), warm, cpu"] = load_times
        one_by_one = {name: functools.partial(read, os.path.join(workdir, FILE_OF[name]))
                      for name, read in one_by_one_readers().items()}
        results["cases"][f"read the same {len(small)} tensors one by one with safe_open (fresh copies)"] = \
            interleaved_median_times(one_by_one, args.repeat, check=lambda d: same(d, small))
    finally:
        if args.dir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    print(f"\n{results['machine']} | torch {results['torch']} | {results['date']} | commit {results['commit']}")
    for case, times in results["cases"].items():
        ours = times["flashpack_ops"]
        print(f"\n{case}")
        print(f"  {'':28s} {'seconds':>9s} {'peer / ours':>12s}")
        for name, t in times.items():
            ratio = "" if name == "flashpack_ops" else f"{t / ours:11.2f}x"
            print(f"  {name:28s} {t:9.4f} {ratio:>12s}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
