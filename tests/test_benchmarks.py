"""The benchmarks' own machinery: what makes a cold load cold, and how it is checked."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def benchmark(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(BENCHMARKS, name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def on_tmpfs(path) -> bool:
    return benchmark("bench_gpu").fs_type(str(path)) == "tmpfs"  # its pages cannot be dropped


def test_cached_fraction_says_how_much_of_a_file_is_in_the_page_cache(tmp_path):
    bench_gpu = benchmark("bench_gpu")
    path, other = str(tmp_path / "data.bin"), str(tmp_path / "other.bin")
    for p in (path, other):
        with open(p, "wb") as f:
            f.write(os.urandom(1 << 20) * 64)
    assert bench_gpu.cached_fraction(path) == 1.0  # just written
    if on_tmpfs(tmp_path):
        pytest.skip("tmpfs keeps its pages")
    bench_gpu.evict([path])
    assert bench_gpu.cached_fraction(path) == 0.0
    assert bench_gpu.cached_after_drop([path, other]) == 1.0  # the most cached of the files
    with open(path, "rb") as f:
        f.read(1 << 20)
    assert 0.0 < bench_gpu.cached_fraction(path) < 1.0  # the read and its read-ahead, not the rest


def test_transformers_cold_loads_drop_the_files_pages_where_the_whole_cache_cannot_be_dropped(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    bench_transformers = benchmark("bench_transformers")
    bench_gpu = benchmark("bench_gpu")
    checkpoint = tmp_path / "model"
    checkpoint.mkdir()
    (checkpoint / "model.safetensors").write_bytes(os.urandom(1 << 20) * 4)

    def refused(path, *args, **kwargs):  # as for a user other than root, or a read-only /proc/sys
        if str(path) == "/proc/sys/vm/drop_caches":
            raise PermissionError(13, "Permission denied", str(path))
        return open(path, *args, **kwargs)

    monkeypatch.setattr(bench_transformers, "open", refused, raising=False)
    assert bench_transformers.drop_file_pages([str(checkpoint)], whole_cache=True) == "fadvise"
    if not on_tmpfs(tmp_path):
        assert bench_gpu.cached_fraction(str(checkpoint / "model.safetensors")) == 0.0


def test_transformers_profile_after_cold_loads_finds_the_files_cached_again(tmp_path):
    # The profiled "warm" loads come after the cold ones, which leave the files out of the cache.
    pytest.importorskip("transformers")
    if on_tmpfs(tmp_path):
        pytest.skip("tmpfs keeps its pages")
    bench_transformers = benchmark("bench_transformers")
    bench_gpu = benchmark("bench_gpu")
    files = [tmp_path / "a" / "model.safetensors", tmp_path / "b" / "model.flashpack"]
    for path in files:
        path.parent.mkdir()
        path.write_bytes(os.urandom(1 << 20) * 8)
    directories = [str(path.parent) for path in files]
    bench_transformers.drop_file_pages(directories, whole_cache=False)
    assert [bench_gpu.cached_fraction(str(path)) for path in files] == [0.0, 0.0]
    bench_transformers.fill_page_cache(directories)
    assert [bench_gpu.cached_fraction(str(path)) for path in files] == [1.0, 1.0]


def run_benchmark(name, *args):
    # As the GPU check runs them, in a process of their own.
    return subprocess.run([sys.executable, os.path.join(BENCHMARKS, name + ".py"), *map(str, args)],
                          capture_output=True, text=True, timeout=900)


def test_the_gpu_benchmark_runs_through_on_the_cpu(tmp_path):
    # Every section of the GPU benchmark's logic, with tiny sizes: a script that breaks would
    # otherwise be found on the GPU machine, whose time is short.
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    result = run_benchmark("bench_gpu", "--out", out, "--workdir", tmp_path / "work", "--cpu-dry-run")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "bit-exact: every load" in result.stdout
    assert {"bench.json", "bench.png", "summary.txt"} <= set(os.listdir(out))
    assert "the same durable save, alternating, median of 2: through a mapping of the file (the default) " \
        in result.stdout
    assert "small warm, step by step, ms (inside the op): load_blocks " in result.stdout
    assert "small warm, 15 loads in a row in a fresh process, ms (minor faults per load): heap default " \
        in result.stdout
    assert not (tmp_path / "work").exists()  # its files are removed
    with open(out / "bench.json") as f:
        report = json.load(f)
    assert not report["errors"]
    # Cold runs drop only its own files' pages, not the whole machine's cache, even as root.
    drops = {row["cache_drop"] for row in report["results"] if "cache_drop" in row}
    assert drops | {report["ceilings"]["cold_drop"]} == {"fadvise"}


def test_the_transformers_benchmark_runs_through_on_the_cpu_with_its_profiles(tmp_path):
    pytest.importorskip("transformers")
    result = run_benchmark("bench_transformers", "--size", "tiny", "--device", "cpu", "--runs", "1", "--profile",
                           "--workdir", tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "the models are the same, bit for bit (weights and logits)" in result.stdout
    assert "| flashpack from_pretrained_flashpack | " in result.stdout
    assert "| flashpack from_pretrained_flashpack, no prefetch | " in result.stdout
    assert "prefetching (the file loaded while the model is built): warm " in result.stdout
    for loader in ("transformers from_pretrained", "flashpack from_pretrained_flashpack"):
        assert f"=== where {loader} spends a warm load" in result.stdout
    assert result.stdout.count("--- native calls, by their own time (torch.profiler)") == 2


def test_a_load_is_named_by_the_route_counters_that_grew():
    pytest.importorskip("transformers")  # the benchmark imports it at the top
    bench_transformers = benchmark("bench_transformers")
    before = {"bytes_direct": 7, "bytes_mapped": 1, "loads": 3}
    assert bench_transformers.route_taken(before, {"bytes_direct": 7, "bytes_mapped": 9, "loads": 4}) == "mapped"
    assert bench_transformers.route_taken(before, {"bytes_direct": 8, "bytes_mapped": 9, "loads": 4}) == \
        "direct+mapped"
    assert bench_transformers.route_taken({}, {}) == ""  # a load to the CPU, or a build without CUDA
