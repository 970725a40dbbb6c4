"""FlashPackMixin and assign_from_file: models built on meta, weights that are the loaded memory."""

import copy
import os
import warnings

import pytest
import torch

import flashpack_ops
from conftest import bytes_read_by_this_process, wait_for_reads
from flashpack_ops import FlashPackMixin, assign_from_file
from flashpack_ops.mixin import init_empty_parameters


class TinyLM(torch.nn.Module, FlashPackMixin):
    """Embedding tied to the head, a rotary-like non-persistent buffer, a frozen bias, dropout."""

    def __init__(self, vocab=40, width=16, base=10000.0):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.proj = torch.nn.Linear(width, width)
        self.proj.bias.requires_grad_(False)
        self.norm = torch.nn.LayerNorm(width)
        self.drop = torch.nn.Dropout(0.5)
        self.head = torch.nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight
        inv_freq = 1.0 / (base ** (torch.arange(0, width, 2, dtype=torch.float32) / width))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("step", torch.tensor(7, dtype=torch.int64))

    def forward(self, ids):
        h = self.norm(self.proj(self.embed(ids)))
        angles = ids[:, None].float() * self.inv_freq[None, :]
        h = h * torch.cat([angles.cos(), angles.sin()], dim=-1)
        return self.head(self.drop(h)) + self.step


