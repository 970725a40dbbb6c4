"""The flashpack ops under torch.compile, their fake implementations, and torch.library.opcheck.

Compiling is slow on small machines: the models are tiny and there are few compiles.
"""

import os
import re

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import flashpack_ops
from conftest import assert_same_dict

# Small integers: every sum and product below is exact in float32, whatever order a
# compiled kernel adds in, so compiled and eager results can be compared bit for bit.
WEIGHTS = {
    "linear.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4) - 6,
    "linear.bias": torch.tensor([1.0, -2.0, 3.0]),
    "scale": torch.tensor([2.0, 1.0, -1.0], dtype=torch.bfloat16),
    "steps": torch.tensor([3], dtype=torch.int64),
}
X = torch.tensor([[1.0, 0.0, -1.0, 2.0], [0.0, 3.0, 1.0, -1.0]])

ALL_CHECKS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


@pytest.fixture
def weights_file(tmp_path):
    path = str(tmp_path / "weights.flashpack")
    flashpack_ops.save_file(WEIGHTS, path)
    return path


class Loader(nn.Module):
    """Loads its weights from a flashpack file on every call and uses them all."""

    def __init__(self, path: str, device: str = "cpu"):
        super().__init__()
        self.path, self.device = path, device

    def forward(self, x: torch.Tensor):
        w = flashpack_ops.load_file(self.path, self.device)
        y = nn.functional.linear(x, w["linear.weight"], w["linear.bias"]) * w["scale"].float() * w["steps"]
        return y, w


def test_compiled_model_loads_weights_fullgraph(weights_file):
    model = Loader(weights_file)
    expected, _ = model(X)
    y, w = torch.compile(model, fullgraph=True)(X)
    assert torch.equal(y, expected)
    assert_same_dict(w, WEIGHTS)


def test_compiled_save_is_not_dropped(tmp_path):
    path = str(tmp_path / "out.flashpack")

    def save_then_load(x: torch.Tensor):
        flashpack_ops.save_file({"twice": x * 2}, path)  # nothing uses it but the load below
        return flashpack_ops.load_file(path)["twice"] + 1

    # Inductor drops graph nodes whose outputs are unused: the save must run all the same.
    compiled = torch.compile(save_then_load)
    for k in range(2):
        x = X + k
        assert torch.equal(compiled(x), x * 2 + 1)
        assert_same_dict(flashpack_ops.load_file(path), {"twice": x * 2})


def test_save_refuses_fullgraph(tmp_path):
    path = str(tmp_path / "out.flashpack")

    def save(x: torch.Tensor):
        torch.ops.flashpack.save({"x": x}, path)
        return x + 1

    with pytest.raises(Exception, match="flashpack::save writes"):
        torch.compile(save, backend="aot_eager", fullgraph=True)(X)
    assert not os.path.exists(path)


def test_direct_load_op_breaks_the_graph(weights_file):
    def direct(x: torch.Tensor):
        w = torch.ops.flashpack.load(weights_file)
        return x @ w["linear.weight"].T

    assert torch.equal(torch.compile(direct, backend="aot_eager")(X), direct(X))

    torch.compiler.reset()  # else the graph-broken compile above is reused as is
    with pytest.raises(Exception, match="non-Tensor"):
        torch.compile(direct, backend="aot_eager", fullgraph=True)(X)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_a_file_saved_with_another_layout_is_refused_not_misread(backend, tmp_path):
    # The graph zips the names it read when tracing with the tensors of each run: the same
    # two entries saved in the other order loaded with swapped values, without an error.
    path = str(tmp_path / "w.flashpack")
    weight, bias = torch.full((3,), 100.0), torch.full((3,), 2.0)
    flashpack_ops.save_file({"weight": weight, "bias": bias}, path)

    def use(x: torch.Tensor):
        w = flashpack_ops.load_file(path)
        return x * w["weight"] + w["bias"]

    torch.compiler.reset()
    compiled = torch.compile(use, backend=backend, fullgraph=True)
    x = torch.ones(3)
    assert torch.equal(compiled(x), use(x))
    # New values, same layout: read as they are now.
    flashpack_ops.save_file({"weight": weight * 3, "bias": bias}, path)
    assert torch.equal(compiled(x), use(x))
    for other in ({"bias": bias, "weight": weight}, {"weight": torch.ones(5), "bias": torch.ones(5)},
                  {"weight": weight}, {"weight": weight.double(), "bias": bias}):
        flashpack_ops.save_file(other, path)
        with pytest.raises(ValueError, match="no longer has the layout this compiled code was traced with .*"
                                             "torch.compiler.reset\\(\\) for torch.compile, a new torch.export"):
            compiled(x)
    torch.compiler.reset()
    flashpack_ops.save_file({"bias": bias, "weight": weight}, path)
    assert torch.equal(torch.compile(use, backend=backend, fullgraph=True)(x), use(x))


