"""Files are interchangeable with the reference `flashpack` package (0.4.x), both ways."""

import os
import re

import pytest
import torch

import flashpack_ops
from conftest import assert_same, assert_same_dict, random_tensor

flashpack = pytest.importorskip("flashpack")
from flashpack.deserialization import iterate_from_flash_tensor, read_flashpack_file  # noqa: E402
from flashpack.deserialization import revert_from_file as reference_revert  # noqa: E402

# The dtypes the reference can store (it maps each to a numpy dtype; it has no 4-bit,
# sub-byte or bits dtypes).
REFERENCE_DTYPES = [
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32,
    torch.uint64, torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex32, torch.complex64,
    torch.complex128, torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2, torch.float8_e5m2fnuz,
] + ([torch.float8_e8m0fnu] if hasattr(torch, "float8_e8m0fnu") else [])  # torch 2.7 and newer


def mixed_state_dict():
    return {
        "embed.weight": random_tensor((64, 32), torch.bfloat16, seed=1),
        "layers.0.attn.q.weight": random_tensor((32, 32), torch.bfloat16, seed=2),
        "layers.0.norm.weight": torch.ones(32, dtype=torch.float32),
        "layers.0.mlp.scale": random_tensor((7,), torch.float8_e4m3fn, seed=3),
        "position_ids": torch.arange(16, dtype=torch.int64),
        "mask": torch.rand(5) > 0.5,
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.empty(0, 3),
    }


def read_with_reference(path):
    storage, meta = read_flashpack_file(path)
    return {name: view.clone() for name, view in iterate_from_flash_tensor(storage, meta)}


# --- reference writes, we read --------------------------------------------------------------

@pytest.mark.parametrize("dtype", REFERENCE_DTYPES, ids=str)
def test_reference_single_dtype_v3_file_loads(dtype, tmp_file):
    tensors = {"a": random_tensor((3, 5), dtype, seed=1), "b": random_tensor((17,), dtype, seed=2),
               "c": random_tensor((), dtype, seed=3), "d": random_tensor((2, 0), dtype, seed=4)}
    flashpack.pack_to_file(tensors, tmp_file, target_dtype=None)
    assert flashpack_ops.read_metadata(tmp_file)["format"] == "flashpack_v3"
    loaded = flashpack_ops.load_file(tmp_file)
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert_same(loaded[name], t, name)


def test_reference_multi_dtype_v4_file_loads(tmp_file):
    tensors = mixed_state_dict()
    flashpack.pack_to_file(tensors, tmp_file, target_dtype=None)
    assert flashpack_ops.read_metadata(tmp_file)["format"] == "flashpack_v4"
    loaded = flashpack_ops.load_file(tmp_file)
    # The reference orders tensors largest first; the dict follows the file's index.
    assert list(loaded) == [r["name"] for r in flashpack.get_flashpack_file_metadata(tmp_file)["index"]]
    for name, t in tensors.items():
        assert_same(loaded[name], t, name)


def test_reference_target_dtype_coercion_loads(tmp_file):
    tensors = {"w": torch.randn(8, 8), "b": torch.randn(8, dtype=torch.float64), "h": torch.randn(4).half()}
    flashpack.pack_to_file(tensors, tmp_file, target_dtype=torch.bfloat16)
    loaded = flashpack_ops.load_file(tmp_file)
    for name, t in tensors.items():
        assert_same(loaded[name], t.to(torch.bfloat16), name)


@pytest.mark.parametrize("align", [0, 64, 128, 4096])
def test_reference_alignments_load(align, tmp_file):
    tensors = mixed_state_dict()
    flashpack.pack_to_file(tensors, tmp_file, target_dtype=None, align_bytes=align)
    loaded = flashpack_ops.load_file(tmp_file, copy=align == 64)
    for name, t in tensors.items():
        assert_same(loaded[name], t, name)


def test_reference_model_file_assigns_into_our_model(tmp_file):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    flashpack.pack_to_file(model, tmp_file, target_dtype=None)
    fresh = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    flashpack_ops.assign_from_file(fresh, tmp_file)
    x = torch.randn(3, 8)
    assert torch.equal(fresh(x), model(x))


# --- we write, the reference reads -----------------------------------------------------------

@pytest.mark.parametrize("dtype", REFERENCE_DTYPES, ids=str)
def test_our_file_loads_in_reference(dtype, tmp_file):
    tensors = {"a": random_tensor((3, 5), dtype, seed=1), "b": random_tensor((17,), dtype, seed=2),
               "d": random_tensor((2, 0), dtype, seed=4)}
    flashpack_ops.save_file(tensors, tmp_file)
    assert_same_dict(read_with_reference(tmp_file), tensors)


