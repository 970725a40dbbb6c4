"""Round trips on the CPU: every dtype and shape, ties, order, zero-copy and copy modes."""

import gc
import os
import shlex
import shutil
import stat
import subprocess
import sys

import pytest
import torch

import flashpack_ops
from conftest import STORABLE_DTYPES, assert_same, assert_same_dict, random_tensor

SHAPES = [(), (0,), (3, 0, 2), (1,), (7,), (5, 3), (2, 3, 4, 5), (1, 1, 1, 1, 1, 1, 1, 1)]


def _save_load(tensors, path, through_ops):
    if through_ops:
        torch.ops.flashpack.save(tensors, path)
        return torch.ops.flashpack.load(path, "cpu")
    flashpack_ops.save_file(tensors, path)
    return flashpack_ops.load_file(path)


def test_the_dtypes_tested_are_every_dtype_this_torch_has():
    # A dtype a newer torch adds fails here until it is stored (or refused, like the
    # quantized ones, with a reason).
    quantized = {getattr(torch, name) for name in ("qint8", "quint8", "qint32", "quint4x2", "quint2x4")
                 if hasattr(torch, name)}
    every = {getattr(torch, name) for name in dir(torch) if isinstance(getattr(torch, name), torch.dtype)}
    assert every - quantized == set(STORABLE_DTYPES)


@pytest.mark.parametrize("through_ops", [True, False], ids=["torch.ops", "wrappers"])
@pytest.mark.parametrize("dtype", STORABLE_DTYPES, ids=str)
def test_every_dtype_and_shape(dtype, through_ops, tmp_file):
    tensors = {f"t{k}": random_tensor(shape, dtype, seed=k) for k, shape in enumerate(SHAPES)}
    loaded = _save_load(tensors, tmp_file, through_ops)
    assert_same_dict(loaded, tensors)
    assert loaded["t0"].dim() == 0


def test_all_dtypes_in_one_file(tmp_file):
    tensors = {str(dtype): random_tensor((3, 5), dtype, seed=k) for k, dtype in enumerate(STORABLE_DTYPES)}
    flashpack_ops.save_file(tensors, tmp_file)
    meta = flashpack_ops.read_metadata(tmp_file)
    assert meta["format"] == "flashpack_v4"
    assert len(meta["macroblocks"]) == len(STORABLE_DTYPES)
    assert_same_dict(flashpack_ops.load_file(tmp_file), tensors)


def test_blocks_are_page_aligned_and_tensors_128_aligned(tmp_file):
    tensors = {"a": torch.randn(33), "b": torch.randn(7).half(), "c": torch.randn(5), "d": torch.ones(3, dtype=torch.int8)}
    flashpack_ops.save_file(tensors, tmp_file)
    meta = flashpack_ops.read_metadata(tmp_file)
    for block in meta["macroblocks"]:
        assert block["offset_bytes"] % 4096 == 0
    for rec in meta["index"]:
        esize = tensors[rec["name"]].element_size()
        assert (rec["offset"] * esize) % 128 == 0


def test_order_is_kept(tmp_file):
    names = ["z", "a", "m", "b.weight", "a.bias", "0"]
    tensors = {n: torch.full((k + 1,), float(k)) for k, n in enumerate(names)}
    tensors["mixed"] = torch.arange(3)
    flashpack_ops.save_file(tensors, tmp_file)
    assert list(flashpack_ops.load_file(tmp_file)) == names + ["mixed"]
    assert [r["name"] for r in flashpack_ops.read_metadata(tmp_file)["index"]] == names + ["mixed"]


def test_unicode_and_odd_names(tmp_file):
    tensors = {"": torch.ones(1), 'quote"back\\slash': torch.ones(2), "new\nline\ttab": torch.ones(3),
               "ünïcödé.层.🙂": torch.ones(4), "\x01ctrl": torch.ones(5)}
    flashpack_ops.save_file(tensors, tmp_file)
    assert_same_dict(flashpack_ops.load_file(tmp_file), tensors)


@pytest.mark.parametrize("make", [
    lambda: torch.randn(6, 4).t(),
    lambda: torch.randn(5, 8)[:, ::3],
    lambda: torch.randn(4, 1, 3).expand(4, 6, 3),
    lambda: torch.randn(10)[2:7],
    lambda: torch.randn(3, 4, 5).permute(2, 0, 1),
], ids=["transposed", "strided", "expanded", "offset-slice", "permuted"])
def test_non_contiguous_inputs_are_saved_as_their_values(make, tmp_file):
    t = make()
    flashpack_ops.save_file({"t": t}, tmp_file)
    loaded = flashpack_ops.load_file(tmp_file)["t"]
    assert loaded.is_contiguous()
    assert_same(loaded, t.contiguous())


