"""helpers.outliers: LLM.int8's outlier columns as bitsandbytes finds them, a planted feature that changes no bit of
the model's output, and the paper's systematic-feature criteria on tiny tensors and a tiny Llama."""

import logging
import warnings

import pytest
import torch

logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=r"MatMul8bitLt")

from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

from helpers import outliers, quantization  # noqa: E402
from helpers.environment import portable_randn  # noqa: E402


def tiny_llama(layers: int = 2) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def test_the_threshold_is_bitsandbytes_default():
    assert outliers.LLM_INT8_THRESHOLD == BitsAndBytesConfig(load_in_8bit=True).llm_int8_threshold == 6.0


def test_outlier_columns_are_the_columns_bitsandbytes_multiplies_in_floating_point():
    weight = portable_randn(16, 32, seed=0) * 0.1
    for seed, columns in ((1, [3]), (2, [0, 17, 31]), (3, [])):
        x = portable_randn(5, 32, seed=seed)
        for column in columns:
            x[seed % 5, column] = 7.0 if column % 2 else -9.5
        layer = outliers.int8_linear(weight, threshold=6.0)
        run = outliers.run_int8(layer, x, threshold=6.0)
        assert outliers.outlier_columns(x).tolist() == columns
        assert list(run.float_columns) == columns  # read from bitsandbytes' own state.idx


def test_outlier_columns_counts_a_value_equal_to_the_threshold_and_refuses_bad_input():
    x = torch.tensor([[6.0, -5.99, 0.0], [0.0, 0.0, -6.0]])
    assert outliers.outlier_columns(x, 6.0).tolist() == [0, 2]
    with pytest.raises(ValueError, match="positive number"):
        outliers.outlier_columns(x, 0)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        outliers.outlier_columns(torch.ones(3))


def test_choose_planting_lifts_the_steadiest_feature_to_the_threshold_with_a_power_of_two():
    x = torch.tensor([[0.5, -2.0, 0.1], [1.0, 3.0, -0.2]])
    assert outliers.choose_planting(x, 6.0) == (1, 4)  # smallest |x|: 0.5, 2.0, 0.1; 6 / 2.0 = 3 -> 4
    assert outliers.choose_planting(x, 1.5) == (1, 1)  # already there
    with pytest.raises(ValueError, match="0 at some position"):
        outliers.choose_planting(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))


def test_summarize_features_applies_both_shares():
    layer_hits = torch.tensor([[True, True, False], [True, False, False], [True, False, False], [False, False, True]])
    position_hits = torch.zeros(20, 3, dtype=torch.bool)
    position_hits[:2, 0] = True  # feature 0: 3 of 4 layers, 2 of 20 positions
    position_hits[0, 1] = True  # feature 1: 1 of 4 layers (25%), 1 of 20 positions (5% < 6%)
    position_hits[:5, 2] = True  # feature 2: 1 of 4 layers, 5 of 20 positions
    report = outliers.summarize_features(layer_hits, position_hits, largest=9.0, threshold=6.0)
    assert report.systematic == (0, 2)
    assert report.layer_share == {0: 0.75, 1: 0.25, 2: 0.25}
    assert report.position_share == {0: 0.1, 1: 0.05, 2: 0.25}
    assert report.describe().splitlines()[0] == ("4 layers x 20 positions: 3 features reach |x| >= 6 somewhere "
                                                 "(largest |x| 9.0); 2 systematic (in >= 25% of layers and >= 6% "
                                                 "of positions)")
    with pytest.raises(ValueError, match="same number of features"):
        outliers.summarize_features(layer_hits, position_hits[:, :2], 9.0, 6.0)


def test_a_planted_feature_changes_no_bit_of_the_logits_and_is_undone_exactly():
    model = tiny_llama()
    ids = torch.arange(1, 17).reshape(1, 16)
    layer = model.model.layers[0]
    linears = [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    plain_x, plain_logits = outliers.input_and_logits(model, linears[0], ids)
    channel, factor = outliers.choose_planting(plain_x)
    assert factor > 1
    with outliers.planted_feature(layer.input_layernorm, linears, channel, factor):
        norm_weight = before["model.layers.0.input_layernorm.weight"]
        assert layer.input_layernorm.weight[channel] == factor * norm_weight[channel]
        planted_x, planted_logits = outliers.input_and_logits(model, linears[0], ids)
    assert torch.equal(planted_logits, plain_logits)
    assert torch.equal(planted_x[:, channel], factor * plain_x[:, channel])
    assert (planted_x[:, channel].abs() >= 6).all()
    assert outliers.outlier_columns(planted_x).tolist() == [channel]
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_planting_refuses_what_would_change_the_function_or_does_not_fit():
    model = tiny_llama()
    layer = model.model.layers[0]
    with pytest.raises(ValueError, match="power of two"):
        with outliers.planted_feature(layer.input_layernorm, [layer.self_attn.q_proj], 3, 3):
            pass
    with pytest.raises(ValueError, match="channel must be an int in"):
        with outliers.planted_feature(layer.input_layernorm, [layer.self_attn.q_proj], 64, 4):
            pass
    with pytest.raises(ValueError, match="read the norm's 64 features"):
        with outliers.planted_feature(layer.input_layernorm, [layer.mlp.down_proj], 3, 4):
            pass


def test_find_systematic_features_finds_a_feature_planted_in_every_layer():
    model = tiny_llama(layers=2)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[5] = 1000.0  # feature 5 of every attention input is huge everywhere
    report = outliers.find_systematic_features(model, torch.arange(1, 33).reshape(2, 16))
    assert report.systematic == (5,)
    assert (report.layers, report.positions) == (2, 32)
    assert report.layer_share[5] == report.position_share[5] == 1.0


def test_int8_linear_stores_what_load_in_8bit_stores_and_run_int8_restores_the_threshold():
    weight = portable_randn(8, 32, seed=4) * 0.05
    layer = outliers.int8_linear(weight, threshold=6.0)
    values, scales = quantization.int8_storage_of(layer)
    expected_values, expected_scales = quantization.quantize_int8_rowwise(weight)
    assert torch.equal(values, expected_values) and torch.equal(scales, expected_scales)
    assert not layer.training
    x = portable_randn(6, 32, seed=5)
    x[:, 7] = 40.0  # one outlier feature at every position
    reference = x @ weight.T
    split = outliers.run_int8(layer, x, threshold=6.0, reference=reference)
    int8_only = outliers.run_int8(layer, x, threshold=0.0, reference=reference)
    assert layer.state.threshold == 6.0
    assert split.float_columns == (7,) and int8_only.float_columns == ()
    assert int8_only.activation_error > 5 * split.activation_error
    assert int8_only.error > split.error
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        outliers.run_int8(layer, x, threshold=-1.0)
