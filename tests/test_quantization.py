"""From-scratch LLM.int8 and NF4 against bitsandbytes 0.50.2 on CPU: same bytes, same scales, same floats."""

import ast
import logging
import warnings
from pathlib import Path

import pytest
import torch

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=r"MatMul8bitLt")

import bitsandbytes as bnb  # noqa: E402
import bitsandbytes.functional as F  # noqa: E402
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

from helpers import environment  # noqa: E402
from helpers import quantization as Q  # noqa: E402

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Flattened sizes that are and are not multiples of the blocksizes, odd counts, a single value, 3-D.
SHAPES = [(64, 64), (3, 96), (2, 3, 33), (7,), (1,), (129,), (4, 320)]
SCALES = [1e-3, 0.02, 1.0, 300.0]


def bnb_nf4(weight, blocksize=64, double_quant=False):
    packed, state = F.quantize_4bit(weight, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)
    return packed, state


def reference_dequantize_4bit(packed, absmax, shape, blocksize, dtype=torch.float32):
    """bitsandbytes' own pure-PyTorch dequantizer (its "default" backend), called without torch.compile."""
    code = F.get_4bit_type("nf4", device="cpu")
    return _dequantize_4bit_compute.__wrapped__(packed.reshape(-1), absmax, code, blocksize, shape, dtype)


def random_weight(shape, scale, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator) * scale).to(dtype)


# ---------------------------------------------------------------------------------------------------- tables


def test_bitsandbytes_recipe_gives_its_nf4_table_exactly():
    table = Q.nf4_levels(Q.BNB_NF4_OFFSET, float32_probabilities=True)
    assert torch.equal(table, F.get_4bit_type("nf4", device="cpu"))  # the table quantize_4bit stores as state.code
    from bitsandbytes.backends.utils import CODE  # the copy the CPU/XPU backends keep

    assert torch.equal(table, CODE["nf4"].cpu())


def test_bitsandbytes_offset_is_the_midpoint_cut_to_7_decimals_and_documented_as_empirical():
    import inspect

    default = inspect.signature(F.create_normal_map).parameters["offset"].default
    assert default == Q.BNB_NF4_OFFSET == round(Q.NF4_MIDPOINT_OFFSET, 7)
    assert "empirically" in F.create_normal_map.__doc__  # what bitsandbytes 0.50.2 says of its origin


def test_midpoint_nf4_levels_shape_and_largest_difference_from_bitsandbytes():
    levels = Q.nf4_levels()
    assert levels.dtype == torch.float32 and levels.shape == (16,)
    assert torch.equal(levels, levels.sort().values)
    assert (levels < 0).sum() == 7 and (levels > 0).sum() == 8 and (levels == 0).sum() == 1
    assert levels[0] == -1 and levels[-1] == 1
    largest = (levels - F.get_4bit_type("nf4", device="cpu")).abs().max().item()
    # Measured: 1.7881393e-07 (1.5 float32 ulps at 1.0), from bitsandbytes writing its offset as 0.9677083 (the
    # midpoint 0.96770833... cut to 7 decimals) and spacing the probabilities in float32.
    assert largest == pytest.approx(1.7881393432617188e-07, rel=1e-6)
    assert largest <= 2 * torch.finfo(torch.float32).eps


def test_decision_boundaries_are_float32_midpoints():
    table = F.get_4bit_type("nf4", device="cpu")
    assert torch.equal(Q.nf4_decision_boundaries(), (table[:-1] + table[1:]) / 2)


def test_fp4_levels_equal_bitsandbytes_table():
    assert torch.equal(Q.fp4_levels(), F.get_4bit_type("fp4", device="cpu"))


def test_dynamic_map_equals_bitsandbytes():
    assert torch.equal(Q.dynamic_8bit_map(), F.create_dynamic_map())


# ---------------------------------------------------------------------------------------------------- NF4


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
def test_quantize_nf4_equals_bitsandbytes(dtype, blocksize):
    for seed, shape in enumerate(SHAPES):
        for scale in SCALES:
            weight = random_weight(shape, scale, dtype, seed)
            packed, absmax = Q.quantize_nf4(weight, blocksize)
            bnb_packed, state = bnb_nf4(weight, blocksize)
            assert packed.dtype == torch.uint8 and packed.dim() == 1 and absmax.dtype == torch.float32
            assert torch.equal(packed, bnb_packed.reshape(-1)), (shape, scale)
            assert torch.equal(absmax, state.absmax), (shape, scale)


def test_quantize_nf4_accepts_non_contiguous_and_grad_weights():
    weight = torch.randn(64, 128).t()
    assert torch.equal(Q.quantize_nf4(weight)[0], bnb_nf4(weight)[0].reshape(-1))
    with_grad = torch.randn(32, 64, requires_grad=True)
    assert torch.equal(Q.quantize_nf4(with_grad)[1], bnb_nf4(with_grad.detach())[1].absmax)


def test_block_of_zeros_and_zero_remainder_block():
    weight = torch.randn(64 * 3 + 10)
    weight[64:128] = 0  # a full block of zeros: absmax 0
    weight[192:] = 0  # the remainder block of zeros: bitsandbytes stores its clamped absmax, 1e-38
    packed, absmax = Q.quantize_nf4(weight)
    bnb_packed, state = bnb_nf4(weight)
    assert torch.equal(packed, bnb_packed.reshape(-1)) and torch.equal(absmax, state.absmax)
    assert absmax[1] == 0 and absmax[3] == torch.tensor(1e-38)
    zero_code = int((Q.nf4_levels() < 0).sum())  # 7: the index of 0.0
    codes = Q.unpack_nf4_codes(packed, weight.numel())
    assert torch.equal(codes[64:128], torch.full((64,), zero_code, dtype=torch.uint8))


