"""helpers.groupwise: round-to-nearest by hand, against compressed-tensors bit for bit, storage, and bad input."""

import pytest
import torch
from torch import nn

from helpers import environment, groupwise
from helpers.groupwise import (
    GroupwiseQuantized,
    bits_per_weight_formula,
    dequantize_groupwise,
    gptq_hessian,
    gptq_quantize,
    inverse_hessian_factor,
    layer_objective,
    objective_by_column,
    quantize_groupwise,
    round_to_nearest_,
    stored_bits_per_weight,
)


def random_weight(rows, columns, seed=0):
    generator = torch.Generator().manual_seed(seed)
    # rows of different magnitudes, like a real layer
    return torch.randn(rows, columns, generator=generator) * torch.rand(rows, 1, generator=generator)


# --- exact values worked out by hand ----------------------------------------------------------------------


def test_symmetric_four_bit_by_hand():
    q = quantize_groupwise(torch.tensor([[-7.5, 3.75, -2.5, 7.5]]), bits=4, group_size=4, symmetric=True)
    # scale = max|w| / ((2**4 - 1) / 2) = 7.5 / 7.5 = 1; w / scale = -7.5, 3.75, -2.5, 7.5
    # -7.5 and -2.5 round half to even -> -8 and -2; +7.5 is clamped to the largest code 7 first.
    assert q.scales.tolist() == [[1.0]]
    assert q.codes.tolist() == [[-8, 4, -2, 7]]
    assert q.zero_points is None
    assert q.codes.dtype == torch.int8 and q.shape == (1, 4)
    assert dequantize_groupwise(q).tolist() == [[-8.0, 4.0, -2.0, 7.0]]


def test_asymmetric_two_bit_by_hand_is_exact_on_an_evenly_spaced_group():
    q = quantize_groupwise(torch.tensor([[0.0, 1.0, 2.0, 3.0, -3.0, -2.0, -1.0, 0.0]]), bits=2, group_size=4,
                           symmetric=False)
    # group 1: min 0, max 3: scale 3 / 3 = 1, zero point = -2 - 0 / 1 = -2; codes w - 2
    # group 2: min -3, max 0: scale 1, zero point = -2 - (-3) = 1; codes w + 1
    assert q.scales.tolist() == [[1.0, 1.0]]
    assert q.zero_points.tolist() == [[-2, 1]]
    assert q.codes.tolist() == [[-2, -1, 0, 1, -2, -1, 0, 1]]
    assert dequantize_groupwise(q).tolist() == [[0.0, 1.0, 2.0, 3.0, -3.0, -2.0, -1.0, 0.0]]


def test_zero_is_always_representable_and_an_all_zero_group_stays_zero():
    weight = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0, 2.0, 3.0, 4.0]])
    for symmetric in (True, False):
        q = quantize_groupwise(weight, bits=3, group_size=4, symmetric=symmetric)
        assert q.scales[0, 0] == torch.finfo(torch.float32).eps  # a zero scale becomes epsilon, as in the library
        assert dequantize_groupwise(q)[0, :4].tolist() == [0.0, 0.0, 0.0, 0.0]
    # an all-positive group still spans 0: min is taken as 0, so 1..4 use codes -4..3 with scale 4/7
    q = quantize_groupwise(weight, bits=3, group_size=4, symmetric=False)
    assert q.scales[0, 1] == torch.tensor(4.0) / 7 and q.zero_points[0, 1] == -4


def test_float16_scales_are_rounded_by_hand_and_an_all_zero_group_gets_float16_epsilon():
    weight = torch.tensor([[1.0, -0.5, 0.25, 0.0, 0.0, 0.0, 0.0, 0.0]])
    q = quantize_groupwise(weight, bits=4, group_size=4, symmetric=True, scale_dtype=torch.float16)
    # scale = 1 / 7.5 = 0.1333...: stored as the nearest float16, 0.13330078125 (= 273 / 2048)
    assert q.scales.dtype == torch.float16 and q.scales[0, 0].item() == 273 / 2048
    # 1 / 0.13330078125 = 7.5018 is clamped to 7; -0.5 -> -3.751 -> -4; 0.25 -> 1.875 -> 2
    assert q.codes[0, :4].tolist() == [7, -4, 2, 0]
    # dequantized in the weight's float32 from the stored scale: 7 * 273 / 2048 = 0.93310546875
    assert dequantize_groupwise(q).dtype == torch.float32
    assert dequantize_groupwise(q)[0, :4].tolist() == [7 * 273 / 2048, -4 * 273 / 2048, 2 * 273 / 2048, 0.0]
    assert q.scales[0, 1].item() == torch.finfo(torch.float16).eps == 2 ** -10  # all zero: float16's epsilon
    with pytest.raises(TypeError, match="scale_dtype must be None"):
        quantize_groupwise(weight, 4, 4, True, scale_dtype=torch.int8)


