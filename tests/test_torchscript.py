"""The flashpack ops in TorchScript: scripted functions and modules, saved, and loaded elsewhere."""

import os
import subprocess
import sys
from typing import Dict

import pytest
import torch
from torch import nn

import flashpack_ops
from conftest import assert_same_dict, torchscript_refusal




REFUSAL = torchscript_refusal()
pytestmark = [
    pytest.mark.skipif(bool(REFUSAL), reason=REFUSAL),
    pytest.mark.filterwarnings(r"ignore:`torch\.jit\..*` is deprecated:DeprecationWarning"),
]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(flashpack_ops.__file__)))

WEIGHTS = {
    "f32": torch.arange(12, dtype=torch.float32).reshape(3, 4),
    "bf16": torch.arange(5, dtype=torch.bfloat16),
    "i64": torch.tensor([[1, -2], [3, -4]], dtype=torch.int64),
    "empty": torch.zeros(0, 3),
}


@pytest.fixture
def weights_file(tmp_path):
    path = str(tmp_path / "weights.flashpack")
    flashpack_ops.save_file(WEIGHTS, path)
    return path


def load_then_save(src: str, dst: str) -> Dict[str, torch.Tensor]:
    tensors = torch.ops.flashpack.load(src)
    torch.ops.flashpack.save(tensors, dst, align_bytes=64)
    return torch.ops.flashpack.load(dst, torch.device("cpu"), copy=True)


def test_scripted_function_loads_and_saves(weights_file, tmp_path):
    scripted = torch.jit.script(load_then_save)
    copy = str(tmp_path / "copy.flashpack")
    assert_same_dict(scripted(weights_file, copy), WEIGHTS)
    assert flashpack_ops.read_metadata(copy)["align_bytes"] == 64


def load_list_and_footer(path: str):
    return torch.ops.flashpack.load_list(path), torch.ops.flashpack.read_footer(path)


def test_scripted_load_list_and_read_footer(weights_file):
    tensors, footer = torch.jit.script(load_list_and_footer)(weights_file)
    assert_same_dict(dict(zip(WEIGHTS, tensors)), WEIGHTS)
    assert '"flashpack_v4"' in footer


class TinyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.register_buffer("scale", torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * self.scale

    @torch.jit.export
    def load_weights(self, path: str, device: str = "cpu") -> None:
        loaded = torch.ops.flashpack.load(path, torch.device(device))
        self.linear.weight = loaded["linear.weight"]
        self.linear.bias = loaded["linear.bias"]
        self.scale = loaded["scale"]


# Runs in a fresh interpreter that knows nothing of TinyModel: only torch and flashpack_ops.
FRESH_PROCESS = """
import sys
import torch
import flashpack_ops

model = torch.jit.load(sys.argv[1])
model.load_weights(sys.argv[2])
x = flashpack_ops.load_file(sys.argv[3])["x"]
with torch.no_grad():
    flashpack_ops.save_file({"y": model(x)}, sys.argv[4])
"""


def test_scripted_module_loads_its_weights_in_a_fresh_process(tmp_path):
    torch.manual_seed(0)
    trained = TinyModel()
    trained.scale.uniform_(0.5, 2.0)
    weights = str(tmp_path / "weights.flashpack")
    flashpack_ops.save_file(trained.state_dict(), weights)

    scripted = torch.jit.script(TinyModel())  # other weights, until load_weights()
    saved = str(tmp_path / "model.pt")
    torch.jit.save(scripted, saved)

    x = torch.randn(5, 4)
    with torch.no_grad():
        expected = trained(x)
        assert not torch.equal(scripted(x), expected)
    inputs, outputs = str(tmp_path / "x.flashpack"), str(tmp_path / "y.flashpack")
    flashpack_ops.save_file({"x": x}, inputs)

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    run = subprocess.run([sys.executable, "-W", "ignore::DeprecationWarning", "-c", FRESH_PROCESS,
                          saved, weights, inputs, outputs], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert torch.equal(flashpack_ops.load_file(outputs)["y"], expected)

    # The same module, in this process.
    scripted.load_weights(weights)
    with torch.no_grad():
        assert torch.equal(scripted(x), expected)


# Two saves, a load that only checks a file reads back, and two loads of the same file.
# Were the ops pure (alias analysis FROM_SCHEMA), the JIT would delete the saves and the
# check: none of them has a used output.
SAVE_TWICE_LOAD_TWICE = """
def run(tensors: Dict[str, Tensor], first: str, second: str) -> Tuple[Dict[str, Tensor], Dict[str, Tensor]]:
    torch.ops.{ns}.save(tensors, first)
    torch.ops.{ns}.save(tensors, second)
    torch.ops.{ns}.load(second)
    a = torch.ops.{ns}.load(first)
    b = torch.ops.{ns}.load(first)
    return a, b
"""


def count_calls(graph, ns: str) -> Dict[str, int]:
    kinds = [node.kind() for node in graph.nodes()]
    return {op: kinds.count(f"{ns}::{op}") for op in ("save", "load")}


def optimize(graph):
    graph = graph.copy()
    for optimization in (torch._C._jit_pass_inline, torch._C._jit_pass_constant_propagation,
                         torch._C._jit_pass_cse, torch._C._jit_pass_dce):
        optimization(graph)
    return graph


@pytest.fixture(scope="module")
def pure_twins():
    """flashpack's load and save schemas declared pure (FROM_SCHEMA), to show what the checks catch."""
    lib = torch.library.Library("flashpack_pure_twins", "DEF")
    lib.define("save(Dict(str, Tensor) tensors, str path) -> ()", alias_analysis="FROM_SCHEMA")
    lib.define("load(str path) -> Dict(str, Tensor)", alias_analysis="FROM_SCHEMA")
    yield "flashpack_pure_twins"
    del lib  # unregisters the namespace


def test_jit_passes_keep_every_save_and_load(pure_twins):
    scripted = torch.jit.CompilationUnit(SAVE_TWICE_LOAD_TWICE.format(ns="flashpack")).run
    assert count_calls(optimize(scripted.graph), "flashpack") == {"save": 2, "load": 3}

    # The same passes on pure twins of the ops: the saves and the unused load go.
    pure = torch.jit.CompilationUnit(SAVE_TWICE_LOAD_TWICE.format(ns=pure_twins)).run
    assert count_calls(optimize(pure.graph), pure_twins) == {"save": 0, "load": 2}


def test_scripted_saves_and_loads_all_run(tmp_path):
    scripted = torch.jit.CompilationUnit(SAVE_TWICE_LOAD_TWICE.format(ns="flashpack")).run
    # The profiling executor optimizes after a few runs: check every run, the later ones too.
    for run in range(4):
        first, second = str(tmp_path / f"first{run}.flashpack"), str(tmp_path / f"second{run}.flashpack")
        tensors = {"w": torch.full((3,), float(run))}
        a, b = scripted(tensors, first, second)
        assert os.path.exists(first) and os.path.exists(second), run
        assert_same_dict(flashpack_ops.load_file(second), tensors)
        assert_same_dict(a, tensors)
        assert_same_dict(b, tensors)
        # Two loads, two mappings of the file.
        assert a["w"].data_ptr() != b["w"].data_ptr()
    assert count_calls(torch.jit.last_executed_optimized_graph(), "flashpack") == {"save": 2, "load": 3}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_scripted_load_to_cuda(weights_file):
    def load_to(path: str, device: torch.device) -> Dict[str, torch.Tensor]:
        return torch.ops.flashpack.load(path, device)

    loaded = torch.jit.script(load_to)(weights_file, torch.device("cuda"))
    assert all(tensor.is_cuda for tensor in loaded.values())
    assert_same_dict(loaded, WEIGHTS)

    model = torch.jit.script(TinyModel())
    state = TinyModel().state_dict()
    path = os.path.join(os.path.dirname(weights_file), "tiny.flashpack")
    flashpack_ops.save_file(state, path)
    model.load_weights(path, "cuda")
    assert model.linear.weight.is_cuda and torch.equal(model.linear.weight.cpu(), state["linear.weight"])
    assert model(torch.ones(2, 4, device="cuda")).is_cuda
