"""helpers.groupwise: round-to-nearest by hand, against compressed-tensors bit for bit, storage, and bad input."""

import pytest
import torch
from torch import nn

from helpers import groupwise
from helpers.groupwise import (
    GroupwiseQuantized,
    bits_per_weight_formula,
    dequantize_groupwise,
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


@pytest.mark.parametrize("symmetric", [True, False])
def test_equals_compressed_tensors_fake_quantize_bit_for_bit(symmetric):
    from compressed_tensors.quantization import QuantizationArgs, fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    for bits in groupwise.SUPPORTED_BITS:
        for group_size in (16, 64):
            weight = random_weight(24, 128, seed=bits)
            weight[0, :group_size] = 0  # an all-zero group
            weight[1] = weight[1].abs()  # groups that do not span zero
            args = QuantizationArgs(num_bits=bits, symmetric=symmetric, group_size=group_size, strategy="group")
            groups = weight.unflatten(-1, (-1, group_size))
            scale, zero_point = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
            reference = fake_quantize(weight, scale, None if symmetric else zero_point, args)
            q = quantize_groupwise(weight, bits, group_size, symmetric)
            assert torch.equal(dequantize_groupwise(q), reference)
            assert torch.equal(q.scales, scale)
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
    # by hand: 4-bit codes, one float32 scale and one int8 zero point per 64 weights: 4 + 40 / 64 = 4.625
    assert stored_bits_per_weight(quantize_groupwise(weight, 4, 64, False)) == 4.625
    assert stored_bits_per_weight(quantize_groupwise(weight, 4, 64, True)) == 4.5
    assert stored_bits_per_weight(quantize_groupwise(weight.half(), 4, 64, True)) == 4.25


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
    assert bits_per_weight == bits_per_weight_formula(3, 32, False) == 3 + 40 / 32
    linears = dict(groupwise.decoder_linears(model))
    assert len(linears) == 2 * 7
    for name, parameter in model.named_parameters():
        module_name = name.rsplit(".", 1)[0]
        if module_name in linears:
            expected = dequantize_groupwise(quantize_groupwise(before[name], 3, 32, False))
            assert torch.equal(parameter, expected), name
        else:  # embeddings, norms, lm_head
            assert torch.equal(parameter, before[name]), name


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
