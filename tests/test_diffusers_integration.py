"""diffusers: models and pipelines saved as config + flashpack, loaded back bit for bit."""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDPMPipeline,
    DDPMScheduler,
    DiffusionPipeline,
    ModelMixin,
    UNet2DConditionModel,
    UNet2DModel,
)

import flashpack_ops  # noqa: E402
from conftest import assert_same, bytes_read_by_this_process, wait_for_reads  # noqa: E402
from flashpack_ops.integrations.diffusers import (  # noqa: E402
    FlashPackDiffusersModelMixin,
    FlashPackDiffusionPipeline,
    from_pretrained_flashpack,
    load_pipeline_flashpack,
    save_pipeline_flashpack,
    save_pretrained_flashpack,
)


class FlashUNet(UNet2DModel, FlashPackDiffusersModelMixin):
    pass


class FlashDDPMPipeline(DDPMPipeline, FlashPackDiffusionPipeline):
    pass


def tiny_unet(cls=UNet2DModel, seed=0):
    torch.manual_seed(seed)
    return cls(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
               down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
               norm_num_groups=4).eval()


def tiny_vae(seed=0):
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), latent_channels=2,
                         norm_num_groups=4, sample_size=8).eval()


SAMPLE = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def test_unet_round_trip_is_bit_identical(tmp_path):
    unet = tiny_unet(FlashUNet)
    unet.save_pretrained_flashpack(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.flashpack"]
    loaded = FlashUNet.from_pretrained_flashpack(tmp_path, keep_flash_ref_on_model=True)
    assert type(loaded) is FlashUNet and not loaded.training
    # The blocks the model keeps, as the reference keeps them; every weight is a view of them.
    storage, meta = loaded._flash_shared_storage, loaded._flash_shared_storage_meta
    assert isinstance(storage, flashpack_ops.FlashTensorStorage)
    tensors = dict(flashpack_ops.iterate_from_flash_tensor(storage, meta))
    for name, param in loaded.named_parameters():
        assert param.data_ptr() == tensors[name].data_ptr(), name
    with torch.no_grad():
        assert torch.equal(loaded(SAMPLE, 3).sample, unet(SAMPLE, 3).sample)


@pytest.mark.parametrize("content", [b"{not json", b'{"_class_name": "\xff"}'], ids=["not-json", "not-utf-8"])
@pytest.mark.parametrize("cls", [FlashUNet, ModelMixin], ids=["class", "generic"])
def test_a_malformed_config_is_reported_as_diffusers_reports_it(tmp_path, cls, content):
    tiny_unet(FlashUNet).save_pretrained_flashpack(tmp_path)
    (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(OSError) as theirs:
        UNet2DModel.from_pretrained(tmp_path)
    with pytest.raises(OSError) as ours:
        from_pretrained_flashpack(cls, tmp_path)
    assert str(ours.value) == str(theirs.value)
    assert str(tmp_path / "config.json") in str(ours.value)


def test_vae_through_auto_model_and_torch_dtype(tmp_path):
    vae = tiny_vae()
    flashpack_ops.patch_integrations()
    vae.save_pretrained_flashpack(tmp_path)
    loaded = diffusers.AutoModel.from_pretrained_flashpack(tmp_path)
    assert type(loaded) is AutoencoderKL
    with torch.no_grad():
        expected = vae(SAMPLE, sample_posterior=False).sample
        assert torch.equal(loaded(SAMPLE, sample_posterior=False).sample, expected)
    half = from_pretrained_flashpack(AutoencoderKL, tmp_path, torch_dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())


def tiny_wan():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                 out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=1,
                                 rope_max_seq_len=32).eval()


def test_modules_a_model_keeps_in_float32_stay_float32_as_diffusers_keeps_them(tmp_path):
    # Wan lists norms and embedders in _keep_in_fp32_modules: diffusers' from_pretrained(dtype=)
    # keeps them in float32, and so must a load and a save to another dtype.
    model = tiny_wan()
    assert model._keep_in_fp32_modules
    model.save_pretrained(tmp_path / "theirs")
    save_pretrained_flashpack(model, tmp_path / "ours")
    save_pretrained_flashpack(model, tmp_path / "ours-bf16", target_dtype=torch.bfloat16)
    expected = type(model).from_pretrained(tmp_path / "theirs", torch_dtype=torch.bfloat16)
    kept = {name for name, t in expected.state_dict().items() if t.dtype == torch.float32}
    assert kept
    for loaded in (from_pretrained_flashpack(type(model), tmp_path / "ours", dtype=torch.bfloat16),
                   from_pretrained_flashpack(type(model), tmp_path / "ours-bf16")):
        assert_same_model(loaded, expected)
    sample = torch.randn(1, 4, 1, 4, 4, generator=torch.Generator().manual_seed(0)).bfloat16()
    text = torch.randn(1, 3, 16, generator=torch.Generator().manual_seed(1)).bfloat16()
    with torch.no_grad():
        assert torch.equal(loaded(sample, torch.tensor([500]), text).sample,
                           expected(sample, torch.tensor([500]), text).sample)


def test_a_float16_file_loaded_as_it_is_keeps_the_float32_modules_diffusers_keeps(tmp_path):
    # Without a dtype the model takes the file's, and the modules Wan keeps in float32 stay
    # float32 as under diffusers' dtype=torch.float16.
    model = tiny_wan().half()  # every tensor float16, in both files
    model.save_pretrained(tmp_path / "theirs")
    save_pretrained_flashpack(model, tmp_path / "ours")
    assert {t.dtype for t in flashpack_ops.load_file(tmp_path / "ours" / "model.flashpack").values()} == \
        {torch.float16}
    expected = type(model).from_pretrained(tmp_path / "theirs", torch_dtype=torch.float16)
    loaded = from_pretrained_flashpack(type(model), tmp_path / "ours")
    assert {t.dtype for t in loaded.state_dict().values()} == {torch.float16, torch.float32}
    assert_same_model(loaded, expected)


def test_entries_the_class_drops_on_load_are_dropped_as_diffusers_drops_them(tmp_path):
    # Older Wan checkpoints hold norm_added_q, which WanTransformer3DModel lists in
    # _keys_to_ignore_on_load_unexpected: from_pretrained leaves it out without a word.
    from safetensors.torch import load_file, save_file

    model = tiny_wan()
    assert model._keys_to_ignore_on_load_unexpected
    model.save_pretrained(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file(dict(load_file(weights), **{"blocks.0.attn2.norm_added_q.weight": torch.ones(16)}), weights,
              metadata={"format": "pt"})
    expected, expected_info = type(model).from_pretrained(tmp_path, output_loading_info=True)
    flashpack_ops.save_file(load_file(weights), tmp_path / "model.flashpack")  # the file converted as it is
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded, info = from_pretrained_flashpack(type(model), tmp_path, output_loading_info=True)
    assert_same_model(loaded, expected)
    assert info["unexpected_keys"] == list(expected_info["unexpected_keys"]) == []
    flashpack_ops.save_file(dict(load_file(weights), **{"stray.weight": torch.ones(2)}), tmp_path / "model.flashpack")
    with pytest.raises(ValueError, match="stray.weight"):  # a name the class does not expect is still an error
        from_pretrained_flashpack(type(model), tmp_path)


def test_a_subclass_saves_the_class_diffusers_knows(tmp_path):
    # config.json names UNet2DModel, not FlashUNet: diffusers' own AutoModel loads it.
    save_pretrained_flashpack(tiny_unet(FlashUNet), tmp_path / "unet")
    assert json.loads((tmp_path / "unet" / "config.json").read_text())["_class_name"] == "UNet2DModel"
    assert type(from_pretrained_flashpack(diffusers.AutoModel, tmp_path / "unet")) is UNet2DModel

    class OwnNet(diffusers.ModelMixin, diffusers.ConfigMixin):  # a model of the user's own keeps its name
        @diffusers.configuration_utils.register_to_config
        def __init__(self, width: int = 4):
            super().__init__()
            self.proj = torch.nn.Linear(width, width)

    save_pretrained_flashpack(OwnNet(), tmp_path / "own")
    assert json.loads((tmp_path / "own" / "config.json").read_text())["_class_name"] == "OwnNet"


def run(pipeline):
    return pipeline(generator=torch.Generator().manual_seed(0), num_inference_steps=3, output_type="np").images


def test_pipeline_saves_models_as_flashpack_and_the_rest_as_usual(tmp_path):
    pipeline = FlashDDPMPipeline(unet=tiny_unet(FlashUNet), scheduler=DDPMScheduler(num_train_timesteps=10))
    pipeline.set_progress_bar_config(disable=True)
    pipeline.save_pretrained_flashpack(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["model_index.json", "scheduler", "unet"]
    assert sorted(os.listdir(tmp_path / "unet")) == ["config.json", "model.flashpack"]
    assert sorted(os.listdir(tmp_path / "scheduler")) == ["scheduler_config.json"]

    loaded = FlashDDPMPipeline.from_pretrained_flashpack(tmp_path)
    assert type(loaded) is FlashDDPMPipeline and type(loaded.scheduler) is DDPMScheduler
    assert type(loaded.unet) is UNet2DModel
    loaded.set_progress_bar_config(disable=True)
    assert torch.equal(torch.from_numpy(run(loaded)), torch.from_numpy(run(pipeline)))

    generic = FlashPackDiffusionPipeline.from_pretrained_flashpack(tmp_path)
    assert type(generic) is DDPMPipeline
    # model_index.json names library classes, so diffusers itself can read the directory's config.
    assert DDPMPipeline.load_config(tmp_path)["_class_name"] == "DDPMPipeline"
    replaced = FlashDDPMPipeline.from_pretrained_flashpack(tmp_path, scheduler=DDPMScheduler(num_train_timesteps=20))
    assert replaced.scheduler.config.num_train_timesteps == 20


def test_pipeline_save_takes_the_reference_arguments_by_position(tmp_path):
    # The reference's order, DiffusionPipeline.save_pretrained's: safe_serialization, variant,
    # max_shard_size, push_to_hub, commit_message, create_pr, token, repo_id, private,
    # is_main_process, align_bytes, silent, num_workers, target_dtype.
    pipeline = FlashDDPMPipeline(unet=tiny_unet(FlashUNet), scheduler=DDPMScheduler(num_train_timesteps=10))
    pipeline.save_pretrained_flashpack(tmp_path / "default", True)
    loaded = FlashDDPMPipeline.from_pretrained_flashpack(tmp_path / "default")
    for name, tensor in pipeline.unet.state_dict().items():
        assert torch.equal(loaded.unet.state_dict()[name], tensor), name

    pipeline.save_pretrained_flashpack(tmp_path / "half", True, None, None, False, None, False, None, None, None,
                                       True, 64, True, 0, torch.float16)
    meta = flashpack_ops.read_metadata(tmp_path / "half" / "unet" / "model.flashpack")
    assert meta["align_bytes"] == 64
    halved = flashpack_ops.load_file(tmp_path / "half" / "unet" / "model.flashpack")
    for name, tensor in pipeline.unet.state_dict().items():
        assert torch.equal(halved[name], tensor.to(torch.float16)), name

    pipeline.save_pretrained_flashpack(tmp_path / "other", True, None, None, False, None, False, None, None, None,
                                       False)  # is_main_process=False: nothing written
    assert not (tmp_path / "other").exists()


def test_pipeline_takes_one_device_and_refuses_a_map_over_several(tmp_path):
    pipeline = FlashDDPMPipeline(unet=tiny_unet(FlashUNet), scheduler=DDPMScheduler(num_train_timesteps=10))
    pipeline.save_pretrained_flashpack(tmp_path)
    loaded = FlashDDPMPipeline.from_pretrained_flashpack(tmp_path, device_map={"": "cpu"})
    assert {p.device.type for p in loaded.unet.parameters()} == {"cpu"}
    with pytest.raises(ValueError, match="a pipeline loads every component to one device"):
        FlashDDPMPipeline.from_pretrained_flashpack(tmp_path, device_map={"unet": "cpu", "": "cuda:0"})


def test_pipeline_saved_by_diffusers_loads_unchanged(tmp_path):
    # A pipeline directory without flashpack files: every component loads its usual way.
    pipeline = DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=10))
    pipeline.set_progress_bar_config(disable=True)
    pipeline.save_pretrained(tmp_path)
    loaded = FlashDDPMPipeline.from_pretrained_flashpack(tmp_path)
    # diffusers' own loader is the reference here: its results can differ in the last bit from the
    # in-memory pipeline (oneDNN kernels depend on the weights' memory alignment).
    expected = DDPMPipeline.from_pretrained(tmp_path)
    for p in (loaded, expected):
        p.set_progress_bar_config(disable=True)
    assert torch.equal(torch.from_numpy(run(loaded)), torch.from_numpy(run(expected)))


@pytest.mark.parametrize("argument", ["dtype", "torch_dtype"])
def test_pipeline_dtype_under_either_name(tmp_path, argument):
    # diffusers 0.42 names it dtype and deprecates torch_dtype: both must take effect.
    pipeline = FlashDDPMPipeline(unet=tiny_unet(FlashUNet), scheduler=DDPMScheduler(num_train_timesteps=10))
    pipeline.save_pretrained_flashpack(tmp_path)
    loaded = FlashDDPMPipeline.from_pretrained_flashpack(tmp_path, **{argument: torch.bfloat16})
    assert {p.dtype for p in loaded.unet.parameters()} == {torch.bfloat16}
    assert torch.equal(loaded.unet.conv_in.weight, pipeline.unet.conv_in.weight.to(torch.bfloat16))


def test_a_pipelines_bad_target_dtype_writes_nothing(tmp_path):
    pipeline = FlashDDPMPipeline(unet=tiny_unet(FlashUNet), scheduler=DDPMScheduler(num_train_timesteps=10))
    with pytest.raises(ValueError, match="target_dtype for 'unet': unknown dtype 'bf17'"):
        pipeline.save_pretrained_flashpack(tmp_path / "out", target_dtype={"unet": "bf17", "default": "fp16"})
    assert not (tmp_path / "out").exists()


def test_pipeline_dtype_and_torch_dtype_must_agree(tmp_path):
    pipeline = FlashDDPMPipeline(unet=tiny_unet(FlashUNet), scheduler=DDPMScheduler(num_train_timesteps=10))
    pipeline.save_pretrained_flashpack(tmp_path)
    with pytest.raises(ValueError, match="disagree; pass one of them"):
        FlashDDPMPipeline.from_pretrained_flashpack(tmp_path, dtype=torch.float16, torch_dtype=torch.bfloat16)
    # One dtype in two spellings, or the same dtype per component, is no disagreement.
    loaded = FlashDDPMPipeline.from_pretrained_flashpack(tmp_path, dtype="bf16", torch_dtype=torch.bfloat16)
    assert loaded.unet.dtype == torch.bfloat16
    loaded = FlashDDPMPipeline.from_pretrained_flashpack(tmp_path, dtype={"unet": "fp16"},
                                                         torch_dtype={"unet": torch.float16})
    assert loaded.unet.dtype == torch.float16


def test_model_options_from_pretrained_takes(tmp_path):
    unet = tiny_unet(FlashUNet)
    unet.save_pretrained_flashpack(tmp_path)
    loaded, info = FlashUNet.from_pretrained_flashpack(tmp_path, device_map="cpu", low_cpu_mem_usage=True,
                                                       output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    assert torch.equal(loaded.conv_in.weight, unet.conv_in.weight)
    with pytest.raises(ValueError, match="quantization_config=.* is not supported"):
        FlashUNet.from_pretrained_flashpack(tmp_path, quantization_config={"load_in_4bit": True})


def tiny_stable_diffusion(directory):
    """A text-to-image pipeline of diffusers models, a transformers text encoder and a
    tokenizer (a character vocabulary written to `directory`)."""
    transformers = pytest.importorskip("transformers")
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for letter in "abcdefghijklmnopqrstuvwxyz":
        vocab[letter] = len(vocab)
        vocab[letter + "</w>"] = len(vocab)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(directory, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt"),
                                           model_max_length=16)
    torch.manual_seed(0)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                norm_num_groups=4, attention_head_dim=2).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), latent_channels=4,
                        norm_num_groups=4, sample_size=8).eval()
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=DDIMScheduler(num_train_timesteps=10), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def text_to_image(pipeline):
    return pipeline("a cat", num_inference_steps=2, height=8, width=8, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images


def test_a_pipeline_with_a_transformers_text_encoder_and_a_tokenizer_round_trips(tmp_path):
    pipeline = tiny_stable_diffusion(tmp_path / "vocab")
    save_pipeline_flashpack(pipeline, tmp_path / "pipe")
    for name in ("unet", "vae", "text_encoder"):
        assert sorted(os.listdir(tmp_path / "pipe" / name)) == ["config.json", "model.flashpack"], name
    loaded = load_pipeline_flashpack(type(pipeline), tmp_path / "pipe")
    assert type(loaded.text_encoder) is type(pipeline.text_encoder)
    assert type(loaded.tokenizer) is type(pipeline.tokenizer)
    assert_same_model(loaded.text_encoder, pipeline.text_encoder)
    # Each model records its own folder, as diffusers' load records it (save_pretrained writes it back).
    pipeline.save_pretrained(tmp_path / "theirs")
    theirs = type(pipeline).from_pretrained(tmp_path / "theirs")
    for name in ("unet", "vae", "text_encoder"):
        assert getattr(theirs, name).config._name_or_path == str(tmp_path / "theirs" / name)
        assert getattr(loaded, name).config._name_or_path == str(tmp_path / "pipe" / name), name
    loaded.set_progress_bar_config(disable=True)
    assert torch.equal(torch.from_numpy(text_to_image(loaded)), torch.from_numpy(text_to_image(pipeline)))


@pytest.mark.parametrize("where", ["subfolder", "folder"])
def test_auto_model_loads_a_pipelines_text_encoder_as_diffusers_does(tmp_path, where):
    # diffusers' AutoModel loads a transformers component too: the class model_index.json
    # names for the subfolder, or, from its own folder, the one its config's model_type gives.
    pipeline = tiny_stable_diffusion(tmp_path / "vocab")
    pipeline.save_pretrained(tmp_path / "theirs")
    save_pipeline_flashpack(pipeline, tmp_path / "ours")
    flashpack_ops.patch_integrations()
    if where == "subfolder":
        expected = diffusers.AutoModel.from_pretrained(str(tmp_path / "theirs"), subfolder="text_encoder")
        loaded = diffusers.AutoModel.from_pretrained_flashpack(tmp_path / "ours", subfolder="text_encoder")
    else:
        expected = diffusers.AutoModel.from_pretrained(str(tmp_path / "theirs" / "text_encoder"))
        loaded = diffusers.AutoModel.from_pretrained_flashpack(tmp_path / "ours" / "text_encoder")
    assert type(loaded) is type(expected) is type(pipeline.text_encoder)
    assert not loaded.training
    assert_same_model(loaded, expected)
    half = from_pretrained_flashpack(ModelMixin, tmp_path / "ours", subfolder="text_encoder", dtype=torch.float16)
    assert_same_model(half, pipeline.text_encoder.to(torch.float16))


def files_in(directory):
    """Every file under `directory`, by its path relative to it, with its bytes."""
    return {os.path.relpath(os.path.join(root, name), directory): open(os.path.join(root, name), "rb").read()
            for root, _, names in os.walk(directory) for name in names}


def test_a_pipeline_save_that_fails_halfway_leaves_the_old_pipeline_whole(tmp_path):
    # A full disk at the largest component: the components written before it must not stay
    # beside the old ones, which would load as a third pipeline without a word.
    from test_crash_safety import file_size_limit

    old = tiny_stable_diffusion(tmp_path / "vocab")
    save_pipeline_flashpack(old, tmp_path / "pipe")
    before = files_in(tmp_path / "pipe")
    new = tiny_stable_diffusion(tmp_path / "vocab")
    with torch.no_grad():
        for name in ("unet", "vae", "text_encoder"):
            for p in getattr(new, name).parameters():
                p.add_(1)
    with file_size_limit(max(len(data) for data in before.values()) - 1):  # every file but the largest fits
        with pytest.raises(RuntimeError, match="File too large"):
            save_pipeline_flashpack(new, tmp_path / "pipe")
    assert files_in(tmp_path / "pipe") == before, "the failed save changed the directory"
    loaded = load_pipeline_flashpack(type(old), tmp_path / "pipe")
    for name in ("unet", "vae", "text_encoder"):
        assert_same_model(getattr(loaded, name), getattr(old, name))

    save_pipeline_flashpack(new, tmp_path / "pipe")  # with room, the new pipeline replaces the old whole
    assert files_in(tmp_path / "pipe").keys() == before.keys()
    loaded = load_pipeline_flashpack(type(old), tmp_path / "pipe")
    for name in ("unet", "vae", "text_encoder"):
        assert_same_model(getattr(loaded, name), getattr(new, name))


def test_a_pipeline_saved_again_keeps_its_files_permissions_and_its_linked_folders(tmp_path):
    # A direct save writes through a component folder linked elsewhere (another filesystem:
    # /dev/shm) and keeps a replaced file's permissions: a save staged in a hidden folder must too.
    old = FlashDDPMPipeline(unet=tiny_unet(FlashUNet, seed=0), scheduler=DDPMScheduler(num_train_timesteps=10))
    new = FlashDDPMPipeline(unet=tiny_unet(FlashUNet, seed=1), scheduler=DDPMScheduler(num_train_timesteps=20))
    directory = tmp_path / "pipe"
    old.save_pretrained_flashpack(directory)
    os.chmod(directory / "unet" / "model.flashpack", 0o600)
    elsewhere = tmp_path / "elsewhere"
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        elsewhere = tempfile.mkdtemp(dir="/dev/shm")
    try:
        shutil.copytree(directory / "scheduler", os.path.join(elsewhere, "scheduler"))
        shutil.rmtree(directory / "scheduler")
        os.symlink(os.path.join(elsewhere, "scheduler"), directory / "scheduler")

        new.save_pretrained_flashpack(directory)
        assert os.stat(directory / "unet" / "model.flashpack").st_mode & 0o777 == 0o600
        assert os.path.islink(directory / "scheduler")
        assert DDPMScheduler.from_pretrained(os.path.join(elsewhere, "scheduler")).config.num_train_timesteps == 20
        assert not [name for name in os.listdir(directory) if name.startswith(".")]
        loaded = FlashDDPMPipeline.from_pretrained_flashpack(directory)
        for name, tensor in new.unet.state_dict().items():
            assert torch.equal(loaded.unet.state_dict()[name], tensor), name
    finally:
        shutil.rmtree(elsewhere, ignore_errors=True)


@pytest.mark.parametrize("auto_class", ["AutoPipelineForText2Image", "AutoPipelineForImage2Image",
                                        "AutoPipelineForInpainting"])
def test_autopipeline_classes_load_their_task_of_a_saved_pipeline_as_diffusers_does(tmp_path, auto_class):
    pipeline = tiny_stable_diffusion(tmp_path / "vocab")
    pipeline.save_pretrained(tmp_path / "hf")
    save_pipeline_flashpack(pipeline, tmp_path / "fp")
    flashpack_ops.patch_integrations()
    auto = getattr(diffusers, auto_class)
    loaded = auto.from_pretrained_flashpack(tmp_path / "fp")
    expected = auto.from_pretrained(tmp_path / "hf")
    assert type(loaded) is type(expected)
    for name in ("unet", "vae", "text_encoder"):
        assert_same_model(getattr(loaded, name), getattr(expected, name))


@pytest.mark.parametrize("auto_class", ["AutoPipelineForText2Image", "AutoPipelineForImage2Image",
                                        "AutoPipelineForInpainting"])
@pytest.mark.parametrize("options", ["controlnet", "enable_pag", "both"])
def test_autopipeline_classes_load_the_controlnet_or_pag_pipeline_asked_for_as_diffusers_does(tmp_path, auto_class,
                                                                                            options):
    from diffusers import ControlNetModel

    pipeline = tiny_stable_diffusion(tmp_path / "vocab")
    pipeline.save_pretrained(tmp_path / "hf")
    save_pipeline_flashpack(pipeline, tmp_path / "fp")
    flashpack_ops.patch_integrations()
    torch.manual_seed(1)
    kwargs = {}
    if options in ("controlnet", "both"):
        kwargs["controlnet"] = ControlNetModel.from_unet(pipeline.unet)
    if options in ("enable_pag", "both"):
        kwargs["enable_pag"] = True
    auto = getattr(diffusers, auto_class)
    try:
        expected = auto.from_pretrained(tmp_path / "hf", **dict(kwargs))
    except ValueError as e:  # a combination diffusers has no pipeline for: the same refusal
        with pytest.raises(ValueError, match=re.escape(str(e))):
            auto.from_pretrained_flashpack(tmp_path / "fp", **kwargs)
        return
    loaded = auto.from_pretrained_flashpack(tmp_path / "fp", **kwargs)
    assert type(loaded) is type(expected)
    if "controlnet" in kwargs:
        assert loaded.controlnet is kwargs["controlnet"]
    for name in ("unet", "vae", "text_encoder"):
        assert_same_model(getattr(loaded, name), getattr(expected, name))


@pytest.mark.parametrize("dtype", [None, "float16"])
def test_the_command_converts_a_text_to_image_pipeline_directory(tmp_path, dtype):
    pipeline = tiny_stable_diffusion(tmp_path / "vocab")
    pipeline.save_pretrained(tmp_path / "hf")  # as diffusers saves it: safetensors
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "flashpack_ops", "convert", str(tmp_path / "hf"), str(tmp_path / "fp")]
    result = subprocess.run(command + (["--dtype", dtype] if dtype else []), capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    for name in ("unet", "vae", "text_encoder"):
        assert sorted(os.listdir(tmp_path / "fp" / name)) == ["config.json", "model.flashpack"], name
    loaded = load_pipeline_flashpack(type(pipeline), tmp_path / "fp")
    if dtype is None:
        loaded.set_progress_bar_config(disable=True)
        assert torch.equal(torch.from_numpy(text_to_image(loaded)), torch.from_numpy(text_to_image(pipeline)))
    else:
        for name in ("unet", "vae", "text_encoder"):
            assert_same_model(getattr(loaded, name), getattr(pipeline, name).to(torch.float16))


@pytest.mark.parametrize("vae_variant", [True, False], ids=["every-component", "vae-without"])
def test_a_pipeline_converted_in_part_loads_the_rest_in_their_variant_as_diffusers_does(tmp_path, vae_variant):
    # Saved by diffusers as float16 variants only (or the vae without one, which diffusers then
    # loads from its usual files); the UNet converted, the others as they are.
    pipeline = tiny_stable_diffusion(tmp_path / "vocab")
    pipeline.save_pretrained(tmp_path / "sd", variant="fp16")
    for name in ([] if vae_variant else os.listdir(tmp_path / "sd" / "vae")):
        if ".fp16." in name:
            os.rename(tmp_path / "sd" / "vae" / name, tmp_path / "sd" / "vae" / name.replace(".fp16.", "."))
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "sd", subfolder="unet", variant="fp16")
    save_pretrained_flashpack(unet, tmp_path / "sd" / "unet")
    loaded = load_pipeline_flashpack(type(pipeline), tmp_path / "sd", variant="fp16")
    expected = type(pipeline).from_pretrained(tmp_path / "sd", variant="fp16")
    for name in ("unet", "vae", "text_encoder"):
        assert_same_model(getattr(loaded, name), getattr(expected, name))