@pytest.mark.parametrize("value", [0.37, -0.37, 1e-30, -5e4])
def test_block_with_a_single_non_zero_value(value):
    weight = torch.zeros(2 * 64 + 5)
    weight[70] = value  # full block
    weight[-2] = value  # remainder block
    packed, absmax = Q.quantize_nf4(weight)
    bnb_packed, state = bnb_nf4(weight)
    assert torch.equal(packed, bnb_packed.reshape(-1)) and torch.equal(absmax, state.absmax)
    codes = Q.unpack_nf4_codes(packed, weight.numel())
    assert codes[70] == codes[-2] == (15 if value > 0 else 0)  # the value is its block's absmax: level +-1


def test_subnormal_block_uses_the_clamped_absmax():
    weight = torch.full((64,), 1e-40)  # absmax below 1e-38: scaled by 1/1e-38, not by 1/absmax
    weight[0] = -3e-40
    packed, absmax = Q.quantize_nf4(weight)
    bnb_packed, state = bnb_nf4(weight)
    assert torch.equal(packed, bnb_packed.reshape(-1)) and torch.equal(absmax, state.absmax)


@pytest.mark.parametrize("absmax_value", [1.0, 2.0, 0.25])
def test_values_exactly_at_nf4_midpoints_round_to_the_lower_level(absmax_value):
    boundaries = Q.nf4_decision_boundaries()
    just_above = torch.nextafter(boundaries, torch.tensor(2.0))
    just_below = torch.nextafter(boundaries, torch.tensor(-2.0))
    # Each block: its absmax first, then the 15 midpoints and their neighbours scaled by a power of two, so
    # x * (1 / absmax) (full blocks) and x / absmax (the remainder block) land exactly on the midpoints.
    block = torch.cat([torch.tensor([absmax_value]), boundaries, just_above, just_below]) * 1.0
    block[1:] *= absmax_value
    weight = torch.cat([block, torch.zeros(64 - block.numel()), block])  # one full block, one remainder block
    packed, absmax = Q.quantize_nf4(weight)
    bnb_packed, state = bnb_nf4(weight)
    assert torch.equal(packed, bnb_packed.reshape(-1)) and torch.equal(absmax, state.absmax)
    codes = Q.unpack_nf4_codes(packed, weight.numel()).long()
    lower_levels = torch.arange(15)
    for start in (1, 65):  # the full block and the remainder block
        assert torch.equal(codes[start:start + 15], lower_levels)  # a tie goes to the lower level, both signs
        assert torch.equal(codes[start + 15:start + 30], lower_levels + 1)
        assert torch.equal(codes[start + 30:start + 45], lower_levels)


@pytest.mark.parametrize("absmax_value", [3.0, 0.3, 1.7])
def test_full_blocks_multiply_by_the_reciprocal_and_the_remainder_block_divides(absmax_value):
    # Values a few ulps from absmax * midpoint, kept where x * (1 / absmax) and x / absmax round to different
    # sides of the midpoint: bitsandbytes multiplies in full blocks and divides in the remainder block.
    boundaries, absmax = Q.nf4_decision_boundaries(), torch.tensor(absmax_value)
    near = (boundaries * absmax).unsqueeze(1).view(torch.int32) + torch.arange(-8, 9, dtype=torch.int32)
    near = near.view(torch.float32).reshape(-1)
    by_reciprocal = torch.bucketize(near * (1 / absmax), boundaries)
    by_division = torch.bucketize(near / absmax, boundaries)
    disagreeing = near[by_reciprocal != by_division]
    assert 0 < disagreeing.numel() < 63
    block = torch.cat([absmax.view(1), disagreeing])
    weight = torch.cat([block, torch.zeros(64 - block.numel()), block])
    packed, stored_absmax = Q.quantize_nf4(weight)
    bnb_packed, state = bnb_nf4(weight)
    assert torch.equal(packed, bnb_packed.reshape(-1)) and torch.equal(stored_absmax, state.absmax)
    codes = Q.unpack_nf4_codes(packed, weight.numel()).long()
    count = disagreeing.numel()
    assert torch.equal(codes[1:1 + count], by_reciprocal[by_reciprocal != by_division])
    assert torch.equal(codes[65:65 + count], by_division[by_reciprocal != by_division])


def test_odd_count_pads_with_the_code_of_zero():
    packed, _ = Q.quantize_nf4(torch.ones(3))
    assert packed.tolist() == [0xFF, 0xF7]  # codes 15, 15, 15 and the pad 7 in the last low nibble


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_dequantize_nf4_equals_bitsandbytes_native_cpu_kernel(dtype):
    # Shapes whose rows hold whole blocks (every Llama Linear): bitsandbytes' native CPU kernel applies.
    for seed, (shape, blocksize) in enumerate([((64, 64), 64), ((32, 256), 128), ((4, 2, 128), 32), ((96, 512), 512)]):
        weight = random_weight(shape, 0.05, dtype, seed)
        packed, absmax = Q.quantize_nf4(weight, blocksize)
        bnb_packed, state = bnb_nf4(weight, blocksize)
        ours = Q.dequantize_nf4(packed, absmax, shape, blocksize, dtype=dtype)
        assert ours.shape == shape and ours.dtype == dtype
        assert torch.equal(ours, F.dequantize_4bit(bnb_packed, state))
    assert Q.dequantize_nf4(packed, absmax, shape, blocksize).dtype == torch.float32  # the default