@pytest.mark.parametrize("names", [None, []], ids=["every_entry", "no_entry"])
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_a_load_nothing_uses_still_runs(backend, names, tmp_path):
    # load_file(..., verify=True) as an integrity check: a graph must not drop it. With
    # names=[] nothing is returned, and the load runs eagerly between graphs (Inductor cannot
    # lower an op with no output), so not under fullgraph.
    path = str(tmp_path / "checked.flashpack")
    flashpack_ops.save_file({"w": torch.arange(4096.0)}, path, checksum=True)

    def check_then_compute(x: torch.Tensor):
        flashpack_ops.load_file(path, verify=True, names=names)
        return x + 1

    if backend == "inductor" and names is None and torch.__version__ < (2, 10):
        # Inductor keeps an operator whose result goes unused only from torch 2.10, where it
        # asks torch.fx.node.has_side_effect; docs/entry_points.md says so.
        pytest.xfail("Inductor before torch 2.10 drops a call whose result nothing uses")
    torch.compiler.reset()
    compiled = torch.compile(check_then_compute, backend=backend, fullgraph=names is None)
    assert torch.equal(compiled(X), X + 1)
    block = flashpack_ops.read_metadata(path)["macroblocks"][0]
    with open(path, "r+b") as f:
        f.seek(block["offset_bytes"] + 100)
        f.write(b"\xff")
    with pytest.raises(ValueError, match="checksum mismatch"):
        compiled(X)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_tied_entries_stay_one_tensor_when_compiled(backend, tmp_path):
    path = str(tmp_path / "tied.flashpack")
    shared = torch.arange(6.0).reshape(2, 3)
    flashpack_ops.save_file({"embed": shared, "lm_head": shared}, path)

    def scale_through_one_name(x: torch.Tensor):
        w = flashpack_ops.load_file(path)
        w["embed"].mul_(10)
        return w["lm_head"] + x

    torch.compiler.reset()
    x = torch.zeros(2, 3)
    assert torch.equal(torch.compile(scale_through_one_name, backend=backend, fullgraph=True)(x),
                       scale_through_one_name(x))


def test_a_bad_file_raises_the_eager_error_when_compiled(tmp_path):
    path = str(tmp_path / "bad.flashpack")
    with open(path, "wb") as f:
        f.write(b"{}" * 100)
    torch.compiler.reset()
    with pytest.raises(ValueError, match="not a flashpack file"):
        torch.compile(lambda: flashpack_ops.load_file(path), backend="aot_eager")()
    # With fullgraph, Dynamo's own error, naming the file and the problem.
    torch.compiler.reset()
    with pytest.raises(Exception, match="not a flashpack file"):
        torch.compile(lambda: flashpack_ops.load_file(path), backend="aot_eager", fullgraph=True)()


def _overlapping_file(path):
    # By hand: 'a' holds elements 0-3 of the block, 'b' elements 2-5. Our writer never
    # overlaps entries in part; a crafted file may.
    import json
    import struct

    footer = json.dumps({"format": "flashpack_v4", "align_bytes": 128, "total_payload_bytes": 32, "total_elems": 8,
                         "macroblocks": [{"dtype": "float32", "offset_bytes": 0, "length_bytes": 32,
                                          "length_elems": 8}],
                         "index": [{"name": "a", "shape": [4], "offset": 0, "length": 4, "macroblock": 0},
                                   {"name": "b", "shape": [4], "offset": 2, "length": 4, "macroblock": 0}]}).encode()
    with open(path, "wb") as f:
        f.write(torch.zeros(8).numpy().tobytes() + footer + struct.pack("<Q", len(footer)) + b"FLASHPK\0")
    return str(path)