@pytest.mark.parametrize("dtype", ["float16", "fp16", torch.float16, {"default": "fp16"}])
def test_a_pipeline_converted_in_part_gives_every_component_the_dtype_in_any_spelling(tmp_path, dtype):
    pipeline = tiny_stable_diffusion(tmp_path / "vocab")
    pipeline.save_pretrained(tmp_path / "sd")
    save_pretrained_flashpack(pipeline.unet, tmp_path / "sd" / "unet")  # the others as diffusers saved them
    loaded = load_pipeline_flashpack(type(pipeline), tmp_path / "sd", dtype=dtype)
    for name in ("unet", "vae", "text_encoder"):
        assert_same_model(getattr(loaded, name), getattr(pipeline, name).to(torch.float16))


# ---- diffusers' own use_flashpack=True (through the reference package) --------------------------


def assert_same_model(loaded, expected):
    got, want = loaded.state_dict(), expected.state_dict()
    assert list(got) == list(want)
    for name in want:
        assert_same(got[name], want[name], name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_model_diffusers_saved_with_use_flashpack_loads_here_and_back(tmp_path, dtype):
    pytest.importorskip("flashpack")  # diffusers saves and loads use_flashpack files through the reference
    if "use_flashpack" not in UNet2DModel.save_pretrained.__code__.co_varnames:
        pytest.skip(f"diffusers {diffusers.__version__} has no use_flashpack")
    unet = tiny_unet().to(dtype)
    unet.save_pretrained(tmp_path / "theirs", use_flashpack=True)
    assert_same_model(from_pretrained_flashpack(UNet2DModel, tmp_path / "theirs"), unet)
    save_pretrained_flashpack(unet, tmp_path / "ours")
    assert_same_model(UNet2DModel.from_pretrained(tmp_path / "ours", use_flashpack=True), unet)


def test_a_pipeline_diffusers_saved_with_use_flashpack_loads_here_and_back(tmp_path):
    pytest.importorskip("flashpack")
    if "use_flashpack" not in DDPMPipeline.save_pretrained.__code__.co_varnames:
        pytest.skip(f"diffusers {diffusers.__version__} has no use_flashpack")
    pipeline = DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=10))
    pipeline.save_pretrained(tmp_path / "theirs", use_flashpack=True)
    assert_same_model(load_pipeline_flashpack(DDPMPipeline, tmp_path / "theirs").unet, pipeline.unet)
    save_pipeline_flashpack(pipeline, tmp_path / "ours")
    assert_same_model(DDPMPipeline.from_pretrained(tmp_path / "ours", use_flashpack=True).unet, pipeline.unet)


