"""Distributed loading over torch.distributed: broadcast from one rank, or sharded reads plus
all-gather. Real process groups (gloo on the CPU, 2 to 4 processes; NCCL with the GPUs there
are), real files, results compared bit for bit with a plain load on every rank."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import flashpack_ops
from conftest import STORABLE_DTYPES, random_tensor
from flashpack_ops.distributed import _plan_windows, SHARD_ALIGN_BYTES

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dist_worker.py")


def mixed_state_dict(seed=0):
    g = torch.Generator().manual_seed(seed)
    f32 = torch.randn(30011, generator=g)
    f32[5] = float("nan")
    return {
        "f32": f32,
        "bf16": torch.randn(12345, generator=g).to(torch.bfloat16),
        "i64": torch.randint(-2**40, 2**40, (5003,), generator=g),
        "u8": torch.randint(0, 256, (70001,), generator=g).to(torch.uint8),
        "bool": torch.rand(999, generator=g) > 0.5,
        "f8": torch.randn(40000, generator=g).to(torch.float8_e4m3fn),
        "c64": torch.randn(3001, generator=g, dtype=torch.complex64),
        "f16_small": torch.randn(7, generator=g).half(),
        "empty": torch.empty(0, 5),
        "scalar": torch.tensor(3.5, dtype=torch.float64),
        "grid": torch.randn(17, 13, 11, generator=g),
        "tied": f32,
        # One block of every other storable dtype, too small to split: read by every rank.
        **{f"t_{str(dtype)[6:]}": random_tensor((3, 5), dtype, seed=k) for k, dtype in enumerate(STORABLE_DTYPES)},
    }


MIXED_TIES = [["f32", "tied"]]


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(37, 29), torch.nn.LayerNorm(29))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    paths = {name: str(d / f"{name}.flashpack") for name in ("mixed", "tiny", "checked", "corrupt", "model", "ref")}
    flashpack_ops.save_file(mixed_state_dict(), paths["mixed"])
    flashpack_ops.save_file({"t": torch.arange(3, dtype=torch.int16)}, paths["tiny"])
    flashpack_ops.save_file(mixed_state_dict(), paths["checked"], checksum=True)
    flashpack_ops.save_file(mixed_state_dict(), paths["corrupt"], checksum=True)
    block = flashpack_ops.read_metadata(paths["corrupt"])["macroblocks"][0]
    with open(paths["corrupt"], "r+b") as f:
        f.seek(block["offset_bytes"] + 1000)
        byte = f.read(1)[0]
        f.seek(block["offset_bytes"] + 1000)
        f.write(bytes([byte ^ 0x40]))
    flashpack_ops.save_file(model().state_dict(), paths["model"])
    from flashpack import pack_to_file as reference_pack
    ref = mixed_state_dict(1)
    reference_pack({k: ref[k] for k in ("f32", "bf16", "i64", "u8", "bool", "f16_small", "grid")}, paths["ref"],
                   target_dtype=None, num_workers=2)
    # Per-rank files: every rank but 1 has one; every rank has a different one.
    for rank in (0, 2, 3):
        flashpack_ops.save_file(mixed_state_dict(), str(d / f"not1_{rank}.flashpack"))
    for rank in (0, 2, 3):
        flashpack_ops.save_file(model().state_dict(), str(d / f"model_not1_{rank}.flashpack"))
    for rank in range(4):
        flashpack_ops.save_file({"t": torch.zeros(5000 + rank)}, str(d / f"differs_{rank}.flashpack"))
        flashpack_ops.save_file({"t": torch.full((50000,), float(rank))}, str(d / f"values_differ_{rank}.flashpack"))
    paths["not1"] = str(d / "not1_{rank}.flashpack")
    paths["model_not1"] = str(d / "model_not1_{rank}.flashpack")
    paths["differs"] = str(d / "differs_{rank}.flashpack")
    paths["values_differ"] = str(d / "values_differ_{rank}.flashpack")
    paths["missing"] = str(d / "missing.flashpack")
    paths["dir"] = str(d)
    return paths


def cases(files, world):
    return {
        "broadcast": {"path": files["mixed"], "ties": MIXED_TIES},
        "broadcast_from_last_rank": {"path": files["mixed"], "kwargs": {"src": world - 1}, "ties": MIXED_TIES},
        "broadcast_small_windows": {"path": files["mixed"], "kwargs": {"window_bytes": 5000}, "ties": MIXED_TIES},
        "broadcast_tiny": {"path": files["tiny"]},
        # Only rank 0 reads: rank 1 has no file at that path.
        "broadcast_file_only_on_src": {"path": files["not1"], "ties": MIXED_TIES},
        "broadcast_reference_file": {"path": files["ref"]},
        "broadcast_verify": {"path": files["checked"], "kwargs": {"verify": True}, "ties": MIXED_TIES},
        # 8 KiB pieces: many windows per block, shrinking pieces and leftovers.
        "sharded_small_windows": {"path": files["mixed"], "kwargs": {"sharded": True, "window_bytes": 8192},
                                  "ties": MIXED_TIES},
        "sharded_default_windows": {"path": files["mixed"], "kwargs": {"sharded": True}, "ties": MIXED_TIES},
        "sharded_tiny": {"path": files["tiny"], "kwargs": {"sharded": True}},
        "sharded_reference_file": {"path": files["ref"], "kwargs": {"sharded": True, "window_bytes": 4096}},
        "sharded_verify": {"path": files["checked"], "kwargs": {"sharded": True, "verify": True},
                           "ties": MIXED_TIES},
        "blocks_broadcast": {"path": files["mixed"], "blocks": True, "kwargs": {"src": world - 1}},
        "blocks_sharded": {"path": files["mixed"], "blocks": True,
                           "kwargs": {"sharded": True, "shard_strategy": "windows"}},
        "blocks_reference_file": {"path": files["ref"], "blocks": True, "kwargs": {"sharded": True}},
        "assign_broadcast": {"path": files["model"], "assign": True},
        "assign_sharded": {"path": files["model"], "assign": True, "kwargs": {"distributed_sharded": True}},
        "assign_keeping_the_blocks": {"path": files["model"], "assign": True,
                                      "kwargs": {"distributed_sharded": True, "keep_flash_ref_on_model": True}},
        "mixin_sharded": {"path": files["model"], "mixin": True, "kwargs": {"distributed_sharded": True}},
        # Broadcast: only rank 0 reads, so rank 1 needs no file...
        "mixin_broadcast_file_only_on_src": {"path": files["model_not1"], "mixin": True},
        # ...while sharded, every rank reads: this fails only if distributed_sharded got through.
        "error_mixin_sharded_missing_on_rank_1": {"path": files["model_not1"], "mixin": True,
                                                  "kwargs": {"distributed_sharded": True}, "expect_error": True},
        "error_missing_on_src": {"path": files["missing"], "expect_error": True},
        "error_missing_sharded": {"path": files["missing"], "kwargs": {"sharded": True}, "expect_error": True},
        "error_missing_on_rank_1": {"path": files["not1"], "kwargs": {"sharded": True}, "expect_error": True},
        "error_files_differ": {"path": files["differs"], "kwargs": {"sharded": True}, "expect_error": True},
        # Same layout, other values: each rank would gather a mix of the files.
        "error_values_differ": {"path": files["values_differ"], "kwargs": {"sharded": True}, "expect_error": True},
        # Ranks that disagree on how to load, or one rank's bad argument: every rank raises
        # instead of waiting in a collective the others never join.
        "error_window_bytes_differ": {"path": files["mixed"], "rank_kwargs": {"1": {"window_bytes": 16384}},
                                      "expect_error": True},
        "error_sharded_differs": {"path": files["mixed"], "rank_kwargs": {"1": {"sharded": True}},
                                  "expect_error": True},
        "error_bad_argument_on_rank_1": {"path": files["mixed"], "rank_kwargs": {"1": {"window_bytes": 1000}},
                                         "expect_error": True},
        "error_corrupt_verify": {"path": files["corrupt"], "kwargs": {"verify": True}, "expect_error": True},
        # Refused on one rank only: every rank raises at once, none waits in a collective.
        "error_strategy_on_rank_1": {"path": files["mixed"], "blocks": True, "kwargs": {"sharded": True},
                                     "rank_kwargs": {"1": {"shard_strategy": "ring"}}, "expect_error": True},
        "error_assign_strategy_on_rank_1": {"path": files["model"], "assign": True,
                                            "kwargs": {"distributed_sharded": True},
                                            "rank_kwargs": {"1": {"distributed_shard_strategy": "ring"}},
                                            "expect_error": True},
        "error_meta_on_rank_1": {"path": files["mixed"], "rank_kwargs": {"1": {"device": "meta"}},
                                 "expect_error": True},
        "error_window_bytes_none_on_rank_1": {"path": files["mixed"], "rank_kwargs": {"1": {"window_bytes": None}},
                                              "expect_error": True},
        "error_sharded_none_on_rank_1": {"path": files["mixed"], "rank_kwargs": {"1": {"sharded": None}},
                                         "expect_error": True},
        "error_window_bytes_huge_on_rank_1": {"path": files["mixed"], "rank_kwargs": {"1": {"window_bytes": 2**70}},
                                              "expect_error": True},
        # "cuda" where torch has none: what every load says, not torch's assertion.
        **({} if torch.cuda.is_available() else
           {"error_cuda_without_cuda": {"path": files["mixed"], "device": "cuda", "expect_error": True},
            "error_cuda_blocks_without_cuda": {"path": files["mixed"], "device": "cuda", "blocks": True,
                                               "expect_error": True}}),
    }


def worker_env():
    # The workers import the same flashpack_ops as this process, installed or built in place.
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(flashpack_ops.__file__)))
    path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", FLASHPACK_NUM_THREADS="2")


def run_world(files, world, backend="gloo", gpus=False, errors=True):
    """Runs every case on `world` worker processes; returns each rank's results."""
    d = files["dir"]
    tag = f"{backend}{world}"
    cases_json = os.path.join(d, f"cases_{tag}.json")
    with open(cases_json, "w") as f:
        json.dump({k: v for k, v in cases(files, world).items() if errors or not v.get("expect_error")}, f)
    init_file = os.path.join(d, f"init_{tag}")
    if os.path.exists(init_file):
        os.remove(init_file)
    outs = [os.path.join(d, f"out_{tag}_{r}.json") for r in range(world)]
    procs = [subprocess.Popen([sys.executable, WORKER, str(r), str(world), init_file, cases_json, outs[r],
                               backend, f"cuda:{r}" if gpus else "cpu"],
                              env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(world)]
    logs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=300)
            logs.append(out.decode(errors="replace"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} exited with {p.returncode}:\n{logs[r]}"
    results = []
    for out in outs:
        with open(out) as f:
            results.append(json.load(f))
    return results


@pytest.fixture(scope="module", params=[2, 3, 4], ids=lambda w: f"world{w}")
def world_results(request, files):
    return request.param, run_world(files, request.param)


@pytest.mark.parametrize("case", [
    "broadcast", "broadcast_from_last_rank", "broadcast_small_windows", "broadcast_tiny", "broadcast_file_only_on_src",
    "broadcast_reference_file",
    "broadcast_verify", "sharded_small_windows", "sharded_default_windows", "sharded_tiny",
    "sharded_reference_file", "sharded_verify", "assign_broadcast", "assign_sharded", "assign_keeping_the_blocks",
    "mixin_sharded", "mixin_broadcast_file_only_on_src",
    "blocks_broadcast", "blocks_sharded", "blocks_reference_file",
])
def test_every_rank_gets_the_plain_load_bit_for_bit(world_results, case):
    world, results = world_results
    for rank in range(world):
        assert results[rank][case] == "ok", f"rank {rank}: {results[rank][case]}"


def test_missing_file_on_src_fails_on_every_rank(world_results):
    world, results = world_results
    assert results[0]["error_missing_on_src"].startswith("FileNotFoundError")
    for rank in range(1, world):
        assert "loading on rank 0 failed: FileNotFoundError" in results[rank]["error_missing_on_src"]


def test_missing_file_sharded_fails_on_every_rank(world_results):
    world, results = world_results
    for rank in range(world):
        assert results[rank]["error_missing_sharded"].startswith("FileNotFoundError")


def test_file_missing_on_one_rank_fails_on_every_rank(world_results):
    world, results = world_results
    assert results[1]["error_missing_on_rank_1"].startswith("FileNotFoundError")
    for rank in [0] + list(range(2, world)):
        assert "failed on another rank" in results[rank]["error_missing_on_rank_1"]


def test_from_flashpack_passes_distributed_sharded_on(world_results):
    world, results = world_results
    assert results[1]["error_mixin_sharded_missing_on_rank_1"].startswith("FileNotFoundError")
    for rank in [0] + list(range(2, world)):
        assert "failed on another rank" in results[rank]["error_mixin_sharded_missing_on_rank_1"]


def test_different_files_on_ranks_are_refused(world_results):
    world, results = world_results
    for rank in range(world):
        assert "differs between ranks" in results[rank]["error_files_differ"]
        assert "differs between ranks" in results[rank]["error_values_differ"]


@pytest.mark.parametrize("case, name", [("error_window_bytes_differ", "window_bytes"),
                                        ("error_sharded_differs", "sharded")])
def test_ranks_that_disagree_on_the_arguments_all_fail(world_results, case, name):
    world, results = world_results
    for rank in range(world):
        assert f"{name} differs between ranks" in results[rank][case], results[rank][case]


@pytest.mark.skipif(torch.cuda.is_available(), reason="torch has CUDA here")
@pytest.mark.parametrize("case", ["error_cuda_without_cuda", "error_cuda_blocks_without_cuda"])
def test_cuda_without_cuda_is_a_clear_error_on_every_rank(world_results, case):
    world, results = world_results
    assert results[0][case].startswith("ValueError") and "no CUDA device is available" in results[0][case]
    for rank in range(1, world):
        assert results[rank][case].startswith("ValueError"), results[rank][case]


@pytest.mark.parametrize("case, said", [
    ("error_bad_argument_on_rank_1", "window_bytes must be at least 4096"),
    ("error_strategy_on_rank_1", "unknown shard_strategy 'ring'"),
    ("error_assign_strategy_on_rank_1", "unknown distributed_shard_strategy 'ring'"),
    ("error_meta_on_rank_1", "to meta: only cpu and cuda are supported"),
    ("error_window_bytes_none_on_rank_1", "window_bytes must be an int, got None"),
    ("error_sharded_none_on_rank_1", "sharded must be a bool, got None"),
    ("error_window_bytes_huge_on_rank_1", "window_bytes is out of range: 1180591620717411303424"),
])
def test_a_bad_argument_on_one_rank_fails_on_every_rank(world_results, case, said):
    world, results = world_results
    assert said in results[1][case], results[1][case]
    for rank in [0] + list(range(2, world)):
        assert "refused on another rank" in results[rank][case], results[rank][case]


def test_corrupt_file_with_verify_fails_on_every_rank(world_results):
    world, results = world_results
    assert results[0]["error_corrupt_verify"].startswith("ValueError")
    for rank in range(world):
        assert "checksum mismatch in macroblock 0" in results[rank]["error_corrupt_verify"]


@pytest.mark.parametrize("nbytes", [0, 1, 4095, 4096, 8191, 12288, 3 * 4096 + 17, 10**6 + 3, 7 << 20])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("window_bytes", [4096, 12288, 1 << 20])
def test_windows_tile_the_block(nbytes, world, window_bytes):
    windows, rest = _plan_windows(nbytes, world, window_bytes)
    pos = 0
    for start, piece in windows:
        assert start == pos and 0 < piece <= window_bytes and piece % SHARD_ALIGN_BYTES == 0
        pos += world * piece
    assert pos == rest <= nbytes
    assert nbytes - rest < world * SHARD_ALIGN_BYTES


def test_needs_a_process_group(files):
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="distributed load of '.*mixed.flashpack' needs an initialized "
                                           "torch.distributed process group"):
        flashpack_ops.load_file_distributed(files["mixed"])


