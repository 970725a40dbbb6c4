"""Quickstart: convert a model to flashpack, load it back, and time it against safetensors.

Builds a small Llama-shaped model (about 136 MB of bf16 weights, no download), saves its
weights as .safetensors as a hub checkpoint would be, converts that file to .flashpack,
then loads both files (warm, median of 5), checks every tensor bit for bit, fills a fresh
model built on the meta device, and compares its output with the original's.

    python examples/quickstart.py [--device cuda] [--dir DIR]
"""

import argparse
import os
import shutil
import statistics
import tempfile
import time

import torch
from torch import nn

import flashpack_ops


class Block(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        q, k, v = self.attn(self.norm(x)).chunk(3, dim=-1)
        x = x + self.proj(torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v)
        return x + self.down(torch.relu(self.up(x)))


class TinyLM(nn.Module):
    def __init__(self, vocab=8192, dim=1024, hidden=2816, layers=6):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, hidden) for _ in range(layers))
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied, as in many LLMs

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def timed(fn, repeat=5):
    fn()  # warm: the file is in the page cache, as on a serving host
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="where to load: cpu or cuda (default cpu)")
    ap.add_argument("--dir", default=None, help="working directory (default: a temporary one)")
    args = ap.parse_args()
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: no CUDA device is available here (torch.cuda.is_available() is False); "
                 "run with --device cpu")
    workdir = args.dir or tempfile.mkdtemp(prefix="flashpack_quickstart_")
    os.makedirs(workdir, exist_ok=True)
    try:
        run(args, workdir)
    finally:
        if args.dir is None:
            shutil.rmtree(workdir, ignore_errors=True)


def run(args, workdir):
    import safetensors.torch

    st_path = os.path.join(workdir, "model.safetensors")
    fp_path = os.path.join(workdir, "model.flashpack")

    torch.manual_seed(0)
    model = TinyLM().to(torch.bfloat16).eval()
    state = model.state_dict()
    size = sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in state.values()}.values())
    print(f"model: {len(state)} tensors, {size / 1e6:.0f} MB of bf16 weights (embed and head tied)")

    # A hub checkpoint stores tied weights once; safetensors refuses shared tensors.
    safetensors.torch.save_model(model, st_path)
    print(f"wrote {st_path}")

    t0 = time.perf_counter()
    checkpoint = safetensors.torch.load_file(st_path)
    checkpoint["head.weight"] = checkpoint["embed.weight"]
    flashpack_ops.save_file(checkpoint, fp_path)
    print(f"converted to {fp_path} in {time.perf_counter() - t0:.2f} s")

    def report(title, t_st, t_fp):
        print(f"{title}:")
        print(f"  safetensors    {t_st * 1e3:8.1f} ms  {size / t_st / 1e9:7.2f} GB/s")
        print(f"  flashpack_ops  {t_fp * 1e3:8.1f} ms  {size / t_fp / 1e9:7.2f} GB/s   ({t_st / t_fp:.1f}x faster)")

    t_st, from_st = timed(lambda: safetensors.torch.load_file(st_path, device=args.device))
    t_fp, from_fp = timed(lambda: flashpack_ops.load_file(fp_path, args.device))
    for name, tensor in from_st.items():
        assert torch.equal(from_fp[name], tensor), name
    if args.device == "cpu":
        # Both map the file lazily on the CPU; also time reading every byte into memory.
        report("open on cpu, lazily mapped (warm, median of 5)", t_st, t_fp)
        t_st, _ = timed(lambda: safetensors.torch.load(open(st_path, "rb").read()))
        t_fp, _ = timed(lambda: flashpack_ops.load_file(fp_path, copy=True))
        report("read into cpu memory (warm, median of 5)", t_st, t_fp)
    else:
        report(f"load to {args.device} (warm, median of 5)", t_st, t_fp)
    print("every tensor bit-exact with safetensors")

    # Fill a model built without memory (meta device) with views of the loaded blocks.
    with torch.device("meta"):
        fresh = TinyLM().to(torch.bfloat16)
    flashpack_ops.assign_from_file(fresh, fp_path, device=args.device)
    tokens = torch.randint(0, 8192, (1, 16), device=args.device)
    expected = model.to(args.device)(tokens)
    assert torch.equal(fresh.eval()(tokens), expected)
    print("a fresh model filled from the flashpack file gives the original's output, bit for bit")


if __name__ == "__main__":
    main()
