"""flashpack_ops.safe_open against safetensors.safe_open on the same tensors."""

import pytest
import torch

import flashpack_ops
from conftest import STORABLE_DTYPES, assert_same, random_tensor

safetensors = pytest.importorskip("safetensors")
from safetensors.torch import save_file as save_safetensors  # noqa: E402


def tensors():
    return {
        "z.last": random_tensor((5, 7), torch.float32, seed=1),
        "a.first": random_tensor((3, 4, 2), torch.bfloat16, seed=2),
        "m.ints": random_tensor((11,), torch.int64, seed=3),
        "scalar": random_tensor((), torch.float16, seed=4),
        "empty": torch.empty(0, 3),
    }


@pytest.fixture
def both(tmp_path):
    """The same tensors as a flashpack file and a .safetensors file."""
    flashpack_ops.save_file(tensors(), tmp_path / "m.flashpack")
    save_safetensors(tensors(), str(tmp_path / "m.safetensors"))
    return str(tmp_path / "m.flashpack"), str(tmp_path / "m.safetensors")


def test_reads_what_safetensors_reads(both):
    ours, theirs = both
    with flashpack_ops.safe_open(ours, framework="pt") as f, safetensors.safe_open(theirs, framework="pt") as g:
        assert f.keys() == g.keys()
        # By position in the file: one block per dtype, in order of first appearance.
        assert f.offset_keys() == ["z.last", "a.first", "m.ints", "scalar", "empty"]
        for name in g.keys():
            assert_same(f.get_tensor(name), g.get_tensor(name), name)


@pytest.mark.parametrize("index", [(slice(None),), (slice(1, 3),), (0,), (slice(None), slice(2, 5)),
                                   (Ellipsis, 1), (slice(0, 0),)], ids=str)
def test_slices_are_safetensors_slices(both, index):
    ours, theirs = both
    with flashpack_ops.safe_open(ours, framework="pt") as f, safetensors.safe_open(theirs, framework="pt") as g:
        for name in ("z.last", "a.first"):
            mine, want = f.get_slice(name), g.get_slice(name)
            assert mine.get_shape() == want.get_shape()
            assert mine.get_dtype() == want.get_dtype()
            got = mine[index]
            assert_same(got, want[index], name)
            assert got.is_contiguous()


@pytest.mark.parametrize("dtype", STORABLE_DTYPES, ids=str)
def test_every_dtype(tmp_path, dtype):
    value = random_tensor((4, 6), dtype, seed=7)
    flashpack_ops.save_file({"w": value}, tmp_path / "w.flashpack")
    with flashpack_ops.safe_open(tmp_path / "w.flashpack", framework="pt") as f:
        assert_same(f.get_tensor("w"), value, str(dtype))
        assert_same(f.get_slice("w")[1:3], value[1:3], str(dtype))
        ours = f.get_slice("w").get_dtype()
    try:
        save_safetensors({"w": value}, str(tmp_path / "w.safetensors"))
    except Exception:  # a dtype this safetensors cannot store: torch's name, unless a newer one names it
        from flashpack_ops.lazy import _SAFETENSORS_DTYPES

        assert ours == _SAFETENSORS_DTYPES.get(dtype, str(dtype).removeprefix("torch."))
        return
    with safetensors.safe_open(str(tmp_path / "w.safetensors"), framework="pt") as g:
        assert ours == g.get_slice("w").get_dtype()


def test_what_is_returned_is_apart_from_the_file_and_from_each_other(both):
    ours, _ = both
    with flashpack_ops.safe_open(ours, framework="pt") as f:
        part = f.get_slice("z.last")[0:2]
        part.fill_(0)
        whole = f.get_tensor("z.last")
        whole.mul_(0)  # as a loader that scales weights in place, then reads them again
        assert torch.equal(f.get_tensor("z.last"), tensors()["z.last"])
    assert torch.equal(flashpack_ops.load_file(ours)["z.last"], tensors()["z.last"])


def test_metadata_is_none(both):
    with flashpack_ops.safe_open(both[0], framework="pt") as f:
        assert f.metadata() is None


