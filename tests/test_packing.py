"""helpers.packing: exact bytes, round trips, every bad input, and bitsandbytes' own 4-bit bytes."""

import math

import bitsandbytes.functional as bnb_functional
import pytest
import torch

from helpers.packing import (
    PackingBenchmark,
    benchmark_packing,
    pack_bitsandbytes_4bit,
    pack_weights,
    pack_weights_loop,
    unpack_bitsandbytes_4bit,
    unpack_weights,
)

ALL_BITS = (1, 2, 4, 8)
ORDERS = ("low_first", "high_first")


def random_codes(shape, bits, seed=0, dtype=torch.uint8):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**bits, shape, generator=generator).to(dtype)


# --- exact bytes worked out by hand -------------------------------------------------------------------


def test_two_bit_example_worked_by_hand():
    values = torch.tensor([[1, 2, 3, 0, 3], [0, 0, 0, 1, 2]], dtype=torch.uint8)
    # Row 0, first byte: 1 | 2 << 2 | 3 << 4 | 0 << 6 = 0b00_11_10_01 = 57; second: 3 plus three zero pads.
    # Row 1: 0 | 0 | 0 | 1 << 6 = 64; then 2.
    expected = torch.tensor([[0b00111001, 0b00000011], [0b01000000, 0b00000010]], dtype=torch.uint8)
    assert torch.equal(pack_weights(values, 2), expected)
    # high_first puts the first value in bits 7-6: 1 << 6 | 2 << 4 | 3 << 2 | 0 = 108; 3 << 6 = 192.
    assert pack_weights(values, 2, order="high_first")[0].tolist() == [0b01101100, 0b11000000]
    assert torch.equal(unpack_weights(expected, 2, count=5), values)


def test_four_and_one_bit_examples_worked_by_hand():
    assert pack_weights(torch.tensor([0x3, 0xA, 0xF]), 4).tolist() == [0xA3, 0x0F]
    assert pack_weights(torch.tensor([0x3, 0xA, 0xF]), 4, order="high_first").tolist() == [0x3A, 0xF0]
    bits = torch.tensor([1, 0, 1, 1, 0, 0, 0, 1, 1])
    assert pack_weights(bits, 1).tolist() == [0b10001101, 0b00000001]
    assert pack_weights(bits, 1, order="high_first").tolist() == [0b10110001, 0b10000000]
    assert pack_weights(torch.tensor([7, 200]), 8).tolist() == [7, 200]


def test_packed_shape_and_dtype():
    packed = pack_weights(random_codes((3, 4, 9), 2), 2)
    assert packed.dtype == torch.uint8
    assert packed.shape == (3, 4, 3)


# --- round trips -------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("bits", ALL_BITS)
def test_round_trip_random_shapes(bits, order):
    generator = torch.Generator().manual_seed(bits)
    shapes = [(1,), (8,), (1, 1)] + [
        tuple(int(d) for d in torch.randint(1, 20, (int(torch.randint(1, 4, (1,), generator=generator)),),
                                            generator=generator))
        for _ in range(6)
    ]
    for index, shape in enumerate(shapes):
        values = random_codes(shape, bits, seed=index)
        packed = pack_weights(values, bits, order=order)
        assert packed.shape[-1] == math.ceil(shape[-1] / (8 // bits))
        assert torch.equal(unpack_weights(packed, bits, count=shape[-1], order=order), values), shape


@pytest.mark.parametrize("bits", (1, 2, 4))
def test_round_trip_spanning_several_chunks(bits):
    values = random_codes((3, 700_001), bits, seed=1)  # 2.1 MB: more than one chunk, odd length
    packed = pack_weights(values, bits)
    assert torch.equal(unpack_weights(packed, bits, count=values.shape[-1]), values)


@pytest.mark.parametrize("dtype", (torch.int8, torch.int16, torch.int32, torch.int64))
def test_wider_integer_dtypes_pack_like_uint8(dtype):
    values = random_codes((5, 11), 4, seed=2)
    assert torch.equal(pack_weights(values.to(dtype), 4), pack_weights(values, 4))


def test_non_contiguous_and_offset_inputs():
    values = random_codes((6, 10), 4, seed=3)
    transposed = values.t()
    assert torch.equal(pack_weights(transposed, 4), pack_weights(transposed.contiguous(), 4))
    offset = values.reshape(-1)[1:9]  # storage offset 1: not aligned to a 2-byte word
    assert torch.equal(pack_weights(offset, 4), pack_weights(offset.clone(), 4))


def test_empty_tensors():
    assert pack_weights(torch.zeros(3, 0, dtype=torch.uint8), 4).shape == (3, 0)
    assert unpack_weights(torch.zeros(0, 2, dtype=torch.uint8), 4).shape == (0, 4)


def test_unpack_without_count_returns_every_slot():
    packed = pack_weights(torch.tensor([1, 2, 3]), 2)
    assert unpack_weights(packed, 2).tolist() == [1, 2, 3, 0]


def test_pack_8_bit_never_aliases_input():
    values = torch.tensor([1, 2, 3], dtype=torch.uint8)
    packed = pack_weights(values, 8)
    packed[0] = 9
    assert values[0] == 1


def test_loop_matches_vectorized():
    for bits in ALL_BITS:
        values = random_codes((3, 13), bits, seed=bits)
        assert torch.equal(pack_weights_loop(values, bits), pack_weights(values, bits))


# --- bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", (0, 3, 5, 16, 4.0, "4", True))
def test_unsupported_bits(bits):
    with pytest.raises(ValueError, match="not supported: choose one of"):
        pack_weights(torch.tensor([1]), bits)
    with pytest.raises(ValueError, match="not supported: choose one of"):
        unpack_weights(torch.tensor([1], dtype=torch.uint8), bits)


def test_unknown_order():
    with pytest.raises(ValueError, match="order='msb' is unknown"):
        pack_weights(torch.tensor([1]), 4, order="msb")
    with pytest.raises(ValueError, match="order='msb' is unknown"):
        unpack_weights(torch.tensor([1], dtype=torch.uint8), 4, order="msb")


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16, torch.float64))
def test_floating_point_values_rejected(dtype):
    with pytest.raises(ValueError, match="floating-point dtype.*Quantize first"):
        pack_weights(torch.tensor([1.0, 2.0], dtype=dtype), 4)