def trained_model(seed=0, **kwargs):
    torch.manual_seed(seed)
    model = TinyLM(**kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    model.step.fill_(11)
    return model.eval()


IDS = torch.arange(12) % 40


@pytest.fixture
def saved(tmp_path):
    model = trained_model()
    path = tmp_path / "tiny.flashpack"
    model.save_flashpack(path)
    return model, path


def test_round_trip_outputs_are_bit_identical(saved):
    model, path = saved
    loaded = TinyLM.from_flashpack(path)
    assert torch.equal(loaded(IDS), model(IDS))


def test_parameters_are_the_loaded_memory(saved):
    _, path = saved
    loaded = TinyLM.from_flashpack(path, keep_flash_ref_on_model=True)
    # The blocks the model keeps, as the reference keeps them; every weight is a view of them.
    storage, meta = loaded._flash_shared_storage, loaded._flash_shared_storage_meta
    assert isinstance(storage, flashpack_ops.FlashTensorStorage)
    tensors = dict(flashpack_ops.iterate_from_flash_tensor(storage, meta))
    for name, param in loaded.named_parameters(remove_duplicate=False):
        assert param.data_ptr() == tensors[name].data_ptr(), name
    assert loaded.step.data_ptr() == tensors["step"].data_ptr()


def test_tied_weights_stay_one_parameter(saved):
    _, path = saved
    loaded = TinyLM.from_flashpack(path)
    assert loaded.head.weight is loaded.embed.weight
    assert len(list(loaded.parameters())) == len(list(trained_model().parameters()))


def test_non_persistent_buffer_is_computed_not_left_on_meta(saved):
    _, path = saved
    loaded = TinyLM.from_flashpack(path)
    assert "inv_freq" not in flashpack_ops.load_file(path)
    assert torch.equal(loaded.inv_freq, TinyLM().inv_freq)
    for name, tensor in list(loaded.named_parameters()) + list(loaded.named_buffers()):
        assert tensor.device.type == "cpu", name


def test_eval_mode_and_requires_grad_kept(saved):
    _, path = saved
    loaded = TinyLM.from_flashpack(path)
    assert not loaded.training and not loaded.drop.training
    assert loaded.embed.weight.requires_grad and loaded.proj.weight.requires_grad
    assert not loaded.proj.bias.requires_grad
    assert isinstance(loaded.proj.weight, torch.nn.Parameter)


def test_constructor_arguments_are_passed(tmp_path):
    model = trained_model(vocab=24, width=8)
    path = tmp_path / "small.flashpack"
    model.save_flashpack(path)
    loaded = TinyLM.from_flashpack(path, 24, width=8)
    assert torch.equal(loaded(IDS % 24), model(IDS % 24))
    with pytest.warns(UserWarning, match="does not take"):
        TinyLM.from_flashpack(path, 24, width=8, not_an_argument=1)


def test_init_empty_parameters_keeps_buffers_real():
    with init_empty_parameters():
        model = TinyLM()
    assert all(p.is_meta for p in model.parameters())
    assert not model.inv_freq.is_meta and not model.step.is_meta
    assert torch.nn.Module.register_parameter.__name__ == "register_parameter"


def test_strict_error_lists_missing_and_unexpected_names(tmp_path):
    model = trained_model()
    state = dict(model.state_dict())
    state["extra.weight"] = torch.ones(3)
    del state["proj.bias"]
    path = tmp_path / "mismatch.flashpack"
    flashpack_ops.save_file(state, path)
    with pytest.raises(ValueError, match=r"parameters missing from the file: proj\.bias") as info:
        TinyLM.from_flashpack(path)
    assert "extra.weight" in str(info.value) and str(path) in str(info.value)


def test_failed_assign_leaves_model_untouched(tmp_path):
    path = tmp_path / "partial.flashpack"
    flashpack_ops.save_file({"proj.weight": torch.zeros(16, 16)}, path)
    model = trained_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="missing"):
        assign_from_file(model, path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_integer_tensor_for_a_trainable_parameter_is_refused_before_any_change(tmp_path):
    # The last parameter cannot take the file's dtype (int64 cannot require grad): the
    # error must name it and come before the first parameter is replaced.
    path = tmp_path / "int_bias.flashpack"
    flashpack_ops.save_file({"weight": torch.full((2, 2), 7.0), "bias": torch.tensor([1, 2])}, path)
    model = torch.nn.Linear(2, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="parameter 'bias' requires grad but is torch.int64 in the file"):
        assign_from_file(model, path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_shape_mismatch_is_named(tmp_path):
    state = trained_model().state_dict()
    state["proj.weight"] = torch.zeros(4, 4)
    path = tmp_path / "shape.flashpack"
    flashpack_ops.save_file(state, path)
    with pytest.raises(ValueError, match=r"'proj\.weight' has shape \(4, 4\) in the file but \(16, 16\)"):
        TinyLM.from_flashpack(path)


def test_non_strict_load_initialises_what_is_missing_as_building_the_model_would(tmp_path):
    model = trained_model()
    state = dict(model.state_dict())
    del state["proj.bias"]
    state["extra"] = torch.ones(2)
    path = tmp_path / "loose.flashpack"
    flashpack_ops.save_file(state, path)
    torch.manual_seed(5)
    with pytest.warns(UserWarning, match=r"1 tensors initialised as reset_parameters\(\) initialises them: "
                                         r"proj\.bias \("):
        loaded = TinyLM.from_flashpack(path, strict=False)
    # Linear.reset_parameters() draws the bias from U(-1/sqrt(fan_in), 1/sqrt(fan_in)); its
    # weight, loaded, is out of its reach (and a meta stand-in draws nothing).
    torch.manual_seed(5)
    assert torch.equal(loaded.proj.bias, torch.empty(16).uniform_(-0.25, 0.25))
    assert torch.equal(loaded.proj.weight, model.proj.weight)
    assert not loaded.proj.bias.requires_grad
    assert not any(t.is_meta for t in loaded.parameters())


class ManyLayers(torch.nn.Module, FlashPackMixin):
    """Many small layers, and one module held under two names (shared by two parents)."""

    def __init__(self, n):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(n))
        self.shared = torch.nn.Sequential(torch.nn.Linear(2, 2))
        self.again = torch.nn.Sequential(self.shared[0])


def test_many_missing_tensors_are_each_initialised_by_their_module(tmp_path):
    # Half the layers are in the file: the other half, and the shared layer, are initialised
    # by their own reset_parameters(), the loaded ones left as they are.
    model = ManyLayers(2000)
    state = {name: t for name, t in model.state_dict().items() if name.startswith("layers.")
             and int(name.split(".")[1]) < 1000}
    path = tmp_path / "half.flashpack"
    flashpack_ops.save_file(state, path)
    with pytest.warns(UserWarning, match=r"2002 tensors initialised as reset_parameters\(\) initialises them: "
                                         r"layers\.1000\.weight, layers\.1000\.bias, .* and 1982 more \("):
        loaded = ManyLayers.from_flashpack(path, 2000, strict=False)
    for k, layer in enumerate(loaded.layers):
        if k < 1000:
            assert torch.equal(layer.weight, model.layers[k].weight) and torch.equal(layer.bias, model.layers[k].bias)
        else:
            assert layer.weight.any() and layer.bias.any() and layer.weight.abs().max() <= 2 ** -0.5
    assert loaded.again[0] is loaded.shared[0] and loaded.shared[0].weight.any()


class Scaled(torch.nn.Module, FlashPackMixin):
    """A parameter held by a module that has no reset_parameters()."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)
        self.scale = torch.nn.Parameter(torch.ones(4))


def test_what_no_reset_parameters_covers_is_zero_filled(tmp_path):
    model = Scaled()
    path = tmp_path / "scaled.flashpack"
    flashpack_ops.save_file({"linear.weight": model.linear.weight, "linear.bias": model.linear.bias}, path)
    with pytest.warns(UserWarning, match=r"1 tensors zero-filled: scale \("):
        loaded = Scaled.from_flashpack(path, strict=False)
    assert torch.equal(loaded.scale, torch.zeros(4))
    assert torch.equal(loaded.linear.weight, model.linear.weight) and torch.equal(loaded.linear.bias, model.linear.bias)


def test_ignored_names_are_skipped_both_ways(saved):
    model, path = saved
    with pytest.warns(UserWarning, match=r"2 tensors initialised as reset_parameters\(\)"):
        loaded = TinyLM.from_flashpack(path, ignore_prefixes=["proj."], strict=False)
    assert loaded.proj.weight.abs().max() <= 0.25 and loaded.proj.weight.any()
    assert torch.equal(loaded.embed.weight, model.embed.weight)
    # With the names ignored, a strict load does not count them as missing.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        TinyLM.from_flashpack(path, ignore_suffixes=[".bias"])


def test_dtype_conversion_and_buffer_dtypes(tmp_path):
    model = trained_model()
    # save_flashpack converts floating-point tensors only, as model.to(dtype) does: the
    # integer buffer keeps its dtype and the model loads the file back as it is.
    saved = tmp_path / "saved_bf16.flashpack"
    model.save_flashpack(saved, target_dtype=torch.bfloat16)
    fresh = trained_model(seed=1)
    assign_from_file(fresh, saved)
    assert fresh.embed.weight.dtype == torch.bfloat16 and fresh.step.dtype == torch.int64
    assert torch.equal(fresh.step, model.step)
    # pack_to_file converts every tensor, as the reference does.
    path = tmp_path / "bf16.flashpack"
    flashpack_ops.pack_to_file(model, path, target_dtype=torch.bfloat16)
    fresh = trained_model(seed=1)
    with pytest.raises(ValueError, match="buffer 'step' is torch.bfloat16 in the file but torch.int64"):
        assign_from_file(fresh, path)
    assign_from_file(fresh, path, coerce_dtype=True)
    assert fresh.embed.weight.dtype == torch.bfloat16 and fresh.step.dtype == torch.int64
    assert torch.equal(fresh.embed.weight, model.embed.weight.to(torch.bfloat16))

    f32 = tmp_path / "f32.flashpack"
    model.save_flashpack(f32)
    converted = trained_model(seed=1)
    assign_from_file(converted, f32, dtype=torch.float16)
    assert converted.proj.weight.dtype == torch.float16 and converted.step.dtype == torch.int64
    assert torch.equal(converted.proj.weight, model.proj.weight.half())


def test_what_is_no_module_is_refused_as_such(tmp_path):
    path = tmp_path / "linear.flashpack"
    flashpack_ops.save_file(torch.nn.Linear(3, 2).state_dict(), path)
    for model in (None, torch.nn.Linear(3, 2).state_dict()):
        with pytest.raises(TypeError, match=rf"assign_from_file: cannot load .*linear.flashpack into a "
                                            rf"{type(model).__name__}: the model must be an nn.Module"):
            assign_from_file(model, path)


def test_a_wrong_dtype_is_refused_as_the_argument_it_is(tmp_path):
    # Neither the file (which is float32) nor a device is at fault: the dtype argument is.
    path = tmp_path / "f32.flashpack"
    flashpack_ops.save_file(torch.nn.Linear(3, 2).state_dict(), path)
    model = torch.nn.Linear(3, 2)
    before = model.weight
    with pytest.raises(ValueError, match=r"assign_from_file: cannot load .*f32.flashpack: dtype=torch.int32 is not a "
                                         r"floating-point dtype"):
        assign_from_file(model, path, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"assign_from_file: cannot load .*f32.flashpack: dtype: 'float17' is not a "
                                         r"torch dtype"):
        assign_from_file(model, path, dtype="float17")
    assert model.weight is before
    assign_from_file(model, path, dtype="bfloat16")  # by name, as save_file's target_dtype takes it
    assert model.weight.dtype == torch.bfloat16


def test_assign_into_a_built_model_moves_nothing_it_does_not_load(saved):
    model, path = saved
    fresh = trained_model(seed=3)
    inv_freq = fresh.inv_freq
    assign_from_file(fresh, path, strict=True)
    assert fresh.inv_freq is inv_freq
    assert torch.equal(fresh(IDS), model(IDS))


def test_reference_package_file_loads(tmp_path):
    flashpack = pytest.importorskip("flashpack")
    model = trained_model()
    path = tmp_path / "ref.flashpack"
    flashpack.pack_to_file(model, str(path), target_dtype=None)
    loaded = TinyLM.from_flashpack(path)
    assert torch.equal(loaded(IDS), model(IDS))
    assert loaded.head.weight is loaded.embed.weight


def test_import_as_flashpack_keeps_reference_names():
    import flashpack_ops as flashpack

    for name in ("FlashPackMixin", "assign_from_file", "pack_to_file", "get_flashpack_file_metadata",
                 "is_flashpack_file", "patch_integrations"):
        assert hasattr(flashpack, name), name
    assert [p for p in ("path", "device", "strict", "ignore_names", "ignore_prefixes", "ignore_suffixes")
            if p not in flashpack.FlashPackMixin.from_flashpack.__code__.co_varnames] == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_from_flashpack_onto_cuda(saved):
    model, path = saved
    loaded = TinyLM.from_flashpack(path, device="cuda")
    assert all(t.is_cuda for t in list(loaded.parameters()) + list(loaded.buffers()))
    assert loaded.head.weight is loaded.embed.weight
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name].cpu(), tensor), name
    # Against the saved model on the same GPU: the CPU's kernels round differently.
    assert loaded.training == model.training
    assert torch.equal(loaded(IDS.cuda()), copy.deepcopy(model).cuda()(IDS.cuda()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_ignored_tensors_take_no_gpu_memory(tmp_path):
    path = tmp_path / "with_tower.flashpack"
    flashpack_ops.save_file({"weight": torch.randn(16, 16), "tower.weight": torch.randn(4 << 20)}, path)
    with init_empty_parameters():
        model = torch.nn.Linear(16, 16, bias=False)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    assign_from_file(model, path, device="cuda", ignore_prefixes=["tower."])
    assert model.weight.is_cuda and torch.cuda.memory_allocated() - before < (1 << 20)  # not the 16 MiB tower


class RankAwareLM(TinyLM):
    def __init__(self, vocab=40, width=16, rank=None, world_size=None):
        super().__init__(vocab, width)
        self.seen = (rank, world_size)


def test_rank_and_world_size_reach_constructors_that_take_them(saved):
    # As the reference does: given to a constructor that takes them, and no warning about a
    # constructor that does not (a world of one loads normally).
    _, path = saved
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = TinyLM.from_flashpack(path, rank=0, local_rank=0, world_size=1, use_distributed_loading=True)
    assert torch.equal(loaded(IDS), trained_model()(IDS))
    aware = RankAwareLM.from_flashpack(path, rank=0, world_size=1)
    assert aware.seen == (0, 1)


def test_other_threads_build_real_parameters_meanwhile():
    # The parameter patch is on the class while a model is built on meta; a model another
    # thread builds at the same time must come out real.
    import threading

    inside, done = threading.Event(), threading.Event()
    built = {}

    def other_thread():
        inside.wait(30)
        built["linear"] = torch.nn.Linear(4, 4)
        done.set()

    thread = threading.Thread(target=other_thread)
    thread.start()
    with init_empty_parameters():
        mine = torch.nn.Linear(4, 4)
        inside.set()
        assert done.wait(30)
    thread.join(30)
    assert mine.weight.is_meta
    assert not built["linear"].weight.is_meta and built["linear"].weight.abs().sum() > 0


def test_one_ignore_name_given_as_a_str_is_one_name(saved):
    # "proj." as a str must not ignore every name containing a "p", "r", "o" or "j".
    model, path = saved
    fresh = trained_model(seed=5)
    own = fresh.proj.weight.detach().clone()
    assign_from_file(fresh, path, strict=False, ignore_prefixes="proj.")
    assert torch.equal(fresh.proj.weight, own)
    assert torch.equal(fresh.embed.weight, model.embed.weight) and torch.equal(fresh.norm.weight, model.norm.weight)


def test_a_shape_mismatch_is_not_also_reported_missing(saved):
    _, path = saved
    with pytest.raises(ValueError) as info:
        TinyLM.from_flashpack(path, width=8)
    assert "'proj.weight' has shape (16, 16) in the file but (8, 8)" in str(info.value)
    assert "missing" not in str(info.value)


@pytest.mark.parametrize("wrap", ["compiled", "data_parallel"])
def test_a_wrapped_model_loads_the_file_of_the_model_it_wraps(saved, wrap):
    # torch.compile's and DataParallel's wrappers add _orig_mod. / module. to every name; the
    # file, written from the model itself, has none.
    model, path = saved
    fresh = trained_model(seed=7)
    # (DataParallel moves the model to the GPU where there is one: compared on the host.)
    wrapped = torch.compile(fresh) if wrap == "compiled" else torch.nn.DataParallel(fresh)
    assign_from_file(wrapped, path, keep_flash_ref_on_model=True)
    loaded = fresh.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded[name].cpu(), tensor), name
    assert isinstance(wrapped._flash_shared_storage, flashpack_ops.FlashTensorStorage)


@pytest.mark.parametrize("on_meta", [False, True], ids=["built", "meta"])
def test_activation_checkpointed_modules_load_the_names_their_state_dict_has(tmp_path, on_meta):
    # checkpoint_wrapper puts a module under _checkpoint_wrapped_module, and its state dict
    # (so a file saved from it) leaves that part out, as load_state_dict takes it.
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    def build(seed):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 3))
        model[0], model[1] = checkpoint_wrapper(model[0]), checkpoint_wrapper(checkpoint_wrapper(model[1]))
        return model

    source = build(0)
    path = str(tmp_path / "m.flashpack")
    flashpack_ops.save_file(source.state_dict(), path)
    assert list(flashpack_ops.load_file(path)) == ["0.weight", "0.bias", "1.weight", "1.bias"]
    if on_meta:
        with torch.device("meta"):
            model = build(1)
    else:
        model = build(1)
    assign_from_file(model, path)
    for (name, got), want in zip(model.named_parameters(), source.parameters()):
        assert "_checkpoint_wrapped_module" in name and torch.equal(got, want), name
    x = torch.randn(2, 4)
    assert torch.equal(model(x), source(x))


def test_pack_to_file_and_save_flashpack_create_the_directory(tmp_path):
    # As the reference does.
    model = trained_model()
    flashpack_ops.pack_to_file(model, tmp_path / "a" / "b" / "m.flashpack")
    model.save_flashpack(tmp_path / "c" / "m.flashpack")
    assert (tmp_path / "a" / "b" / "m.flashpack").is_file() and (tmp_path / "c" / "m.flashpack").is_file()


def test_a_module_whose_tensors_cannot_stand_aside_is_left_at_zero_and_intact():
    # Initialising a missing tensor moves the module's other tensors to meta stand-ins; a
    # quantized buffer cannot go there. The module is then left as it was, its bias at zero.
    from flashpack_ops.api import initialize_missing

    linear = torch.nn.Linear(2, 2)
    linear.register_buffer("q", torch.quantize_per_tensor(torch.ones(3), 0.1, 0, torch.qint8), persistent=False)
    weight = linear.weight
    with torch.no_grad():
        linear.bias.zero_()
    assert initialize_missing(linear, ["bias"], lambda m: m.reset_parameters()) == ["bias"]
    assert linear.weight is weight and not linear.weight.is_meta and not linear.q.is_meta
    assert torch.equal(linear.bias, torch.zeros(2))


class LinearWithGate(torch.nn.Linear):
    """A layer whose reset_parameters() knows only the Linear's own tensors."""

    def __init__(self):
        super().__init__(4, 4)
        self.gate = torch.nn.Parameter(torch.ones(4))


class Layers(torch.nn.Module, FlashPackMixin):
    def __init__(self):
        super().__init__()
        self.gated = LinearWithGate()
        self.attention = torch.nn.MultiheadAttention(8, 2)


def test_what_an_init_does_not_write_is_reported_as_zero(tmp_path):
    model = Layers()
    kept = {name: t for name, t in model.state_dict().items()
            if name not in ("gated.bias", "gated.gate", "attention.in_proj_weight")}
    path = tmp_path / "layers.flashpack"
    flashpack_ops.save_file(kept, path)
    with pytest.warns(UserWarning) as caught:
        loaded = Layers.from_flashpack(path, strict=False)
    message = str(caught[0].message)
    # MultiheadAttention's init is _reset_parameters(); LinearWithGate's knows no gate.
    assert "2 tensors initialised as reset_parameters() initialises them: gated.bias, attention.in_proj_weight" \
        in message
    assert "1 tensors zero-filled: gated.gate" in message
    assert loaded.gated.bias.any() and loaded.attention.in_proj_weight.any()
    assert torch.equal(loaded.gated.gate, torch.zeros(4))
    for name, tensor in kept.items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_a_model_built_entirely_on_meta_is_told_how_to_keep_its_computed_buffers(saved):
    model, path = saved
    with torch.device("meta"):
        empty = TinyLM()
    # Zeros for rotary frequencies give wrong outputs: an error unless strict=False.
    with pytest.raises(ValueError, match=r"1 non-persistent buffers on the meta device, which no file holds: "
                                         r"inv_freq; build the model with only its parameters on the meta device"):
        flashpack_ops.assign_from_file(empty, path)
    assert empty.embed.weight.is_meta  # unchanged
    with pytest.warns(UserWarning, match=r"zero-filled: inv_freq .*non-persistent buffers are in no file, build "
                                         r"the model with only its parameters on the meta device"):
        flashpack_ops.assign_from_file(empty, path, strict=False)
    with init_empty_parameters():
        right = TinyLM()
    flashpack_ops.assign_from_file(right, path)
    assert torch.equal(right.inv_freq, model.inv_freq)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is available")
def test_a_gpu_index_without_a_gpu_says_so(saved):
    _, path = saved
    with pytest.raises(ValueError, match="no CUDA device is available"):
        TinyLM.from_flashpack(path, device=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_index_past_the_gpus_there_are_says_so(saved):
    _, path = saved
    count = torch.cuda.device_count()
    with pytest.raises(ValueError, match=f"only {count} CUDA device\\(s\\) are visible"):
        TinyLM.from_flashpack(path, device=f"cuda:{count}")


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.complex128, torch.bool, torch.uint4], ids=str)
def test_a_missing_tensor_of_any_dtype_is_reported(tmp_path, dtype):
    # reset_parameters() sets the bias, not the extra tensor, whatever its dtype: that one
    # stays zero and is said to, and the bias keeps its init.
    class Odd(torch.nn.Linear):
        def __init__(self):
            super().__init__(4, 4)
            width = torch.empty(0, dtype=dtype).element_size()
            self.odd = torch.nn.Parameter(torch.zeros(3 * width, dtype=torch.uint8).view(dtype), requires_grad=False)

    class Holder(torch.nn.Module, FlashPackMixin):
        def __init__(self):
            super().__init__()
            self.layer = Odd()

    model = Holder()
    path = tmp_path / "holder.flashpack"
    flashpack_ops.save_file({"layer.weight": model.layer.weight}, path)
    with pytest.warns(UserWarning, match=r"1 tensors initialised as reset_parameters\(\) initialises them: "
                                         r"layer\.bias; 1 tensors zero-filled: layer\.odd \("):
        loaded = Holder.from_flashpack(path, strict=False)
    assert loaded.layer.bias.any() and loaded.layer.odd.dtype == dtype and not loaded.layer.odd.is_meta


