"""Memory: a CPU load maps the file instead of copying it, and repeated loads leak nothing.

Each measurement runs in a fresh interpreter, so that pytest's own allocations do not blur
the resident set size (VmRSS in /proc/self/status). The multi-GiB file is sparse: its
payload is a hole, so it costs no disk space and no time to write, yet the loader sees an
ordinary file of that size.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import flashpack_ops

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")

MiB = 1 << 20

# Helpers shared by the measuring scripts.
PRELUDE = textwrap.dedent(
    """
    import json, os, struct, sys
    import torch
    import flashpack_ops

    def status(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        return 0

    def rss():
        # No gc.collect(): it costs ~0.1 s with torch loaded, and the tensors here are
        # freed by reference counting as soon as they are dropped.
        return status("VmRSS")

    def sparse_file(path, blocks):
        # blocks: [(dtype name, element size, [(name, shape), ...])]; the payload is a hole.
        macroblocks, index, cursor = [], [], 0
        for b, (dtype, esize, tensors) in enumerate(blocks):
            cursor = (cursor + 4095) // 4096 * 4096
            elems = 0
            for name, shape in tensors:
                n = 1
                for d in shape:
                    n *= d
                index.append({"name": name, "shape": shape, "offset": elems, "length": n, "macroblock": b})
                elems += n
            macroblocks.append({"dtype": dtype, "offset_bytes": cursor, "length_bytes": elems * esize,
                                "length_elems": elems})
            cursor += elems * esize
        footer = json.dumps({"format": "flashpack_v4", "align_bytes": 128, "total_payload_bytes": cursor,
                             "total_elems": sum(m["length_elems"] for m in macroblocks),
                             "macroblocks": macroblocks, "index": index}).encode()
        with open(path, "wb") as f:
            f.truncate(cursor)
            f.seek(cursor)
            f.write(footer + struct.pack("<Q", len(footer)) + b"FLASHPK\\0")
        return cursor
    """
)


def run(script: str, *args) -> dict:
    r = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(script), *map(str, args)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_loading_a_2_gib_file_to_cpu_maps_it_without_copying(tmp_path):
    path = tmp_path / "big.flashpack"
    result = run(
        """
        path = sys.argv[1]
        payload = sparse_file(path, [
            ("float32", 4, [(f"layers.{i}.weight", [8192, 8192]) for i in range(6)]),   # 1.5 GiB
            ("bfloat16", 2, [(f"layers.{i}.bias", [8192, 4096]) for i in range(8)]),    # 0.5 GiB
        ])
        flashpack_ops.load_file(path)  # first use: library, allocator and thread setup
        before = rss()
        sd = flashpack_ops.load_file(path)
        after_load = rss()
        # One element per tensor: a page each, and proof the views point at real data.
        firsts = sorted({float(t.view(-1)[0]) for t in sd.values()} | {float(t.view(-1)[-1]) for t in sd.values()})
        after_touch = rss()
        nbytes = sum(t.nbytes for t in sd.values())
        del sd
        print(json.dumps({"payload": payload, "nbytes": nbytes, "before": before, "after_load": after_load,
                          "after_touch": after_touch, "after_free": rss(), "firsts": firsts}))
        """,
        path,
    )
    assert result["nbytes"] == 2 << 30 and result["payload"] >= 2 << 30
    assert result["firsts"] == [0.0]
    # A copy would add 2 GiB; a mapping adds page tables and the footer's bookkeeping.
    assert result["after_load"] - result["before"] < 32 * MiB, result
    assert result["after_touch"] - result["before"] < 32 * MiB, result
    assert os.path.getsize(path) > 2 << 30
    path.unlink()


def test_a_verified_mapped_load_keeps_the_file_out_of_rss(tmp_path):
    # verify=True reads every byte; through the mapping, the whole file would stay in this
    # process's RSS for as long as the tensors live.
    path = tmp_path / "checked.flashpack"
    result = run(
        """
        path = sys.argv[1]
        flashpack_ops.save_file({f"w{i}": torch.full((1 << 24,), float(i)) for i in range(4)}, path, checksum=True)
        flashpack_ops.load_file(path, verify=True)  # first use: library and thread setup
        before = rss()
        sd = flashpack_ops.load_file(path, verify=True)
        print(json.dumps({"grew": rss() - before, "nbytes": sum(t.nbytes for t in sd.values()),
                          "firsts": [float(t[0]) for t in sd.values()]}))
        """,
        path,
    )
    assert result["nbytes"] == 256 * MiB and result["firsts"] == [0.0, 1.0, 2.0, 3.0]
    assert result["grew"] < 32 * MiB, result

def test_safe_open_get_tensor_maps_the_file_without_copying(tmp_path):
    # Code written for safetensors reads a whole file with a get_tensor loop: each tensor is a
    # private mapping of its bytes, so the loop adds no anonymous memory, and a write to one
    # tensor still reaches neither the file nor another get_tensor of the same name.
    path = tmp_path / "big.flashpack"
    result = run(
        """
        path = sys.argv[1]
        sparse_file(path, [
            ("float32", 4, [(f"w{i}", [4096, 4096]) for i in range(4)]),    # 256 MiB
            ("bfloat16", 2, [(f"b{i}", [4096, 4096]) for i in range(2)]),   # 64 MiB
        ])
        with flashpack_ops.safe_open(path, "pt") as f:  # first use: library and thread setup
            f.get_tensor("b0")
        before = rss()
        with flashpack_ops.safe_open(path, "pt") as f:
            got = {name: f.get_tensor(name) for name in f.keys()}
            firsts = sorted({float(t.view(-1)[0]) for t in got.values()} | {float(t.view(-1)[-1]) for t in got.values()})
            grew = rss() - before
            got["w0"][0, 0] = 1.0
            again = float(f.get_tensor("w0")[0, 0])
        print(json.dumps({"grew": grew, "nbytes": sum(t.nbytes for t in got.values()), "firsts": firsts,
                          "written": float(got["w0"][0, 0]), "again": again,
                          "file": float(flashpack_ops.load_file(path)["w0"][0, 0])}))
        """,
        path,
    )
    assert result["nbytes"] == 320 * MiB and result["firsts"] == [0.0]
    assert (result["written"], result["again"], result["file"]) == (1.0, 0.0, 0.0), result
    # A copy per tensor would add 320 MiB; mappings add page tables and a page per tensor.
    assert result["grew"] < 32 * MiB, result


@pytest.fixture(scope="module")
def repeated_loads(tmp_path_factory):
    """VmRSS after each of 100 loads in a row, mapped and copied, every page read each time."""
    path = tmp_path_factory.mktemp("repeated") / "m.flashpack"
    g = torch.Generator().manual_seed(0)
    flashpack_ops.save_file({f"w{i}": torch.randn(1 << 18, generator=g) for i in range(8)}, path)  # 8 MiB
    result = run(
        """
        samples = {}
        for mode in ("mapped", "copied"):
            samples[mode] = []
            for k in range(100):
                sd = flashpack_ops.load_file(sys.argv[1], copy=mode == "copied")
                total = sum(float(t.sum()) for t in sd.values())
                del sd
                samples[mode].append(rss())
        print(json.dumps(samples))
        """,
        path,
    )
    path.unlink()
    return result


@pytest.mark.parametrize("mode", ["mapped", "copied"])
def test_hundred_loads_in_a_row_keep_rss_flat(repeated_loads, mode):
    samples = repeated_loads[mode]
    # After a few rounds (allocator caches, thread stacks) the size must stop growing. The
    # allocator may keep a few freed 8 MiB buffers around, hence the slack; a leak of one
    # file per load would add 800 MiB, of one of its eight tensors 100 MiB.
    settled = max(samples[:10])
    assert max(samples[10:]) - settled < 48 * MiB, [s // MiB for s in samples]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_hundred_cuda_loads_keep_host_pinned_and_device_memory_flat(tmp_path):
    path = tmp_path / "m.flashpack"
    g = torch.Generator().manual_seed(0)
    flashpack_ops.save_file({f"w{i}": torch.randn(8 << 20, generator=g) for i in range(8)}, path)  # 256 MiB
    result = run(
        """
        path = sys.argv[1]
        samples = []
        for k in range(100):
            sd = flashpack_ops.load_file(path, "cuda")
            torch.cuda.synchronize()
            assert all(t.is_cuda for t in sd.values())
            del sd
            stats = flashpack_ops.cuda_stats()
            samples.append((rss(), status("VmLck") + status("VmPin"), stats["pinned_bytes"],
                            stats["registered_bytes"], torch.cuda.memory_allocated()))
        released = flashpack_ops.release_pinned_memory()
        print(json.dumps({"samples": samples, "released": released,
                          "pinned_after_release": flashpack_ops.cuda_stats()["pinned_bytes"]}))
        """,
        path,
    )
    samples = result["samples"]
    # The pinned pool is kept between loads on purpose; it must not grow after the first few.
    for field, name in enumerate(["RSS", "locked/pinned pages", "pinned pool", "registered pages"]):
        settled = max(s[field] for s in samples[:10])
        assert max(s[field] for s in samples[10:]) - settled < 16 * MiB, (name, [s[field] // MiB for s in samples])
    assert all(s[4] == 0 for s in samples), "device memory still allocated after the tensors were freed"
    assert result["pinned_after_release"] == 0


# A copying load that cannot get memory for a block: the allocator's own error, which says
# how much it wanted, with the file it was for.
NO_MEMORY = textwrap.dedent(
    """
    import resource, sys, torch, flashpack_ops
    path = sys.argv[1]
    flashpack_ops.save_file({"big": torch.zeros(64 << 20, dtype=torch.uint8), "w": torch.ones(3)}, path)
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + (32 << 20), resource.RLIM_INFINITY))
    try:
        flashpack_ops.load_file(path, copy=True, num_threads=1)
    except RuntimeError as e:
        print(type(e).__name__, str(e).splitlines()[-1] if str(e).strip() else "")
        sys.exit(0)
    sys.exit("the load got 64 MiB under a 32 MiB allowance")
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs RLIMIT_AS and /proc")
def test_a_copying_load_without_memory_names_the_file(tmp_path):
    path = str(tmp_path / "big.flashpack")
    r = subprocess.run([sys.executable, "-c", NO_MEMORY, path], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "can't allocate memory" in r.stdout and f"(while loading '{path}' to cpu)" in r.stdout, r.stdout


def vm_flags(address: int) -> list:
    """The VmFlags of this process's mapping that holds `address` (/proc/self/smaps)."""
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            first = line.split()[0]
            if "-" in first and not first.endswith(":"):
                start, end = (int(x, 16) for x in first.split("-"))
                inside = start <= address < end
            elif inside and first == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not os.path.exists("/sys/kernel/mm/transparent_hugepage"), reason="needs huge pages")
