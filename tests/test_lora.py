"""helpers.lora against peft itself: counts, shapes, the weight update and the adapter file."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

from helpers import lora
from helpers.lora import (
    ATTENTION_MODULES,
    adapter_file_layout,
    finetuning_memory,
    llama_linear_shapes,
    local_adapter_folder,
    lora_delta_weight,
    lora_param_breakdown,
    lora_param_count,
    summarize_adapter,
)
from helpers.memory import LINEAR_NAMES

REFERENCE_DIR = Path("/work/shared/reference")


def random_tiny_config(rng: random.Random) -> LlamaConfig:
    """A small Llama config with grouped-query attention and, half of the time, head_dim != hidden/heads."""
    kv_heads = rng.choice([1, 2, 4])
    heads = kv_heads * rng.choice([1, 2, 3])
    head_dim = rng.choice([8, 16])
    hidden = heads * head_dim if rng.random() < 0.5 else rng.choice([32, 48, 64])
    return LlamaConfig(
        vocab_size=64,
        hidden_size=hidden,
        intermediate_size=rng.choice([40, 96, 128]),
        num_hidden_layers=rng.choice([1, 2, 3]),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
    )


def peft_lora_count(config: LlamaConfig, lora_config: LoraConfig) -> int:
    """peft's own count: the trainable parameters of a freshly wrapped model (built on meta: no memory)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return get_peft_model(model, lora_config).get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("seed", range(6))
def test_count_matches_peft_on_random_configs(seed):
    rng = random.Random(seed)
    config = random_tiny_config(rng)
    targets = rng.sample(LINEAR_NAMES, rng.randint(1, len(LINEAR_NAMES)))
    r = rng.choice([1, 2, 4, 8, 16])
    lora_config = LoraConfig(r=r, lora_alpha=rng.choice([1, 8, 16, 64]), target_modules=targets)
    assert lora_param_count(config, r, targets) == peft_lora_count(config, lora_config)


@pytest.mark.parametrize("name", ["llama-3.1-8b", "llama-3.2-3b"])
def test_count_matches_peft_on_real_reference_configs(name):
    config = LlamaConfig(**json.loads((REFERENCE_DIR / f"{name}.config.json").read_text()))
    lora_config = LoraConfig(r=32, lora_alpha=64, target_modules=list(ATTENTION_MODULES))
    assert lora_param_count(config, 32, ATTENTION_MODULES) == peft_lora_count(config, lora_config)


def test_course_adapter_count_on_llama_3_1_8b():
    # The course's pricer adapter (r=32 on q, k, v, o of Llama-3.1-8B): 27,262,976 LoRA parameters.
    config = json.loads((REFERENCE_DIR / "llama-3.1-8b.config.json").read_text())
    assert lora_param_count(config, 32, ["q_proj", "k_proj", "v_proj", "o_proj"]) == 27_262_976


def test_shapes_follow_grouped_query_attention():
    config = LlamaConfig(hidden_size=96, intermediate_size=160, num_attention_heads=6, num_key_value_heads=2, head_dim=16)
    shapes = llama_linear_shapes(config)
    assert shapes == {
        "q_proj": (96, 96),
        "k_proj": (96, 32),
        "v_proj": (96, 32),
        "o_proj": (96, 96),
        "gate_proj": (96, 160),
        "up_proj": (96, 160),
        "down_proj": (160, 96),
    }


def test_config_mapping_and_head_dim_fallback():
    # A config.json dictionary without head_dim or num_key_value_heads: head_dim = 64 / 4, kv heads = heads.
    as_dict = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 2}
    assert llama_linear_shapes(as_dict)["k_proj"] == (64, 64)
    assert lora_param_count(as_dict, 2, ["q_proj", "down_proj"]) == 2 * (2 * (64 + 64) + 2 * (128 + 64))


def test_breakdown_rows_and_totals():
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, num_hidden_layers=3)
    breakdown = lora_param_breakdown(config, 4, ["down_proj", "q_proj", "v_proj"])
    assert [row.module for row in breakdown.rows] == ["q_proj", "v_proj", "down_proj"]  # the order the layer runs
    assert [row.params_per_layer for row in breakdown.rows] == [4 * 128, 4 * 96, 4 * 192]
    assert breakdown.rows[1].lora_A_shape == (4, 64) and breakdown.rows[1].lora_B_shape == (32, 4)
    assert breakdown.total == 3 * 4 * (128 + 96 + 192)
    table = breakdown.table()
    assert "down_proj" in table and f"{breakdown.total:,}" in table