@pytest.mark.parametrize("dtype", STORABLE_DTYPES, ids=str)
def test_non_contiguous_every_dtype(dtype, tmp_file):
    base = random_tensor((4, 6), dtype, seed=3)
    flashpack_ops.save_file({"t": base.t()}, tmp_file)
    # The expected values go through a same-width integer view: some dtypes (uint4, ...)
    # have no copy kernel of their own.
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}.get(base.element_size())
    expected = base.view(width).t().contiguous().view(dtype) if width else base.t().contiguous()
    assert_same(flashpack_ops.load_file(tmp_file)["t"], expected)


def test_tied_tensors_are_stored_once_and_share_memory(tmp_file):
    embed = torch.randn(1000, 64)
    tensors = {"embed.weight": embed, "layer.weight": torch.randn(64, 64), "lm_head.weight": embed}
    flashpack_ops.save_file(tensors, tmp_file)
    meta = flashpack_ops.read_metadata(tmp_file)
    recs = {r["name"]: r for r in meta["index"]}
    assert recs["embed.weight"]["offset"] == recs["lm_head.weight"]["offset"]
    assert meta["macroblocks"][0]["length_elems"] < 2 * 1000 * 64  # stored once
    loaded = flashpack_ops.load_file(tmp_file)
    assert_same_dict(loaded, tensors)
    assert loaded["embed.weight"].data_ptr() == loaded["lm_head.weight"].data_ptr()
    loaded["embed.weight"][0, 0] = 42.0
    assert loaded["lm_head.weight"][0, 0].item() == 42.0


@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "transposed"])
def test_lazy_conj_and_neg_views_are_saved_as_their_values(tmp_file, contiguous):
    # x.conj() and x.imag of it share x's memory and flip signs lazily: the values saved
    # must be the resolved ones, and such a view is not a tie of x.
    x = torch.randn(3, 4, dtype=torch.complex64)
    if not contiguous:
        x = x.t()
    tensors = {"x": x, "conj": x.conj(), "imag_of_conj": x.conj().imag, "imag": x.imag,
               "neg": torch.ops.aten._neg_view(x.real)}
    assert tensors["conj"].is_conj() and tensors["imag_of_conj"].is_neg() and tensors["neg"].is_neg()
    flashpack_ops.save_file(tensors, tmp_file)
    expected = {k: v.resolve_conj().resolve_neg().contiguous() for k, v in tensors.items()}
    loaded = flashpack_ops.load_file(tmp_file)
    assert_same_dict(loaded, expected)
    assert not loaded["conj"].is_conj() and not loaded["imag_of_conj"].is_neg()
    offsets = [r["offset"] for r in flashpack_ops.read_metadata(tmp_file)["index"] if r["macroblock"] == 0]
    assert len(set(offsets)) == len(offsets)


def test_views_with_different_shapes_are_stored_separately(tmp_file):
    base = torch.randn(4, 8)
    tensors = {"base": base, "flat": base.view(-1), "half": base[:2]}
    flashpack_ops.save_file(tensors, tmp_file)
    assert_same_dict(flashpack_ops.load_file(tmp_file), {k: v.contiguous() for k, v in tensors.items()})


def test_target_dtype_converts_every_floating_tensor(tmp_file):
    tensors = {"w": torch.randn(8, 8), "b": torch.randn(8).double(), "h": torch.randn(3).half()}
    flashpack_ops.save_file(tensors, tmp_file, target_dtype=torch.bfloat16)
    loaded = flashpack_ops.load_file(tmp_file)
    assert [b["dtype"] for b in flashpack_ops.read_metadata(tmp_file)["macroblocks"]] == ["bfloat16"]
    for name, t in tensors.items():
        assert_same(loaded[name], t.to(torch.bfloat16), name)