def test_assign_from_file_without_a_world_loads_normally(files):
    m = model()
    want = {k: v.clone() for k, v in m.state_dict().items()}
    m2 = torch.nn.Sequential(torch.nn.Linear(37, 29), torch.nn.LayerNorm(29))
    flashpack_ops.assign_from_file(m2, files["model"], use_distributed_loading=True, world_size=1)
    for k, v in m2.state_dict().items():
        assert torch.equal(v, want[k])


def test_read_flashpack_file_distributed_needs_a_process_group(files):
    # Named for what the caller called, not for the function that does the work.
    with pytest.raises(RuntimeError, match="^a distributed load of '.*mixed.flashpack' needs an initialized "
                                           "torch.distributed process group"):
        flashpack_ops.read_flashpack_file_distributed(files["mixed"], "cpu")


def test_the_shard_strategy_is_read_as_the_reference_reads_it(files):
    # In any case, and not at all when the read is not sharded (the reference ignores it then).
    for strategy in (" Windows", "CONTIGUOUS"):
        flashpack_ops.api._check_shard_strategy(strategy, "shard_strategy")
    expected = model()
    flashpack_ops.assign_from_file(expected, files["model"], use_distributed_loading=True, world_size=1)
    loaded = model()
    flashpack_ops.assign_from_file(loaded, files["model"], use_distributed_loading=True, world_size=1,
                                   distributed_shard_strategy="ring")
    for name, tensor in expected.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_an_unknown_shard_strategy_is_refused_in_one_process_too(files):
    # A world of one loads without collectives; the mistake still shows before torchrun does.
    with pytest.raises(ValueError, match="unknown distributed_shard_strategy 'ring'"):
        flashpack_ops.assign_from_file(model(), files["model"], use_distributed_loading=True, world_size=1,
                                       distributed_sharded=True, distributed_shard_strategy="ring")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(not torch.distributed.is_nccl_available(), reason="needs NCCL")
