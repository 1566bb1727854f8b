"""The basics of notebook 00: floating-point formats bit by bit, and linear quantization from scratch.

Floating point. A float is ``(-1)**sign * 2**(exponent - bias) * 1.mantissa`` (a *normal* number); float32, float16
and bfloat16 differ only in how many bits the exponent and the mantissa get. ``float_format`` reads the layout of a
dtype, ``float_bits`` takes one value apart with plain arithmetic (no bit tricks), ``torch_bits`` reads the same bits
the way torch stores them, so the two can be compared.

Linear quantization. A float ``x`` becomes an integer code and comes back approximately::

    code = clamp(round(x / scale + zero_point), q_min, q_max)      quantize
    x_hat = (code - zero_point) * scale                              dequantize

* absmax (symmetric): ``scale = max|x| / (2**(bits-1) - 1)``, ``zero_point = 0``, codes in ``[-q_max, q_max]``;
* zero point (asymmetric): ``scale = (max - min) / (2**bits - 1)`` and ``zero_point = round(q_min - min / scale)``,
  signed codes in ``[-2**(bits-1), 2**(bits-1) - 1]``. The range is first widened to contain 0, so that 0.0 is
  exactly a code (the zero point) and comes back as exactly 0.0.

Rounding is half to even (``torch.round``), as in compressed-tensors, whose ``fake_quantize`` computes the same
values in the same order (tests/test_basics.py checks it, and ``torch.quantize_per_tensor``/``per_channel``).

Granularity: one (scale, zero point) per tensor, per row ("channel": a weight's output feature) or per group of
``group_size`` consecutive weights of a row. Every function computes its parameters over the last dimension of a 2-D
view, ``as_rows``, whose rows are the tensor, the rows or the groups.

Errors are summed with ``math.fsum`` (exact, order-free), so a printed error is the same on every CPU and thread count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
GRANULARITIES = ("tensor", "channel", "group")
_SIGNED_VIEW = {32: torch.int32, 16: torch.int16}


# --- floating-point formats -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FloatFormat:
    """How a floating-point dtype spends its bits, and what that buys (from ``torch.finfo`` and the layout)."""

    dtype: torch.dtype
    bits: int
    exponent_bits: int
    mantissa_bits: int
    bias: int
    largest: float  # the largest finite value
    smallest_normal: float  # the smallest positive value with full precision
    smallest_subnormal: float  # the smallest positive value at all
    eps: float  # the spacing of representable values at 1.0

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def _check_float_dtype(dtype: object) -> torch.dtype:
    if dtype not in FLOAT_DTYPES:
        names = ", ".join(str(d) for d in FLOAT_DTYPES)
        raise ValueError(f"expected one of {names}, got {dtype!r}")
    return dtype  # type: ignore[return-value]


def float_format(dtype: torch.dtype) -> FloatFormat:
    """The layout of ``dtype``: 1 sign bit, then exponent bits, then mantissa bits, with its range and precision."""
    info = torch.finfo(_check_float_dtype(dtype))
    mantissa_bits = -int(math.log2(info.eps))  # eps = 2**-mantissa_bits: one unit of the last mantissa bit at 1.0
    exponent_bits = info.bits - 1 - mantissa_bits
    bias = 2 ** (exponent_bits - 1) - 1
    return FloatFormat(dtype, info.bits, exponent_bits, mantissa_bits, bias, float(info.max),
                       float(info.smallest_normal), 2.0 ** (1 - bias - mantissa_bits), float(info.eps))


@dataclass(frozen=True)
class FloatBits:
    """One value of a float dtype taken apart: sign, biased exponent and mantissa as integers."""

    format: FloatFormat
    sign: int
    exponent: int
    mantissa: int

    @property
    def pattern(self) -> int:
        """The whole bit pattern as an unsigned integer: sign, exponent, mantissa, left to right."""
        f = self.format
        return (self.sign << (f.bits - 1)) | (self.exponent << f.mantissa_bits) | self.mantissa

    def fields(self) -> str:
        """The bits as text, the three fields separated by spaces: ``'1 10000001 1001000...'``."""
        f = self.format
        return f"{self.sign} {self.exponent:0{f.exponent_bits}b} {self.mantissa:0{f.mantissa_bits}b}"

    def value(self) -> float:
        """The number these bits stand for, computed back from the fields."""
        f = self.format
        if self.exponent == 2**f.exponent_bits - 1:  # all ones: infinity or NaN
            return math.nan if self.mantissa else (-1) ** self.sign * math.inf
        if self.exponent == 0:  # subnormal (or zero): no implicit leading 1, the smallest exponent
            magnitude = self.mantissa * 2.0 ** (1 - f.bias - f.mantissa_bits)
        else:
            magnitude = (1 + self.mantissa / 2**f.mantissa_bits) * 2.0 ** (self.exponent - f.bias)
        return -magnitude if self.sign else magnitude


def stored_value(value: float, dtype: torch.dtype) -> float:
    """``value`` as ``dtype`` stores it (rounded to the nearest representable value), back as a Python float."""
    return torch.tensor(float(value), dtype=_check_float_dtype(dtype)).item()


def float_bits(value: float, dtype: torch.dtype) -> FloatBits:
    """Take ``value``, as ``dtype`` stores it, apart into sign, biased exponent and mantissa, by arithmetic alone.

    ``math.frexp`` writes a number as ``m * 2**e`` with ``0.5 <= m < 1``, so ``1.mantissa = 2m`` and the unbiased
    exponent is ``e - 1``. Values below the smallest normal are subnormal: exponent field 0, no implicit 1.
    """
    f = float_format(dtype)
    stored = stored_value(value, dtype)
    sign = 1 if math.copysign(1.0, stored) < 0 else 0
    magnitude = abs(stored)
    if math.isnan(stored):
        return FloatBits(f, sign, 2**f.exponent_bits - 1, 1 << (f.mantissa_bits - 1))
    if math.isinf(stored):
        return FloatBits(f, sign, 2**f.exponent_bits - 1, 0)
    if magnitude < f.smallest_normal:  # zero or subnormal
        return FloatBits(f, sign, 0, int(magnitude / f.smallest_subnormal))
    m, e = math.frexp(magnitude)
    mantissa = int((2 * m - 1) * 2**f.mantissa_bits)  # exact: the stored value has only mantissa_bits bits
    return FloatBits(f, sign, e - 1 + f.bias, mantissa)


def torch_bits(value: float, dtype: torch.dtype) -> int:
    """The bit pattern torch stores for ``value`` in ``dtype``, read by viewing its memory as an integer."""
    f = float_format(dtype)
    as_int = torch.tensor(float(value), dtype=dtype).view(_SIGNED_VIEW[f.bits]).item()
    return as_int & (2**f.bits - 1)  # the signed view's pattern as an unsigned integer


def spacing(value: float, dtype: torch.dtype) -> float:
    """The gap between the stored ``value`` (finite) and the next representable ``dtype`` value away from zero.

    Within one power of two the gap is constant: ``2**(exponent - mantissa_bits)``, one unit in the last place.
    """
    bits = float_bits(value, dtype)
    f = bits.format
    if bits.exponent == 2**f.exponent_bits - 1:
        raise ValueError(f"{value!r} is not finite in {f.name}: it has no spacing")
    exponent = max(bits.exponent, 1) - f.bias  # subnormals share the smallest normal exponent
    return 2.0 ** (exponent - f.mantissa_bits)


# --- linear quantization --------------------------------------------------------------------------------------


class Quantized(NamedTuple):
    """A tensor quantized with one (scale, zero point) per row of its ``as_rows`` view.

    codes: int8 (bits <= 8) in the tensor's shape; scales, zero_points: float32 / int32, shape ``(rows, 1)`` of the
    view (zero_points all 0 for absmax); dequantized: float32 in the tensor's shape.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zero_points: torch.Tensor
    dequantized: torch.Tensor
    bits: int
    symmetric: bool
    granularity: str
    group_size: int | None


