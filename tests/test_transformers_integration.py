"""transformers: save_pretrained_flashpack / from_pretrained_flashpack on a tiny Llama built from a config."""

import json
import os
import shlex
import subprocess
import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

import flashpack_ops  # noqa: E402
from conftest import bytes_read_by_this_process, wait_for_reads  # noqa: E402
from flashpack_ops.commands import convert_to_flashpack, revert_from_flashpack  # noqa: E402
from flashpack_ops.integrations import HubUnavailableError  # noqa: E402
from flashpack_ops.integrations.transformers import (  # noqa: E402
    FlashPackTransformersModelMixin,
    from_pretrained_flashpack,
    save_pretrained_flashpack,
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
    # The blocks the model keeps, as the reference keeps them; every weight is a view of them.
    storage, meta = loaded._flash_shared_storage, loaded._flash_shared_storage_meta
    assert isinstance(storage, flashpack_ops.FlashTensorStorage)
    tensors = dict(flashpack_ops.iterate_from_flash_tensor(storage, meta))
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



@pytest.mark.skipif(int(transformers.__version__.split(".")[0]) < 5,
                    reason="transformers 4 ties what the config ties, whatever the checkpoint holds")
def test_a_checkpoint_with_its_own_head_is_not_tied_to_the_embeddings(tmp_path):
    # The config ties lm_head to the embeddings, the checkpoint holds an lm_head of its own
    # (T5 v1.1 and flan-t5 in transformers 5, fine-tuned checkpoints): from_pretrained keeps
    # both, and so must this load.
    torch.manual_seed(2)
    model = LlamaForCausalLM(tiny_config(tie_word_embeddings=True)).eval()
    model.lm_head.weight = torch.nn.Parameter(torch.randn(128, 64))
    model.save_pretrained(tmp_path / "hf")
    reference = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert torch.equal(reference.lm_head.weight, model.lm_head.weight)
    convert_to_flashpack(str(tmp_path / "hf"), str(tmp_path / "fp"))
    with pytest.warns(UserWarning, match="holds both, with different values: they are not tied"):
        loaded = FlashLlama.from_pretrained_flashpack(tmp_path / "fp")
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert torch.equal(logits(loaded), logits(reference))


def test_a_tied_checkpoint_stays_tied_and_quiet(saved):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = FlashLlama.from_pretrained_flashpack(saved)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_post_init_after_adding_a_head_initialises_only_the_head(model, saved):
    # from_pretrained marks what it loaded initialised (transformers 5: _is_hf_initialized), so
    # that post_init() after adding a module initialises that module only.
    loaded = FlashLlama.from_pretrained_flashpack(saved)
    loaded.extra = torch.nn.Linear(64, 3)
    torch.nn.init.zeros_(loaded.extra.weight)
    loaded.post_init()
    assert loaded.extra.weight.count_nonzero() > 0  # initialised
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert logits(loaded).equal(logits(model))

def test_missing_flashpack_file_says_how_to_make_one(tmp_path):
    tiny_config().save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="model.flashpack not found; write it with save_pretrained_flashpack"):
        FlashLlama.from_pretrained_flashpack(tmp_path)


def _later(path):
    """Give ``path`` a modification time after everything else in its directory."""
    later = os.stat(path).st_mtime + 10
    os.utime(path, (later, later))


