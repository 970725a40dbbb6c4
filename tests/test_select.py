"""Loading some entries of a file (``names=``): only their bytes are read, each comes back
bit for bit, ties stay ties, through every way in (wrapper, op, TorchScript, compile)."""

import os
import re
from typing import Dict

import pytest
import torch

import flashpack_ops
from conftest import assert_same, random_tensor

MiB = 1 << 20


def model_dict():
    """Two dtypes, a tie, a 0-d and an empty tensor, and a 32 MiB entry between small ones."""
    gen = torch.Generator().manual_seed(0)

    def normal(*shape, dtype=torch.float32):
        return torch.randn(shape, generator=gen).to(dtype)

    embed = normal(64, 48, dtype=torch.bfloat16)
    return {
        "embed": embed,
        "layer0.w": normal(128, 64),
        "layer0.b": normal(128),
        "big": normal(8 * MiB),
        "layer1.w": normal(128, 64),
        "scale": normal(),
        "empty": normal(0, 4, dtype=torch.bfloat16),
        "head": embed,
        "ids": random_tensor((33,), torch.int64, 8),
    }


@pytest.fixture
def saved(tmp_path):
    tensors = model_dict()
    path = str(tmp_path / "m.flashpack")
    flashpack_ops.save_file(tensors, path, checksum=True)
    return path, tensors


SELECTIONS = [
    ["layer0.w"],
    ["head"],
    ["embed", "head"],
    ["ids", "layer0.b", "embed"],
    ["scale", "empty"],
    ["layer0.w", "layer1.w"],
    list(model_dict()),
]


@pytest.mark.parametrize("copy", [False, True], ids=["mapped", "copy"])
@pytest.mark.parametrize("names", SELECTIONS, ids=lambda names: "+".join(names) if len(names) < 5 else "all")
def test_the_named_entries_come_back_in_file_order(saved, names, copy):
    path, tensors = saved
    loaded = flashpack_ops.load_file(path, names=names, copy=copy)
    assert list(loaded) == [name for name in tensors if name in names]
    for name, t in loaded.items():
        assert_same(t, tensors[name], name)
    if {"embed", "head"} <= set(names):
        assert loaded["embed"].untyped_storage().data_ptr() == loaded["head"].untyped_storage().data_ptr()


def test_the_op_takes_names_in_torchscript_and_python(saved):
    path, tensors = saved

    @torch.jit.script
    def load_two(path: str) -> Dict[str, torch.Tensor]:
        return torch.ops.flashpack.load(path, torch.device("cpu"), names=["layer0.b", "layer0.w"])

    loaded = load_two(path)
    assert list(loaded) == ["layer0.w", "layer0.b"]
    for name, t in loaded.items():
        assert_same(t, tensors[name], name)
    listed = torch.ops.flashpack.load_list(path, "cpu", names=["ids", "embed", "head"], distinct=True)
    assert len(listed) == 2  # head is embed's tie, left out by distinct
    assert_same(listed[0], tensors["embed"])
    assert_same(listed[1], tensors["ids"])