# ---- device_map="balanced": whole components over the GPUs, as diffusers places them -----------

GPUS = torch.cuda.device_count()


def tiny_ldm_pipeline(vqvae_channels=8):
    from diffusers import DDIMScheduler, LDMPipeline, VQModel

    torch.manual_seed(0)
    vqvae = VQModel(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                    up_block_types=("UpDecoderBlock2D",), block_out_channels=(vqvae_channels,), latent_channels=3,
                    norm_num_groups=4, sample_size=8, num_vq_embeddings=16).eval()
    return LDMPipeline(vqvae=vqvae, unet=tiny_unet(), scheduler=DDIMScheduler(num_train_timesteps=10))


def diffusers_plan(directory, pipeline_class, max_memory, dtype=None, passed=None):
    """diffusers' own device_map="balanced" plan for a pipeline directory (built on meta)."""
    from diffusers.pipelines.pipeline_loading_utils import _get_final_device_map

    config = DiffusionPipeline.load_config(directory)
    init_dict = {name: tuple(value) for name, value in config.items()
                 if not name.startswith("_") and isinstance(value, list) and len(value) == 2 and value[0]}
    return _get_final_device_map("balanced", pipeline_class, passed or {}, init_dict, None, dict(max_memory),
                                 dtype=dtype, cached_folder=str(directory))