@pytest.mark.parametrize("dtype", (torch.bool, torch.uint16, torch.complex64))
def test_other_dtypes_rejected(dtype):
    with pytest.raises(ValueError, match="dtype"):
        pack_weights(torch.zeros(4, dtype=dtype), 4)


def test_non_tensor_and_zero_dim_rejected():
    with pytest.raises(TypeError, match="torch.Tensor"):
        pack_weights([1, 2], 4)
    with pytest.raises(ValueError, match="0-dimensional.*reshape\\(1\\)"):
        pack_weights(torch.tensor(3), 4)
    with pytest.raises(ValueError, match="0-dimensional"):
        unpack_weights(torch.tensor(3, dtype=torch.uint8), 4)


@pytest.mark.parametrize("bits", (1, 2, 4))
def test_too_large_value_rejected_never_masked(bits):
    values = torch.zeros(2, 9, dtype=torch.uint8)
    values[1, 7] = 2**bits  # one past the largest code: masking it would silently turn it into 0
    with pytest.raises(ValueError, match=rf"values\[1, 7\] = {2**bits} does not fit in {bits} bits"):
        pack_weights(values, bits)
    with pytest.raises(ValueError, match="does not fit"):
        pack_weights(values.to(torch.int64), bits)


def test_too_large_value_in_a_later_chunk_rejected():
    values = torch.zeros(3_000_000, dtype=torch.uint8)
    values[-1] = 16
    with pytest.raises(ValueError, match=r"values\[2999999\] = 16 does not fit in 4 bits"):
        pack_weights(values, 4)


def test_too_large_for_a_byte_rejected_at_8_bits():
    with pytest.raises(ValueError, match=r"values\[1\] = 256 does not fit in 8 bits"):
        pack_weights(torch.tensor([1, 256]), 8)


@pytest.mark.parametrize("dtype", (torch.int8, torch.int64))
def test_negative_value_rejected(dtype):
    with pytest.raises(ValueError, match=r"values\[2\] = -1 does not fit.*shifted first"):
        pack_weights(torch.tensor([0, 1, -1], dtype=dtype), 4)


@pytest.mark.parametrize("dtype", (torch.int8, torch.int64, torch.float32))
def test_packed_dtype_must_be_uint8(dtype):
    with pytest.raises(ValueError, match="packed has dtype.*view\\(torch.uint8\\)"):
        unpack_weights(torch.zeros(3, dtype=dtype), 4)


@pytest.mark.parametrize("count", (7, 12, 13, -1, 0))
def test_count_that_does_not_fit(count):
    packed = torch.zeros(2, 3, dtype=torch.uint8)  # 3 bytes of 2-bit values hold 9 to 12 values
    if count == 12:
        assert unpack_weights(packed, 2, count=count).shape == (2, 12)
        return
    with pytest.raises(ValueError, match=f"count={count} does not fit.*between 9 and 12"):
        unpack_weights(packed, 2, count=count)


@pytest.mark.parametrize("count", (3.0, "3", True))
def test_count_must_be_int(count):
    with pytest.raises(ValueError, match="count must be an int"):
        unpack_weights(torch.zeros(1, dtype=torch.uint8), 4, count=count)


def test_non_zero_padding_means_wrong_count():
    packed = pack_weights(torch.tensor([1, 2, 3, 1]), 2)
    with pytest.raises(ValueError, match="padding slot.*count, bits or order differ"):
        unpack_weights(packed, 2, count=3)


def test_loop_rejects_what_the_helper_rejects():
    with pytest.raises(ValueError, match="does not fit in 2 bits"):
        pack_weights_loop(torch.tensor([1, 4]), 2)
    with pytest.raises(ValueError, match="floating-point"):
        pack_weights_loop(torch.tensor([1.0]), 2)


