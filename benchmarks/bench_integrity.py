"""What integrity costs: checksums on save, verification on load, for about 1 GB.

    python benchmarks/bench_integrity.py [--gb 1.0] [--repeats 5] [--dir /tmp]

The file stays in the page cache between runs, so the numbers are the CPU cost of the
checksum on top of memory-speed I/O (the worst case for relative overhead: from a cold disk
the same absolute cost hides behind the reads). Saves end with fsync, so they also measure
the disk; pass --dir /dev/shm to see the CPU side alone. Prints one line per measurement (median of
the repeats) and the machine, date and commit to quote them with.
"""

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import time

import torch

import flashpack_ops


def median_seconds(fns, repeats):
    """Median time of each function; runs alternate between them, so that a slow spell of the
    machine (writeback, a neighbour's build) hits both sides of a comparison alike."""
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            start = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - start)
    return [statistics.median(ts) for ts in times]


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def commit():
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.0, help="payload size in GB (10^9 bytes)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default="/tmp")
    args = parser.parse_args()

    # A realistic mix: a few large bf16 matrices and many small fp32 vectors.
    n_big = 16
    big_elems = int(args.gb * 1e9 / 2 / n_big)
    g = torch.Generator().manual_seed(0)
    sd = {}
    for i in range(n_big):
        sd[f"layers.{i}.weight"] = torch.empty(big_elems, dtype=torch.bfloat16).random_(generator=g)
        for j in range(8):
            sd[f"layers.{i}.norm{j}"] = torch.randn(4096, generator=g)
    nbytes = sum(t.nbytes for t in sd.values())
    gb = nbytes / 1e9

    plain = os.path.join(args.dir, "bench_integrity_plain.flashpack")
    checked = os.path.join(args.dir, "bench_integrity_checked.flashpack")
    threads = int(os.environ.get("FLASHPACK_NUM_THREADS", 0)) or min(16, os.cpu_count() or 1)
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs, {threads} threads; torch {torch.__version__}; "
          f"date {datetime.date.today()}; commit {commit()}")
    print(f"payload: {gb:.2f} GB in {len(sd)} tensors; page cache warm; median of {args.repeats}")

    def line(what, seconds, base=None):
        extra = f"  (+{100 * (seconds - base) / base:.1f}% vs without)" if base else ""
        print(f"  {what:<34} {seconds * 1e3:8.1f} ms  {gb / seconds:6.2f} GB/s{extra}")

    try:
        save_plain, save_checked = median_seconds(
            [lambda: flashpack_ops.save_file(sd, plain), lambda: flashpack_ops.save_file(sd, checked, checksum=True)],
            args.repeats)
        line("save", save_plain)
        line("save, checksum=True", save_checked, save_plain)

        verify, verify_one = median_seconds(
            [lambda: flashpack_ops.verify_file(checked), lambda: flashpack_ops.verify_file(checked, num_threads=1)],
            args.repeats)
        line("verify_file", verify)
        line("verify_file, 1 thread", verify_one)

        copy_plain, copy_checked = median_seconds(
            [lambda: flashpack_ops.load_file(checked, copy=True),
             lambda: flashpack_ops.load_file(checked, copy=True, verify=True)], args.repeats)
        line("load copy=True", copy_plain)
        line("load copy=True, verify=True", copy_checked, copy_plain)

        # A mapped load reads nothing until the tensors are used, so its verify cost is the whole
        # read; compared here with faulting every page in by hand (the least that using the
        # weights costs).
        def map_and_touch():
            for t in flashpack_ops.load_file(checked).values():
                if t.numel():
                    t.reshape(-1).view(torch.uint8)[::4096].sum()
        map_touch, map_checked = median_seconds(
            [map_and_touch, lambda: flashpack_ops.load_file(checked, verify=True)], args.repeats)
        line("load mapped, every page touched", map_touch)
        line("load mapped, verify=True", map_checked, map_touch)
    finally:
        for path in (plain, checked):
            if os.path.exists(path):
                os.remove(path)


if __name__ == "__main__":
    main()