def our_plan(directory, max_memory, dtype=None, passed=None, trust_remote_code=False):
    from flashpack_ops.integrations.diffusers.pipeline import _balanced_placement, _component_entries

    config = DiffusionPipeline.load_config(directory)
    return _balanced_placement(str(directory), _component_entries(config), passed or {}, dtype, dict(max_memory),
                               "test", trust_remote_code=trust_remote_code)


# Two GPUs that each hold the whole pipeline, and two on which only the smaller model fits
# per GPU in float32 (the vqvae, 4x wider here, is the larger one and is placed first).
ROOMY = {0: 10**9, 1: 10**9, "cpu": 10**10}
TIGHT = {0: 420_000, 1: 300_000, "cpu": 10**10}


@pytest.mark.filterwarnings("ignore:Device . is not available")
@pytest.mark.parametrize("max_memory", [ROOMY, TIGHT], ids=["roomy", "tight"])
@pytest.mark.parametrize("dtype", [None, torch.float16, {"vqvae": torch.float16, "default": torch.float32}],
                         ids=["file-dtype", "float16", "per-component"])
def test_balanced_plans_as_diffusers_plans(tmp_path, max_memory, dtype):
    pytest.importorskip("accelerate")
    pipeline = tiny_ldm_pipeline(vqvae_channels=32)
    save_pipeline_flashpack(pipeline, tmp_path)
    theirs = diffusers_plan(tmp_path, type(pipeline), max_memory, dtype)
    assert our_plan(tmp_path, max_memory, dtype) == theirs
    # As a string too, in either spelling.
    if dtype is torch.float16:
        assert our_plan(tmp_path, max_memory, "fp16") == our_plan(tmp_path, max_memory, "float16") == theirs