def test_a_directory_saved_again_after_conversion_is_reported(model, tmp_path):
    model.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="names the architecture 'FlashLlama'"):
        convert_to_flashpack(str(tmp_path), silent=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FlashLlama.from_pretrained_flashpack(tmp_path)  # converted after the save: quiet

    model.save_pretrained(tmp_path)  # the same weights, written again: quiet
    _later(tmp_path / "model.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FlashLlama.from_pretrained_flashpack(tmp_path)

    tuned = FlashLlama(tiny_config()).eval()
    tuned.load_state_dict(model.state_dict())
    with torch.no_grad():
        tuned.model.layers[1].mlp.down_proj.weight[-1] += 1  # one row of one tensor: still found
    tuned.save_pretrained(tmp_path)
    _later(tmp_path / "model.safetensors")
    with pytest.warns(UserWarning, match=r"model.flashpack is older than model.safetensors beside it and holds other "
                                         r"weights \('model.layers.1.mlp.down_proj.weight' differs\).*flashpack convert"):
        loaded = FlashLlama.from_pretrained_flashpack(tmp_path)
    assert torch.equal(loaded.model.layers[1].mlp.down_proj.weight, model.model.layers[1].mlp.down_proj.weight)


def test_only_newer_checkpoints_of_the_same_precision_are_compared(model, tmp_path):
    from safetensors.torch import save_file

    save_pretrained_flashpack(model, tmp_path)
    other = {name: tensor + 1 for name, tensor in model.state_dict().items()}
    # A file from_pretrained does not read (a revert of ema.flashpack), and the weights in
    # another dtype (the original beside a converted variant): neither is a newer save.
    save_file(other, tmp_path / "ema.safetensors")
    save_file(other, tmp_path / "model_ema.safetensors")
    save_file({name: t.half() for name, t in model.state_dict().items() if name != "lm_head.weight"},
              tmp_path / "model.safetensors", metadata={"format": "pt"})
    for name in ("ema.safetensors", "model_ema.safetensors", "model.safetensors"):
        _later(tmp_path / name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FlashLlama.from_pretrained_flashpack(tmp_path)
    # Shards are compared too, each with the names it holds.
    os.remove(tmp_path / "model.safetensors")
    names = [n for n in model.state_dict() if n != "lm_head.weight"]
    save_file({n: model.state_dict()[n] for n in names[:3]}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({n: other[n] for n in names[3:]}, tmp_path / "model-00002-of-00002.safetensors")
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        _later(tmp_path / name)
    with pytest.warns(UserWarning, match="older than model-00002-of-00002.safetensors beside it"):
        FlashLlama.from_pretrained_flashpack(tmp_path)


@pytest.mark.parametrize("changed", [0, 299, -1], ids=["first", "last", "none"])
def test_the_stale_check_samples_the_whole_file(tmp_path, changed):
    # 300 tensors, more than the rows compared: the first and the last are always among them.
    from safetensors.torch import save_file

    from flashpack_ops.integrations._hub import warn_if_stale

    tensors = {f"layers.{k}.weight": torch.full((2, 2), float(k)) for k in range(300)}
    flashpack_ops.save_file(tensors, tmp_path / "model.flashpack")
    if changed >= 0:
        tensors[f"layers.{changed}.weight"] = tensors[f"layers.{changed}.weight"] + 1
    save_file(tensors, tmp_path / "model.safetensors")
    _later(tmp_path / "model.safetensors")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_if_stale(str(tmp_path / "model.flashpack"))
    said = [str(w.message) for w in caught]
    assert said == [] if changed < 0 else len(said) == 1 and f"'layers.{changed}.weight' differs" in said[0], said


def test_a_subclass_saved_with_save_pretrained_converts_as_the_class_it_extends(model, tmp_path):
    model.save_pretrained(tmp_path)  # config.json names "FlashLlama", which transformers does not have
    with pytest.warns(UserWarning, match="names the architecture 'FlashLlama', which transformers does not have; "
                                         "its checkpoint holds the tensors of LlamaForCausalLM"):
        written = convert_to_flashpack(str(tmp_path), silent=True)
    assert written == str(tmp_path / "model.flashpack")
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["architectures"] == ["LlamaForCausalLM"]
    loaded = from_pretrained_flashpack(LlamaForCausalLM, tmp_path)
    assert all(torch.equal(loaded.state_dict()[n], t) for n, t in model.state_dict().items())
    assert logits(loaded).equal(logits(model))


class LlamaWithProbe(LlamaForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        self.probe = torch.nn.Linear(config.hidden_size, 2)


def test_a_subclass_with_tensors_of_its_own_is_not_converted_as_another_class(tmp_path):
    torch.manual_seed(0)
    LlamaWithProbe(tiny_config()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="names the architecture 'LlamaWithProbe', which transformers .* does not have"):
        convert_to_flashpack(str(tmp_path), silent=True)
    assert not os.path.exists(tmp_path / "model.flashpack")


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


@pytest.mark.parametrize("device_map", ["cpu", {"": "cpu"}, "auto", torch.device("cpu")],
                         ids=["str", "dict", "auto", "device"])
def test_device_map_for_one_device_is_the_device(model, saved, device_map):
    # from_pretrained(..., device_map=...) calls switch over as they are; "auto" is the
    # first GPU where there is one, as from_pretrained puts a model that fits there.
    loaded = FlashLlama.from_pretrained_flashpack(saved, device_map=device_map)
    expected = "cuda" if device_map == "auto" and torch.cuda.is_available() else "cpu"
    assert {t.device.type for t in loaded.parameters()} == {expected}
    assert torch.equal(logits(loaded.cpu()), logits(model))


def test_device_maps_that_cannot_be_honoured_are_refused(saved):
    # Several devices are tests/test_device_map.py's.
    with pytest.raises(ValueError, match=r"device_map \{'lm_head': 'meta'\}: cannot load onto the meta device"):
        FlashLlama.from_pretrained_flashpack(saved, device_map={"model": "cpu", "lm_head": "meta"})
    with pytest.raises(ValueError, match=r"device_map \{'lm_head': 'disk'\}: offloading to disk is not supported"):
        FlashLlama.from_pretrained_flashpack(saved, device_map={"model": "cpu", "lm_head": "disk"})
    with pytest.raises(ValueError, match=r"device='cpu' and device_map='cuda:0' disagree"):
        FlashLlama.from_pretrained_flashpack(saved, device="cpu", device_map="cuda:0")
    with pytest.raises(ValueError, match=r"FlashLlama.from_pretrained_flashpack: device_map='gpu' is not a device"):
        FlashLlama.from_pretrained_flashpack(saved, device_map="gpu")
    with pytest.raises(ValueError, match=r"cannot load .*model.flashpack: device='gpu' is not a device"):
        FlashLlama.from_pretrained_flashpack(saved, device="gpu")


@pytest.mark.parametrize("option", [{"quantization_config": {"load_in_8bit": True}}, {"tp_plan": "auto"},
                                    {"gguf_file": "model.gguf"}, {"key_mapping": {"a": "b"}}],
                         ids=["quantization_config", "tp_plan", "gguf_file", "key_mapping"])
def test_options_that_would_change_the_model_are_refused(saved, option):
    # Loading the model as saved while the caller asked for it quantized or sharded would be
    # a silent surprise; their defaults are accepted.
    (name, value), = option.items()
    with pytest.raises(ValueError, match=f"{name}=.* is not supported: a flashpack file is loaded as it was saved"):
        FlashLlama.from_pretrained_flashpack(saved, **option)
    FlashLlama.from_pretrained_flashpack(saved, **{name: None})


def test_download_only_options_are_accepted(model, saved):
    loaded = FlashLlama.from_pretrained_flashpack(saved, max_memory={0: "10GB"}, offload_folder="/nowhere",
                                                  weights_only=True, trust_remote_code=False, _fast_init=True)
    assert torch.equal(logits(loaded), logits(model))


def test_output_loading_info_lists_what_the_file_lacks(model, tmp_path):
    model.save_pretrained_flashpack(tmp_path, ignore_names=["model.norm.weight"])
    loaded, info = FlashLlama.from_pretrained_flashpack(tmp_path, strict=False, output_loading_info=True)
    assert info == {"missing_keys": {"model.norm.weight"}, "unexpected_keys": set(), "mismatched_keys": set(),
                    "error_msgs": []}
    assert isinstance(loaded, FlashLlama)


def test_a_weight_the_file_lacks_is_initialised_as_from_pretrained_does(model, tmp_path):
    # LlamaRMSNorm's weight starts at ones, as in the freshly built model saved here: the
    # loaded model then computes the same logits. Zero-filled, it would output zeros.
    model.save_pretrained_flashpack(tmp_path, ignore_names=["model.norm.weight"])
    with pytest.warns(UserWarning, match=r"1 tensors initialised as from_pretrained initialises them: "
                                         r"model.norm.weight \("):
        loaded = FlashLlama.from_pretrained_flashpack(tmp_path, strict=False)
    assert torch.equal(loaded.model.norm.weight, torch.ones_like(model.model.norm.weight))
    assert torch.equal(logits(loaded), logits(model))


def test_initialising_a_missing_weight_leaves_the_loaded_ones_of_its_module(tmp_path):
    # _init_weights sets a LayerNorm's weight to ones and its bias to zeros, in place: the
    # bias, loaded from the file, must keep the file's values.
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32)
    base = transformers.BertModel(config).eval()
    with torch.no_grad():
        base.embeddings.LayerNorm.bias.normal_()
    save_pretrained_flashpack(base, tmp_path, ignore_names=["embeddings.LayerNorm.weight"])
    with pytest.warns(UserWarning, match="1 tensors initialised"):
        loaded = from_pretrained_flashpack(transformers.BertModel, tmp_path, strict=False)
    assert torch.equal(loaded.embeddings.LayerNorm.weight, torch.ones(32))
    assert torch.equal(loaded.embeddings.LayerNorm.bias, base.embeddings.LayerNorm.bias)
    for name, tensor in base.state_dict().items():
        if name != "embeddings.LayerNorm.weight":
            assert torch.equal(loaded.state_dict()[name], tensor), name


def test_generation_config_argument_is_used(saved):
    generation_config = transformers.GenerationConfig(max_new_tokens=3, do_sample=False)
    loaded = FlashLlama.from_pretrained_flashpack(saved, generation_config=generation_config)
    assert loaded.generation_config.max_new_tokens == 3


def test_generation_settings_an_older_config_holds_are_used_as_from_pretrained_uses_them(tmp_path):
    # Older repos (BART, Marian) keep num_beams and the like in config.json, without a
    # generation_config.json: from_pretrained builds the generation config from it.
    config = transformers.BartConfig(vocab_size=128, d_model=32, encoder_layers=1, decoder_layers=1,
                                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                     decoder_ffn_dim=64, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.BartForConditionalGeneration(config).save_pretrained(tmp_path)
    os.remove(tmp_path / "generation_config.json")
    settings = dict(num_beams=3, max_length=12, no_repeat_ngram_size=2, min_length=5, forced_bos_token_id=0)
    (tmp_path / "config.json").write_text(json.dumps(dict(json.loads((tmp_path / "config.json").read_text()),
                                                          **settings)))
    convert_to_flashpack(str(tmp_path / "model.safetensors"), str(tmp_path / "model.flashpack"))
    expected = transformers.BartForConditionalGeneration.from_pretrained(tmp_path)
    loaded = from_pretrained_flashpack(transformers.BartForConditionalGeneration, tmp_path)
    assert loaded.generation_config.to_diff_dict() == expected.generation_config.to_diff_dict()
    for name, value in settings.items():
        assert getattr(loaded.generation_config, name) == value, name
    ids = torch.tensor([[0, 5, 6, 7, 8, 2]])
    assert torch.equal(loaded.generate(ids), expected.generate(ids))


def test_config_arguments_reach_the_generation_config_and_a_config_passed_is_left_alone(model, saved):
    # from_pretrained(..., use_cache=False) gives generation_config.use_cache False too.
    loaded = FlashLlama.from_pretrained_flashpack(saved, use_cache=False)
    assert loaded.config.use_cache is False and loaded.generation_config.use_cache is False
    config = tiny_config()
    before = config.to_dict()
    first = FlashLlama.from_pretrained_flashpack(saved, config=config)
    second = FlashLlama.from_pretrained_flashpack(saved, config=config, dtype=torch.bfloat16)
    assert config.to_dict() == before  # as from_pretrained takes it: a copy
    assert first.config is not config and first.config is not second.config
    assert first.config.dtype == torch.float32 and second.config.dtype == torch.bfloat16


def test_auto_model_takes_a_config(model, saved):
    flashpack_ops.patch_integrations()
    config = transformers.AutoConfig.from_pretrained(saved)
    config.output_hidden_states = True
    loaded = AutoModelForCausalLM.from_pretrained_flashpack(saved, config=config)
    assert loaded.config.output_hidden_states
    assert torch.equal(logits(loaded), logits(model))


def tiny_t5():
    torch.manual_seed(0)
    config = transformers.T5Config(num_layers=2, d_model=32, d_ff=64, num_heads=4, d_kv=8, vocab_size=64,
                                   decoder_start_token_id=0)
    return transformers.T5ForConditionalGeneration(config).eval()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_modules_kept_in_float32_match_from_pretrained(tmp_path, dtype):
    # T5 keeps its feed-forward output ("wo") in float32 when loaded as float16.
    t5 = tiny_t5()
    assert t5._keep_in_fp32_modules
    t5.save_pretrained(tmp_path / "hf")
    save_pretrained_flashpack(t5, tmp_path / "fp")
    reference = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype=dtype).eval()
    loaded = from_pretrained_flashpack(transformers.T5ForConditionalGeneration, tmp_path / "fp", torch_dtype=dtype)
    assert {n: p.dtype for n, p in loaded.named_parameters()} == {n: p.dtype for n, p in reference.named_parameters()}
    ids = torch.tensor([[1, 5, 9, 33]])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, decoder_input_ids=ids).logits,
                           reference(input_ids=ids, decoder_input_ids=ids).logits)


@pytest.mark.parametrize("dtype", [None, "auto"])
def test_a_float16_model_loaded_without_a_dtype_keeps_its_float32_modules_as_from_pretrained_does(tmp_path, dtype):
    # Saved after .half(): from_pretrained ("auto", its default) loads float16 and still keeps
    # wo in float32, and so must a load that takes the file's dtype.
    t5 = tiny_t5().half()
    t5.save_pretrained(tmp_path / "hf")
    save_pretrained_flashpack(t5, tmp_path / "fp")
    options = {} if dtype is None else {"dtype": dtype}
    reference = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "hf", **options).eval()
    loaded = from_pretrained_flashpack(transformers.T5ForConditionalGeneration, tmp_path / "fp", **options)
    dtypes = {n: p.dtype for n, p in loaded.named_parameters()}
    assert dtypes == {n: p.dtype for n, p in reference.named_parameters()}
    assert {torch.float16, torch.float32} == set(dtypes.values())
    ids = torch.tensor([[1, 5, 9, 33]])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, decoder_input_ids=ids).logits,
                           reference(input_ids=ids, decoder_input_ids=ids).logits)
    # A file of mixed dtypes (its norms in float32) loads as from_pretrained loads the same
    # checkpoint: every other tensor in the model's dtype, so that forward runs.
    from safetensors.torch import save_file as save_safetensors

    state = {name: t.float() if "layer_norm" in name else t for name, t in t5.state_dict().items()}
    flashpack_ops.save_file(state, tmp_path / "fp" / "model.flashpack")
    save_safetensors({n: t for n, t in state.items() if n not in ("encoder.embed_tokens.weight",
                                                                  "decoder.embed_tokens.weight", "lm_head.weight")},
                     str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    reference = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "hf", **options).eval()
    loaded = from_pretrained_flashpack(transformers.T5ForConditionalGeneration, tmp_path / "fp", **options)
    assert {n: p.dtype for n, p in loaded.named_parameters()} == {n: p.dtype for n, p in reference.named_parameters()}
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, decoder_input_ids=ids).logits,
                           reference(input_ids=ids, decoder_input_ids=ids).logits)