@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_entries_that_overlap_in_part_are_refused_when_compiled_not_misread(backend, tmp_path):
    # A graph takes each output as memory of its own: a write through 'a' would not show in
    # 'b', as it does in eager mode.
    path = _overlapping_file(tmp_path / "overlap.flashpack")

    def write_through_a():
        w = flashpack_ops.load_file(path)
        w["a"].add_(1)
        return w["b"].clone()

    assert torch.equal(write_through_a(), torch.tensor([1.0, 1.0, 0.0, 0.0]))
    torch.compiler.reset()
    with pytest.raises(ValueError, match="entries 'a' and 'b' overlap in part, which a compiled graph cannot "
                                         "express; load this file outside torch.compile"):
        torch.compile(write_through_a, backend=backend)()
    assert torch.equal(flashpack_ops.load_file(path, names=["b"])["b"], torch.zeros(4))  # one entry: no overlap


def _v3_file_with_other_keys(path):
    # A flashpack_v3 file (one float32 block), whose footer also holds a "macroblocks" key, as
    # another writer may leave: a v3 footer's dtype is its "target_dtype" (the C++ reader and
    # the reference read it by its "format"), whatever else the footer holds.
    import json
    import struct

    footer = json.dumps({"format": "flashpack_v3", "target_dtype": "float32", "align_bytes": 128, "total_elems": 4,
                         "index": [{"name": "w", "shape": [4], "offset": 0, "length": 4}],
                         "macroblocks": [{"dtype": "int32", "offset_bytes": 0, "length_bytes": 16,
                                          "length_elems": 4}]}).encode()
    with open(path, "wb") as f:
        f.write(torch.tensor([1.5, 2.5, -3.0, 4.0]).numpy().tobytes() + footer + struct.pack("<Q", len(footer)) +
                b"FLASHPK\0")
    return str(path)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_a_v3_footer_is_traced_by_its_format_not_misread(backend, tmp_path):
    path = _v3_file_with_other_keys(tmp_path / "v3.flashpack")
    real = torch.ops.flashpack.load_list(path)
    assert torch.equal(real[0], torch.tensor([1.5, 2.5, -3.0, 4.0]))
    with FakeTensorMode():
        fake = torch.ops.flashpack.load_list(path)
    assert [(f.shape, f.dtype) for f in fake] == [(r.shape, r.dtype) for r in real]

    def double():
        return flashpack_ops.load_file(path)["w"] * 2

    torch.compiler.reset()
    assert torch.equal(torch.compile(double, backend=backend, fullgraph=True)(), double())


def test_make_fx_traces_load_file(weights_file):
    from torch.fx.experimental.proxy_tensor import make_fx

    def first_plus_one():
        return {name: t + 1 for name, t in flashpack_ops.load_file(weights_file).items()}

    expected = first_plus_one()
    for mode in ("real", "fake", "symbolic"):
        traced = make_fx(first_plus_one, tracing_mode=mode)()
        assert_same_dict(traced(), expected)


@pytest.mark.parametrize("call, problem", [
    (lambda p: flashpack_ops.load_file(p, "meta"), "cannot load '{}' to meta: only cpu and cuda are supported"),
    (lambda p: torch.ops.flashpack.load_list(p, "cpu", num_threads=-1), "num_threads must be >= 0"),
    (lambda p: torch.ops.flashpack.load_list(p, "cpu", chunk_bytes=-1), "chunk_bytes must be >= 0"),
    (lambda p: torch.ops.flashpack.read_range(p, 0, 4, "meta"), "cannot read '{}' to meta"),
], ids=["device", "num_threads", "chunk_bytes", "read_range-device"])
def test_a_bad_argument_raises_the_eager_error_when_compiled(weights_file, call, problem):
    # As a ValueError, which `except ValueError` catches, not Dynamo's TorchRuntimeError.
    torch.compiler.reset()
    with pytest.raises(ValueError, match=re.escape(problem.format(weights_file))):
        torch.compile(lambda: call(weights_file), backend="aot_eager")()
    with FakeTensorMode(), pytest.raises(ValueError, match=re.escape(problem.format(weights_file))):
        call(weights_file)


