"""The `flashpack` command, run as a subprocess on real files of every source kind."""

import json
import os
import subprocess
import sys

import pytest
import torch

import flashpack_ops
from flashpack_ops import cli
from conftest import assert_same

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, env=None, check=True):
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]),
                       HF_HUB_DISABLE_PROGRESS_BARS="1")
    environment.update(env or {})
    result = subprocess.run([sys.executable, "-m", "flashpack_ops", *map(str, args)], capture_output=True,
                            text=True, env=environment, timeout=300)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def assert_one_line_error(result, text):
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
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


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".ckpt"])
def test_convert_torch_files(tmp_path, suffix):
    source = tmp_path / f"weights{suffix}"
    # A .ckpt from a training run nests the weights under "state_dict" beside other entries.
    torch.save({"state_dict": state_dict(), "epoch": 3} if suffix == ".ckpt" else state_dict(), source)
    result = run("convert", source, tmp_path / "out.flashpack")
    assert "wrote" in result.stdout
    assert_file_holds(tmp_path / "out.flashpack", state_dict())


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


def test_convert_pipeline_directory_and_subfolder(pipeline_directory, tmp_path):
    pytest.importorskip("diffusers")
    from flashpack_ops.integrations.diffusers import FlashPackDiffusionPipeline

    run("convert", pipeline_directory, tmp_path / "pipe")
    assert sorted(os.listdir(tmp_path / "pipe" / "unet")) == ["config.json", "model.flashpack"]
    assert FlashPackDiffusionPipeline.from_pretrained_flashpack(tmp_path / "pipe").unet is not None

    run("convert", pipeline_directory, tmp_path / "unet", "--subfolder", "unet")
    assert sorted(os.listdir(tmp_path / "unet")) == ["config.json", "model.flashpack"]


def test_convert_repo_id_offline_fails_in_one_line(tmp_path):
    pytest.importorskip("huggingface_hub")
    result = run("convert", "no-such-org/no-such-model", tmp_path / "out", env={"HF_HUB_OFFLINE": "1"}, check=False)
    assert_one_line_error(result, "cannot download 'no-such-org/no-such-model' from the Hugging Face Hub "
                                  "(HF_HUB_OFFLINE is set)")


# --- revert and metadata --------------------------------------------------------------------

def test_revert_to_safetensors_and_torch(tmp_path):
    from safetensors.torch import load_file

    tied = state_dict()
    tied["head.weight"] = tied["embed.weight"]
    flashpack_ops.save_file(tied, tmp_path / "m.flashpack")
    run("revert", tmp_path / "m.flashpack")
    back = load_file(tmp_path / "m.safetensors")
    for name, tensor in tied.items():
        assert_same(back[name], tensor, name)
    run("revert", tmp_path / "m.flashpack", tmp_path / "m.pt")
    back = torch.load(tmp_path / "m.pt", weights_only=True)
    for name, tensor in tied.items():
        assert_same(back[name], tensor, name)
    assert back["head.weight"].data_ptr() == back["embed.weight"].data_ptr()


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
        assert "save it with checksum=True" in capsys.readouterr().err
    else:
        assert status == 1 and "needs flashpack_ops.verify_file" in captured.err


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