@pytest.mark.filterwarnings("ignore:Device . is not available")
def test_balanced_plans_a_passed_component_and_one_without_a_flashpack_file_as_diffusers_does(tmp_path):
    pytest.importorskip("accelerate")
    pipeline = tiny_ldm_pipeline(vqvae_channels=32)
    save_pipeline_flashpack(pipeline, tmp_path)
    pipeline.vqvae.save_pretrained(tmp_path / "vqvae")  # safetensors beside the flashpack file
    os.remove(tmp_path / "vqvae" / "model.flashpack")
    passed = {"unet": tiny_unet()}
    for max_memory in (ROOMY, TIGHT):
        assert our_plan(tmp_path, max_memory, passed=passed) == diffusers_plan(tmp_path, type(pipeline), max_memory,
                                                                               passed=passed)


@pytest.mark.filterwarnings("ignore:Device . is not available")
@pytest.mark.parametrize("max_memory", [ROOMY, {0: 30_000, 1: 20_000, "cpu": 10**10}, {0: 60_000, 1: 10**6}],
                         ids=["roomy", "tight", "uneven"])
@pytest.mark.parametrize("dtype", [None, torch.float16], ids=["file-dtype", "float16"])
def test_balanced_plans_a_text_to_image_pipeline_as_diffusers_plans(tmp_path, max_memory, dtype):
    # Three models, one of them a transformers text encoder, and a tokenizer.
    pytest.importorskip("accelerate")
    pipeline = tiny_stable_diffusion(tmp_path / "vocab")
    save_pipeline_flashpack(pipeline, tmp_path / "pipe")
    assert our_plan(tmp_path / "pipe", max_memory, dtype) == diffusers_plan(tmp_path / "pipe", type(pipeline),
                                                                             max_memory, dtype)