def test_names_given_as_a_str_to_the_op_get_a_hint(weights_file, tmp_path):
    # torch's argument parser takes a str for str[]: the op sees its characters.
    with pytest.raises(ValueError, match="a str passed as names is taken as a list of its characters"):
        torch.ops.flashpack.load(weights_file, "cpu", names="layer")
    with FakeTensorMode(), pytest.raises(ValueError, match="a str passed as names is taken as a list of its"):
        torch.ops.flashpack.load_list(weights_file, "cpu", names="layer")
    # A list of one-letter names, one of them missing, is no str: no such hint.
    path = str(tmp_path / "letters.flashpack")
    flashpack_ops.save_file({"a": torch.ones(1), "b": torch.ones(1)}, path)
    for load in (lambda: flashpack_ops.load_file(path, names=["a", "c"]),
                 lambda: torch.ops.flashpack.load(path, "cpu", names=["a", "c"])):
        with pytest.raises(ValueError) as error:
            load()
        assert "has no entry 'c'" in str(error.value) and "a str passed" not in str(error.value)
    with pytest.raises(ValueError, match="a str passed as names"):  # "ab" read as 'a', 'b' where "ab" is meant
        flashpack_ops.save_file({"ab": torch.ones(1)}, path)
        torch.ops.flashpack.load(path, "cpu", names="ab")


def test_a_bytes_path_loads_when_compiled(weights_file):
    torch.compiler.reset()
    loaded = torch.compile(lambda: flashpack_ops.load_file(weights_file.encode()), backend="aot_eager")()
    assert_same_dict(loaded, flashpack_ops.load_file(weights_file))


def test_read_range_compiles(weights_file):
    def first_bytes(x: torch.Tensor):
        return torch.ops.flashpack.read_range(weights_file, 0, 24).float() + x

    torch.compiler.reset()
    x = torch.ones(24)
    assert torch.equal(torch.compile(first_bytes, backend="aot_eager", fullgraph=True)(x), first_bytes(x))


def fake_error(op, *args):
    with FakeTensorMode():
        with pytest.raises(Exception) as caught:
            op(*args)
    return caught.value


def eager_error(op, *args):
    with pytest.raises(Exception) as caught:
        op(*args)
    return caught.value


@pytest.mark.parametrize("op", ["load", "load_list"])
@pytest.mark.parametrize("problem", ["missing", "truncated", "not a flashpack file"])
def test_fake_raises_the_real_error(op, problem, tmp_path, weights_file):
    path = str(tmp_path / "bad.flashpack")
    if problem == "truncated":
        with open(weights_file, "rb") as src, open(path, "wb") as dst:
            dst.write(src.read()[:-5])
    elif problem == "not a flashpack file":
        with open(path, "wb") as dst:
            dst.write(b"{}" * 100)
    op = getattr(torch.ops.flashpack, op)
    fake, real = fake_error(op, path), eager_error(op, path)
    assert type(fake) is type(real)
    assert str(fake) == str(real)


@pytest.mark.skipif(flashpack_ops.has_cuda(), reason="the library has the CUDA path")
def test_fake_raises_the_real_error_for_cuda_without_cuda(weights_file):
    cuda = torch.device("cuda")
    fake = fake_error(torch.ops.flashpack.load_list, weights_file, cuda)
    real = eager_error(torch.ops.flashpack.load_list, weights_file, cuda)
    assert type(fake) is type(real) is ValueError
    assert str(fake) == str(real)


def sharing(tensors):
    """Which outputs share a storage, as one group number per tensor."""
    groups = {}
    return [groups.setdefault(t.untyped_storage()._cdata, len(groups)) for t in tensors]


