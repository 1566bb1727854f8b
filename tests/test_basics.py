"""helpers.basics: float formats bit by bit, and linear quantization from scratch, against a published worked example
(DeepLearning.AI's "Quantization in Depth"), against PyTorch's quantizer and against compressed-tensors."""

import math
import warnings

import pytest
import torch

from helpers import basics

# --- a published worked example --------------------------------------------------------------------------------
# DeepLearning.AI and Hugging Face, "Quantization in Depth" (https://www.deeplearning.ai/short-courses/quantization-
# in-depth/), lesson "Linear Quantization I": notebooks L2-A (quantize and dequantize a tensor with a given scale and
# zero point) and L2-B (get the scale and zero point). The tensor and the figures below are as published in the
# course's executed notebooks (copies with their outputs: github.com/kimzapp/deep_learning_with_pytorch for L2-A,
# github.com/VeerleDepestele/Trends_in_AI, notebooks/Les6_quantization_in_depth_2/
# L2_linear_I_get_scale_and_zero_point.ipynb for L2-B). The per-row scales of lesson L3-C (per channel, symmetric)
# are max|row| / 127, as printed in an executed copy of that lesson: tensor([5.7370, 2.3268, 5.3906]).
COURSE_TENSOR = [[191.6, -13.5, 728.6], [92.14, 295.5, -184.0], [0.0, 684.6, 245.5]]
L2A_SCALE, L2A_ZERO_POINT = 3.5, -70
L2A_CODES = [[-15, -74, 127], [-44, 14, -123], [-70, 126, 0]]
L2A_DEQUANTIZED = [[192.5, -14.0, 689.5], [91.0, 294.0, -185.5], [0.0, 686.0, 245.0]]
L2A_MSE = 170.8753  # printed as tensor(170.8753)
L2B_SCALE = 3.578823433670343  # (r_max - r_min) / (q_max - q_min), in Python floats
L2B_RAW_ZERO_POINT = -76.58645490333825  # q_min - r_min / scale, before rounding
L2B_ZERO_POINT = -77
L3C_ROW_SCALES = [5.7370, 2.3268, 5.3906]  # printed to 4 decimals
L3C_ROW_CODES = [[33, -2, 127], [40, 127, -79], [0, 127, 46]]


def course_tensor() -> torch.Tensor:
    return torch.tensor(COURSE_TENSOR)


def test_quantize_and_dequantize_reproduce_the_published_codes_values_and_error():
    tensor, scale = course_tensor(), torch.tensor(L2A_SCALE)
    codes = basics.quantize(tensor, scale, L2A_ZERO_POINT, q_min=-128, q_max=127)
    assert codes.int().tolist() == L2A_CODES
    dequantized = basics.dequantize(codes, scale, L2A_ZERO_POINT)
    assert dequantized.tolist() == L2A_DEQUANTIZED  # exact: every code times 3.5 is a float32
    assert round(basics.mean_squared_error(tensor, dequantized), 4) == L2A_MSE


def test_scale_and_zero_point_from_the_range_are_the_published_ones():
    tensor = course_tensor()
    scale, zero_point = basics.zero_point_scale(tensor.reshape(1, -1), bits=8)
    assert scale.dtype == torch.float32
    assert scale.item() == torch.tensor(L2B_SCALE).item()  # the published float64 value, rounded to float32
    assert zero_point.item() == L2B_ZERO_POINT == round(L2B_RAW_ZERO_POINT)
    q = basics.quantize_tensor(tensor, bits=8, symmetric=False)
    assert q.scales.item() == scale.item() and q.zero_points.item() == L2B_ZERO_POINT
    # the published notebook says "around 1.5 instead of 170"
    assert 1.5 < basics.mean_squared_error(tensor, q.dequantized) < 1.6