def test_balanced_counts_a_tied_tensor_once_and_empty_ones_as_nothing(tmp_path):
    from flashpack_ops.integrations.diffusers.pipeline import _component_bytes

    weight = torch.zeros(1000, 4)
    flashpack_ops.save_file({"empty": torch.zeros(0, 4), "embed": weight, "head": weight,
                             "steps": torch.zeros(10, dtype=torch.int64)}, tmp_path / "model.flashpack")
    assert _component_bytes(str(tmp_path), UNet2DModel, None) == 4000 * 4 + 10 * 8
    assert _component_bytes(str(tmp_path), UNet2DModel, torch.bfloat16) == 4000 * 2 + 10 * 8


def placed(pipeline):
    return {name: str(next(module.parameters()).device) for name, module in pipeline.components.items()
            if isinstance(module, torch.nn.Module)}


@pytest.mark.skipif(GPUS < 1, reason="needs a CUDA GPU")
@pytest.mark.parametrize("max_memory", [None, "first GPU small", "no GPU"], ids=["all-memory", "first-gpu-small",
                                                                                 "no-gpu"])
def test_balanced_places_components_on_the_gpus_as_diffusers_does(tmp_path, max_memory):
    pytest.importorskip("accelerate")
    pipeline = tiny_ldm_pipeline()
    pipeline.save_pretrained(tmp_path)  # safetensors, for diffusers' own loader
    save_pipeline_flashpack(pipeline, tmp_path)
    if max_memory == "first GPU small":
        # The first GPU holds neither model: diffusers moves to the next GPU or to the CPU.
        max_memory = {k: 1000 if k == 0 else 10**9 for k in range(GPUS)}
    elif max_memory == "no GPU":
        max_memory = {"cpu": 10**9}  # no plan: everything on the CPU, hf_device_map None
    loaded = load_pipeline_flashpack(type(pipeline), tmp_path, device_map="balanced", max_memory=max_memory)
    theirs = type(pipeline).from_pretrained(tmp_path, device_map="balanced", max_memory=max_memory)
    assert loaded.hf_device_map == theirs.hf_device_map
    # diffusers offloads a "cpu" component with accelerate's hooks (its weights on meta);
    # here it is simply loaded to the CPU.
    expected = {name: "cpu" if device == "meta" else device for name, device in placed(theirs).items()}
    assert placed(loaded) == expected
    if GPUS > 1 and max_memory is None:
        assert len(set(placed(loaded).values())) == 2
    for name in ("unet", "vqvae"):
        assert_same_model(getattr(loaded, name), getattr(pipeline, name))


def test_balanced_without_a_gpu_loads_to_the_cpu_and_other_strategies_are_refused(tmp_path):
    pipeline = tiny_ldm_pipeline()
    save_pipeline_flashpack(pipeline, tmp_path)
    with pytest.raises(ValueError, match="device_map='balanced' as diffusers does; got device_map='auto'"):
        load_pipeline_flashpack(type(pipeline), tmp_path, device_map="auto")
    if GPUS == 0:
        loaded = load_pipeline_flashpack(type(pipeline), tmp_path, device_map="balanced")
        assert set(placed(loaded).values()) == {"cpu"}
        assert_same_model(loaded.unet, pipeline.unet)


CUSTOM_PIPELINE = '''
from diffusers import DDPMPipeline


class MyPipeline(DDPMPipeline):
    def greet(self):
        return "mine"
'''


def test_a_custom_pipeline_of_the_users_own_loads_as_diffusers_loads_it(tmp_path):
    pipeline = DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=10))
    save_pipeline_flashpack(pipeline, tmp_path / "flashpack")
    pipeline.save_pretrained(tmp_path / "diffusers")
    code = tmp_path / "code" / "my_pipeline.py"
    code.parent.mkdir()
    code.write_text(CUSTOM_PIPELINE)
    expected = DiffusionPipeline.from_pretrained(tmp_path / "diffusers", custom_pipeline=str(code),
                                                 trust_remote_code=True)
    for pipeline_class in (DiffusionPipeline, FlashPackDiffusionPipeline):
        loaded = load_pipeline_flashpack(pipeline_class, tmp_path / "flashpack", custom_pipeline=str(code),
                                         trust_remote_code=True)
        assert type(loaded).__name__ == type(expected).__name__ == "MyPipeline" and loaded.greet() == "mine"
        assert_same_model(loaded.unet, pipeline.unet)
    # Its code runs only when trusted, as with diffusers.
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        load_pipeline_flashpack(DiffusionPipeline, tmp_path / "flashpack", custom_pipeline=str(code))


def test_a_component_whose_code_lies_in_its_folder_loads_as_diffusers_loads_it(tmp_path):
    pipeline = DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=10))
    save_pipeline_flashpack(pipeline, tmp_path)
    (tmp_path / "unet" / "my_unet.py").write_text(
        "from diffusers import UNet2DModel\n\n\nclass MyUNet(UNet2DModel):\n    pass\n")
    index = json.loads((tmp_path / "model_index.json").read_text())
    index["unet"] = ["my_unet", "MyUNet"]
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    loaded = load_pipeline_flashpack(DiffusionPipeline, tmp_path, trust_remote_code=True)
    assert type(loaded.unet).__name__ == "MyUNet"
    assert_same_model(loaded.unet, pipeline.unet)
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        load_pipeline_flashpack(DiffusionPipeline, tmp_path)


def test_a_pipeline_whose_index_names_its_own_code_loads_it(tmp_path):
    # model_index.json's _class_name as [file, class]: the pipeline's code beside the index.
    pipeline = DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=10))
    save_pipeline_flashpack(pipeline, tmp_path)
    (tmp_path / "my_pipeline.py").write_text(CUSTOM_PIPELINE)
    index = json.loads((tmp_path / "model_index.json").read_text())
    index["_class_name"] = ["my_pipeline", "MyPipeline"]
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    loaded = FlashPackDiffusionPipeline.from_pretrained_flashpack(tmp_path, trust_remote_code=True)
    assert loaded.greet() == "mine"
    assert_same_model(loaded.unet, pipeline.unet)