def test_codes_stay_in_range_and_the_error_is_at_most_half_a_step_inside_the_range():
    weight = random_weight(16, 64)
    for bits in groupwise.SUPPORTED_BITS:
        for symmetric in (True, False):
            q = quantize_groupwise(weight, bits, 16, symmetric)
            low, high = groupwise.code_range(bits)
            assert int(q.codes.min()) >= low and int(q.codes.max()) <= high
            error = (dequantize_groupwise(q) - weight).abs()
            step = q.scales.repeat_interleave(16, dim=1)
            # symmetric loses the top half step (+max maps to 2**(b-1) - 0.5, clamped): at most one step there
            assert bool((error <= step * (0.5 if not symmetric else 1.0) * (1 + 1e-5)).all())


def test_more_bits_never_hurt_on_this_weight():
    weight = random_weight(32, 128, seed=1)
    errors = [float((dequantize_groupwise(quantize_groupwise(weight, b, 32, False)) - weight).square().sum())
              for b in groupwise.SUPPORTED_BITS]
    assert errors == sorted(errors, reverse=True)


# --- the library's own quantizer: equal bit for bit ---------------------------------------------------------


@pytest.mark.parametrize("scale_dtype", [None, torch.float16])
@pytest.mark.parametrize("symmetric", [True, False])
def test_equals_compressed_tensors_fake_quantize_bit_for_bit(symmetric, scale_dtype):
    from compressed_tensors.quantization import QuantizationArgs, fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    for bits in groupwise.SUPPORTED_BITS:
        for group_size in (16, 64):
            weight = random_weight(24, 128, seed=bits)
            weight[0, :group_size] = 0  # an all-zero group
            weight[1] = weight[1].abs()  # groups that do not span zero
            weight[2] *= 1e-6  # scales that float16 keeps only as subnormals
            args = QuantizationArgs(num_bits=bits, symmetric=symmetric, group_size=group_size, strategy="group",
                                    scale_dtype=scale_dtype)
            groups = weight.unflatten(-1, (-1, group_size))
            scale, zero_point = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
            reference = fake_quantize(weight, scale, None if symmetric else zero_point, args)
            q = quantize_groupwise(weight, bits, group_size, symmetric, scale_dtype=scale_dtype)
            assert torch.equal(dequantize_groupwise(q), reference)
            assert q.scales.dtype == (scale_dtype or weight.dtype) and torch.equal(q.scales.to(scale.dtype), scale)
            if not symmetric:
                assert torch.equal(q.zero_points[1:], zero_point[1:])


# --- storage ------------------------------------------------------------------------------------------------


def test_stored_bits_per_weight_equals_the_formula():
    weight = random_weight(8, 128)
    for bits in groupwise.SUPPORTED_BITS:
        for group_size in (16, 32, 64, 128):
            for symmetric in (True, False):
                q = quantize_groupwise(weight, bits, group_size, symmetric)
                assert stored_bits_per_weight(q) == bits_per_weight_formula(bits, group_size, symmetric)
                q16 = quantize_groupwise(weight, bits, group_size, symmetric, scale_dtype=torch.float16)
                assert stored_bits_per_weight(q16) == bits_per_weight_formula(bits, group_size, symmetric, 16)
    # by hand: 4-bit codes, one float32 scale and one 4-bit zero point (packed like the codes) per 64 weights
    assert stored_bits_per_weight(quantize_groupwise(weight, 4, 64, False)) == 4 + 36 / 64 == 4.5625
    assert stored_bits_per_weight(quantize_groupwise(weight, 4, 64, True)) == 4.5
    assert stored_bits_per_weight(quantize_groupwise(weight.half(), 4, 64, True)) == 4.25
    # float16 scales, as GGUF and the shipped formats store them: 4 + (16 + 4) / 64
    assert stored_bits_per_weight(quantize_groupwise(weight, 4, 64, False, torch.float16)) == 4.3125


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def test_round_to_nearest_replaces_exactly_the_decoder_linears():
    model = tiny_llama()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    bits_per_weight = round_to_nearest_(model, bits=3, group_size=32, symmetric=False)
    assert bits_per_weight == bits_per_weight_formula(3, 32, False) == 3 + 35 / 32
    linears = dict(groupwise.decoder_linears(model))
    assert len(linears) == 2 * 7
    for name, parameter in model.named_parameters():
        module_name = name.rsplit(".", 1)[0]
        if module_name in linears:
            expected = dequantize_groupwise(quantize_groupwise(before[name], 3, 32, False))
            assert torch.equal(parameter, expected), name
        else:  # embeddings, norms, lm_head
            assert torch.equal(parameter, before[name]), name


