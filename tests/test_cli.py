"""The `flashpack` command, run as a subprocess on real files of every source kind."""

import inspect
import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys

import pytest
import torch

import flashpack_ops
from flashpack_ops import cli
from conftest import assert_same

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dcp_save(state, directory):
    """torch.distributed.checkpoint.save in this one process, with no process group."""
    import torch.distributed.checkpoint as dcp

    # no_dist came after torch 2.6, where a process without a process group saves alone anyway.
    extra = {"no_dist": True} if "no_dist" in inspect.signature(dcp.save).parameters else {}
    dcp.save(state, checkpoint_id=directory, **extra)


def run(*args, env=None, check=True, cwd=None):
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]),
                       HF_HUB_DISABLE_PROGRESS_BARS="1")
    environment.update(env or {})
    result = subprocess.run([sys.executable, "-m", "flashpack_ops", *map(str, args)], capture_output=True,
                            text=True, env=environment, timeout=300, cwd=cwd)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def assert_one_line_error(result, text, status=1):
    assert result.returncode == status
    # Warnings torch itself gives while reading a source (they differ between torch versions) are not the error.
    lines = [line for line in result.stderr.strip().splitlines() if not re.match(r"flashpack \w+: warning: ", line)]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert text in lines[0], lines[0]


def state_dict(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {"embed.weight": torch.randn(32, 8, generator=gen), "layer.weight": torch.randn(8, 8, generator=gen),
            "layer.bias": torch.randn(8, generator=gen).to(torch.bfloat16), "steps": torch.arange(4)}


def assert_file_holds(path, expected):
    loaded = flashpack_ops.load_file(path)
    assert set(loaded) == set(expected)
    for name, tensor in expected.items():
        assert_same(loaded[name], tensor, name)


# --- single files ---------------------------------------------------------------------------

def test_convert_safetensors_with_dtype_and_ignores(tmp_path):
    from safetensors.torch import save_file

    source = tmp_path / "model.safetensors"
    save_file(state_dict(), source)
    run("convert", source, "--dtype", "bf16", "--ignore-names", "steps", "--ignore-prefixes", "embed.")
    expected = {"layer.weight": state_dict()["layer.weight"].to(torch.bfloat16),
                "layer.bias": state_dict()["layer.bias"]}
    assert_file_holds(tmp_path / "model.flashpack", expected)


@pytest.mark.parametrize("suffix, key", [(".bin", None), (".pt", None), (".ckpt", "state_dict"),
                                         (".pt", "model_state_dict")])
def test_convert_torch_files(tmp_path, suffix, key):
    source = tmp_path / f"weights{suffix}"
    # A training checkpoint nests the weights under a key beside other entries: "state_dict"
    # (Lightning), "model_state_dict" (PyTorch's tutorials, with the optimizer's state).
    optimizer = {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    torch.save({key: state_dict(), "optimizer_state_dict": optimizer, "epoch": 3} if key else state_dict(), source)
    result = run("convert", source, tmp_path / "out.flashpack")
    assert "wrote" in result.stdout
    assert_file_holds(tmp_path / "out.flashpack", state_dict())


_FSDP2_SAVE = r"""
import sys
import torch, torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import init_device_mesh

rank, store, directory, full = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Embedding(11, 6), torch.nn.Linear(6, 5), torch.nn.Linear(5, 3)).to(torch.bfloat16)
model[1].register_buffer("scale", torch.arange(5.0))
fully_shard(model, mesh=init_device_mesh("cpu", (2,)))
optimizer = torch.optim.Adam(model.parameters())
model(torch.arange(4)).float().sum().backward()
optimizer.step()
model_state, optimizer_state = get_state_dict(model, optimizer)
# The layout of torch's own FSDP2 recipe: one stateful "app" entry holding both.
dcp.save({"app": {"model": model_state, "optim": optimizer_state}, "step": 1}, checkpoint_id=directory)
whole = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
if rank == 0:
    torch.save(whole, full)
dist.destroy_process_group()
"""


@pytest.mark.skipif(torch.__version__ < (2, 8),
                    reason="torch 2.6's FSDP2 cannot train on the CPU (its CPU stream has no record_event)")
def test_convert_a_distributed_checkpoint_of_two_ranks(tmp_path):
    # FSDP2 training saves with torch.distributed.checkpoint: one .distcp file of shards per
    # rank and a .metadata file. convert puts each tensor of the model back together.
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]),
                       OMP_NUM_THREADS="1")
    # NOTE: the save is torch's alone (the script imports nothing of ours). Its gloo threads
    # once aborted a rank at shutdown ("terminate called without an active exception"): such
    # an abort makes the checkpoint again, from scratch, once.
    for attempt in range(2):
        directory, full = tmp_path / f"step-1-{attempt}", tmp_path / f"full-{attempt}.pt"
        ranks = [subprocess.Popen([sys.executable, "-c", _FSDP2_SAVE, str(rank), str(tmp_path / f"store-{attempt}"),
                                   str(directory), str(full)], env=environment, stderr=subprocess.PIPE, text=True)
                 for rank in (0, 1)]
        results = [(rank.wait(timeout=300), rank.stderr.read()) for rank in ranks]
        aborted = any(code == -signal.SIGABRT and "terminate called without an active exception" in err
                      for code, err in results)
        if not aborted or attempt == 1:
            break
    for code, err in results:
        assert code == 0, err
    assert sorted(name for name in os.listdir(directory) if name.endswith(".distcp")) == ["__0_0.distcp",
                                                                                         "__1_0.distcp"]
    result = run("convert", directory, tmp_path / "model.flashpack")
    assert "wrote" in result.stdout
    expected = torch.load(full, weights_only=True)
    assert set(expected) == {"0.weight", "1.weight", "1.bias", "1.scale", "2.weight", "2.bias"}
    assert_file_holds(tmp_path / "model.flashpack", expected)
    # By default, into the checkpoint's folder, as for a folder of weights.
    run("convert", directory)
    assert_file_holds(directory / "model.flashpack", expected)


