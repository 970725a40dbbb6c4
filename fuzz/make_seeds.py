"""Writes the seed corpus: small real files from flashpack_ops and from the reference
``flashpack`` package (fuzz/corpus/load/), and their footers alone (fuzz/corpus/footer/).

Deterministic: rerunning it rewrites the same bytes. Run from any directory:
    python fuzz/make_seeds.py
"""

import os
import struct

import torch

import flashpack_ops

HERE = os.path.dirname(os.path.abspath(__file__))


def state_dicts():
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(4, 3, generator=g)
    return {
        "f32": {"w": torch.randn(2, 3, generator=g), "b": torch.randn(3, generator=g)},
        "mixed": {
            "w": torch.randn(3, 4, generator=g).to(torch.bfloat16),
            "scale": torch.tensor(0.5, dtype=torch.float16),
            "ids": torch.arange(5, dtype=torch.int64),
            "mask": torch.tensor([True, False, True]),
            "fp8": torch.randn(4, generator=g).to(torch.float8_e4m3fn),
            "c": torch.randn(2, dtype=torch.complex64, generator=g),
        },
        "edge": {
            "empty": torch.empty(0, 5),
            "scalar": torch.tensor(7.0),
            "emb": shared,
            "lm_head": shared,  # tied: stored once
            "naïve.权重\t\"q\"": torch.ones(1, 1, 1),
        },
    }


def footer_of(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[-16:-8])
    return data[-16 - n : -16]


def main():
    from flashpack.serialization import pack_to_file as reference_pack

    load_dir = os.path.join(HERE, "corpus", "load")
    footer_dir = os.path.join(HERE, "corpus", "footer")
    # Inputs that once broke the loader (regress_*) stay; the seeds are rewritten.
    for d in (load_dir, footer_dir):
        os.makedirs(d, exist_ok=True)
    for name, sd in state_dicts().items():
        flashpack_ops.save_file(sd, os.path.join(load_dir, f"ops_{name}.flashpack"))
        # The reference writes flashpack_v3 for one dtype, flashpack_v4 for several.
        reference_pack(sd, os.path.join(load_dir, f"ref_{name}.flashpack"), None, name_order=list(sd), silent=True)
    flashpack_ops.save_file(state_dicts()["f32"], os.path.join(load_dir, "ops_align0.flashpack"), align_bytes=0)
    flashpack_ops.save_file(state_dicts()["mixed"], os.path.join(load_dir, "ops_checksum.flashpack"), checksum=True,
                            metadata={"format": "pt", "note": "\u00e9\n"})
    real = {k: v for k, v in state_dicts()["mixed"].items() if not v.is_complex()}
    reference_pack(real, os.path.join(load_dir, "ref_mixed_as_f32.flashpack"), torch.float32, silent=True)
    for entry in sorted(os.listdir(load_dir)):
        if entry.startswith("regress_"):
            continue
        with open(os.path.join(footer_dir, entry.replace(".flashpack", ".json")), "wb") as f:
            f.write(footer_of(os.path.join(load_dir, entry)))


if __name__ == "__main__":
    main()