@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
def test_dequantize_nf4_equals_bitsandbytes_reference_for_every_shape(blocksize):
    for seed, shape in enumerate(SHAPES):
        weight = random_weight(shape, 0.05, torch.float32, seed)
        packed, absmax = Q.quantize_nf4(weight, blocksize)
        expected = reference_dequantize_4bit(packed, absmax, shape, blocksize)
        assert torch.equal(Q.dequantize_nf4(packed.reshape(-1, 1), absmax, shape, blocksize), expected), shape


def bitsandbytes_uses_its_avx512_cpu_kernels() -> bool:
    """bitsandbytes' CPU library picks its AVX-512 dequantize kernel from the CPU itself (not from PyTorch's pin)."""
    from bitsandbytes.cextension import lib

    return bool(getattr(lib, "has_avx512f_cpu", lambda: 0)())


@pytest.mark.skipif(bnb.__version__ != "0.50.2", reason="documents a quirk of bitsandbytes 0.50.2's CPU kernel")
@pytest.mark.skipif(not bitsandbytes_uses_its_avx512_cpu_kernels(),
                    reason="the quirk belongs to bitsandbytes' AVX-512 CPU kernel, which this CPU does not run")
def test_bitsandbytes_native_cpu_dequantize_assumes_rows_of_whole_blocks():
    # When a block spans two rows (in_features not a multiple of the blocksize), bitsandbytes 0.50.2's native CPU
    # dequantize_4bit reads absmax[row * (in_features // blocksize) + column // blocksize], which disagrees
    # with its own flat quantizer; dequantize_nf4 follows the quantizer (and the reference path) instead.
    weight = torch.randn(3, 96)
    packed, absmax = Q.quantize_nf4(weight)
    bnb_packed, state = bnb_nf4(weight)
    native = F.dequantize_4bit(bnb_packed, state)
    codes = Q.unpack_nf4_codes(packed, weight.numel()).view(3, 96).long()
    row_major_index = torch.arange(3)[:, None] * (96 // 64) + torch.arange(96)[None] // 64
    assert torch.equal(native, Q.nf4_levels(Q.BNB_NF4_OFFSET, True)[codes] * absmax[row_major_index])
    assert not torch.equal(native, Q.dequantize_nf4(packed, absmax, (3, 96)))


@pytest.mark.skipif(bnb.__version__ != "0.50.2", reason="documents bitsandbytes 0.50.2's CPU kernels")
@pytest.mark.skipif(bitsandbytes_uses_its_avx512_cpu_kernels(),
                    reason="on an AVX-512 CPU bitsandbytes runs the kernel of the quirk above instead")
def test_bitsandbytes_cpu_dequantize_without_avx512_follows_the_flat_quantizer():
    # Without AVX-512, bitsandbytes' CPU dequantize_4bit indexes absmax by the flat position, as its quantizer does,
    # so it agrees with dequantize_nf4 even when a block spans two rows; a 1-D input comes back shaped (1, n).
    weight = torch.randn(3, 96, generator=torch.Generator().manual_seed(0))
    packed, absmax = Q.quantize_nf4(weight)
    bnb_packed, state = bnb_nf4(weight)
    assert torch.equal(F.dequantize_4bit(bnb_packed, state), Q.dequantize_nf4(packed, absmax, (3, 96)))
    flat_packed, flat_state = bnb_nf4(weight.reshape(-1))
    assert F.dequantize_4bit(flat_packed, flat_state).shape == (1, weight.numel())


def test_round_trip_error_is_bounded_by_half_the_widest_gap():
    weight = random_weight((128, 256), 0.02, torch.float32, 0)
    packed, absmax = Q.quantize_nf4(weight)
    rebuilt = Q.dequantize_nf4(packed, absmax, weight.shape)
    widest_gap = Q.nf4_levels().diff().max()
    per_block_bound = (absmax * widest_gap / 2).repeat_interleave(64).view(weight.shape)
    assert bool(((rebuilt - weight).abs() <= per_block_bound * (1 + 1e-6)).all())


# ------------------------------------------------------------------------------------------ double quantization


@pytest.mark.parametrize("numel", [64 * 5, 64 * 256, 64 * 256 * 2 + 64 * 37 + 11])
def test_double_quantization_equals_bitsandbytes_nested_state(numel):
    weight = random_weight((numel,), 0.02, torch.float32, numel)
    weight[: 64 * 3] *= 40  # a few large blocks: the nested codes then span the map
    _, absmax = Q.quantize_nf4(weight)
    nested = Q.double_quantize_absmax(absmax)
    bnb_packed, state = bnb_nf4(weight, double_quant=True)
    assert state.nested and state.state2.blocksize == 256
    assert torch.equal(nested.codes, state.absmax)  # uint8, one per 4-bit block
    assert torch.equal(nested.scales, state.state2.absmax)  # float32, one per 256 blocks
    assert torch.equal(nested.offset, state.offset)  # the mean, a 0-d float32 tensor
    assert torch.equal(state.state2.code, Q.dynamic_8bit_map())
    rebuilt = Q.dequantize_absmax(*nested)
    assert torch.equal(rebuilt, F.dequantize_blockwise(state.absmax, state.state2) + state.offset)
    if numel % 64 == 0 and numel > 64 * 5:  # rows of whole blocks: the native CPU kernel applies
        assert torch.equal(Q.dequantize_nf4(Q.quantize_nf4(weight)[0], rebuilt, (numel,)),
                           F.dequantize_4bit(bnb_packed, state).reshape(-1))


def test_double_quantization_of_equal_absmax_gives_a_zero_nested_block():
    weight = torch.ones(64 * 10)  # every block has absmax 1: centred absmax is all zeros
    _, absmax = Q.quantize_nf4(weight)
    nested = Q.double_quantize_absmax(absmax)
    _, state = bnb_nf4(weight, double_quant=True)
    assert torch.equal(nested.codes, state.absmax) and torch.equal(nested.scales, state.state2.absmax)
    assert torch.equal(Q.dequantize_absmax(*nested), absmax)


@pytest.mark.parametrize("blocksize2", [64, 512])
def test_double_quantization_other_blocksizes_equal_bitsandbytes_blockwise(blocksize2):
    absmax = torch.rand(1000) * 0.1
    nested = Q.double_quantize_absmax(absmax, blocksize=blocksize2)
    codes, state2 = F.quantize_blockwise(absmax - absmax.mean(), blocksize=blocksize2)
    assert torch.equal(nested.codes, codes) and torch.equal(nested.scales, state2.absmax)
    assert torch.equal(Q.dequantize_absmax(*nested, blocksize=blocksize2),
                       F.dequantize_blockwise(codes, state2) + absmax.mean())


def test_bits_per_parameter_matches_bitsandbytes_storage():
    weight = torch.randn(64 * 256 * 2)  # whole nested blocks, so per-block shares are exact
    packed, plain = bnb_nf4(weight)
    _, nested = bnb_nf4(weight, double_quant=True)
    plain_bits = 8 * (packed.numel() + plain.absmax.numel() * plain.absmax.element_size()) / weight.numel()
    nested_bits = 8 * (packed.numel() + nested.absmax.numel() + nested.state2.absmax.numel() * 4) / weight.numel()
    assert Q.bits_per_parameter() == plain_bits == 4.5
    assert Q.bits_per_parameter(double_quant=True) == nested_bits == 4 + 8 / 64 + 32 / (64 * 256)
    assert round(Q.bits_per_parameter(double_quant=True), 3) == 4.127
    assert Q.bits_per_parameter(blocksize=128) == 4.25


# ---------------------------------------------------------------------------------------------------- LLM.int8


def bnb_linear8bit(weight: torch.Tensor) -> bnb.nn.Linear8bitLt:
    layer = bnb.nn.Linear8bitLt(weight.shape[1], weight.shape[0], bias=False, has_fp16_weights=False)
    layer.weight = bnb.nn.Int8Params(weight.clone(), requires_grad=False, has_fp16_weights=False)
    return layer.to("cpu")  # the move is what quantizes


@pytest.mark.parametrize("dtype", FLOAT_DTYPES + [torch.float64], ids=str)
def test_int8_rowwise_equals_linear8bitlt(dtype):
    for seed, shape in enumerate([(64, 64), (3, 97), (1, 5), (130, 33)]):
        for scale in SCALES:
            weight = random_weight(shape, scale, dtype, seed)
            values, scales = Q.quantize_int8_rowwise(weight)
            stored_values, stored_scales = Q.int8_storage_of(bnb_linear8bit(weight))
            assert values.dtype == torch.int8 and scales.dtype == torch.float32 and scales.shape == shape[:1]
            assert torch.equal(values, stored_values), (shape, scale)
            assert torch.equal(scales, stored_scales), (shape, scale)


def test_int8_zero_row_ties_and_float16_rounding():
    weight = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5],  # scale 127: halves round to even
                           [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # a zero row: scale 0, values 0
                           [1.0001, 1e-8, -3.0, 2.0, 0.1, 0.7]])  # float32 values float16 cannot hold
    values, scales = Q.quantize_int8_rowwise(weight)
    stored_values, stored_scales = Q.int8_storage_of(bnb_linear8bit(weight))
    assert torch.equal(values, stored_values) and torch.equal(scales, stored_scales)
    assert values[0].tolist() == [127, 0, 2, 2, 0, -2] and values[1].abs().sum() == 0 and scales[1] == 0