def test_per_row_absmax_reproduces_the_published_row_scales_and_codes():
    q = basics.quantize_tensor(course_tensor(), bits=8, symmetric=True, granularity="channel")
    assert [round(s, 4) for s in q.scales.flatten().tolist()] == L3C_ROW_SCALES
    assert q.codes.tolist() == L3C_ROW_CODES


# --- the library equivalents -----------------------------------------------------------------------------------


@pytest.fixture()
def no_deprecation_warning():
    with warnings.catch_warnings():  # torch 2.13 deprecates torch.quantize_per_* in favour of torchao
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel")
        yield


@pytest.mark.parametrize("symmetric", [True, False])
def test_equals_torch_quantize_per_tensor(symmetric, no_deprecation_warning):
    for tensor in (course_tensor(), torch.tensor([[-1.0, -0.25, 0.0], [0.5, 1.75, 2.5]]), basics.example_weight(8, 32)):
        q = basics.quantize_tensor(tensor, bits=8, symmetric=symmetric)
        by_torch = torch.quantize_per_tensor(tensor, q.scales.item(), q.zero_points.item(), torch.qint8)
        assert torch.equal(by_torch.int_repr(), q.codes)
        assert by_torch.q_scale() == q.scales.item() and by_torch.q_zero_point() == q.zero_points.item()
        assert torch.equal(by_torch.dequantize(), q.dequantized)


@pytest.mark.parametrize("symmetric", [True, False])
def test_equals_torch_quantize_per_channel(symmetric, no_deprecation_warning):
    for tensor in (course_tensor(), basics.example_weight(16, 64, seed=3)):
        q = basics.quantize_tensor(tensor, bits=8, symmetric=symmetric, granularity="channel")
        by_torch = torch.quantize_per_channel(tensor, q.scales.flatten().double(), q.zero_points.flatten().long(),
                                              axis=0, dtype=torch.qint8)
        assert torch.equal(by_torch.int_repr(), q.codes)
        assert torch.equal(by_torch.dequantize(), q.dequantized)


def test_the_exact_codes_of_a_tiny_tensor_by_hand(no_deprecation_warning):
    # values on a grid of 0.5 from -1 to 2.5: 3-bit zero point, scale 3.5 / 7 = 0.5, zero point -4 - (-1 / 0.5) = -2
    values = torch.tensor([[-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 2.5]])
    q = basics.quantize_tensor(values, bits=3, symmetric=False)
    assert q.scales.item() == 0.5 and q.zero_points.item() == -2
    assert q.codes.tolist() == [[-4, -3, -2, -1, 0, 1, 2, 3]]
    assert torch.equal(q.dequantized, values)
    # absmax at 3 bits: scale 2.5 / 3, codes round(x / scale), -1 -> -1.2 -> -1
    q = basics.quantize_tensor(values, bits=3, symmetric=True)
    assert q.codes.tolist() == [[-1, -1, 0, 1, 1, 2, 2, 3]]  # 0.5 / (2.5/3) = 0.6 -> 1; 1.5 / (2.5/3) = 1.8 -> 2
    assert q.zero_points.item() == 0


def _compressed_tensors_args(bits, symmetric, granularity, group_size=None):
    from compressed_tensors.quantization import QuantizationArgs

    strategy = {"tensor": "tensor", "channel": "channel", "group": "group"}[granularity]
    return QuantizationArgs(num_bits=bits, symmetric=symmetric, strategy=strategy, group_size=group_size)


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity,group_size", [("tensor", None), ("channel", None), ("group", 16)])
def test_equals_compressed_tensors_fake_quantize_bit_for_bit(bits, symmetric, granularity, group_size):
    """Given our scales (and zero points), compressed-tensors' fake_quantize computes our dequantized values exactly.

    Its own symmetric scale differs on purpose (max|x| / ((2**bits - 1) / 2), using the extra negative code); with
    ours every |x / scale| <= q_max, so its wider clamp never acts and the arithmetic is the same.
    """
    from compressed_tensors.quantization import fake_quantize

    weight = basics.example_weight(12, 64, seed=bits)
    weight[1] = weight[1].abs()  # a row that does not span zero: its range is widened to 0
    q = basics.quantize_tensor(weight, bits, symmetric, granularity, group_size)
    args = _compressed_tensors_args(bits, symmetric, granularity, group_size)
    shape = {"tensor": (1,), "channel": (weight.shape[0], 1), "group": (weight.shape[0], -1)}[granularity]
    scale = q.scales.reshape(shape)
    zero_point = None if symmetric else q.zero_points.reshape(shape).to(torch.int8)
    assert torch.equal(fake_quantize(weight, scale, zero_point, args), q.dequantized)