class Untied(torch.nn.Module, FlashPackMixin):
    def __init__(self, tie=False):
        super().__init__()
        self.embed = torch.nn.Embedding(8, 4)
        self.head = torch.nn.Linear(4, 8, bias=False)
        if tie:
            self.head.weight = self.embed.weight


def test_a_tied_file_loaded_into_separate_weights_gives_each_its_own_memory(tmp_path):
    # Fine-tuning the two separately must not change both: as with load_state_dict.
    path = tmp_path / "tied.flashpack"
    Untied(tie=True).save_flashpack(path)
    loaded = Untied.from_flashpack(path, tie=False)
    assert loaded.head.weight is not loaded.embed.weight
    assert torch.equal(loaded.head.weight, loaded.embed.weight)
    with torch.no_grad():
        loaded.embed.weight.add_(1)
    assert not torch.equal(loaded.head.weight, loaded.embed.weight)
    # A model that ties them still gets one parameter over the loaded memory.
    tied = Untied.from_flashpack(path, tie=True)
    assert tied.head.weight is tied.embed.weight


class Rebuilding(torch.nn.Module, FlashPackMixin):
    """A reset_parameters() that builds its submodule anew."""

    def __init__(self):
        super().__init__()
        self.reset_parameters()

    def reset_parameters(self):
        self.proj = torch.nn.Linear(4, 4)
        self.scale = torch.nn.Parameter(torch.full((4,), 3.0))