def test_nccl_on_the_gpus_there_are(files):
    # One process per GPU; on a one-GPU machine that is a world of one, which still runs
    # every broadcast and all-gather through NCCL.
    if not flashpack_ops.has_cuda():
        pytest.skip("flashpack_ops was built without CUDA")
    world = torch.cuda.device_count()
    for rank, res in enumerate(run_world(files, world, backend="nccl", gpus=True, errors=False)):
        for case, outcome in res.items():
            assert outcome == "ok", f"rank {rank}, {case}: {outcome}"


@pytest.mark.parametrize("offset,length", [(0, 0), (0, 1), (4095, 3), (1000, 70001), (0, None)])
def test_read_range_returns_the_file_bytes(files, offset, length):
    path = files["mixed"]
    with open(path, "rb") as f:
        raw = f.read()
    length = len(raw) if length is None else length
    got = torch.ops.flashpack.read_range(path, offset, length, "cpu", num_threads=3)
    assert got.dtype == torch.uint8 and got.shape == (length,)
    assert bytes(got.numpy()) == raw[offset:offset + length]


@pytest.mark.parametrize("offset,length", [(-1, 4), (0, -4), (0, 10**9), (2**62, 1)])
def test_read_range_refuses_bytes_past_the_file(files, offset, length):
    with pytest.raises(ValueError, match=r"flashpack::read_range: '.*mixed.flashpack': cannot read -?\d+ bytes at "
                                         r"offset -?\d+: the file has \d+ bytes"):
        torch.ops.flashpack.read_range(files["mixed"], offset, length, "cpu")