def _check_bits(bits: object) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int from 2 to 8 (codes are stored in int8), got {bits!r}")
    return bits


def _check_float_tensor(x: object, what: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{what} must be a floating-point tensor, got {x.dtype}: quantize floats, not codes")
    if x.numel() == 0:
        raise ValueError(f"{what} is empty")
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} holds inf or NaN: no finite scale covers it")
    return x


def code_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """The smallest and largest code: ``(-q_max, q_max)`` for absmax, ``(-2**(bits-1), 2**(bits-1) - 1)`` else.

    absmax leaves the most negative code unused, so that its grid is symmetric around 0.
    """
    q_max = 2 ** (_check_bits(bits) - 1) - 1
    return (-q_max, q_max) if symmetric else (-q_max - 1, q_max)


def absmax_scale(rows: torch.Tensor, bits: int) -> torch.Tensor:
    """One scale per row: the row's largest magnitude maps to the largest code. Shape ``(rows, 1)``."""
    q_max = code_range(bits, symmetric=True)[1]
    scale = _check_float_tensor(rows, "rows").float().abs().amax(dim=-1, keepdim=True) / q_max
    return torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: any scale gives codes 0


def zero_point_scale(rows: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One (scale, zero point) per row: the row's range, widened to contain 0, spread over all ``2**bits`` codes."""
    q_min, q_max = code_range(bits, symmetric=False)
    rows = _check_float_tensor(rows, "rows").float()
    low = rows.amin(dim=-1, keepdim=True).clamp(max=0)
    high = rows.amax(dim=-1, keepdim=True).clamp(min=0)
    scale = (high - low) / (q_max - q_min)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero_point = torch.round(q_min - low / scale).clamp(q_min, q_max).to(torch.int32)
    return scale, zero_point


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | int,
             q_min: int, q_max: int) -> torch.Tensor:
    """Codes for ``x``: divide by the scale, shift by the zero point, round to the nearest integer, clip."""
    shifted = x / scale + zero_point
    return torch.clamp(torch.round(shifted), q_min, q_max)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | int = 0) -> torch.Tensor:
    """Back to floats: undo the shift, then the division. What is lost in rounding and clipping stays lost."""
    return (codes.float() - zero_point) * scale


