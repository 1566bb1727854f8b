"""The shipped pricer adapter: it loads offline on the 4-bit base, has the course's settings, and helps."""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from peft import LoraConfig, PeftModel

from helpers import pricer
from helpers.lora import (adapter_file_layout, base_weight_float32, lora_delta_weight, lora_param_count,
                          summarize_adapter, update_ratios)
from helpers.models import load_model
from helpers.profiles import get_profile

COURSE_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj"}
HANDFUL = 12  # test items answered twice (base, adapted): enough to see the difference, quick on a CPU


@pytest.fixture(scope="module")
def adapted_model():
    """The tiny profile's 4-bit NF4 (double quantization) base with the shipped adapter, as notebook 04 loads it."""
    profile = get_profile("tiny")
    base, tokenizer = load_model(profile, "nf4-dq")
    model = PeftModel.from_pretrained(base, profile.adapter_id).eval()
    return model, tokenizer


def test_adapter_config_is_the_courses():
    config = LoraConfig.from_pretrained(pricer.ADAPTER_DIR)
    assert (config.r, config.lora_alpha) == (32, 64)
    assert set(config.target_modules) == COURSE_TARGETS
    assert config.base_model_name_or_path == "data/tiny-llama"  # no path from the machine that trained it
    assert not (pricer.ADAPTER_DIR / "README.md").exists()  # data/README.md documents the folder


def test_loaded_adapter_matches_the_formula_and_the_file(adapted_model):
    model, _ = adapted_model
    assert model.base_model.model.is_loaded_in_4bit
    summary = summarize_adapter(model)
    assert (summary.r, summary.lora_alpha, summary.scaling) == (32, 64, 2.0)
    assert set(summary.target_modules) == COURSE_TARGETS
    assert summary.num_trainable == 0  # a loaded adapter is frozen
    expected = lora_param_count(model.config, 32, sorted(COURSE_TARGETS))
    assert summary.num_params == expected == adapter_file_layout(pricer.ADAPTER_DIR).num_params
    assert summary.dtype == torch.float32 and summary.num_bytes == 4 * expected


def test_forward_is_base_plus_delta_on_the_4bit_layer(adapted_model):
    model, _ = adapted_model
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    torch.manual_seed(0)
    x = torch.randn(2, 3, q_proj.in_features)
    with torch.no_grad():
        delta = lora_delta_weight(q_proj)
        torch.testing.assert_close(q_proj(x), q_proj.base_layer(x) + x @ delta.T, rtol=1e-4, atol=1e-4)
    assert torch.linalg.matrix_rank(delta) <= 32


def test_adapter_beats_the_base_on_held_out_items(adapted_model):
    model, tokenizer = adapted_model
    items = pricer.load_split("test")[:HANDFUL]
    with model.disable_adapter():
        base_scores, _ = pricer.answer_prices(model, tokenizer, items)
    adapted_scores, completions = pricer.answer_prices(model, tokenizer, items)
    assert adapted_scores.format_share > base_scores.format_share
    assert adapted_scores.format_share >= 0.9, completions
    # The base never answers in the right format, so every one of its errors is the full price.
    assert adapted_scores.mean_absolute_error < 0.75 * base_scores.mean_absolute_error, completions


def test_the_update_ratios_are_what_the_build_recorded(adapted_model):
    """||ΔW|| / ||W|| is a diagnostic (no threshold): the shipped adapter's, measured again, is what its build wrote."""
    model, _ = adapted_model
    ratios = update_ratios(model)
    assert len(ratios) == 24 and all(0 < value < 1 for value in ratios.values())
    report = json.loads((pricer.ADAPTER_DIR / "evaluation.json").read_text())["update_ratio"]
    assert round(statistics.median(ratios.values()), 4) == report["median"]
    assert {name: round(value, 4) for name, value in ratios.items()} == report["per_module"]
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    by_hand = lora_delta_weight(q_proj).norm() / base_weight_float32(q_proj).norm()
    assert ratios["model.layers.0.self_attn.q_proj"] == by_hand.item()


def test_the_base_weight_is_the_dequantized_4bit_weight_the_adapter_was_trained_against(adapted_model):
    import bitsandbytes as bnb

    model, _ = adapted_model
    base_layer = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    expected = bnb.functional.dequantize_4bit(base_layer.weight.data, base_layer.weight.quant_state)
    assert torch.equal(base_weight_float32(model.base_model.model.model.layers[0].self_attn.q_proj), expected.float())
    with pytest.raises(TypeError, match="peft LoRA layer"):
        base_weight_float32(base_layer)


def test_the_evaluation_file_records_what_the_build_measured():
    report = json.loads((pricer.ADAPTER_DIR / "evaluation.json").read_text())
    assert report["adapted"]["format_share"] == 1.0
    yardstick = pricer.yardstick_scores(pricer.load_split("train"), pricer.load_split("test"))["category median"]
    assert report["adapted"]["mean_absolute_error"] < yardstick.mean_absolute_error