def test_a_library_model_index_json_names_is_not_imported(tmp_path, monkeypatch):
    # Importing a module runs its code: a library the file names that diffusers does not load
    # components from is not imported (here one beside the pipeline, on sys.path as the
    # directory a script runs from is), as diffusers does not import it.
    pipeline = DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=10))
    save_pipeline_flashpack(pipeline, tmp_path)
    ran = tmp_path / "ran"
    (tmp_path / "fp_named_library.py").write_text(f"open({str(ran)!r}, 'w').close()\n\n\nclass Sched:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    index = json.loads((tmp_path / "model_index.json").read_text())
    index["scheduler"] = ["fp_named_library", "Sched"]
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    try:
        with pytest.raises(ValueError, match="fp_named_library.Sched, which cannot be imported"):
            load_pipeline_flashpack(DiffusionPipeline, tmp_path)
        assert not ran.exists()
    finally:
        sys.modules.pop("fp_named_library", None)


@pytest.mark.filterwarnings("ignore:Device . is not available")
def test_balanced_sizes_a_component_whose_code_lies_in_its_folder(tmp_path):
    pytest.importorskip("accelerate")
    save_pipeline_flashpack(tiny_ldm_pipeline(vqvae_channels=32), tmp_path)
    expected = our_plan(tmp_path, TIGHT)
    (tmp_path / "vqvae" / "my_vq.py").write_text("from diffusers import VQModel\n\n\nclass MyVQ(VQModel):\n    pass\n")
    index = json.loads((tmp_path / "model_index.json").read_text())
    index["vqvae"] = ["my_vq", "MyVQ"]
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    assert our_plan(tmp_path, TIGHT, trust_remote_code=True) == expected


def test_components_the_pipeline_does_not_take_are_not_read(tmp_path):
    # model_index.json may name folders outside the directory; diffusers loads only the
    # components the pipeline takes, and so does a flashpack load: the damaged files there
    # are never read.
    pipeline = DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=10))
    save_pipeline_flashpack(pipeline, tmp_path / "pipeline")
    outside = tmp_path / "outside"
    shutil.copytree(tmp_path / "pipeline" / "unet", outside)
    (outside / "model.flashpack").write_bytes(b"not a flashpack file")
    index = json.loads((tmp_path / "pipeline" / "model_index.json").read_text())
    index["../outside"] = index[str(outside)] = ["diffusers", "UNet2DModel"]
    (tmp_path / "pipeline" / "model_index.json").write_text(json.dumps(index))
    with pytest.warns(UserWarning, match="names components DDPMPipeline does not take"):
        loaded = load_pipeline_flashpack(DiffusionPipeline, tmp_path / "pipeline")
    assert_same_model(loaded.unet, pipeline.unet)


def ldm_repo(hub, name):
    """A repo holding an LDM pipeline saved by diffusers, its unet also in flashpack, and
    files no load reads: a single-file checkpoint at the top, a folder no component names,
    ONNX and flax exports, and the vqvae's weights as float16 variant and torch file too."""
    pipeline = tiny_ldm_pipeline()
    repo = os.path.join(hub.root, "org", name)
    pipeline.save_pretrained(repo)
    pipeline.save_pretrained(repo, variant="fp16")  # the same weights, as variant files
    torch.save(pipeline.vqvae.state_dict(), os.path.join(repo, "vqvae", "diffusion_pytorch_model.bin"))
    save_pipeline_flashpack(pipeline, repo + "-fp")
    for entry in os.listdir(os.path.join(repo + "-fp", "unet")):
        os.replace(os.path.join(repo + "-fp", "unet", entry), os.path.join(repo, "unet", entry))
    os.replace(os.path.join(repo + "-fp", "model_index.json"), os.path.join(repo, "model_index.json"))
    extras = {"ldm-single-file.safetensors": b"a", "unet_ema/diffusion_pytorch_model.safetensors": b"b",
              "onnx/unet/model.onnx": b"c", "vqvae/diffusion_pytorch_model.msgpack": b"d"}
    for extra, content in extras.items():
        os.makedirs(os.path.dirname(os.path.join(repo, extra)), exist_ok=True)
        with open(os.path.join(repo, extra), "wb") as f:
            f.write(content)
    return pipeline, f"org/{name}"


def test_a_pipeline_repo_downloads_what_its_load_reads(hub):
    pipeline, repo = ldm_repo(hub, "ldm")
    loaded = load_pipeline_flashpack(DiffusionPipeline, repo)
    for name in ("unet", "vqvae"):
        assert_same_model(getattr(loaded, name), getattr(pipeline, name))
    assert hub.fetched(repo) == ["model_index.json", "scheduler/scheduler_config.json", "unet/config.json",
                                 "unet/model.flashpack", "vqvae/config.json",
                                 "vqvae/diffusion_pytorch_model.safetensors"]


def test_a_pipeline_repo_downloads_the_variant_asked_for_and_not_what_is_passed(hub):
    pipeline, repo = ldm_repo(hub, "ldm")
    loaded = load_pipeline_flashpack(DiffusionPipeline, repo, variant="fp16", unet=pipeline.unet)
    assert loaded.unet is pipeline.unet
    assert_same_model(loaded.vqvae, pipeline.vqvae)
    assert hub.fetched(repo) == ["model_index.json", "scheduler/scheduler_config.json", "vqvae/config.json",
                                 "vqvae/diffusion_pytorch_model.fp16.safetensors"]
    # Then offline, from what the cache holds.
    import huggingface_hub.constants

    huggingface_hub.constants.HF_HUB_OFFLINE = True  # the hub fixture restores it
    again = load_pipeline_flashpack(DiffusionPipeline, repo, variant="fp16", unet=pipeline.unet)
    assert_same_model(again.vqvae, pipeline.vqvae)


def test_a_pipeline_repo_with_a_component_at_its_top_loads_it_from_there(hub, tmp_path):
    # The text encoder and tokenizer in no folder of their own, at the top of the repo, as
    # diffusers' loader also reads them; only the unet converted.
    pipeline = tiny_stable_diffusion(tmp_path / "vocab")
    repo = os.path.join(hub.root, "org", "flat")
    pipeline.save_pretrained(repo)
    for name in ("text_encoder", "tokenizer"):
        for entry in os.listdir(os.path.join(repo, name)):
            os.replace(os.path.join(repo, name, entry), os.path.join(repo, entry))
        os.rmdir(os.path.join(repo, name))
    save_pretrained_flashpack(pipeline.unet, os.path.join(repo, "unet"))
    loaded = load_pipeline_flashpack(DiffusionPipeline, "org/flat")
    expected = DiffusionPipeline.from_pretrained(repo)
    for name in ("unet", "vae", "text_encoder"):
        assert_same_model(getattr(loaded, name), getattr(expected, name))
    assert "unet/diffusion_pytorch_model.safetensors" not in hub.fetched("org/flat")


def test_a_pipeline_reloaded_with_local_files_only_asks_the_hub_nothing(hub):
    pipeline, repo = ldm_repo(hub, "ldm")
    load_pipeline_flashpack(DiffusionPipeline, repo)
    hub.requests.clear()
    again = load_pipeline_flashpack(DiffusionPipeline, repo, local_files_only=True)
    assert_same_model(again.vqvae, pipeline.vqvae)
    assert hub.requests == []