def test_our_mixed_file_loads_in_reference(tmp_file):
    tensors = mixed_state_dict()
    flashpack_ops.save_file(tensors, tmp_file)
    loaded = read_with_reference(tmp_file)
    assert list(loaded) == list(tensors)
    for name, t in tensors.items():
        # The reference returns 0-d tensors as shape (1,).
        expected = t.reshape(1) if t.dim() == 0 else t
        assert_same(loaded[name], expected, name)
    meta = flashpack.get_flashpack_file_metadata(tmp_file)
    assert meta["format"] == "flashpack_v4"
    assert flashpack.is_flashpack_file(tmp_file)


def test_our_tied_file_loads_in_reference(tmp_file):
    embed = torch.randn(50, 8)
    tensors = {"embed.weight": embed, "lm_head.weight": embed, "norm": torch.ones(8)}
    flashpack_ops.save_file(tensors, tmp_file)
    assert_same_dict(read_with_reference(tmp_file), tensors)


def test_our_target_dtype_and_alignment_load_in_reference(tmp_file):
    tensors = mixed_state_dict()
    flashpack_ops.save_file(tensors, tmp_file, target_dtype=torch.float16, align_bytes=256)
    loaded = read_with_reference(tmp_file)
    for name, t in tensors.items():
        expected = t.to(torch.float16) if t.is_floating_point() else t
        assert_same(loaded[name], expected.reshape(1) if t.dim() == 0 else expected, name)


def test_reference_assign_from_file_reads_our_model_file(tmp_file):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 4)).eval()
    model[1].running_mean.normal_()
    flashpack_ops.pack_to_file(model, tmp_file)
    fresh = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 4)).eval()
    flashpack.assign_from_file(fresh, tmp_file, strict=True)
    x = torch.randn(3, 8)
    assert torch.equal(fresh(x), model(x))


# --- the reference's block-level API, from flashpack_ops --------------------------------------

@pytest.mark.parametrize("writer", ["ours", "reference_v4", "reference_v3"])
def test_read_flashpack_file_gives_the_reference_blocks(writer, tmp_file):
    tensors = mixed_state_dict()
    if writer == "ours":
        flashpack_ops.save_file(tensors, tmp_file)
    elif writer == "reference_v4":
        flashpack.pack_to_file(tensors, tmp_file, target_dtype=None)
    else:
        tensors = {k: t for k, t in tensors.items() if t.dtype == torch.bfloat16}
        flashpack.pack_to_file(tensors, tmp_file, target_dtype=None)
    storage, meta = flashpack_ops.read_flashpack_file(tmp_file)
    ref_storage, ref_meta = read_flashpack_file(tmp_file)
    assert meta == ref_meta
    assert len(storage) == len(ref_storage) and storage.device == torch.device("cpu")
    for k in range(len(storage)):
        assert_same(storage.block(k), ref_storage.block(k), f"block {k}")
    # The named tensors are the saved ones, 0-d tensors included, each a view of its block.
    loaded = dict(flashpack_ops.iterate_from_flash_tensor(storage, meta))
    assert list(loaded) == [r["name"] for r in meta["index"]]
    for name, t in tensors.items():
        assert_same(loaded[name], t, name)
        if t.numel():
            block = storage.block(next(r.get("macroblock", 0) for r in meta["index"] if r["name"] == name))
            assert loaded[name].untyped_storage().data_ptr() == block.untyped_storage().data_ptr()


def test_iterate_from_flash_tensor_skips_ignored_names_and_takes_a_single_block(tmp_file):
    tensors = {"a.weight": torch.randn(3, 4), "a.bias": torch.randn(4), "b.weight": torch.randn(2, 2)}
    flashpack_ops.save_file(tensors, tmp_file)
    storage, meta = flashpack_ops.read_flashpack_file(tmp_file)
    kept = dict(flashpack_ops.iterate_from_flash_tensor(storage.block(0), meta, ignore_prefixes=["b."],
                                                        ignore_suffixes=[".bias"]))
    assert list(kept) == ["a.weight"]
    assert_same(kept["a.weight"], tensors["a.weight"])


