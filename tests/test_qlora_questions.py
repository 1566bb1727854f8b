"""The student questions of notebooks 03 and 06, answered by measurement: what a step holds at its peak
(``memory.TensorPeak``), QLoRA against LoRA (``lora.measure_training_step``), LoftQ (``lora.loftq_factors``,
``lora.apply_loftq_``) checked against peft's own decomposition, and generation speed (``quality.generation_speed``)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import bitsandbytes as bnb
import nbformat
import pytest
import torch

from helpers import environment, lora, memory, models, quality
from helpers.profiles import Profile

FLOAT32 = 4  # bytes


# ---------------------------------------------------------------------------------------------- TensorPeak


def test_tensor_peak_counts_new_storages_once_and_frees_them():
    before = torch.ones(1000)  # 4,000 bytes that existed before: not counted, nor its views, nor in-place results
    with memory.TensorPeak() as watched:
        view = before.view(10, 100)
        before.add_(1)
        first = before + 1  # 4,000
        second = first * 2  # 8,000 alive
        del first  # 4,000
        third = second + 1  # 8,000 again: the peak stays 8,000
    assert (watched.peak_bytes, watched.live_bytes) == (8 * FLOAT32 * 250, 8 * FLOAT32 * 250)
    assert watched.op_counts == {"aten::view": 1, "aten::add_": 1, "aten::add": 2, "aten::mul": 1}
    assert watched.peak_op == "aten::mul"  # reached first by `second`; `third` only came back to it
    del second, third, view
    assert watched.live_bytes == 8000, "after the block nothing changes the figures"


def four_bit_layer(double_quant: bool) -> bnb.nn.Linear4bit:
    torch.manual_seed(0)
    weight = torch.randn(128, 64)
    layer = bnb.nn.Linear4bit(64, 128, bias=False, compute_dtype=torch.float32, compress_statistics=double_quant,
                              quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=double_quant, quant_type="nf4",
                                     module=layer).to("cpu")
    layer.support_avx512bf16_for_cpu = False  # the portable path, as helpers.models.load_model sets it
    return layer


@pytest.mark.parametrize("double_quant", [False, True])
def test_tensor_peak_sees_the_dense_weight_inside_bitsandbytes_product(double_quant):
    layer = four_bit_layer(double_quant)
    dense, output = 128 * 64 * FLOAT32, 3 * 128 * FLOAT32
    absmax = (128 * 64 // 64) * FLOAT32 if double_quant else 0  # nested: the block scales decoded to float32 first
    x = torch.randn(3, 64)  # made before: only what the product creates is counted
    with torch.no_grad(), memory.TensorPeak() as watched:
        layer(x)
    assert watched.peak_bytes == dense + output + absmax
    assert watched.peak_op == "aten::linear"  # the product's output, while the rebuilt weight is still alive
    assert watched.op_counts["bitsandbytes::gemm_4bit"] == watched.op_counts["bitsandbytes::dequantize_4bit"] == 1


def test_tensor_peak_of_a_backward_holds_the_weight_again():
    layer = four_bit_layer(double_quant=False)
    x = torch.randn(3, 64, requires_grad=True)
    with memory.TensorPeak() as watched:
        y = layer(x)  # kept, as a training step keeps its activations until the backward has used them
        y.sum().backward()
    dense, output, grad_x, scalars = 128 * 64 * FLOAT32, 3 * 128 * FLOAT32, 3 * 64 * FLOAT32, 2 * FLOAT32
    # the forward's dense copy is freed after its product; the backward rebuilds one for the input's gradient
    assert watched.peak_bytes == output + scalars + dense + grad_x
    assert watched.live_bytes == output + grad_x  # the output, still referenced, and the input's gradient
    assert watched.op_counts["bitsandbytes::dequantize_4bit"] == 2


# ---------------------------------------------------------------------------------------------- a tiny 4-bit Llama

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, tie_word_embeddings=False)
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def load(folder: Path, four_bit: bool, r: int = 8, alpha: int = 16):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {"dtype": torch.float32}
    if four_bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    models.use_portable_cpu_path(model)
    if four_bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    environment.seed_everything(0)
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=TARGETS))


def training_batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 96, (2, 12), generator=generator)
    labels = input_ids.clone()
    labels[:, :8] = -100
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def test_a_qlora_step_dequantizes_every_weight_forward_and_every_needed_one_backward(checkpoint):
    model = load(checkpoint, four_bit=True)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    step = lora.measure_training_step(model, training_batch(), timed_repeats=1)
    layers = 2 * 7  # every Linear of the decoder is 4-bit
    assert step.products_4bit == step.dequantized_forward == layers  # the portable CPU path rebuilds every weight
    # layer 0's q, k and v read the normalized embeddings, which need no gradient: no weight rebuilt for them
    assert step.dequantized_backward == step.inputs_needing_grad_4bit == layers - 3
    assert step.gpu_peak_bytes is None and len(step.seconds) == 1 and math.isfinite(step.loss)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters() if p.requires_grad)


def test_the_same_step_on_a_float_base_dequantizes_nothing_and_holds_more_weights(checkpoint):
    lora_model, qlora_model = load(checkpoint, four_bit=False), load(checkpoint, four_bit=True)
    lora_step = lora.measure_training_step(lora_model, training_batch(), timed_repeats=1)
    qlora_step = lora.measure_training_step(qlora_model, training_batch(), timed_repeats=1)
    assert (lora_step.products_4bit, lora_step.dequantized_forward, lora_step.dequantized_backward) == (0, 0, 0)
    assert memory.true_footprint(qlora_model) < memory.true_footprint(lora_model)
    assert lora_step.step_peak_bytes > 0 and qlora_step.step_peak_bytes > 0
    # the largest dense weight a QLoRA step rebuilds is the most it can add on top of LoRA's step
    assert qlora_step.step_peak_bytes <= lora_step.step_peak_bytes + 128 * 64 * FLOAT32


def test_measure_training_step_bad_input_says_what_was_wrong(checkpoint):
    model = load(checkpoint, four_bit=False)
    with pytest.raises(ValueError, match="timed_repeats"):
        lora.measure_training_step(model, training_batch(), timed_repeats=0)
    with pytest.raises(ValueError, match="labels"):
        lora.measure_training_step(model, {"input_ids": training_batch()["input_ids"]})
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="get_peft_model"):
        lora.measure_training_step(model, training_batch())


# ---------------------------------------------------------------------------------------------- LoftQ


def test_loftq_factors_are_peft_decomposition_split_for_the_scaling():
    from peft.utils.loftq_utils import _low_rank_decomposition

    residual = environment.portable_randn(48, 32, seed=3)
    peft_split = _low_rank_decomposition(residual, reduced_rank=5)
    A, B = lora.loftq_factors(residual, 5, scaling=1.0)  # peft's convention: scaling ignored
    assert A.shape == (5, 32) and B.shape == (48, 5)
    assert torch.allclose(A, peft_split["R"], atol=1e-6) and torch.allclose(B, peft_split["L"], atol=1e-6)
    A2, B2 = lora.loftq_factors(residual, 5, scaling=2.0)
    assert torch.allclose(2.0 * B2 @ A2, peft_split["L"] @ peft_split["R"], atol=1e-5)
    assert torch.allclose(A2, A / math.sqrt(2.0), atol=1e-6)  # both factors shrink alike: A and B stay balanced


@pytest.mark.parametrize("scaling", [0.5, 1.0, 2.0, 4.0])
def test_loftq_error_follows_the_orthogonality_formula(scaling):
    residual = environment.portable_randn(40, 24, seed=1)
    A, B = lora.loftq_factors(residual, 6, scaling=1.0)
    measured = ((residual - scaling * B @ A).norm() / residual.norm()).item()
    assert measured == pytest.approx(lora.loftq_error_ratio_formula(residual, 6, scaling), rel=1e-5)  # float32
    if scaling == 2.0:  # the update doubles the best approximation: the error comes back to where it was
        assert measured == pytest.approx(1.0, abs=1e-6)


def test_loftq_bad_input_says_what_was_wrong():
    residual = torch.zeros(8, 4)
    with pytest.raises(ValueError, match="2-D float"):
        lora.loftq_factors(torch.zeros(8), 2)
    with pytest.raises(ValueError, match="larger than the residual"):
        lora.loftq_factors(residual, 5)
    with pytest.raises(ValueError, match="positive number"):
        lora.loftq_factors(residual, 2, scaling=0)
    with pytest.raises(ValueError, match="r must be"):
        lora.loftq_factors(residual, 0)


def test_loftq_alternation_first_step_by_hand():
    # W = diag(0.3, 0.15) quantized to multiples of 0.5: Q(W) = diag(0.5, 0), W - Q = diag(-0.2, 0.15); its best
    # rank-1 part is diag(-0.2, 0), which leaves 0.15 of an error norm of 0.25: 0.6
    weight = torch.tensor([[0.3, 0.0], [0.0, 0.15]])
    steps = lora.loftq_alternation(weight, torch.round(weight * 2) / 2, lambda w: torch.round(w * 2) / 2, 1, 1)
    assert steps.errors == pytest.approx((0.6,), rel=1e-6)
    assert torch.equal(steps.quantized, torch.tensor([[0.5, 0.0], [0.0, 0.0]]))
    assert torch.allclose(steps.low_rank, torch.tensor([[-0.2, 0.0], [0.0, 0.0]]), atol=1e-7)
    # a second step quantizes W - L = diag(0.5, 0.15) again: the same codes, so the same error (a fixed point)
    assert lora.loftq_alternation(weight, steps.quantized, lambda w: torch.round(w * 2) / 2, 1, 2).errors == \
        pytest.approx((0.6, 0.6), rel=1e-6)


def peft_on_the_cpu(function, *args, **kwargs):
    """Run one of peft's LoftQ functions on the CPU: peft 0.21.2 sends every tensor to 'cuda' (or 'xpu'), which a
    CPU-only torch does not have; inside this call such a device means the CPU, and nothing else changes."""
    from unittest import mock

    to = torch.Tensor.to

    def on_cpu(value):
        return "cpu" if isinstance(value, (str, torch.device)) and str(value).startswith(("cuda", "xpu")) else value

    def to_cpu(self, *a, **k):
        return to(self, *(on_cpu(v) for v in a), **{key: on_cpu(v) for key, v in k.items()})

    with mock.patch.object(torch.Tensor, "to", to_cpu):
        return function(*args, **kwargs)


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_loftq_alternation_equals_peft_loftq_init(steps):
    from peft.utils.loftq_utils import loftq_init

    from helpers import quantization

    weight = environment.portable_randn(64, 128, seed=steps) * 0.02
    quantize = lambda w: quantization.bnb_4bit_round_trip(w, 64, "nf4")[0]  # noqa: E731 (peft's NF4, no DQ)
    quantized, lora_A, lora_B = peft_on_the_cpu(loftq_init, weight, num_bits=4, reduced_rank=8, num_iter=steps)
    ours = lora.loftq_alternation(weight, quantize(weight), quantize, 8, steps)
    assert len(ours.errors) == steps
    assert torch.equal(ours.quantized, quantized)  # the same 4-bit base after the same number of alternations
    assert torch.allclose(ours.low_rank, lora_B @ lora_A, atol=1e-7)
    expected = (weight - quantized - lora_B @ lora_A).norm() / (weight - quantize(weight)).norm()
    assert ours.errors[-1] == pytest.approx(float(expected), rel=1e-5)


def test_loftq_alternation_bad_input_says_what_was_wrong():
    weight = torch.zeros(4, 4)
    with pytest.raises(ValueError, match="2-D float"):
        lora.loftq_alternation(torch.zeros(4), weight, lambda w: w, 1, 1)
    with pytest.raises(ValueError, match="differ in shape"):
        lora.loftq_alternation(weight, torch.zeros(4, 2), lambda w: w, 1, 1)
    with pytest.raises(TypeError, match="quantize must be a function"):
        lora.loftq_alternation(weight, weight, None, 1, 1)
    with pytest.raises(ValueError, match="steps must be a positive int"):
        lora.loftq_alternation(weight, weight, lambda w: w, 1, 0)


def test_trl_cast_report_warns_where_bfloat16_is_emulated():
    from helpers.environment import Hardware

    trainable = [torch.zeros(2, dtype=torch.bfloat16)]
    t4 = Hardware(device="cuda", gpu_name="Tesla T4", compute_capability=(7, 5))
    a100 = Hardware(device="cuda", gpu_name="A100", compute_capability=(8, 0))
    assert "WARNING: Tesla T4 (compute capability 7.5) has no native bfloat16" in lora.trl_cast_report(
        trainable, True, t4)
    assert "computes bfloat16 natively" in lora.trl_cast_report(trainable, True, a100)
    cpu = lora.trl_cast_report(trainable, True, Hardware(device="cpu"))
    assert cpu.startswith("LoRA dtypes after SFTTrainer(...): ['torch.bfloat16']") and "WARNING" not in cpu
    assert "only on a base loaded in 4 or 8 bits" in lora.trl_cast_report(trainable, False, t4)
    with pytest.raises(TypeError, match="quantized_base"):
        lora.trl_cast_report(trainable, "yes", t4)


def test_trl_casts_the_adapter_of_a_quantized_base_to_bfloat16_in_its_source():
    import inspect

    from trl import SFTTrainer

    source = inspect.getsource(SFTTrainer.__init__)  # the rule trl_cast_report describes, read from trl itself
    assert 'getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)' in source
    assert "param.data = param.data.to(torch.bfloat16)" in source


def tiny_profile(folder: Path) -> Profile:
    return Profile(name="test", model_id=str(folder), adapter_id="", reference_config=folder / "config.json",
                   on_hub=False, gated=False, needs_gpu=False, description="a random tiny Llama")


def test_apply_loftq_lowers_every_weight_error_and_peft_convention_does_not(checkpoint):
    model = load(checkpoint, four_bit=True, r=8, alpha=16)  # scaling 2, like the shipped adapter
    read = models.checkpoint_reader(tiny_profile(checkpoint))
    peft_way = lora.apply_loftq_(model, read, split_for_scaling=False)
    assert len(peft_way) == 2 * len(TARGETS)
    assert all(ratio == pytest.approx(1.0, abs=1e-5) for ratio in peft_way.values())
    ours = lora.apply_loftq_(model, read, split_for_scaling=True)
    assert ours.keys() == peft_way.keys() and all(ratio < 1.0 for ratio in ours.values())
    name = "model.layers.1.self_attn.o_proj"
    layer = model.get_submodule("base_model.model." + name)
    residual = read(name + ".weight") - lora.base_weight_float32(layer)
    assert ours[name] == pytest.approx(lora.loftq_error_ratio_formula(residual, 8, 1.0), abs=1e-5)


def test_apply_loftq_with_a_cache_decomposes_each_layer_once_and_gives_the_same_start(checkpoint, monkeypatch):
    read = models.checkpoint_reader(tiny_profile(checkpoint))
    plain = load(checkpoint, four_bit=True)
    lora.apply_loftq_(plain, read, split_for_scaling=True)
    cached, cache = load(checkpoint, four_bit=True), {}
    lora.apply_loftq_(cached, read, split_for_scaling=False, svd_cache=cache)
    assert len(cache) == 2 * len(TARGETS)
    decompositions = []
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: decompositions.append(a) or None)
    lora.apply_loftq_(cached, read, split_for_scaling=True, svd_cache=cache)
    assert decompositions == []  # every layer came from the cache
    lora_values = lambda m: {n: p for n, p in m.named_parameters() if "lora_" in n}
    assert all(torch.equal(p, lora_values(cached)[n]) for n, p in lora_values(plain).items())


def test_apply_loftq_needs_a_4bit_base(checkpoint):
    with pytest.raises(ValueError, match="4 bits"):
        lora.apply_loftq_(load(checkpoint, four_bit=False), models.checkpoint_reader(tiny_profile(checkpoint)))


def test_checkpoint_reader_reads_the_unquantized_weight_and_names_a_missing_one(checkpoint):
    from safetensors.torch import load_file

    read = models.checkpoint_reader(tiny_profile(checkpoint))
    stored = load_file(checkpoint / "model.safetensors")
    assert torch.equal(read("model.layers.0.mlp.up_proj.weight"), stored["model.layers.0.mlp.up_proj.weight"])
    with pytest.raises(KeyError, match="not in"):
        read("model.layers.9.mlp.up_proj.weight")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        models.checkpoint_reader(tiny_profile(checkpoint.parent))


@pytest.mark.parametrize("sharded", [False, True], ids=["one file", "sharded like the Hub checkpoints"])
def test_peft_loftq_reads_w_from_the_checkpoint_folder_the_course_passes(checkpoint, tmp_path, sharded):
    from peft.utils.loftq_utils import _SafetensorLoader  # what replace_lora_weights_loftq reads W with
    from transformers import AutoModelForCausalLM

    folder = checkpoint
    if sharded:
        folder = tmp_path / "sharded"
        AutoModelForCausalLM.from_pretrained(checkpoint).save_pretrained(folder, max_shard_size="100KB")
        assert (folder / "model.safetensors.index.json").is_file()
    model = load(folder, four_bit=False)  # loaded from a local folder, as the tiny profile's model is
    with pytest.raises(ValueError, match="model_path"):
        _SafetensorLoader(model, None)  # replace_lora_weights_loftq(model): the folder taken for a Hub repository id
    profile = tiny_profile(folder)
    loader = _SafetensorLoader(model, str(models.checkpoint_folder(profile)))
    read = models.checkpoint_reader(profile)
    names = [f"{name}.weight" for name, _ in model.get_base_model().named_modules() if name.endswith(tuple(TARGETS))]
    assert len(names) == 2 * len(TARGETS) and all(torch.equal(loader.get_tensor(n), read(n)) for n in names)


def test_the_notebooks_pass_peft_loftq_the_checkpoint_folder():
    from helpers import runner

    calls = [call for path in runner.course_notebooks() for cell in nbformat.read(path, as_version=4).cells
             for call in re.findall(r"replace_lora_weights_loftq\(.*\)", cell.source)]
    assert calls and all("model_path=" in call for call in calls), calls


def test_peft_loftq_runs_only_with_cuda():
    assert lora.peft_loftq_runs_here(True)[0] and not lora.peft_loftq_runs_here(False)[0]
    assert "cuda" in lora.peft_loftq_runs_here(False)[1]
    with pytest.raises(TypeError):
        lora.peft_loftq_runs_here("cpu")


# ---------------------------------------------------------------------------------------------- the LoRA base


def test_the_lora_base_computes_in_the_4bit_compute_dtype():
    assert models.lora_base_scheme(environment.Hardware(device="cpu")) == "fp32"
    assert models.lora_base_scheme(environment.T4) == "fp16"
    a100 = environment.Hardware(device="cuda", gpu_name="A100", compute_capability=(8, 0),
                                gpu_memory_bytes=40 * 10**9)
    assert models.lora_base_scheme(a100) == "bf16"


def test_an_optional_16bit_base_fits_a_t4_for_3b_and_not_for_8b():
    from helpers import profiles

    plans = {}
    for name in ("llama-3.2-3b", "llama-3.1-8b"):
        config = memory.load_reference_config(profiles.PROFILES[name].reference_config)
        plans[name] = memory.plan_optional_load("LoRA base", config, "fp16", True, memory.T4_LIMITS, training=True)
    assert plans["llama-3.2-3b"].fits and not plans["llama-3.1-8b"].fits
    with pytest.raises(ValueError, match="float scheme"):
        memory.plan_optional_load("LoRA base", config, "nf4", True, memory.T4_LIMITS)


# ---------------------------------------------------------------------------------------------- generation speed


def test_generation_speed_generates_exactly_the_tokens_asked(checkpoint):
    from transformers import AutoModelForCausalLM

    class Tokenizer:  # the two things generation_speed needs from a tokenizer
        pad_token_id = 0

        def __call__(self, text, return_tensors):
            return {"input_ids": torch.tensor([[ord(c) % 96 for c in text]])}

    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    speed = quality.generation_speed(model, Tokenizer(), "a prompt", new_tokens=5, repeats=2)
    assert (speed.new_tokens, speed.prompt_tokens, len(speed.seconds), len(speed.token_ids)) == (5, 8, 2, 5)
    assert speed.tokens_per_second == 5 / min(speed.seconds)
    for bad in ({"new_tokens": 0}, {"repeats": True}):
        with pytest.raises(ValueError, match="positive int"):
            quality.generation_speed(model, Tokenizer(), "a prompt", **bad)
    with pytest.raises(ValueError, match="prompt"):
        quality.generation_speed(model, Tokenizer(), "")
