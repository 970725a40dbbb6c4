"""Writes what the LibTorch example (main.cpp) reads: python make_inputs.py DIR

  DIR/weights.flashpack  five tensors of three dtypes, values main.cpp recomputes on its own
  DIR/model.pt           a scripted TinyModel whose load_weights() calls flashpack::load
  DIR/io.flashpack       an input "x" and the "expected" output of TinyModel with those weights
"""

import os
import sys
from typing import Dict

import torch
from torch import nn

import flashpack_ops


def weights() -> Dict[str, torch.Tensor]:
    # main.cpp builds the same tensors with the same ops, in the same order.
    return {
        "linear.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4) / 8 - 0.5,
        "linear.bias": torch.arange(3, dtype=torch.float32) - 1,
        "scale": torch.arange(1, 4, dtype=torch.float32) / 2,
        "table": torch.arange(6).reshape(2, 3).to(torch.bfloat16),
        "steps": torch.tensor([3], dtype=torch.int64),
    }


class TinyModel(nn.Module):
    """Uses every weight; load_weights() replaces them with the tensors of a flashpack file."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.register_buffer("scale", torch.ones(3))
        self.register_buffer("table", torch.zeros(2, 3, dtype=torch.bfloat16))
        self.register_buffer("steps", torch.ones(1, dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.linear(x) * self.scale + self.table.float().sum(0)) * self.steps

    @torch.jit.export
    def load_weights(self, path: str, device: str = "cpu") -> None:
        # No copy: on the CPU the module's tensors become views of the file's mapping.
        loaded = torch.ops.flashpack.load(path, torch.device(device))
        self.linear.weight = loaded["linear.weight"]
        self.linear.bias = loaded["linear.bias"]
        self.scale = loaded["scale"]
        self.table = loaded["table"]
        self.steps = loaded["steps"]


def main(out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    flashpack_ops.save_file(weights(), os.path.join(out_dir, "weights.flashpack"))

    torch.manual_seed(0)
    model = TinyModel()
    # Saved before any load: the C++ side checks that load_weights() changes the output.
    torch.jit.save(torch.jit.script(model), os.path.join(out_dir, "model.pt"))

    model.load_state_dict(weights())
    x = torch.linspace(-1, 1, 8).reshape(2, 4)
    with torch.no_grad():
        expected = model(x)
    flashpack_ops.save_file({"x": x, "expected": expected}, os.path.join(out_dir, "io.flashpack"))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