# --- bitsandbytes' 4-bit storage ---------------------------------------------------------------------


def nf4_weight_with_known_codes(count, seed):
    """A weight whose NF4 codes are known in advance: every value is an entry of bitsandbytes' NF4 table
    and every 64-value block holds -1.0 (code 0), so each block's absmax is exactly 1 and quantizing maps
    each value back to its own code."""
    nf4_table = bnb_functional.get_4bit_type("nf4", device="cpu")
    codes = random_codes((count,), 4, seed=seed)
    codes[::64] = 0
    return codes, nf4_table[codes.long()]


@pytest.mark.parametrize("count", (128, 64 * 5 + 2, 7, 1))
def test_bitsandbytes_order_matches_bitsandbytes_bytes(count):
    codes, weight = nf4_weight_with_known_codes(count, seed=count)
    bnb_packed, _ = bnb_functional.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    assert bnb_packed.dtype == torch.uint8 and bnb_packed.shape == (math.ceil(count / 2), 1)
    # bitsandbytes pads an odd count with the code of 0.0, which is 7 in the NF4 table.
    zero_code = int(torch.nonzero(bnb_functional.get_4bit_type("nf4", device="cpu") == 0)[0])
    assert torch.equal(pack_bitsandbytes_4bit(codes, padding_code=zero_code), bnb_packed)
    assert torch.equal(unpack_bitsandbytes_4bit(bnb_packed, (count,)), codes)


def test_bitsandbytes_order_is_high_first_and_differs_from_default():
    codes = torch.tensor([0x1, 0x2, 0x3, 0x4])
    assert pack_bitsandbytes_4bit(codes).tolist() == [[0x12], [0x34]]
    assert pack_weights(codes, 4).tolist() == [0x21, 0x43]


def test_unpacked_bitsandbytes_codes_rebuild_its_dequantized_weight():
    torch.manual_seed(0)
    # Rows a multiple of the blocksize, like every real layer: bitsandbytes' CPU dequantize kernel (0.50.2)
    # disagrees with its own quantizer when a block straddles two rows (e.g. 96 columns).
    weight = torch.randn(64, 128)
    for double_quant in (False, True):
        packed, state = bnb_functional.quantize_4bit(
            weight, blocksize=64, quant_type="nf4", compress_statistics=double_quant
        )
        codes = unpack_bitsandbytes_4bit(packed, state.shape)
        if double_quant:  # absmax itself stored as 8-bit codes in blocks of 256, after subtracting a mean
            nested_blocks = state.state2.absmax.repeat_interleave(state.state2.blocksize)[: state.absmax.numel()]
            absmax = state.state2.code[state.absmax.long()] * nested_blocks + state.offset
        else:
            absmax = state.absmax
        rebuilt = (state.code[codes.long()].reshape(-1, 64) * absmax[:, None]).reshape(state.shape)
        assert torch.equal(rebuilt, bnb_functional.dequantize_4bit(packed, state))


def test_bitsandbytes_bad_input():
    with pytest.raises(ValueError, match="bitsandbytes stores 4-bit weights as \\(n/2, 1\\)"):
        unpack_bitsandbytes_4bit(torch.zeros(4, dtype=torch.uint8), (8,))
    with pytest.raises(ValueError, match="need 4 bytes, but packed has 3"):
        unpack_bitsandbytes_4bit(torch.zeros(3, 1, dtype=torch.uint8), (2, 4))
    with pytest.raises(ValueError, match="packed has dtype"):
        unpack_bitsandbytes_4bit(torch.zeros(4, 1, dtype=torch.int8), (8,))
    with pytest.raises(ValueError, match="does not fit in 4 bits"):
        pack_bitsandbytes_4bit(torch.tensor([1, 16, 3]))
    with pytest.raises(ValueError, match="padding_code must be an int in \\[0, 15\\]"):
        pack_bitsandbytes_4bit(torch.tensor([1]), padding_code=16)


# --- benchmark ---------------------------------------------------------------------------------------


def test_benchmark_reports_consistent_ratios():
    result = benchmark_packing(value_count=2**16, repeats=2, loop_value_count=64, loop_repeats=1)
    assert isinstance(result, PackingBenchmark)
    assert result.value_count == 2**16 and result.loop_value_count == 64 and result.bits == 4
    assert result.pack_over_clone == pytest.approx(result.pack_seconds / result.clone_seconds)
    assert result.loop_over_pack_per_value == pytest.approx(
        (result.loop_seconds / 64) / (result.pack_seconds / 2**16)
    )
    assert result.loop_over_pack_per_value > 1  # even at this tiny size the loop is slower


@pytest.mark.parametrize(
    "arguments",
    ({"value_count": 0}, {"repeats": 0}, {"loop_value_count": 2**20, "value_count": 2**10}, {"bits": 3}),
)
def test_benchmark_bad_arguments(arguments):
    with pytest.raises(ValueError):
        benchmark_packing(**arguments)