def test_an_init_that_rebuilds_submodules_keeps_the_loaded_ones(tmp_path):
    proj = torch.nn.Linear(4, 4)
    path = tmp_path / "proj.flashpack"
    flashpack_ops.save_file({"proj.weight": proj.weight, "proj.bias": proj.bias}, path)
    with pytest.warns(UserWarning, match=r"1 tensors initialised as reset_parameters\(\) initialises them: scale"):
        loaded = Rebuilding.from_flashpack(path, strict=False)
    assert torch.equal(loaded.proj.weight, proj.weight) and torch.equal(loaded.proj.bias, proj.bias)
    assert torch.equal(loaded.scale, torch.full((4,), 3.0))


class SharedChild(torch.nn.Module, FlashPackMixin):
    """One Linear under two names, and a parameter of the parent's own."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(4, 4)
        self.b = self.a
        self.extra = torch.nn.Parameter(torch.full((4,), 3.0))

    def reset_parameters(self):
        with torch.no_grad():
            self.extra.fill_(3.0)


def test_a_module_shared_under_two_names_does_not_stop_its_parents_init(tmp_path):
    model = SharedChild()
    path = tmp_path / "shared.flashpack"
    flashpack_ops.save_file({"a.weight": model.a.weight}, path)
    with pytest.warns(UserWarning, match=r"2 tensors initialised as reset_parameters\(\) initialises them: "
                                         r"extra, a\.bias"):
        loaded = SharedChild.from_flashpack(path, strict=False)
    assert torch.equal(loaded.extra, torch.full((4,), 3.0))
    assert loaded.a.bias.any() and loaded.b is loaded.a
    assert torch.equal(loaded.a.weight, model.a.weight)


def test_a_parents_init_of_its_childrens_tensors_runs_after_theirs(tmp_path):
    # MultiheadAttention._reset_parameters() zeroes out_proj.bias, which Linear's own
    # reset_parameters() draws at random: building the layer leaves it zero, so must loading.
    model = Layers()
    kept = {name: t for name, t in model.state_dict().items() if name != "attention.out_proj.bias"}
    path = tmp_path / "no_out_bias.flashpack"
    flashpack_ops.save_file(kept, path)
    with pytest.warns(UserWarning, match=r"initialised as reset_parameters\(\) initialises them: "
                                         r"attention\.out_proj\.bias"):
        loaded = Layers.from_flashpack(path, strict=False)
    assert torch.equal(loaded.attention.out_proj.bias, torch.zeros(8))
    for name, tensor in kept.items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_what_is_missing_takes_the_dtype_the_loaded_tensors_take(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    path = tmp_path / "seq.flashpack"
    flashpack_ops.save_file({k: v for k, v in model.state_dict().items() if k != "1.weight"}, path)
    with torch.device("meta"):
        empty = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    with pytest.warns(UserWarning, match=r"initialised as reset_parameters\(\) initialises them: 1\.weight"):
        assign_from_file(empty, path, strict=False, dtype=torch.bfloat16)
    assert {t.dtype for t in empty.parameters()} == {torch.bfloat16}
    assert torch.equal(empty[1].weight, torch.ones(4, dtype=torch.bfloat16))
    empty(torch.ones(2, 4, dtype=torch.bfloat16))


class Norm(torch.nn.Module):
    """A module with a parameter and no init of its own."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(4))