@pytest.mark.parametrize("align", [0, 1, 64, 128, 4096, 100])
def test_alignment_option(align, tmp_file):
    tensors = {"a": torch.randn(3), "b": torch.randn(5), "c": torch.arange(3, dtype=torch.int16)}
    flashpack_ops.save_file(tensors, tmp_file, align_bytes=align)
    meta = flashpack_ops.read_metadata(tmp_file)
    assert meta["align_bytes"] == align
    for rec in meta["index"]:
        esize = tensors[rec["name"]].element_size()
        if align:
            assert (rec["offset"] * esize) % align == 0
    assert_same_dict(flashpack_ops.load_file(tmp_file), tensors)


def test_empty_state_dict(tmp_file):
    flashpack_ops.save_file({}, tmp_file)
    assert flashpack_ops.load_file(tmp_file) == {}


def test_only_empty_tensors(tmp_file):
    tensors = {"a": torch.empty(0), "b": torch.empty(2, 0, dtype=torch.int64)}
    flashpack_ops.save_file(tensors, tmp_file)
    assert_same_dict(flashpack_ops.load_file(tmp_file), tensors)


def test_cpu_load_is_zero_copy_and_never_writes_the_file(tmp_file):
    tensors = {"a": torch.randn(1000), "b": torch.randn(10)}
    flashpack_ops.save_file(tensors, tmp_file)
    before = open(tmp_file, "rb").read()
    loaded = flashpack_ops.load_file(tmp_file)
    a = loaded["a"]
    # Views of one mapping: both blocks' tensors sit inside the same address range, at
    # the file offsets the footer gives.
    meta = flashpack_ops.read_metadata(tmp_file)
    assert loaded["b"].data_ptr() - a.data_ptr() == meta["index"][1]["offset"] * 4
    a.mul_(2)  # writable, copy-on-write
    assert torch.equal(a, tensors["a"] * 2)
    del loaded, a
    assert open(tmp_file, "rb").read() == before
    assert_same_dict(flashpack_ops.load_file(tmp_file), tensors)


def test_mapping_outlives_the_dict_and_the_file_name(tmp_file):
    t = torch.randn(4096)
    flashpack_ops.save_file({"t": t}, tmp_file)
    view = flashpack_ops.load_file(tmp_file)["t"]
    os.remove(tmp_file)
    flashpack_ops.save_file({"t": torch.zeros(4096)}, tmp_file)  # a new file at the same path
    assert_same(view, t)


def test_copy_mode_gives_private_memory(tmp_file):
    tensors = {"a": torch.randn(100_000), "b": torch.arange(17, dtype=torch.int32), "e": torch.empty(0)}
    flashpack_ops.save_file(tensors, tmp_file)
    loaded = flashpack_ops.load_file(tmp_file, copy=True, num_threads=3)
    assert_same_dict(loaded, tensors)
    os.remove(tmp_file)
    assert_same_dict(loaded, tensors)


def test_large_tensor_spans_many_chunks(tmp_file):
    t = random_tensor((40 * 1024 * 1024 + 3,), torch.uint8, seed=9)  # > 32 MiB write and 16 MiB read chunks
    flashpack_ops.save_file({"big": t, "tail": torch.ones(3)}, tmp_file, num_threads=4)
    for copy in (False, True):
        assert_same_dict(flashpack_ops.load_file(tmp_file, copy=copy, num_threads=4), {"big": t, "tail": torch.ones(3)})


def test_requires_grad_and_autograd_tensors_are_saved(tmp_file):
    w = torch.randn(3, 3, requires_grad=True)
    y = w * 2
    flashpack_ops.save_file({"w": w, "y": y}, tmp_file)
    loaded = flashpack_ops.load_file(tmp_file)
    assert_same(loaded["w"], w.detach())
    assert_same(loaded["y"], y.detach())
    assert not loaded["w"].requires_grad


def test_load_accepts_pathlike_and_devices(tmp_path):
    path = tmp_path / "m.flashpack"
    flashpack_ops.save_file({"a": torch.ones(2)}, path)
    assert_same(flashpack_ops.load_file(path, torch.device("cpu"))["a"], torch.ones(2))
    assert_same(torch.ops.flashpack.load(str(path), torch.device("cpu"))["a"], torch.ones(2))
    assert_same(torch.ops.flashpack.load(str(path))["a"], torch.ones(2))


def test_load_list_matches_load(tmp_file):
    tensors = {"a": torch.randn(3), "b": torch.arange(4), "c": torch.randn(2, 2)}
    flashpack_ops.save_file(tensors, tmp_file)
    values = torch.ops.flashpack.load_list(tmp_file, "cpu")
    assert len(values) == 3
    for value, expected in zip(values, tensors.values()):
        assert_same(value, expected)


