"""One rank of a distributed-loading test run (started by tests/test_distributed.py).

    python dist_worker.py RANK WORLD INIT_FILE CASES_JSON OUT_JSON [BACKEND DEVICE]

Runs every case against the same process group and writes, per case, "ok" or the
exception's type and message. Each case compares what load_file_distributed returned on
this rank with a plain load_file, bit for bit.
"""

import json
import sys
import traceback

import torch
import torch.distributed as dist

import flashpack_ops
from conftest import assert_same
from flashpack_ops.distributed import load_file_distributed


def check_same(got, want, ties, own_storage=True):
    assert list(got) == list(want), f"names or order differ: {list(got)} vs {list(want)}"
    for name in want:
        assert_same(got[name], want[name], name)
        # As load_file gives them: a storage of its own over its bytes.
        t = got[name]
        assert not own_storage or t.untyped_storage().nbytes() == t.numel() * t.element_size(), \
            f"'{name}' shares a bigger storage"
    for a, b in ties:
        assert got[a].data_ptr() == got[b].data_ptr(), f"'{a}' and '{b}' no longer share memory"


def check_same_blocks(got, want):
    storage, meta = got
    want_storage, want_meta = want
    assert meta == want_meta, "the footers differ"
    assert len(storage) == len(want_storage), f"{len(storage)} blocks, {len(want_storage)} in the file"
    for k, (a, b) in enumerate(zip(storage.blocks, want_storage.blocks)):
        assert_same(a, b, f"block {k}")


class SequentialNet(torch.nn.Sequential, flashpack_ops.FlashPackMixin):
    pass


def run_case(case, rank, device):
    path = case["path"].format(rank=rank)
    kwargs = dict(case.get("kwargs", {}), **case.get("rank_kwargs", {}).get(str(rank), {}))
    device = kwargs.pop("device", case.get("device", device))
    if case.get("blocks"):
        # The reference's block-level entry point.
        got = flashpack_ops.read_flashpack_file_distributed(path, device, **kwargs)
        check_same_blocks(got, flashpack_ops.read_flashpack_file(case["path"].format(rank=0), device))
        return
    if case.get("assign"):
        # The reference entry point, on a model whose parameters are placeholders.
        model = torch.nn.Sequential(torch.nn.Linear(37, 29), torch.nn.LayerNorm(29))
        flashpack_ops.assign_from_file(model, path, device=device, use_distributed_loading=True, **kwargs)
        got = dict(model.state_dict())
    elif case.get("mixin"):
        # The same through FlashPackMixin.from_flashpack, which must pass every option on.
        model = SequentialNet.from_flashpack(path, torch.nn.Linear(37, 29), torch.nn.LayerNorm(29), device=device,
                                             use_distributed_loading=True, **kwargs)
        got = dict(model.state_dict())
    else:
        got = load_file_distributed(path, device, **kwargs)
    want = flashpack_ops.load_file(case["path"].format(rank=0), device)
    # Kept on the model, the blocks are what the tensors view.
    check_same(got, want, case.get("ties", []), own_storage=not kwargs.get("keep_flash_ref_on_model"))


def main():
    rank, world, init_file, cases_json, out_json = sys.argv[1:6]
    backend = sys.argv[6] if len(sys.argv) > 6 else "gloo"
    device = sys.argv[7] if len(sys.argv) > 7 else "cpu"
    rank, world = int(rank), int(world)
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)
    with open(cases_json) as f:
        cases = json.load(f)
    results = {}
    for name, case in cases.items():
        try:
            run_case(case, rank, device)
            results[name] = "ok"
        except Exception as exc:  # reported to the test, which decides
            results[name] = f"{type(exc).__name__}: {exc}"
            if not case.get("expect_error"):
                traceback.print_exc()
        # Every case starts together, whatever the previous one did on this rank.
        dist.barrier()
    with open(out_json, "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
