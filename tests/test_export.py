"""torch.export of a model that loads its weights through the flashpack ops."""

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import flashpack_ops

REPO = os.path.dirname(os.path.dirname(os.path.abspath(flashpack_ops.__file__)))
WEIGHTS = {"weight": torch.arange(12, dtype=torch.float32).reshape(3, 4) - 6, "bias": torch.tensor([1.0, -2.0, 3.0])}
X = torch.tensor([[1.0, 0.0, -1.0, 2.0], [0.0, 3.0, 1.0, -1.0]])


class Loader(nn.Module):
    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = flashpack_ops.load_file(self.path)
        return nn.functional.linear(x, w["weight"], w["bias"])


# A fresh interpreter that only imports flashpack_ops (which registers the ops and fakes).
FRESH_PROCESS = """
import sys
import torch
import flashpack_ops

program = torch.export.load(sys.argv[1])
x = flashpack_ops.load_file(sys.argv[2])["x"]
flashpack_ops.save_file({"y": program.module()(x)}, sys.argv[3])
"""


def test_exported_program_loads_weights_through_the_op(tmp_path):
    weights = str(tmp_path / "weights.flashpack")
    flashpack_ops.save_file(WEIGHTS, weights)
    model = Loader(weights)
    expected = model(X)

    program = torch.export.export(model, (X,))
    targets = [node.target for node in program.graph.nodes if node.op == "call_function"]
    assert torch.ops.flashpack.load_list.default in targets
    # The footer is read when exporting, not by the exported program.
    assert torch.ops.flashpack.read_footer.default not in targets
    assert torch.equal(program.module()(X), expected)

    # The program reads the file when it runs: new values (same layout) show up.
    flashpack_ops.save_file({name: t * 2 for name, t in WEIGHTS.items()}, weights)
    assert torch.equal(program.module()(X), expected * 2)

    saved = str(tmp_path / "model.pt2")
    torch.export.save(program, saved)
    assert torch.equal(run_in_a_fresh_process(FRESH_PROCESS, saved, tmp_path), expected * 2)


def run_in_a_fresh_process(script, program, tmp_path):
    """`script` run on `program` and X in a process that imports only flashpack_ops: its output."""
    inputs, outputs = str(tmp_path / "x.flashpack"), str(tmp_path / "y.flashpack")
    flashpack_ops.save_file({"x": X}, inputs)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    run = subprocess.run([sys.executable, "-c", script, program, inputs, outputs], env=env, capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr
    return flashpack_ops.load_file(outputs)["y"]


def test_export_refuses_save(tmp_path):
    path = str(tmp_path / "out.flashpack")

    class Saver(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            flashpack_ops.save_file({"x": x}, path)
            return x + 1

    # An exported program is a pure graph: a save in it could be dropped or reordered.
    with pytest.raises(Exception, match="flashpack::save writes"):
        torch.export.export(Saver(), (X,))
    assert not os.path.exists(path)


FRESH_AOTI = """
import sys
import torch
import flashpack_ops

run = torch._inductor.aoti_load_package(sys.argv[1])
x = flashpack_ops.load_file(sys.argv[2])["x"]
flashpack_ops.save_file({"y": run(x)}, sys.argv[3])
"""


@pytest.mark.skipif(torch.__version__ < (2, 8),
                    reason="torch 2.6's AOTInductor packages a custom op's keyword-only arguments out of order")
def test_aoti_package_loads_weights_through_the_op(tmp_path, capfd):
    weights = str(tmp_path / "weights.flashpack")
    flashpack_ops.save_file(WEIGHTS, weights)
    model = Loader(weights)
    expected = model(X)
    package = torch._inductor.aoti_compile_and_package(torch.export.export(model, (X,)),
                                                       package_path=str(tmp_path / "model.pt2"))
    run = torch._inductor.aoti_load_package(package)
    assert torch.equal(run(X), expected)
    flashpack_ops.save_file({name: t * 2 for name, t in WEIGHTS.items()}, weights)
    assert torch.equal(run(X), expected * 2)

    assert torch.equal(run_in_a_fresh_process(FRESH_AOTI, package, tmp_path), expected * 2)

    flashpack_ops.save_file({"bias": WEIGHTS["bias"], "weight": WEIGHTS["weight"]}, weights)
    with pytest.raises(RuntimeError) as raised:
        run(X)
    # torch 2.11's AOTInductor runtime prints the op's error and raises one of its own; later ones pass it on.
    assert "no longer has the layout this compiled code was traced with" in str(raised.value) + capfd.readouterr().err