def test_overwrite_replaces_the_file(tmp_file):
    flashpack_ops.save_file({"a": torch.ones(10)}, tmp_file)
    flashpack_ops.save_file({"b": torch.zeros(3)}, tmp_file)
    assert_same_dict(flashpack_ops.load_file(tmp_file), {"b": torch.zeros(3)})
    assert os.listdir(os.path.dirname(tmp_file)) == [os.path.basename(tmp_file)]


def test_saved_file_has_usual_permissions(tmp_file):
    old = os.umask(0o022)
    try:
        flashpack_ops.save_file({"a": torch.ones(1)}, tmp_file)
    finally:
        os.umask(old)
    assert os.stat(tmp_file).st_mode & 0o777 == 0o644


def test_overwriting_keeps_the_file_permissions(tmp_file):
    flashpack_ops.save_file({"a": torch.ones(1)}, tmp_file)
    os.chmod(tmp_file, 0o600)
    flashpack_ops.save_file({"a": torch.zeros(1)}, tmp_file)
    assert os.stat(tmp_file).st_mode & 0o777 == 0o600


def test_saving_through_a_symlink_replaces_its_target(tmp_path):
    # As open(path, "w") does: the link stays a link and the file it points to is replaced.
    os.mkdir(tmp_path / "store")
    target, link = tmp_path / "store" / "model.flashpack", tmp_path / "model.flashpack"
    flashpack_ops.save_file({"a": torch.ones(2)}, target)
    os.symlink(os.path.join("store", "model.flashpack"), link)
    flashpack_ops.save_file({"a": torch.zeros(2)}, link)
    assert os.path.islink(link)
    assert torch.equal(flashpack_ops.load_file(target)["a"], torch.zeros(2))
    assert sorted(os.listdir(tmp_path / "store")) == ["model.flashpack"]
    assert sorted(os.listdir(tmp_path)) == ["model.flashpack", "store"]


def test_longest_file_names_can_be_saved(tmp_path):
    # 255 bytes is the longest name most filesystems take; the temporary file's name must
    # fit too. A name of multi-byte characters is shortened at a character boundary.
    for name in ["m" * 255, "é" * 127]:
        path = tmp_path / name
        flashpack_ops.save_file({"a": torch.ones(3)}, path)
        assert torch.equal(flashpack_ops.load_file(path)["a"], torch.ones(3))
    assert len(os.listdir(tmp_path)) == 2


def test_many_small_tensors(tmp_file):
    tensors = {f"layers.{k}.weight": torch.full((k % 7 + 1, 3), float(k)) for k in range(20_000)}
    flashpack_ops.save_file(tensors, tmp_file)
    loaded = flashpack_ops.load_file(tmp_file)
    assert len(loaded) == 20_000
    for name in ("layers.0.weight", "layers.12345.weight", "layers.19999.weight"):
        assert_same(loaded[name], tensors[name])
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())


@pytest.mark.parametrize("checksum", [False, True], ids=["plain", "checksum"])
@pytest.mark.parametrize("align", [1, 8, 128])
def test_small_tensors_written_together_leave_their_neighbours_and_padding_alone(tmp_file, align, checksum):
    # Small tensors are written in runs, their padding with them: a tensor that needs a
    # conversion, or a large one, between two of them is written by another thread and must
    # keep its own bytes; the padding reads as zeros.
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for k in range(600):
        n = k % 13 + 1
        if k % 5 == 1:
            value = torch.randint(-100, 100, (3, n), generator=g, dtype=torch.int16).t()  # converted
        elif k % 5 == 3:
            value = torch.randn(n, generator=g).double()  # another block
        elif k % 97 == 0:
            value = torch.randint(-100, 100, (1 << 20,), generator=g, dtype=torch.int16)  # 2 MiB
        else:
            value = torch.randint(-100, 100, (n,), generator=g, dtype=torch.int16)
        tensors[f"t{k}"] = value
    flashpack_ops.save_file(tensors, tmp_file, align_bytes=align, checksum=checksum, num_threads=4)
    loaded = flashpack_ops.load_file(tmp_file)
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    if checksum:
        flashpack_ops.verify_file(tmp_file)
    meta = flashpack_ops.read_metadata(tmp_file)
    data = open(tmp_file, "rb").read()
    used = bytearray(meta["total_payload_bytes"])
    for entry in meta["index"]:
        block = meta["macroblocks"][entry["macroblock"]]
        size = torch.empty(0, dtype=getattr(torch, block["dtype"])).element_size()
        start = block["offset_bytes"] + entry["offset"] * size
        used[start:start + entry["length"] * size] = b"\x01" * (entry["length"] * size)
    padding = bytes(b for b, u in zip(data, used) if not u)
    assert padding == bytes(len(padding))


