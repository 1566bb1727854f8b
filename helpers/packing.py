"""Packing: several low-bit integers stored in each byte of a ``uint8`` tensor.

PyTorch has no general-purpose 1-, 2- or 4-bit tensor that arithmetic runs on, so quantized weights are
stored ``8 // bits`` to a byte and unpacked before (or inside) the matrix multiply.

Conventions of ``pack_weights`` / ``unpack_weights``:

- ``bits`` is 1, 2, 4 or 8; ``values`` is an integer tensor of any shape (at least one dimension) with
  every value in ``[0, 2**bits - 1]``; packing runs along the last dimension, so rows never share a byte.
- ``order="low_first"`` (the default): the first value of each group goes into the least significant
  bits of its byte. ``order="high_first"``: into the most significant bits, which is what bitsandbytes
  does for 4-bit weights (``pack_bitsandbytes_4bit`` / ``unpack_bitsandbytes_4bit`` add its flat
  ``(n/2, 1)`` shape).
- A last dimension that is not a multiple of ``8 // bits`` is padded with zeros; pass the original
  length as ``count`` to ``unpack_weights`` to get it back.
- Nothing is ever masked silently: a value that does not fit raises ``ValueError`` (a too-large value
  would otherwise spill into its neighbour's bits).

Accepted input dtypes: ``uint8`` (the fast, fair case: no conversion), and ``int8``, ``int16``,
``int32``, ``int64`` (range-checked, then converted to ``uint8`` first, which costs one extra pass).
Unpacking always returns ``uint8``.

How it stays fast: a group of ``8 // bits`` consecutive ``uint8`` values is reinterpreted as one wider
integer (``int16`` for 4-bit, ``int32`` for 2-bit, ``int64`` for 1-bit), so a byte-level shift moves
every value of the group at once and the low byte of ``word | word >> 4 | ...`` *is* the packed byte.
The tensor is processed in cache-sized chunks so the few temporaries never leave the CPU cache.
The word view assumes little-endian byte order, as on x86, ARM and every GPU PyTorch supports.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Literal

import torch

SUPPORTED_BITS = (1, 2, 4, 8)
BIT_ORDERS = ("low_first", "high_first")
ACCEPTED_VALUE_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)

# One group of ``8 // bits`` bytes viewed as a single integer of the same width.
_WORD_DTYPE = {2: torch.int16, 4: torch.int32, 8: torch.int64}

# Bytes of input handled per chunk. Every eager PyTorch operation is one full pass over its operands;
# working on chunks about this size keeps the temporaries in the L2 cache, so only the first read and
# the last write of each chunk touch main memory. Larger or smaller chunks measured slower on a 2 MB L2.
_CHUNK_BYTES = 1 << 20

BitOrder = Literal["low_first", "high_first"]


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(
            f"bits={bits!r} is not supported: choose one of {SUPPORTED_BITS} "
            "(a byte must hold a whole number of values)."
        )
    return bits


def _check_order(order: str) -> str:
    if order not in BIT_ORDERS:
        raise ValueError(
            f"order={order!r} is unknown: use 'low_first' (first value in the least significant bits) or "
            "'high_first' (first value in the most significant bits, bitsandbytes' 4-bit order)."
        )
    return order


def _check_value_dtype(values: torch.Tensor) -> None:
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"values must be a torch.Tensor, got {type(values).__name__}: wrap it with torch.tensor(...).")
    if values.dtype.is_floating_point or values.dtype.is_complex:
        raise ValueError(
            f"values has floating-point dtype {values.dtype}: packing stores integer codes, not real numbers. "
            "Quantize first (e.g. torch.round(x / scale)), check the range, then pass an integer tensor "
            "such as .to(torch.uint8)."
        )
    if values.dtype not in ACCEPTED_VALUE_DTYPES:
        raise ValueError(
            f"values has dtype {values.dtype}; accepted integer dtypes are "
            f"{', '.join(str(d) for d in ACCEPTED_VALUE_DTYPES)}. Convert with .to(torch.uint8) "
            "(after checking the range) or .to(torch.int64)."
        )
    if values.dim() == 0:
        raise ValueError(
            "values is a 0-dimensional tensor: packing runs along the last dimension, "
            "so pass values.reshape(1) for a single value."
        )


def _check_value_range(values: torch.Tensor, bits: int) -> None:
    """Raise if any value is outside [0, 2**bits - 1]: one vectorized reduction, no masking."""
    largest_allowed = (1 << bits) - 1
    if values.numel() == 0:
        return
    if values.dtype == torch.uint8:
        if bits == 8:
            return  # every uint8 fits in 8 bits
        smallest, largest = 0, int(values.amax())
    else:
        smallest_tensor, largest_tensor = torch.aminmax(values)
        smallest, largest = int(smallest_tensor), int(largest_tensor)
    if smallest >= 0 and largest <= largest_allowed:
        return
    # Error path only: find the first offending element so the message can point at it.
    bad = (values < 0) | (values > largest_allowed)
    flat_index = int(torch.argmax(bad.reshape(-1).to(torch.uint8)))
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat_index), values.shape))
    bad_value = int(values.reshape(-1)[flat_index])
    hint = (
        "signed codes must be shifted first (e.g. values + 2**(bits - 1))"
        if bad_value < 0
        else "clamp or re-quantize to that range, or use more bits"
    )
    raise ValueError(
        f"values[{', '.join(map(str, index))}] = {bad_value} does not fit in {bits} bits: every value must lie in "
        f"[0, {largest_allowed}] (a larger value would overwrite its neighbour's bits; nothing is masked). "
        f"Fix: {hint}."
    )


def _slot_positions(bits: int, order: str) -> list[int]:
    """Bit position, inside its byte, of the j-th value of each group."""
    values_per_byte = 8 // bits
    slots = range(values_per_byte) if order == "low_first" else reversed(range(values_per_byte))
    return [bits * slot for slot in slots]


def _word_shifter(word_dtype: torch.dtype, device: torch.device):
    """A function ``shift(words, amount, out)``: words >> amount (amount >= 0) or words << -amount.

    The amounts are passed as 0-d tensors made once per call of pack/unpack: a Python int would be
    wrapped into a new tensor on every operation, which costs more than the arithmetic on a small chunk.
    """
    amounts: dict[int, torch.Tensor] = {}

    def shift(words: torch.Tensor, amount: int, out: torch.Tensor) -> torch.Tensor:
        if amount not in amounts:
            amounts[amount] = torch.tensor(abs(amount), dtype=word_dtype, device=device)
        if amount >= 0:
            return torch.bitwise_right_shift(words, amounts[amount], out=out)
        return torch.bitwise_left_shift(words, amounts[amount], out=out)

    return shift


def _or_of_shifted_copies(
    words: torch.Tensor, right_shifts: list[int], shift, accumulator: torch.Tensor, scratch: torch.Tensor
) -> torch.Tensor:
    """accumulator = OR over s in right_shifts of (words >> s); negative s shifts left.

    In-place ORs (``|=``) instead of new tensors: every eager operation is a full pass, and in-place
    ones also skip most of PyTorch's per-call overhead. An unshifted term needs no shift pass of its own.
    """
    moved = [amount for amount in right_shifts if amount != 0]
    shift(words, moved[0], out=accumulator)
    for amount in moved[1:]:
        accumulator.bitwise_or_(shift(words, amount, out=scratch))
    if len(moved) < len(right_shifts):
        accumulator.bitwise_or_(words)
    return accumulator


def pack_weights(values: torch.Tensor, bits: int, order: BitOrder = "low_first") -> torch.Tensor:
    """Pack integers in [0, 2**bits - 1] along the last dimension, ``8 // bits`` per byte.

    Args:
        values: integer tensor (uint8 fastest; int8/16/32/64 accepted) of any shape with at least one
            dimension.
        bits: 1, 2, 4 or 8.
        order: ``"low_first"`` puts the first value of each group in the least significant bits;
            ``"high_first"`` in the most significant bits (bitsandbytes' 4-bit order).

    Returns:
        uint8 tensor of shape ``(*values.shape[:-1], ceil(values.shape[-1] / (8 // bits)))``; a last
        dimension that is not a multiple of ``8 // bits`` is padded with zeros.

    Raises:
        ValueError: unsupported ``bits`` or ``order``, floating-point or unsupported dtype, a 0-d tensor,
            or any value outside [0, 2**bits - 1].
    """
    _check_bits(bits)
    _check_order(order)
    _check_value_dtype(values)
    original_values = values
    if values.dtype != torch.uint8:
        # Wider input: check the range first (it may hold values no byte can), then convert exactly.
        _check_value_range(values, bits)
        values = values.to(torch.uint8)
    # uint8 input is range-checked chunk by chunk below, while each chunk is in the cache anyway.

    values_per_byte = 8 // bits
    length = values.shape[-1]
    packed_length = math.ceil(length / values_per_byte)
    packed_shape = (*values.shape[:-1], packed_length)
    if bits == 8:  # one value per byte: packing is a copy (never an alias of the caller's tensor)
        return values.clone(memory_format=torch.contiguous_format) if values is original_values else values
    if values.numel() == 0:
        return torch.zeros(packed_shape, dtype=torch.uint8, device=values.device)
    if length % values_per_byte:
        padding = packed_length * values_per_byte - length
        values = torch.nn.functional.pad(values, (0, padding))  # zeros, so unpacking can verify them
    flat = values.contiguous().reshape(-1)
    if flat.storage_offset() % values_per_byte:
        flat = flat.clone()  # a view as wider words needs word-aligned storage
    word_dtype = _WORD_DTYPE[values_per_byte]
    words = flat.view(word_dtype)

    # Value j of a group sits at bit 8*j of its word and must move to bit position p_j of the low byte.
    # Shifting the whole word right by 8*j - p_j does that; the other values' bits either fall off the
    # bottom or land above bit 7, which the final conversion to uint8 drops. So no masks are needed.
    right_shifts = [8 * j - position for j, position in enumerate(_slot_positions(bits, order))]
    shift = _word_shifter(word_dtype, words.device)
    largest_allowed = (1 << bits) - 1

    packed = torch.empty(words.numel(), dtype=torch.uint8, device=words.device)
    chunk_words = max(1, _CHUNK_BYTES // values_per_byte)
    accumulator = torch.empty(min(chunk_words, words.numel()), dtype=word_dtype, device=words.device)
    scratch = torch.empty_like(accumulator)
    for start in range(0, words.numel(), chunk_words):  # a loop over ~1 MB chunks, not over elements
        chunk = words[start : start + chunk_words]
        size = chunk.numel()
        if int(flat[start * values_per_byte : (start + size) * values_per_byte].amax()) > largest_allowed:
            _check_value_range(original_values, bits)  # raises, naming the first offending element
        combined = _or_of_shifted_copies(chunk, right_shifts, shift, accumulator[:size], scratch[:size])
        packed[start : start + size].copy_(combined)  # integer narrowing keeps the low byte
    return packed.reshape(packed_shape)


def unpack_weights(
    packed: torch.Tensor, bits: int, count: int | None = None, order: BitOrder = "low_first"
) -> torch.Tensor:
    """Invert ``pack_weights``: uint8 values in [0, 2**bits - 1] along the last dimension.

    Args:
        packed: uint8 tensor produced by ``pack_weights`` with the same ``bits`` and ``order``.
        bits: 1, 2, 4 or 8.
        count: original length of the last dimension; ``None`` returns every slot,
            ``packed.shape[-1] * (8 // bits)`` values. The padding slots it drops must hold zeros.
        order: the order used when packing.

    Returns:
        uint8 tensor of shape ``(*packed.shape[:-1], count)``.

    Raises:
        ValueError: unsupported ``bits`` or ``order``, ``packed`` not uint8 or 0-d, a ``count`` that does
            not fit the packed length, or non-zero padding slots (a wrong ``count``, ``bits`` or ``order``).
    """
    _check_bits(bits)
    _check_order(order)
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"packed must be a torch.Tensor, got {type(packed).__name__}.")
    if packed.dtype != torch.uint8:
        raise ValueError(
            f"packed has dtype {packed.dtype}, but packed weights are uint8 bytes. Pass the tensor pack_weights "
            "returned; if the bytes are stored in another dtype of the same bytes (e.g. bitsandbytes' "
            "quant_storage), reinterpret them with packed.view(torch.uint8), never .to(torch.uint8)."
        )
    if packed.dim() == 0:
        raise ValueError("packed is a 0-dimensional tensor: pass packed.reshape(1) for a single byte.")

    values_per_byte = 8 // bits
    packed_length = packed.shape[-1]
    slots = packed_length * values_per_byte
    if count is None:
        count = slots
    if isinstance(count, bool) or not isinstance(count, int):
        raise ValueError(f"count must be an int (the original length of the last dimension), got {count!r}.")
    if count < 0 or math.ceil(count / values_per_byte) != packed_length:
        lowest = (packed_length - 1) * values_per_byte + 1 if packed_length else 0
        raise ValueError(
            f"count={count} does not fit a last dimension of {packed_length} bytes at {bits} bits: "
            f"{packed_length} bytes hold between {lowest} and {slots} values. Pass the length the values had "
            "before packing (and the same bits)."
        )

    unpacked_shape = (*packed.shape[:-1], count)
    if bits == 8:
        return packed.clone(memory_format=torch.contiguous_format)
    if packed.numel() == 0:
        return torch.zeros(unpacked_shape, dtype=torch.uint8, device=packed.device)

    flat_packed = packed.contiguous().reshape(-1)
    word_dtype = _WORD_DTYPE[values_per_byte]
    words = torch.empty(flat_packed.numel(), dtype=word_dtype, device=packed.device)
    # Copy each byte into the low byte of a word, then OR together copies shifted left by 8*j - p_j, so
    # the bits of slot j land at the bottom of byte j. Every other bit lands in the top (8 - bits) bits
    # of some byte or falls off, so keeping the low `bits` of every byte leaves exactly the values.
    right_shifts = [position - 8 * j for j, position in enumerate(_slot_positions(bits, order))]
    shift = _word_shifter(word_dtype, packed.device)
    low_bits_of_every_byte = torch.tensor(
        int.from_bytes(bytes([(1 << bits) - 1] * values_per_byte), "little"), dtype=word_dtype, device=packed.device
    )

    chunk_words = max(1, _CHUNK_BYTES // values_per_byte)
    byte_words = torch.empty(min(chunk_words, words.numel()), dtype=word_dtype, device=packed.device)
    scratch = torch.empty_like(byte_words)
    for start in range(0, words.numel(), chunk_words):  # a loop over ~1 MB chunks, not over elements
        unpacked_words = words[start : start + chunk_words]
        size = unpacked_words.numel()
        byte_words[:size].copy_(flat_packed[start : start + size])  # each byte into the low byte of a word
        _or_of_shifted_copies(byte_words[:size], right_shifts, shift, unpacked_words, scratch[:size])
        unpacked_words.bitwise_and_(low_bits_of_every_byte)

    unpacked = words.view(torch.uint8).reshape(*packed.shape[:-1], slots)
    if count < slots:
        padding = unpacked[..., count:]
        if bool(padding.any()):
            raise ValueError(
                f"the {slots - count} padding slot(s) after position {count} hold non-zero values, so they are "
                "data, not padding: count, bits or order differ from the ones used for packing."
            )
        unpacked = unpacked[..., :count].contiguous()
    return unpacked


def pack_bitsandbytes_4bit(codes: torch.Tensor, padding_code: int = 0) -> torch.Tensor:
    """Pack 4-bit codes the way bitsandbytes stores a 4-bit weight: flattened, two per byte, first code
    in the high nibble, shape ``(ceil(n / 2), 1)``.

    Args:
        codes: integer tensor of any shape with values in [0, 15], flattened in row-major order.
        padding_code: code placed in the low nibble of the last byte when ``codes.numel()`` is odd.
            bitsandbytes pads with the code of 0.0 (7 for nf4, 0 for fp4); pass it to reproduce its bytes.
    """
    _check_value_dtype(codes)
    if isinstance(padding_code, bool) or not isinstance(padding_code, int) or not 0 <= padding_code <= 15:
        raise ValueError(f"padding_code must be an int in [0, 15], got {padding_code!r}.")
    flat = codes.reshape(-1)
    if flat.numel() % 2:
        _check_value_range(flat, 4)  # before the padding code is appended, so the message indexes `codes`
        flat = torch.cat([flat, flat.new_full((1,), padding_code)])
    return pack_weights(flat, 4, order="high_first").reshape(-1, 1)


def unpack_bitsandbytes_4bit(packed: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Codes (uint8, values 0..15) of a bitsandbytes 4-bit weight, reshaped to the weight's ``shape``.

    Args:
        packed: the weight's storage, uint8 of shape ``(ceil(n / 2), 1)`` (``layer.weight.data`` of a
            freshly loaded ``Linear4bit``, before any forward pass on CPU).
        shape: the original weight shape (``layer.weight.quant_state.shape``).

    For an odd number of codes the low nibble of the last byte is bitsandbytes' padding (the code of
    0.0, not necessarily 0) and is dropped unchecked.
    """
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"packed must be a torch.Tensor, got {type(packed).__name__}.")
    if packed.dim() != 2 or packed.shape[1] != 1:
        raise ValueError(
            f"packed has shape {tuple(packed.shape)}, but bitsandbytes stores 4-bit weights as (n/2, 1). "
            "Pass layer.weight.data of a Linear4bit that has not run a forward pass yet (on CPU the first "
            "forward converts it to another layout)."
        )
    shape = tuple(int(s) for s in shape)
    count = math.prod(shape)
    if math.ceil(count / 2) != packed.shape[0]:
        raise ValueError(
            f"shape {shape} holds {count} codes, which need {math.ceil(count / 2)} bytes, but packed has "
            f"{packed.shape[0]}. Pass the weight's own quant_state.shape."
        )
    codes = unpack_weights(packed.reshape(-1), 4, order="high_first")  # every slot, padding included
    return codes[:count].reshape(shape)


def pack_weights_loop(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Teaching version of ``pack_weights`` (low_first order): one tensor element at a time.

    Deliberately the way most tutorials write it, indexing the tensor element by element, so it is
    easy to read and about four orders of magnitude slower than ``pack_weights``. Use it on a few
    thousand values at most.
    """
    _check_bits(bits)
    _check_value_dtype(values)
    values_per_byte = 8 // bits
    row_count, length = math.prod(values.shape[:-1]), values.shape[-1]
    rows = values.reshape(row_count, length)
    packed = torch.zeros(row_count, math.ceil(length / values_per_byte), dtype=torch.uint8)
    for row in range(row_count):
        for column in range(length):
            value = int(rows[row, column])
            if not 0 <= value < 2**bits:
                raise ValueError(f"value {value} at row {row}, column {column} does not fit in {bits} bits.")
            byte_index, slot = divmod(column, values_per_byte)
            packed[row, byte_index] |= value << (bits * slot)
    return packed.reshape(*values.shape[:-1], packed.shape[-1])


@dataclass(frozen=True)
class PackingBenchmark:
    """Best-of-repeats timings of one machine, and the ratios the notebook prints (measurements, not targets)."""

    bits: int
    value_count: int
    loop_value_count: int
    clone_seconds: float
    pack_seconds: float
    unpack_seconds: float
    loop_seconds: float

    @property
    def pack_over_clone(self) -> float:
        """Packing time / cloning the unpacked uint8 tensor (one pass over memory, the floor)."""
        return self.pack_seconds / self.clone_seconds

    @property
    def unpack_over_clone(self) -> float:
        """Unpacking time / cloning the unpacked uint8 tensor."""
        return self.unpack_seconds / self.clone_seconds

    @property
    def loop_seconds_per_value(self) -> float:
        return self.loop_seconds / self.loop_value_count

    @property
    def loop_over_pack_per_value(self) -> float:
        """How many times more time per value the element loop takes than ``pack_weights``."""
        return self.loop_seconds_per_value / (self.pack_seconds / self.value_count)

    @property
    def loop_over_unpack_per_value(self) -> float:
        """How many times more time per value the element loop (packing) takes than ``unpack_weights``."""
        return self.loop_seconds_per_value / (self.unpack_seconds / self.value_count)


def _best_seconds(function, repeats: int) -> float:
    """Minimum wall time over ``repeats`` calls: the least disturbed run on a shared, noisy machine."""
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def benchmark_packing(
    value_count: int = 2**24,
    bits: int = 4,
    repeats: int = 20,
    loop_value_count: int = 2**12,
    loop_repeats: int = 2,
    seed: int = 0,
) -> PackingBenchmark:
    """Time clone, ``pack_weights``, ``unpack_weights`` and ``pack_weights_loop`` side by side on CPU.

    ``value_count`` random uint8 codes in [0, 2**bits - 1] (uint8 is the fair case: the clone it is
    compared with copies the same bytes). The loop runs on the first ``loop_value_count`` of them and is
    compared per value. Round trips are checked, so a fast but wrong packer cannot win.
    """
    _check_bits(bits)
    for name, number in (("value_count", value_count), ("repeats", repeats),
                         ("loop_value_count", loop_value_count), ("loop_repeats", loop_repeats)):
        if isinstance(number, bool) or not isinstance(number, int) or number < 1:
            raise ValueError(f"{name} must be a positive int, got {number!r}.")
    if loop_value_count > value_count:
        raise ValueError(f"loop_value_count ({loop_value_count}) must not exceed value_count ({value_count}).")
    generator = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 2**bits, (value_count,), dtype=torch.uint8, generator=generator)
    packed = pack_weights(values, bits)
    if not torch.equal(unpack_weights(packed, bits, count=value_count), values):
        raise RuntimeError("pack/unpack round trip failed: the timings would be meaningless.")
    loop_values = values[:loop_value_count]
    if not torch.equal(pack_weights_loop(loop_values, bits), pack_weights(loop_values, bits)):
        raise RuntimeError("the element loop and pack_weights disagree: the timings would be meaningless.")

    # Interleave the measurements so background load affects all of them alike.
    clone_seconds = pack_seconds = unpack_seconds = math.inf
    for _ in range(repeats):
        clone_seconds = min(clone_seconds, _best_seconds(values.clone, 1))
        pack_seconds = min(pack_seconds, _best_seconds(lambda: pack_weights(values, bits), 1))
        unpack_seconds = min(unpack_seconds, _best_seconds(lambda: unpack_weights(packed, bits, value_count), 1))
    loop_seconds = _best_seconds(lambda: pack_weights_loop(loop_values, bits), loop_repeats)
    return PackingBenchmark(
        bits=bits,
        value_count=value_count,
        loop_value_count=loop_value_count,
        clone_seconds=clone_seconds,
        pack_seconds=pack_seconds,
        unpack_seconds=unpack_seconds,
        loop_seconds=loop_seconds,
    )