@pytest.mark.parametrize("writer", ["flashpack_ops", "reference v3", "reference v4"])
def test_fake_outputs_match_the_real_ones(writer, tmp_path):
    path = str(tmp_path / "weights.flashpack")
    if writer == "flashpack_ops":
        flashpack_ops.save_file(WEIGHTS, path)
    else:
        reference = pytest.importorskip("flashpack")
        one_dtype = {"a": torch.ones(3, 4), "b": torch.arange(5.0), "c": torch.zeros(())}
        reference.pack_to_file(WEIGHTS if writer == "reference v4" else one_dtype, path, target_dtype=None)
        assert flashpack_ops.read_metadata(path)["format"] == "flashpack_" + writer[-2:]
    real = torch.ops.flashpack.load_list(path)
    with FakeTensorMode():
        fake = torch.ops.flashpack.load_list(path)
    for r, f in zip(real, fake, strict=True):
        assert (f.shape, f.dtype, f.stride(), f.storage_offset()) == (r.shape, r.dtype, r.stride(), r.storage_offset())
    assert sharing(fake) == sharing(real)
    torch.library.opcheck(torch.ops.flashpack.load_list.default, (path,), test_utils=ALL_CHECKS)


@pytest.mark.parametrize("copy", [False, True])
@pytest.mark.parametrize("op", ["load", "load_named", "load_list", "load_blocks"])
def test_opcheck_loads(op, copy, weights_file):
    # test_aot_dispatch_dynamic compares outputs, and cannot compare load_named's names (str).
    checks = ALL_CHECKS if op != "load_named" else ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(getattr(torch.ops.flashpack, op).default, (weights_file, torch.device("cpu")),
                          {"copy": copy}, test_utils=checks)


def test_load_named_fake_gives_the_names_shapes_and_dtypes_of_the_real_op(weights_file):
    real_names, real = torch.ops.flashpack.load_named(weights_file)
    with FakeTensorMode():
        fake_names, fake = torch.ops.flashpack.load_named(weights_file)
    assert fake_names == real_names and list(real_names) == list(flashpack_ops.load_file(weights_file))
    for r, f in zip(real, fake, strict=True):
        assert (f.shape, f.dtype, f.stride()) == (r.shape, r.dtype, r.stride())


def test_opcheck_save(tmp_path):
    # test_faketensor: save refuses fake tensors on purpose, so that torch.compile runs it
    # eagerly between graphs (a graph could drop or reorder it). test_aot_dispatch_dynamic:
    # AOTAutograd cannot pass tensors inside a Dict(str, Tensor) argument.
    torch.library.opcheck(torch.ops.flashpack.save.default, ({"w": X}, str(tmp_path / "w.flashpack")),
                          test_utils=("test_schema", "test_autograd_registration"))


@pytest.mark.parametrize("op, args", [("read_footer", ("FILE",)), ("layout_signature", ("FILE",)),
                                      ("metadata", ("FILE",)), ("built_with_cuda", ())])