class _Marker:
    """Leaves a file behind when unpickled: a stand-in for code a pickle runs."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_a_distributed_checkpoint_is_converted_without_running_its_pickles(tmp_path):
    # dcp.load unpickles the .metadata file and every non-tensor entry with pickle. convert
    # reads the metadata building only what such a file holds, and reads only tensors.
    import pickle

    from flashpack_ops.commands import convert_to_flashpack

    marker = tmp_path / "ran"
    directory = tmp_path / "checkpoint"
    _dcp_save({"model": state_dict(), "extra": _Marker(str(marker))}, str(directory))
    destination = convert_to_flashpack(str(directory), str(tmp_path / "m.flashpack"))
    assert_file_holds(destination, state_dict())
    assert not marker.exists()

    with open(directory / ".metadata", "wb") as f:
        pickle.dump(_Marker(str(marker)), f)
    with pytest.raises(ValueError, match=r"checkpoint/.metadata is not a torch.distributed.checkpoint metadata file: "
                                         r"it would build (builtins|_?io).open, which such a file does not hold"):
        convert_to_flashpack(str(directory), str(tmp_path / "m2.flashpack"))
    assert not marker.exists() and not (tmp_path / "m2.flashpack").exists()


def test_a_distributed_checkpoint_without_a_model_part_says_what_it_holds(tmp_path):
    _dcp_save({"teacher": state_dict(), "student": state_dict(1)}, str(tmp_path / "c"))
    result = run("convert", tmp_path / "c", tmp_path / "m.flashpack", check=False)
    assert_one_line_error(result, "which part of this checkpoint is the model? It holds ['teacher', 'student'], and none is named "
                                 "state_dict, model_state_dict, model or module")
    _dcp_save({"model": {**state_dict(), "note": "text"}}, str(tmp_path / "d"))
    result = run("convert", tmp_path / "d", tmp_path / "m.flashpack", check=False)
    assert_one_line_error(result, "holds entries that are not tensors: ['note']")


def test_a_damaged_distributed_checkpoint_is_one_line_error(tmp_path):
    _dcp_save({"model": state_dict()}, str(tmp_path / "c"))
    (shard,) = (tmp_path / "c").glob("*.distcp")
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    result = run("convert", tmp_path / "c", tmp_path / "m.flashpack", check=False)
    assert_one_line_error(result, "c: torch.distributed.checkpoint cannot read its tensors (a .distcp file truncated "
                                  "or damaged?): ")
    # What torch's reader ran into, as it says it (the versions differ: RuntimeError, EOFError).
    assert re.search(r"damaged\?\): (RuntimeError: \S|EOFError$)", result.stderr, re.M), result.stderr
    assert not (tmp_path / "m.flashpack").exists()


def run_without_safetensors(*args):
    """The CLI in a process where safetensors cannot be imported, as where it is not installed."""
    launcher = ("import sys\n"
                "class NoSafetensors:\n"
                "    def find_spec(self, name, *rest):\n"
                "        if name.partition('.')[0] == 'safetensors':\n"
                "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
                "sys.meta_path.insert(0, NoSafetensors())\n"
                "from flashpack_ops.cli import main\n"
                "sys.exit(main(sys.argv[1:]))\n")
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", launcher, *map(str, args)], capture_output=True, text=True,
                          env=environment, timeout=300)


@pytest.mark.parametrize("as_directory", [False, True])
def test_convert_torch_file_without_safetensors_installed(tmp_path, as_directory):
    # safetensors is no dependency of flashpack_ops: a torch checkpoint converts without it.
    torch.save(state_dict(), tmp_path / "pytorch_model.bin")
    result = run_without_safetensors("convert", tmp_path if as_directory else tmp_path / "pytorch_model.bin", "-q")
    assert result.returncode == 0, result.stderr
    assert_file_holds(tmp_path / ("model.flashpack" if as_directory else "pytorch_model.flashpack"), state_dict())


def test_convert_of_safetensors_without_safetensors_installed_says_what_to_install(tmp_path):
    from safetensors.torch import save_file

    save_file(state_dict(), tmp_path / "model.safetensors")
    result = run_without_safetensors("convert", tmp_path / "model.safetensors", "-q")
    assert_one_line_error(result, "No module named 'safetensors")
    assert result.stderr.rstrip().endswith("(pip install safetensors)"), result.stderr
    assert not (tmp_path / "model.flashpack").exists()


def test_convert_sharded_checkpoint_by_directory_and_by_index(tmp_path):
    from safetensors.torch import save_file

    full = state_dict()
    shards = {"model-00001-of-00002.safetensors": ["embed.weight", "steps"],
              "model-00002-of-00002.safetensors": ["layer.weight", "layer.bias"]}
    for shard, names in shards.items():
        save_file({n: full[n] for n in names}, tmp_path / shard)
    weight_map = {n: shard for shard, names in shards.items() for n in names}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    run("convert", tmp_path, "-q")
    assert_file_holds(tmp_path / "model.flashpack", full)
    run("convert", tmp_path / "model.safetensors.index.json", tmp_path / "again.flashpack")
    assert_file_holds(tmp_path / "again.flashpack", full)


@pytest.mark.parametrize("content, said", [
    ({"weight_map": {"w": "../outside.safetensors"}}, "maps 'w' to '../outside.safetensors', which is not a shard file"),
    ({"weight_map": {"w": "ABSOLUTE"}}, "maps 'w' to '/"),
    ({"weight_map": {"w": 5}}, "maps 'w' to 5, which is not a shard file beside the index"),
    ([1, 2], "has no weight_map"),
    ("{not json", "is not a valid JSON file"),
    (b'{"weight_map": {"w": "\xff"}}', "is not a valid JSON file"),
], ids=["parent", "absolute", "not-a-string", "not-an-object", "not-json", "not-utf-8"])
def test_convert_of_a_damaged_or_escaping_index_names_it(tmp_path, content, said):
    # A shard the index names must lie beside it: the checkpoint the user named, nothing else.
    from safetensors.torch import save_file

    (tmp_path / "model").mkdir()
    save_file({"w": torch.ones(2)}, tmp_path / "outside.safetensors")
    index = tmp_path / "model" / "model.safetensors.index.json"
    if isinstance(content, bytes):
        index.write_bytes(content)
    else:
        text = content if isinstance(content, str) else json.dumps(content)
        index.write_text(text.replace("ABSOLUTE", str(tmp_path / "outside.safetensors")))
    for source in (index, tmp_path / "model"):
        assert_one_line_error(run("convert", source, tmp_path / "out.flashpack", check=False), f"{index} {said}")
    assert not (tmp_path / "out.flashpack").exists()


@pytest.mark.parametrize("options", [[], ["--dtype", "bf16"]], ids=["stored-dtype", "other-dtype"])
@pytest.mark.parametrize("content, said", [
    ("ESCAPING", "maps 'model.embed_tokens.weight' to '../outside.safetensors', which is not a shard file"),
    ("{not json", "is not a valid JSON file"),
    ("[1, 2]", "has no weight_map"),
], ids=["parent", "not-json", "not-an-object"])
def test_convert_of_a_model_directory_checks_its_index(tmp_path, content, said, options):
    # A model directory's index as a bare one's: its shards lie beside it, and damage is named.
    from safetensors.torch import load_file as load_safetensors

    _llama_directory(tmp_path / "hf")
    names = list(load_safetensors(tmp_path / "hf" / "model.safetensors"))
    os.replace(tmp_path / "hf" / "model.safetensors", tmp_path / "outside.safetensors")
    index = tmp_path / "hf" / "model.safetensors.index.json"
    weight_map = dict.fromkeys(["model.embed_tokens.weight"] + names, "../outside.safetensors")
    # The metadata transformers asks of an index: without the check, it loads the file outside.
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}) if content == "ESCAPING" else content)
    result = run("convert", tmp_path / "hf", tmp_path / "out", *options, check=False)
    assert_one_line_error(result, f"{index} {said}")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option", [["--variant", "fp16"], ["--subfolder", "unet"], ["--revision", "main"]],
                         ids=["variant", "subfolder", "revision"])
def test_convert_of_a_file_refuses_the_options_that_pick_in_a_directory(tmp_path, option):
    # Beside its float16 variant: --variant fp16 given the float32 file must not write float32 silently.
    from safetensors.torch import save_file

    save_file(state_dict(), tmp_path / "model.safetensors")
    save_file({k: v.half() for k, v in state_dict().items()}, tmp_path / "model.fp16.safetensors")
    result = run("convert", tmp_path / "model.safetensors", tmp_path / "out.flashpack", *option, check=False)
    assert_one_line_error(result, f"{option[0]} applies to a model directory or a Hub repo id, not to the file "
                                  f"{tmp_path / 'model.safetensors'}")
    assert not (tmp_path / "out.flashpack").exists()


def test_ignore_options_take_one_value_each_and_repeat(tmp_path):
    source = tmp_path / "weights.pt"
    torch.save(state_dict(), source)
    # The destination after a flag's value is the destination, not one more name to ignore.
    run("convert", source, "--ignore-names", "steps", tmp_path / "out.flashpack",
        "--ignore-names", "layer.bias,embed.weight")
    assert not (tmp_path / "weights.flashpack").exists()
    assert_file_holds(tmp_path / "out.flashpack", {"layer.weight": state_dict()["layer.weight"]})


def test_options_between_positionals_and_verbose_after_command(tmp_path):
    source = tmp_path / "weights.pt"
    torch.save(state_dict(), source)
    run("convert", source, "--dtype", "bf16", tmp_path / "out.flashpack", "-v")
    assert set(flashpack_ops.load_file(tmp_path / "out.flashpack")) == set(state_dict())
    run("revert", tmp_path / "out.flashpack", "-q", tmp_path / "back.pt")
    assert torch.load(tmp_path / "back.pt", weights_only=True)["layer.weight"].dtype == torch.bfloat16

    for args in (["convert", tmp_path / "nope.pt", "-v"], ["-v", "convert", tmp_path / "nope.pt"]):
        result = run(*args, check=False)
        assert result.returncode == 1 and "Traceback" in result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith("flashpack convert: error: ")
    result = run("convert", source, tmp_path / "a.flashpack", tmp_path / "b.flashpack", check=False)
    assert result.returncode == 2 and "flashpack convert: error: unrecognized arguments: " in result.stderr
    assert not (tmp_path / "a.flashpack").exists()


@pytest.mark.parametrize("destination, message", [
    ("model.safetensors", "must not take the extension .safetensors"),
    ("model.pt", "must not take the extension .pt"),
    ("config.json", "must not take the extension .json"),
    ("link.flashpack", "is the checkpoint being converted"),
])
@pytest.mark.parametrize("kind", ["file", "index", "directory"])
def test_convert_never_writes_over_a_checkpoint(tmp_path, kind, destination, message):
    from safetensors.torch import save_file

    save_file(state_dict(), tmp_path / "model.safetensors")
    if kind == "index":
        weight_map = {name: "model.safetensors" for name in state_dict()}
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    source = {"file": "model.safetensors", "index": "model.safetensors.index.json", "directory": "."}[kind]
    os.symlink("model.safetensors", tmp_path / "link.flashpack")
    before = (tmp_path / "model.safetensors").read_bytes()
    assert_one_line_error(run("convert", source, destination, cwd=tmp_path, check=False), message)
    assert (tmp_path / "model.safetensors").read_bytes() == before


def test_convert_state_dict_refuses_another_formats_name(tmp_path):
    from flashpack_ops.commands import convert_to_flashpack

    with pytest.raises(ValueError, match="must not take the extension .safetensors"):
        convert_to_flashpack(state_dict(), str(tmp_path / "model.safetensors"))
    assert not (tmp_path / "model.safetensors").exists()


@pytest.mark.parametrize("name", ["nosuch.safetensors", "nosuch.pt", "nosuch.safetensors.index.json",
                                  "nosuch.flashpack"])
def test_missing_local_file_is_not_taken_for_a_repo_id(tmp_path, name):
    for args in ([name], [name, "out.flashpack"]):
        result = run("convert", *args, cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"}, check=False)
        assert_one_line_error(result, f"{name}: no such file or directory")


def test_weights_only_directory_with_dots_in_the_file_name(tmp_path):
    # Meta's consolidated.00.pth; the dots are no variant when no other file is there.
    (tmp_path / "meta").mkdir()
    torch.save(state_dict(), tmp_path / "meta" / "consolidated.00.pth")
    run("convert", tmp_path / "meta", tmp_path / "out.flashpack")
    assert_file_holds(tmp_path / "out.flashpack", state_dict())

    torch.save(state_dict(1), tmp_path / "meta" / "consolidated.01.pth")
    assert_one_line_error(run("convert", tmp_path / "meta", tmp_path / "two.flashpack", check=False),
                          "holds several checkpoints (consolidated.00.pth, consolidated.01.pth)")


def test_dtype_converts_only_floating_point_tensors(tmp_path):
    from flashpack_ops.commands import convert_to_flashpack

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    model.register_buffer("mask", torch.tensor([True, False, True]))
    expected = model.to(torch.bfloat16).state_dict()
    assert expected["1.num_batches_tracked"].dtype == torch.int64 and expected["mask"].dtype == torch.bool
    model.float()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    (tmp_path / "weights").mkdir()
    torch.save(model.state_dict(), tmp_path / "weights" / "model.pt")

    run("convert", tmp_path / "model.pt", "--dtype", "bf16")
    run("convert", tmp_path / "weights", "--dtype", "bf16")
    convert_to_flashpack(model, str(tmp_path / "module.flashpack"), dtype="bf16")
    for path in (tmp_path / "model.flashpack", tmp_path / "weights" / "model.flashpack",
                 tmp_path / "module.flashpack"):
        assert_file_holds(path, expected)


def test_convert_checksum_then_metadata_verify(tmp_path):
    source = tmp_path / "weights.pt"
    torch.save(state_dict(), source)
    run("convert", source, tmp_path / "plain.flashpack")
    assert_one_line_error(run("metadata", tmp_path / "plain.flashpack", "--verify", check=False),
                          "write it with `flashpack convert --checksum` or save it with checksum=True")
    run("convert", source, tmp_path / "checked.flashpack", "--checksum")
    assert "verified:" in run("metadata", tmp_path / "checked.flashpack", "--verify").stdout
    assert_file_holds(tmp_path / "checked.flashpack", state_dict())


# --- model directories ----------------------------------------------------------------------

def test_convert_transformers_directory(tmp_path):
    transformers = pytest.importorskip("transformers")
    from flashpack_ops.integrations.transformers import from_pretrained_flashpack

    torch.manual_seed(0)
    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                      tie_word_embeddings=True)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    run("convert", tmp_path / "hf", tmp_path / "fp")
    assert {"config.json", "model.flashpack"} <= set(os.listdir(tmp_path / "fp"))

    ids = torch.arange(10).reshape(1, 10)
    expected = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf")
    loaded = from_pretrained_flashpack(transformers.LlamaForCausalLM, tmp_path / "fp")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected(ids).logits)


def test_convert_refuses_a_directory_whose_model_would_drop_tensors(tmp_path):
    # A config.json naming no architecture: AutoModel builds the base model, which has no place
    # for lm_head. The command must not write a file without it (and exit 0).
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                      tie_word_embeddings=False)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "hf")
    described = json.loads((tmp_path / "hf" / "config.json").read_text())
    del described["architectures"]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(described))
    assert_one_line_error(run("convert", tmp_path / "hf", tmp_path / "fp", check=False),
                          "config.json names no architecture, and AutoModel builds a LlamaModel, which does not "
                          "match the checkpoint: 1 tensors it has no place for (lm_head.weight)")
    assert not (tmp_path / "fp" / "model.flashpack").exists()



def _llama_directory(directory, **described):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(directory)
    config_path = directory / "config.json"
    config_path.write_text(json.dumps(dict(json.loads(config_path.read_text()), **described)))
    return model


@pytest.mark.parametrize("described, said", [
    # transformers' save_pretrained records the class's own name: here a subclass with a
    # tensor of its own, which no transformers class of the model type holds.
    ({"architectures": ["LlamaWithProbe"]},
     'names the architecture \'LlamaWithProbe\', which transformers'),
    ({"architectures": ["LlamaWithProbe"]},
     'Set "architectures" there to the transformers class it extends'),
    ({"architectures": ["MyModelForCausalLM"], "auto_map": {"AutoModelForCausalLM": "modeling_my.MyModelForCausalLM"}},
     "whose code ships with the model (auto_map); convert does not run a model's own code"),
], ids=["subclass", "subclass-what-to-set", "code-shipped-with-the-model"])
def test_convert_of_an_architecture_transformers_lacks_says_what_to_do(tmp_path, described, said):
    from safetensors.torch import load_file as load_safetensors
    from safetensors.torch import save_file as save_safetensors

    _llama_directory(tmp_path / "hf", **described)
    weights = tmp_path / "hf" / "model.safetensors"
    tensors = dict(load_safetensors(weights), **{"probe.weight": torch.ones(2, 32)})
    save_safetensors(tensors, weights, metadata={"format": "pt"})
    assert_one_line_error(run("convert", tmp_path / "hf", tmp_path / "fp", check=False), said)
    assert not (tmp_path / "fp").exists()


@pytest.mark.parametrize("config, said", [
    (b"{not json", "config.json is not a valid JSON file: "),
    (b'{"architectures": ["\xff"]}', "config.json is not a valid JSON file: "),
    ({"architectures": [5]}, 'config.json: "architectures" is [5], not a list of class names'),
    ({"architectures": "LlamaForCausalLM"}, "config.json: \"architectures\" is 'LlamaForCausalLM', not a list"),
    ({"_class_name": "utils"}, "config.json names the model class 'utils', which diffusers"),
    (b"[1]", "config.json holds [1], not a JSON object"),
    (b"null", "config.json holds null, not a JSON object"),
    (b"5", "config.json holds 5, not a JSON object"),
], ids=["not-json", "not-utf-8", "not-a-name", "not-a-list", "not-a-class", "a-list", "null", "a-number"])
def test_convert_of_a_damaged_config_names_it(tmp_path, config, said):
    _llama_directory(tmp_path / "hf")
    config_path = tmp_path / "hf" / "config.json"
    if isinstance(config, bytes):
        config_path.write_bytes(config)
    else:
        config_path.write_text(json.dumps(dict(json.loads(config_path.read_text()), **config)))
    assert_one_line_error(run("convert", tmp_path / "hf", tmp_path / "out", check=False), f"{tmp_path / 'hf'}/{said}")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", ["[1]", '"unet"'], ids=["a-list", "a-string"])
def test_convert_of_a_pipeline_whose_model_index_is_no_object_names_it(pipeline_directory, tmp_path, content):
    copy = tmp_path / "pipeline"
    shutil.copytree(pipeline_directory, copy)
    (copy / "model_index.json").write_text(content)
    for destination in ([], [tmp_path / "out"]):
        assert_one_line_error(run("convert", copy, *destination, check=False),
                              f"{copy / 'model_index.json'} holds {content}, not a JSON object")
    assert not (tmp_path / "out").exists() and not (copy / "unet" / "model.flashpack").exists()


def test_convert_of_a_subclass_that_only_adds_methods_converts_as_the_class_it_extends(tmp_path):
    # class FlashLlama(LlamaForCausalLM, FlashPackTransformersModelMixin): save_pretrained records
    # "FlashLlama"; its checkpoint is LlamaForCausalLM's, tensor for tensor.
    pytest.importorskip("transformers")
    from flashpack_ops.integrations.transformers import from_pretrained_flashpack

    model = _llama_directory(tmp_path / "hf", architectures=["FlashLlama"])
    result = run("convert", tmp_path / "hf", tmp_path / "fp")
    assert "its checkpoint holds the tensors of LlamaForCausalLM, which converts it" in result.stderr
    assert json.loads((tmp_path / "fp" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    loaded = from_pretrained_flashpack(type(model), tmp_path / "fp")
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(loaded.state_dict()[n], t) for n, t in model.state_dict().items())


@pytest.mark.parametrize("in_place, recorded", [(True, True), (True, False), (False, True)],
                         ids=["in-place", "in-place-config-without-dtype", "elsewhere"])
def test_a_float16_variant_converts_as_float16_and_leaves_the_float32_weights_loading_as_before(tmp_path, in_place,
                                                                                              recorded):
    # The Hub's usual layout: float32 weights, their float16 variant beside them, config.json
    # recording float32 (or, an older one, no dtype at all).
    transformers = pytest.importorskip("transformers")
    model = _llama_directory(tmp_path / "hf")
    model.half().save_pretrained(tmp_path / "half", variant="fp16")
    shutil.copy(tmp_path / "half" / "model.fp16.safetensors", tmp_path / "hf")
    config_path = tmp_path / "hf" / "config.json"
    config_before = json.loads(config_path.read_text())
    assert config_before["dtype"] == "float32"
    if not recorded:
        del config_before["dtype"]
        config_path.write_text(json.dumps(config_before))
    destination = tmp_path / "hf" if in_place else tmp_path / "fp"
    run("convert", tmp_path / "hf", *([] if in_place else [destination]), "--variant", "fp16")
    assert {t.dtype for t in flashpack_ops.load_file(destination / "model.flashpack").values()} == {torch.float16}
    if in_place:
        assert json.loads(config_path.read_text()).get("dtype") == config_before.get("dtype")
    plain = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf")
    assert plain.dtype == torch.float32
    from flashpack_ops.integrations.transformers import from_pretrained_flashpack

    loaded = from_pretrained_flashpack(transformers.LlamaForCausalLM, destination)
    assert loaded.dtype == torch.float16
    for name, tensor in model.state_dict().items():  # model was halved in place above
        assert_same(loaded.state_dict()[name], tensor, name)


def test_convert_into_a_new_directory_takes_the_tokenizer_and_other_companions(tmp_path):
    # The destination serves as the original did: AutoTokenizer and the chat template load
    # from it; no weights of any kind travel with them.
    _llama_directory(tmp_path / "hf")
    companions = {"tokenizer.json": "{}", "tokenizer_config.json": "{}", "chat_template.jinja": "{{ messages }}",
                  "README.md": "# tiny"}
    others = {"tf_model.h5": "h5", "model.onnx": "onnx", ".gitattributes": "*.bin lfs", "extra.bin": "bin"}
    for name, text in {**companions, **others}.items():
        (tmp_path / "hf" / name).write_text(text)
    (tmp_path / "hf" / "original").mkdir()
    (tmp_path / "hf" / "original" / "consolidated.00.pth").write_text("weights")
    run("convert", tmp_path / "hf", tmp_path / "fp", "--dtype", "bf16")
    assert sorted(os.listdir(tmp_path / "fp")) == sorted(["config.json", "generation_config.json", "model.flashpack",
                                                          *companions])
    for name, text in companions.items():
        assert (tmp_path / "fp" / name).read_text() == text
    assert json.loads((tmp_path / "fp" / "config.json").read_text())["dtype"] == "bfloat16"  # not the source's


def test_convert_copies_no_companion_linked_from_outside_the_directory(tmp_path):
    # A link the directory holds to a file elsewhere is not copied into the destination (which
    # may then be published); the Hub cache's links from a snapshot to its blobs are.
    snapshot = tmp_path / "models--org--tiny" / "snapshots" / ("0" * 40)
    _llama_directory(snapshot)
    blob = tmp_path / "models--org--tiny" / "blobs" / "abc123"
    blob.parent.mkdir()
    blob.write_text('{"from": "the hub"}')
    os.symlink(os.path.join("..", "..", "blobs", "abc123"), snapshot / "tokenizer_config.json")
    secret = tmp_path / "secret"
    secret.write_text("private")
    os.symlink(secret, snapshot / "tokenizer.json")
    result = run("convert", snapshot, tmp_path / "fp")
    assert f"{snapshot / 'tokenizer.json'} is a link to {secret}, outside {snapshot}: not copied" in result.stderr
    assert not (tmp_path / "fp" / "tokenizer.json").exists()
    assert (tmp_path / "fp" / "tokenizer_config.json").read_text() == '{"from": "the hub"}'


def test_convert_of_a_link_to_a_hub_cache_snapshot_copies_its_companions(tmp_path):
    # A model directory that is a link to a snapshot of the Hub cache (~/models/tiny -> the
    # cache's): its files are the cache's links to its blobs, as the snapshot's own are.
    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / ("0" * 40)
    _llama_directory(snapshot)
    blob = tmp_path / "hub" / "models--org--tiny" / "blobs" / "abc123"
    blob.parent.mkdir()
    blob.write_text('{"from": "the hub"}')
    os.symlink(os.path.join("..", "..", "blobs", "abc123"), snapshot / "tokenizer_config.json")
    os.symlink(snapshot, tmp_path / "tiny")
    result = run("convert", tmp_path / "tiny", tmp_path / "fp")
    assert "not copied" not in result.stderr, result.stderr
    assert (tmp_path / "fp" / "tokenizer_config.json").read_text() == '{"from": "the hub"}'


def test_convert_leaves_out_what_the_checkpoint_lacks_for_the_load_to_initialise(tmp_path):
    # A BertModel saved without its pooler (as embedding models are): from_pretrained loads it
    # and initialises the pooler. The file holds the checkpoint's tensors only, not a random
    # pooler passed off as trained; from_pretrained_flashpack(strict=False) initialises it.
    transformers = pytest.importorskip("transformers")
    from flashpack_ops.integrations.transformers import from_pretrained_flashpack

    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32)
    torch.manual_seed(0)
    transformers.BertModel(config, add_pooling_layer=False).save_pretrained(tmp_path / "hf")
    result = run("convert", tmp_path / "hf", tmp_path / "fp")
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flashpack convert: warning: ") and \
        "the checkpoint lacks 2 tensors BertModel has (pooler.dense.bias, pooler.dense.weight); they are left out " \
        "of the file: load it with strict=False" in lines[0], result.stderr
    stored = flashpack_ops.load_file(tmp_path / "fp" / "model.flashpack")
    expected = transformers.BertModel.from_pretrained(tmp_path / "hf").state_dict()
    assert set(stored) == set(expected) - {"pooler.dense.weight", "pooler.dense.bias"}
    with pytest.raises(ValueError, match="2 parameters missing from the file: pooler"):
        from_pretrained_flashpack(transformers.BertModel, tmp_path / "fp")
    with pytest.warns(UserWarning, match="initialised as from_pretrained initialises them"):
        loaded = from_pretrained_flashpack(transformers.BertModel, tmp_path / "fp", strict=False)
    for name, tensor in stored.items():
        assert_same(loaded.state_dict()[name], tensor, name)


def test_a_directory_saved_here_converts_back_whole_after_revert(tmp_path):
    # save_pretrained_flashpack records the architecture, as save_pretrained does, so the
    # directory names its model (with its head) to the command and to the Auto classes.
    transformers = pytest.importorskip("transformers")
    from flashpack_ops.integrations.transformers import FlashPackTransformersModelMixin, from_pretrained_flashpack

    class FlashLlama(transformers.LlamaForCausalLM, FlashPackTransformersModelMixin):
        pass

    config = transformers.LlamaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = FlashLlama(config).eval()
    model.save_pretrained_flashpack(tmp_path / "fp")
    assert json.loads((tmp_path / "fp" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert type(transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.from_pretrained(tmp_path / "fp"))) is transformers.LlamaForCausalLM
    run("revert", tmp_path / "fp")
    run("convert", tmp_path / "fp", tmp_path / "again", "--dtype", "bf16")
    loaded = from_pretrained_flashpack(transformers.LlamaForCausalLM, tmp_path / "again")
    for name, tensor in model.state_dict().items():
        assert_same(loaded.state_dict()[name], tensor.to(torch.bfloat16), name)


def test_in_place_dtype_conversion_of_model_directory_is_refused(tmp_path):
    transformers = pytest.importorskip("transformers")

    config = transformers.LlamaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    before = (tmp_path / "config.json").read_bytes()
    for destination in ([], [tmp_path]):
        assert_one_line_error(run("convert", tmp_path, *destination, "--dtype", "bf16", check=False),
                              "in place would rewrite its config for the original weights too; give a "
                              "destination directory")
    assert (tmp_path / "config.json").read_bytes() == before and not (tmp_path / "model.flashpack").exists()
    assert transformers.LlamaForCausalLM.from_pretrained(tmp_path).dtype == torch.float32

    run("convert", tmp_path, "-q")  # without --dtype the config stays true
    assert transformers.LlamaForCausalLM.from_pretrained(tmp_path).dtype == torch.float32


@pytest.fixture(scope="module")
def pipeline_directory(tmp_path_factory):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    pipeline = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(num_train_timesteps=10))
    directory = tmp_path_factory.mktemp("pipeline")
    pipeline.save_pretrained(directory)
    unet.half().save_pretrained(directory / "unet", variant="fp16")
    return directory


def test_convert_diffusers_model_directory_variant(pipeline_directory, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from flashpack_ops.integrations.diffusers import from_pretrained_flashpack

    run("convert", pipeline_directory / "unet", tmp_path, "--variant", "fp16")

    loaded = from_pretrained_flashpack(diffusers.UNet2DModel, tmp_path)
    expected = diffusers.UNet2DModel.from_pretrained(pipeline_directory / "unet", variant="fp16",
                                                     torch_dtype=torch.float16)
    assert all(p.dtype == torch.float16 for p in loaded.parameters())
    for name, tensor in expected.state_dict().items():
        assert_same(loaded.state_dict()[name], tensor, name)


@pytest.mark.parametrize("safe_serialization", [True, False], ids=["safetensors", "torch-file"])
def test_convert_keeps_a_float16_diffusers_checkpoint_float16(tmp_path, safe_serialization):
    # diffusers would load it in float32 unless told the dtype: the command reads it from the files.
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4).half()
    unet.save_pretrained(tmp_path / "unet", safe_serialization=safe_serialization)
    run("convert", tmp_path / "unet", tmp_path / "fp")
    loaded = flashpack_ops.load_file(tmp_path / "fp" / "model.flashpack")
    for name, tensor in unet.state_dict().items():
        assert_same(loaded[name], tensor, name)


def test_convert_pipeline_directory_and_subfolder(pipeline_directory, tmp_path):
    pytest.importorskip("diffusers")
    from flashpack_ops.integrations.diffusers import FlashPackDiffusionPipeline

    run("convert", pipeline_directory, tmp_path / "pipe")
    assert sorted(os.listdir(tmp_path / "pipe" / "unet")) == ["config.json", "model.flashpack"]
    assert FlashPackDiffusionPipeline.from_pretrained_flashpack(tmp_path / "pipe").unet is not None

    run("convert", pipeline_directory, tmp_path / "unet", "--subfolder", "unet")
    assert sorted(os.listdir(tmp_path / "unet")) == ["config.json", "model.flashpack"]


def test_convert_pipeline_directory_reads_no_folder_outside_it(pipeline_directory, tmp_path):
    pytest.importorskip("diffusers")
    # A name of model_index.json that is no argument of the pipeline ("../outside") is no
    # component: its folder is not read (diffusers ignores it too).
    copy = tmp_path / "pipeline"
    shutil.copytree(pipeline_directory, copy)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "model.safetensors").write_bytes(b"garbage!")
    index = json.loads((copy / "model_index.json").read_text())
    index["../outside"] = ["diffusers", "UNet2DModel"]
    (copy / "model_index.json").write_text(json.dumps(index))
    run("convert", copy, tmp_path / "out")
    assert sorted(os.listdir(tmp_path / "out" / "unet")) == ["config.json", "model.flashpack"]


def test_a_pipeline_converted_in_place_may_link_its_checkpoints_from_elsewhere(pipeline_directory, tmp_path):
    pytest.importorskip("diffusers")
    # A download that links its large files to the Hub cache, or weights kept on another disk:
    # the conversion reads them and writes none, as for a model directory. A name of
    # model_index.json that is no argument of the pipeline ("../outside") is no folder of it.
    pipeline = tmp_path / "pipeline"
    shutil.copytree(pipeline_directory, pipeline)
    weights = pipeline / "unet" / "diffusion_pytorch_model.safetensors"
    (tmp_path / "store").mkdir()
    shutil.move(weights, tmp_path / "store" / "unet.safetensors")
    os.symlink(tmp_path / "store" / "unet.safetensors", weights)
    kept = (tmp_path / "store" / "unet.safetensors").read_bytes()
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "victim", tmp_path / "outside" / "link")
    index = json.loads((pipeline / "model_index.json").read_text())
    index["../outside"] = ["diffusers", "UNet2DModel"]
    (pipeline / "model_index.json").write_text(json.dumps(index))
    run("convert", pipeline)
    assert (pipeline / "unet" / "model.flashpack").is_file() and os.path.islink(weights)
    assert (tmp_path / "store" / "unet.safetensors").read_bytes() == kept
    # What the conversion writes is still refused through a link leading out.
    (pipeline / "unet" / "config.json").rename(tmp_path / "store" / "config.json")
    os.symlink(tmp_path / "store" / "config.json", pipeline / "unet" / "config.json")
    assert_one_line_error(run("convert", pipeline, check=False), f"{pipeline / 'unet' / 'config.json'} is a link to")


def test_revert_of_converted_model_and_pipeline_directories(pipeline_directory, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    run("convert", pipeline_directory, tmp_path / "pipe")
    # A pipeline directory holds one file per component: both commands say which.
    for command in ("revert", "metadata"):
        assert_one_line_error(run(command, tmp_path / "pipe", check=False),
                              f"{tmp_path / 'pipe'} is a pipeline directory: it holds a model.flashpack per model "
                              "component (unet); give one of those folders")
    # A diffusers model folder gets back the weights file diffusers' from_pretrained reads.
    run("revert", tmp_path / "pipe" / "unet")
    assert (tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    reverted = diffusers.UNet2DModel.from_pretrained(tmp_path / "pipe" / "unet")
    expected = diffusers.UNet2DModel.from_pretrained(pipeline_directory / "unet")
    for name, tensor in expected.state_dict().items():
        assert_same(reverted.state_dict()[name], tensor, name)
    # Another file in that folder (EMA weights beside the model's) keeps its own name: it is
    # not the model's weights.
    shutil.copy(tmp_path / "pipe" / "unet" / "model.flashpack", tmp_path / "pipe" / "unet" / "ema.flashpack")
    run("revert", tmp_path / "pipe" / "unet" / "ema.flashpack")
    assert (tmp_path / "pipe" / "unet" / "ema.safetensors").is_file()


def test_convert_pipeline_directory_refuses_what_it_cannot_honour(pipeline_directory, tmp_path):
    pytest.importorskip("diffusers")
    # save_pipeline_flashpack takes no ignore options.
    assert_one_line_error(run("convert", pipeline_directory, tmp_path / "ignored", "--ignore-prefixes", "conv_in.",
                              check=False),
                          "the ignore options are not supported for a pipeline directory; convert the component "
                          "they apply to with --subfolder (unet)")
    assert not (tmp_path / "ignored").exists()
    # Checksums in every model file written, which metadata --verify then checks.
    run("convert", pipeline_directory, tmp_path / "checked", "--checksum")
    run("metadata", tmp_path / "checked" / "unet", "--verify")
    run("convert", pipeline_directory / "unet", tmp_path / "unet", "--checksum")
    run("metadata", tmp_path / "unet", "--verify")

    copy = tmp_path / "copy"
    shutil.copytree(pipeline_directory, copy)
    assert_one_line_error(run("convert", copy, "--dtype", "fp16", check=False),
                          "converting a pipeline directory to torch.float16 in place")
    assert not (copy / "unet" / "model.flashpack").exists()


def test_convert_in_place_keeps_the_checkpoint_model_flashpack_links_to(pipeline_directory, tmp_path):
    pytest.importorskip("diffusers")
    # model.flashpack, a link to the checkpoint beside it: writing it would write over the
    # checkpoint being converted, as a file's conversion refuses to.
    model = tmp_path / "model"
    shutil.copytree(pipeline_directory / "unet", model)
    pipeline = tmp_path / "pipeline"
    shutil.copytree(pipeline_directory, pipeline)
    for folder in (model, pipeline / "unet"):
        os.symlink("diffusion_pytorch_model.safetensors", folder / "model.flashpack")
    kept = (model / "diffusion_pytorch_model.safetensors").read_bytes()
    for source, folder in ((model, model), (pipeline, pipeline / "unet")):
        assert_one_line_error(run("convert", source, check=False),
                              f"{folder / 'model.flashpack'} is the checkpoint being converted")
        assert (folder / "diffusion_pytorch_model.safetensors").read_bytes() == kept


def test_files_written_in_place_are_never_links_leading_out(pipeline_directory, tmp_path):
    pytest.importorskip("diffusers")
    # A directory from elsewhere may hold a link where a command writes by default (in place,
    # or beside its source): writing through it would replace a file outside the directory.
    victim = tmp_path / "victim"
    victim.write_text("precious")
    model = tmp_path / "model"
    shutil.copytree(pipeline_directory / "unet", model)
    os.symlink(victim, model / "model.flashpack")
    pipeline = tmp_path / "pipeline"
    shutil.copytree(pipeline_directory, pipeline)
    os.symlink(victim, pipeline / "unet" / "model.flashpack")
    single = tmp_path / "single"
    single.mkdir()
    from safetensors.torch import save_file

    save_file(state_dict(), single / "weights.safetensors")
    os.symlink(victim, single / "weights.flashpack")
    os.symlink(victim, single / "model.flashpack")  # a directory of weights only converts to model.flashpack
    for source, link in ((model, model / "model.flashpack"), (pipeline, pipeline / "unet" / "model.flashpack"),
                         (single / "weights.safetensors", single / "weights.flashpack"),
                         (single, single / "model.flashpack")):
        assert_one_line_error(run("convert", source, check=False), f"{link} is a link to {victim}, outside")
    # revert's default destination, a link to a file that does not exist yet.
    reverted = single / "model"
    reverted.mkdir()
    flashpack_ops.save_file(state_dict(), reverted / "model.flashpack")
    os.symlink(tmp_path / "created.safetensors", reverted / "model.safetensors")
    assert_one_line_error(run("revert", reverted, check=False), f"{reverted / 'model.safetensors'} is a link to")
    assert victim.read_text() == "precious" and not (tmp_path / "created.safetensors").exists()


def test_a_directory_named_as_its_own_destination_is_converted_in_place_and_checked_so(tmp_path):
    # `flashpack convert ./dir ./dir`, `convert . .` within it, `convert dir/w.safetensors dir/`:
    # in place as much as with no destination, so a link there leading out is refused alike.
    from safetensors.torch import save_file

    victim = tmp_path / "victim"
    victim.write_text("precious")
    single = tmp_path / "single"
    single.mkdir()
    save_file(state_dict(), single / "weights.safetensors")
    os.symlink(victim, single / "model.flashpack")
    for args, cwd in (((single, single), None), ((".", "."), single), ((single / "weights.safetensors", single), None),
                      (("weights.safetensors", "./"), single)):
        assert_one_line_error(run("convert", *args, check=False, cwd=cwd), "model.flashpack is a link to")
    assert victim.read_text() == "precious"


def test_convert_repo_id_offline_fails_in_one_line(tmp_path):
    pytest.importorskip("huggingface_hub")
    result = run("convert", "no-such-org/no-such-model", tmp_path / "out", env={"HF_HUB_OFFLINE": "1"}, check=False)
    assert_one_line_error(result, "cannot download 'no-such-org/no-such-model' from the Hugging Face Hub "
                                  "(HF_HUB_OFFLINE is set)")


def test_convert_repo_id_without_network_fails_without_retrying(tmp_path):
    # No HF_HUB_OFFLINE, and nothing listening: the repo's file listing, which huggingface_hub
    # retries with back-off for about 25 s, must not be asked before the download says offline.
    pytest.importorskip("huggingface_hub")
    import socket

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]), HF_ENDPOINT=endpoint,
               HF_HUB_CACHE=str(tmp_path / "cache"))
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("TRANSFORMERS_OFFLINE", None)  # which huggingface_hub reads where HF_HUB_OFFLINE is not set
    result = subprocess.run([sys.executable, "-m", "flashpack_ops", "convert", "no-such-org/no-such-model",
                             str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=20)
    assert_one_line_error(result, "cannot download 'no-such-org/no-such-model' from the Hugging Face Hub "
                                  "(no network connection)")


def test_convert_repo_id_offline_through_transformers_offline_names_that_variable(tmp_path):
    # huggingface_hub goes offline for TRANSFORMERS_OFFLINE too where HF_HUB_OFFLINE is not set.
    pytest.importorskip("huggingface_hub")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]),
               HF_HUB_CACHE=str(tmp_path / "cache"), TRANSFORMERS_OFFLINE="1")
    env.pop("HF_HUB_OFFLINE", None)
    result = subprocess.run([sys.executable, "-m", "flashpack_ops", "convert", "no-such-org/no-such-model",
                             str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=60)
    assert_one_line_error(result, "cannot download 'no-such-org/no-such-model' from the Hugging Face Hub "
                                  "(TRANSFORMERS_OFFLINE is set)")


def test_repo_files_asks_the_hub_once(hub):
    from flashpack_ops.integrations._hub import repo_files

    os.makedirs(hub.root + "/org/tiny/sub")
    for name in ("config.json", "model.safetensors", "sub/model.flashpack"):
        with open(os.path.join(hub.root, "org/tiny", name), "wb") as f:
            f.write(b"{}")
    assert sorted(repo_files("org/tiny")) == ["config.json", "model.safetensors", "sub/model.flashpack"]
    assert [path for _, path in hub.requests if path.startswith("/api/models/")] == ["/api/models/org/tiny"]


def test_a_pipeline_repo_whose_model_index_is_no_object_is_named(hub):
    from flashpack_ops.integrations._hub import resolve_pipeline_directory

    os.makedirs(hub.root + "/org/pipe")
    with open(os.path.join(hub.root, "org/pipe/model_index.json"), "w") as f:
        json.dump(["unet", "vae"], f)
    with pytest.raises(ValueError, match=r"model_index.json: not a pipeline's model_index.json \(a JSON list"):
        resolve_pipeline_directory("org/pipe")


def test_safetensors_headers_are_read_within_safetensors_bound(tmp_path):
    import tracemalloc

    from flashpack_ops.integrations._hub import safetensors_entries

    # A length field of 200 MB in a sparse 300 MB file: nothing that large is read.
    lying = tmp_path / "model.safetensors"
    with open(lying, "wb") as f:
        f.write((200_000_000).to_bytes(8, "little"))
        f.truncate(300_000_000)
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=re.escape(f"{lying}: not a safetensors file (its header length says")):
            safetensors_entries(str(lying))
        assert tracemalloc.get_traced_memory()[1] < 1_000_000
    finally:
        tracemalloc.stop()
    for header in (b"[1, 2]", b'{"w": {"shape": [1]}}', b"{not json", b'{"w": 5}'):
        with open(lying, "wb") as f:
            f.write(len(header).to_bytes(8, "little") + header)
        with pytest.raises(ValueError, match=re.escape(f"{lying}: not a safetensors file (its header: ")):
            safetensors_entries(str(lying))


# --- revert and metadata --------------------------------------------------------------------

def test_revert_to_safetensors_and_torch(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    tied = state_dict()
    tied["head.weight"] = tied["embed.weight"]
    flashpack_ops.save_file(tied, tmp_path / "m.flashpack")
    run("revert", tmp_path / "m.flashpack")
    back = load_file(tmp_path / "m.safetensors")
    for name, tensor in tied.items():
        assert_same(back[name], tensor, name)
    # As save_pretrained writes it: transformers refuses a checkpoint of another "format".
    with safe_open(tmp_path / "m.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    run("revert", tmp_path / "m.flashpack", tmp_path / "m.pt")
    back = torch.load(tmp_path / "m.pt", weights_only=True)
    for name, tensor in tied.items():
        assert_same(back[name], tensor, name)
    assert back["head.weight"].data_ptr() == back["embed.weight"].data_ptr()


@pytest.mark.parametrize("dtype", [torch.complex128, torch.uint4], ids=str)
def test_revert_to_safetensors_of_a_dtype_it_lacks_says_to_write_pt(tmp_path, dtype):
    # uint4 tied: the copy safetensors needs for the second name has no kernel either.
    t = torch.zeros(8, dtype=torch.uint8).view(dtype) if dtype == torch.uint4 else torch.zeros(3, dtype=dtype)
    flashpack_ops.save_file({"a": t, "b": t}, tmp_path / "m.flashpack")
    result = run("revert", "-q", tmp_path / "m.flashpack", check=False)
    assert_one_line_error(result, f"safetensors cannot store {tmp_path / 'm.flashpack'}: ")
    assert "write a .pt file instead" in result.stderr
    if dtype == torch.uint4:  # torch.save has no sub-byte dtypes either: said in one line
        result = run("revert", "-q", tmp_path / "m.flashpack", tmp_path / "m.pt", check=False)
        assert_one_line_error(result, "torch.save cannot store")
    else:
        run("revert", tmp_path / "m.flashpack", tmp_path / "m.pt")


@pytest.mark.skipif(not hasattr(torch, "float4_e2m1fn_x2"), reason="float4_e2m1fn_x2 came with torch 2.8")
def test_revert_to_safetensors_of_a_tensor_its_writer_refuses_says_to_write_pt(tmp_path):
    # safetensors counts float4 values, two per byte: a 0-d float4_e2m1fn_x2 is half a byte to it.
    from flashpack_ops.commands import revert_from_flashpack

    t = torch.tensor(0x35, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    flashpack_ops.save_file({"scalar": t}, tmp_path / "m.flashpack")
    with pytest.raises(ValueError, match=f"safetensors cannot store {re.escape(str(tmp_path / 'm.flashpack'))}: .*"
                                         "write a .pt file instead"):
        revert_from_flashpack(tmp_path / "m.flashpack")
    assert os.listdir(tmp_path) == ["m.flashpack"]
    result = run("revert", "-q", tmp_path / "m.flashpack", check=False)
    assert_one_line_error(result, f"safetensors cannot store {tmp_path / 'm.flashpack'}: ")
    run("revert", tmp_path / "m.flashpack", tmp_path / "m.pt")
    back = torch.load(tmp_path / "m.pt", weights_only=True)["scalar"]
    assert back.dtype == t.dtype and back.shape == t.shape and torch.equal(back.view(torch.uint8), t.view(torch.uint8))


def test_revert_never_overwrites_a_default_destination(tmp_path):
    from safetensors.torch import load_file, save_file

    # After an in-place convert, model.safetensors is the user's original checkpoint.
    original = state_dict(1)
    save_file(original, tmp_path / "model.safetensors")
    flashpack_ops.save_file(state_dict(), tmp_path / "model.flashpack")
    for source in (tmp_path, tmp_path / "model.flashpack"):
        assert_one_line_error(run("revert", source, check=False),
                              f"{tmp_path / 'model.safetensors'} already exists; give the destination explicitly")
    for name, tensor in load_file(tmp_path / "model.safetensors").items():
        assert_same(tensor, original[name], name)

    run("revert", tmp_path, tmp_path / "model.safetensors")  # named: overwritten as asked
    for name, tensor in load_file(tmp_path / "model.safetensors").items():
        assert_same(tensor, state_dict()[name], name)


def test_revert_never_puts_a_file_in_place_of_a_fifo(tmp_path):
    # As save_file refuses it: the rename would replace the FIFO (a reader waiting on it would
    # wait forever), or a device node reached through a link, with a regular file.
    flashpack_ops.save_file(state_dict(), tmp_path / "m.flashpack")
    fifo = tmp_path / "out.safetensors"
    os.mkfifo(fifo)
    os.symlink(fifo, tmp_path / "link.pt")
    for destination in (fifo, tmp_path / "link.pt"):
        result = run("revert", "-q", tmp_path / "m.flashpack", destination, check=False)
        assert_one_line_error(result, f"cannot write {destination}: it is not a regular file (a device, FIFO or socket)")
        assert "[Errno" not in result.stderr
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert sorted(os.listdir(tmp_path)) == ["link.pt", "m.flashpack", "out.safetensors"]


def test_revert_onto_a_bind_mounted_file_says_why_it_cannot(tmp_path):
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode:
        pytest.skip("no mount namespace can be made here")
    flashpack_ops.save_file(state_dict(), tmp_path / "m.flashpack")
    (tmp_path / "mounted.pt").write_bytes(b"old")
    (tmp_path / "dst.pt").write_bytes(b"")
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    script = f"mount --bind mounted.pt dst.pt && exec {shlex.quote(sys.executable)} -m flashpack_ops revert -q " \
             "m.flashpack dst.pt"
    result = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, cwd=tmp_path,
                            env=environment, timeout=300)
    assert_one_line_error(result, "cannot write dst.pt: it is a mount point (a file mounted on its own")
    assert (tmp_path / "mounted.pt").read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["dst.pt", "m.flashpack", "mounted.pt"]


def test_revert_to_a_name_too_long_is_a_one_line_error(tmp_path):
    flashpack_ops.save_file(state_dict(), tmp_path / "m.flashpack")
    result = run("revert", "-q", tmp_path / "m.flashpack", tmp_path / ("x" * 300 + ".pt"), check=False)
    assert_one_line_error(result, "File name too long: ")
    assert sorted(os.listdir(tmp_path)) == ["m.flashpack"]


def test_revert_to_safetensors_of_a_tensor_named_metadata_says_to_write_pt(tmp_path):
    # "__metadata__" is the key a .safetensors header keeps for its metadata: a tensor under that
    # name would make a file no reader opens.
    flashpack_ops.save_file({"__metadata__": torch.ones(2), "w": torch.zeros(3)}, tmp_path / "m.flashpack")
    result = run("revert", "-q", tmp_path / "m.flashpack", check=False)
    assert_one_line_error(result, f"safetensors cannot store {tmp_path / 'm.flashpack'}: a tensor is named "
                                  "'__metadata__'")
    assert sorted(os.listdir(tmp_path)) == ["m.flashpack"]
    run("revert", "-q", tmp_path / "m.flashpack", tmp_path / "m.pt")
    assert torch.equal(torch.load(tmp_path / "m.pt", weights_only=True)["__metadata__"], torch.ones(2))


@pytest.mark.parametrize("layout", ["model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                                    "file", "device"])
def test_convert_of_a_fifo_or_device_is_refused_at_once(tmp_path, layout):
    # A directory unpacked from an archive may hold a FIFO where its checkpoint should be:
    # opening it would wait for a writer forever.
    if layout == "device":
        source, checkpoint = "/dev/zero", "/dev/zero"
    else:
        model = tmp_path / "model"
        model.mkdir()
        checkpoint = model / ("x.safetensors" if layout == "file" else layout)
        os.mkfifo(checkpoint)
        source = checkpoint if layout == "file" else model
    result = run("convert", source, tmp_path / "out.flashpack", check=False)
    assert_one_line_error(result, f"{checkpoint} is not a regular file (a FIFO, device or socket)")
    assert not (tmp_path / "out.flashpack").exists()


def test_cli_errors_write_a_files_control_characters_as_escapes(tmp_path):
    # A hostile file's entry names may hold a terminal's escape sequences: the one-line error
    # quotes them, as the metadata listing does.
    name = "\x1b]0;title\x07\x1b[2Jred"
    flashpack_ops.save_file({name: torch.ones(2, 3)}, tmp_path / "m.flashpack")
    data = bytearray((tmp_path / "m.flashpack").read_bytes())
    at = data.rindex(b'"length":')
    data[at:at + 10] = b'"length":7'  # the shape holds 6 elements
    (tmp_path / "m.flashpack").write_bytes(bytes(data))
    result = run("metadata", tmp_path / "m.flashpack", check=False)
    assert_one_line_error(result, "index entry '\\x1b]0;title\\x07\\x1b[2Jred': the shape holds 6 elements")
    assert "\x1b" not in result.stderr and "\x07" not in result.stderr


@pytest.mark.parametrize("name, content, said", [
    ("model.safetensors", b"garbage!", "model.safetensors is not a valid safetensors file: "),
    ("model.bin", b"\xf9" * 64, "model.bin: torch.load(weights_only=True) cannot read it: "),
    ("model.pt", b"PK\x03\x04" + b"\x00" * 60, "model.pt is not a readable torch checkpoint: "),
    ("model.pt", b"", "model.pt is not a readable torch checkpoint (empty, truncated or not a torch file): "),
    ("model.bin", b"\x80\x02", "model.bin is not a readable torch checkpoint (empty, truncated or not a torch file): "),
    ("model.ckpt", b"junkjunkjunkjunkjunk", "model.ckpt is not a readable torch checkpoint (empty, truncated or not a "
                                            "torch file): "),
], ids=["safetensors", "pickle", "zip", "empty", "truncated", "other"])
def test_convert_of_a_damaged_checkpoint_names_it(tmp_path, name, content, said):
    (tmp_path / name).write_bytes(content)
    result = run("convert", tmp_path / name, tmp_path / "out.flashpack", check=False)
    assert_one_line_error(result, f"{tmp_path / said}")
    assert "weights_only` set to `False`" not in result.stderr  # a damaged file is no reason to unpickle freely
    assert not (tmp_path / "out.flashpack").exists()


def test_convert_of_a_torch_file_in_the_legacy_format(tmp_path):
    # Files torch saved before its zip format cannot be mapped: read whole instead.
    torch.save(state_dict(), tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    run("convert", tmp_path / "old.pt", tmp_path / "old.flashpack")
    back = flashpack_ops.load_file(tmp_path / "old.flashpack")
    assert list(back) == list(state_dict())
    for name, tensor in state_dict().items():
        assert_same(back[name], tensor, name)


def test_revert_of_a_model_transformers_renames_writes_the_checkpoint_names_back(tmp_path):
    # A MoE's experts are fused as transformers 5 loads them: the file holds the fused names,
    # and revert gives back those save_pretrained writes, tensor for tensor.
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    config = transformers.Qwen2MoeConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, num_experts=2,
                                         num_experts_per_tok=1, moe_intermediate_size=8,
                                         shared_expert_intermediate_size=8)
    torch.manual_seed(0)
    transformers.Qwen2MoeForCausalLM(config).save_pretrained(tmp_path / "hf")
    run("convert", tmp_path / "hf", tmp_path / "fp")
    fused = flashpack_ops.load_file(tmp_path / "fp" / "model.flashpack")
    assert any(name.endswith("experts.gate_up_proj") for name in fused)
    run("revert", tmp_path / "fp", tmp_path / "back.safetensors")
    original, back = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "back.safetensors")
    assert sorted(back) == sorted(original)
    for name, tensor in original.items():
        assert_same(back[name], tensor, name)


def test_revert_into_a_directory_writes_the_default_name_there(tmp_path):
    from safetensors.torch import load_file

    flashpack_ops.save_file(state_dict(), tmp_path / "m.flashpack")
    (tmp_path / "out").mkdir()
    run("revert", tmp_path / "m.flashpack", tmp_path / "out")
    for name, tensor in load_file(tmp_path / "out" / "m.safetensors").items():
        assert_same(tensor, state_dict()[name], name)
    # A file of that name there is replaced only when named.
    assert_one_line_error(run("revert", tmp_path / "m.flashpack", tmp_path / "out", check=False),
                          f"{tmp_path / 'out' / 'm.safetensors'} already exists")


def test_revert_into_a_directory_named_with_a_trailing_slash_creates_it(tmp_path):
    # `flashpack revert model.flashpack out/`: the slash says a directory, as it does for convert.
    from safetensors.torch import load_file

    flashpack_ops.save_file(state_dict(), tmp_path / "m.flashpack")
    run("revert", tmp_path / "m.flashpack", str(tmp_path / "out") + os.sep)
    assert os.listdir(tmp_path / "out") == ["m.safetensors"]
    for name, tensor in load_file(tmp_path / "out" / "m.safetensors").items():
        assert_same(tensor, state_dict()[name], name)


def test_revert_onto_the_file_itself_is_refused_and_leaves_it_whole(tmp_path):
    flashpack_ops.save_file(state_dict(), tmp_path / "m.flashpack")
    os.symlink("m.flashpack", tmp_path / "same.pt")
    os.link(tmp_path / "m.flashpack", tmp_path / "hard.safetensors")
    for destination in ("same.pt", "hard.safetensors"):
        assert_one_line_error(run("revert", tmp_path / "m.flashpack", tmp_path / destination, check=False),
                              f"{tmp_path / destination} is the file being reverted")
    for name, tensor in flashpack_ops.load_file(tmp_path / "m.flashpack").items():
        assert_same(tensor, state_dict()[name], name)


@pytest.mark.parametrize("extension", [".safetensors", ".pt"])
def test_revert_into_a_missing_directory_names_the_destination_not_a_temporary(tmp_path, capsys, extension):
    flashpack_ops.save_file(state_dict(), tmp_path / "m.flashpack")
    destination = tmp_path / "absent" / f"m{extension}"
    assert cli.main(["revert", "-q", str(tmp_path / "m.flashpack"), str(destination)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"flashpack revert: error: cannot write {destination}: No such file or directory: "
                   f"{tmp_path / 'absent'}"], err
    assert not (tmp_path / "absent").exists()


@pytest.mark.parametrize("extension", [".safetensors", ".pt"])
def test_revert_to_a_name_near_the_file_system_limit(tmp_path, extension):
    # 250 bytes: room for the name, not for a temporary name built on all of it.
    stem = "w" * (250 - len(extension))
    flashpack_ops.save_file(state_dict(), tmp_path / "m.flashpack")
    run("revert", tmp_path / "m.flashpack", tmp_path / (stem + extension))
    assert sorted(os.listdir(tmp_path)) == sorted(["m.flashpack", stem + extension])


@pytest.mark.parametrize("destination", ["old.pt", "old.safetensors"])
def test_a_failed_revert_leaves_the_old_destination_and_nothing_else(tmp_path, destination):
    from safetensors.torch import load_file, save_file

    old = {"kept": torch.arange(5.0)}
    torch.save(old, tmp_path / "old.pt")
    save_file(old, tmp_path / "old.safetensors")
    os.chmod(tmp_path / destination, 0o640)
    flashpack_ops.save_file({"a": torch.ones(3), "u": torch.zeros(3, dtype=torch.uint8).view(torch.uint1)},
                            tmp_path / "u1.flashpack")
    assert run("revert", "-q", tmp_path / "u1.flashpack", tmp_path / destination, check=False).returncode == 1
    assert sorted(os.listdir(tmp_path)) == ["old.pt", "old.safetensors", "u1.flashpack"]
    back = torch.load(tmp_path / "old.pt", weights_only=True) if destination.endswith(".pt") else \
        load_file(tmp_path / destination)
    assert_same(back["kept"], old["kept"], "kept")

    flashpack_ops.save_file(state_dict(), tmp_path / "m.flashpack")
    run("revert", tmp_path / "m.flashpack", tmp_path / destination)  # replaced, keeping its permissions
    assert os.stat(tmp_path / destination).st_mode & 0o777 == 0o640
    assert sorted(os.listdir(tmp_path)) == ["m.flashpack", "old.pt", "old.safetensors", "u1.flashpack"]


def test_metadata_summary_index_and_json(tmp_path, capsys):
    path = tmp_path / "m.flashpack"
    flashpack_ops.save_file(state_dict(), path)
    result = run("metadata", path, "--show-index")
    assert "format:      flashpack_v4" in result.stdout and "tensors:     4" in result.stdout
    assert "layer.bias" in result.stdout and "bfloat16" in result.stdout

    assert cli.main(["metadata", str(path), "--json"]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["format"] == "flashpack_v4" and "index" not in meta
    assert cli.main(["metadata", str(path), "--json", "--show-index"]) == 0
    assert len(json.loads(capsys.readouterr().out)["index"]) == 4


def test_metadata_shows_names_a_terminal_would_act_on_as_literals(tmp_path, capsys):
    # A file's names are any string: printed as they are, a newline would forge a line of the
    # listing and an escape sequence would drive the terminal.
    path = tmp_path / "m.flashpack"
    names = ["plain.weight", "x\nverified:    forged", "\x1b[2J\x1b]0;title\x07", "\x9b31m", "caf\u00e9"]
    flashpack_ops.save_file({name: torch.ones(2) for name in names}, path)
    assert cli.main(["metadata", str(path), "--show-index"]) == 0
    out = capsys.readouterr().out
    assert not any(c in out for c in "\x1b\x07\x9b") and "\nverified:" not in out
    for shown in ("plain.weight", repr(names[1]), repr(names[2]), repr(names[3]), "caf\u00e9"):
        assert f"  {shown} " in out, shown


def test_metadata_shows_keys_a_terminal_would_act_on_as_literals(tmp_path, capsys):
    # The file's metadata keys are any string too, as its values (shown as literals already).
    path = tmp_path / "m.flashpack"
    key = "x\nverified:    forged \x1b[2J"
    flashpack_ops.save_file({"w": torch.ones(2)}, path, metadata={key: "v", "format": "pt"})
    assert cli.main(["metadata", str(path)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\nverified:" not in out
    assert f"metadata:    {key!r}='v', format='pt'" in out


def test_metadata_counts_tied_tensors_once_and_says_its_units(tmp_path):
    path = tmp_path / "tied.flashpack"
    weight = torch.ones(4, 4)
    flashpack_ops.save_file({"embed": weight, "head": weight, "ids": torch.arange(3)}, path)
    out = run("metadata", path, "--show-index").stdout
    assert "tensors:     3 (1 tied to another, stored once)" in out and "elements:    19 stored" in out
    assert "1: int64            at byte          4,096  24 B" in out
    assert "ids    int64            (3,)                 block 1 element 0" in out


@pytest.mark.parametrize("blocks", [[{"dtype": "int32", "offset_bytes": 0, "length_bytes": 8, "length_elems": 2}], [],
                                    "other"])
def test_metadata_reads_a_v3_footer_by_its_format(tmp_path, capsys, blocks):
    # Another writer's "macroblocks" in a flashpack_v3 footer: loads ignore it (the C++ reader
    # and the reference read a v3 footer's one block from "target_dtype"), and so must the summary.
    path = tmp_path / "v3.flashpack"
    footer = json.dumps({"format": "flashpack_v3", "target_dtype": "float32", "align_bytes": 128, "total_elems": 2,
                         "index": [{"name": "w", "shape": [2], "offset": 0, "length": 2}],
                         "macroblocks": blocks}).encode()
    path.write_bytes(torch.tensor([1.5, -2.0]).numpy().tobytes() + footer + len(footer).to_bytes(8, "little") +
                     b"FLASHPK\0")
    assert flashpack_ops.load_file(path)["w"].dtype == torch.float32
    assert cli.main(["metadata", str(path), "--show-index"]) == 0
    out = capsys.readouterr().out
    assert "0: float32          at byte              0  8 B" in out
    assert "w  float32          (2,)                 block 0 element 0" in out


@pytest.mark.parametrize("kind", ["file", "index"])
def test_convert_keeps_safetensors_metadata_and_revert_writes_it_back(tmp_path, kind):
    from safetensors import safe_open
    from safetensors.torch import save_file

    metadata = {"format": "pt", "source": "a fine-tune"}
    tensors = state_dict()
    if kind == "file":
        save_file(tensors, tmp_path / "model.safetensors", metadata=metadata)
        source = tmp_path / "model.safetensors"
    else:  # two shards with the same metadata, as save_pretrained writes them
        names = list(tensors)
        save_file({n: tensors[n] for n in names[:2]}, tmp_path / "model-1.safetensors", metadata=metadata)
        save_file({n: tensors[n] for n in names[2:]}, tmp_path / "model-2.safetensors", metadata=metadata)
        weight_map = {n: "model-1.safetensors" if n in names[:2] else "model-2.safetensors" for n in names}
        source = tmp_path / "model.safetensors.index.json"
        source.write_text(json.dumps({"metadata": {"total_size": 1}, "weight_map": weight_map}))
    run("convert", source, tmp_path / "out.flashpack")
    assert flashpack_ops.read_metadata(tmp_path / "out.flashpack")["metadata"] == metadata
    # Sorted: the same checkpoint converts to the same bytes (safetensors' order varies by run).
    assert "metadata:    format='pt', source='a fine-tune'\n" in run("metadata", tmp_path / "out.flashpack").stdout
    run("revert", tmp_path / "out.flashpack", tmp_path / "back.safetensors")
    with safe_open(tmp_path / "back.safetensors", framework="pt") as f:
        assert f.metadata() == metadata


def test_metadata_verify(tmp_path, capsys):
    path = tmp_path / "m.flashpack"
    can_verify = hasattr(flashpack_ops, "verify_file")
    flashpack_ops.save_file(state_dict(), path, **({"checksum": True} if can_verify else {}))
    status = cli.main(["metadata", str(path), "--verify"])
    captured = capsys.readouterr()
    if can_verify:
        assert status == 0 and "verified" in captured.out
        flashpack_ops.save_file(state_dict(), path)  # no checksums: nothing to verify
        assert cli.main(["metadata", str(path), "--verify"]) == 1
        assert "flashpack convert --checksum` or save it with checksum=True" in capsys.readouterr().err
    else:
        assert status == 1 and "needs flashpack_ops.verify_file" in captured.err


def test_metadata_of_a_file_without_tensors_saved_with_checksums(tmp_path, capsys):
    # The index's checksum is all there is to check: the summary says so, as --verify does.
    path = tmp_path / "empty.flashpack"
    flashpack_ops.save_file({}, path, checksum=True)
    assert cli.main(["metadata", str(path), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "checksums:   yes" in out and "verified" in out
    flashpack_ops.save_file({}, path)
    assert cli.main(["metadata", str(path)]) == 0
    assert "checksums:   no" in capsys.readouterr().out


@pytest.mark.parametrize("closed", [1, 2], ids=["stdout", "stderr"])
@pytest.mark.parametrize("command", ["convert", "revert", "metadata"])
def test_a_command_started_with_its_output_closed_still_succeeds(tmp_path, command, closed):
    # Python then has no sys.stdout (or sys.stderr) at all: what would be written, progress
    # bars included, goes nowhere.
    from safetensors.torch import load_file, save_file

    save_file(state_dict(), str(tmp_path / "m.safetensors"))
    flashpack_ops.save_file(state_dict(), tmp_path / "m.flashpack")
    args = {"convert": ["convert", tmp_path / "m.safetensors", tmp_path / "out.flashpack"],
            "revert": ["revert", tmp_path / "m.flashpack", tmp_path / "back.safetensors"],  # with a progress bar
            "metadata": ["metadata", tmp_path / "m.flashpack"]}[command]
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-m", "flashpack_ops", *map(str, args)], capture_output=True,
                            text=True, env=environment, timeout=300, preexec_fn=lambda: os.close(closed))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "error" not in result.stdout + result.stderr
    if command == "convert":
        assert sorted(flashpack_ops.load_file(tmp_path / "out.flashpack")) == sorted(state_dict())
    elif command == "revert":
        assert sorted(load_file(str(tmp_path / "back.safetensors"))) == sorted(state_dict())


# --- errors ---------------------------------------------------------------------------------

def test_missing_source_fails_in_one_line_with_status_1(tmp_path):
    assert_one_line_error(run("convert", tmp_path / "nope.safetensors", check=False),
                          "no such file or directory")


@pytest.mark.parametrize("args, message", [
    (["convert", "{tmp}/w.txt"], "unknown checkpoint type"),
    (["convert", "{tmp}/w.safetensors", "--dtype", "float7"], "unknown dtype 'float7'"),
    (["convert", "{tmp}"], "holds no checkpoint to convert"),
    (["metadata", "{tmp}/w.safetensors"], "not a flashpack file"),
    (["revert", "{tmp}/missing.flashpack"], "missing.flashpack"),
    (["revert", "{tmp}/m.flashpack", "{tmp}/m.txt"], "unknown extension"),
])
def test_errors_are_one_line(tmp_path, capsys, args, message):
    from safetensors.torch import save_file

    (tmp_path / "w.txt").write_text("weights")
    save_file(state_dict(), tmp_path / "w.safetensors")
    flashpack_ops.save_file(state_dict(), tmp_path / "m.flashpack")
    if args == ["convert", "{tmp}"]:
        (tmp_path / "w.safetensors").unlink()
        (tmp_path / "m.flashpack").unlink()
    assert cli.main([a.format(tmp=tmp_path) for a in args]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("convert", "revert", "metadata"):
        assert command in out


# --- the reference package's command --------------------------------------------------------

def test_file_converted_by_reference_cli_loads(tmp_path):
    pytest.importorskip("flashpack")
    from safetensors.torch import save_file

    save_file(state_dict(), tmp_path / "model.safetensors")
    # The reference command imports its diffusers integration at start, which fails with the
    # diffusers releases that work with torch 2.13; hide diffusers from that check.
    launcher = ("import importlib.util as u, runpy, sys\n"
                "find = u.find_spec\n"
                "u.find_spec = lambda name, *a: None if name == 'diffusers' else find(name, *a)\n"
                "sys.argv = ['flashpack'] + sys.argv[1:]\n"
                "runpy.run_module('flashpack', run_name='__main__')\n")
    result = subprocess.run([sys.executable, "-c", launcher, "convert", str(tmp_path / "model.safetensors"),
                             str(tmp_path / "ref.flashpack")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert_file_holds(tmp_path / "ref.flashpack", state_dict())


def test_the_installed_command_is_ours():
    # The reference package installs a `flashpack` command as well; set-up installs it first
    # so that ours, installed after it, is the one a user runs.
    command = os.path.join(os.path.dirname(sys.executable), "flashpack")
    if not os.path.exists(command):
        pytest.skip(f"no flashpack command beside {sys.executable} (flashpack_ops is not pip-installed here)")
    result = subprocess.run([command, "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == f"flashpack_ops {flashpack_ops.__version__}", \
        f"{command} is not flashpack_ops's command: {result.stdout}{result.stderr}"


def test_an_integer_dtype_is_refused_before_anything_is_written(tmp_path):
    from safetensors.torch import save_file

    save_file(state_dict(), tmp_path / "model.safetensors")
    result = run("convert", tmp_path / "model.safetensors", "--dtype", "int8", check=False)
    assert_one_line_error(result, "dtype int8: torch.int8 is not a floating-point dtype")
    assert not (tmp_path / "model.flashpack").exists()


def test_revert_of_a_file_that_is_no_flashpack_file_says_so(tmp_path):
    # Not that its default destination (the same .safetensors file) exists.
    from safetensors.torch import save_file

    save_file(state_dict(), tmp_path / "model.safetensors")
    result = run("revert", tmp_path / "model.safetensors", check=False)
    assert_one_line_error(result, "not a flashpack file (the last 8 bytes are not the magic")
    assert "looks like a safetensors file" in result.stderr


def test_output_cut_short_by_its_reader_ends_quietly(tmp_path):
    # `flashpack metadata -i big.flashpack | head`: no error, no traceback.
    path = tmp_path / "many.flashpack"
    flashpack_ops.save_file({f"layers.{k}.weight": torch.ones(2) for k in range(20_000)}, path)
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    for flags in (["-i"], ["-i", "-j"]):
        process = subprocess.Popen([sys.executable, "-m", "flashpack_ops", "metadata", *flags, str(path)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment)
        process.stdout.read(100)
        process.stdout.close()
        stderr = process.stderr.read().decode()
        assert process.wait(timeout=120) == 0 and stderr == "", stderr


def test_a_convert_that_fails_leaves_no_directory_it_created(tmp_path):
    source = tmp_path / "sparse.pt"
    torch.save({"w": torch.randn(4, 4).to_sparse()}, source)  # read fine; the save refuses it
    result = run("convert", source, tmp_path / "new" / "deeper" / "out.flashpack", check=False)
    assert_one_line_error(result, "only dense (strided) tensors can be saved")
    assert sorted(os.listdir(tmp_path)) == ["sparse.pt"]
    # A directory that was there stays.
    (tmp_path / "there").mkdir()
    assert_one_line_error(run("convert", source, tmp_path / "there" / "new" / "out.flashpack", check=False),
                          "only dense (strided) tensors can be saved")
    assert os.listdir(tmp_path / "there") == []


def test_convert_creates_the_destination_directory(tmp_path):
    from safetensors.torch import save_file

    save_file(state_dict(), tmp_path / "model.safetensors")
    run("convert", tmp_path / "model.safetensors", str(tmp_path / "new" / "dir") + os.sep)
    assert_file_holds(tmp_path / "new" / "dir" / "model.flashpack", state_dict())
    run("convert", tmp_path / "model.safetensors", tmp_path / "other" / "m.flashpack")
    assert_file_holds(tmp_path / "other" / "m.flashpack", state_dict())


def test_a_model_directory_is_not_converted_to_a_file_name(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(num_hidden_layers=1, hidden_size=16, intermediate_size=32,
                                      num_attention_heads=2, num_key_value_heads=1, vocab_size=32)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    result = run("convert", tmp_path / "llama", tmp_path / "out.flashpack", check=False)
    assert_one_line_error(result, "out.flashpack: a model directory converts to a directory")
    assert not (tmp_path / "out.flashpack").exists()
    # The Python function takes a path object as well as a str.
    from flashpack_ops.commands import convert_to_flashpack

    written = convert_to_flashpack(tmp_path / "llama", tmp_path / "out")
    assert written == str(tmp_path / "out" / "model.flashpack") and os.path.isfile(written)


def test_a_safetensors_file_under_a_torch_name_converts(tmp_path):
    from safetensors.torch import save_file

    save_file(state_dict(), tmp_path / "pytorch_model.bin", metadata={"format": "pt", "source": "bin"})
    run("convert", tmp_path / "pytorch_model.bin", tmp_path / "m.flashpack")
    assert_file_holds(tmp_path / "m.flashpack", state_dict())
    assert flashpack_ops.read_metadata(tmp_path / "m.flashpack")["metadata"] == {"format": "pt", "source": "bin"}


def test_convert_repo_id_downloads_the_weights_it_converts_and_no_others(tmp_path, hub):
    from safetensors.torch import save_file

    repo = os.path.join(hub.root, "org", "raw")
    os.makedirs(repo)
    save_file(state_dict(), os.path.join(repo, "model.safetensors"))
    torch.save(state_dict(), os.path.join(repo, "pytorch_model.bin"))
    torch.save(state_dict(1), os.path.join(repo, "pytorch_model.fp16.bin"))  # a variant only in torch
    others = ["tf_model.h5", "flax_model.msgpack", "rust_model.ot", "onnx/model.onnx", "model.flashpack"]
    for other in others:
        os.makedirs(os.path.dirname(os.path.join(repo, other)), exist_ok=True)
        with open(os.path.join(repo, other), "wb") as f:
            f.write(b"not for torch")
    run("convert", "org/raw", tmp_path / "out.flashpack")
    assert_file_holds(tmp_path / "out.flashpack", state_dict())
    assert hub.fetched("org/raw") == ["model.safetensors"]
    # A variant that only a torch file holds is read from it.
    run("convert", "org/raw", tmp_path / "fp16.flashpack", "--variant", "fp16")
    assert_file_holds(tmp_path / "fp16.flashpack", state_dict(1))
    assert "pytorch_model.fp16.bin" in hub.fetched("org/raw") and not set(hub.fetched("org/raw")) & set(others)
    # Offline, the same conversions read what the cache holds.
    run("convert", "org/raw", tmp_path / "offline.flashpack", env={"HF_HUB_OFFLINE": "1"})
    assert_file_holds(tmp_path / "offline.flashpack", state_dict())


def test_convert_pipeline_repo_id_downloads_its_components_only(tmp_path, hub, pipeline_directory):
    diffusers = pytest.importorskip("diffusers")
    repo = os.path.join(hub.root, "org", "pipe")
    shutil.copytree(pipeline_directory, repo)
    for extra in ("single-file.safetensors", "unet_ema/diffusion_pytorch_model.safetensors"):
        os.makedirs(os.path.dirname(os.path.join(repo, extra)), exist_ok=True)
        shutil.copy(os.path.join(repo, "unet", "diffusion_pytorch_model.safetensors"), os.path.join(repo, extra))
    run("convert", "org/pipe", tmp_path / "fp")
    assert not any(f.startswith(("single-file", "unet_ema/")) for f in hub.fetched("org/pipe"))
    loaded = diffusers.DiffusionPipeline.from_pretrained(pipeline_directory)
    from flashpack_ops.integrations.diffusers import load_pipeline_flashpack

    converted = load_pipeline_flashpack(diffusers.DiffusionPipeline, tmp_path / "fp")
    for name, tensor in loaded.unet.state_dict().items():
        assert_same(converted.unet.state_dict()[name], tensor, name)


def test_convert_repo_id_with_a_sharded_variant_downloads_its_shards_only(tmp_path, hub):
    from safetensors.torch import save_file

    repo = os.path.join(hub.root, "org", "shards")
    os.makedirs(repo)
    tensors = state_dict()
    names = sorted(tensors)
    shards = {"model.fp16-00001-of-00002.safetensors": names[:2], "model.fp16-00002-of-00002.safetensors": names[2:]}
    for shard, held in shards.items():
        save_file({n: tensors[n] for n in held}, os.path.join(repo, shard))
    with open(os.path.join(repo, "model.safetensors.index.fp16.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": {n: shard for shard, held in shards.items() for n in held}}, f)
    torch.save(tensors, os.path.join(repo, "pytorch_model.fp16.bin"))
    run("convert", "org/shards", tmp_path / "out.flashpack", "--variant", "fp16")
    assert_file_holds(tmp_path / "out.flashpack", tensors)
    assert hub.fetched("org/shards") == sorted(list(shards) + ["model.safetensors.index.fp16.json"])


def test_main_imports_from_dunder_main_as_the_reference_entry_point_and_runs_nothing(tmp_path):
    # The reference's console script is `flashpack.__main__:main`: importing the module
    # must give `main` without running the command (and exiting the importer).
    flashpack_ops.save_file(state_dict(), tmp_path / "model.flashpack")
    launcher = ("import sys; from flashpack_ops.__main__ import main; print('imported'); "
                "sys.exit(main(['metadata', sys.argv[1], '--json']))")
    result = subprocess.run([sys.executable, "-c", launcher, str(tmp_path / "model.flashpack")], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("imported\n")
    assert json.loads(result.stdout.split("\n", 1)[1])["format"] == "flashpack_v4"


@pytest.mark.parametrize("option", ["variant", "subfolder", "revision"])
def test_convert_to_flashpack_of_a_file_refuses_the_options_that_pick_in_a_directory(tmp_path, option):
    # As the command line refuses them: variant="fp16" given the float32 file must not write float32 silently.
    from safetensors.torch import save_file

    from flashpack_ops.commands import convert_to_flashpack

    save_file(state_dict(), tmp_path / "model.safetensors")
    save_file({k: v.half() for k, v in state_dict().items()}, tmp_path / "model.fp16.safetensors")
    value = {"variant": "fp16", "subfolder": "unet", "revision": "main"}[option]
    with pytest.raises(ValueError, match=f"{option}= applies to a model directory or a Hub repo id, not to the file "
                                         f".*model.safetensors"):
        convert_to_flashpack(tmp_path / "model.safetensors", tmp_path / "out.flashpack", **{option: value})
    with pytest.raises(ValueError, match=f"{option}= applies to a model directory or a Hub repo id, not to a dict"):
        convert_to_flashpack(state_dict(), tmp_path / "out.flashpack", **{option: value})
    assert not (tmp_path / "out.flashpack").exists()