def test_dequantize_int8_equals_bitsandbytes():
    values, scales = Q.quantize_int8_rowwise(random_weight((40, 72), 0.05, torch.float32, 3))
    assert torch.equal(Q.dequantize_int8_rowwise(values, scales), F.int8_vectorwise_dequant(values, scales))


def test_int8_storage_moves_to_the_matmul_state_after_the_first_forward():
    weight = random_weight((64, 64), 0.05, torch.float32, 4)
    layer = bnb_linear8bit(weight)
    with torch.no_grad():
        layer(torch.randn(2, 64, dtype=torch.float16))
    assert layer.weight.CB is None and layer.weight.SCB is None  # moved to layer.state
    values, scales = Q.int8_storage_of(layer)
    assert torch.equal(values, Q.quantize_int8_rowwise(weight)[0]) and torch.equal(values, layer.weight.data)


def test_nf4_storage_is_repacked_by_the_first_cpu_forward():
    weight = random_weight((64, 128), 0.05, torch.float32, 5)
    layer = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                              compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=True, module=layer)
    layer = layer.to("cpu").eval()
    stored = Q.nf4_storage_of(layer)
    packed, absmax = Q.quantize_nf4(weight)
    assert torch.equal(stored.packed, packed) and torch.equal(stored.absmax, Q.dequantize_absmax(
        *Q.double_quantize_absmax(absmax)))
    if not F.has_avx512bf16():
        pytest.skip("bitsandbytes repacks for its CPU kernel only on CPUs with AVX512-BF16")
    with torch.no_grad():
        layer(torch.randn(2, 128))
    state = layer.weight.quant_state
    assert state.packing_format_for_cpu and not state.nested
    assert state.absmax.dtype == torch.bfloat16 and state.absmax.shape == (128 // 64, 64)  # (blocks per row, rows)
    assert layer.weight.shape == (64, 128 // 2)
    with pytest.raises(ValueError, match="before running the model"):
        Q.nf4_storage_of(layer)


# ---------------------------------------------------------------------------------------------------- a real model


@pytest.fixture(scope="module")
def saved_tiny_llama(tmp_path_factory):
    config = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=192, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)  # stored bfloat16, like the course's checkpoint
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    return folder, {name: module.weight.detach().clone() for name, module in model.named_modules()
                    if isinstance(module, torch.nn.Linear) and name != "lm_head"}


def test_transformers_8bit_load_stores_our_int8(saved_tiny_llama):
    folder, weights = saved_tiny_llama
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    for name, weight in weights.items():
        values, scales = Q.int8_storage_of(model.get_submodule(name))
        ours_values, ours_scales = Q.quantize_int8_rowwise(weight)
        assert torch.equal(values, ours_values) and torch.equal(scales, ours_scales), name


def test_transformers_nf4_double_quant_load_stores_our_nf4(saved_tiny_llama):
    folder, weights = saved_tiny_llama
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config)
    for name, weight in weights.items():
        stored = Q.nf4_storage_of(model.get_submodule(name))
        packed, absmax = Q.quantize_nf4(weight, stored.blocksize)
        nested = Q.double_quantize_absmax(absmax)
        assert stored.quant_type == "nf4" and stored.shape == weight.shape
        assert torch.equal(stored.packed, packed), name
        assert all(torch.equal(a, b) for a, b in zip(stored.nested, nested)), name