def read_bytes() -> int:
    """Bytes this process has read with read()/pread() so far, page cache or not."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs /proc/self/io")
def test_only_the_named_bytes_are_read(saved):
    path, tensors = saved
    size = os.path.getsize(path)
    before = read_bytes()
    flashpack_ops.load_file(path, copy=True)
    whole = read_bytes() - before
    before = read_bytes()
    # The 32 MiB entry lies between them: more than the gap that is read through.
    small = flashpack_ops.load_file(path, copy=True, names=["layer0.b", "layer1.w", "ids"])
    part = read_bytes() - before
    assert whole >= size - 4 * MiB
    assert part < 4 * MiB, f"read {part} bytes of a {size}-byte file for three small entries"
    assert_same(small["layer1.w"], tensors["layer1.w"])


def test_verify_checks_the_whole_file(saved):
    path, tensors = saved
    meta = flashpack_ops.read_metadata(path)
    big = next(e for e in meta["index"] if e["name"] == "big")
    block = meta["macroblocks"][big["macroblock"]]
    with open(path, "r+b") as f:
        f.seek(block["offset_bytes"] + big["offset"] * 4 + 1000)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))
    # The flipped byte is in an entry not asked for: it is not read...
    assert_same(flashpack_ops.load_file(path, names=["layer0.w"])["layer0.w"], tensors["layer0.w"])
    # ...unless the file is verified, which covers all of it.
    for copy in (False, True):
        with pytest.raises(ValueError, match="checksum"):
            flashpack_ops.load_file(path, names=["layer0.w"], verify=True, copy=copy)


@pytest.mark.parametrize("names, listed", [
    (["nope"], "has no entry 'nope'"),
    (["embed", "x", "y", "x"], "has no entries 'x', 'y' "),
    ([f"n{k}" for k in range(7)], "'n4' and 2 more"),
    (["b", "embed", "a", "b", "c", "a", "d", "e", "f"], "has no entries 'b', 'a', 'c', 'd', 'e' and 1 more "),
    # Another model's index: each missing name counted once, without a search per name.
    ([f"other.{k}" for k in range(100_000)] * 2, "'other.4' and 99995 more"),
])
def test_a_name_the_file_lacks_is_named(saved, names, listed):
    path, _ = saved
    for load in (lambda: flashpack_ops.load_file(path, names=names),
                 lambda: torch.ops.flashpack.load_list(path, names=names)):
        with pytest.raises(ValueError, match=re.escape(listed)) as error:
            load()
        assert f"'{path}' has no entr" in str(error.value)


def test_names_must_be_a_list_of_str(saved):
    path, _ = saved
    with pytest.raises(TypeError, match="not the str 'embed'"):
        flashpack_ops.load_file(path, names="embed")
    with pytest.raises(TypeError, match="must all be str"):
        flashpack_ops.load_file(path, names=["embed", 3])


def test_an_empty_selection_loads_nothing(saved):
    path, _ = saved
    assert flashpack_ops.load_file(path, names=[]) == {}


def test_reference_files_load_in_part(tmp_path):
    flashpack = pytest.importorskip("flashpack")
    tensors = {"a": torch.randn(100, 3), "b": torch.randn(7), "c": torch.randn(5, 5)}
    path = str(tmp_path / "ref.flashpack")
    flashpack.pack_to_file(tensors, path, target_dtype=torch.float32, silent=True)
    loaded = flashpack_ops.load_file(path, names=["c", "a"])
    assert list(loaded) == ["a", "c"]
    assert torch.equal(loaded["a"], tensors["a"]) and torch.equal(loaded["c"], tensors["c"])


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_a_compiled_load_of_some_names(saved, backend):
    path, tensors = saved

    @torch.compile(backend=backend, fullgraph=True)
    def head_logits(x):
        w = flashpack_ops.load_file(path, names=["head", "embed"])
        return x @ w["head"].float().t(), w

    x = torch.randn(2, 48)
    out, w = head_logits(x)
    assert torch.equal(out, x @ tensors["head"].float().t())
    assert sorted(w) == ["embed", "head"] and w["embed"] is w["head"]


def test_a_compiled_load_refuses_a_file_saved_since_with_another_layout(saved):
    path, tensors = saved
    compiled = torch.compile(lambda: flashpack_ops.load_file(path, names=["ids"]), fullgraph=True)
    assert_same(compiled()["ids"], tensors["ids"])
    # An entry the load does not ask for changes shape: the names are still read from
    # the file as traced, so the whole file must still look as it did.
    changed = dict(tensors, big=torch.zeros(3))
    flashpack_ops.save_file(changed, path)
    with pytest.raises(ValueError, match="no longer has the layout this compiled code was traced with"):
        compiled()


def test_a_compiled_load_of_a_missing_name_raises_the_eager_error(saved):
    path, _ = saved
    compiled = torch.compile(lambda: flashpack_ops.load_file(path, names=["nope"]))
    with pytest.raises(ValueError, match="has no entry 'nope'"):
        compiled()


@pytest.mark.parametrize("op", ["load", "load_list"])
def test_opcheck_with_names(saved, op):
    path, _ = saved
    torch.library.opcheck(getattr(torch.ops.flashpack, op).default, (path,), {"names": ["ids", "embed", "head"]}
                          if op == "load" else {"names": ["ids", "embed"]},
                          test_utils=("test_schema", "test_faketensor"))


def test_a_compiled_load_of_no_names_returns_nothing(saved):
    path, _ = saved
    assert torch.compile(lambda: flashpack_ops.load_file(path, names=[]), fullgraph=True)() == {}