def as_rows(x: torch.Tensor, granularity: str, group_size: int | None = None) -> torch.Tensor:
    """A 2-D view of a matrix whose rows share one scale: the whole tensor, each row, or each group of a row."""
    x = _check_float_tensor(x)
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
    if (granularity == "group") != (group_size is not None):
        raise ValueError("group_size is needed for granularity='group', and only for it")
    if granularity == "tensor":
        return x.reshape(1, -1)
    if x.dim() != 2:
        raise ValueError(f"per-{granularity} quantization needs a matrix (out_features, in_features), "
                         f"got shape {tuple(x.shape)}")
    if granularity == "channel":
        return x
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 \
            or x.shape[1] % group_size:
        raise ValueError(f"group_size must be a positive int dividing the {x.shape[1]} columns, got {group_size!r}")
    return x.reshape(-1, group_size)


def quantize_tensor(x: torch.Tensor, bits: int, symmetric: bool = True, granularity: str = "tensor",
                    group_size: int | None = None) -> Quantized:
    """Quantize ``x`` with absmax (``symmetric``) or a zero point, one scale per tensor, channel or group."""
    rows = as_rows(x, granularity, group_size).float()
    q_min, q_max = code_range(bits, symmetric)
    if symmetric:
        scales, zero_points = absmax_scale(rows, bits), torch.zeros(rows.shape[0], 1, dtype=torch.int32)
    else:
        scales, zero_points = zero_point_scale(rows, bits)
    codes = quantize(rows, scales, zero_points, q_min, q_max)
    dequantized = dequantize(codes, scales, zero_points)
    return Quantized(codes.to(torch.int8).reshape(x.shape), scales, zero_points, dequantized.reshape(x.shape),
                     bits, symmetric, granularity, group_size)


# --- measuring the damage ---------------------------------------------------------------------------------------


def _squares(difference: torch.Tensor) -> list[float]:
    return difference.double().square().reshape(-1).tolist()


def mean_squared_error(original: torch.Tensor, approximation: torch.Tensor) -> float:
    """The mean of the squared differences, summed exactly (the same on every CPU and thread count)."""
    _check_same_shape(original, approximation)
    return math.fsum(_squares(approximation - original.to(approximation.dtype))) / original.numel()


def relative_error(original: torch.Tensor, approximation: torch.Tensor) -> float:
    """``||approximation - original|| / ||original||`` (Frobenius norms), summed exactly."""
    _check_same_shape(original, approximation)
    norm = math.sqrt(math.fsum(_squares(original)))
    if norm == 0:
        raise ValueError("the original is all zeros: a relative error is undefined")
    return math.sqrt(math.fsum(_squares(approximation.double() - original.double()))) / norm


def _check_same_shape(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} and {tuple(b.shape)}")


def bits_per_weight(q: Quantized, scale_bits: int = 16) -> float:
    """Storage per weight: the code plus its share of the scales (and zero points, stored in ``bits``)."""
    weights = q.codes.numel()
    per_scale = scale_bits + (0 if q.symmetric else q.bits)
    return q.bits + q.scales.numel() * per_scale / weights


# --- the lesson's example data ----------------------------------------------------------------------------------


def example_weight(rows: int = 64, columns: int = 256, seed: int = 0) -> torch.Tensor:
    """A weight-like matrix: normal values whose rows have different sizes (as the rows of real layers do).

    Drawn with ``environment.portable_randn``, so it is the same on every CPU.
    """
    from helpers.environment import portable_randn

    row_sizes = torch.exp(0.5 * portable_randn(rows, 1, seed=seed + 1))  # log-normal: most near 1, a few 2-3x
    return 0.02 * row_sizes * portable_randn(rows, columns, seed=seed)


def with_outlier(weight: torch.Tensor, row: int, column: int, times: float) -> torch.Tensor:
    """A copy of ``weight`` whose entry (row, column) is ``times`` the largest magnitude of the original."""
    _check_float_tensor(weight, "weight")
    planted = weight.clone()
    planted[row, column] = times * weight.abs().max()
    return planted