class NormParent(torch.nn.Module, FlashPackMixin):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)
        self.norm = Norm()

    def reset_parameters(self):
        with torch.no_grad():
            self.norm.weight.fill_(1.0)


def test_a_tensor_whose_module_has_no_init_takes_its_parents(tmp_path):
    model = NormParent()
    path = tmp_path / "no_norm.flashpack"
    flashpack_ops.save_file({"proj.weight": model.proj.weight, "proj.bias": model.proj.bias}, path)
    with pytest.warns(UserWarning, match=r"1 tensors initialised as reset_parameters\(\) initialises them: "
                                         r"norm\.weight"):
        loaded = NormParent.from_flashpack(path, strict=False)
    assert torch.equal(loaded.norm.weight, torch.ones(4))
    assert torch.equal(loaded.proj.weight, model.proj.weight)


class FailingLinear(torch.nn.Linear):
    """An init that writes its bias (through .data, which no version counter sees) and fails."""

    def reset_parameters(self):
        if self.bias.is_meta:  # building the model on meta
            return
        self.bias.data.fill_(5.0)
        raise RuntimeError("half-way")


class Rewriting(torch.nn.Module, FlashPackMixin):
    def __init__(self, rewrite):
        super().__init__()
        self.layer = FailingLinear(4, 4)
        self.rewrite = rewrite

    def reset_parameters(self):
        if self.rewrite:
            with torch.no_grad():
                self.layer.bias.fill_(2.0)