def test_compressed_tensors_reproduces_the_published_example_with_our_functions():
    """fake_quantize with the course's scale 3.5 and zero point -70 gives the published dequantized tensor, as ours."""
    from compressed_tensors.quantization import fake_quantize

    args = _compressed_tensors_args(8, False, "tensor")
    theirs = fake_quantize(course_tensor(), torch.tensor([L2A_SCALE]), torch.tensor([L2A_ZERO_POINT], dtype=torch.int8),
                           args)
    assert theirs.tolist() == L2A_DEQUANTIZED
    ours = basics.dequantize(basics.quantize(course_tensor(), torch.tensor(L2A_SCALE), L2A_ZERO_POINT, -128, 127),
                             torch.tensor(L2A_SCALE), L2A_ZERO_POINT)
    assert torch.equal(theirs, ours)


def test_zero_points_equal_compressed_tensors_calculate_qparams():
    from compressed_tensors.quantization.utils import calculate_qparams

    weight = basics.example_weight(12, 64, seed=5)
    weight[2] = weight[2].abs() + 0.01  # all positive: the range must be widened to include 0
    for bits in (3, 4, 8):
        args = _compressed_tensors_args(bits, False, "channel")
        scale, zero_point = calculate_qparams(weight.amin(-1), weight.amax(-1), args)
        ours_scale, ours_zero_point = basics.zero_point_scale(weight, bits)
        assert torch.equal(ours_scale.flatten(), scale.flatten())
        assert torch.equal(ours_zero_point.flatten(), zero_point.flatten().to(torch.int32))


# --- laws of linear quantization ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_rounding_moves_a_value_by_at_most_half_a_step(bits, symmetric):
    weight = basics.example_weight(16, 64, seed=bits)
    for granularity, group_size in (("tensor", None), ("channel", None), ("group", 16)):
        q = basics.quantize_tensor(weight, bits, symmetric, granularity, group_size)
        rows = basics.as_rows(weight, granularity, group_size)
        error = (rows - q.dequantized.reshape(rows.shape)).abs()
        assert bool((error <= q.scales / 2 * (1 + 1e-6)).all())
        q_min, q_max = basics.code_range(bits, symmetric)
        assert int(q.codes.min()) >= q_min and int(q.codes.max()) <= q_max


def test_zero_is_exactly_representable_and_the_extremes_land_on_codes():
    weight = basics.example_weight(4, 32, seed=9)
    weight[0, 0] = 0.0
    q = basics.quantize_tensor(weight, 4, symmetric=False, granularity="channel")
    assert q.dequantized[0, 0].item() == 0.0
    q = basics.quantize_tensor(weight, 4, symmetric=True, granularity="channel")
    largest = weight.abs().argmax(dim=1)
    assert q.codes[torch.arange(4), largest].abs().tolist() == [7, 7, 7, 7]


def test_an_all_zero_row_quantizes_to_zeros_without_dividing_by_zero():
    weight = basics.example_weight(3, 8)
    weight[1] = 0.0
    for symmetric in (True, False):
        q = basics.quantize_tensor(weight, 4, symmetric, "channel")
        assert torch.isfinite(q.dequantized).all() and q.dequantized[1].abs().sum() == 0