# --- GPTQ ---------------------------------------------------------------------------------------------------


def correlated_inputs(columns, sequences, seed, tokens=24):
    """Calibration inputs whose features are correlated (a random mixing), as a real layer's are."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(columns, columns, generator=generator) / columns**0.5 + torch.eye(columns)
    return [torch.randn(1, tokens, columns, generator=generator) @ mixing for _ in range(sequences)]


GPTQ_CASES = [  # rows, columns, group_size, bits, symmetric, sequences, block_size, scale_dtype
    (64, 256, 64, 4, True, 4, 128, None),
    (48, 192, 32, 3, False, 3, 128, None),  # a last block narrower than block_size
    (32, 128, 64, 2, False, 5, 32, None),
    (16, 128, 16, 8, True, 2, 64, None),
    (48, 192, 64, 3, False, 3, 128, torch.float16),  # notebook 07's float16 scales
    (32, 128, 32, 4, True, 2, 64, torch.float16),
]


@pytest.mark.parametrize("rows, columns, group_size, bits, symmetric, sequences, block_size, scale_dtype", GPTQ_CASES)
def test_gptq_equals_llmcompressor_bit_for_bit(rows, columns, group_size, bits, symmetric, sequences, block_size,
                                               scale_dtype):
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.utils import calculate_qparams
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight
    from llmcompressor.modifiers.gptq.helpers import accumulate_hessian, make_empty_hessian

    weight = random_weight(rows, columns, seed=rows)
    inputs = correlated_inputs(columns, sequences, seed=columns)
    # the library's Hessian, accumulated by its own calibration hook function
    layer = nn.Linear(columns, rows, bias=False)
    hessian, samples = make_empty_hessian(layer), torch.zeros(())
    for x in inputs:
        hessian, samples = accumulate_hessian(x, layer, hessian, samples)
    hessian = hessian / samples
    assert torch.equal(gptq_hessian(inputs), hessian)
    # the library's GPTQ (natural column order: actorder=None), with its observer's static group scales
    args = QuantizationArgs(num_bits=bits, symmetric=symmetric, group_size=group_size, strategy="group",
                            actorder=None, scale_dtype=scale_dtype)
    groups = weight.unflatten(-1, (-1, group_size))
    scale, zero_point = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
    with groupwise.one_thread():  # LAPACK's last bits depend on the thread count: both factorise on one thread
        expected, loss, fell_back_to_rtn = quantize_weight(weight.unsqueeze(0).clone(), hessian.unsqueeze(0).clone(),
                                                           scale.unsqueeze(0), zero_point.unsqueeze(0), None, args,
                                                           blocksize=block_size, percdamp=0.01)
    assert not bool(fell_back_to_rtn)
    q = gptq_quantize(weight, gptq_hessian(inputs), bits, group_size, symmetric, block_size=block_size,
                      scale_dtype=scale_dtype)
    assert torch.equal(dequantize_groupwise(q), expected[0])
    assert torch.equal(q.scales.to(scale.dtype), scale)
    # llmcompressor's loss is half the sum of the squared errors its loop pushed: our running objective's end
    running = objective_by_column(weight, dequantize_groupwise(q), gptq_hessian(inputs), compensated=True)
    assert float(running[-1]) == pytest.approx(2 * float(loss), rel=1e-4)


def test_gptq_with_an_identity_hessian_is_round_to_nearest_exactly():
    weight = random_weight(32, 256, seed=3)
    for bits, symmetric in ((2, True), (3, False), (4, True), (8, False)):
        rtn = quantize_groupwise(weight, bits, 64, symmetric)
        gptq = gptq_quantize(weight, torch.eye(256), bits, 64, symmetric)
        assert torch.equal(gptq.codes, rtn.codes) and torch.equal(gptq.scales, rtn.scales)
    # uncorrelated calibration inputs give a Hessian that is a multiple of the identity: the same result
    hessian = gptq_hessian([torch.eye(256).unsqueeze(0)])
    assert torch.equal(hessian, hessian[0, 0] * torch.eye(256)) and float(hessian[0, 0]) == pytest.approx(2.0)
    assert torch.equal(gptq_quantize(weight, hessian, 3, 64, False).codes,
                       quantize_groupwise(weight, 3, 64, False).codes)


def test_gptq_is_never_worse_than_round_to_nearest_on_correlated_inputs():
    for seed in range(4):
        weight = random_weight(32, 64, seed=seed)
        hessian = gptq_hessian(correlated_inputs(64, sequences=2, seed=100 + seed))
        for bits in (2, 3, 4):
            for symmetric in (True, False):
                rtn = dequantize_groupwise(quantize_groupwise(weight, bits, 16, symmetric))
                gptq = dequantize_groupwise(gptq_quantize(weight, hessian, bits, 16, symmetric, block_size=32))
                assert layer_objective(weight, gptq, hessian) <= layer_objective(weight, rtn, hessian)


def test_the_objective_by_column_by_hand():
    # an identity Hessian, no damping: each column counts on its own, pushed or not: 1, then 1 + (4 + 1)
    delta = torch.tensor([[1.0, 2.0], [0.0, 1.0]])
    for compensated in (True, False):
        running = objective_by_column(torch.zeros(2, 2), -delta, torch.eye(2), compensated, damping=0.0)
        assert running.dtype == torch.float64 and running.tolist() == [1.0, 6.0]
    # H = [[2, 1], [1, 2]] and only column 0 wrong by 1: left alone, column 1 keeps the error at d H d^T = 2;
    # moved to its best value t = -1/2, it brings it down to 2 + 2t + 2t^2 = 1.5. Once column 1 is fixed at its
    # original value (no error of its own), both end at trace(D H D^T) = 2.
    hessian = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
    weight, quantized = torch.tensor([[1.0, 0.0]]), torch.zeros(1, 2)
    assert objective_by_column(weight, quantized, hessian, False, damping=0.0).tolist() == [2.0, 2.0]
    assert objective_by_column(weight, quantized, hessian, True, damping=0.0).tolist() == pytest.approx([1.5, 2.0])


def test_the_objective_by_column_ends_at_the_damped_objective_and_gptq_stays_below_rtn():
    weight = random_weight(32, 128, seed=5)
    hessian = gptq_hessian(correlated_inputs(128, sequences=3, seed=5))
    rtn = dequantize_groupwise(quantize_groupwise(weight, 3, 32, False))
    gptq = dequantize_groupwise(gptq_quantize(weight, hessian, 3, 32, False))
    damped = groupwise.damped_hessian(hessian)
    for quantized in (rtn, gptq):
        for compensated in (True, False):
            running = objective_by_column(weight, quantized, hessian, compensated)
            assert float(running[-1]) == pytest.approx(layer_objective(weight, quantized, damped), rel=1e-4)
            if compensated:  # a sum of squares only grows (left alone, columns' errors may cancel: no such rule)
                assert bool((running.diff() >= 0).all())
    assert bool((objective_by_column(weight, gptq, hessian, True) < objective_by_column(weight, rtn, hessian, False)).all())
    with pytest.raises(ValueError, match="shapes disagree"):
        objective_by_column(weight, gptq[:, :64], hessian, True)
    with pytest.raises(TypeError, match="compensated must be True or False"):
        objective_by_column(weight, gptq, hessian, "yes")


def test_row_i_of_the_factor_is_the_free_columns_inverse_hessian_row_scaled():
    # GPTQ's paper: once columns 0..i-1 are quantized, column i's error is spread by row i of the inverse Hessian of
    # the free columns i.. (H[i:, i:]^-1), divided by its diagonal entry; row i of U carries it divided by its root
    hessian = gptq_hessian(correlated_inputs(48, sequences=2, seed=4))
    exact = inverse_hessian_factor(hessian, dtype=torch.float64)
    for i in (0, 17, 47):
        free = torch.linalg.inv(groupwise.damped_hessian(hessian)[i:, i:].double())[0]
        assert torch.allclose(exact[i, i:], free / free[0].sqrt(), rtol=1e-9, atol=0)
    assert torch.allclose(inverse_hessian_factor(hessian), exact.float(), rtol=1e-3, atol=1e-6)  # GPTQ's float32
    with pytest.raises(ValueError, match="dtype must be torch.float32"):
        inverse_hessian_factor(hessian, dtype=torch.float16)


def test_layer_objective_is_the_output_error_on_the_calibration_inputs():
    inputs = correlated_inputs(64, sequences=3, seed=7)
    weight = random_weight(16, 64, seed=7)
    rtn = dequantize_groupwise(quantize_groupwise(weight, 3, 16, True))
    direct = sum(float(((x @ (weight - rtn).t()).double()).square().sum()) for x in inputs) * 2 / len(inputs)
    assert layer_objective(weight, rtn, gptq_hessian(inputs)) == pytest.approx(direct, rel=1e-5)


def test_dead_input_columns_are_zeroed_and_the_factor_is_upper_triangular():
    hessian = gptq_hessian(correlated_inputs(32, sequences=2, seed=1))
    hessian[5, :] = 0
    hessian[:, 5] = 0
    weight = random_weight(8, 32)
    q = gptq_quantize(weight, hessian, 4, 16, False)
    assert torch.equal(dequantize_groupwise(q)[:, 5], torch.zeros(8))
    factor = inverse_hessian_factor(hessian)
    assert torch.equal(factor, torch.triu(factor))


def test_gptq_bad_input_says_what_was_wrong():
    weight = random_weight(8, 32)
    with pytest.raises(ValueError, match=r"hessian must be \(32, 32\)"):
        gptq_quantize(weight, torch.eye(16), 4, 16, True)
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        gptq_quantize(weight, torch.eye(32), 4, 16, True, block_size=0)
    with pytest.raises(ValueError, match="damping must be a number >= 0"):
        gptq_quantize(weight, torch.eye(32), 4, 16, True, damping=-1)
    with pytest.raises(ValueError, match="not positive definite"):
        gptq_quantize(weight, -torch.eye(32), 4, 16, True, damping=0)
    with pytest.raises(ValueError, match="no calibration inputs"):
        gptq_hessian([])
    with pytest.raises(TypeError, match="floating-point tensor"):
        gptq_hessian([torch.ones(2, 3, 4, 5)])
    with pytest.raises(ValueError, match="disagree on in_features"):
        gptq_hessian([torch.ones(3, 4), torch.ones(3, 5)])


# --- bad input ------------------------------------------------------------------------------------------------


def test_bad_input_says_what_was_wrong():
    weight = random_weight(4, 64)
    with pytest.raises(ValueError, match="bits must be an int from 2 to 8"):
        quantize_groupwise(weight, 1, 16, True)
    with pytest.raises(ValueError, match="bits must be an int"):
        quantize_groupwise(weight, 4.0, 16, True)
    with pytest.raises(ValueError, match="multiple of group_size"):
        quantize_groupwise(weight, 4, 48, True)
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        quantize_groupwise(weight, 4, 0, True)
    with pytest.raises(TypeError, match="floating-point"):
        quantize_groupwise(weight.to(torch.int32), 4, 16, True)
    with pytest.raises(ValueError, match="2-D"):
        quantize_groupwise(weight[0], 4, 16, True)
    with pytest.raises(TypeError, match="torch.Tensor"):
        quantize_groupwise(weight.tolist(), 4, 16, True)
    with pytest.raises(TypeError, match="symmetric must be True or False"):
        quantize_groupwise(weight, 4, 16, "yes")
    with pytest.raises(TypeError, match="GroupwiseQuantized"):
        dequantize_groupwise((1, 2))
    with pytest.raises(ValueError, match="no decoder-layer nn.Linear"):
        round_to_nearest_(nn.Sequential(nn.Linear(4, 4)), 4, 4, True)
    with pytest.raises(ValueError, match="bits must be"):
        round_to_nearest_(tiny_llama(), 9, 32, True)
    assert isinstance(quantize_groupwise(weight, 4, 16, True), GroupwiseQuantized)


# --- whole models, AWQ, the plan -----------------------------------------------------------------------------------


def test_gptq_model_on_the_first_layer_equals_gptq_on_that_layers_inputs():
    model = tiny_llama(seed=1)
    reference = tiny_llama(seed=1)
    calibration = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(0))
    inputs = groupwise.layer_inputs(reference, 0, calibration)
    assert len(inputs["self_attn.q_proj"]) == 3 and inputs["mlp.down_proj"][0].shape == (1, 12, 128)
    bits_per_weight = groupwise.gptq_model_(model, calibration, 3, 32, False, layers=[0])
    assert bits_per_weight == bits_per_weight_formula(3, 32, False)
    expected = gptq_quantize(reference.model.layers[0].mlp.up_proj.weight.detach(),
                             gptq_hessian(inputs["mlp.up_proj"]), 3, 32, False)
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, dequantize_groupwise(expected))
    assert torch.equal(model.model.layers[1].mlp.up_proj.weight, reference.model.layers[1].mlp.up_proj.weight)


def test_awq_search_starts_from_rtn_and_never_ends_worse():
    weight = random_weight(32, 64, seed=4)
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(1, 40, 64, generator=generator) * torch.linspace(0.1, 5.0, 64)  # busy and quiet channels
    alpha, scales, errors = groupwise.awq_search([weight], x, 3, 16, False, grid=10)
    rtn = dequantize_groupwise(quantize_groupwise(weight, 3, 16, False))
    direct = float((x.reshape(-1, 64) @ (weight - rtn).t()).square().sum())
    assert len(errors) == 10 and errors[0] == pytest.approx(direct, rel=1e-4)  # alpha = 0 is RTN
    assert min(errors) <= errors[0] and alpha == errors.index(min(errors)) / 10
    assert float((scales.max() * scales.min()).sqrt()) == pytest.approx(1.0, rel=1e-5)


def test_awq_model_folds_scales_without_changing_the_float_function():
    model, reference = tiny_llama(seed=2), tiny_llama(seed=2)
    calibration = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    ids = torch.randint(0, 64, (1, 10), generator=torch.Generator().manual_seed(2))
    bits_per_weight = groupwise.awq_model_(model, calibration, 8, 32, False, grid=4)
    assert bits_per_weight == bits_per_weight_formula(8, 32, False)
    norm, reference_norm = model.model.layers[0].input_layernorm, reference.model.layers[0].input_layernorm
    assert not torch.equal(norm.weight, reference_norm.weight)
    with torch.no_grad():  # at 8 bits only the folding is left, and it must not change what the model computes
        assert torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-2)


def test_round_to_nearest_on_some_layers_and_backup_restore():
    model = tiny_llama()
    backup = groupwise.backup_decoder_weights(model)
    before = model.model.layers[1].self_attn.o_proj.weight.detach().clone()
    round_to_nearest_(model, 2, 32, True, layers=[0])
    assert torch.equal(model.model.layers[1].self_attn.o_proj.weight, before)
    assert not torch.equal(model.model.layers[0].self_attn.o_proj.weight, backup["0.self_attn.o_proj.weight"])
    groupwise.restore_decoder_weights_(model, backup)
    assert torch.equal(model.model.layers[0].self_attn.o_proj.weight, backup["0.self_attn.o_proj.weight"].float())
    with pytest.raises(ValueError, match="another model"):
        groupwise.restore_decoder_weights_(model, {"x": torch.zeros(1)})
    with pytest.raises(ValueError, match="no decoder-layer Linear in layers"):
        round_to_nearest_(model, 2, 32, True, layers=[7])


def test_the_plan_runs_everything_on_the_tiny_model_and_calibration_on_a_few_layers_of_a_real_llama():
    tiny = groupwise.comparison_plan(6, "cpu", whole_model=True)  # the shipped tiny Llama on a CPU
    assert tiny.calibration_layers == tuple(range(6)) and tiny.calibration_on_whole_model
    assert tiny.bit_widths == (4, 3, 2) and tiny.awq_bit_widths == (4,) and tiny.group_size == 64
    t4 = groupwise.comparison_plan(28, "cuda", whole_model=False)  # Llama-3.2-3B on a T4
    assert t4.calibration_layers == (0, 1) and not t4.calibration_on_whole_model
    assert "layers 0, 1 only" in t4.reason and t4.calibration_sequences == 16
    with pytest.raises(ValueError, match="num_layers must be a positive int"):
        groupwise.comparison_plan(0, "cpu", whole_model=True)
    with pytest.raises(ValueError, match="device must be"):
        groupwise.comparison_plan(6, "tpu", whole_model=True)
    with pytest.raises(ValueError, match="whole_model must be True"):
        groupwise.comparison_plan(6, "cpu", whole_model=None)


def test_a_real_llama_calibrates_its_first_layers_at_any_depth_so_the_rehearsal_takes_the_t4_path():
    from helpers.rehearsal import REHEARSAL_LAYERS

    rehearsed = groupwise.comparison_plan(REHEARSAL_LAYERS, "cuda", whole_model=False)
    assert rehearsed.calibration_layers == (0, 1) and not rehearsed.calibration_on_whole_model
    assert rehearsed.layers_suffix == ", layers 0-1"
    # the tiny Llama's depth never decides it: a 3-layer tiny model still quantizes everything
    assert groupwise.comparison_plan(3, "cpu", whole_model=True).calibration_on_whole_model


def test_pareto_frontier_keeps_the_points_nothing_beats():
    points = {"a": (2.5, 0.2), "b": (3.0, 0.3), "c": (3.5, 0.05), "d": (4.5, 0.05), "e": (8.5, 0.001)}
    assert groupwise.pareto_frontier(points) == ["a", "c", "e"]


def test_the_inverse_hessian_factor_is_the_same_whatever_the_thread_count():
    hessian = gptq_hessian(correlated_inputs(256, sequences=2, seed=9))
    threads = torch.get_num_threads()
    try:
        factors = []
        for count in (1, 2):
            torch.set_num_threads(count)
            factors.append(inverse_hessian_factor(hessian))
        assert torch.equal(factors[0], factors[1])
        assert torch.get_num_threads() == 2  # given back
    finally:
        torch.set_num_threads(threads)


def test_results_on_part_of_a_real_llama_are_labelled_as_such():
    tiny = groupwise.comparison_plan(6, "cpu", whole_model=True)
    assert tiny.layers_suffix == "" and tiny.calibrated_label("GPTQ", 3) == "GPTQ 3-bit asym"
    real = groupwise.comparison_plan(28, "cuda", whole_model=False)  # Llama-3.2-3B: GPTQ and AWQ on the first layers only
    assert not real.calibration_on_whole_model
    first, last = real.calibration_layers[0], real.calibration_layers[-1]
    assert real.calibrated_label("GPTQ", 3) == f"GPTQ 3-bit asym, layers {first}-{last}"
    assert real.calibrated_label("RTN", 4, symmetric=True) == f"RTN 4-bit sym, layers {first}-{last}"
    # 07 keeps whole-model comparisons (Pareto frontier, 8-bit against 4-bit) to labels without "layers"
    assert "layers" in real.calibrated_label("AWQ", 4) and "layers" not in tiny.calibrated_label("AWQ", 4)
    with pytest.raises(ValueError, match="'GPTQ', 'AWQ' or 'RTN'"):
        real.calibrated_label("HQQ", 4)


def test_awq_measures_the_same_output_error_from_the_gram_matrix_or_from_few_tokens():
    from helpers.groupwise import _output_error

    weights = [environment.portable_randn(6, 16, seed=21).double()]
    quantized = [weights[0] + 0.01 * environment.portable_randn(6, 16, seed=22).double()]
    for tokens in (4, 40):  # fewer tokens than features: the tokens; more: the Gram matrix
        x = environment.portable_randn(tokens, 16, seed=23).double()
        direct = float(((x @ weights[0].t() - x @ quantized[0].t()) ** 2).sum())
        via_gram = _output_error(x, x.t() @ x, weights, quantized)
        via_tokens = _output_error(x, None, weights, quantized)
        assert abs(via_gram - direct) <= 1e-9 * direct and abs(via_tokens - direct) <= 1e-9 * direct


def test_a_small_workload_compares_the_first_bit_widths_only(monkeypatch):
    from helpers import workload

    plan = groupwise.comparison_plan(3, "cuda", whole_model=False)
    assert plan.with_bit_widths(plan.bit_widths) is plan
    monkeypatch.setenv("COURSE_WORKLOAD", "small")
    small = plan.with_bit_widths(workload.first(plan.bit_widths, "bit_widths"))
    assert small.bit_widths == (4, 3) and small.calibration_layers == plan.calibration_layers
    with pytest.raises(ValueError, match="some of the plan's"):
        plan.with_bit_widths((8,))