@pytest.mark.parametrize("durable", [True, False], ids=["durable", "not-durable"])
@pytest.mark.parametrize("checksum", [False, True], ids=["plain", "checksum"])
@pytest.mark.parametrize("align", [1, 8192])
def test_runs_of_small_tensors_longer_than_a_write_slice(tmp_file, align, checksum, durable):
    # Runs of small tensors span up to 8 MiB and go out in writes of 1 MiB at most (durable or
    # checksummed); padding wider than a page splits a write too. Every tensor keeps its bytes.
    g = torch.Generator().manual_seed(1)
    tensors = {f"t{k}": torch.randint(-2**31, 2**31 - 1, ((k * 7919) % 60000 + 1,), generator=g, dtype=torch.int32)
               for k in range(400)}
    flashpack_ops.save_file(tensors, tmp_file, align_bytes=align, checksum=checksum, durable=durable, num_threads=3)
    loaded = flashpack_ops.load_file(tmp_file)
    assert list(loaded) == list(tensors)
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    if checksum:
        flashpack_ops.verify_file(tmp_file)


def test_built_with_cuda_reports_the_build():
    assert flashpack_ops.has_cuda() == bool(torch.ops.flashpack.built_with_cuda())


def test_each_tensor_owns_its_bytes_and_ties_share_a_storage(tmp_path):
    path = str(tmp_path / "m.flashpack")
    embed = torch.randn(256, 64)
    tensors = {"embed": embed, "norm": torch.ones(64), "head": embed, "big": torch.randn(1 << 20)}
    flashpack_ops.save_file(tensors, path)
    loaded = flashpack_ops.load_file(path)
    for name, t in loaded.items():
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), name
        assert t.storage_offset() == 0
    assert loaded["head"].untyped_storage().data_ptr() == loaded["embed"].untyped_storage().data_ptr()
    assert loaded["norm"].untyped_storage().data_ptr() != loaded["embed"].untyped_storage().data_ptr()
    # Saving one loaded tensor writes that tensor, not the whole block it lives in.
    torch.save(loaded["norm"], tmp_path / "norm.pt")
    assert os.path.getsize(tmp_path / "norm.pt") < 16 * 1024
    assert torch.equal(torch.load(tmp_path / "norm.pt"), torch.ones(64))


def test_non_durable_save_writes_the_same_file(tmp_path):
    tensors = {"a": torch.randn(1 << 18), "b": torch.arange(5), "tied": None}
    tensors["tied"] = tensors["a"]
    flashpack_ops.save_file(tensors, tmp_path / "durable.flashpack")
    flashpack_ops.save_file(tensors, tmp_path / "fast.flashpack", durable=False)
    assert (tmp_path / "durable.flashpack").read_bytes() == (tmp_path / "fast.flashpack").read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["durable.flashpack", "fast.flashpack"]


@pytest.mark.parametrize("save", [
    lambda tensors, path, **kw: flashpack_ops.save_file(tensors, path, **kw),
    lambda tensors, path, **kw: torch.ops.flashpack.save(tensors, str(path), **kw),
], ids=["save_file", "op"])
def test_target_dtype_converts_floats_and_keeps_the_rest(tmp_file, save):
    # As nn.Module.to(dtype): position ids past 256, a BatchNorm's int64 counter, masks and
    # complex tensors keep their dtype and values, so the model can load the file back.
    tensors = {"w": torch.randn(4, 4), "h": torch.randn(3).half(), "steps": torch.tensor(7),
               "mask": torch.tensor([True, False]), "z": torch.randn(2, dtype=torch.complex64),
               "ids": torch.arange(4096, dtype=torch.int64)}
    save(tensors, tmp_file, target_dtype=torch.bfloat16)
    loaded = flashpack_ops.load_file(tmp_file)
    expected = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in tensors.items()}
    assert_same_dict(loaded, expected)
    # floating_only=False converts every tensor, as the reference's pack_to_file does...
    save({"steps": tensors["steps"]}, tmp_file, target_dtype=torch.bfloat16, floating_only=False)
    assert flashpack_ops.load_file(tmp_file)["steps"].dtype == torch.bfloat16
    # ...but never a complex one to a real dtype, which would drop its imaginary part.
    with pytest.raises(ValueError, match="tensor 'z' is complex64 and target_dtype bfloat16 is not complex: its "
                                         "imaginary part would be lost"):
        save({"z": tensors["z"]}, tmp_file, target_dtype=torch.bfloat16, floating_only=False)