def test_granularity_views():
    weight = basics.example_weight(4, 32)
    assert basics.as_rows(weight, "tensor").shape == (1, 128)
    assert basics.as_rows(weight, "channel").shape == (4, 32)
    assert basics.as_rows(weight, "group", 8).shape == (16, 8)
    assert torch.equal(basics.as_rows(weight, "group", 8)[4], weight[1, :8])  # groups run along a row
    q = basics.quantize_tensor(weight, 4, granularity="group", group_size=8)
    assert q.codes.shape == weight.shape and q.scales.shape == (16, 1)


def test_bits_per_weight_counts_codes_and_scales():
    weight = basics.example_weight(8, 64)
    assert basics.bits_per_weight(basics.quantize_tensor(weight, 4, granularity="group", group_size=64)) == 4.25
    assert basics.bits_per_weight(basics.quantize_tensor(weight, 4, False, "group", 64)) == 4 + (16 + 4) / 64
    assert basics.bits_per_weight(basics.quantize_tensor(weight, 8, granularity="channel"), scale_bits=32) == 8.5


def test_one_outlier_confines_its_damage_to_its_row_or_group():
    weight = basics.example_weight()
    planted = basics.with_outlier(weight, 5, 17, 20.0)
    assert planted[5, 17] == 20 * weight.abs().max() and torch.equal(weight[0], planted[0])
    per_tensor = basics.quantize_tensor(planted, 4)
    others = torch.ones_like(weight, dtype=torch.bool)
    others[5, 17] = False
    assert bool((per_tensor.dequantized[others] == 0).all())  # 20 x max / 7 per step: everything else rounds to 0
    before = basics.quantize_tensor(weight, 4, granularity="group", group_size=32).dequantized
    after = basics.quantize_tensor(planted, 4, granularity="group", group_size=32).dequantized
    changed = (before != after).nonzero().tolist()
    assert changed and all(r == 5 and c // 32 == 0 for r, c in changed)


def test_errors_are_summed_exactly():
    a = torch.tensor([1e8, 1.0, -1e8, 1.0])
    assert basics.mean_squared_error(torch.zeros(4), a) == (2e16 + 2) / 4
    assert basics.relative_error(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 4.0])) == 0.0
    assert basics.relative_error(torch.tensor([3.0, 4.0]), torch.tensor([0.0, 0.0])) == 1.0


def test_the_example_weight_is_portable_and_fixed():
    weight = basics.example_weight()
    assert weight.shape == (64, 256) and weight.dtype == torch.float32
    assert torch.equal(weight, basics.example_weight())
    row_max = weight.abs().amax(dim=1)
    assert row_max.max() / row_max.min() > 5  # rows of different sizes: per-channel scales have work to do


# --- bad input ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 0, 9, 4.0, True, "4"])
def test_bits_out_of_range_are_refused(bits):
    with pytest.raises(ValueError, match="bits must be an int from 2 to 8"):
        basics.quantize_tensor(torch.ones(2, 2), bits)


