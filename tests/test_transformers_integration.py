"""transformers: save_pretrained_flashpack / from_pretrained_flashpack on a tiny Llama built from a config."""

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

import flashpack_ops  # noqa: E402
from flashpack_ops.integrations._hub import HubUnavailableError  # noqa: E402
from flashpack_ops.integrations.transformers import (  # noqa: E402
    FlashPackTransformersModelMixin,
    from_pretrained_flashpack,
)


class FlashLlama(LlamaForCausalLM, FlashPackTransformersModelMixin):
    pass


def tiny_config(**overrides):
    options = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=True)
    options.update(overrides)
    return LlamaConfig(**options)


IDS = torch.tensor([[1, 5, 9, 33, 2, 101, 7, 64], [3, 3, 120, 0, 45, 8, 19, 77]])


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return FlashLlama(tiny_config()).eval()


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    model.save_pretrained_flashpack(directory)
    return directory


def logits(m):
    with torch.no_grad():
        return m(IDS).logits


def test_directory_holds_config_and_flashpack(saved):
    assert sorted(os.listdir(saved)) == ["config.json", "generation_config.json", "model.flashpack"]


def test_outputs_are_bit_identical(model, saved):
    loaded = FlashLlama.from_pretrained_flashpack(saved)
    assert type(loaded) is FlashLlama and not loaded.training
    assert torch.equal(logits(loaded), logits(model))


def test_weights_are_the_loaded_memory_and_stay_tied(saved):
    loaded = FlashLlama.from_pretrained_flashpack(saved, keep_flash_ref_on_model=True)
    tensors = loaded._flash_shared_storage
    for name, param in loaded.named_parameters():
        assert param.data_ptr() == tensors[name].data_ptr(), name
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_rotary_inv_freq_is_computed_on_the_device(model, saved):
    loaded = FlashLlama.from_pretrained_flashpack(saved)
    assert "model.rotary_emb.inv_freq" not in flashpack_ops.load_file(saved / "model.flashpack")
    assert torch.equal(loaded.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)
    assert not any(t.is_meta for t in list(loaded.parameters()) + list(loaded.buffers()))


def test_any_model_class_and_auto_classes(model, saved):
    plain = from_pretrained_flashpack(LlamaForCausalLM, saved)
    assert type(plain) is LlamaForCausalLM
    flashpack_ops.patch_integrations()
    auto = AutoModelForCausalLM.from_pretrained_flashpack(saved)
    assert type(auto) is LlamaForCausalLM
    assert torch.equal(logits(auto), logits(model))


def test_from_pretrained_loading_options_are_accepted(model, saved):
    """Arguments that pick or tune a weights file for from_pretrained do not reach the model's
    constructor: switching a from_pretrained call over does not raise TypeError."""
    loaded = FlashLlama.from_pretrained_flashpack(saved, low_cpu_mem_usage=True, use_safetensors=True,
                                                  variant="fp16", num_streams=4)
    assert torch.equal(logits(loaded), logits(model))


def test_torch_dtype_matches_from_pretrained(model, saved, tmp_path):
    model.save_pretrained(tmp_path)
    reference = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    loaded = FlashLlama.from_pretrained_flashpack(saved, torch_dtype=torch.bfloat16)
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert loaded.model.rotary_emb.inv_freq.dtype == reference.model.rotary_emb.inv_freq.dtype
    assert torch.equal(logits(loaded), logits(reference))


def test_target_dtype_is_saved_and_recorded(model, tmp_path):
    model.save_pretrained_flashpack(tmp_path, target_dtype=torch.float16)
    loaded = FlashLlama.from_pretrained_flashpack(tmp_path)
    assert loaded.model.layers[0].mlp.up_proj.weight.dtype == torch.float16
    assert loaded.config.dtype == torch.float16


def test_untied_model_round_trips(tmp_path):
    torch.manual_seed(1)
    untied = FlashLlama(tiny_config(tie_word_embeddings=False)).eval()
    untied.save_pretrained_flashpack(tmp_path)
    loaded = FlashLlama.from_pretrained_flashpack(tmp_path)
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    assert torch.equal(logits(loaded), logits(untied))


def test_missing_flashpack_file_says_how_to_make_one(tmp_path):
    tiny_config().save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="model.flashpack not found; write it with save_pretrained_flashpack"):
        FlashLlama.from_pretrained_flashpack(tmp_path)


def test_repo_id_without_network_fails_plainly():
    with pytest.raises(HubUnavailableError, match="cannot download 'no-such-org/no-such-model' from the Hugging Face Hub"):
        FlashLlama.from_pretrained_flashpack("no-such-org/no-such-model", local_files_only=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_loads_onto_cuda(model, saved):
    loaded = FlashLlama.from_pretrained_flashpack(saved, device="cuda")
    assert all(t.is_cuda for t in list(loaded.parameters()) + list(loaded.buffers()))
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    with torch.no_grad():
        out = loaded(IDS.cuda()).logits
    assert out.shape == logits(model).shape