def test_copying_loads_ask_for_huge_pages_for_what_they_fill(tmp_path):
    # Each 4 KiB page of a fresh buffer costs a page fault as the file's bytes land in it;
    # asked for huge pages, a fault fills 2 MiB. The advice shows as "hg" in the VmFlags
    # (whether the kernel then finds huge pages is its affair).
    path = tmp_path / "m.flashpack"
    weights = {"w": torch.arange(8 << 20, dtype=torch.int32), "b": torch.ones(3, dtype=torch.bfloat16)}
    flashpack_ops.save_file(weights, path)
    loaded = flashpack_ops.load_file(path, copy=True)
    assert all(torch.equal(loaded[k], weights[k]) for k in weights)
    assert "hg" in vm_flags(loaded["w"].data_ptr() + (16 << 20))
    raw = torch.ops.flashpack.read_range(str(path), 0, 32 << 20, "cpu")
    assert torch.equal(raw[:4096].view(torch.int32), weights["w"][:1024])
    assert "hg" in vm_flags(raw.data_ptr() + (16 << 20))
    mapped = flashpack_ops.load_file(path)  # the file's own pages: nothing to ask
    assert "hg" not in vm_flags(mapped["w"].data_ptr() + (16 << 20))


def test_saving_a_large_tensor_that_needs_converting_holds_no_second_copy(tmp_path):
    # 512 MiB, transposed: converted a slice of rows at a time, so the save's peak is a few
    # slices (about 32 MiB each, one per thread), not a second 512 MiB.
    out = run(
        """
        t = torch.ones(8192, 16384, dtype=torch.float32).t()
        before = status("VmRSS")
        flashpack_ops.save_file({"t": t}, sys.argv[1], num_threads=2, durable=False)
        # This process's own high-water mark (ru_maxrss would count the parent's, kept across exec).
        peak = status("VmHWM")
        print(json.dumps({"before": before, "peak": peak}))
        """,
        tmp_path / "t.flashpack",
    )
    assert out["peak"] - out["before"] < 160 * MiB, out
    loaded = flashpack_ops.load_file(tmp_path / "t.flashpack")["t"]
    assert loaded.shape == (16384, 8192) and bool((loaded == 1).all())

