"""LLM.int8 row-wise and NF4 block-wise quantization from scratch, byte for byte as bitsandbytes stores them.

Everything here is plain vectorized PyTorch and never imports bitsandbytes, except where bitsandbytes itself is
the subject: the timing helper, the two ``*_storage_of`` readers (which touch only objects you pass in), the
round trips through its ``quantize_4bit``/``dequantize_4bit`` (fake quantization at any block size) and
``dense_weight_uses`` (what a ``Linear4bit`` materializes while it computes). ``tests/test_quantization.py``
checks every function against bitsandbytes 0.50.2 on CPU with ``torch.equal``.

What bitsandbytes does, and therefore what these functions reproduce:

- **LLM.int8** (``Linear8bitLt``) casts the weight to float16 first, takes each output row's absolute maximum
  (``SCB``, stored as float32) and stores ``round(W16 * (127 / SCB))`` as int8 (``CB``), rounding half to even.
  A row of zeros gets scale 0 and zeros.
- **NF4** (``quantize_4bit``) flattens the weight (float16/bfloat16 are upcast to float32 exactly), cuts it into
  blocks of ``blocksize`` values (the remainder is one last, shorter block), divides each block by its absolute
  maximum and picks the NF4 level whose decision interval holds the value. Decision boundaries are the float32
  midpoints between neighbouring levels; a value exactly on a midpoint goes to the *lower* level (toward -1).
  Two 4-bit codes share a byte, the first in the high nibble; an odd count pads the last low nibble with the
  code of 0.0 (7). Full blocks are scaled by ``x * (1 / absmax)``, the remainder block by ``x / absmax``; both
  use ``max(absmax, 1e-38)``, and the remainder block also *stores* that clamped value, so a zero remainder
  block reports absmax 1e-38 where a zero full block reports 0.
- **Double quantization** (``compress_statistics=True``): ``offset = absmax.mean()``; ``absmax - offset`` is
  quantized to 8 bits in blocks of 256 with bitsandbytes' signed dynamic map. The CPU kernel does that with a
  65,536-entry lookup table over [-1, 1] rather than an exact nearest-level search, which we rebuild.
- **Dequantization** is ``level[code] * absmax[block]`` in float32 over the same flat blocks. bitsandbytes
  0.50.2's native CPU kernel instead assumes every row holds whole blocks (true for every Llama Linear); when a
  block spans two rows it disagrees with its own quantizer, and ``dequantize_nf4`` follows the quantizer.
"""

from __future__ import annotations

import functools
import math
import os
import time
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

from helpers.packing import pack_weights, unpack_weights

SUPPORTED_4BIT_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
"""Blocksizes ``bitsandbytes.functional.quantize_4bit`` accepts."""

SUPPORTED_NESTED_BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)
"""Blocksizes bitsandbytes documents for 8-bit blockwise quantization (the nested absmax uses 256)."""

BNB_4BIT_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""Weight dtypes ``quantize_4bit`` accepts; anything else is rejected by bitsandbytes too."""

NF4_MIDPOINT_OFFSET = 1 - (1 / (2 * 15) + 1 / (2 * 16)) / 2
"""Outermost probability of NF4, derived: halfway between 1 - 1/(2*15) and 1 - 1/(2*16). The QLoRA paper gives no
value; this midpoint reproduces bitsandbytes' ``BNB_NF4_OFFSET`` to the 7 decimals it keeps."""

BNB_NF4_OFFSET = 0.9677083
"""The outermost probability as bitsandbytes writes it (``create_normal_map``'s default ``offset``), whose docstring
says it was optimized empirically."""

INT8_MAX = torch.iinfo(torch.int8).max  # 127: LLM.int8 maps each row's absmax to +-127
BNB_MIN_ABSMAX = 1e-38  # bitsandbytes divides by max(absmax, 1e-38) so a block of zeros does not divide by 0
DYNAMIC_MAP_LUT_SIZE = 2**16  # bitsandbytes' CPU 8-bit quantizer discretizes [-1, 1] into this many bins
NF4_BITS = 4
FLOAT16_MAX = torch.finfo(torch.float16).max


# ----------------------------------------------------------------------------------------------------------
# Argument checks shared by every entry point: say what is wrong and how to fix it.
# ----------------------------------------------------------------------------------------------------------


def _check_weight(weight: torch.Tensor, allowed_dtypes: Sequence[torch.dtype] | None, what: str) -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{what} needs a torch.Tensor, got {type(weight).__name__}; "
                        "wrap the data with torch.tensor(...).")
    if not weight.is_floating_point():
        raise ValueError(f"{what} needs a floating-point weight, got dtype {weight.dtype}; "
                         "convert it first, e.g. weight.float().")
    if allowed_dtypes is not None and weight.dtype not in allowed_dtypes:
        names = ", ".join(str(d) for d in allowed_dtypes)
        raise ValueError(f"{what} accepts {names} (as bitsandbytes does), got {weight.dtype}; "
                         "convert with weight.float() first.")
    if weight.numel() == 0:
        raise ValueError(f"{what} got an empty tensor (shape {tuple(weight.shape)}); pass a weight with at least "
                         "one value.")
    if weight.device.type != "cpu":
        raise ValueError(f"{what} reproduces bitsandbytes' CPU path; move the weight with weight.cpu() first "
                         f"(got device {weight.device}).")


def _check_blocksize(blocksize: int, supported: Sequence[int], what: str) -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in supported:
        raise ValueError(f"{what}: blocksize {blocksize!r} is not one bitsandbytes supports; use one of "
                         f"{', '.join(map(str, supported))}.")


def _check_finite_scales(scales: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(scales).all()):
        raise ValueError(f"{what}: the weight contains NaN or infinite values, which would make the scales "
                         "meaningless; find and fix them (torch.isfinite(weight).all()) before quantizing.")


