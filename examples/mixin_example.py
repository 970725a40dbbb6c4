"""FlashPackMixin on a plain nn.Module: save it once, build it back from the file in one call.

    python examples/mixin_example.py [--device cuda]
"""

import argparse
import os
import tempfile

import torch

import flashpack_ops as flashpack


class TinyTransformerBlock(torch.nn.Module, flashpack.FlashPackMixin):
    def __init__(self, width: int = 256, heads: int = 4):
        super().__init__()
        self.norm = torch.nn.LayerNorm(width)
        self.attn = torch.nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, 4 * width), torch.nn.GELU(),
                                       torch.nn.Linear(4 * width, width))
        # Not saved in the file (persistent=False): from_flashpack recomputes it in __init__.
        self.register_buffer("scale", torch.tensor(width ** -0.5), persistent=False)

    def forward(self, x):
        h = self.norm(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.scale * self.mlp(self.norm(x))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    device = parser.parse_args().device

    torch.manual_seed(0)
    model = TinyTransformerBlock().eval()
    x = torch.randn(2, 16, 256)
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "block.flashpack")
        model.save_flashpack(path)
        print(f"saved {path}: {os.path.getsize(path):,} bytes")

        # Built on the meta device, then every parameter views the loaded memory: no second copy.
        loaded = TinyTransformerBlock.from_flashpack(path, width=256, heads=4, device=device)
        with torch.no_grad():
            got, expected = loaded(x.to(device)).cpu(), model(x)
        # Other devices run other kernels: identical bits on the CPU, equal to rounding elsewhere.
        same = torch.equal(got, expected) if device == "cpu" else torch.allclose(got, expected, atol=1e-4)
        print(f"loaded onto {device}; eval mode: {not loaded.training}; outputs match: {same}")
        assert same


if __name__ == "__main__":
    main()