def test_saving_with_a_dtype_conversion_holds_a_slice_per_thread(tmp_path):
    # A model's tensors in the sizes of a small Llama, converted to bfloat16 as they are
    # written: the save's peak is a slice (32 MiB) per thread, and nothing is kept after it,
    # however the tensors' sizes vary.
    path = tmp_path / "src.flashpack"
    out = run(
        """
        path, dest = sys.argv[1], sys.argv[2]
        layer = [("q", [2048, 2048]), ("k", [2048, 2048]), ("v", [2048, 2048]), ("o", [2048, 2048]),
                 ("gate", [5632, 2048]), ("up", [5632, 2048]), ("down", [2048, 5632]), ("norm", [2048])]
        sparse_file(path, [("float32", 4, [("embed", [32000, 2048])]
                            + [(f"layers.{i}.{n}", s) for i in range(3) for n, s in layer])])  # 1 GiB
        sd = flashpack_ops.load_file(path)
        flashpack_ops.save_file({"w": torch.zeros(4)}, dest, target_dtype=torch.bfloat16)  # first use
        before, file_before, anon_before = status("VmRSS"), status("RssFile"), status("RssAnon")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        flashpack_ops.save_file(sd, dest, target_dtype=torch.bfloat16, num_threads=2, durable=False)
        # The source's pages, read through its mapping, stay in RSS (file-backed) to the end.
        file_pages = status("RssFile") - file_before
        print(json.dumps({"peak": status("VmHWM") - before - file_pages, "kept": status("RssAnon") - anon_before}))
        """,
        path, tmp_path / "out.flashpack",
    )
    assert out["peak"] < 112 * MiB and out["kept"] < 16 * MiB, out
    loaded = flashpack_ops.load_file(tmp_path / "out.flashpack")
    assert len(loaded) == 25 and all(t.dtype == torch.bfloat16 and not t.any() for t in loaded.values())