def _number_of_blocks(numel: int, blocksize: int) -> int:
    return -(-numel // blocksize)  # the remainder gets a block of its own


# ----------------------------------------------------------------------------------------------------------
# Lookup tables: NF4, FP4 and the dynamic 8-bit map, derived rather than typed in.
# ----------------------------------------------------------------------------------------------------------


def nf4_levels(offset: float = NF4_MIDPOINT_OFFSET, float32_probabilities: bool = False) -> torch.Tensor:
    """The 16 NF4 levels, sorted, built from normal quantiles as in the QLoRA paper.

    Eight positive levels are the normal quantiles at 8 evenly spaced probabilities from ``offset`` down to
    (but excluding) 0.5; seven negative levels mirror the quantiles of 7 evenly spaced probabilities over the
    same range; an exact zero completes the 16. Dividing by the largest level puts them in [-1, 1] with -1 and
    1 both present (asymmetric: one more positive level, so zero is exact).

    With the defaults (the midpoint offset, probabilities in float64) the result differs from bitsandbytes'
    table by at most a few float32 ulps. ``nf4_levels(BNB_NF4_OFFSET, float32_probabilities=True)`` follows
    bitsandbytes' own recipe (its rounded offset, probabilities spaced in float32) and equals its table exactly.
    """
    probability_dtype = torch.float32 if float32_probabilities else torch.float64
    positive_probabilities = torch.linspace(offset, 0.5, 9, dtype=probability_dtype)[:-1]
    negative_probabilities = torch.linspace(offset, 0.5, 8, dtype=probability_dtype)[:-1]
    quantiles = torch.cat([
        torch.special.ndtri(positive_probabilities.double()),  # inverse normal CDF
        torch.zeros(1, dtype=torch.float64),
        -torch.special.ndtri(negative_probabilities.double()),
    ]).sort().values
    if float32_probabilities:  # bitsandbytes stores the quantiles in float32, then normalizes in float32
        quantiles = quantiles.float()
        return quantiles / quantiles.max()
    return (quantiles / quantiles.max()).float()


@functools.cache
def _bnb_nf4_levels() -> torch.Tensor:
    return nf4_levels(BNB_NF4_OFFSET, float32_probabilities=True)


@functools.cache
def _nf4_decision_boundaries() -> torch.Tensor:
    """The 15 float32 midpoints between neighbouring NF4 levels: a value's code is how many lie below it."""
    levels = _bnb_nf4_levels()
    return (levels[:-1] + levels[1:]) / 2


def nf4_decision_boundaries() -> torch.Tensor:
    """The 15 float32 midpoints between neighbouring NF4 levels (bitsandbytes' table), where rounding flips."""
    return _nf4_decision_boundaries().clone()


def fp4_levels() -> torch.Tensor:
    """The 16 FP4 values bitsandbytes decodes, indexed by the 4-bit code (not sorted), in [-1, 1].

    bitsandbytes' FP4 is 1 sign bit, 2 exponent bits and 1 mantissa bit. Exponent field 0 is subnormal
    (0 or 0.0625 before normalizing); fields 1, 2, 3 scale the mantissa ``1 + m/2`` by 8, 4 and 2 (bitsandbytes
    orders its exponents from the top). The table is then divided by its largest magnitude, 12.
    """
    codes = torch.arange(2**NF4_BITS)
    sign = torch.where(codes >= 8, -1.0, 1.0)
    exponent_field = (codes >> 1) & 0b11
    mantissa = (codes & 1).float()
    normal = (1 + mantissa / 2) * torch.exp2(4 - exponent_field.float())
    subnormal = mantissa * 2.0**-4
    magnitude = torch.where(exponent_field == 0, subnormal, normal)
    values = (sign * magnitude).float()
    return values / values.abs().max()


def dynamic_8bit_map() -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit map (256 sorted values in [-0.993, 1]) used for the nested absmax.

    Each of 7 decades 1e-6 .. 1 holds 2**k values (k = 0..6): the midpoints of 2**k + 1 evenly spaced points
    between 0.1 and 1, times the decade, with both signs; then 0 and 1. Small magnitudes get few values, large
    ones many: relative precision stays roughly constant.
    """
    exponent_levels = 7
    parts = []
    for level in range(exponent_levels):  # 7 decades, not a loop over tensor elements
        edges = torch.linspace(0.1, 1, 2**level + 1, dtype=torch.float32)
        midpoints = (edges[:-1] + edges[1:]) / 2.0
        magnitudes = (10 ** (level - (exponent_levels - 1))) * midpoints
        parts += [magnitudes, -magnitudes]
    parts.append(torch.tensor([0.0, 1.0]))
    return torch.cat(parts).sort().values


@functools.cache
def _dynamic_map_and_lookup() -> tuple[torch.Tensor, torch.Tensor]:
    """The dynamic map and bitsandbytes' CPU lookup table: for each of 65,536 grid points on [-1, 1], the code
    of the first level whose upper midpoint is not below it."""
    code = dynamic_8bit_map()
    midpoints = 0.5 * (code[:-1] + code[1:])
    grid = -1.0 + (2.0 * torch.arange(DYNAMIC_MAP_LUT_SIZE, dtype=torch.float32)) / (DYNAMIC_MAP_LUT_SIZE - 1)
    lookup = torch.searchsorted(midpoints, grid, side="left").to(torch.uint8)
    return code, lookup


# ----------------------------------------------------------------------------------------------------------
# LLM.int8: one float32 scale per output row.
# ----------------------------------------------------------------------------------------------------------


def quantize_int8_rowwise(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D Linear weight (out_features, in_features) as LLM.int8 stores it.

    Returns ``(values, scales)``: int8 values of the weight's shape (``Linear8bitLt.weight.CB``) and one float32
    scale per row (``weight.SCB``), the row's absolute maximum *of the float16 copy* bitsandbytes quantizes.
    """
    _check_weight(weight, None, "quantize_int8_rowwise")
    if weight.dim() != 2:
        raise ValueError(f"quantize_int8_rowwise needs a 2-D (out_features, in_features) weight with one scale per "
                         f"row, got shape {tuple(weight.shape)}; for a single row use weight.reshape(1, -1).")
    weight16 = weight.detach().to(torch.float16)  # bitsandbytes quantizes a float16 copy
    if not bool(torch.isfinite(weight16).all()):
        raise ValueError("quantize_int8_rowwise: the weight has NaN/inf values or values beyond float16's range "
                         f"(+-{FLOAT16_MAX:g}), which bitsandbytes' float16 copy would turn into inf; "
                         "fix or rescale the weight first.")
    scales = weight16.abs().amax(dim=1).float()
    safe_scales = torch.where(scales == 0, torch.ones_like(scales), scales)  # a zero row stays zero
    values = torch.round(weight16 * (INT8_MAX / safe_scales).unsqueeze(1)).to(torch.int8)
    return values, scales


CUDA_FDIVIDEF_ULPS = 2
"""bitsandbytes' CUDA int8 kernel takes each row's scale as ``__fdividef(127.0f, absmax)``, whose error CUDA's
programming guide bounds by 2 ulps; ``val * scale`` then adds its own rounding, so the scaled value the kernel rounds
is within ``CUDA_FDIVIDEF_ULPS + 1`` float32 ulps of the exact one. That is the whole tolerance: a code can differ
from ``round(val * 127 / absmax)`` only where that exact value lies within those ulps of a rounding boundary (a
half-integer)."""


def cuda_ambiguous_int8_codes(weight: torch.Tensor) -> torch.Tensor:
    """Where bitsandbytes' CUDA kernel may store another int8 code than ``quantize_int8_rowwise`` (a bool per
    weight): the values whose exact ``val * 127 / absmax`` is within ``CUDA_FDIVIDEF_ULPS + 1`` float32 ulps of a
    half-integer, so that the fast division may tip the rounding one step. A bfloat16 checkpoint cast to float16 has
    many exact ties (its values have few significant bits), which is why a share-based tolerance failed there."""
    _check_weight(weight, None, "cuda_ambiguous_int8_codes")
    if weight.dim() != 2:
        raise ValueError(f"cuda_ambiguous_int8_codes needs a 2-D weight, got shape {tuple(weight.shape)}")
    weight16 = weight.detach().to(torch.float16).float()
    scales = weight16.abs().amax(dim=1)
    scaled = weight16 * (INT8_MAX / torch.where(scales == 0, torch.ones_like(scales), scales)).unsqueeze(1)
    slack = (CUDA_FDIVIDEF_ULPS + 1) * 2.0 ** -23  # relative: a float32 ulp is at most 2^-23 of the value
    return torch.round(scaled * (1 - slack)) != torch.round(scaled * (1 + slack))


def dequantize_int8_rowwise(values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Rebuild the float32 weight from int8 values and per-row scales: ``values * scale / 127``.

    Equals ``bitsandbytes.functional.int8_vectorwise_dequant(values, scales)`` (which multiplies by 1/127).
    """
    if not isinstance(values, torch.Tensor) or values.dtype != torch.int8 or values.dim() != 2:
        raise ValueError("dequantize_int8_rowwise needs the 2-D int8 values from quantize_int8_rowwise (or "
                         f"Linear8bitLt's CB), got {getattr(values, 'dtype', type(values).__name__)} with shape "
                         f"{tuple(getattr(values, 'shape', ()))}.")
    if not isinstance(scales, torch.Tensor) or scales.dtype != torch.float32 or scales.shape != values.shape[:1]:
        raise ValueError(f"dequantize_int8_rowwise needs one float32 scale per row ({values.shape[0]}), got "
                         f"{getattr(scales, 'dtype', type(scales).__name__)} with shape "
                         f"{tuple(getattr(scales, 'shape', ()))}; pass the scales returned with the values (SCB).")
    return values * scales.view(-1, 1) * (1 / INT8_MAX)


# ----------------------------------------------------------------------------------------------------------
# NF4: 4-bit codes in blocks, two codes per byte, one float32 absmax per block.
# ----------------------------------------------------------------------------------------------------------


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a weight of any shape to NF4 exactly as ``bitsandbytes.functional.quantize_4bit`` does.

    Returns ``(packed, absmax)``: a 1-D uint8 tensor of ceil(numel / 2) bytes (bitsandbytes' packed tensor,
    flattened) and a 1-D float32 tensor with one absolute maximum per block (``quant_state.absmax`` without
    double quantization). float16 and bfloat16 weights are upcast to float32 first, as bitsandbytes does.
    """
    _check_weight(weight, BNB_4BIT_INPUT_DTYPES, "quantize_nf4")
    _check_blocksize(blocksize, SUPPORTED_4BIT_BLOCKSIZES, "quantize_nf4")
    flat = weight.detach().reshape(-1).float()
    numel = flat.numel()
    full_blocks, remainder = divmod(numel, blocksize)
    full = full_blocks * blocksize
    boundaries = _nf4_decision_boundaries()

    absmax = torch.empty(full_blocks + (remainder > 0), dtype=torch.float32)
    codes = torch.empty(numel + numel % 2, dtype=torch.int32)  # one spare slot pads an odd count to whole bytes
    if full_blocks:
        blocks = flat[:full].view(full_blocks, blocksize)
        torch.amax(blocks.abs(), dim=1, out=absmax[:full_blocks])
        inverse = 1.0 / absmax[:full_blocks].clamp(min=BNB_MIN_ABSMAX)
        # bucketize with right=False counts boundaries strictly below x: a tie lands on the lower level
        torch.bucketize(blocks * inverse.unsqueeze(1), boundaries, out_int32=True,
                        out=codes[:full].view(full_blocks, blocksize))
    if remainder:
        tail = flat[full:]
        absmax[-1] = tail.abs().max().clamp(min=BNB_MIN_ABSMAX)  # stored clamped, unlike full blocks
        torch.bucketize(tail / absmax[-1], boundaries, out_int32=True, out=codes[full:numel])
    _check_finite_scales(absmax, "quantize_nf4")
    if numel % 2:
        codes[numel] = int((boundaries < 0).sum())  # the code of 0.0, which bitsandbytes pads with
    packed = pack_weights(codes.to(torch.uint8), NF4_BITS, order="high_first")  # bitsandbytes' nibble order
    return packed, absmax


def unpack_nf4_codes(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The 4-bit codes (0..15, uint8) held in ``packed``, high nibble first, the padding nibble dropped."""
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise ValueError("unpack_nf4_codes needs the uint8 packed tensor from quantize_nf4 (or a Linear4bit's "
                         f"weight.data), got {getattr(packed, 'dtype', type(packed).__name__)}.")
    if packed.numel() != _number_of_blocks(numel, 2) or numel <= 0:
        raise ValueError(f"{packed.numel()} packed bytes hold {2 * packed.numel() - 1} or {2 * packed.numel()} "
                         f"codes, not {numel}; pass the shape the weight had when it was quantized.")
    return unpack_weights(packed.reshape(-1), NF4_BITS, order="high_first")[:numel]


def dequantize_nf4(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape: Sequence[int],
    blocksize: int = 64,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Rebuild a weight of ``shape`` from NF4 bytes and per-block absmax: ``level[code] * absmax[block]``.

    The product is formed in float32 and cast to ``dtype`` last, which is what ``bitsandbytes.functional.
    dequantize_4bit`` returns for a state whose dtype is ``dtype``. ``packed`` may keep bitsandbytes' (n, 1) shape.
    (When ``shape[-1]`` is not a multiple of ``blocksize``, bitsandbytes 0.50.2's native CPU kernel reads the
    wrong absmax for blocks that span rows; this function matches its pure-PyTorch reference path there.)
    """
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise ValueError("dequantize_nf4 needs the uint8 packed tensor from quantize_nf4 (or a Linear4bit's "
                         "weight.data before its first CPU forward), got "
                         f"{getattr(packed, 'dtype', type(packed).__name__)}.")
    _check_blocksize(blocksize, SUPPORTED_4BIT_BLOCKSIZES, "dequantize_nf4")
    if dtype not in BNB_4BIT_INPUT_DTYPES:
        raise ValueError(f"dequantize_nf4 returns float32, float16 or bfloat16, got dtype={dtype}.")
    try:
        shape = torch.Size(shape)
    except TypeError as error:
        raise ValueError(f"dequantize_nf4 needs shape as a sequence of ints, got {shape!r}.") from error
    numel = shape.numel()
    if numel == 0 or _number_of_blocks(numel, 2) != packed.numel():
        raise ValueError(f"shape {tuple(shape)} has {numel} values, which need {_number_of_blocks(numel, 2)} packed "
                         f"bytes, but packed has {packed.numel()}; pass the shape the weight had when it was "
                         "quantized.")
    blocks = _number_of_blocks(numel, blocksize)
    if not isinstance(absmax, torch.Tensor) or absmax.dtype != torch.float32 or absmax.shape != (blocks,):
        raise ValueError(f"dequantize_nf4 needs a 1-D float32 absmax with one value per block ({blocks} blocks of "
                         f"{blocksize} for {numel} values), got {getattr(absmax, 'dtype', type(absmax).__name__)} "
                         f"with shape {tuple(getattr(absmax, 'shape', ()))}; if it is double-quantized, rebuild it "
                         "with dequantize_absmax first, and check the blocksize.")
    codes = torch.zeros(blocks * blocksize, dtype=torch.uint8)  # padded to whole blocks, trimmed below
    codes[:numel] = unpack_nf4_codes(packed, numel)
    values = _bnb_nf4_levels()[codes.long()].view(blocks, blocksize) * absmax.unsqueeze(1)
    return values.reshape(-1)[:numel].reshape(shape).to(dtype)


# ----------------------------------------------------------------------------------------------------------
# Double quantization: the float32 absmax itself stored in 8 bits.
# ----------------------------------------------------------------------------------------------------------


class DoubleQuantizedAbsmax(NamedTuple):
    """The nested state of double quantization, named after where bitsandbytes keeps each piece."""

    codes: torch.Tensor  # uint8, one per 4-bit block: quant_state.absmax
    scales: torch.Tensor  # float32, one per block of `blocksize` codes: quant_state.state2.absmax
    offset: torch.Tensor  # float32 scalar, the mean subtracted first: quant_state.offset


def double_quantize_absmax(absmax: torch.Tensor, blocksize: int = 256) -> DoubleQuantizedAbsmax:
    """Store per-block absmax in 8 bits as ``quantize_4bit(..., compress_statistics=True)`` does on CPU.

    The mean is subtracted (absmax values are all positive, centring them doubles the resolution), then blocks
    of ``blocksize`` are scaled by their own absolute maximum and mapped to the dynamic 8-bit map through
    bitsandbytes' 65,536-point lookup table (a block of zeros gets code 0).
    """
    if not isinstance(absmax, torch.Tensor) or absmax.dtype != torch.float32 or absmax.dim() != 1:
        raise ValueError("double_quantize_absmax needs the 1-D float32 absmax from quantize_nf4, got "
                         f"{getattr(absmax, 'dtype', type(absmax).__name__)} with shape "
                         f"{tuple(getattr(absmax, 'shape', ()))}.")
    if absmax.numel() == 0:
        raise ValueError("double_quantize_absmax got an empty absmax; quantize a non-empty weight first.")
    _check_blocksize(blocksize, SUPPORTED_NESTED_BLOCKSIZES, "double_quantize_absmax")
    _check_finite_scales(absmax, "double_quantize_absmax")
    _, lookup = _dynamic_map_and_lookup()
    offset = absmax.mean()
    centred = absmax - offset
    count = centred.numel()
    blocks = _number_of_blocks(count, blocksize)
    padded = torch.zeros(blocks * blocksize, dtype=torch.float32)  # zero padding changes no block's max |x|
    padded[:count] = centred
    padded = padded.view(blocks, blocksize)
    scales = padded.abs().amax(dim=1)
    inverse = 1.0 / torch.where(scales == 0, torch.ones_like(scales), scales)
    normalized = (padded * inverse.unsqueeze(1)).clamp(-1.0, 1.0)
    grid_index = ((normalized + 1.0) * 0.5 * (DYNAMIC_MAP_LUT_SIZE - 1) + 0.5).to(torch.int64)  # truncation
    codes = torch.where(scales.unsqueeze(1) == 0, 0, lookup[grid_index].long()).to(torch.uint8)
    return DoubleQuantizedAbsmax(codes.reshape(-1)[:count], scales, offset)


def dynamic_codes_by_binary_search(normalized: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """The 8-bit codes bitsandbytes' CUDA kernel picks for values already scaled to [-1, 1] (``dQuantize<0>``).

    The kernel does not look for the nearest of the 256 sorted map values: it starts at index 127, takes seven
    halving steps (64, 32, ..., 1) to the left or right of ``x > map[pivot]``, remembers the last map values seen
    on each side, and then rounds to whichever side of the midpoint between ``map[pivot]`` and that neighbour ``x``
    falls (the ends of the map stand in for a side never visited). Every step is a float32 comparison, so this is
    exact for given inputs; the CPU uses a 65,536-point lookup table instead, which can pick another neighbour.
    """
    if not isinstance(code, torch.Tensor) or code.shape != (256,) or code.dtype != torch.float32:
        raise ValueError(f"code must be the 256 float32 values of the dynamic map, got {getattr(code, 'shape', code)}")
    if not isinstance(normalized, torch.Tensor) or normalized.dtype != torch.float32:
        raise ValueError("normalized must be a float32 tensor of values scaled by their block's absmax")
    x = normalized.reshape(-1)
    code = code.to(x.device)
    pivot = torch.full_like(x, 127, dtype=torch.long)
    lower_pivot, upper_pivot = torch.zeros_like(pivot), torch.full_like(pivot, 255)
    lower, upper = torch.full_like(x, -1.0), torch.full_like(x, 1.0)
    value = code[pivot]
    for step in (64, 32, 16, 8, 4, 2, 1):
        right = x > value
        lower_pivot, lower = torch.where(right, pivot, lower_pivot), torch.where(right, value, lower)
        upper_pivot, upper = torch.where(right, upper_pivot, pivot), torch.where(right, upper, value)
        pivot = torch.where(right, pivot + step, pivot - step)
        value = code[pivot]
    upper = torch.where(upper_pivot == 255, code[255], upper)
    lower = torch.where(lower_pivot == 0, code[0], lower)
    right = x > value
    chosen = torch.where(right, torch.where(x > (upper + value) * 0.5, upper_pivot, pivot),
                         torch.where(x < (lower + value) * 0.5, lower_pivot, pivot))
    return chosen.to(torch.uint8).reshape(normalized.shape)


CUDA_RECIPROCAL_ULPS = 1
"""bitsandbytes is built with ``--use_fast_math``: the kernel's ``1.0f / absmax`` becomes PTX ``rcp.approx.f32``,
whose maximum error NVIDIA's PTX ISA gives as 1 ulp. The scaled value ``x * (1 / absmax)`` then differs from the
correctly rounded one by at most that ulp plus its own rounding: ``CUDA_SCALED_VALUE_ULPS``."""
CUDA_SCALED_VALUE_ULPS = CUDA_RECIPROCAL_ULPS + 1


def cuda_ambiguous_absmax_codes(absmax: torch.Tensor, blocksize: int = 256,
                                offset: torch.Tensor | None = None) -> torch.Tensor:
    """Where the CUDA kernel's double-quantization code of each absmax is not determined by exact arithmetic: the
    positions whose scaled value is within ``CUDA_SCALED_VALUE_ULPS`` float32 ulps of a decision boundary of the
    binary search, so that the approximate reciprocal may tip it one step either way (a bool per absmax).
    ``offset``: the mean the kernel subtracted (``quant_state.offset``; by default computed here)."""
    centred, scales = _centred_absmax_blocks(absmax, blocksize, offset)
    code = _dynamic_map_and_lookup()[0]
    normalized = centred * (1.0 / torch.where(scales == 0, torch.ones_like(scales), scales)).unsqueeze(1)
    slack = CUDA_SCALED_VALUE_ULPS * 2.0 ** -23  # relative: one float32 ulp is at most 2^-23 of the value
    below, above = normalized * (1 - slack), normalized * (1 + slack)
    low, high = (dynamic_codes_by_binary_search(v.contiguous(), code) for v in (torch.minimum(below, above),
                                                                                torch.maximum(below, above)))
    return (low != high).reshape(-1)[: absmax.numel()]


def _centred_absmax_blocks(absmax: torch.Tensor, blocksize: int,
                           offset: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The absmax less its mean (or ``offset``), zero-padded into rows of ``blocksize``, and each row's absolute
    maximum."""
    _check_blocksize(blocksize, SUPPORTED_NESTED_BLOCKSIZES, "double quantization")
    centred = absmax - (absmax.mean() if offset is None else torch.as_tensor(offset, dtype=torch.float32).reshape(()))
    blocks = _number_of_blocks(centred.numel(), blocksize)
    padded = torch.zeros(blocks * blocksize, dtype=torch.float32)
    padded[: centred.numel()] = centred
    padded = padded.view(blocks, blocksize)
    return padded, padded.abs().amax(dim=1)


def cuda_double_quantize_absmax(absmax: torch.Tensor, blocksize: int = 256,
                                offset: torch.Tensor | None = None) -> DoubleQuantizedAbsmax:
    """``double_quantize_absmax`` as bitsandbytes' CUDA kernel computes it: the same centring and block scales, the
    codes by its binary search (``dynamic_codes_by_binary_search``) with an exact reciprocal, so that the stored
    codes equal these except where ``cuda_ambiguous_absmax_codes`` says the fast reciprocal may tip them.
    ``offset``: the mean the kernel subtracted (``quant_state.offset``: a GPU sums in another order, so pass it to
    emulate the codes of a stored state); by default computed here."""
    double_quantize_absmax(absmax, blocksize)  # validates the input as the CPU path does
    padded, scales = _centred_absmax_blocks(absmax, blocksize, offset)
    normalized = padded * (1.0 / torch.where(scales == 0, torch.ones_like(scales), scales)).unsqueeze(1)
    codes = dynamic_codes_by_binary_search(normalized.contiguous(), _dynamic_map_and_lookup()[0])
    used_offset = absmax.mean() if offset is None else torch.as_tensor(offset, dtype=torch.float32).reshape(())
    return DoubleQuantizedAbsmax(codes.reshape(-1)[: absmax.numel()], scales, used_offset)


def dequantize_absmax(
    codes: torch.Tensor, scales: torch.Tensor, offset: torch.Tensor | float, blocksize: int = 256
) -> torch.Tensor:
    """Rebuild the float32 absmax from its double-quantized state: ``map[code] * scale[block] + offset``."""
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8 or codes.dim() != 1 or codes.numel() == 0:
        raise ValueError("dequantize_absmax needs the 1-D uint8 codes (quant_state.absmax of a double-quantized "
                         f"state), got {getattr(codes, 'dtype', type(codes).__name__)} with shape "
                         f"{tuple(getattr(codes, 'shape', ()))}.")
    _check_blocksize(blocksize, SUPPORTED_NESTED_BLOCKSIZES, "dequantize_absmax")
    blocks = _number_of_blocks(codes.numel(), blocksize)
    if not isinstance(scales, torch.Tensor) or scales.dtype != torch.float32 or scales.shape != (blocks,):
        raise ValueError(f"dequantize_absmax needs {blocks} float32 scales (one per {blocksize} codes; "
                         "quant_state.state2.absmax), got "
                         f"{getattr(scales, 'dtype', type(scales).__name__)} with shape "
                         f"{tuple(getattr(scales, 'shape', ()))}; check the blocksize.")
    if scales.device != codes.device:
        raise ValueError(f"dequantize_absmax needs codes and scales on one device, got {codes.device} and "
                         f"{scales.device}.")
    offset = torch.as_tensor(offset, dtype=torch.float32, device=codes.device)
    if offset.numel() != 1:
        raise ValueError(f"dequantize_absmax needs one offset (quant_state.offset), got {offset.numel()} values.")
    code = _dynamic_map_and_lookup()[0].to(codes.device)  # on the codes' device: a CUDA state stays on CUDA
    padded = torch.zeros(blocks * blocksize, dtype=torch.long, device=codes.device)
    padded[: codes.numel()] = codes.long()
    values = (code[padded].view(blocks, blocksize) * scales.unsqueeze(1)).reshape(-1)[: codes.numel()]
    return values + offset.reshape(())


def bits_per_parameter(blocksize: int = 64, double_quant: bool = False, blocksize2: int = 256) -> float:
    """Storage bits per weight of NF4: the 4-bit code plus each block's share of its scale.

    Without double quantization every block of ``blocksize`` codes carries a float32 absmax; with it, an 8-bit
    code per block plus a float32 scale per ``blocksize2`` blocks. Per-tensor constants (the offset, the code
    tables) do not grow with the weight and are left out.
    """
    _check_blocksize(blocksize, SUPPORTED_4BIT_BLOCKSIZES, "bits_per_parameter")
    if double_quant:
        _check_blocksize(blocksize2, SUPPORTED_NESTED_BLOCKSIZES, "bits_per_parameter (blocksize2)")
    code_bits = math.log2(_bnb_nf4_levels().numel())
    float32_bits = torch.finfo(torch.float32).bits
    if not double_quant:
        return code_bits + float32_bits / blocksize
    nested_code_bits = math.log2(dynamic_8bit_map().numel())
    return code_bits + nested_code_bits / blocksize + float32_bits / (blocksize * blocksize2)


# ----------------------------------------------------------------------------------------------------------
# Reading what bitsandbytes stored, and timing against it.
# ----------------------------------------------------------------------------------------------------------


class StoredNF4(NamedTuple):
    """A Linear4bit's weight as bitsandbytes stores it before any forward pass."""

    packed: torch.Tensor  # 1-D uint8, two codes per byte
    absmax: torch.Tensor  # 1-D float32 per block (rebuilt from the nested state when double-quantized)
    shape: torch.Size
    blocksize: int
    quant_type: str
    nested: DoubleQuantizedAbsmax | None  # the 8-bit absmax state, or None without double quantization


def nf4_storage_of(module: torch.nn.Module) -> StoredNF4:
    """Read the bytes and scales a bitsandbytes ``Linear4bit`` holds, in the layout ``quantize_nf4`` returns.

    On a CPU with AVX512-BF16, bitsandbytes repacks the weight at the first inference forward (another byte
    order, absmax undone from double quantization, transposed and cast to bfloat16): read the storage before
    running the model, or from a freshly loaded copy.
    """
    weight = getattr(module, "weight", None)
    state = getattr(weight, "quant_state", None)
    if state is None:
        raise ValueError(f"{type(module).__name__} has no 4-bit quant_state: pass a bitsandbytes Linear4bit that "
                         "has been quantized (moved to its device or loaded with a 4-bit BitsAndBytesConfig).")
    if getattr(state, "packing_format_for_cpu", False):
        raise ValueError("this Linear4bit was repacked for bitsandbytes' CPU kernel by a forward pass; read its "
                         "storage before running the model, or load a fresh copy.")
    nested = None
    absmax = state.absmax
    if state.nested:
        nested = DoubleQuantizedAbsmax(state.absmax.reshape(-1), state.state2.absmax, state.offset)
        absmax = dequantize_absmax(*nested, blocksize=state.state2.blocksize)
    return StoredNF4(weight.data.reshape(-1).view(torch.uint8), absmax, torch.Size(state.shape), state.blocksize,
                     state.quant_type, nested)


def int8_storage_of(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, scales)`` a bitsandbytes ``Linear8bitLt`` holds: int8 ``CB`` and float32 ``SCB``.

    Before the first forward they sit on ``module.weight``; the first forward moves them to ``module.state``
    (``weight.CB``/``weight.SCB`` become None, ``weight.data`` stays the int8 values). Both places are read.
    """
    for holder in (getattr(module, "weight", None), getattr(module, "state", None)):
        values, scales = getattr(holder, "CB", None), getattr(holder, "SCB", None)
        if isinstance(values, torch.Tensor) and isinstance(scales, torch.Tensor):
            return values, scales
    raise ValueError(f"{type(module).__name__} holds no int8 CB/SCB: pass a bitsandbytes Linear8bitLt loaded "
                     "with has_fp16_weights=False (a BitsAndBytesConfig(load_in_8bit=True) load does that).")


# ----------------------------------------------------------------------------------------------------------
# The int8 matrix product: exact integers, whichever kernel bitsandbytes picks
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Int8MatmulCheck:
    """What ``int8_matmul_check`` found: which kernel multiplies int8 codes here, and whether its products are
    the exact integers."""

    kernel: str
    products: int
    wrong: int
    largest_error: int

    @property
    def exact(self) -> bool:
        return self.wrong == 0

    def describe(self) -> str:
        verdict = "all exact" if self.exact else f"{self.wrong:,} wrong, off by up to {self.largest_error:,}"
        return f"{self.kernel}: {self.products:,} products, {verdict}"


def int8_matmul_kernel(device_type: str = "cpu") -> str:
    """The kernel bitsandbytes 0.50.2 multiplies int8 activations by int8 weights with, in words.

    On a CPU it follows PyTorch's CPU capability (the pinned one, not the CPU's best): ``torch._int_mm`` (oneDNN's
    integer GEMM) when it is AVX512, else a float32 matmul of the codes turned back into int32, exact as long as
    every partial sum stays below 2**24 (any input width up to 1,040 at the extreme codes +-127).
    """
    if device_type == "cuda":
        return "bitsandbytes' CUDA int8 GEMM (int32 accumulation)"
    if device_type != "cpu":
        raise ValueError(f"device_type must be 'cpu' or 'cuda', got {device_type!r}.")
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        return "torch._int_mm (PyTorch's CPU capability is AVX512)"
    return "a float32 matmul of the int8 codes, turned into int32"


def int8_probe_operands(rows: int = 16, columns: int = 256, outputs: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic int8 activations (rows x columns) and weights (outputs x columns) for ``int8_matmul_check``.

    They include rows and weight rows of +-127 (the largest products, where a kernel with 16-bit intermediate
    sums saturates) and a spread of every code from -127 to 127.
    """
    if min(rows, columns, outputs) < 2 or columns % 2:
        raise ValueError(f"need at least 2 rows and outputs and an even number of columns (>= 2), got "
                         f"{rows}, {columns}, {outputs}")
    k = torch.arange(columns)
    a = torch.stack([(k * (7 + 2 * i) + 3 * i) % 255 - 127 for i in range(rows)])
    b = torch.stack([(k * (11 + 2 * j) + 5 * j) % 255 - 127 for j in range(outputs)])
    a[0], b[0] = 127, 127
    b[1] = torch.where(k % 2 == 0, 127, -127)
    return a.to(torch.int8), b.to(torch.int8)


def saturating_int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T`` for int8 ``a`` (M x K) and ``b`` (N x K) the way an integer GEMM without VNNI computes it.

    x86's ``vpmaddubsw`` multiplies unsigned by signed bytes and adds neighbouring pairs into a *saturating* 16-bit
    sum. So the kernel shifts ``a`` by +128 into unsigned bytes, sums pairs clipped to [-32768, 32767], adds the
    pairs in 32 bits and subtracts ``128 * sum(b)``. Whenever a pair exceeds 16 bits (255 * 127 * 2 = 64,770 at
    most) the result is wrong. This reproduces ``torch._int_mm`` under ``ONEDNN_MAX_CPU_ISA=AVX2`` bit for bit
    (tests/test_quantization.py). Memory grows as M * N * K: for probes, not for models.
    """
    if a.dtype != torch.int8 or b.dtype != torch.int8 or a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"need two 2-D int8 tensors with the same number of columns, got {a.dtype} "
                         f"{tuple(a.shape)} and {b.dtype} {tuple(b.shape)}")
    if a.shape[1] % 2:
        raise ValueError(f"the pairwise kernel needs an even number of columns, got {a.shape[1]}")
    products = (a.long() + 128)[:, None, :] * b.long()[None, :, :]
    pairs = (products[..., 0::2] + products[..., 1::2]).clamp(-32768, 32767)
    return (pairs.sum(-1) - 128 * b.long().sum(-1)[None, :]).to(torch.int32)


def int8_matmul_check(device: str | torch.device = "cpu", matmul=None, kernel: str | None = None) -> Int8MatmulCheck:
    """Multiply ``int8_probe_operands`` with bitsandbytes' int8 matmul (or ``matmul(A, B) -> int32 A @ B.T``) and
    compare every product with the exact one, computed in int64. ``kernel`` names a ``matmul`` you pass.

    LLM.int8's products must be exact integers: all of its rounding happens before (the codes) and after (the
    scales). A wrong kernel is not a rounding difference: oneDNN's AVX2 integer GEMM adds pairs of 8-bit products
    in saturating 16-bit arithmetic, which ``torch._int_mm`` reaches when PyTorch's capability is AVX512 while
    oneDNN is capped at AVX2.
    """
    device = torch.device(device)
    a, b = int8_probe_operands()
    if kernel is None:
        kernel = int8_matmul_kernel(device.type) if matmul is None else getattr(matmul, "__name__", "custom kernel")
    if matmul is None:
        import bitsandbytes  # noqa: F401  (registers the op)

        matmul = torch.ops.bitsandbytes.int8_linear_matmul.default
    result = matmul(a.to(device), b.to(device)).cpu().long()
    exact = a.long() @ b.long().T
    if result.shape != exact.shape:
        raise ValueError(f"the int8 matmul returned shape {tuple(result.shape)}, expected {tuple(exact.shape)}")
    difference = (result - exact).abs()
    return Int8MatmulCheck(kernel, exact.numel(), int((difference > 0).sum()), int(difference.max()))


def require_exact_int8_matmul(device: str | torch.device = "cpu") -> Int8MatmulCheck:
    """``int8_matmul_check``, raising a RuntimeError that says how to fix the environment when products are wrong."""
    check = int8_matmul_check(device)
    if not check.exact:
        pins = ", ".join(f"{name}={os.environ.get(name, '(unset)')}" for name in ("ATEN_CPU_CAPABILITY",
                                                                                 "ONEDNN_MAX_CPU_ISA"))
        raise RuntimeError(
            f"bitsandbytes' int8 matmul gives wrong integer products on this machine ({check.describe()}; {pins}). "
            "LLM.int8 results would be silently wrong. This happens when PyTorch's CPU capability is AVX512 (so "
            "bitsandbytes uses torch._int_mm) while oneDNN is limited to AVX2 (ONEDNN_MAX_CPU_ISA). "
            "Fix: unset ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA before starting Python and import helpers first "
            "(the course's pins: AVX2 kernels, where bitsandbytes multiplies in float32, exactly), or set "
            "ATEN_CPU_CAPABILITY=avx2.")
    return check


class QuantizeTiming(NamedTuple):
    """Best-of-``repeats`` wall-clock seconds of both quantizers on the same weight."""

    from_scratch_seconds: float
    bitsandbytes_seconds: float
    ratio: float  # from scratch / bitsandbytes: below 1 means ours is faster
    identical: bool  # same bytes and same absmax


def time_against_bitsandbytes(weight: torch.Tensor, blocksize: int = 64, repeats: int = 5) -> QuantizeTiming:
    """Time ``quantize_nf4`` and bitsandbytes' ``quantize_4bit`` side by side, alternating, keeping the minimum.

    Alternating the two and keeping each one's fastest run cancels most of the noise of a busy machine.
    """
    import bitsandbytes.functional as bnb_functional  # only here: the rest of the module never needs it

    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}.")
    _check_weight(weight, BNB_4BIT_INPUT_DTYPES, "time_against_bitsandbytes")
    _check_blocksize(blocksize, SUPPORTED_4BIT_BLOCKSIZES, "time_against_bitsandbytes")

    def run_bitsandbytes():
        packed, state = bnb_functional.quantize_4bit(weight, blocksize=blocksize, quant_type="nf4",
                                                     compress_statistics=False)
        return packed, state.absmax

    def run_from_scratch():
        return quantize_nf4(weight, blocksize)

    ours, theirs = run_from_scratch(), run_bitsandbytes()  # warm-up, and the equality check
    identical = torch.equal(ours[0], theirs[0].reshape(-1)) and torch.equal(ours[1], theirs[1])
    best = {run_from_scratch: math.inf, run_bitsandbytes: math.inf}
    for _ in range(repeats):
        for run in best:
            start = time.perf_counter()
            run()
            best[run] = min(best[run], time.perf_counter() - start)
    return QuantizeTiming(best[run_from_scratch], best[run_bitsandbytes],
                          best[run_from_scratch] / best[run_bitsandbytes], identical)


# --------------------------------------------------------------------------------------------- our codes vs theirs

CUDA_CODE_TOLERANCES: dict[str, tuple[float, str]] = {
    "int8": (1e-5, "bitsandbytes' CUDA kernel takes 127 / absmax with a fast approximate division (__fdividef, "
                   "2 ulps), so a code whose exact value lies on a rounding boundary may land one step away: pass "
                   "cuda_ambiguous_int8_codes as compare_codes' ambiguous to allow exactly those"),
    "nf4": (1e-5, "bitsandbytes' CUDA kernel scales each value by a fast approximate reciprocal of its block's "
                  "absmax before comparing it with the exact float32 midpoints, so a value on a midpoint may rarely "
                  "go the other way"),
    "absmax-8bit": (0.0, "on CUDA the 8-bit codes of the double-quantized scales come from a binary search over the "
                         "dynamic map (cuda_double_quantize_absmax emulates it exactly), on the CPU from a lookup "
                         "table; only a value the fast reciprocal may tip can differ (cuda_ambiguous_absmax_codes)"),
}
"""Per kind of code: the share of codes that may differ (each by one step) on a CUDA device, and why. On the CPU
bitsandbytes computes exactly what ``helpers.quantization`` computes, so no difference is allowed there."""


@dataclass(frozen=True)
class CodeComparison:
    """From-scratch codes against the codes bitsandbytes stored, with the tolerance of the device that stored them."""

    kind: str
    device_type: str
    n_codes: int
    n_different: int
    max_step: int
    allowed_share: float
    n_ambiguous: int | None = None  # with an exact emulation: codes the hardware's approximation may tip
    n_different_elsewhere: int = 0  # differences outside those positions (none allowed)

    @property
    def exact(self) -> bool:
        return self.n_different == 0

    @property
    def within_tolerance(self) -> bool:
        """Exact on the CPU; on CUDA, against an exact emulation, differences only at ambiguous positions (one step
        each); otherwise at most ``allowed_share`` of the codes differ, each by at most one step."""
        if self.n_ambiguous is not None:
            return self.exact or (self.max_step <= 1 and self.n_different_elsewhere == 0)
        return self.exact or (self.max_step <= 1 and self.n_different <= self.allowed_share * self.n_codes)

    def describe(self) -> str:
        if self.n_ambiguous is not None:
            return (f"{self.n_different:,} of {self.n_codes:,} codes differ, {self.n_different_elsewhere:,} of them "
                    f"outside the {self.n_ambiguous:,} a fast reciprocal may tip ({self.device_type}, exact emulation)")
        rule = "exactly" if self.allowed_share == 0 else f"up to {self.allowed_share:.0e} of codes one step away"
        return f"{self.n_different:,} of {self.n_codes:,} codes differ ({self.device_type}: {rule})"


def compare_codes(ours: torch.Tensor, theirs: torch.Tensor, kind: str, device_type: str,
                  ambiguous: torch.Tensor | None = None) -> CodeComparison:
    """Compare integer codes (int8 weights, NF4 indices, 8-bit scale codes) element by element.

    ``device_type`` is where bitsandbytes computed ``theirs`` ("cpu" or "cuda"): it decides the tolerance
    (``CUDA_CODE_TOLERANCES``; none on the CPU). The tensors must have the same shape and an integer dtype.
    """
    if kind not in CUDA_CODE_TOLERANCES:
        raise ValueError(f"Unknown kind of code {kind!r}; choose one of {', '.join(CUDA_CODE_TOLERANCES)}.")
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"device_type must be 'cpu' or 'cuda', got {device_type!r}.")
    for name, codes in (("ours", ours), ("theirs", theirs)):
        if not isinstance(codes, torch.Tensor) or codes.is_floating_point() or codes.is_complex():
            raise TypeError(f"compare_codes compares integer codes; {name} is "
                            f"{getattr(codes, 'dtype', type(codes).__name__)}.")
    if ours.shape != theirs.shape:
        raise ValueError(f"compare_codes needs equal shapes, got {tuple(ours.shape)} and {tuple(theirs.shape)}.")
    steps = (ours.cpu().long() - theirs.cpu().long()).abs()
    if ambiguous is not None:  # an exact emulation: only where the hardware's approximation may tip a code
        if ambiguous.shape != ours.shape or ambiguous.dtype != torch.bool:
            raise ValueError("ambiguous must be a bool tensor of the codes' shape")
        if device_type != "cuda":
            raise ValueError("ambiguous positions apply to a CUDA kernel's codes only; the CPU's are exact")
        outside = int(((steps > 0) & ~ambiguous.cpu()).sum())
        return CodeComparison(kind, device_type, ours.numel(), int((steps > 0).sum()),
                              int(steps.max()) if steps.numel() else 0, 0.0, int(ambiguous.sum()), outside)
    allowed = CUDA_CODE_TOLERANCES[kind][0] if device_type == "cuda" else 0.0
    return CodeComparison(kind, device_type, ours.numel(), int((steps > 0).sum()),
                          int(steps.max()) if steps.numel() else 0, allowed)


# ----------------------------------------------------------------------------------------------------------
# Fake quantization with bitsandbytes: the weights a 4-bit layer computes with, at any block size.
# ----------------------------------------------------------------------------------------------------------


def bnb_4bit_round_trip(weight: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4",
                        double_quant: bool = False) -> tuple[torch.Tensor, int]:
    """``(dequantized, stored_bytes)``: ``weight`` through bitsandbytes' ``quantize_4bit`` and ``dequantize_4bit``.

    ``dequantized`` has the weight's shape, dtype and device: what a ``Linear4bit`` holding these codes multiplies
    by. ``stored_bytes`` counts every tensor that would be kept: the packed codes and the quant state (absmax, the
    16-value table and, with ``double_quant``, the 8-bit scales' own scales, map and offset).

    The weight goes through as one flat row. bitsandbytes quantizes in flat order anyway (the codes and scales are
    the same), and a single row is the one shape where every dequantize kernel reads the scales the quantizer
    wrote: bitsandbytes 0.50.2's native AVX-512 CPU kernel (picked by the CPU, whatever PyTorch's pins say) indexes
    them row by row, which is wrong when a block spans two rows (a block size above the row length). On a GPU, and
    on a CPU without AVX-512, the flat and the 2-D round trips give the same bits.
    """
    import bitsandbytes.functional as bnb_functional

    _check_weight(weight, BNB_4BIT_INPUT_DTYPES, "bnb_4bit_round_trip")
    _check_blocksize(blocksize, SUPPORTED_4BIT_BLOCKSIZES, "bnb_4bit_round_trip")
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type must be 'nf4' or 'fp4' (bitsandbytes' two 4-bit tables), got {quant_type!r}.")
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be True or False, got {double_quant!r}.")
    packed, state = bnb_functional.quantize_4bit(weight.detach().reshape(-1), blocksize=blocksize,
                                                 quant_type=quant_type, compress_statistics=double_quant)
    kept = [packed, state.absmax, state.code]
    if state.nested:
        kept += [state.state2.absmax, state.state2.code, state.offset]
    dequantized = bnb_functional.dequantize_4bit(packed, state).reshape(weight.shape).to(weight.dtype)
    return dequantized, sum(t.nbytes for t in kept)


@torch.no_grad()
def bnb_4bit_round_trip_(model: torch.nn.Module, blocksize: int = 64, quant_type: str = "nf4",
                         double_quant: bool = False) -> float:
    """Replace every decoder-layer Linear weight by its bitsandbytes 4-bit round trip, in place (fake quantization).

    The model keeps computing in its own dtype, with the very weights a 4-bit load with this block size would
    dequantize to, so its quality is the 4-bit model's quality (up to the compute dtype). Returns the true bits
    per weight over those weights, counted from the stored tensors (``bnb_4bit_round_trip``). The same Linears as
    ``helpers.groupwise.round_to_nearest_``: q/k/v/o and gate/up/down; embeddings and lm_head stay.
    """
    from helpers.groupwise import decoder_linears

    stored, count = 0, 0
    for _, module in decoder_linears(model):
        dequantized, stored_bytes = bnb_4bit_round_trip(module.weight.data, blocksize, quant_type, double_quant)
        module.weight.data.copy_(dequantized)
        stored += stored_bytes
        count += module.weight.numel()
    return stored * 8 / count


@torch.no_grad()
def round_trip_error_by_layer(model: torch.nn.Module, blocksize: int = 64, quant_type: str = "nf4",
                              double_quant: bool = False) -> list[float]:
    """Relative error ``||W_hat - W|| / ||W||`` of each decoder layer's Linear weights after a bitsandbytes 4-bit
    round trip (all seven weights of a layer together), without changing the model. One float per layer."""
    from helpers.groupwise import decoder_linears

    squared: dict[int, list[float]] = {}
    for name, module in decoder_linears(model):
        layer = int(name.split(".layers.", 1)[1].split(".", 1)[0])
        weight = module.weight.data
        rebuilt, _ = bnb_4bit_round_trip(weight, blocksize, quant_type, double_quant)
        sums = squared.setdefault(layer, [0.0, 0.0])
        sums[0] += (rebuilt.double() - weight.double()).pow(2).sum().item()
        sums[1] += weight.double().pow(2).sum().item()
    return [(error / norm) ** 0.5 for _, (error, norm) in sorted(squared.items())]


# ----------------------------------------------------------------------------------------------------------
# What a 4-bit layer holds while it computes: does the dequantized weight exist as a whole tensor?
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DenseWeightUse:
    """One time a 4-bit layer's weight entered a matrix product as an ordinary dense tensor (all of it at once)."""

    function: str  # the PyTorch function it was passed to
    dtype: torch.dtype
    nbytes: int  # bytes of that temporary copy


DENSE_MATMUL_FUNCTIONS = ("torch.nn.functional.linear", "torch.matmul")
"""Where bitsandbytes 0.50.2 hands a fully dequantized weight to PyTorch: the forward's fallback (its CPU path, and
CUDA beyond a few tokens) calls ``F.linear``, ``MatMul4Bit.backward`` calls ``torch.matmul``."""


def dense_weight_uses(layer: torch.nn.Module, tokens: int, backward: bool = False,
                      seed: int = 0) -> list[DenseWeightUse]:
    """Run a bitsandbytes ``Linear4bit`` on ``tokens`` random inputs and list every dense copy of its whole weight.

    For the duration of one call (and, with ``backward=True``, the backward pass of the output's sum) the two
    PyTorch functions every dense matrix product of bitsandbytes goes through (``DENSE_MATMUL_FUNCTIONS``) are
    wrapped; each argument shaped like the layer's full weight ``(out_features, in_features)`` is recorded. A fused
    kernel, which unpacks the codes tile by tile inside the product, records nothing. Inputs come from
    ``helpers.environment.portable_randn``, so a CPU records the same list everywhere.
    """
    import bitsandbytes as bnb
    from unittest import mock

    from helpers.environment import portable_randn

    if not isinstance(layer, bnb.nn.Linear4bit):
        raise TypeError(f"dense_weight_uses watches a bitsandbytes Linear4bit, got {type(layer).__name__}; pass a "
                        "layer of a model loaded in 4 bits, e.g. model.get_submodule('model.layers.0.mlp.up_proj').")
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"tokens must be a positive int, got {tokens!r}.")
    weight_shape = (layer.out_features, layer.in_features)
    if tokens in weight_shape:
        raise ValueError(f"tokens={tokens} equals a dimension of the weight {weight_shape}, so an activation could "
                         "be mistaken for the weight; choose another count.")
    uses: list[DenseWeightUse] = []

    def watched(name, function):
        def wrapper(*args, **kwargs):
            for value in (*args, *kwargs.values()):
                if (isinstance(value, torch.Tensor) and value.is_floating_point()
                        and tuple(value.shape) == weight_shape):
                    uses.append(DenseWeightUse(name, value.dtype, value.nbytes))
            return function(*args, **kwargs)
        return wrapper

    device = layer.weight.device
    x = portable_randn(tokens, layer.in_features, seed=seed).to(device).requires_grad_(backward)
    linear, matmul = torch.nn.functional.linear, torch.matmul
    with mock.patch("torch.nn.functional.linear", watched(DENSE_MATMUL_FUNCTIONS[0], linear)), \
            mock.patch("torch.matmul", watched(DENSE_MATMUL_FUNCTIONS[1], matmul)), \
            torch.set_grad_enabled(backward):
        output = layer(x)
        if backward:
            output.float().sum().backward()
    return uses