def test_get_tensors_and_metadata_as_safetensors_gives_them(tmp_path):
    flashpack_ops.save_file(tensors(), tmp_path / "m.flashpack", metadata={"format": "pt"})
    save_safetensors(tensors(), str(tmp_path / "m.safetensors"), metadata={"format": "pt"})
    with flashpack_ops.safe_open(tmp_path / "m.flashpack", framework="pt") as f, \
            safetensors.safe_open(str(tmp_path / "m.safetensors"), framework="pt") as g:
        ours, theirs = f.get_tensors(), g.get_tensors()
        assert list(ours) == f.offset_keys() and sorted(ours) == sorted(theirs)
        for name in theirs:
            assert_same(ours[name], theirs[name], name)
        # Each call a dict of the caller's own.
        f.metadata()["format"] = "changed"
        g.metadata()["format"] = "changed"
        assert f.metadata() == g.metadata() == {"format": "pt"}


def test_the_meta_device_is_refused_as_safetensors_refuses_it(both):
    with pytest.raises(safetensors.SafetensorError, match="device meta is invalid"):
        safetensors.safe_open(both[1], framework="pt", device="meta")
    with pytest.raises(ValueError, match="for meta: the meta device holds no data"):
        flashpack_ops.safe_open(both[0], framework="pt", device="meta")


def test_errors_name_the_file_and_the_problem(both, tmp_path):
    ours, _ = both
    with flashpack_ops.safe_open(ours, framework="pt") as f:
        with pytest.raises(KeyError, match=f"'{ours}' has no tensor named 'nope'"):
            f.get_tensor("nope")
        with pytest.raises(KeyError, match="no tensor named 'nope'"):
            f.get_slice("nope")
        kept = f.get_tensor("m.ints")
    with pytest.raises(ValueError, match=f"'{ours}' is closed"):
        f.get_tensor("m.ints")
    assert torch.equal(kept, tensors()["m.ints"])  # what was returned outlives the with block
    with pytest.raises(ValueError, match="framework 'np'"):
        flashpack_ops.safe_open(ours, framework="np")
    with pytest.raises(FileNotFoundError):
        flashpack_ops.safe_open(tmp_path / "missing.flashpack", framework="pt")
    (tmp_path / "bad.flashpack").write_bytes(b"{}" * 100)
    with pytest.raises(ValueError, match="bad.flashpack"):
        flashpack_ops.safe_open(tmp_path / "bad.flashpack", framework="pt")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is available")