# ---------------------------------------------------------------------------------------------
# A real (tiny, float32) model with an adapter
# ---------------------------------------------------------------------------------------------

TINY = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def tiny_peft_model(r=4, alpha=12, targets=("q_proj", "v_proj", "down_proj"), use_rslora=False) -> PeftModel:
    torch.manual_seed(0)
    model = LlamaForCausalLM(TINY).eval()
    # init_lora_weights=False draws B at random too, so the update is not zero and the checks mean something.
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0,
                        init_lora_weights=False, use_rslora=use_rslora)
    return get_peft_model(model, config).eval()


def test_summary_counts_by_name_and_survives_freezing(tmp_path):
    peft_model = tiny_peft_model()
    summary = summarize_adapter(peft_model)
    expected = lora_param_count(TINY, 4, ["q_proj", "v_proj", "down_proj"])
    assert summary.num_params == expected == peft_model.get_nb_trainable_parameters()[0]
    assert summary.num_trainable == expected
    assert summary.num_bytes == 4 * expected  # float32
    assert (summary.r, summary.lora_alpha, summary.scaling, summary.dtype) == (4, 12, 3.0, torch.float32)
    assert summary.target_modules == ("q_proj", "v_proj", "down_proj")
    assert len(summary.modules) == 3 * TINY.num_hidden_layers
    first = summary.modules[0]
    assert first.name == "model.layers.0.self_attn.q_proj"
    assert (first.lora_A_shape, first.lora_B_shape) == ((4, 64), (64, 4))
    assert "down_proj" in summary.table()

    # Saved and loaded again, the adapter is frozen: trainable says 0, counting by name does not.
    peft_model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    reloaded = PeftModel.from_pretrained(LlamaForCausalLM(TINY), tmp_path)
    reloaded_summary = summarize_adapter(reloaded)
    assert reloaded.get_nb_trainable_parameters()[0] == 0
    assert reloaded_summary.num_trainable == 0
    assert reloaded_summary.num_params == expected


def test_adapter_file_layout_matches_safetensors(tmp_path):
    peft_model = tiny_peft_model()
    peft_model.save_pretrained(tmp_path)
    layout = adapter_file_layout(tmp_path)
    with safe_open(tmp_path / "adapter_model.safetensors", framework="pt") as file:
        shapes = {name: tuple(file.get_slice(name).get_shape()) for name in file.keys()}
    assert {name: shape for name, (_, shape) in layout.tensors.items()} == shapes
    assert layout.num_params == summarize_adapter(peft_model).num_params
    assert layout.tensor_bytes == 4 * layout.num_params
    assert layout.file_bytes == layout.header_bytes + layout.tensor_bytes == (tmp_path / "adapter_model.safetensors").stat().st_size