def test_an_integer_target_dtype_for_the_floating_tensors_is_refused(tmp_file):
    flashpack_ops.save_file({"w": torch.ones(2)}, tmp_file)
    with pytest.raises(ValueError, match="target_dtype int8 is not a floating-point dtype: the floating-point "
                                         "tensors converted to it would lose their values"):
        flashpack_ops.save_file({"w": torch.full((2,), 0.5)}, tmp_file, target_dtype=torch.int8)
    assert torch.equal(flashpack_ops.load_file(tmp_file)["w"], torch.ones(2))


def test_a_dangling_symlink_gets_its_target_created(tmp_path):
    # open(link, "w") creates the file a dangling link names and keeps the link.
    link = tmp_path / "model.flashpack"
    os.symlink(os.path.join("store", "model.flashpack"), link)
    os.mkdir(tmp_path / "store")
    flashpack_ops.save_file({"a": torch.ones(2)}, link)
    assert os.path.islink(link)
    assert torch.equal(flashpack_ops.load_file(tmp_path / "store" / "model.flashpack")["a"], torch.ones(2))


def test_a_symlink_loop_is_an_error(tmp_path):
    os.symlink("b", tmp_path / "a")
    os.symlink("a", tmp_path / "b")
    with pytest.raises(RuntimeError, match="Too many levels of symbolic links"):
        flashpack_ops.save_file({"a": torch.ones(2)}, tmp_path / "a")
    assert os.path.islink(tmp_path / "a") and os.path.islink(tmp_path / "b")
    # Read, the loop is named too, not taken for a missing file.
    for read in (flashpack_ops.load_file, flashpack_ops.read_metadata):
        with pytest.raises(RuntimeError, match=f"cannot open '{tmp_path / 'a'}': Too many levels of symbolic links"):
            read(tmp_path / "a")


def test_a_fifo_is_not_replaced(tmp_path):
    # A rename would put a regular file where the FIFO (or a device node) was.
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(RuntimeError, match="it is not a regular file"):
        flashpack_ops.save_file({"a": torch.ones(2)}, fifo)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert os.listdir(tmp_path) == ["pipe"]


BIND_MOUNTED_SCRIPT = r"""
import os, sys, torch
import flashpack_ops
try:
    flashpack_ops.save_file({"a": torch.full((2,), 7.0)}, sys.argv[1])
except RuntimeError as e:
    print(e)
"""


def test_a_bind_mounted_file_is_an_error_that_says_so(tmp_path):
    # A file mounted on its own (docker run -v file:file) cannot be replaced by a rename: the
    # save fails with EBUSY, saying why, and the mounted file keeps its bytes.
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode:
        pytest.skip("no mount namespace can be made here")
    flashpack_ops.save_file({"a": torch.ones(2)}, tmp_path / "src.flashpack")
    flashpack_ops.save_file({"a": torch.zeros(2)}, tmp_path / "dst.flashpack")
    script = f"mount --bind src.flashpack dst.flashpack && exec {shlex.quote(sys.executable)} -c " \
             f"{shlex.quote(BIND_MOUNTED_SCRIPT)} dst.flashpack"
    out = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, cwd=tmp_path,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "cannot rename the temporary file onto 'dst.flashpack': it is a mount point" in out.stdout, out.stdout
    assert torch.equal(flashpack_ops.load_file(tmp_path / "dst.flashpack")["a"], torch.zeros(2))
    assert sorted(os.listdir(tmp_path)) == ["dst.flashpack", "src.flashpack"]