@pytest.mark.parametrize("change, problem", [
    ({"macroblock": 3}, "is in macroblock 3, but there are 1 blocks"),
    ({"offset": 10**6}, "does not fit macroblock 0"),
    ({"shape": [5, 5]}, "does not fit macroblock 0"),
])
def test_iterate_from_flash_tensor_refuses_entries_that_do_not_fit(change, problem, tmp_file):
    flashpack_ops.save_file({"w": torch.randn(3, 4)}, tmp_file)
    storage, meta = flashpack_ops.read_flashpack_file(tmp_file)
    meta["index"][0].update(change)
    with pytest.raises(ValueError, match=f"index entry 'w' .*{problem}"):
        list(flashpack_ops.iterate_from_flash_tensor(storage, meta))


def test_read_flashpack_file_names_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.flashpack"):
        flashpack_ops.read_flashpack_file(str(tmp_path / "nothing.flashpack"))


def test_read_flashpack_file_returns_the_entries_of_the_metadata_passed_as_the_reference_does(tmp_file):
    tensors = mixed_state_dict()
    flashpack_ops.save_file(tensors, tmp_file)
    meta = flashpack_ops.get_flashpack_file_metadata(tmp_file)
    chosen = dict(meta, index=[r for r in meta["index"] if r["name"].startswith("layers.")][::-1])
    storage, ours = flashpack_ops.read_flashpack_file(tmp_file, metadata=chosen)
    ref_storage, theirs = read_flashpack_file(tmp_file, metadata=chosen)
    loaded = dict(flashpack_ops.iterate_from_flash_tensor(storage, ours))
    assert list(loaded) == [name for name, _ in iterate_from_flash_tensor(ref_storage, theirs)]
    assert list(loaded) == ["layers.0.mlp.scale", "layers.0.norm.weight", "layers.0.attn.q.weight"]
    for name, tensor in loaded.items():
        assert_same(tensor, tensors[name], name)


def test_read_flashpack_file_takes_empty_metadata_as_none_as_the_reference_does(tmp_file):
    flashpack_ops.save_file(mixed_state_dict(), tmp_file)
    _, ours = flashpack_ops.read_flashpack_file(tmp_file, metadata={})
    _, theirs = read_flashpack_file(tmp_file, metadata={})
    assert [r["name"] for r in ours["index"]] == [r["name"] for r in theirs["index"]] == list(mixed_state_dict())


@pytest.mark.parametrize("change, problem", [
    ({"name": "other"}, "lists 'other', which the file does not hold"),
    ({"offset": 3, "shape": [1]}, "gives 'position_ids' another shape, offset than the file's footer"),
])
def test_read_flashpack_file_checks_the_metadata_passed_against_the_file(change, problem, tmp_file):
    # Passed on as given, a wrong entry would read other bytes that fit the block.
    flashpack_ops.save_file(mixed_state_dict(), tmp_file)
    meta = flashpack_ops.get_flashpack_file_metadata(tmp_file)
    entry = dict(next(r for r in meta["index"] if r["name"] == "position_ids"), **change)
    with pytest.raises(ValueError, match=problem):
        flashpack_ops.read_flashpack_file(tmp_file, metadata=dict(meta, index=[entry]))


def test_revert_from_file_gives_tied_names_memory_of_their_own(tmp_file):
    # As the reference's revert gives them for a file it wrote (one copy per name).
    from safetensors.torch import load_file, save_file

    embed = torch.randn(50, 8)
    tensors = {"embed.weight": embed, "lm_head.weight": embed, "norm": torch.ones(8)}
    flashpack.pack_to_file(tensors, tmp_file + ".reference", target_dtype=None)
    flashpack_ops.save_file(tensors, tmp_file)  # stored once
    for reverted in (flashpack_ops.revert_from_file(tmp_file), flashpack_ops.revert_from_file(tmp_file + ".reference"),
                     reference_revert(tmp_file + ".reference")):
        assert_same_dict(reverted, tensors)
        assert reverted["embed.weight"].data_ptr() != reverted["lm_head.weight"].data_ptr()
    reverted = flashpack_ops.revert_from_file(tmp_file)
    reverted["lm_head.weight"].zero_()
    assert_same(reverted["embed.weight"], embed)
    save_file(flashpack_ops.revert_from_file(tmp_file), tmp_file + ".safetensors")  # refuses shared tensors
    assert_same_dict(load_file(tmp_file + ".safetensors"), tensors)


def test_is_flashpack_file_takes_what_the_reference_takes(tmp_file):
    flashpack_ops.save_file({"w": torch.ones(2)}, tmp_file)
    for path in (None, tmp_file + ".missing", tmp_file.encode(), tmp_file):
        assert flashpack_ops.is_flashpack_file(path) == flashpack.is_flashpack_file(path), path
    assert flashpack_ops.get_flashpack_file_metadata(tmp_file.encode()) == flashpack.get_flashpack_file_metadata(tmp_file)


