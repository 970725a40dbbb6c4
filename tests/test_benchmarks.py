"""The benchmarks' own machinery: what makes a cold load cold, and how it is checked."""

import importlib.util
import os

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