def test_a_name_too_long_is_refused_before_anything_is_written(tmp_path):
    # The temporary file's name is shortened, so only the rename would meet the limit: after
    # the whole payload was written.
    name_max = os.pathconf(tmp_path, "PC_NAME_MAX")
    with pytest.raises(RuntimeError, match=f"its name is {name_max + 1} bytes long, longer than the {name_max} this "
                                           "file system allows"):
        flashpack_ops.save_file({"a": torch.ones(2)}, tmp_path / ("x" * (name_max + 1)))
    assert os.listdir(tmp_path) == []
    flashpack_ops.save_file({"a": torch.ones(2)}, tmp_path / ("x" * name_max))
    assert torch.equal(flashpack_ops.load_file(tmp_path / ("x" * name_max))["a"], torch.ones(2))


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_a_replaced_file_keeps_its_owner(tmp_file):
    # Rewritten in place, a file keeps its owner; replaced by root, it must too, or its
    # owner could no longer read its own 0600 file.
    flashpack_ops.save_file({"a": torch.ones(1)}, tmp_file)
    os.chown(tmp_file, 65534, 65534)
    os.chmod(tmp_file, 0o600)
    flashpack_ops.save_file({"a": torch.zeros(1)}, tmp_file)
    st = os.stat(tmp_file)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (65534, 65534, 0o600)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write any file")
def test_a_read_only_file_is_not_replaced(tmp_file):
    flashpack_ops.save_file({"a": torch.ones(1)}, tmp_file)
    os.chmod(tmp_file, 0o444)
    with pytest.raises(RuntimeError, match="Permission denied"):
        flashpack_ops.save_file({"a": torch.zeros(1)}, tmp_file)
    assert torch.equal(flashpack_ops.load_file(tmp_file)["a"], torch.ones(1))


def test_target_dtype_by_name_and_device_none(tmp_file):
    # As the command line takes them; None is the default device, the CPU.
    flashpack_ops.save_file({"w": torch.ones(2)}, tmp_file, target_dtype="bfloat16")
    assert flashpack_ops.load_file(tmp_file, device=None)["w"].dtype == torch.bfloat16
    flashpack_ops.save_file({"w": torch.ones(2)}, tmp_file, target_dtype="torch.float16")
    assert flashpack_ops.load_file(tmp_file)["w"].dtype == torch.float16
    with pytest.raises(ValueError, match="target_dtype: 'float99' is not a torch dtype"):
        flashpack_ops.save_file({"w": torch.ones(2)}, tmp_file, target_dtype="float99")


def test_an_unknown_route_is_refused_on_every_device(tmp_file):
    flashpack_ops.save_file({"w": torch.ones(2)}, tmp_file)
    with pytest.raises(ValueError, match=r"unknown route 'bogus' \(expected auto, direct, buffered, mapped or register\)"):
        flashpack_ops.load_file(tmp_file, route="bogus")


@pytest.mark.skipif(torch.cuda.is_available(), reason="says what a machine without a GPU is told")
def test_cuda_without_a_gpu_says_so(tmp_file):
    flashpack_ops.save_file({"w": torch.ones(2)}, tmp_file)
    with pytest.raises(ValueError, match=r"to cuda: no CUDA device is available \(torch.cuda.is_available\(\) is "
                                         r"False\); load to cpu"):
        flashpack_ops.load_file(tmp_file, "cuda")