def test_saving_with_a_target_dtype_keeps_float32_modules(tmp_path):
    t5 = tiny_t5()
    save_pretrained_flashpack(t5, tmp_path, target_dtype=torch.float16)
    loaded = from_pretrained_flashpack(transformers.T5ForConditionalGeneration, tmp_path)
    wo = loaded.encoder.block[0].layer[1].DenseReluDense.wo.weight
    assert wo.dtype == torch.float32 and torch.equal(wo, t5.encoder.block[0].layer[1].DenseReluDense.wo.weight)
    assert loaded.shared.weight.dtype == torch.float16


def test_integer_buffers_keep_their_dtype_with_a_target_dtype(tmp_path):
    # A BatchNorm's num_batches_tracked is int64: converted to bfloat16 with the rest, the
    # model could not load its own file back.
    torch.manual_seed(0)
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_channels=3)
    resnet = transformers.ResNetModel(config).eval()
    save_pretrained_flashpack(resnet, tmp_path, target_dtype=torch.bfloat16)
    loaded = from_pretrained_flashpack(transformers.ResNetModel, tmp_path)
    tracked = [b for n, b in loaded.named_buffers() if n.endswith("num_batches_tracked")]
    assert tracked and all(b.dtype == torch.int64 for b in tracked)
    expected = resnet.to(torch.bfloat16)
    pixels = torch.randn(1, 3, 32, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(loaded(pixels).last_hidden_state, expected(pixels).last_hidden_state)


CUSTOM_CONFIG = '''
from transformers import PretrainedConfig


class TinyCustomConfig(PretrainedConfig):
    model_type = "flashpack_tiny_custom"

    def __init__(self, width=8, **kwargs):
        self.width = width
        super().__init__(**kwargs)
'''

CUSTOM_MODEL = '''
import torch
from transformers import PreTrainedModel

from .configuration_tiny import TinyCustomConfig


class TinyCustomModel(PreTrainedModel):
    config_class = TinyCustomConfig

    def __init__(self, config):
        super().__init__(config)
        self.lin = torch.nn.Linear(config.width, config.width)
        self.post_init()

    def forward(self, x):
        return self.lin(x)
'''


def test_auto_model_loads_a_model_whose_code_ships_with_it(tmp_path):
    # trust_remote_code=True, as from_pretrained takes it: the class comes from the directory.
    # A fresh process, so that no earlier import of the class can help.
    (tmp_path / "configuration_tiny.py").write_text(CUSTOM_CONFIG)
    (tmp_path / "modeling_tiny.py").write_text(CUSTOM_MODEL)
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "flashpack_tiny_custom", "width": 8, "architectures": ["TinyCustomModel"],
        "auto_map": {"AutoConfig": "configuration_tiny.TinyCustomConfig", "AutoModel": "modeling_tiny.TinyCustomModel"}}))
    script = f"""
import sys, torch, transformers
import flashpack_ops
from flashpack_ops.integrations.transformers import save_pretrained_flashpack
torch.manual_seed(0)
config = transformers.AutoConfig.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)
model = transformers.AutoModel.from_config(config, trust_remote_code=True)
# Into another directory: the model's code goes with it, as save_pretrained copies it.
save_pretrained_flashpack(model, {str(tmp_path / "saved")!r})
flashpack_ops.patch_integrations()
try:  # without trust_remote_code, refused as from_pretrained refuses it
    transformers.AutoModel.from_pretrained_flashpack({str(tmp_path / "saved")!r})
    raise SystemExit("loaded custom code without trust_remote_code")
except ValueError as e:
    assert "custom code" in str(e) or "trust_remote_code" in str(e), e
loaded = transformers.AutoModel.from_pretrained_flashpack({str(tmp_path / "saved")!r}, trust_remote_code=True)
assert type(loaded).__name__ == "TinyCustomModel"
assert torch.equal(loaded.lin.weight, model.lin.weight) and torch.equal(loaded.lin.bias, model.lin.bias)
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]
    assert sorted(os.listdir(tmp_path / "saved")) == ["config.json", "configuration_tiny.py", "model.flashpack",
                                                      "modeling_tiny.py"]


def test_the_config_records_the_dtype_the_weights_are_saved_in(model, tmp_path):
    # As save_pretrained records it: a model moved to bfloat16 after its load reloads as bfloat16
    # after a revert, through plain from_pretrained.
    moved = FlashLlama(tiny_config()).to(torch.bfloat16)
    save_pretrained_flashpack(moved, tmp_path / "bf16")
    save_pretrained_flashpack(model, tmp_path / "fp16", target_dtype=torch.float16)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((tmp_path / "fp16" / "config.json").read_text())["dtype"] == "float16"
    revert_from_flashpack(str(tmp_path / "bf16"))
    assert LlamaForCausalLM.from_pretrained(tmp_path / "bf16").dtype == torch.bfloat16


def test_a_model_holding_peft_adapters_is_refused_before_anything_is_written(model, tmp_path):
    peft = pytest.importorskip("peft")
    base = FlashLlama(tiny_config())
    base.load_state_dict(model.state_dict())
    adapted = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    for save in (adapted.save_pretrained_flashpack,  # PeftModel hands it on to the base model, adapters in it
                 lambda d: save_pretrained_flashpack(adapted, d)):
        with pytest.raises(ValueError, match="the model holds PEFT adapter layers.*merge_and_unload"):
            save(tmp_path / "out")
        assert not (tmp_path / "out").exists()
    merged = adapted.merge_and_unload()
    merged.save_pretrained_flashpack(tmp_path / "merged")
    loaded = FlashLlama.from_pretrained_flashpack(tmp_path / "merged")
    assert logits(loaded).equal(logits(merged))


def test_a_renamed_checkpoint_converted_as_a_file_says_to_convert_the_directory(tmp_path):
    # transformers 5 fuses a MoE's experts as it loads the checkpoint: a file made from the
    # weights file keeps the per-expert names, which the model does not have.
    config = transformers.Qwen2MoeConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, num_experts=2,
                                         num_experts_per_tok=1, moe_intermediate_size=8,
                                         shared_expert_intermediate_size=8)
    torch.manual_seed(0)
    model = transformers.Qwen2MoeForCausalLM(config)
    model.save_pretrained(tmp_path)
    convert_to_flashpack(str(tmp_path / "model.safetensors"), str(tmp_path / "model.flashpack"))
    with pytest.raises(ValueError, match=r"experts.0.down_proj.weight.*transformers renames qwen2_moe checkpoints as "
                                         r"it loads them.*convert the model directory instead \(`flashpack convert "):
        from_pretrained_flashpack(transformers.Qwen2MoeForCausalLM, tmp_path)
    convert_to_flashpack(str(tmp_path), silent=True)  # the directory: loaded by from_pretrained, renamed
    loaded = from_pretrained_flashpack(transformers.Qwen2MoeForCausalLM, tmp_path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    # A file holding the model's own names that does not match for another reason: no such advice.
    with pytest.raises(ValueError) as error:
        from_pretrained_flashpack(transformers.Qwen2MoeForCausalLM, tmp_path, num_hidden_layers=2,
                                  layer_types=["full_attention"] * 2)
    assert "model.layers.1." in str(error.value) and "renames" not in str(error.value)


def test_base_model_loads_from_a_checkpoint_with_a_head(tmp_path):
    # As from_pretrained: BertModel takes the bert.* tensors of a directory saved with a head.
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32)
    classifier = transformers.BertForSequenceClassification(config).eval()
    save_pretrained_flashpack(classifier, tmp_path / "fp")
    classifier.save_pretrained(tmp_path / "hf")
    reference = transformers.BertModel.from_pretrained(tmp_path / "hf").eval()
    loaded = from_pretrained_flashpack(transformers.BertModel, tmp_path / "fp", keep_flash_ref_on_model=True)
    assert isinstance(loaded._flash_shared_storage, flashpack_ops.FlashTensorStorage)
    ids = torch.tensor([[1, 5, 9, 33, 2]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).last_hidden_state, reference(ids).last_hidden_state)


def test_encoder_loads_from_an_encoder_decoder_checkpoint(tmp_path):
    # T5EncoderModel lists the decoder in _keys_to_ignore_on_load_unexpected.
    t5 = tiny_t5()
    save_pretrained_flashpack(t5, tmp_path)
    encoder = from_pretrained_flashpack(transformers.T5EncoderModel, tmp_path)
    ids = torch.tensor([[1, 5, 9, 33]])
    with torch.no_grad():
        assert torch.equal(encoder(ids).last_hidden_state, t5.encoder(ids).last_hidden_state)


def test_model_with_a_head_loads_a_base_checkpoint_into_its_base(tmp_path):
    # As from_pretrained: BertForSequenceClassification takes a BertModel directory's tensors
    # into model.bert. Its head is not in the file: strict says so, strict=False initialises it
    # with the model's _init_weights, as from_pretrained does.
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32, num_labels=3)
    base = transformers.BertModel(config).eval()
    save_pretrained_flashpack(base, tmp_path)
    with pytest.raises(ValueError, match="holds a BertModel without the head BertForSequenceClassification adds: "
                                         "2 parameters missing from the file: classifier.weight, classifier.bias"):
        from_pretrained_flashpack(transformers.BertForSequenceClassification, tmp_path)
    torch.manual_seed(1)
    with pytest.warns(UserWarning, match=r"2 tensors initialised as from_pretrained initialises them: "
                                         r"classifier.weight, classifier.bias \("):
        loaded = from_pretrained_flashpack(transformers.BertForSequenceClassification, tmp_path, strict=False)
    ids = torch.tensor([[1, 5, 9, 33, 2]])
    with torch.no_grad():
        assert torch.equal(loaded.bert(ids).last_hidden_state, base(ids).last_hidden_state)
    assert not any(p.is_meta for p in loaded.parameters())
    # The same draws as _init_weights makes on a fresh Linear after the same seed.
    expected = torch.nn.Linear(32, 3)
    torch.manual_seed(1)
    loaded._init_weights(expected)
    assert torch.equal(loaded.classifier.weight, expected.weight) and loaded.classifier.weight.any()
    assert torch.equal(loaded.classifier.bias, expected.bias)


def test_save_takes_checksum_and_says_which_arguments_did_nothing(model, tmp_path):
    model.save_pretrained_flashpack(tmp_path / "checked", checksum=True)
    flashpack_ops.verify_file(tmp_path / "checked" / "model.flashpack")
    # A misspelt argument (or one of save_pretrained's that means nothing here) is named.
    with pytest.warns(UserWarning, match=r"\['max_shard_size', 'target_dtpye'\] have no effect"):
        model.save_pretrained_flashpack(tmp_path / "typo", target_dtpye=torch.bfloat16, max_shard_size="5GB")


@pytest.mark.parametrize("cannot_reach", ["offline mode", "no network"])
def test_push_to_hub_without_the_hub_says_so_and_keeps_the_directory(model, tmp_path, monkeypatch, cannot_reach):
    import huggingface_hub.constants

    if cannot_reach == "offline mode":
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    else:  # nothing listens on port 9 of this machine: the connection is refused at once
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    directory = tmp_path / "my model"
    with pytest.raises(HubUnavailableError) as caught:
        model.save_pretrained_flashpack(directory, push_to_hub=True, repo_id="me/tiny", token="not-a-token",
                                        private=True, commit_message="first cut")
    message = str(caught.value)
    assert message.startswith(f"cannot upload {directory} to the Hugging Face Hub as 'me/tiny' (")
    # The command keeps what was asked (private) and runs as given, the path with its space quoted.
    command = message.split("upload it later with `")[1].rstrip("`")
    assert shlex.split(command) == ["hf", "upload", "me/tiny", str(directory), ".", "--private",
                                    "--commit-message", "first cut"]
    assert torch.equal(logits(FlashLlama.from_pretrained_flashpack(directory)), logits(model))


def test_push_to_hub_passes_on_the_hubs_own_refusal(model, tmp_path, monkeypatch):
    # A Hub that answers 401 (a bad token) is reachable: its answer is not "unavailable".
    import http.server
    import threading

    import huggingface_hub.constants
    from huggingface_hub.errors import HfHubHTTPError

    class Refuse(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            body = b'{"error": "Invalid credentials"}'
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # whatever the environment says
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        with pytest.raises(HfHubHTTPError) as caught:
            model.save_pretrained_flashpack(tmp_path / "tiny", push_to_hub=True, repo_id="me/tiny", token="bad")
        assert not isinstance(caught.value, HubUnavailableError)
    finally:
        server.shutdown()
    assert (tmp_path / "tiny" / "model.flashpack").is_file()


def test_push_to_hub_needs_a_repo_id_where_the_directory_name_is_none(model, tmp_path):
    with pytest.raises(ValueError, match=r"'my model' \(from the directory's name\) is not a repo id; it is saved: "
                                         r"pass repo_id="):
        model.save_pretrained_flashpack(tmp_path / "my model", push_to_hub=True)
    assert (tmp_path / "my model" / "model.flashpack").is_file()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_weight_the_file_lacks_is_initialised_on_cuda(model, tmp_path):
    model.save_pretrained_flashpack(tmp_path, ignore_names=["model.norm.weight"])
    with pytest.warns(UserWarning, match="1 tensors initialised as from_pretrained initialises them"):
        loaded = FlashLlama.from_pretrained_flashpack(tmp_path, strict=False, device="cuda")
    assert all(t.is_cuda for t in list(loaded.parameters()) + list(loaded.buffers()))
    assert torch.equal(loaded.model.norm.weight.cpu(), torch.ones_like(model.model.norm.weight))


def test_loading_info_says_what_from_pretrained_says(tmp_path):
    # A base checkpoint into a model with a head: the head is missing. A tied model whose file
    # holds the embedding only (as save_pretrained writes it): nothing is missing.
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32, num_labels=3)
    bert_dir, llama_dir = tmp_path / "bert", tmp_path / "llama"
    transformers.BertModel(config).save_pretrained(bert_dir)
    LlamaForCausalLM(tiny_config()).save_pretrained(llama_dir)
    # The Llama's safetensors file itself, as save_pretrained wrote it (no lm_head.weight).
    for source in (bert_dir, llama_dir / "model.safetensors"):
        destination = [str(llama_dir / "model.flashpack")] if source.name.endswith(".safetensors") else []
        assert subprocess.run([sys.executable, "-m", "flashpack_ops", "convert", str(source), *destination, "--quiet"],
                              capture_output=True, text=True).returncode == 0
    cases = [(transformers.BertForSequenceClassification, bert_dir), (LlamaForCausalLM, llama_dir)]
    for model_class, directory in cases:
        _, theirs = model_class.from_pretrained(directory, output_loading_info=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, ours = from_pretrained_flashpack(model_class, directory, strict=False, output_loading_info=True)
        # The same names, in the same kind of collection (sets from transformers 5 on).
        assert ours == theirs, model_class.__name__
    assert not ours["missing_keys"] and "lm_head.weight" not in flashpack_ops.load_file(llama_dir / "model.flashpack")


def test_loading_info_leaves_out_a_tied_tensors_second_names_as_from_pretrained_does(tmp_path):
    # Base models from files saved with a tied head: the head's tied names (lm_head.weight,
    # BERT's decoder weight and bias) are in our file but never written by save_pretrained.
    torch.manual_seed(0)
    bert = transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32))
    cases = [(LlamaForCausalLM(tiny_config()), transformers.LlamaModel), (bert, transformers.BertModel)]
    for saved, base_class in cases:
        directory = tmp_path / base_class.__name__
        saved.save_pretrained(directory / "hf")
        save_pretrained_flashpack(saved, directory / "fp")
        _, theirs = base_class.from_pretrained(directory / "hf", output_loading_info=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, ours = from_pretrained_flashpack(base_class, directory / "fp", strict=False, output_loading_info=True)
        assert ours["unexpected_keys"] == theirs["unexpected_keys"], base_class.__name__


def test_a_sub_models_missing_weights_get_its_own_init(tmp_path):
    # In a multimodal model, a vision tower's tensors are initialised by the tower's own
    # _init_weights and config, as from_pretrained does: CLIP scales its attention
    # projections by the width (std 0.18 here, against the generic 0.02) and draws the class
    # embedding, which the generic init does not know (it would stay zero).
    vision = transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=8, patch_size=4, projection_dim=8)
    text = tiny_config(num_hidden_layers=1, hidden_size=32, intermediate_size=64)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=3)
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(config).eval()
    left_out = ["model.vision_tower.embeddings.class_embedding",
                "model.vision_tower.encoder.layers.0.self_attn.q_proj.weight"]
    save_pretrained_flashpack(model, tmp_path, ignore_names=left_out)
    with pytest.warns(UserWarning, match="2 tensors initialised as from_pretrained initialises them"):
        loaded = from_pretrained_flashpack(transformers.LlavaForConditionalGeneration, tmp_path, strict=False)
    state = loaded.state_dict()
    assert state[left_out[0]].std() > 0.1
    assert 0.1 < state[left_out[1]].std() < 0.3
    for name, tensor in model.state_dict().items():
        if name not in left_out:
            assert torch.equal(state[name], tensor), name


@pytest.mark.parametrize("name", ["bf16", "bfloat16", "torch.bfloat16"])
def test_a_target_dtype_by_name_saves_as_that_dtype(model, tmp_path, name):
    save_pretrained_flashpack(model, tmp_path, target_dtype=name)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = from_pretrained_flashpack(LlamaForCausalLM, tmp_path)
    assert loaded.dtype == torch.bfloat16
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight.to(torch.bfloat16))


def test_a_model_left_without_tensors_names_the_file_it_would_write(model, tmp_path):
    with pytest.raises(ValueError, match=r"^No tensors to pack\. \(save_pretrained_flashpack: the ignore options leave "
                                         r"none of FlashLlama's tensors to write to .*out/model\.flashpack\)"):
        save_pretrained_flashpack(model, tmp_path / "out", ignore_prefixes=["model.", "lm_head."])
    assert not (tmp_path / "out" / "model.flashpack").exists()


def test_an_unknown_target_dtype_writes_nothing(model, tmp_path):
    with pytest.raises(ValueError, match="save_pretrained_flashpack: target_dtype: unknown dtype 'bf17'"):
        save_pretrained_flashpack(model, tmp_path / "out", target_dtype="bf17")
    assert not (tmp_path / "out").exists()


def test_dtype_and_torch_dtype_that_disagree_are_refused(model, tmp_path):
    model.save_pretrained_flashpack(tmp_path)
    with pytest.raises(ValueError, match="dtype=torch.float16 and torch_dtype=torch.bfloat16 disagree"):
        from_pretrained_flashpack(LlamaForCausalLM, tmp_path, dtype=torch.float16, torch_dtype=torch.bfloat16)
    # The same dtype under both names (in any spelling) is no disagreement.
    loaded = from_pretrained_flashpack(LlamaForCausalLM, tmp_path, dtype="bf16", torch_dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16


def _tiny_clip():
    text = transformers.CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                       num_attention_heads=2, vocab_size=99, max_position_embeddings=16)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=8, patch_size=4)
    torch.manual_seed(0)
    return transformers.CLIPModel(transformers.CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                                          projection_dim=16)).eval()


@pytest.mark.parametrize("dtypes", [{"text_config": torch.float16, "": torch.bfloat16},
                                    {"text_config": "float16", "vision_config": "float32"}])
def test_a_dtype_per_sub_config_loads_as_from_pretrained_loads_it(tmp_path, dtypes):
    # transformers 5 gives the whole model the dict's "" entry (the default dtype without
    # one), with a warning; a composite model's dtype dict written for from_pretrained loads.
    model = _tiny_clip()
    save_pretrained_flashpack(model, tmp_path / "ours")
    model.save_pretrained(tmp_path / "theirs")
    reference = transformers.CLIPModel.from_pretrained(tmp_path / "theirs", dtype=dtypes)
    with pytest.warns(UserWarning, match="a dtype per sub-config is not supported: the whole model loads as"):
        loaded = from_pretrained_flashpack(transformers.CLIPModel, tmp_path / "ours", dtype=dtypes)
    ours, theirs = loaded.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype and torch.equal(ours[name], tensor), name


def test_a_dtype_dict_of_one_dtype_loads_quietly(tmp_path):
    model = _tiny_clip()
    save_pretrained_flashpack(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = from_pretrained_flashpack(transformers.CLIPModel, tmp_path, torch_dtype={"": "bf16"})
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="CLIPModel.from_pretrained_flashpack: dtype: unknown dtype 'bf17'"):
        from_pretrained_flashpack(transformers.CLIPModel, tmp_path, dtype={"": "bf17"})
    with pytest.raises(ValueError, match="CLIPModel.from_pretrained_flashpack: torch_dtype: unknown dtype 'bf17'"):
        from_pretrained_flashpack(transformers.CLIPModel, tmp_path, torch_dtype="bf17")
    with pytest.raises(TypeError, match="CLIPModel.from_pretrained_flashpack: dtype must be a torch.dtype or a string, "
                                        "got int"):
        from_pretrained_flashpack(transformers.CLIPModel, tmp_path, dtype=3)


def test_a_model_of_the_users_own_with_a_plain_config_round_trips(tmp_path):
    # config_class = PretrainedConfig: config.json has no model_type for AutoConfig to go by.
    class Plain(transformers.PreTrainedModel):
        config_class = transformers.PretrainedConfig

        def __init__(self, config):
            super().__init__(config)
            self.proj = torch.nn.Linear(4, 4)
            self.post_init()

    torch.manual_seed(0)
    model = Plain(transformers.PretrainedConfig())
    save_pretrained_flashpack(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["Plain"]
    loaded = from_pretrained_flashpack(Plain, tmp_path)
    assert torch.equal(loaded.proj.weight, model.proj.weight) and torch.equal(loaded.proj.bias, model.proj.bias)


def test_a_base_model_from_a_checkpoint_with_a_head_names_what_it_lacks_as_the_model_does(tmp_path):
    # BertForMaskedLM saves no pooler; BertModel has one. The error names BertModel's own names.
    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32)
    save_pretrained_flashpack(transformers.BertForMaskedLM(config), tmp_path)
    with pytest.raises(ValueError, match=r"to BertModel: 2 parameters missing from the file: pooler\.dense\.weight, "
                                         r"pooler\.dense\.bias$"):
        from_pretrained_flashpack(transformers.BertModel, tmp_path)


def test_a_base_model_from_a_file_saved_under_a_wrapper_hints_the_wrappers_prefix(model, tmp_path):
    # A training wrapper held the whole LlamaForCausalLM as .model: the file's names start
    # "model.model.", and the base LlamaModel (loaded through the class with a head) is told so.
    class Trainer(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.model = inner

    save_pretrained_flashpack(model, tmp_path)
    flashpack_ops.save_file(Trainer(model).state_dict(), tmp_path / "model.flashpack")
    with pytest.raises(ValueError, match=r"to LlamaModel: \d+ parameters missing from the file: embed_tokens\.weight, "
                                         r".*\(the file holds the missing names under 'model\.model\.'"):
        from_pretrained_flashpack(transformers.LlamaModel, tmp_path)


def test_a_warning_points_at_the_callers_line(model, tmp_path):
    # Raised deep inside the package (through the mixin's classmethod): attributed to this file.
    model.save_pretrained_flashpack(tmp_path, ignore_names=["model.norm.weight"])
    with pytest.warns(UserWarning, match="model.norm.weight") as caught:
        FlashLlama.from_pretrained_flashpack(tmp_path, strict=False)
    assert {os.path.abspath(w.filename) for w in caught if "model.norm.weight" in str(w.message)} == \
        {os.path.abspath(__file__)}


def test_a_repo_id_downloads_the_flashpack_file_and_not_the_other_weights(model, hub, monkeypatch):
    repo = hub.root + "/org/tiny-llama"
    model.save_pretrained(repo)  # model.safetensors
    save_pretrained_flashpack(model, repo)
    torch.save(model.state_dict(), repo + "/pytorch_model.bin")
    loaded = FlashLlama.from_pretrained_flashpack("org/tiny-llama")
    assert torch.equal(logits(loaded), logits(model))
    assert hub.fetched("org/tiny-llama") == ["config.json", "generation_config.json", "model.flashpack"]
    # Then from the cache, offline.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert torch.equal(logits(FlashLlama.from_pretrained_flashpack("org/tiny-llama")), logits(model))


def test_an_auto_class_downloads_only_what_the_flashpack_load_reads(model, hub):
    from flashpack_ops.integrations.transformers import patch_transformers_auto_model

    patch_transformers_auto_model()
    repo = hub.root + "/org/tiny"
    model.save_pretrained(repo + "/text")
    save_pretrained_flashpack(model, repo + "/text")
    loaded = AutoModelForCausalLM.from_pretrained_flashpack("org/tiny", subfolder="text")
    assert torch.equal(logits(loaded), logits(model))
    assert hub.fetched("org/tiny") == ["text/config.json", "text/generation_config.json", "text/model.flashpack"]


def test_a_repo_without_a_flashpack_file_says_how_to_convert_it(model, hub):
    model.save_pretrained(hub.root + "/org/plain")
    with pytest.raises(FileNotFoundError, match="the Hub repo 'org/plain' holds no model.flashpack; convert it with "
                                                "`flashpack convert org/plain DIRECTORY`"):
        FlashLlama.from_pretrained_flashpack("org/plain")
    assert hub.fetched("org/plain") == ["config.json", "generation_config.json"]  # not its weights


def test_a_compiled_model_saves_as_the_model_it_compiles(model, tmp_path):
    compiled = torch.compile(model)  # not run: the wrapper alone
    save_pretrained_flashpack(compiled, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert not any(name.startswith("_orig_mod.") for name in flashpack_ops.load_file(tmp_path / "model.flashpack"))
    assert torch.equal(logits(from_pretrained_flashpack(LlamaForCausalLM, tmp_path)), logits(model))


def test_a_copied_load_keeps_its_weights_when_the_file_is_rewritten_in_place(model, saved, tmp_path):
    directory = tmp_path / "copy"
    directory.mkdir()
    for name in os.listdir(saved):
        (directory / name).write_bytes((saved / name).read_bytes())
    loaded = FlashLlama.from_pretrained_flashpack(directory, copy=True)
    torch.manual_seed(5)
    FlashLlama(tiny_config()).save_pretrained_flashpack(tmp_path / "other")  # same layout, other values
    with open(directory / "model.flashpack", "r+b") as f:  # as cp does: same inode, no rename
        f.write((tmp_path / "other" / "model.flashpack").read_bytes())
    (directory / "model.flashpack").write_bytes(b"")  # and then truncated: a mapping would fault
    assert torch.equal(logits(loaded), logits(model))


def test_ignore_mismatched_sizes_initialises_what_changed_shape_as_from_pretrained_does(tmp_path):
    # The fine-tuning start: a classifier saved for 2 labels, built for 5.
    config = transformers.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64, num_labels=2)
    torch.manual_seed(0)
    saved_model = transformers.BertForSequenceClassification(config).eval()
    saved_model.save_pretrained(tmp_path / "hf")
    save_pretrained_flashpack(saved_model, tmp_path / "fp")
    cls = transformers.BertForSequenceClassification
    with pytest.raises(ValueError, match=r"'classifier.weight' has shape \(2, 32\) in the file but \(5, 32\)"):
        from_pretrained_flashpack(cls, tmp_path / "fp", num_labels=5)
    _, expected = cls.from_pretrained(tmp_path / "hf", num_labels=5, ignore_mismatched_sizes=True,
                                      output_loading_info=True)
    with pytest.warns(UserWarning, match=r"2 tensors of another shape .* classifier.weight \(\(2, 32\) in the file, "
                                         r"\(5, 32\) in the model\)"):
        loaded, info = from_pretrained_flashpack(cls, tmp_path / "fp", num_labels=5, ignore_mismatched_sizes=True,
                                                 output_loading_info=True)
    assert info == expected
    assert loaded.classifier.weight.shape == (5, 32) and loaded.classifier.weight.count_nonzero() > 0
    assert torch.equal(loaded.classifier.bias, torch.zeros(5))  # BERT's init, as from_pretrained gives it
    for name, tensor in saved_model.bert.state_dict().items():
        assert torch.equal(loaded.bert.state_dict()[name], tensor), name


def both_ways(tmp_path, config, state_dict):
    """The same checkpoint as from_pretrained reads it (safetensors) and as a flashpack file."""
    from safetensors.torch import save_file as save_safetensors

    hf, fp = tmp_path / "hf", tmp_path / "fp"
    tensors = {name: tensor.detach().clone().contiguous() for name, tensor in state_dict.items()}
    for directory in (hf, fp):
        config.save_pretrained(directory)
    save_safetensors(tensors, hf / "model.safetensors", metadata={"format": "pt"})
    flashpack_ops.save_file(tensors, fp / "model.flashpack")
    return hf, fp


def tie_groups(model):
    groups = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return sorted(sorted(names) for names in groups.values() if len(names) > 1)


def t5_without_shared():
    # No shared.weight; lm_head of its own; the embeddings agree.
    config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                                   decoder_start_token_id=0, tie_word_embeddings=True)
    torch.manual_seed(0)
    state = transformers.T5ForConditionalGeneration(config).state_dict()
    embedding = state.pop("shared.weight")
    state.update({"encoder.embed_tokens.weight": embedding, "decoder.embed_tokens.weight": embedding,
                  "lm_head.weight": torch.randn_like(embedding)})
    return transformers.T5ForConditionalGeneration, config, state, {}


def bart_model_from_a_checkpoint_with_a_head():
    # The file's names under the model's prefix ("model."); its decoder embedding its own.
    config = transformers.BartConfig(vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1,
                                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                     decoder_ffn_dim=64, max_position_embeddings=64, tie_word_embeddings=True)
    torch.manual_seed(0)
    state = transformers.BartForConditionalGeneration(config).state_dict()
    state["model.decoder.embed_tokens.weight"] = torch.randn_like(state["model.shared.weight"])
    return transformers.BartModel, config, state, {}


def llama_whose_head_differs_below_bfloat16():
    config = tiny_config(tie_word_embeddings=True)
    torch.manual_seed(0)
    state = LlamaForCausalLM(config).state_dict()
    embedding = state["model.embed_tokens.weight"].to(torch.bfloat16).float()
    state["model.embed_tokens.weight"] = embedding
    state["lm_head.weight"] = embedding + embedding.abs() * 2.0 ** -12  # the same once in bfloat16
    return LlamaForCausalLM, config, state, {"dtype": torch.bfloat16}


@pytest.mark.skipif(int(transformers.__version__.split(".")[0]) < 5,
                    reason="transformers 4 ties what the config ties, whatever the checkpoint holds")
@pytest.mark.parametrize("case", [t5_without_shared, bart_model_from_a_checkpoint_with_a_head,
                                  llama_whose_head_differs_below_bfloat16])
def test_tied_groups_are_tied_as_from_pretrained_ties_them(tmp_path, case):
    cls, config, state, options = case()
    hf, fp = both_ways(tmp_path, config, state)
    expected = cls.from_pretrained(hf, **options)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "the config ties")
        loaded = from_pretrained_flashpack(cls, fp, **options)
    assert tie_groups(loaded) == tie_groups(expected)
    got = loaded.state_dict()
    for name, tensor in expected.state_dict().items():
        assert torch.equal(got[name], tensor), name


def test_a_head_added_to_a_base_checkpoint_keeps_its_own_ties(tmp_path):
    # BertForMaskedLM from a BertModel file: the new head's decoder bias is tied to its bias.
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    hf, fp = both_ways(tmp_path, config, transformers.BertModel(config, add_pooling_layer=False).state_dict())
    expected = transformers.BertForMaskedLM.from_pretrained(hf)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "tensors initialised as from_pretrained")
        loaded = from_pretrained_flashpack(transformers.BertForMaskedLM, fp, strict=False)
    assert tie_groups(loaded) == tie_groups(expected)
    assert not any(p.is_meta for p in loaded.parameters())
    assert loaded(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 64)


def test_ignore_mismatched_sizes_on_a_tied_weight_reports_it_once(tmp_path):
    torch.manual_seed(0)
    FlashLlama(tiny_config(tie_word_embeddings=True)).save_pretrained_flashpack(tmp_path)
    with pytest.warns(UserWarning, match=r"1 tensors of another shape .* model.embed_tokens.weight"):
        loaded, info = FlashLlama.from_pretrained_flashpack(tmp_path, vocab_size=80, ignore_mismatched_sizes=True,
                                                            output_loading_info=True)
    assert {name for name, _, _ in info["mismatched_keys"]} == {"model.embed_tokens.weight"}
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight and loaded.lm_head.weight.shape == (80, 64)


def test_ignore_mismatched_sizes_on_a_head_the_model_no_longer_ties(tmp_path):
    # The file holds lm_head.weight as a second name of the embedding; the model unties them.
    torch.manual_seed(0)
    FlashLlama(tiny_config(tie_word_embeddings=True)).save_pretrained_flashpack(tmp_path)
    with pytest.warns(UserWarning, match="2 tensors of another shape"):
        loaded, info = FlashLlama.from_pretrained_flashpack(tmp_path, vocab_size=80, tie_word_embeddings=False,
                                                            ignore_mismatched_sizes=True, output_loading_info=True)
    assert {name for name, _, _ in info["mismatched_keys"]} == {"model.embed_tokens.weight", "lm_head.weight"}
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    assert loaded.lm_head.weight.shape == loaded.model.embed_tokens.weight.shape == (80, 64)


def test_entries_the_model_does_not_have_are_left_out_as_from_pretrained_leaves_them(tmp_path):
    # T5EncoderModel from a T5 v1.1 / flan-t5 checkpoint: its own lm_head, which the encoder
    # lacks. from_pretrained lists it as unexpected and loads; strict=True refuses it.
    config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                                   decoder_start_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    full = transformers.T5ForConditionalGeneration(config)
    state = dict(full.state_dict(), **{"lm_head.weight": torch.randn(64, 32)})
    hf, fp = both_ways(tmp_path, config, state)
    expected, expected_info = transformers.T5EncoderModel.from_pretrained(hf, output_loading_info=True)
    with pytest.warns(UserWarning, match="1 entries of .* that T5EncoderModel does not have are left out, as "
                                         "from_pretrained leaves them out: lm_head.weight"):
        loaded, info = from_pretrained_flashpack(transformers.T5EncoderModel, fp, output_loading_info=True)
    assert info["unexpected_keys"] == expected_info["unexpected_keys"] == {"lm_head.weight"}
    got = loaded.state_dict()
    for name, tensor in expected.state_dict().items():
        assert torch.equal(got[name], tensor), name
    with pytest.raises(ValueError, match="names in the file that T5EncoderModel does not have: lm_head.weight"):
        from_pretrained_flashpack(transformers.T5EncoderModel, fp, strict=True)


def test_buffers_computed_in_init_match_from_pretrained_under_a_half_dtype(tmp_path):
    # GPT-J builds its sinusoidal table in __init__ with the default dtype's arithmetic;
    # from_pretrained computes it again in float32 once the weights are in.
    from transformers import GPTJConfig, GPTJForCausalLM

    torch.manual_seed(0)
    model = GPTJForCausalLM(GPTJConfig(n_embd=32, n_layer=1, n_head=4, rotary_dim=4, vocab_size=96,
                                       n_positions=512)).eval()
    model.save_pretrained(tmp_path / "hf")
    save_pretrained_flashpack(model, tmp_path / "fp")
    ids = torch.randint(0, 96, (1, 300))
    for dtype in (torch.bfloat16, torch.float16):
        expected = GPTJForCausalLM.from_pretrained(tmp_path / "hf", dtype=dtype)
        loaded = from_pretrained_flashpack(GPTJForCausalLM, tmp_path / "fp", dtype=dtype)
        # Each attention layer's table (transformers 5.18), or one rotary module's (5.24).
        tables = {name: buffer for name, buffer in expected.named_buffers() if name.endswith("embed_positions")}
        assert tables
        buffers = dict(loaded.named_buffers())
        for name, table in tables.items():
            assert torch.equal(buffers[name], table), name
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, expected(ids).logits)


def test_buffers_an_init_fails_to_compute_again_keep_the_values_init_gave_them(tmp_path):
    # An _init_weights that reads a weight's value cannot run while the weights are stood in
    # for: the buffers it would have computed again keep __init__'s values, not zeros.
    from transformers import PretrainedConfig, PreTrainedModel

    class TableConfig(PretrainedConfig):
        model_type = "flashpack-test-table"

    class Table(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("positions", torch.arange(1.0, 17.0), persistent=False)

    class TableModel(PreTrainedModel):
        config_class = TableConfig

        def __init__(self, config):
            super().__init__(config)
            self.proj = torch.nn.Linear(4, 4)
            self.table = Table()
            self.post_init()

        def _init_weights(self, module):
            if isinstance(module, torch.nn.Linear):
                module.weight.data.normal_(0, 0.02)
            elif isinstance(module, TableModel):
                module.weight_scale = float(module.proj.weight.abs().max())

    torch.manual_seed(0)
    model = TableModel(TableConfig())
    save_pretrained_flashpack(model, tmp_path / "fp")
    loaded = from_pretrained_flashpack(TableModel, tmp_path / "fp")
    assert torch.equal(loaded.table.positions, model.table.positions)
    assert torch.equal(loaded.proj.weight, model.proj.weight)


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs Linux's /proc/self/io")
def test_a_copied_load_reads_the_file_while_the_model_is_built(tmp_path):
    # A model whose __init__ waits until the process has read the whole file is built only if
    # something else reads it meanwhile: the load, started before the model is built.
    torch.manual_seed(0)
    original = LlamaForCausalLM(tiny_config(hidden_size=256, intermediate_size=1024, vocab_size=4096)).eval()
    save_pretrained_flashpack(original, tmp_path)
    size = os.path.getsize(tmp_path / "model.flashpack")
    seen = []

    class WaitingLlama(LlamaForCausalLM):
        def __init__(self, config, *args, **kwargs):
            seen.append(wait_for_reads(start, size))
            super().__init__(config, *args, **kwargs)

    start = bytes_read_by_this_process()
    loaded = from_pretrained_flashpack(WaitingLlama, tmp_path, copy=True)
    assert seen[0] >= size
    assert torch.equal(logits(loaded), logits(original))


def test_an_error_while_building_comes_through_a_copied_load_as_it_is(saved):
    class Failing(LlamaForCausalLM):
        def __init__(self, config, *args, **kwargs):
            raise RuntimeError("this model cannot be built")

    with pytest.raises(RuntimeError, match="this model cannot be built"):
        from_pretrained_flashpack(Failing, saved, copy=True)


def test_copied_loads_that_leave_entries_out_are_those_of_the_plain_load(tmp_path):
    # T5 holds its lm_head as a second name of the shared embedding (nothing more to read),
    # T5EncoderModel leaves the decoder out (its bytes are not read).
    t5 = tiny_t5()
    save_pretrained_flashpack(t5, tmp_path)
    ids = torch.tensor([[1, 5, 9, 33]])
    for model_class in (transformers.T5ForConditionalGeneration, transformers.T5EncoderModel):
        copied = from_pretrained_flashpack(model_class, tmp_path, copy=True)
        mapped = from_pretrained_flashpack(model_class, tmp_path)
        assert copied.state_dict().keys() == mapped.state_dict().keys()
        assert all(torch.equal(a, b) for a, b in zip(copied.state_dict().values(), mapped.state_dict().values()))
        with torch.no_grad():
            outputs = [m.encoder(ids) if hasattr(m, "decoder") else m(ids) for m in (copied, mapped)]
        assert torch.equal(outputs[0].last_hidden_state, outputs[1].last_hidden_state)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_loads_onto_cuda_on_the_callers_stream(model, saved):
    # The file is loaded on a thread of its own while the model is built: on the caller's
    # current stream, as a load on the calling thread would be.
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        loaded = FlashLlama.from_pretrained_flashpack(saved, device="cuda")
        with torch.no_grad():
            out = loaded(IDS.cuda()).logits
    stream.synchronize()
    reference = FlashLlama.from_pretrained_flashpack(saved).to("cuda")
    assert all(torch.equal(a, b.cuda()) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    with torch.no_grad():
        assert torch.equal(out, reference(IDS.cuda()).logits)