@pytest.mark.parametrize("rewrite", [False, True], ids=["alone", "rewritten by the parent"])
def test_a_failed_init_is_trusted_only_where_a_later_one_wrote_again(tmp_path, rewrite):
    path = tmp_path / "no_bias.flashpack"
    flashpack_ops.save_file({"layer.weight": torch.ones(4, 4)}, path)
    said = r"1 tensors initialised as reset_parameters\(\) initialises them" if rewrite else r"1 tensors zero-filled"
    with pytest.warns(UserWarning, match=said + r": layer\.bias"):
        loaded = Rewriting.from_flashpack(path, rewrite, strict=False)
    assert torch.equal(loaded.layer.bias, torch.full((4,), 2.0) if rewrite else torch.zeros(4))
    assert torch.equal(loaded.layer.weight, torch.ones(4, 4))


class _Pair(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(2, 2)
        self.b = torch.nn.Linear(2, 2)


class _Holder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.pair = _Pair()


def test_a_file_of_a_wrapping_model_or_of_a_part_says_so(tmp_path):
    flashpack_ops.save_file(_Holder().state_dict(), tmp_path / "holder.flashpack")
    flashpack_ops.save_file(_Pair().state_dict(), tmp_path / "pair.flashpack")
    with pytest.raises(ValueError, match=r"the file holds the missing names under 'pair\.': it was saved from a "
                                         "model holding this one under that name"):
        flashpack_ops.assign_from_file(_Pair(), tmp_path / "holder.flashpack")
    with pytest.raises(ValueError, match=r"the file holds the missing names without 'pair\.': it was saved from "
                                         "that part of this model alone"):
        flashpack_ops.assign_from_file(_Holder(), tmp_path / "pair.flashpack")


def rewrite_in_place(path, source):
    """Overwrites ``path``'s bytes with ``source``'s, as ``cp`` does: same inode, no rename."""
    with open(path, "r+b") as f:
        f.write(source.read_bytes())


@pytest.mark.parametrize("load", ["from_flashpack", "assign_from_file"])
def test_a_copied_load_keeps_its_weights_when_the_file_is_rewritten_in_place(tmp_path, load):
    model = trained_model(seed=0)
    path, other = tmp_path / "m.flashpack", tmp_path / "other.flashpack"
    model.save_flashpack(path)
    trained_model(seed=1).save_flashpack(other)  # the same layout, other values
    if load == "from_flashpack":
        loaded = TinyLM.from_flashpack(path, copy=True)
    else:
        with init_empty_parameters():
            loaded = TinyLM()
        assign_from_file(loaded, path, copy=True)
    rewrite_in_place(path, other)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    path.write_bytes(b"")  # truncated: a mapping would fault on the next read
    assert torch.equal(loaded.eval()(IDS), model(IDS))


def test_an_older_files_copy_of_a_non_persistent_buffer_is_left_out(tmp_path):
    # A checkpoint from before inv_freq was made non-persistent, in another dtype: the model
    # keeps the buffer it computes, as load_state_dict leaves such an entry out.
    model = trained_model()
    state = dict(model.state_dict(), inv_freq=model.inv_freq.half())
    flashpack_ops.save_file(state, tmp_path / "old.flashpack")
    fresh = TinyLM()
    computed = fresh.inv_freq
    assign_from_file(fresh, tmp_path / "old.flashpack")
    assert fresh.inv_freq is computed and fresh.inv_freq.dtype == torch.float32
    ids = torch.tensor([1, 2, 3])
    assert torch.equal(fresh.eval()(ids), model.eval()(ids))


def test_a_tied_tensors_second_name_is_checked_too(tmp_path):
    # embed.weight and head.weight are one tensor in the model; the file's second name in
    # another shape is an error, as load_state_dict's size mismatch is.
    model = trained_model()
    state = dict(model.state_dict())
    state["head.weight"] = torch.zeros(3, 2)
    flashpack_ops.save_file(state, tmp_path / "bad.flashpack")
    with pytest.raises(ValueError, match=r"'head.weight' has shape \(3, 2\) in the file but \(40, 16\) in the model"):
        assign_from_file(TinyLM(), tmp_path / "bad.flashpack")


def test_a_lazy_module_is_named_not_failed_on_inside_torch(tmp_path):
    flashpack_ops.save_file({"weight": torch.ones(2, 3), "bias": torch.zeros(2)}, tmp_path / "lin.flashpack")
    with pytest.raises(ValueError, match=r"'weight' is an uninitialized \(lazy\) tensor in the model: run the model "
                                         r"once"):
        assign_from_file(torch.nn.LazyLinear(2), tmp_path / "lin.flashpack")


class WithExtraState(torch.nn.Module):
    """A module with tensor extra state, as load_state_dict hands it to set_extra_state."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)
        self.scale = torch.ones(2)

    def get_extra_state(self):
        return self.scale

    def set_extra_state(self, state):
        self.scale = state.clone()


def test_tensor_extra_state_is_handed_to_set_extra_state_as_load_state_dict_does(tmp_path):
    saved = torch.nn.Sequential(WithExtraState())
    saved[0].scale = torch.tensor([3.0, 4.0])
    flashpack_ops.pack_to_file(saved, tmp_path / "m.flashpack")
    assert "0._extra_state" in flashpack_ops.load_file(tmp_path / "m.flashpack")
    for strict in (True, False):
        loaded = torch.nn.Sequential(WithExtraState())
        assign_from_file(loaded, tmp_path / "m.flashpack", strict=strict)
        expected = torch.nn.Sequential(WithExtraState())
        expected.load_state_dict(saved.state_dict())
        assert torch.equal(loaded[0].scale, expected[0].scale) and torch.equal(loaded[0].scale, torch.tensor([3.0, 4.0]))
        assert torch.equal(loaded[0].lin.weight, saved[0].lin.weight)


class TaggedParameter(torch.nn.Parameter):
    """A Parameter subclass that only adds a method, as libraries tag their parameters."""

    def describe(self):
        return f"tagged {tuple(self.shape)}"


def test_a_parameter_subclass_keeps_its_class_as_load_state_dict_keeps_it(tmp_path):
    saved = torch.nn.Linear(3, 2)
    flashpack_ops.pack_to_file(saved, tmp_path / "lin.flashpack")
    model = torch.nn.Linear(3, 2)
    model.weight = TaggedParameter(torch.zeros(2, 3))
    model.weight.tag = "kept"
    assign_from_file(model, tmp_path / "lin.flashpack")
    assert type(model.weight) is TaggedParameter and model.weight.describe() == "tagged (2, 3)"
    assert model.weight.tag == "kept" and model.weight.requires_grad
    assert torch.equal(model.weight, saved.weight) and type(model.bias) is torch.nn.Parameter


def test_extra_state_is_handed_over_only_once_the_load_is_checked_and_is_missed_when_absent(tmp_path):
    saved = torch.nn.Sequential(WithExtraState())
    saved[0].scale = torch.tensor([3.0, 4.0])
    state = dict(saved.state_dict())
    state["0.lin.weight"] = torch.zeros(5, 5)  # wrong shape: the load fails
    flashpack_ops.save_file(state, tmp_path / "bad.flashpack")
    model = torch.nn.Sequential(WithExtraState())
    with pytest.raises(ValueError, match="'0.lin.weight' has shape"):
        assign_from_file(model, tmp_path / "bad.flashpack")
    assert torch.equal(model[0].scale, torch.ones(2))  # on error the model is unchanged
    # A file without the module's extra state: missing, as load_state_dict(strict=True) says.
    flashpack_ops.save_file({k: v for k, v in saved.state_dict().items() if k != "0._extra_state"},
                            tmp_path / "none.flashpack")
    with pytest.raises(ValueError, match=r"missing from the file: 0._extra_state"):
        assign_from_file(torch.nn.Sequential(WithExtraState()), tmp_path / "none.flashpack")
    assign_from_file(model, tmp_path / "none.flashpack", strict=False)
    assert torch.equal(model[0].scale, torch.ones(2)) and torch.equal(model[0].lin.weight, saved[0].lin.weight)


def test_loads_print_nothing_unless_silent_is_false(saved, capsys):
    # The README's difference from the reference: silent defaults to True, and
    # silent=False prints the one-line summary (the tied head and embedding count once).
    model, path = saved
    TinyLM.from_flashpack(path)
    assign_from_file(trained_model(seed=2), path)
    assert capsys.readouterr().out == ""
    loaded = TinyLM.from_flashpack(path, silent=False)
    assert capsys.readouterr().out == f"flashpack_ops: assigned 6 tensors from {path} to TinyLM on cpu\n"
    assert torch.equal(loaded(IDS), model(IDS))
    assign_from_file(trained_model(seed=2), path, silent=False)
    assert "flashpack_ops: assigned 6 tensors" in capsys.readouterr().out


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs Linux's /proc/self/io")
def test_a_copied_load_reads_the_file_while_the_model_is_built(tmp_path):
    # A model whose __init__ waits until the process has read the whole file is built only if
    # something else reads it meanwhile: the load, started before the model is built.
    original = trained_model(vocab=4000, width=256)
    path = tmp_path / "tiny.flashpack"
    original.save_flashpack(path)
    size = os.path.getsize(path)
    seen = []

    class WaitingLM(TinyLM):
        def __init__(self, *args, **kwargs):
            seen.append(wait_for_reads(start, size))
            super().__init__(*args, **kwargs)

    start = bytes_read_by_this_process()
    loaded = WaitingLM.from_flashpack(path, 4000, 256, copy=True)
    assert seen[0] >= size
    assert torch.equal(loaded(IDS), original(IDS))


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs Linux's /proc/self/io")
def test_a_copied_load_that_leaves_names_out_does_not_read_them(tmp_path):
    # Nothing is fetched ahead for a load that leaves names out: their bytes are neither read
    # nor held.
    class Two(torch.nn.Module, FlashPackMixin):
        def __init__(self):
            super().__init__()
            self.big = torch.nn.Linear(1024, 1024)
            self.small = torch.nn.Linear(4, 4)

    torch.manual_seed(0)
    original = Two()
    path = tmp_path / "two.flashpack"
    original.save_flashpack(path)
    size = os.path.getsize(path)
    start = bytes_read_by_this_process()
    with pytest.warns(UserWarning, match="big"):
        loaded = Two.from_flashpack(path, copy=True, strict=False, ignore_prefixes=["big."])
    assert bytes_read_by_this_process() - start < size // 4
    assert torch.equal(loaded.small.weight, original.small.weight)