def test_cuda_without_a_gpu_says_so(both):
    with pytest.raises(ValueError, match="no CUDA device is available"):
        flashpack_ops.safe_open(both[0], framework="pt", device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("device", ["cuda", 0, "cuda:0"], ids=str)
def test_reads_to_cuda(both, device):
    ours, theirs = both
    with flashpack_ops.safe_open(ours, framework="pt", device=device) as f, \
            safetensors.safe_open(theirs, framework="pt", device=device) as g:
        for name in g.keys():
            got = f.get_tensor(name)
            assert got.is_cuda
            assert_same(got, g.get_tensor(name), name)
            assert_same(f.get_slice(name)[...], g.get_slice(name)[...], name)


@pytest.mark.parametrize("device", ["xpu", "mps"])
def test_a_device_that_is_not_here_is_said_at_open(both, device):
    try:
        torch.empty(0, device=device)
        pytest.skip(f"{device} is available here")
    except Exception:
        pass
    with pytest.raises(ValueError, match=f"cannot open '.*' for {device}: the device is not available here"):
        flashpack_ops.safe_open(both[0], framework="pt", device=device)


def mapping_of(tensor):
    """The file behind the memory of `tensor` ("" for anonymous memory), from /proc/self/maps."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= tensor.data_ptr() < end:
                return fields[5].strip() if len(fields) > 5 else ""
    return None


def test_large_tensors_are_mapped_apart_from_each_other_and_the_file(tmp_path):
    # Tensors of 64 KiB or more are private mappings of their bytes: in every block (dtype),
    # tied names included, each apart from the others, from a second read and from the file.
    big = {"f32": random_tensor((256, 128), torch.float32, seed=5),
           "bf16": random_tensor((64, 1024), torch.bfloat16, seed=6),
           "i64": random_tensor((20000,), torch.int64, seed=7),
           "small": random_tensor((3,), torch.float32, seed=8)}
    big["tied"] = big["f32"]
    path = tmp_path / "big.flashpack"
    flashpack_ops.save_file(big, path)
    with flashpack_ops.safe_open(path, framework="pt") as f:
        got = {name: f.get_tensor(name) for name in f.keys()}
        for name, tensor in got.items():
            assert_same(tensor, big[name], name)
            assert (mapping_of(tensor) == str(path)) == (name != "small"), name  # small ones are copied
            tensor.zero_()
        got["tied"].fill_(1)
        for name in big:
            assert_same(f.get_tensor(name), big[name], name)
    assert not got["f32"].any()
    for name, tensor in flashpack_ops.load_file(path).items():
        assert_same(tensor, big[name], name)


def test_a_handle_is_not_copied_or_pickled_as_safetensors_refuses_it(both, tmp_path):
    # A copy would hold this process's number for the open file: once the handle is closed, or
    # in another process (a DataLoader worker started with spawn), that number names another
    # file or none, and the copy's get_tensor would map another file's bytes.
    import copy
    import pickle

    path = tmp_path / "first.flashpack"
    flashpack_ops.save_file({"w": torch.ones(256, 256)}, path)  # 256 KiB: mapped
    with flashpack_ops.safe_open(path, framework="pt") as f, safetensors.safe_open(both[1], framework="pt") as g:
        for copier in (pickle.dumps, copy.deepcopy, copy.copy):
            with pytest.raises(TypeError, match="cannot pickle 'safe_open' object.*first.flashpack"):
                copier(f)
            with pytest.raises(TypeError, match="cannot pickle"):
                copier(g)
        assert_same(f.get_tensor("w"), torch.ones(256, 256))


def test_a_v3_file_is_mapped_by_its_format(tmp_path):
    # A flashpack_v3 footer that also holds another writer's "macroblocks" key: its one block
    # starts at byte 0 whatever that key says, for get_tensor as for load_file.
    import json
    import struct

    values = random_tensor((32768,), torch.float32, seed=9)  # 128 KiB: mapped
    footer = json.dumps({"format": "flashpack_v3", "target_dtype": "float32", "align_bytes": 128,
                         "total_elems": 32768, "index": [{"name": "w", "shape": [32768], "offset": 0, "length": 32768}],
                         "macroblocks": [{"dtype": "float32", "offset_bytes": 4096, "length_bytes": 131072,
                                          "length_elems": 32768}]}).encode()
    path = tmp_path / "v3.flashpack"
    path.write_bytes(values.numpy().tobytes() + footer + struct.pack("<Q", len(footer)) + b"FLASHPK\0")
    assert_same(flashpack_ops.load_file(path)["w"], values)
    with flashpack_ops.safe_open(path, framework="pt") as f:
        assert_same(f.get_tensor("w"), values)


MAPPED_AT_EXIT = """
import sys
import torch
import flashpack_ops

class Holder:  # reads its tensor when the interpreter tears it down, after the atexit handlers
    def __init__(self, tensor):
        self.tensor = tensor

    def __del__(self):
        print(int(self.tensor.sum().item()), flush=True)

holder = Holder(flashpack_ops.safe_open(sys.argv[1], framework="pt").get_tensor("w"))
"""


def test_a_mapped_tensor_stays_readable_until_the_interpreter_ends(tmp_path):
    import os
    import subprocess
    import sys

    path = tmp_path / "w.flashpack"
    flashpack_ops.save_file({"w": torch.ones(1 << 16, dtype=torch.int32)}, path)  # 256 KiB: mapped
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
    run = subprocess.run([sys.executable, "-c", MAPPED_AT_EXIT, str(path)], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == [str(1 << 16)]