def test_a_pipeline_repo_downloads_into_a_local_dir(hub, tmp_path):
    pipeline, repo = ldm_repo(hub, "ldm")
    loaded = load_pipeline_flashpack(DiffusionPipeline, repo, local_dir=tmp_path / "here")
    assert_same_model(loaded.unet, pipeline.unet)
    assert (tmp_path / "here" / "unet" / "model.flashpack").is_file()


def test_a_pipeline_repo_without_safetensors_asked_for_downloads_the_torch_files(hub):
    pipeline, repo = ldm_repo(hub, "ldm")
    loaded = load_pipeline_flashpack(DiffusionPipeline, repo, use_safetensors=False)
    assert_same_model(loaded.vqvae, pipeline.vqvae)
    fetched = [f for f in hub.fetched(repo) if f.startswith("vqvae/")]
    assert fetched == ["vqvae/config.json", "vqvae/diffusion_pytorch_model.bin"]


def test_a_repo_without_model_index_is_no_pipeline(hub):
    os.makedirs(os.path.join(hub.root, "org", "model"))
    tiny_unet().save_pretrained(os.path.join(hub.root, "org", "model"))
    with pytest.raises(FileNotFoundError, match="has no model_index.json; is it a diffusers pipeline directory"):
        load_pipeline_flashpack(DiffusionPipeline, "org/model")


def test_a_compiled_model_saves_as_the_model_it_compiles(tmp_path):
    unet = tiny_unet()
    save_pretrained_flashpack(torch.compile(unet), tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["_class_name"] == "UNet2DModel"
    assert_same_model(from_pretrained_flashpack(UNet2DModel, tmp_path), unet)


def test_a_copied_pipeline_load_keeps_its_weights_when_a_file_is_rewritten_in_place(tmp_path):
    pipeline = FlashDDPMPipeline(unet=tiny_unet(FlashUNet), scheduler=DDPMScheduler(num_train_timesteps=10))
    pipeline.save_pretrained_flashpack(tmp_path / "a")
    tiny_unet(FlashUNet, seed=1).save_pretrained_flashpack(tmp_path / "other")  # same layout, other values
    loaded = FlashDDPMPipeline.from_pretrained_flashpack(tmp_path / "a", copy=True)
    unet = FlashUNet.from_pretrained_flashpack(tmp_path / "a" / "unet", copy=True)
    with open(tmp_path / "a" / "unet" / "model.flashpack", "r+b") as f:  # as cp does: same inode, no rename
        f.write((tmp_path / "other" / "model.flashpack").read_bytes())
    for model in (loaded.unet, unet):
        assert_same_model(model, pipeline.unet)


def test_a_subclass_saved_the_usual_way_names_the_diffusers_classes(tmp_path):
    # The mixins only add methods: a plain save_pretrained must give a directory that diffusers
    # loads where the subclass does not exist (after push_to_hub, say).
    unet = tiny_unet(FlashUNet)
    unet.save_pretrained(tmp_path / "unet")
    assert json.loads((tmp_path / "unet" / "config.json").read_text())["_class_name"] == "UNet2DModel"
    assert_same_model(diffusers.AutoModel.from_pretrained(str(tmp_path / "unet")), unet)
    pipeline = FlashDDPMPipeline(unet=tiny_unet(FlashUNet), scheduler=DDPMScheduler(num_train_timesteps=10))
    pipeline.save_pretrained(tmp_path / "pipeline")
    index = json.loads((tmp_path / "pipeline" / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPipeline" and index["unet"] == ["diffusers", "UNet2DModel"]
    assert type(DiffusionPipeline.from_pretrained(tmp_path / "pipeline")) is DDPMPipeline


def test_ignore_mismatched_sizes_initialises_what_changed_shape(tmp_path):
    unet = tiny_unet(FlashUNet)
    unet.save_pretrained_flashpack(tmp_path)
    with pytest.raises(ValueError, match="conv_out.weight' has shape"):
        from_pretrained_flashpack(UNet2DModel, tmp_path, out_channels=4)
    with pytest.warns(UserWarning, match=r"tensors of another shape .* conv_out.weight \(\(3, 8, 3, 3\) in the file, "
                                         r"\(4, 8, 3, 3\) in the model\)"):
        loaded, info = from_pretrained_flashpack(UNet2DModel, tmp_path, out_channels=4, ignore_mismatched_sizes=True,
                                                 output_loading_info=True)
    assert sorted(name for name, _, _ in info["mismatched_keys"]) == ["conv_out.bias", "conv_out.weight"]
    assert info["missing_keys"] == [] and loaded.conv_out.weight.count_nonzero() > 0
    for name, tensor in unet.state_dict().items():
        if not name.startswith("conv_out."):
            assert torch.equal(loaded.state_dict()[name], tensor), name


def test_optional_components_model_index_does_not_name_load_as_none_as_diffusers_loads_them(tmp_path):
    # A model_index.json without safety_checker, feature_extractor and image_encoder (saved
    # before the pipeline had them, or edited): diffusers gives the optional components None.
    pipeline = tiny_stable_diffusion(tmp_path / "vocab")
    pipeline.save_pretrained(tmp_path / "theirs")
    save_pipeline_flashpack(pipeline, tmp_path / "ours")
    for name in ("theirs", "ours"):
        index = json.loads((tmp_path / name / "model_index.json").read_text())
        for component in ("safety_checker", "feature_extractor", "image_encoder"):
            del index[component]
        (tmp_path / name / "model_index.json").write_text(json.dumps(index))
    expected = type(pipeline).from_pretrained(tmp_path / "theirs")
    loaded = load_pipeline_flashpack(type(pipeline), tmp_path / "ours")
    assert type(loaded) is type(expected)
    assert loaded.safety_checker is loaded.feature_extractor is loaded.image_encoder is None
    assert sorted(loaded.components) == sorted(expected.components)
    for name in ("unet", "vae", "text_encoder"):
        assert_same_model(getattr(loaded, name), getattr(expected, name))


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs Linux's /proc/self/io")
def test_a_copied_load_reads_the_file_while_the_model_is_built(tmp_path):
    # A model whose from_config waits until the process has read the whole file is built only
    # if something else reads it meanwhile: the load, started before the model is built.
    torch.manual_seed(0)
    original = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                           block_out_channels=(128, 256), down_block_types=("DownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4).eval()
    save_pretrained_flashpack(original, tmp_path)
    size = os.path.getsize(tmp_path / "model.flashpack")
    assert size > 8 << 20  # more than the reads of building it (modules imported, configs)
    seen = []

    class WaitingUNet(UNet2DModel):
        @classmethod
        def from_config(cls, *args, **kwargs):
            seen.append(wait_for_reads(start, size))
            return super().from_config(*args, **kwargs)

    start = bytes_read_by_this_process()
    loaded = from_pretrained_flashpack(WaitingUNet, tmp_path, copy=True)
    assert seen[0] >= size
    with torch.no_grad():
        assert torch.equal(loaded(SAMPLE, 3).sample, original(SAMPLE, 3).sample)