# ---------------------------------------------------------------------------------------------------- speed


def test_quantize_nf4_is_at_most_one_and_a_half_times_bitsandbytes():
    weight = random_weight((4096, 4096), 0.02, torch.float32, 0)
    timing = Q.time_against_bitsandbytes(weight, repeats=2)
    assert timing.identical
    assert timing.ratio <= 1.5, timing


def test_module_does_not_import_bitsandbytes_at_import_time():
    # Notebooks quiet bitsandbytes' import-time log line before the first import: importing helpers must not do it.
    tree = ast.parse(Path(Q.__file__).read_text())
    top_level_imports = [alias.name for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))
                         for alias in node.names] + [node.module for node in tree.body
                                                     if isinstance(node, ast.ImportFrom) and node.module]
    assert not any(name.startswith("bitsandbytes") for name in top_level_imports)


# ---------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("call,message", [
    (lambda: Q.quantize_nf4(torch.arange(64)), "floating-point"),
    (lambda: Q.quantize_nf4(torch.ones(64, dtype=torch.bool)), "floating-point"),
    (lambda: Q.quantize_nf4(torch.ones(64, dtype=torch.float64)), "weight.float"),
    (lambda: Q.quantize_nf4(torch.empty(0, 64)), "empty"),
    (lambda: Q.quantize_nf4(torch.ones(64), blocksize=48), "blocksize 48"),
    (lambda: Q.quantize_nf4(torch.ones(64), blocksize=16), "use one of"),
    (lambda: Q.quantize_nf4(torch.ones(64), blocksize=True), "blocksize True"),
    (lambda: Q.quantize_nf4(torch.ones(64), blocksize="64"), "blocksize '64'"),
    (lambda: Q.quantize_nf4(torch.tensor([1.0, float("nan")])), "NaN"),
    (lambda: Q.quantize_nf4(torch.tensor([1.0, float("inf")])), "isfinite"),
    (lambda: Q.quantize_nf4(torch.ones(64, device="meta")), "weight.cpu"),
    (lambda: Q.quantize_int8_rowwise(torch.ones(64)), "2-D"),
    (lambda: Q.quantize_int8_rowwise(torch.ones(2, 3, 4)), "reshape"),
    (lambda: Q.quantize_int8_rowwise(torch.ones(4, 4, dtype=torch.int32)), "floating-point"),
    (lambda: Q.quantize_int8_rowwise(torch.empty(0, 4)), "empty"),
    (lambda: Q.quantize_int8_rowwise(torch.full((2, 2), 1e5)), "float16's range"),
    (lambda: Q.dequantize_int8_rowwise(torch.ones(2, 2), torch.ones(2)), "int8"),
    (lambda: Q.dequantize_int8_rowwise(torch.ones(2, 2, dtype=torch.int8), torch.ones(3)), "one float32 scale"),
    (lambda: Q.dequantize_nf4(torch.zeros(32, dtype=torch.uint8), torch.ones(1), (66,)), "shape"),
    (lambda: Q.dequantize_nf4(torch.zeros(32, dtype=torch.uint8), torch.ones(1), (8, 9)), "packed bytes"),
    (lambda: Q.dequantize_nf4(torch.zeros(32, dtype=torch.uint8), torch.ones(2), (64,)), "one value per block"),
    (lambda: Q.dequantize_nf4(torch.zeros(32, dtype=torch.uint8), torch.ones(1).half(), (64,)), "float32"),
    (lambda: Q.dequantize_nf4(torch.zeros(32, dtype=torch.int8), torch.ones(1), (64,)), "uint8"),
    (lambda: Q.dequantize_nf4(torch.zeros(32, dtype=torch.uint8), torch.ones(1), (64,), blocksize=100), "blocksize"),
    (lambda: Q.dequantize_nf4(torch.zeros(32, dtype=torch.uint8), torch.ones(1), (64,), dtype=torch.int8), "dtype"),
    (lambda: Q.dequantize_nf4(torch.zeros(32, dtype=torch.uint8), torch.ones(1), "sixty-four"), "shape"),
    (lambda: Q.unpack_nf4_codes(torch.zeros(4, dtype=torch.uint8), 9), "shape"),
    (lambda: Q.double_quantize_absmax(torch.ones(4, 4)), "1-D float32"),
    (lambda: Q.double_quantize_absmax(torch.ones(0)), "empty"),
    (lambda: Q.double_quantize_absmax(torch.ones(8), blocksize=100), "blocksize"),
    (lambda: Q.double_quantize_absmax(torch.tensor([1.0, float("nan")])), "NaN"),
    (lambda: Q.dequantize_absmax(torch.zeros(300, dtype=torch.uint8), torch.ones(1), 0.0), "2 float32 scales"),
    (lambda: Q.dequantize_absmax(torch.zeros(3, dtype=torch.float32), torch.ones(1), 0.0), "uint8"),
    (lambda: Q.dequantize_absmax(torch.zeros(3, dtype=torch.uint8), torch.ones(1), torch.ones(2)), "one offset"),
    (lambda: Q.bits_per_parameter(blocksize=60), "blocksize"),
    (lambda: Q.bits_per_parameter(double_quant=True, blocksize2=32), "blocksize2"),
    (lambda: Q.time_against_bitsandbytes(torch.ones(64), repeats=0), "repeats"),
    (lambda: Q.nf4_storage_of(torch.nn.Linear(4, 4)), "Linear4bit"),
    (lambda: Q.int8_storage_of(torch.nn.Linear(4, 4)), "Linear8bitLt"),
])
def test_bad_input_raises_value_error_naming_the_problem(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_non_tensor_weight_raises_type_error():
    with pytest.raises(TypeError, match="torch.tensor"):
        Q.quantize_nf4([1.0, 2.0])


# ------------------------------------------------------------------------------------ from-scratch codes vs stored


def test_compare_codes_is_exact_on_the_cpu():
    ours = torch.tensor([[1, -3], [127, 0]], dtype=torch.int8)
    same = Q.compare_codes(ours, ours.clone(), "int8", "cpu")
    assert same.exact and same.within_tolerance and same.describe() == "0 of 4 codes differ (cpu: exactly)"
    off_by_one = Q.compare_codes(ours, ours + torch.tensor([[0, 1], [0, 0]], dtype=torch.int8), "int8", "cpu")
    assert (off_by_one.n_different, off_by_one.max_step, off_by_one.within_tolerance) == (1, 1, False)


def test_compare_codes_allows_the_documented_cuda_share_one_step_away():
    ours = torch.zeros(1_000_000, dtype=torch.int8)
    few = ours.clone()
    few[:10] = 1  # 10 per million, each one step: within int8's 1e-5
    assert Q.compare_codes(ours, few, "int8", "cuda").within_tolerance
    many = ours.clone()
    many[:11] = 1
    assert not Q.compare_codes(ours, many, "int8", "cuda").within_tolerance
    two_steps = ours.clone()
    two_steps[0] = 2
    assert not Q.compare_codes(ours, two_steps, "int8", "cuda").within_tolerance
    scales = torch.zeros(1000, dtype=torch.uint8)
    scales_off = scales.clone()
    scales_off[:2] = 1  # 0.2%: no share is allowed for double quantization, which is emulated exactly
    assert not Q.compare_codes(scales, scales_off, "absmax-8bit", "cuda").within_tolerance
    assert not Q.compare_codes(scales, scales_off, "nf4", "cuda").within_tolerance
    tippable = torch.zeros(1000, dtype=torch.bool)
    tippable[:2] = True
    assert Q.compare_codes(scales, scales_off, "absmax-8bit", "cuda", ambiguous=tippable).within_tolerance


@pytest.mark.parametrize("call,error,message", [
    (lambda: Q.compare_codes(torch.zeros(3, dtype=torch.int8), torch.zeros(3, dtype=torch.int8), "int4", "cpu"),
     ValueError, "Unknown kind of code 'int4'"),
    (lambda: Q.compare_codes(torch.zeros(3, dtype=torch.int8), torch.zeros(3, dtype=torch.int8), "int8", "mps"),
     ValueError, "device_type must be"),
    (lambda: Q.compare_codes(torch.zeros(3), torch.zeros(3, dtype=torch.int8), "int8", "cpu"),
     TypeError, "integer codes; ours is torch.float32"),
    (lambda: Q.compare_codes(torch.zeros(3, dtype=torch.int8), torch.zeros(4, dtype=torch.int8), "int8", "cpu"),
     ValueError, r"equal shapes, got \(3,\) and \(4,\)"),
])
def test_compare_codes_refuses_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_dequantize_absmax_stays_on_the_codes_device_and_refuses_mixed_devices():
    absmax = random_weight((4096,), 0.05, torch.float32, 11).abs() + 0.01
    codes, scales, offset = Q.double_quantize_absmax(absmax)
    on_meta = Q.dequantize_absmax(codes.to("meta"), scales.to("meta"), offset.to("meta"))
    assert on_meta.device.type == "meta" and on_meta.shape == absmax.shape  # no CPU table mixed in
    with pytest.raises(ValueError, match="one device"):
        Q.dequantize_absmax(codes, scales.to("meta"), offset)


# ----------------------------------------------------------------------------------------------------------
# The int8 matmul: exact integer products, and what a saturating kernel does (issue 18)
# ----------------------------------------------------------------------------------------------------------


def test_bitsandbytes_int8_matmul_is_exact_under_the_course_pins():
    check = Q.int8_matmul_check("cpu")
    assert check.exact and check.products == 16 * 16 and check.largest_error == 0
    assert "float32 matmul of the int8 codes" in check.kernel  # PyTorch's capability is pinned at AVX2


def test_the_saturating_emulation_is_wrong_on_the_largest_products_and_exact_on_small_ones():
    a, b = Q.int8_probe_operands()
    check = Q.int8_matmul_check(matmul=Q.saturating_int8_matmul, kernel="16-bit pairs")
    assert not check.exact and check.describe().startswith("16-bit pairs: 256 products, ")
    # one row of +127 against one weight row of +127: every pair is 255 * 127 * 2 = 64,770, clipped to 32,767
    assert int(Q.saturating_int8_matmul(a[:1], b[:1])) == 128 * 32767 - 128 * 127 * 256
    small = torch.tensor([[1, -2, 3, 4]], dtype=torch.int8)
    assert torch.equal(Q.saturating_int8_matmul(small, small), (small.long() @ small.long().T).int())
    with pytest.raises(ValueError, match="even number of columns"):
        Q.saturating_int8_matmul(small[:, :3], small[:, :3])
    with pytest.raises(ValueError, match="2-D int8"):
        Q.saturating_int8_matmul(small.float(), small)


@pytest.mark.skipif(not torch.cpu._is_avx512_supported(),
                    reason="bitsandbytes calls torch._int_mm only under PyTorch's AVX512 kernels, on AVX-512 CPUs")
def test_torch_int_mm_under_onednn_avx2_is_the_saturating_kernel_bit_for_bit():
    import os

    assert os.environ["ONEDNN_MAX_CPU_ISA"] == "AVX2"  # the course's pin, set when helpers was imported
    a, b = Q.int8_probe_operands()
    assert torch.equal(torch._int_mm(a, b.t()), Q.saturating_int8_matmul(a, b))
    assert not torch.equal(torch._int_mm(a, b.t()).long(), a.long() @ b.long().T)


@pytest.mark.skipif(not torch.cpu._is_avx512_supported(), reason="PyTorch's AVX512 kernels need an AVX-512 CPU")
def test_an_incoherent_override_is_refused_before_an_int8_load_and_a_coherent_one_is_exact():
    import subprocess
    import sys

    script = ("import helpers\nfrom helpers import environment, models, profiles, quantization\n"
              "print(quantization.int8_matmul_check().exact)\n"
              "models.load_model(profiles.PROFILES['tiny'], 'int8', environment.CPU)\nprint('loaded')\n")
    root = Path(__file__).resolve().parents[1]
    base = {k: v for k, v in __import__("os").environ.items() if k not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")}
    broken = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True,
                            env={**base, "ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert broken.returncode != 0 and broken.stdout.split()[:1] == ["False"]
    assert "wrong integer products" in broken.stderr and "ONEDNN_MAX_CPU_ISA=AVX2" in broken.stderr
    coherent = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True,
                              env={**base, "ATEN_CPU_CAPABILITY": "avx512"})
    assert coherent.returncode == 0 and coherent.stdout.split() == ["True", "loaded"], coherent.stderr


def test_int8_probe_operands_and_kernel_names_refuse_bad_input():
    with pytest.raises(ValueError, match="even number of columns"):
        Q.int8_probe_operands(columns=7)
    with pytest.raises(ValueError, match="'cpu' or 'cuda'"):
        Q.int8_matmul_kernel("tpu")
    assert "CUDA" in Q.int8_matmul_kernel("cuda")


def _one_search_in_plain_python(x: float, code: list[float]) -> int:
    """bitsandbytes' dQuantize<0> written out for one value, step by step, with float32 rounding of the midpoints."""
    import numpy as np

    f32 = np.float32
    x, pivot, lower_pivot, upper_pivot, lower, upper = f32(x), 127, 0, 255, f32(-1.0), f32(1.0)
    value = f32(code[pivot])
    for step in (64, 32, 16, 8, 4, 2, 1):
        if x > value:
            lower_pivot, lower, pivot = pivot, value, pivot + step
        else:
            upper_pivot, upper, pivot = pivot, value, pivot - step
        value = f32(code[pivot])
    upper = f32(code[255]) if upper_pivot == 255 else upper
    lower = f32(code[0]) if lower_pivot == 0 else lower
    if x > value:
        return upper_pivot if x > (upper + value) * f32(0.5) else pivot
    return lower_pivot if x < (lower + value) * f32(0.5) else pivot


def test_the_cuda_binary_search_emulation_matches_the_kernel_step_by_step_and_finds_every_map_value():
    from helpers.quantization import _dynamic_map_and_lookup, dynamic_codes_by_binary_search

    code = _dynamic_map_and_lookup()[0]
    values = torch.cat([environment.portable_randn(2000, seed=5).clamp(-1, 1), code, torch.tensor([-1.0, 0.0, 1.0])])
    ours = dynamic_codes_by_binary_search(values, code)
    assert ours.tolist() == [_one_search_in_plain_python(v, code.tolist()) for v in values.tolist()]
    found = dynamic_codes_by_binary_search(code, code)
    assert torch.equal(code[found.long()], code)  # every map value maps to itself (the map has one zero twice)
    nearest = (values[:, None] - code[None, :]).abs().argmin(dim=1)
    assert torch.equal(code[ours.long()], code[nearest])  # the search ends at a nearest map value
    with pytest.raises(ValueError, match="256 float32 values"):
        dynamic_codes_by_binary_search(values, code[:255])


def test_cuda_double_quantization_differs_from_the_cpus_and_only_tipping_points_are_ambiguous():
    from helpers.quantization import (compare_codes, cuda_ambiguous_absmax_codes, cuda_double_quantize_absmax,
                                      double_quantize_absmax)

    absmax = environment.portable_randn(4096, seed=7).abs() + 0.01
    cpu, cuda = double_quantize_absmax(absmax), cuda_double_quantize_absmax(absmax)
    assert torch.equal(cpu.scales, cuda.scales) and torch.equal(cpu.offset, cuda.offset)
    assert 0 < int((cpu.codes != cuda.codes).sum()) < 4096 // 20  # lookup table against binary search
    ambiguous = cuda_ambiguous_absmax_codes(absmax)
    assert ambiguous.dtype == torch.bool and int(ambiguous.sum()) < 4096 // 100
    exact = compare_codes(cuda.codes, cuda.codes, "absmax-8bit", "cuda", ambiguous=ambiguous)
    assert exact.within_tolerance and exact.exact and "exact emulation" in exact.describe()
    tipped = cuda.codes.clone()
    where = ambiguous.nonzero()[:1, 0] if ambiguous.any() else torch.tensor([], dtype=torch.long)
    tipped[where] += 1
    assert compare_codes(tipped, cuda.codes, "absmax-8bit", "cuda", ambiguous=ambiguous).within_tolerance
    elsewhere = cuda.codes.clone()
    elsewhere[(~ambiguous).nonzero()[0, 0]] += 1  # one code off where exact arithmetic decides it
    assert not compare_codes(elsewhere, cuda.codes, "absmax-8bit", "cuda", ambiguous=ambiguous).within_tolerance
    with pytest.raises(ValueError, match="CUDA kernel's codes only"):
        compare_codes(cuda.codes, cuda.codes, "absmax-8bit", "cpu", ambiguous=ambiguous)
    shifted = cuda_double_quantize_absmax(absmax, offset=cpu.offset + 1e-3)  # the stored offset is used as given
    assert torch.equal(shifted.offset, cpu.offset + 1e-3)


def test_int8_codes_the_cuda_kernel_may_tip_are_exactly_the_near_ties_of_a_bfloat16_checkpoint():
    from helpers.quantization import compare_codes, cuda_ambiguous_int8_codes, quantize_int8_rowwise

    # a bfloat16 checkpoint cast to float16: values with 8 significant bits, so val * 127 / absmax often lands
    # exactly on a half-integer when absmax is a power of two times 127's divisors
    weight = environment.portable_randn(64, 256, seed=11).clamp(-1.9, 1.9).to(torch.bfloat16).to(torch.float16)
    weight[:, 0] = 2.0  # every row's absmax 2: then val * 63.5 is an exact half-integer for many values
    values, scales = quantize_int8_rowwise(weight)
    exact = weight.float() * (127 / 2.0)
    ties = (exact - exact.floor() == 0.5)
    ambiguous = cuda_ambiguous_int8_codes(weight)
    assert ties.sum() > 20 and bool(ambiguous[ties].all())  # every exact tie may go either way on CUDA
    assert ambiguous.float().mean() < 0.1  # and little else: near-ties only
    far = ~ambiguous
    assert torch.equal(torch.round(exact * (1 + 3 * 2.0 ** -23))[far], values.float()[far])  # far from ties, stable
    tipped = values.clone()
    tipped[ties] += torch.where(values[ties] < 127, 1, -1).to(torch.int8)  # the kernel rounding the other way
    assert compare_codes(tipped, values, "int8", "cuda", ambiguous=ambiguous).within_tolerance
    assert not compare_codes(tipped, values, "int8", "cuda").within_tolerance  # the old share rule: too strict here
    with pytest.raises(ValueError, match="2-D weight"):
        cuda_ambiguous_int8_codes(weight[0])