def test_bad_tensors_and_granularities_are_refused():
    with pytest.raises(ValueError, match="floating-point"):
        basics.quantize_tensor(torch.ones(2, 2, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="torch.Tensor"):
        basics.quantize_tensor([[1.0, 2.0]], 4)
    with pytest.raises(ValueError, match="inf or NaN"):
        basics.quantize_tensor(torch.tensor([1.0, math.inf]), 4)
    with pytest.raises(ValueError, match="empty"):
        basics.quantize_tensor(torch.ones(0), 4)
    with pytest.raises(ValueError, match="granularity must be one of"):
        basics.quantize_tensor(torch.ones(2, 2), 4, granularity="row")
    with pytest.raises(ValueError, match="needs a matrix"):
        basics.quantize_tensor(torch.ones(8), 4, granularity="channel")
    with pytest.raises(ValueError, match="dividing the 6 columns"):
        basics.quantize_tensor(torch.ones(2, 6), 4, granularity="group", group_size=4)
    with pytest.raises(ValueError, match="only for it"):
        basics.quantize_tensor(torch.ones(2, 8), 4, granularity="channel", group_size=4)
    with pytest.raises(ValueError, match="shapes differ"):
        basics.relative_error(torch.ones(2), torch.ones(3))
    with pytest.raises(ValueError, match="all zeros"):
        basics.relative_error(torch.zeros(2), torch.ones(2))


# --- floating-point formats --------------------------------------------------------------------------------------


def test_the_three_layouts():
    layouts = {d: basics.float_format(d) for d in basics.FLOAT_DTYPES}
    assert [(f.exponent_bits, f.mantissa_bits, f.bias) for f in layouts.values()] == [(8, 23, 127), (5, 10, 15),
                                                                                      (8, 7, 127)]
    f16 = layouts[torch.float16]
    assert f16.largest == (2 - 2**-10) * 2**15 == 65504
    assert f16.smallest_normal == 2**-14 and f16.smallest_subnormal == 2**-24 and f16.eps == 2**-10
    assert layouts[torch.bfloat16].smallest_normal == layouts[torch.float32].smallest_normal  # the same range
    assert layouts[torch.bfloat16].smallest_subnormal == 2**-133
    with pytest.raises(ValueError, match="expected one of"):
        basics.float_format(torch.int8)


VALUES = [0.0, -0.0, 1.0, -6.25, 0.1, 1000.3, 70000.0, 1e-8, 6e-8, 1e-40, 65504.0, 3.0e38, -math.inf, math.inf,
          2.0**-24, 1.001]


@pytest.mark.parametrize("dtype", basics.FLOAT_DTYPES, ids=str)
def test_float_bits_by_arithmetic_equal_torchs_bits(dtype):
    for value in VALUES:
        bits = basics.float_bits(value, dtype)
        assert bits.pattern == basics.torch_bits(value, dtype), (value, dtype)
        stored = basics.stored_value(value, dtype)
        assert bits.value() == stored or (math.isnan(bits.value()) and math.isnan(stored))


def test_float_bits_of_known_values():
    bits = basics.float_bits(-6.25, torch.float32)  # -1.5625 x 2**2
    assert (bits.sign, bits.exponent, bits.mantissa) == (1, 129, 0b1001 << 19)
    assert bits.fields() == "1 10000001 10010000000000000000000"
    assert basics.float_bits(-6.25, torch.bfloat16).fields() == "1 10000001 1001000"
    assert basics.float_bits(70000.0, torch.float16).fields() == "0 11111 0000000000"  # inf
    assert basics.float_bits(2.0**-24, torch.float16).fields() == "0 00000 0000000001"  # the smallest subnormal
    nan = basics.float_bits(math.nan, torch.float16)
    assert nan.exponent == 31 and nan.mantissa != 0 and math.isnan(nan.value())


@pytest.mark.parametrize("dtype", basics.FLOAT_DTYPES, ids=str)
def test_spacing_equals_torch_nextafter(dtype):
    for value in (1.0, 1000.0, 0.1, 6.5e-5, 1e-6, 3.0e4):
        stored = torch.tensor(value, dtype=dtype)
        if stored == 0:
            continue
        gap = (torch.nextafter(stored, torch.tensor(math.inf, dtype=dtype)) - stored).item()
        assert basics.spacing(value, dtype) == gap, (value, dtype)
    with pytest.raises(ValueError, match="not finite"):
        basics.spacing(70000.0, torch.float16)


def test_the_failures_the_notebook_shows():
    assert math.isinf(basics.stored_value(70000.0, torch.float16))
    assert basics.stored_value(70000.0, torch.bfloat16) == 70144.0
    assert basics.stored_value(1e-8, torch.float16) == 0.0
    assert basics.stored_value(1.001, torch.bfloat16) == 1.0
    assert basics.stored_value(1000.3, torch.float16) == 1000.5