@pytest.mark.parametrize("use_rslora", [False, True])
def test_delta_weight_reproduces_the_forward_pass(use_rslora):
    peft_model = tiny_peft_model(use_rslora=use_rslora)
    torch.manual_seed(1)
    x = torch.randn(3, 5, TINY.hidden_size)
    for layer in peft_model.base_model.model.model.layers:
        q_proj = layer.self_attn.q_proj
        delta = lora_delta_weight(q_proj)
        assert delta.shape == q_proj.base_layer.weight.shape
        torch.testing.assert_close(q_proj(x), q_proj.base_layer(x) + x @ delta.T, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(delta, q_proj.get_delta_weight("default"))  # peft's own update
        assert torch.linalg.matrix_rank(delta) <= 4


def test_delta_weight_equals_what_merging_adds():
    peft_model = tiny_peft_model()
    base_weight = peft_model.base_model.model.model.layers[1].mlp.down_proj.base_layer.weight.detach().clone()
    delta = lora_delta_weight(peft_model.base_model.model.model.layers[1].mlp.down_proj, "default")
    merged = peft_model.merge_and_unload()
    torch.testing.assert_close(merged.model.layers[1].mlp.down_proj.weight, base_weight + delta)


# ---------------------------------------------------------------------------------------------
# Scaling across ranks (rsLoRA) and the update's directions (LoRA's Table 7)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("r", [1, 4, 9, 32])
def test_lora_scaling_is_peft_s_own(r, use_rslora):
    torch.manual_seed(0)
    peft_model = get_peft_model(LlamaForCausalLM(TINY), LoraConfig(r=r, lora_alpha=16, target_modules=["q_proj"],
                                                                   use_rslora=use_rslora))
    peft_scaling = peft_model.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"]
    assert lora.lora_scaling(16, r, use_rslora) == peft_scaling == (16 / r ** 0.5 if use_rslora else 16 / r)


def test_start_gradients_are_scaling_times_g_x_a_and_leave_the_random_generator_alone():
    from helpers.environment import portable_randn

    state = torch.get_rng_state()
    steps = lora.start_gradients(8, 4, [1, 4], lora_alpha=2, use_rslora=False, tokens=3, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    x, g = portable_randn(3, 8, seed=5), portable_randn(3, 4, seed=6)
    A_rows = portable_randn(4, 8, seed=7) / 24 ** 0.5  # variance 1 / (3 in), as peft draws lora_A
    assert [(s.r, s.scaling) for s in steps] == [(1, 2.0), (4, 0.5)]
    for step in steps:
        by_hand = step.scaling * g.T @ (x @ A_rows[: step.r].T)  # dL/dB for L = sum(g * scaling * x A^T B^T)
        assert step.gradient_norm == pytest.approx(by_hand.norm().item(), rel=1e-6)
    stable = lora.start_gradients(8, 4, [1, 4], lora_alpha=2, use_rslora=True, tokens=3, seed=5)
    assert [s.scaling for s in stable] == [2.0, 1.0]
    # same A, x and g: the gradients differ exactly by the ratio of the scalings
    assert stable[1].gradient_norm / steps[1].gradient_norm == pytest.approx(2.0, rel=1e-6)


def test_start_gradients_shrink_with_alpha_over_r_and_stay_level_with_rslora():
    plain = lora.start_gradients(256, 128, [4, 16, 64], lora_alpha=16, use_rslora=False)
    stable = lora.start_gradients(256, 128, [4, 16, 64], lora_alpha=16, use_rslora=True)
    for shrink, level, r in zip(plain, stable, (4, 16, 64)):
        assert shrink.gradient_norm / plain[0].gradient_norm == pytest.approx((4 / r) ** 0.5, rel=0.15)
        assert level.gradient_norm / stable[0].gradient_norm == pytest.approx(1.0, rel=0.15)


def test_start_gradients_and_scaling_reject_bad_input():
    with pytest.raises(ValueError, match="at most min"):
        lora.start_gradients(8, 4, [8], lora_alpha=2, use_rslora=False)
    with pytest.raises(ValueError, match="r must be a positive integer"):
        lora.start_gradients(8, 4, [0], lora_alpha=2, use_rslora=False)
    with pytest.raises(TypeError, match="use_rslora must be True or False"):
        lora.lora_scaling(16, 4, use_rslora="yes")
    with pytest.raises(ValueError, match="lora_alpha must be a positive number"):
        lora.lora_scaling(0, 4)


def test_update_directions_on_a_hand_made_example():
    # W has singular values 3, 2, ...; the update 2 e_3 e_4^T points where W holds only its entry W[2, 3] = 0.5
    W = torch.tensor([[3.0, 0, 0, 0], [0, 2, 0, 0], [0, 0, 1, 0.5], [0, 0, 0, 0.25]])
    B, A = torch.tensor([[0.0], [0], [1], [0]]), torch.tensor([[0.0, 0, 0, 1]])
    found = lora.update_directions(W, B, A, scaling=2.0)
    assert found.rank == 1 and found.update_norm == pytest.approx(2.0) and found.weight_norm == pytest.approx(W.norm())
    assert found.along_update == pytest.approx(0.5) and found.amplification == pytest.approx(4.0)
    assert found.along_weight == pytest.approx(3.0)  # W's own top direction: its largest singular value
    assert 0 <= found.along_random <= 3.0


def test_update_directions_agree_with_a_full_svd_of_peft_s_update():
    peft_model = tiny_peft_model(r=4)
    q_proj = peft_model.base_model.model.model.layers[1].self_attn.q_proj
    W, delta = q_proj.base_layer.weight.detach(), lora_delta_weight(q_proj)
    found = lora.update_directions(W, q_proj.lora_B["default"].weight.detach(), q_proj.lora_A["default"].weight.detach(),
                                   q_proj.scaling["default"])
    U, S, Vh = torch.linalg.svd(delta)
    assert found.along_update == pytest.approx((U[:, :4].T @ W @ Vh[:4].T).norm().item(), rel=1e-4)
    assert found.update_norm == pytest.approx(delta.norm().item(), rel=1e-5)
    assert found.along_weight == pytest.approx(torch.linalg.svdvals(W)[:4].norm().item(), rel=1e-5)
    given = lora.update_directions(W, q_proj.lora_B["default"].weight.detach(), q_proj.lora_A["default"].weight.detach(),
                                   q_proj.scaling["default"], weight_singular_values=torch.linalg.svdvals(W))
    assert given == found
    with pytest.raises(ValueError, match="do not fit a weight"):
        lora.update_directions(W, q_proj.lora_A["default"].weight, q_proj.lora_B["default"].weight, 1.0)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("r", [0, -4, 2.5, True, "8", None])
def test_bad_rank_is_rejected(r):
    with pytest.raises(ValueError, match="r must be a positive integer"):
        lora_param_count(TINY, r, ["q_proj"])


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        (["q_proj", "lm_head"], "Unknown target module"),
        (["query"], "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"),
        ([], "target_modules is empty"),
        ("q_proj", "must be a list"),
        (["q_proj", "q_proj"], "more than once"),
    ],
)
def test_bad_targets_are_rejected(targets, message):
    with pytest.raises(ValueError, match=message):
        lora_param_count(TINY, 8, targets)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2}, "positive integer"),
        ({"hidden_size": -64, "intermediate_size": 96, "num_attention_heads": 4, "num_hidden_layers": 1}, "positive integer"),
        ({"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4}, "num_hidden_layers"),
        ({"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4, "num_hidden_layers": 0}, "num_hidden_layers"),
    ],
)
def test_bad_configs_are_rejected(config, message):
    with pytest.raises(ValueError, match=message):
        lora_param_count(config, 8, ["q_proj"])


def test_bad_modules_and_adapters_are_rejected():
    peft_model = tiny_peft_model()
    q_proj = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    with pytest.raises(TypeError, match="peft LoRA layer"):
        lora_delta_weight(q_proj.base_layer)
    with pytest.raises(ValueError, match="no adapter 'other'"):
        lora_delta_weight(q_proj, "other")
    with pytest.raises(ValueError, match="No LoRA weights for adapter 'other'"):
        summarize_adapter(peft_model, "other")
    with pytest.raises(ValueError, match="no LoRA layers"):
        summarize_adapter(LlamaForCausalLM(TINY))
    peft_model.add_adapter("second", LoraConfig(r=2, target_modules=["q_proj"]))
    assert lora_delta_weight(q_proj).shape == (64, 64)  # two adapters: "default" is chosen
    with pytest.raises(FileNotFoundError, match="adapter folder"):
        adapter_file_layout(Path("/nonexistent/adapter"))


def test_dora_is_rejected():
    torch.manual_seed(0)
    dora = get_peft_model(LlamaForCausalLM(TINY), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="DoRA"):
        lora_delta_weight(dora.base_model.model.model.layers[0].self_attn.q_proj)


# ---------------------------------------------------------------------------------------------
# Where an adapter's files are
# ---------------------------------------------------------------------------------------------


def test_local_adapter_folder_returns_a_saved_adapter(tmp_path):
    tiny_peft_model().save_pretrained(tmp_path)
    assert local_adapter_folder(tmp_path) == tmp_path
    assert local_adapter_folder(str(tmp_path)) == tmp_path


def test_local_adapter_folder_rejects_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="lacks adapter_config.json, adapter_model.safetensors"):
        local_adapter_folder(tmp_path)  # an empty folder
    with pytest.raises(FileNotFoundError, match="unset HF_HUB_OFFLINE"):
        local_adapter_folder("no-such-owner/no-such-adapter")  # offline (conftest): never asks the Hub
    for bad in ("", "  ", None, 3):
        with pytest.raises(ValueError, match="adapter_id must be"):
            local_adapter_folder(bad)


# ---------------------------------------------------------------------------------------------
# Fine-tuning memory, against what torch and peft really allocate
# ---------------------------------------------------------------------------------------------

# Every Linear's out_features is a multiple of 32, as bitsandbytes' CPU 4-bit kernel requires.
TRAINABLE = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16)
TRAIN_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]