_WORLD_OF_ONE = r"""
import json, sys
import torch, torch.distributed as dist
import flashpack_ops

def error_of(call):
    try:
        call()
    except ValueError as error:
        return str(error)
    return None

path = sys.argv[1]
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
torch.manual_seed(0)
source = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 3))
flashpack_ops.save_file(source.state_dict(), path)
model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 3))
"""


def run_in_a_world_of_one(script, path, *args):
    """Runs `script` in a process of its own, in a gloo world of one, after saving a small
    model `source` to `path` and building another, `model`; returns the dict `out` it made."""
    code = _WORLD_OF_ONE + script + "\ndist.destroy_process_group()\nprint(json.dumps(out))\n"
    result = subprocess.run([sys.executable, "-c", code, str(path), *map(str, args)],
                            env=worker_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


_FSDP2_SCRIPT = r"""
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, init_device_mesh

saved = sys.argv[2]
fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
shards = [p.to_local().clone() for p in model.parameters()]
out = {"save_file": error_of(lambda: flashpack_ops.save_file(model.state_dict(), saved)),
       "pack_to_file": error_of(lambda: flashpack_ops.pack_to_file(model, saved)),
       "assign_from_file": error_of(lambda: flashpack_ops.assign_from_file(model, path))}
out["still_sharded"] = all(isinstance(p, DTensor) and torch.equal(p.to_local(), s)
                           for p, s in zip(model.parameters(), shards))
# The way the error points to: the whole tensors copied into this rank's shards.
set_model_state_dict(model, flashpack_ops.load_file(path), options=StateDictOptions(full_state_dict=True))
out["loaded"] = all(isinstance(p, DTensor) and torch.equal(p.full_tensor(), q)
                    for p, q in zip(model.parameters(), source.parameters()))
"""


def test_an_fsdp2_model_is_refused_with_the_way_to_save_and_load_it(tmp_path):
    # FSDP2 parameters are DTensors holding this rank's shard: saving one would store a shard
    # (the operator refuses it, having no data of its own), and assigning a whole tensor in
    # its place would quietly undo the sharding. Both say what to call instead.
    saved = tmp_path / "saved.flashpack"
    flashpack_ops.save_file({"old": torch.arange(5.0)}, str(saved))
    out = run_in_a_world_of_one(_FSDP2_SCRIPT, tmp_path / "model.flashpack", saved)
    for what in ("save_file", "pack_to_file"):
        assert out[what] is not None and out[what].startswith(f"cannot save '{saved}': '0.weight' is a DTensor, split "
                                                              "over a device mesh as (Shard(dim=0),): gather it with "
                                                              ".full_tensor() on every rank"), out[what]
    assert torch.equal(flashpack_ops.load_file(str(saved))["old"], torch.arange(5.0))
    assert out["assign_from_file"] is not None and re.match(
        r"flashpack_ops.assign_from_file: cannot load .*model.flashpack into FSDPSequential by assignment: '0.weight' "
        r"is a DTensor, .*\.set_model_state_dict\(model, flashpack_ops.load_file\(path\), "
        r"options=StateDictOptions\(full_state_dict=True\)\)$", out["assign_from_file"]), out["assign_from_file"]
    assert out["still_sharded"] and out["loaded"]


_DDP_SCRIPT = r"""
model = torch.nn.parallel.DistributedDataParallel(model)
before = list(model.module.parameters())
out = {"ddp": error_of(lambda: flashpack_ops.assign_from_file(model, path)),
       "compiled_ddp": error_of(lambda: flashpack_ops.assign_from_file(torch.compile(model), path))}
out["kept"] = all(p is q for p, q in zip(model.module.parameters(), before))
# The way the error points to: a copy into the parameters DDP was built with.
model.module.load_state_dict(flashpack_ops.load_file(path))
out["loaded"] = all(p is q and torch.equal(p, s) for p, q, s in zip(model.module.parameters(), before,
                                                                     source.parameters()))
"""


def test_a_ddp_model_is_refused_with_the_way_to_load_it(tmp_path):
    # DDP averages the gradients of the parameters it was built with: parameters assigned in
    # their place would train on each rank's own gradients, the ranks drifting apart silently.
    out = run_in_a_world_of_one(_DDP_SCRIPT, tmp_path / "model.flashpack")
    for what, wrapper in (("ddp", "DistributedDataParallel"), ("compiled_ddp", "OptimizedModule")):
        assert out[what] is not None and re.match(
            rf"flashpack_ops.assign_from_file: cannot load .*model.flashpack into {wrapper} by assignment: it holds a "
            r"DistributedDataParallel, which averages the gradients of the parameters it was built with, .*"
            r"model.module.load_state_dict\(flashpack_ops.load_file\(path\)\)$", out[what]), out[what]
    assert out["kept"] and out["loaded"]


_FSDP1_SCRIPT = r"""
from torch.distributed.fsdp import FullyShardedDataParallel

model = FullyShardedDataParallel(model, device_id=torch.device("cpu"))
out = {"assign": error_of(lambda: flashpack_ops.assign_from_file(model, path))}
# The way the error points to.
model.load_state_dict(flashpack_ops.load_file(path))
x = torch.ones(2, 8)
out["loaded"] = torch.equal(model(x), source(x))
"""


def test_an_fsdp1_model_is_refused_with_the_way_to_load_it(tmp_path):
    # FSDP (the first) flattens its modules' parameters into sharded ones of its own.
    out = run_in_a_world_of_one(_FSDP1_SCRIPT, tmp_path / "model.flashpack")
    assert out["assign"] is not None and re.match(
        r"flashpack_ops.assign_from_file: cannot load .*model.flashpack into FullyShardedDataParallel by assignment: "
        r"it holds a FullyShardedDataParallel, which keeps its parameters flattened and sharded\. .*"
        r"model.load_state_dict\(flashpack_ops.load_file\(path\)\)$", out["assign"]), out["assign"]
    assert out["loaded"]
