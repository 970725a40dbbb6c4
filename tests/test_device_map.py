"""A model over several devices (device_map): each device loads only its modules' entries,
every tensor lands where the map says, and from_pretrained_flashpack adds accelerate's hooks
as from_pretrained does. Tests over two devices need a GPU (or two), and run on the GPU
machine; the rules (what must be covered, what is refused) run everywhere."""

import os
import subprocess
import sys

import pytest
import torch

import flashpack_ops
from conftest import assert_same
from flashpack_ops.mixin import init_empty_parameters

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from flashpack_ops.integrations.transformers import from_pretrained_flashpack, save_pretrained_flashpack  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPUS = torch.cuda.device_count()
IDS = torch.tensor([[1, 5, 9, 33, 2, 101, 7, 64]])


def emulated() -> bool:
    return GPUS > 0 and torch.cuda.get_device_name(0).endswith("(fake cudart)")


MiB = 1 << 20


class Net(torch.nn.Module):
    """Parts of a few MiB each, so that a device holding more than its own shows."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(2048, 512)  # 4 MiB
        self.layers = torch.nn.ModuleList(torch.nn.Linear(512, 512) for _ in range(3))  # 1 MiB each
        self.head = torch.nn.Linear(512, 2048)  # 4 MiB
        self.register_buffer("scale", torch.arange(16.0), persistent=False)


def held(module, device):
    return sum(t.nbytes for t in module.state_dict().values() if t.device == torch.device(device))


@pytest.fixture
def net_file(tmp_path):
    torch.manual_seed(0)
    net = Net()
    path = tmp_path / "net.flashpack"
    flashpack_ops.save_file(net.state_dict(), path)
    return net, path


def test_a_map_within_one_device_loads_the_model(net_file):
    net, path = net_file
    with init_empty_parameters():
        empty = Net()
    flashpack_ops.assign_from_file(empty, path, device={"embed": "cpu", "layers.0": "cpu", "layers": "cpu",
                                                        "head.weight": "cpu", "head": "cpu"})
    for name, tensor in net.state_dict().items():
        assert_same(empty.state_dict()[name], tensor, name)
    assert torch.equal(empty.scale, torch.arange(16.0))  # not in the map, not in the file: kept


def test_every_tensor_of_the_state_dict_needs_a_place(net_file):
    _, path = net_file
    with init_empty_parameters():
        empty = Net()
    with pytest.raises(ValueError, match=r"the device_map places no module holding layers\.2\.weight, "
                                         r"layers\.2\.bias, head\.weight, head\.bias \(add their modules"):
        flashpack_ops.assign_from_file(empty, path, device={"embed": "cpu", "layers.0": "cpu", "layers.1": "cpu"})
    assert empty.embed.weight.is_meta  # untouched
    # What is ignored needs no place.
    flashpack_ops.assign_from_file(empty, path, device={"embed": "cpu", "layers": "cpu"}, strict=False,
                                   ignore_prefixes=["head."])


def test_a_device_map_value_that_is_no_device_is_named(net_file):
    _, path = net_file
    with init_empty_parameters():
        empty = Net()
    with pytest.raises(ValueError, match=r"device_map \{'layers': -1\}: not a device"):
        flashpack_ops.assign_from_file(empty, path, device={"embed": "cpu", "layers": -1, "head": "cpu"})


@pytest.mark.parametrize("place, message", [("disk", "offloading to disk is not supported"),
                                            ("meta", "cannot load onto the meta device")])
def test_disk_and_meta_are_refused(net_file, place, message):
    _, path = net_file
    with init_empty_parameters():
        empty = Net()
    with pytest.raises(ValueError, match=message):
        flashpack_ops.assign_from_file(empty, path, device={"embed": "cpu", "": place})


def test_a_wrapped_model_takes_no_device_map(net_file):
    _, path = net_file
    with init_empty_parameters():
        wrapped = torch.compile(Net())
    with pytest.raises(ValueError, match="holds the names of the model that OptimizedModule wraps"):
        flashpack_ops.assign_from_file(wrapped, path, device={"embed": "cpu", "layers": "cpu", "head": "cpu"})


def tiny_llama(tmp_path, layers=2, vocab=4096):
    # A 4 MiB embedding (vocab 4096 x 256 floats), so that a device holding it shows.
    config = LlamaConfig(num_hidden_layers=layers, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    directory = tmp_path / "llama"
    model.save_pretrained(directory)  # safetensors, for from_pretrained
    save_pretrained_flashpack(model, directory)
    return model, directory


def test_a_map_over_several_devices_needs_accelerate(tmp_path):
    _, directory = tiny_llama(tmp_path)
    code = ("import sys; sys.modules['accelerate'] = None\n"
            "from transformers import LlamaForCausalLM\n"
            "from flashpack_ops.integrations.transformers import from_pretrained_flashpack\n"
            "try:\n"
            f"    from_pretrained_flashpack(LlamaForCausalLM, {str(directory)!r},\n"
            "                              device_map={'model': 'cpu', 'lm_head': 'cuda:0'})\n"
            "except ImportError as e:\n"
            "    print(e)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert "a device_map over several devices needs accelerate" in result.stdout, result.stdout + result.stderr


def cpu_and_gpu_map():
    return {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": 0, "model.norm": 0,
            "model.rotary_emb": 0, "lm_head": 0}


@pytest.mark.skipif(GPUS < 1, reason="needs a CUDA GPU")
def test_a_model_over_the_cpu_and_a_gpu_matches_from_pretrained(tmp_path):
    pytest.importorskip("accelerate")
    model, directory = tiny_llama(tmp_path)
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated(0)
    loaded = from_pretrained_flashpack(LlamaForCausalLM, directory, device_map=cpu_and_gpu_map())
    # The GPU holds its modules' tensors, not the 4 MiB embedding and the layer kept on the CPU.
    gpu_bytes = sum(t.nbytes for t in loaded.state_dict().values() if t.is_cuda)
    assert 0 < torch.cuda.memory_allocated(0) - allocated < gpu_bytes + MiB
    # accelerate keeps the "cpu" modules' weights for its hooks: they are the file's.
    offloaded = loaded.model.embed_tokens._hf_hook.weights_map
    assert_same(offloaded["weight"], model.model.embed_tokens.weight, "model.embed_tokens.weight")
    # Placed as from_pretrained places them: "cpu" modules offloaded by accelerate's hooks
    # (kept in host memory, run on the GPU), the others on the GPU.
    theirs = LlamaForCausalLM.from_pretrained(directory, device_map=cpu_and_gpu_map()).eval()
    assert loaded.hf_device_map == theirs.hf_device_map
    assert {n: t.device for n, t in loaded.state_dict().items()} == {n: t.device for n, t in theirs.state_dict().items()}
    for name, tensor in loaded.state_dict().items():
        if not tensor.is_meta:
            assert_same(tensor, model.state_dict()[name], name)
    if emulated():
        return  # the emulated runtime moves bytes; it runs no kernels
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits.cpu(), theirs(IDS).logits.cpu())


class UnplacedLlama(LlamaForCausalLM):
    # As transformers' models that name parameters a device_map may leave unplaced: names
    # within a layer the planner cannot split (Qwen4Exp's "ple.ple_embedding...").
    _no_placement_params = ["mlp.down_proj.weight"]


def assert_placed_as_from_pretrained(loaded, theirs, model):
    assert loaded.hf_device_map == theirs.hf_device_map
    assert {n: t.device for n, t in loaded.state_dict().items()} == {n: t.device for n, t in theirs.state_dict().items()}
    for name, tensor in loaded.state_dict().items():
        if not tensor.is_meta:
            assert_same(tensor, model.state_dict()[name], name)


@pytest.mark.skipif(GPUS < 1, reason="needs a CUDA GPU")
def test_a_parameter_the_model_leaves_unplaced_goes_to_the_cpu_beside_a_gpu_as_from_pretrained_puts_it(tmp_path):
    pytest.importorskip("accelerate")
    model, directory = tiny_llama(tmp_path)
    layer = {f"model.layers.0.{part}": 0 for part in ("self_attn", "input_layernorm", "post_attention_layernorm",
                                                       "mlp.gate_proj", "mlp.up_proj", "mlp.act_fn")}
    device_map = {"model.embed_tokens": 0, **layer, "model.layers.1": 0, "model.norm": 0, "model.rotary_emb": 0,
                  "lm_head": "cpu"}
    with pytest.raises(ValueError, match="places no module holding model.layers.0.mlp.down_proj.weight"):
        from_pretrained_flashpack(LlamaForCausalLM, directory, device_map=device_map)
    loaded = from_pretrained_flashpack(UnplacedLlama, directory, device_map=device_map)
    theirs = UnplacedLlama.from_pretrained(directory, device_map=device_map).eval()
    assert loaded.model.layers[0].mlp.down_proj.weight.device == torch.device("cpu")
    assert_placed_as_from_pretrained(loaded, theirs, model)


@pytest.mark.skipif(GPUS < 2, reason="needs two CUDA GPUs")
def test_a_plan_over_the_gpus_that_leaves_a_parameter_unplaced_loads_as_from_pretrained_loads_it(tmp_path):
    # transformers' planner leaves a layer's down_proj out when the layer fits on no next GPU.
    pytest.importorskip("accelerate")
    config = LlamaConfig(num_hidden_layers=3, hidden_size=64, intermediate_size=2048, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = UnplacedLlama(config).eval()
    model.save_pretrained(tmp_path)
    save_pretrained_flashpack(model, tmp_path)
    max_memory = {0: 1_800_000, 1: 200_000, "cpu": 10**9}
    loaded = from_pretrained_flashpack(UnplacedLlama, tmp_path, device_map="sequential", max_memory=dict(max_memory))
    theirs = UnplacedLlama.from_pretrained(tmp_path, device_map="sequential", max_memory=dict(max_memory)).eval()
    unplaced = [name for name in model.state_dict()
                if not any(name == key or name.startswith(key + ".") for key in theirs.hf_device_map)]
    assert unplaced and all(loaded.state_dict()[name].device == torch.device("cpu") for name in unplaced)
    assert_placed_as_from_pretrained(loaded, theirs, model)


@pytest.mark.skipif(GPUS < 1, reason="needs a CUDA GPU")
def test_assign_from_file_puts_each_tensor_on_the_cpu_or_the_gpu_the_map_says(net_file):
    # No hooks here: where the tensors are is where the load put them.
    net, path = net_file
    with init_empty_parameters():
        empty = Net()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(0)
    flashpack_ops.assign_from_file(empty, path, device={"embed": "cpu", "layers": 0, "head": "cpu"})
    for name, tensor in empty.state_dict().items():
        assert tensor.device.type == ("cuda" if name.startswith("layers.") else "cpu"), name
        assert_same(tensor, net.state_dict()[name], name)
    # The layers (3 MiB), not the embedding and head (8 MiB) as well.
    assert torch.cuda.memory_allocated(0) - before < held(empty, "cuda:0") + MiB


@pytest.mark.skipif(GPUS < 2, reason="needs two CUDA GPUs")
def test_each_gpu_loads_only_its_modules(net_file):
    net, path = net_file
    with init_empty_parameters():
        empty = Net()
    placement = {"embed": "cuda:0", "layers.0": "cuda:0", "layers": "cuda:1", "head": "cpu"}
    before = [torch.cuda.memory_allocated(k) for k in range(2)]
    flashpack_ops.assign_from_file(empty, path, device=placement)
    for name, tensor in empty.state_dict().items():
        expected = ("cuda:0" if name.startswith(("embed", "layers.0.")) else
                    "cpu" if name.startswith("head") else "cuda:1")
        assert str(tensor.device) == expected, name
        assert_same(tensor, net.state_dict()[name], name)
    for k in range(2):
        assert torch.cuda.memory_allocated(k) - before[k] < held(empty, f"cuda:{k}") + MiB, k


@pytest.mark.skipif(GPUS < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("strategy", ["auto", "balanced"])
def test_auto_spreads_the_model_over_the_gpus_as_from_pretrained_does(tmp_path, strategy):
    pytest.importorskip("accelerate")
    model, directory = tiny_llama(tmp_path, layers=6)
    loaded = from_pretrained_flashpack(LlamaForCausalLM, directory, device_map=strategy)
    theirs = LlamaForCausalLM.from_pretrained(directory, device_map=strategy)
    placed = {name: t.device for name, t in loaded.state_dict().items()}
    assert placed == {name: t.device for name, t in theirs.state_dict().items()}
    assert len(set(placed.values())) > 1 and getattr(loaded, "hf_device_map", None) == theirs.hf_device_map
    for name, tensor in loaded.state_dict().items():
        assert_same(tensor, model.state_dict()[name], name)


@pytest.mark.skipif(GPUS < 2, reason="needs two CUDA GPUs")
def test_a_base_checkpoint_spreads_over_the_gpus_into_a_model_with_a_head_as_from_pretrained_does(tmp_path):
    pytest.importorskip("accelerate")
    model, directory = tiny_llama(tmp_path, layers=6)
    base_dir = tmp_path / "base"
    model.model.save_pretrained(base_dir)  # a LlamaModel checkpoint, without lm_head
    save_pretrained_flashpack(model.model, base_dir)
    with pytest.warns(UserWarning, match="initialised as from_pretrained initialises them: lm_head.weight"):
        loaded = from_pretrained_flashpack(LlamaForCausalLM, base_dir, device_map="auto", strict=False)
    theirs = LlamaForCausalLM.from_pretrained(base_dir, device_map="auto")
    assert loaded.hf_device_map == theirs.hf_device_map and len(set(loaded.hf_device_map.values())) > 1
    assert {n: t.device for n, t in loaded.state_dict().items()} == {n: t.device for n, t in theirs.state_dict().items()}
    for name, tensor in model.model.state_dict().items():
        assert_same(loaded.model.state_dict()[name], tensor, name)