def one_adamw_step(model) -> tuple[int, int]:
    """Run one training step; return (gradient bytes, AdamW moment bytes) of the trainable parameters."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    input_ids = torch.arange(12).reshape(2, 6) % TRAINABLE.vocab_size
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    optimizer.step()
    gradients = sum(p.grad.numel() * p.grad.element_size() for p in trainable)
    moments = sum(state[key].numel() * state[key].element_size()
                  for state in optimizer.state.values() for key in ("exp_avg", "exp_avg_sq"))
    return gradients, moments


def test_finetuning_memory_of_full_finetuning_matches_torch():
    from helpers.memory import true_footprint

    torch.manual_seed(0)
    model = LlamaForCausalLM(TRAINABLE)
    expected = finetuning_memory(TRAINABLE, 4, TRAIN_TARGETS)["full"]
    assert expected.trainable_params == sum(p.numel() for p in model.parameters())
    assert expected.weights == true_footprint(model)
    assert one_adamw_step(model) == (expected.gradients, expected.optimizer_states)
    assert expected.total == expected.weights + expected.gradients + expected.optimizer_states


def test_finetuning_memory_of_lora_matches_peft():
    from helpers.memory import true_footprint

    torch.manual_seed(0)
    base = LlamaForCausalLM._from_config(TRAINABLE, dtype=torch.bfloat16)  # as loading does: rotary buffers stay float32
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=TRAIN_TARGETS))
    expected = finetuning_memory(TRAINABLE, 4, TRAIN_TARGETS)["lora"]
    assert expected.trainable_params == model.get_nb_trainable_parameters()[0]
    assert expected.weights == true_footprint(model)
    assert one_adamw_step(model) == (expected.gradients, expected.optimizer_states)


def test_finetuning_memory_of_qlora_matches_bitsandbytes_and_peft(tmp_path):
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    from helpers.memory import true_footprint

    torch.manual_seed(0)
    LlamaForCausalLM(TRAINABLE).to(torch.bfloat16).save_pretrained(tmp_path)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16)
    base = LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=quantization, dtype=torch.bfloat16)
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)  # upcasts the rest to float32
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=TRAIN_TARGETS))
    expected = finetuning_memory(TRAINABLE, 4, TRAIN_TARGETS)["qlora"]
    assert expected.weights == true_footprint(model)  # before the first forward pass re-lays the CPU weights
    assert one_adamw_step(model) == (expected.gradients, expected.optimizer_states)


def test_finetuning_memory_orders_and_scales_on_llama_3_1_8b():
    config = json.loads((REFERENCE_DIR / "llama-3.1-8b.config.json").read_text())
    by_method = finetuning_memory(config, 32, ATTENTION_MODULES)
    assert list(by_method) == ["full", "lora", "qlora"]
    full, lora_, qlora = by_method.values()
    assert full.trainable_params == 8_030_261_248  # Llama-3.1-8B's parameters, as notebook 01 counts them
    assert (full.gradients, full.optimizer_states) == (4 * 8_030_261_248, 8 * 8_030_261_248)  # float32, two moments
    assert lora_.trainable_params == qlora.trainable_params == 27_262_976
    assert full.total > lora_.total > qlora.total
    assert lora_.gradients == qlora.gradients == 4 * 27_262_976


def test_finetuning_memory_rejects_bad_input():
    with pytest.raises(ValueError, match="r must be a positive integer"):
        finetuning_memory(TRAINABLE, 0, ["q_proj"])
    with pytest.raises(ValueError, match="Unknown target module"):
        finetuning_memory(TRAINABLE, 4, ["lm_head"])
    with pytest.raises(ValueError, match="dtype must be"):
        finetuning_memory(TRAINABLE, 4, ["q_proj"], lora_base_dtype=torch.int8)
    with pytest.raises(ValueError, match="dtype must be"):
        finetuning_memory(TRAINABLE, 4, ["q_proj"], qlora_other_dtype=torch.float64)


# ----------------------------------------------------------------------------- notebook 06's run, per profile


@pytest.mark.parametrize("profile_name,dtype,on_gpu,rate,scaling,checkpointing,steps", [
    ("tiny", torch.float32, False, 2e-3, False, False, 30),
    ("tiny", torch.bfloat16, True, 2e-3, False, True, 30),
    ("llama-3.2-3b", torch.float16, True, 2e-4, True, True, 60),  # a T4
    ("llama-3.1-8b", torch.bfloat16, True, 2e-4, False, True, 60),  # an A100
])
def test_training_settings_per_profile_and_hardware(profile_name, dtype, on_gpu, rate, scaling, checkpointing, steps):
    settings = lora.training_settings(profile_name, dtype, on_gpu)
    assert (settings.learning_rate, settings.loss_scaling, settings.gradient_checkpointing) == (rate, scaling, checkpointing)
    warmup = steps // 10
    assert (settings.steps, settings.warmup_steps) == (steps, warmup)
    assert [settings.learning_rate_at(step) for step in (0, warmup - 1, warmup, steps - 1)] == pytest.approx(
        [rate / warmup, rate, rate, rate])
    assert len(settings.reasons) == 3 and ("loss scaling on" in settings.reasons[1]) == scaling


def test_training_settings_refuse_unknown_input():
    with pytest.raises(ValueError, match="No training settings for profile 'gpt-2'"):
        lora.training_settings("gpt-2", torch.float32, False)
    with pytest.raises(ValueError, match="compute_dtype must be"):
        lora.training_settings("tiny", torch.int8, False)
    with pytest.raises(ValueError, match="non-negative int"):
        lora.training_settings("tiny", torch.float32, False).learning_rate_at(-1)


def test_release_paged_buffers_drops_only_this_optimizers_buffers_from_the_global_list():
    import bitsandbytes as bnb

    parameters = [torch.nn.Parameter(torch.zeros(64, 64)) for _ in range(2)]
    optimizer = bnb.optim.PagedAdamW8bit(parameters, lr=0.0)
    for p in parameters:
        p.grad = torch.zeros_like(p)
    with pytest.warns(UserWarning, match="not supported on CPU"):
        optimizer.step()
    manager = optimizer.page_mng
    assert lora.release_paged_buffers(optimizer) == 0  # on a CPU bitsandbytes registers nothing
    # what a CUDA step leaves behind: the state buffers in the process-wide list, next to someone else's
    someone_elses = torch.zeros(10)
    mine = [t for state in optimizer.state.values() for k, t in state.items() if torch.is_tensor(t) and k != "step"]
    manager.paged_tensors.extend([someone_elses, *mine])
    try:
        assert lora.release_paged_buffers(optimizer) == sum(t.nelement() * t.element_size() for t in mine) > 0
        assert manager.paged_tensors == [someone_elses]
    finally:
        manager.paged_tensors.clear()
    assert lora.release_paged_buffers(torch.optim.AdamW(parameters)) == 0  # not a bitsandbytes optimizer


def test_cached_singular_vectors_hold_only_their_rank():
    from helpers.lora import _top_singular

    residual = torch.from_numpy(__import__("numpy").random.default_rng(0).standard_normal((96, 64), dtype="float32"))
    U, S, Vh = _top_singular(residual, 4)
    assert (U.shape, S.shape, Vh.shape) == ((96, 4), (4,), (4, 64))
    for t in (U, S, Vh):  # not views into the full decomposition (what svd_cache kept alive before)
        assert t.untyped_storage().nbytes() == t.nelement() * t.element_size()
    full_U, full_S, full_Vh = torch.linalg.svd(residual, full_matrices=False)
    assert torch.equal(U, full_U[:, :4]) and torch.equal(S, full_S[:4]) and torch.equal(Vh, full_Vh[:4])