def test_offsets_past_4_gib_in_a_sparse_file(tmp_path):
    # A uint8 tensor of 2^32 + 200 elements, then float32 tensors whose bytes lie past 2^32:
    # any size or offset cut to 32 bits reads the wrong bytes. The payload is a hole but for
    # the bytes written below, so the file costs no disk space and no time to write.
    import json
    import struct

    big_n, after = (1 << 32) + 200, torch.arange(12, dtype=torch.float32).reshape(3, 4)
    f32_at = (big_n + 4095) // 4096 * 4096
    footer = json.dumps({
        "format": "flashpack_v4", "align_bytes": 128, "total_payload_bytes": f32_at + 256,
        "total_elems": big_n + 64,
        "macroblocks": [{"dtype": "uint8", "offset_bytes": 0, "length_bytes": big_n, "length_elems": big_n},
                        {"dtype": "float32", "offset_bytes": f32_at, "length_bytes": 256, "length_elems": 64}],
        "index": [{"name": "big", "shape": [big_n], "offset": 0, "length": big_n, "macroblock": 0},
                  {"name": "after", "shape": [3, 4], "offset": 32, "length": 12, "macroblock": 1},
                  {"name": "tied", "shape": [3, 4], "offset": 32, "length": 12, "macroblock": 1}]}).encode()
    marks = torch.arange(1, 201, dtype=torch.uint8)  # the big tensor's last 200 bytes
    path = str(tmp_path / "past_4gib.flashpack")
    with open(path, "wb") as f:
        f.truncate(f32_at + 256)
        f.seek(1 << 32)
        f.write(marks.numpy().tobytes())
        f.seek(f32_at + 32 * 4)
        f.write(after.numpy().tobytes())
        f.seek(f32_at + 256)
        f.write(footer + struct.pack("<Q", len(footer)) + b"FLASHPK\0")

    loaded = flashpack_ops.load_file(path)
    assert loaded["big"].shape == (big_n,)
    assert torch.equal(loaded["big"][1 << 32:], marks)
    assert torch.equal(loaded["big"][(1 << 32) - 8:1 << 32], torch.zeros(8, dtype=torch.uint8))
    assert torch.equal(loaded["after"], after) and torch.equal(loaded["tied"], after)
    assert loaded["after"].data_ptr() == loaded["tied"].data_ptr()
    for copy in (False, True):
        assert_same_dict(flashpack_ops.load_file(path, names=["after"], copy=copy), {"after": after})
    with flashpack_ops.safe_open(path, "pt") as f:
        assert torch.equal(f.get_slice("big")[(1 << 32) + 10:(1 << 32) + 20], marks[10:20])
        assert torch.equal(f.get_tensor("after"), after)
    assert torch.equal(torch.ops.flashpack.read_range(path, (1 << 32) + 5, 7, "cpu"), marks[5:12])
    meta = flashpack_ops.read_metadata(path)
    assert meta["macroblocks"][1]["offset_bytes"] == f32_at and meta["index"][0]["length"] == big_n


@pytest.mark.parametrize("checksum", [False, True], ids=["plain", "checksum"])
def test_large_tensors_that_need_converting_are_written_a_slice_of_rows_at_a_time(tmp_file, checksum):
    # A tensor converted on save (transposed, of another dtype, a conj view, 1-D with a step) is
    # converted and written about 32 MiB of rows at a time: every slice lands where its rows go,
    # including a last slice that is short and rows of more than 32 MiB each.
    g = torch.Generator().manual_seed(0)
    tensors = {
        "transposed": torch.randn(3000, 4001, generator=g).t(),  # 4001 rows of 12 KiB
        "stepped": torch.randn(9_000_001, generator=g)[::2],  # 1-D: a "row" is one element
        "to_bf16": torch.randn(5000, 2003, generator=g),  # converted by target_dtype
        "conj": torch.randn(1500, 1500, generator=g, dtype=torch.complex64).conj(),
        "wide_rows": torch.randn(2, 3, (20 << 20) // 4, generator=g).transpose(0, 1),  # rows of 40 MiB
        "small": torch.arange(10, dtype=torch.int32),
    }
    flashpack_ops.save_file(tensors, tmp_file, target_dtype=torch.bfloat16, checksum=checksum)
    loaded = flashpack_ops.load_file(tmp_file, verify=checksum)
    for name, t in tensors.items():
        expected = t.resolve_conj() if t.is_complex() or not t.is_floating_point() else t.bfloat16()
        assert loaded[name].dtype == expected.dtype and torch.equal(loaded[name], expected), name


def test_a_load_of_many_tensors_runs_no_garbage_collection(tmp_file):
    # Each tensor brings two Python objects; the collector's passes over them are put off
    # until the load returns (at most the one that starts as it does), and the collector is
    # left on or off as the caller had it, failed loads included.
    tensors = {f"t{k}": torch.full((2,), k, dtype=torch.int32) for k in range(5000)}
    flashpack_ops.save_file(tensors, tmp_file, durable=False)
    passes = []
    callback = lambda phase, info: passes.append(info["generation"]) if phase == "start" else None  # noqa: E731
    gc.collect()
    gc.callbacks.append(callback)
    try:
        loaded = flashpack_ops.load_file(tmp_file)
    finally:
        gc.callbacks.remove(callback)
    assert_same_dict(loaded, tensors)
    assert len(passes) <= 1, passes
    assert gc.isenabled()
    with pytest.raises(ValueError, match="has no entry"):
        flashpack_ops.load_file(tmp_file, names=["missing"])
    assert gc.isenabled()
    gc.disable()
    try:
        assert_same_dict(flashpack_ops.load_file(tmp_file), tensors)
        assert not gc.isenabled()
    finally:
        gc.enable()