def test_pack_to_file_name_order_picks_and_orders_the_names_as_the_reference_does(tmp_file):
    # name_order: only the names listed (those the state dict has), in that order.
    tensors = mixed_state_dict()
    order = ["position_ids", "not.in.the.dict", "embed.weight", "layers.0.norm.weight", "scalar"]
    flashpack_ops.pack_to_file(tensors, tmp_file, name_order=order)
    flashpack.pack_to_file(tensors, tmp_file + ".reference", target_dtype=None, name_order=order)
    expected = {name: tensors[name] for name in order if name in tensors}
    ours = flashpack_ops.load_file(tmp_file)
    assert_same_dict(ours, expected)
    assert [r["name"] for r in flashpack_ops.read_metadata(tmp_file)["index"]] == list(expected)
    theirs = flashpack_ops.load_file(tmp_file + ".reference")
    assert list(theirs) == list(ours)


def test_pack_to_file_with_nothing_to_write_says_the_references_words_and_names_the_file(tmp_file):
    tensors = mixed_state_dict()
    for given, name_order, why in [({}, None, r"\)"), (tensors, ["not.in.the.dict"], ": name_order names none")]:
        with pytest.raises(ValueError) as ours:
            flashpack_ops.pack_to_file(given, tmp_file, name_order=name_order)
        with pytest.raises(ValueError) as theirs:
            flashpack.pack_to_file(given, tmp_file, target_dtype=None, name_order=name_order)
        assert str(ours.value).startswith(str(theirs.value))
        assert re.search(rf"nothing to write to {re.escape(tmp_file)}{why}", str(ours.value)), ours.value
    with pytest.raises(TypeError, match=rf"cannot save {re.escape(tmp_file)}: expected a state dict or an nn.Module, "
                                        "got NoneType"):
        flashpack_ops.pack_to_file(None, tmp_file)
    assert not os.path.exists(tmp_file)


def test_every_reader_takes_a_v3_footer_by_its_format(tmp_path):
    # A flashpack_v3 footer that also holds another writer's "macroblocks" (a float16 block at
    # byte 4096): the file is one float32 block at byte 0, as the C++ reader and the reference
    # take it, for every reader of the footer.
    import json
    import struct

    from flashpack_ops.distributed import _layout
    from flashpack_ops.integrations._hub import file_floating_dtype

    values = torch.arange(32768, dtype=torch.float32)
    footer = json.dumps({"format": "flashpack_v3", "target_dtype": "float32", "align_bytes": 128,
                         "total_elems": 32768,
                         "index": [{"name": "w", "shape": [32768], "offset": 0, "length": 32768}],
                         "macroblocks": [{"dtype": "float16", "offset_bytes": 4096, "length_bytes": 1 << 20,
                                          "length_elems": 1 << 19}]})
    path = str(tmp_path / "v3.flashpack")
    with open(path, "wb") as f:
        f.write(values.numpy().tobytes() + footer.encode() + struct.pack("<Q", len(footer)) + b"FLASHPK\0")
    assert_same(flashpack_ops.load_file(path)["w"], values)
    with flashpack_ops.safe_open(path, framework="pt") as opened:
        assert_same(opened.get_tensor("w"), values)
    assert file_floating_dtype(path) == torch.float32
    blocks, entries = _layout(footer)
    assert [(b.dtype, b.offset) for b in blocks] == [(torch.float32, 0)] and entries[0].block == 0
    pytest.importorskip("diffusers")  # the pipeline integration's reader needs it
    from flashpack_ops.integrations.diffusers.pipeline import _flashpack_tensors

    assert _flashpack_tensors(path) == [(32768, torch.float32)]


@pytest.mark.parametrize("writer", ["ours", "reference"])
def test_a_loaded_file_with_an_empty_tensor_saves_with_torch_save(writer, tmp_file):
    # The reference places an empty tensor at the end of its block, where the next block (of
    # another dtype) starts; ours does the same when a block fills whole 4096-byte pages.
    import io

    tensors = {"w": torch.ones(1024), "empty": torch.empty(0, 3), "ids": torch.arange(4)}
    if writer == "ours":
        flashpack_ops.save_file(tensors, tmp_file)
    else:
        flashpack.pack_to_file(tensors, tmp_file, target_dtype=None)
    for copy in (False, True):
        loaded = flashpack_ops.load_file(tmp_file, copy=copy)
        buffer = io.BytesIO()
        torch.save(loaded, buffer)
        buffer.seek(0)
        assert_same_dict(torch.load(buffer), tensors)