def test_opcheck_tensorless_ops(op, args, weights_file):
    # test_aot_dispatch_dynamic: no tensor in or out, nothing for AOTAutograd to trace (and
    # opcheck cannot compare a str result).
    args = tuple(weights_file if a == "FILE" else a for a in args)
    torch.library.opcheck(getattr(torch.ops.flashpack, op).default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_opcheck_read_range(weights_file):
    torch.library.opcheck(torch.ops.flashpack.read_range.default, (weights_file, 8, 100), test_utils=ALL_CHECKS)


@pytest.mark.skipif(not hasattr(torch.Tag, "cudagraph_unsafe"), reason="the tag came with torch 2.8")
@pytest.mark.parametrize("op", ["load", "load_named", "load_list", "load_blocks", "read_range"])
def test_loads_are_kept_out_of_cuda_graphs(op):
    assert torch.Tag.cudagraph_unsafe in getattr(torch.ops.flashpack, op).default.tags


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_load_to_cuda_with_cuda_graphs(weights_file):
    # mode="reduce-overhead" records CUDA graphs (from the third call); the load cannot be
    # captured, and must stay outside them.
    model = Loader(weights_file, "cuda")
    compiled = torch.compile(model, mode="reduce-overhead")
    expected = Loader(weights_file)(X)[0]
    for _ in range(4):
        y, w = compiled(X.cuda())
        assert torch.equal(y.cpu(), expected)
        assert_same_dict(w, WEIGHTS)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_model_loads_weights_to_cuda_fullgraph(weights_file):
    model = Loader(weights_file, "cuda")
    y, w = torch.compile(model, fullgraph=True)(X.cuda())
    assert y.is_cuda and all(t.is_cuda for t in w.values())
    assert_same_dict(w, WEIGHTS)
    # Exact: the weights and inputs are small integers.
    assert torch.equal(y.cpu(), Loader(weights_file)(X)[0])


@pytest.fixture
def tied_file(tmp_path):
    path = str(tmp_path / "tied.flashpack")
    shared = torch.arange(6.0).reshape(2, 3)
    flashpack_ops.save_file({"embed": shared, "bias": torch.ones(3), "lm_head": shared}, path)
    return path


def test_load_list_distinct_leaves_out_tied_entries(tied_file):
    every = torch.ops.flashpack.load_list(tied_file)
    assert sharing(every) == [0, 1, 0]
    distinct = torch.ops.flashpack.load_list(tied_file, distinct=True)
    assert len(distinct) == 2 and sharing(distinct) == [0, 1]
    assert torch.equal(distinct[0], every[0]) and torch.equal(distinct[1], every[1])
    with FakeTensorMode():
        fake = torch.ops.flashpack.load_list(tied_file, distinct=True)
    assert [(f.shape, f.dtype) for f in fake] == [(r.shape, r.dtype) for r in distinct]
    torch.library.opcheck(torch.ops.flashpack.load_list.default, (tied_file,), {"distinct": True},
                          test_utils=ALL_CHECKS)


def test_fake_load_list_of_tied_entries_says_to_pass_distinct(tied_file):
    error = fake_error(torch.ops.flashpack.load_list, tied_file)
    assert isinstance(error, ValueError)
    assert tied_file in str(error) and "'embed' and 'lm_head'" in str(error) and "distinct=True" in str(error)


def test_compiled_load_list_of_tied_entries_runs_eagerly(tied_file):
    def tensors_plus(x: torch.Tensor):
        return [t + x for t in torch.ops.flashpack.load_list(tied_file)]

    torch.compiler.reset()
    x = torch.zeros(())
    for got, want in zip(torch.compile(tensors_plus, backend="aot_eager")(x), tensors_plus(x), strict=True):
        assert torch.equal(got, want)
    torch.compiler.reset()
    with pytest.raises(Exception, match="distinct=True"):
        torch.compile(tensors_plus, backend="aot_eager", fullgraph=True)(x)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_tied_entries_of_other_shapes_keep_their_shapes_when_compiled(backend, tmp_path):
    # Another writer may point entries of other shapes at the same bytes ([2, 3], [6], [3, 2]);
    # our own save ties only tensors of one shape.
    from test_format_errors import write_raw

    entries = [{"name": name, "shape": shape, "offset": 0, "length": 6, "macroblock": 0}
               for name, shape in (("a", [2, 3]), ("b", [6]), ("c", [3, 2]))]
    footer = {"format": "flashpack_v4", "align_bytes": 32, "index": entries,
              "macroblocks": [{"dtype": "float32", "offset_bytes": 0, "length_bytes": 32, "length_elems": 8}]}
    path = write_raw(tmp_path / "shapes.flashpack", torch.arange(8.0).numpy().tobytes(), footer)

    def scale_through_one_name(x: torch.Tensor):
        w = flashpack_ops.load_file(path)
        w["b"].mul_(10)
        return w["a"] + x, w["b"] + 0, w["c"] + 0

    torch.compiler.reset()
    x = torch.zeros(2, 3)
    compiled = torch.compile(scale_through_one_name, backend=backend, fullgraph=True)(x)
    for got, want in zip(compiled, scale_through_one_name(x), strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_a_load_of_no_entries_is_still_checked_when_compiled(backend, tmp_path):
    # A file without entries: nothing to return, but the file is still read and checked on
    # every call, as in eager mode (Inductor cannot lower an op with no output).
    empty = str(tmp_path / "empty.flashpack")
    flashpack_ops.save_file({}, empty)

    def load_empty(x: torch.Tensor):
        return flashpack_ops.load_file(empty), x + 1

    torch.compiler.reset()
    compiled = torch.compile(load_empty, backend=backend)
    loaded, y = compiled(X)
    assert loaded == {} and torch.equal(y, X + 1)
    flashpack_ops.save_file({"w": torch.ones(2)}, empty)
    with pytest.raises(ValueError, match="no longer has the layout this compiled code was traced with"):
        compiled(X)
