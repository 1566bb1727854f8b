"""Group-wise integer weight quantization: round-to-nearest (RTN) and GPTQ, written from scratch.

A weight matrix ``(out_features, in_features)`` is cut along its input dimension into groups of ``group_size``
columns; every (row, group) gets its own scale (and, asymmetric, its own integer zero point), and every weight
becomes a ``bits``-bit integer code. The conventions are exactly compressed-tensors' (the format vLLM serves and
llmcompressor writes), so our results can be compared with theirs bit for bit:

* codes are signed, in ``[-2**(bits-1), 2**(bits-1) - 1]``;
* the range of each group is widened to include 0 (``min <= 0 <= max``);
* symmetric: ``scale = max(|min|, |max|) / ((2**bits - 1) / 2)``, no zero point;
* asymmetric: ``scale = (max - min) / (2**bits - 1)``, ``zero_point = round(clamp(q_min - min / scale))`` (int8);
* a zero scale becomes the float's machine epsilon (an all-zero group);
* quantize: ``code = round(clamp(w / scale + zero_point, q_min, q_max))`` (round half to even);
* dequantize: ``(code - zero_point) * scale``.

Scales are kept in the weight's dtype unless ``scale_dtype`` asks for another (compressed-tensors' ``scale_dtype``):
``torch.float16`` rounds each scale to float16 after the zero point was computed from the unrounded one, exactly as
compressed-tensors does, and the weights are then quantized and dequantized with the rounded scale in the weight's
dtype. Stored, codes and zero points take ``bits`` bits each (compressed-tensors' pack-quantized format packs both
densely into int32 words), scales their dtype's bits.

GPTQ (Frantar et al., 2022) keeps those scales, computed once from the original weights, and changes which code
each weight gets: it quantizes one column at a time and pushes that column's rounding error onto the columns not
quantized yet. With ``X`` the layer's calibration inputs as (tokens, in_features), the objective is the output error
``||X W^T - X W_hat^T||^2``; for one row ``w`` it is ``1/2 (w - w_hat) H (w - w_hat)^T`` with the Hessian
``H = 2 X^T X``. Each column's error is spread with the upper Cholesky factor of ``H^-1``. With an identity Hessian
(uncorrelated inputs) nothing is pushed and GPTQ is RTN exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Iterable, NamedTuple

import torch
from torch import nn

SUPPORTED_BITS = tuple(range(2, 9))
DECODER_LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ZERO_POINT_DTYPE = torch.int8
CODE_DTYPE = torch.int8

GPTQ_BLOCK_SIZE = 128
"""Columns quantized together before their accumulated error is pushed to the rest at once (lazy batch updates)."""
GPTQ_DAMPING = 0.01
"""Fraction of the Hessian's mean diagonal added to its diagonal, so that it can be inverted (1%)."""


class GroupwiseQuantized(NamedTuple):
    """One weight matrix quantized group-wise: what would be stored.

    codes: int8 ``(out, in)``, each in ``[-2**(bits-1), 2**(bits-1) - 1]``; scales: ``(out, in // group_size)`` in the
    weight's dtype, or in the ``scale_dtype`` asked for; zero_points: int8 like ``scales`` (asymmetric), None
    (symmetric: zero is code 0); weight_dtype: the dtype dequantization computes and returns in (None: the scales').
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zero_points: torch.Tensor | None
    bits: int
    group_size: int
    symmetric: bool
    shape: tuple[int, int]
    weight_dtype: torch.dtype | None = None


def code_range(bits: int) -> tuple[int, int]:
    """The smallest and largest signed code of ``bits`` bits (compressed-tensors' ``calculate_range`` for ints)."""
    _check_bits(bits)
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _check_bits(bits: object) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be an int from {SUPPORTED_BITS[0]} to {SUPPORTED_BITS[-1]}, got {bits!r}")
    return bits


def _check_weight(weight: object, group_size: object) -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor (the unquantized weights), got {weight.dtype}")
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if weight.shape[1] % group_size != 0:
        raise ValueError(f"in_features ({weight.shape[1]}) must be a multiple of group_size ({group_size}); "
                         f"choose a group_size that divides it")


def _check_symmetric(symmetric: object) -> bool:
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric must be True or False, got {symmetric!r}")
    return symmetric


def _check_scale_dtype(scale_dtype: object) -> torch.dtype | None:
    if scale_dtype is not None and (not isinstance(scale_dtype, torch.dtype) or not scale_dtype.is_floating_point):
        raise TypeError(f"scale_dtype must be None (the weight's dtype) or a floating torch dtype such as "
                        f"torch.float16, got {scale_dtype!r}")
    return scale_dtype


def group_qparams(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                  scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales ``(out, groups)`` and zero points (int8, or None when symmetric) from each group's range.

    Same arithmetic, in the same order, as compressed-tensors' ``calculate_qparams`` on min/max observations: the
    scales in the weight's dtype, or rounded to ``scale_dtype`` (and returned in it) after the zero points were
    computed, a zero scale then becoming that dtype's epsilon.
    """
    _check_bits(bits)
    _check_weight(weight, group_size)
    _check_symmetric(symmetric)
    _check_scale_dtype(scale_dtype)
    groups = weight.unflatten(-1, (-1, group_size))
    low = torch.amin(groups, dim=-1)
    high = torch.amax(groups, dim=-1)
    low = torch.min(low, torch.zeros_like(low))  # 0 must be representable exactly
    high = torch.max(high, torch.zeros_like(high))
    q_min, q_max = code_range(bits)
    code_span = torch.tensor(float(q_max - q_min), dtype=weight.dtype)
    if symmetric:
        scales = torch.max(low.abs(), high.abs()) / (code_span / 2)
        zero_points = None
    else:
        scales = (high - low) / code_span
        zero_points = (q_min - low / scales).clamp(q_min, q_max)
    if scale_dtype is not None:  # stored in fewer bits: rounded (within the dtype's range) after the zero points
        scales = scales.clamp(torch.finfo(scale_dtype).min, torch.finfo(scale_dtype).max).to(scale_dtype)
    scales = torch.where(scales == 0, torch.tensor(torch.finfo(scales.dtype).eps, dtype=scales.dtype), scales)
    if zero_points is not None:
        zero_points = torch.round(torch.nan_to_num(zero_points, nan=0.0)).to(ZERO_POINT_DTYPE)
    return scales, zero_points


def _expand(per_group: torch.Tensor, group_size: int) -> torch.Tensor:
    """``(out, groups)`` -> ``(out, groups * group_size)``: each group's value repeated over its columns."""
    return per_group.repeat_interleave(group_size, dim=-1)


def quantize_with(weight: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None, bits: int
                  ) -> torch.Tensor:
    """Codes (same dtype as ``weight``, integer-valued) for weights whose scales/zero points are already expanded to
    the weight's shape: ``round(clamp(w / scale + zero_point))``, compressed-tensors' order of operations."""
    q_min, q_max = code_range(bits)
    scaled = weight / scales
    if zero_points is not None:
        scaled = scaled + zero_points.to(weight.dtype)
    return torch.round(torch.clamp(scaled, q_min, q_max))


def dequantize_with(codes: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None) -> torch.Tensor:
    """``(code - zero_point) * scale`` in the scales' dtype, with everything already expanded to one shape."""
    values = codes.to(scales.dtype)
    if zero_points is not None:
        values = values - zero_points.to(scales.dtype)
    return values * scales


def quantize_groupwise(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                       scale_dtype: torch.dtype | None = None) -> GroupwiseQuantized:
    """Round-to-nearest group-wise quantization of a 2-D weight: the baseline every other method is measured against.
    ``scale_dtype`` (e.g. ``torch.float16``) stores the scales in that dtype; codes are computed with them.

    >>> q = quantize_groupwise(torch.tensor([[-7.5, 3.75, -2.5, 7.5]]), bits=4, group_size=4, symmetric=True)
    >>> q.codes.tolist(), q.scales.tolist()
    ([[-8, 4, -2, 7]], [[1.0]])
    """
    scales, zero_points = group_qparams(weight, bits, group_size, symmetric, scale_dtype)
    codes = quantize_with(weight, _expand(scales.to(weight.dtype), group_size),
                          None if zero_points is None else _expand(zero_points, group_size), bits)
    return GroupwiseQuantized(codes.to(CODE_DTYPE), scales, zero_points, bits, group_size, symmetric,
                              (int(weight.shape[0]), int(weight.shape[1])), weight.dtype)


def dequantize_groupwise(q: GroupwiseQuantized) -> torch.Tensor:
    """The weight the quantized model really multiplies by: ``(code - zero_point) * scale``, computed in the
    original weight's dtype (the scales' dtype when it is not recorded)."""
    if not isinstance(q, GroupwiseQuantized):
        raise TypeError(f"expected a GroupwiseQuantized, got {type(q).__name__}")
    zero_points = None if q.zero_points is None else _expand(q.zero_points, q.group_size)
    scales = q.scales if q.weight_dtype is None else q.scales.to(q.weight_dtype)
    return dequantize_with(q.codes, _expand(scales, q.group_size), zero_points)


def stored_bytes(q: GroupwiseQuantized) -> float:
    """Bytes of what must be stored: codes and zero points at ``bits`` bits each (packed, as compressed-tensors'
    pack-quantized format stores both), scales at their tensor's dtype."""
    if not isinstance(q, GroupwiseQuantized):
        raise TypeError(f"expected a GroupwiseQuantized, got {type(q).__name__}")
    total_bits = q.codes.numel() * q.bits + q.scales.numel() * q.scales.element_size() * 8
    if q.zero_points is not None:
        total_bits += q.zero_points.numel() * q.bits
    return total_bits / 8


def stored_bits_per_weight(q: GroupwiseQuantized) -> float:
    """True bits per weight, scales and zero points included, counted from the stored tensors."""
    return stored_bytes(q) * 8 / q.codes.numel()


def bits_per_weight_formula(bits: int, group_size: int, symmetric: bool, scale_bits: int = 32) -> float:
    """What ``stored_bits_per_weight`` must give: ``bits + (scale_bits [+ bits for the zero point]) / group_size``."""
    return bits + (scale_bits + (0 if symmetric else bits)) / group_size


def decoder_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """Every nn.Linear inside a decoder layer (q/k/v/o, gate/up/down), by name, in model order.

    Embeddings and lm_head are not in decoder layers and stay as they are, as in llmcompressor's usual recipes.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    found = [(name, module) for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and ".layers." in f".{name}" and name.rsplit(".", 1)[-1]
             in DECODER_LINEAR_NAMES]
    if not found:
        raise ValueError("the model has no decoder-layer nn.Linear (q_proj ... down_proj): already quantized by "
                         "another library, or not a Llama-architecture model?")
    return found


def layer_index_of(name: str) -> int | None:
    """The decoder layer a module name belongs to (``model.layers.3.mlp.up_proj`` -> 3), or None."""
    parts = name.split(".")
    if "layers" in parts and parts.index("layers") + 1 < len(parts) and parts[parts.index("layers") + 1].isdigit():
        return int(parts[parts.index("layers") + 1])
    return None


@torch.no_grad()
def round_to_nearest_(model: nn.Module, bits: int, group_size: int, symmetric: bool,
                      layers: Iterable[int] | None = None, scale_dtype: torch.dtype | None = None) -> float:
    """Replace every decoder-layer Linear weight (of the decoder layers ``layers``, default all) by its
    round-to-nearest dequantized value, in place, with scales stored in ``scale_dtype`` (default: the weight's).

    Returns the true bits per weight over those weights (codes + scales + zero points, as stored).
    """
    _check_bits(bits)
    _check_symmetric(symmetric)
    chosen = None if layers is None else set(layers)
    stored, count = 0.0, 0
    for name, module in decoder_linears(model):
        if chosen is not None and layer_index_of(name) not in chosen:
            continue
        q = quantize_groupwise(module.weight.data, bits, group_size, symmetric, scale_dtype)
        module.weight.data.copy_(dequantize_groupwise(q).to(module.weight.dtype))
        stored += stored_bytes(q)
        count += module.weight.numel()
    if count == 0:
        raise ValueError(f"no decoder-layer Linear in layers {sorted(chosen)}")
    return stored * 8 / count


# --- GPTQ ---------------------------------------------------------------------------------------------------


def gptq_hessian(inputs: Iterable[torch.Tensor]) -> torch.Tensor:
    """The Hessian of the layer objective ``||X W^T - X W_hat^T||^2`` (``X``: the inputs as (tokens, in_features))
    with respect to a row of W: ``H = 2 X^T X``, so that a row's share is ``1/2 (w - w_hat) H (w - w_hat)^T``;
    averaged over calibration samples, in float32.

    ``inputs``: what the layer received, one tensor per forward call, shaped ``(batch, tokens, in_features)`` or
    ``(tokens, in_features)``. Like llmcompressor, the sum of ``2 x^T x`` over every token is divided by the number
    of sequences (not tokens): a constant factor, which damping (relative to the mean diagonal) does not see.
    """
    hessian, samples = None, torch.zeros(())
    for x in inputs:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim not in (2, 3):
            raise TypeError("each calibration input must be a floating-point tensor (batch, tokens, features) or "
                            f"(tokens, features), got {getattr(x, 'shape', type(x).__name__)}")
        if x.ndim == 2:
            x = x.unsqueeze(0)
        if hessian is None:
            hessian = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float32, device=x.device)
        elif x.shape[-1] != hessian.shape[0]:
            raise ValueError(f"calibration inputs disagree on in_features: {x.shape[-1]} vs {hessian.shape[0]}")
        samples += x.shape[0]
        columns = math.sqrt(2) * x.reshape(-1, x.shape[-1]).t().to(torch.float32)  # (features, tokens)
        hessian += columns.matmul(columns.t())
    if hessian is None:
        raise ValueError("no calibration inputs: GPTQ needs at least one batch of the layer's inputs")
    return hessian / samples


class one_thread:
    """Run torch on one CPU thread inside the block (the previous count comes back after it).

    LAPACK's Cholesky factorisation and inverse split their work by thread count, so their last bits depend on it;
    GPTQ amplifies a last bit into a different code now and then. Factorising on one thread makes the result the
    same on every machine (and a comparison with a library fair: run both inside this block).
    """

    def __enter__(self):
        self._threads = torch.get_num_threads()
        torch.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        torch.set_num_threads(self._threads)
        return False


def damped_hessian(hessian: torch.Tensor, damping: float = GPTQ_DAMPING) -> torch.Tensor:
    """The Hessian GPTQ really inverts (float32): ``H + damping * mean(diag H) * I``, with a 1 first put on the
    diagonal of columns whose inputs were always zero."""
    if not isinstance(hessian, torch.Tensor) or hessian.ndim != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"hessian must be a square 2-D tensor, got {getattr(hessian, 'shape', hessian)!r}")
    if not isinstance(damping, (int, float)) or isinstance(damping, bool) or not damping >= 0:
        raise ValueError(f"damping must be a number >= 0 (a fraction of the mean diagonal, 0.01 = 1%), got {damping!r}")
    h = hessian.to(torch.float32).clone()
    diagonal = torch.diagonal(h)
    diagonal.masked_fill_(diagonal == 0, 1.0)
    diagonal.add_(damping * torch.mean(torch.diag(h)))
    return h


def inverse_hessian_factor(hessian: torch.Tensor, damping: float = GPTQ_DAMPING,
                           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The upper Cholesky factor U of ``(H + damping * mean(diag H) * I)^-1``: row i of U, divided by ``U[i, i]``,
    says how the error made on column i is spread over the columns after it. Computed in ``dtype``: float32 is
    what GPTQ (and llmcompressor) use; float64 gives the exact factor to measure against.

    Columns whose inputs were always zero (``H[i, i] == 0``) get a 1 on the diagonal (their weights are irrelevant).
    """
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 (GPTQ's) or torch.float64, got {dtype!r}")
    h = damped_hessian(hessian, damping).to(dtype)
    with one_thread():
        lower, info = torch.linalg.cholesky_ex(h)
        if int(info) != 0:
            raise ValueError("the damped Hessian is not positive definite: raise damping or give more calibration data")
        return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                  block_size: int = GPTQ_BLOCK_SIZE, damping: float = GPTQ_DAMPING,
                  scale_dtype: torch.dtype | None = None) -> GroupwiseQuantized:
    """GPTQ: quantize ``weight`` column by column, pushing each column's rounding error onto the columns not yet
    quantized so that the layer's output on the calibration inputs (summarised by ``hessian``) changes least.

    Scales and zero points are RTN's, from the original weights (static groups; stored in ``scale_dtype``, default
    the weight's); only the codes change. Columns go in their natural order; the error of a block of ``block_size``
    columns reaches the later columns in one matrix product (lazy batch updates: the same result, fewer passes).
    """
    scales, zero_points = group_qparams(weight, bits, group_size, symmetric, scale_dtype)
    columns = weight.shape[1]
    if tuple(hessian.shape) != (columns, columns):
        raise ValueError(f"hessian must be ({columns}, {columns}) for a weight with {columns} input features, "
                         f"got {tuple(hessian.shape)}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    u = inverse_hessian_factor(hessian, damping)
    w = weight.to(torch.float32).clone()
    w[:, torch.diag(hessian) == 0] = 0  # inputs always zero: nothing to preserve
    # one row per input column (transposed), so that the loop below reads and writes contiguous memory
    column_scales = _expand(scales, group_size).to(torch.float32).t().contiguous()
    column_zeros = None if zero_points is None else _expand(zero_points, group_size).to(torch.float32).t().contiguous()
    codes = torch.empty(columns, w.shape[0], dtype=torch.float32, device=w.device)
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        block = w[:, start:end].t().contiguous()  # (block columns, rows)
        errors = torch.zeros_like(block)
        for i in range(end - start):
            column = start + i
            zero = None if column_zeros is None else column_zeros[column]
            codes[column] = quantize_with(block[i], column_scales[column], zero, bits)
            quantized = dequantize_with(codes[column], column_scales[column], zero)
            errors[i] = (block[i] - quantized) / u[column, column]
            # the columns after i in this block absorb the error now
            block[i + 1:] -= u[column, column + 1:end].unsqueeze(1) * errors[i].unsqueeze(0)
        # the columns after the block absorb the whole block's error in one product
        w[:, end:] -= errors.t().contiguous().matmul(u[start:end, end:])
    codes = codes.t().to(CODE_DTYPE)
    return GroupwiseQuantized(codes, scales, zero_points, bits, group_size, symmetric,
                              (int(weight.shape[0]), int(weight.shape[1])), weight.dtype)


def layer_objective(weight: torch.Tensor, quantized_weight: torch.Tensor, hessian: torch.Tensor) -> float:
    """``trace((W - W_hat) H (W - W_hat)^T)``: with ``H = 2 X^T X`` (over sequences, as ``gptq_hessian``), twice the
    layer's output error ``||X W^T - X W_hat^T||^2`` on the calibration inputs, computed from the Hessian alone."""
    delta = (weight - quantized_weight).to(torch.float64)
    return float(torch.einsum("ij,jk,ik->", delta, hessian.to(torch.float64), delta))


def objective_by_column(weight: torch.Tensor, quantized_weight: torch.Tensor, hessian: torch.Tensor,
                        compensated: bool, damping: float = GPTQ_DAMPING) -> torch.Tensor:
    """The layer objective once the first ``j + 1`` columns hold ``quantized_weight``'s values, for every ``j``:
    a float64 tensor ``(columns,)``, with GPTQ's damped Hessian ``H_d`` (``damped_hessian``). D = W - W_hat.

    ``compensated=False``: the other columns keep their original weights, as in round-to-nearest, where no error
    is pushed anywhere: ``trace(D[:, :j+1] H_d[:j+1, :j+1] D[:, :j+1]^T)``.
    ``compensated=True``: the other columns take the real values that make the objective smallest given the fixed
    ones, which is where GPTQ's loop stands after column ``j``: ``sum_{k <= j} ||E[:, k]||^2`` with ``E = D U^-1``
    and ``U`` the upper Cholesky factor of ``H_d^-1``. For GPTQ's own result, column k of E is the scaled error
    its loop pushed onto the later columns (``errors[i]`` in ``gptq_quantize``; llmcompressor reports half the sum
    of their squares as its loss).

    Both end at ``trace(D H_d D^T)``, ``layer_objective`` with the damped Hessian.
    """
    if not isinstance(compensated, bool):
        raise TypeError(f"compensated must be True or False, got {compensated!r}")
    for name, value in (("weight", weight), ("quantized_weight", quantized_weight)):
        if not isinstance(value, torch.Tensor) or value.ndim != 2 or not value.is_floating_point():
            raise ValueError(f"{name} must be a 2-D float tensor (out_features, in_features), got "
                             f"{getattr(value, 'shape', type(value).__name__)}")
    if weight.shape != quantized_weight.shape or tuple(hessian.shape) != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"shapes disagree: weight {tuple(weight.shape)}, quantized {tuple(quantized_weight.shape)}, "
                         f"hessian {tuple(hessian.shape)} (it must be in_features x in_features)")
    delta = (weight - quantized_weight).to(torch.float32)
    if compensated:  # the factor computed in float64, then rounded: the sums stay exact to float32's precision
        u = inverse_hessian_factor(hessian, damping, dtype=torch.float64).to(torch.float32)
        errors = torch.linalg.solve_triangular(u, delta, upper=True, left=False)  # E U = D
        return errors.to(torch.float64).square().sum(dim=0).cumsum(dim=0)
    terms = (delta.t() @ delta).to(torch.float64) * damped_hessian(hessian, damping).to(torch.float64)
    return terms.cumsum(dim=0).cumsum(dim=1).diagonal().clone()


class _StopForward(Exception):
    """Raised by a hook to end a calibration forward pass once the layer of interest has run."""


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a transformers Llama-style model (``model.model.layers``)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError("expected a transformers causal LM with decoder layers at model.model.layers")
    return layers


def _chosen_layers(model: nn.Module, layers: Iterable[int] | None) -> tuple[nn.ModuleList, list[int]]:
    """The decoder layers and the sorted indices to work on (all when ``layers`` is None), checked."""
    all_layers = decoder_layers(model)
    chosen = range(len(all_layers)) if layers is None else list(layers)
    if not chosen or any(not 0 <= i < len(all_layers) for i in chosen):
        raise ValueError(f"layers must be indices of the {len(all_layers)} decoder layers, got {list(chosen)}")
    return all_layers, sorted(chosen)


@torch.no_grad()
def layer_inputs(model: nn.Module, layer_index: int, calibration: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """What each Linear of decoder layer ``layer_index`` receives on the calibration sequences (token ids
    ``(sequences, tokens)``), one ``(1, tokens, features)`` tensor per sequence. All sequences go through the model
    in one batch, and the forward pass stops after that layer."""
    layer = decoder_layers(model)[layer_index]
    linears = {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in linears}

    def keep(name):
        return lambda module, args, output: seen[name].extend(args[0].detach().float().split(1))

    def stop(module, args, output):
        raise _StopForward

    hooks = [m.register_forward_hook(keep(name)) for name, m in linears.items()]
    hooks.append(layer.register_forward_hook(stop))
    device = next(model.parameters()).device
    try:
        model(input_ids=calibration.to(device))
    except _StopForward:
        pass
    finally:
        for hook in hooks:
            hook.remove()
    return seen


@torch.no_grad()
def gptq_model_(model: nn.Module, calibration: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                layers: Iterable[int] | None = None, block_size: int = GPTQ_BLOCK_SIZE,
                damping: float = GPTQ_DAMPING, scale_dtype: torch.dtype | None = None) -> float:
    """GPTQ over decoder layers (all, or ``layers``), in place, one layer after the other as llmcompressor does:
    each layer is calibrated on the outputs of the layers already quantized before it. Returns the true bits per
    weight over the weights it quantized."""
    _check_bits(bits)
    _check_symmetric(symmetric)
    if not isinstance(calibration, torch.Tensor) or calibration.ndim != 2 or calibration.is_floating_point():
        raise ValueError("calibration must be token ids shaped (sequences, tokens)")
    all_layers, chosen = _chosen_layers(model, layers)
    stored, count = 0.0, 0
    for index in chosen:
        inputs = layer_inputs(model, index, calibration)
        for name, module in all_layers[index].named_modules():
            if isinstance(module, nn.Linear):
                q = gptq_quantize(module.weight.data, gptq_hessian(inputs.pop(name)), bits, group_size, symmetric,
                                  block_size, damping, scale_dtype)
                module.weight.data.copy_(dequantize_groupwise(q).to(module.weight.dtype))
                stored += stored_bytes(q)
                count += module.weight.numel()
    return stored * 8 / count


# --- AWQ (activation-aware scaling), from scratch ---------------------------------------------------------------

AWQ_GRID = 20
"""Exponents alpha tried: 0, 1/20, ..., 19/20 (llmcompressor's default n_grid)."""


def _output_error(x: torch.Tensor, gram: torch.Tensor | None, weights: list[torch.Tensor],
                  quantized: list[torch.Tensor]) -> float:
    """``sum ||X W^T - X W_hat^T||^2``, D = W - W_hat: from the inputs' Gram matrix ``X^T X`` as
    ``trace(D X^T X D^T)`` when there are more calibration tokens than input features (``gram`` given), else from
    the tokens themselves, ``||X D^T||^2``: whichever multiplies less."""
    if gram is not None:
        return float(sum(((w - q) @ gram * (w - q)).sum() for w, q in zip(weights, quantized)))
    return float(sum((x @ (w - q).t()).square().sum() for w, q in zip(weights, quantized)))


@torch.no_grad()
def awq_search(weights: list[torch.Tensor], inputs: torch.Tensor, bits: int, group_size: int, symmetric: bool,
               grid: int = AWQ_GRID, scale_dtype: torch.dtype | None = None) -> tuple[float, torch.Tensor, list[float]]:
    """AWQ's search for one group of Linears that read the same input (q/k/v, or gate/up, or down).

    Input channel j is scaled by ``s_j = mean|x_j| ** alpha`` (normalised so that ``sqrt(max s * min s) = 1``):
    the weights of busy channels get bigger before rounding, so relatively less rounding error, and the inverse
    scale is folded into whatever produces x (the RMSNorm weight, or the previous Linear), which costs nothing at
    run time. Returns the best alpha, its scales, and the output error ``sum ||X W^T - X Q(W s)/s^T||^2`` for every
    alpha tried (alpha = 0 is plain round-to-nearest). ``scale_dtype``: the dtype the group scales are stored in.
    """
    if not weights or any(w.shape[1] != inputs.shape[-1] for w in weights):
        raise ValueError("every weight must have in_features equal to the inputs' last dimension")
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
        raise ValueError(f"grid must be a positive int, got {grid!r}")
    x = inputs.reshape(-1, inputs.shape[-1]).float()
    activity = x.abs().mean(dim=0)
    gram = x.t() @ x if x.shape[0] >= x.shape[1] else None  # few tokens (the rehearsal's workload): use them
    errors, best = [], (None, None)
    for step in range(grid):
        alpha = step / grid
        scales = activity.pow(alpha).clamp(min=1e-4)
        scales = scales / (scales.max() * scales.min()).sqrt()
        quantized = [dequantize_groupwise(quantize_groupwise(w * scales, bits, group_size, symmetric, scale_dtype))
                     / scales for w in weights]
        errors.append(_output_error(x, gram, weights, quantized))
        if best[0] is None or errors[-1] < errors[best[0]]:
            best = (step, scales)
    return best[0] / grid, best[1], errors


@torch.no_grad()
def awq_model_(model: nn.Module, calibration: torch.Tensor, bits: int, group_size: int, symmetric: bool,
               layers: Iterable[int] | None = None, grid: int = AWQ_GRID, scale_dtype: torch.dtype | None = None
               ) -> float:
    """AWQ over decoder layers (all, or ``layers``), in place, layer after layer: search and fold the scales of
    (input_layernorm -> q, k, v), (post_attention_layernorm -> gate, up) and (up -> down), then round every Linear
    of the layer to nearest. o_proj is only rounded (its input comes through attention, not straight from v_proj
    when there are fewer key/value heads than query heads). Returns the true bits per weight."""
    _check_bits(bits)
    _check_symmetric(symmetric)
    all_layers, chosen = _chosen_layers(model, layers)
    stored, count = 0.0, 0
    for index in chosen:
        layer = all_layers[index]
        attention, mlp = layer.self_attn, layer.mlp
        inputs = layer_inputs(model, index, calibration)
        groups = [(layer.input_layernorm.weight, None, [attention.q_proj, attention.k_proj, attention.v_proj],
                   "self_attn.q_proj"),
                  (layer.post_attention_layernorm.weight, None, [mlp.gate_proj, mlp.up_proj], "mlp.gate_proj"),
                  (None, mlp.up_proj, [mlp.down_proj], "mlp.down_proj")]
        for norm_weight, previous, linears, input_name in groups:
            x = torch.cat(inputs[input_name], dim=1)
            _, scales, _ = awq_search([m.weight.data.float() for m in linears], x, bits, group_size, symmetric, grid,
                                      scale_dtype)
            scales = scales.to(linears[0].weight.dtype)
            if norm_weight is not None:
                norm_weight.data.div_(scales)
            else:
                previous.weight.data.div_(scales.unsqueeze(1))  # rows of up_proj are down_proj's input channels
            for m in linears:
                m.weight.data.mul_(scales)
        for _, module in layer.named_modules():
            if isinstance(module, nn.Linear):
                q = quantize_groupwise(module.weight.data, bits, group_size, symmetric, scale_dtype)
                module.weight.data.copy_(dequantize_groupwise(q).to(module.weight.dtype))
                stored += stored_bytes(q)
                count += module.weight.numel()
    return stored * 8 / count


# --- what notebook 07 runs where ----------------------------------------------------------------------------------

CALIBRATED_LAYERS_ON_GPU = 2
"""Decoder layers GPTQ and AWQ quantize on a real Llama: a few, so that a T4 finishes the notebook in 15 minutes."""


@dataclass(frozen=True)
class ComparisonPlan:
    """Notebook 07's choices for one machine and model."""

    num_layers: int
    bit_widths: tuple[int, ...]
    awq_bit_widths: tuple[int, ...]  # AWQ is used (and searched) at 4 bits, its usual setting
    group_size: int
    calibration_layers: tuple[int, ...]  # decoder layers that GPTQ and AWQ quantize (and RTN beside them)
    calibration_sequences: int
    eval_windows: int
    reason: str
    scale_dtype: torch.dtype = torch.float16
    """What every group-wise method here stores its scales (and HQQ its zero points) in: 16 bits, as GGUF stores its
    block scales and the shipped formats store theirs (compressed-tensors in the model's 16-bit dtype, HQQ in its
    16-bit compute dtype), so that bits per weight compare like with like."""

    def with_bit_widths(self, bit_widths) -> "ComparisonPlan":
        """The same plan at the first of its bit widths only (``helpers.workload``: fewer under a small workload);
        ``self`` when nothing changes."""
        bit_widths = tuple(bit_widths)
        if not bit_widths or any(bits not in self.bit_widths for bits in bit_widths):
            raise ValueError(f"bit widths must be some of the plan's {self.bit_widths}, got {bit_widths}")
        return self if bit_widths == self.bit_widths else replace(self, bit_widths=bit_widths)

    @property
    def calibration_on_whole_model(self) -> bool:
        return self.calibration_layers == tuple(range(self.num_layers))

    @property
    def layers_suffix(self) -> str:
        """``""`` when the calibration methods cover the whole model, else ``", layers 0-1"``: every result label
        of a run on part of the model says so, and the whole-model comparisons (Pareto frontier, 8-bit against
        4-bit) leave such labels out."""
        if self.calibration_on_whole_model:
            return ""
        return f", layers {self.calibration_layers[0]}-{self.calibration_layers[-1]}"

    def calibrated_label(self, method: str, bits: int, symmetric: bool = False) -> str:
        """The result label of a calibration method (``"GPTQ"``, ``"AWQ"``), or of RTN on the same layers
        (``"RTN"``): ``"GPTQ 3-bit asym"`` on the whole model, ``"GPTQ 3-bit asym, layers 0-1"`` on part of it."""
        if method not in ("GPTQ", "AWQ", "RTN"):
            raise ValueError(f"method must be 'GPTQ', 'AWQ' or 'RTN', got {method!r}")
        return f"{method} {bits}-bit {'sym' if symmetric else 'asym'}{self.layers_suffix}"


def comparison_plan(num_layers: int, device: str, whole_model: bool) -> ComparisonPlan:
    """Which layers the calibration methods (GPTQ, AWQ) quantize, and how much data they see (pure).

    ``whole_model`` (the tiny Llama): every method on every layer. Otherwise (a real Llama, in the rehearsal too,
    whatever its depth there): the calibration-free methods (RTN, HQQ, GGUF, bitsandbytes) on the whole model and
    the calibration methods on its first ``CALIBRATED_LAYERS_ON_GPU`` layers, compared with RTN on those same layers.
    """
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if not isinstance(whole_model, bool):
        raise ValueError(f"whole_model must be True (the tiny Llama) or False (a real one), got {whole_model!r}")
    if whole_model or num_layers <= CALIBRATED_LAYERS_ON_GPU:
        layers = tuple(range(num_layers))
        reason = f"{num_layers} decoder layers: every method quantizes the whole model"
    else:
        layers = tuple(range(CALIBRATED_LAYERS_ON_GPU))
        reason = (f"{num_layers} decoder layers: GPTQ and AWQ quantize layers {', '.join(map(str, layers))} only "
                  f"(one column at a time is slow at this size), RTN beside them on the same layers; RTN, HQQ, "
                  f"GGUF and bitsandbytes also quantize the whole model")
    return ComparisonPlan(num_layers=num_layers, bit_widths=(4, 3, 2), awq_bit_widths=(4,), group_size=64,
                          calibration_layers=layers,
                          calibration_sequences=8 if device == "cpu" else 16, eval_windows=8, reason=reason)


def backup_decoder_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of every decoder-layer parameter, to undo a method before the next one. Kept in bfloat16 when
    that loses nothing (weights read from a bfloat16 checkpoint), which halves the copy of a float32 model."""
    backup = {}
    for name, parameter in decoder_layers(model).named_parameters():
        value = parameter.detach()
        small = value.to(torch.bfloat16)
        backup[name] = (small if torch.equal(small.to(value.dtype), value) else value).to("cpu", copy=True)
    return backup


@torch.no_grad()
def restore_decoder_weights_(model: nn.Module, backup: dict[str, torch.Tensor]) -> None:
    """Put back what ``backup_decoder_weights`` saved, in place."""
    parameters = dict(decoder_layers(model).named_parameters())
    if set(parameters) != set(backup):
        raise ValueError("the backup is of another model: its parameter names differ")
    for name, parameter in parameters.items():
        parameter.copy_(backup[name].to(parameter.device, parameter.dtype))


# --- the libraries: HQQ, and llmcompressor's AWQ on a CPU ----------------------------------------------------------


@torch.no_grad()
def hqq_quantize(weight: torch.Tensor, bits: int, group_size: int, meta_dtype: torch.dtype | None = None
                 ) -> tuple[torch.Tensor, dict]:
    """One weight through HQQ's own library (``hqq.core.quantize.Quantizer``): ``(packed codes, meta)``.

    HQQ needs no calibration data: per group of ``group_size`` weights it starts from min/max like RTN, then
    optimises the zero point (a few proximal steps against an Lp<1 error that tolerates outliers), in float32.
    Codes are unsigned and packed by HQQ (3-bit codes ten per 32-bit word); the scale and the fractional zero point
    of each group are stored in ``meta_dtype``. HQQ ships them in its 16-bit compute dtype (``HQQLinear`` with
    ``compute_dtype=torch.float16`` casts them so; its 8-bit "quantized meta-data" is deprecated): pass
    ``torch.float16`` for that; None keeps the float32 that ``Quantizer.quantize`` returns. The meta's
    ``compute_dtype`` is float32: ``Quantizer.dequantize`` computes in float32 from the stored values.
    """
    from hqq.core.quantize import Quantizer

    _check_bits(bits)
    _check_scale_dtype(meta_dtype)
    packed, meta = Quantizer.quantize(weight, nbits=bits, group_size=group_size, axis=1, optimize=True,
                                      round_zero=bits == 4, compute_dtype=torch.float32, device=str(weight.device))
    if meta_dtype is not None:
        meta["scale"], meta["zero"] = meta["scale"].to(meta_dtype), meta["zero"].to(meta_dtype)
    meta["compute_dtype"] = torch.float32
    return packed, meta


@torch.no_grad()
def hqq_model_(model: nn.Module, bits: int, group_size: int, meta_dtype: torch.dtype | None = None) -> float:
    """``hqq_quantize`` on every decoder-layer Linear, in place (the weight becomes HQQ's dequantized one). Returns
    the true bits per weight counted from the stored tensors: packed codes, scales and zero points."""
    from hqq.core.quantize import Quantizer

    stored, count = 0, 0
    for _, module in decoder_linears(model):
        weight = module.weight.data
        packed, meta = hqq_quantize(weight, bits, group_size, meta_dtype)
        module.weight.data.copy_(Quantizer.dequantize(packed, meta).to(weight.dtype))
        stored += sum(t.numel() * t.element_size() * 8 for t in (packed, meta["scale"], meta["zero"]))
        count += weight.numel()
    return stored / count


class cpu_pin_memory_workaround:
    """Let llmcompressor's AWQ run on a machine without an accelerator.

    Before its grid search, ``AWQModifier`` pins the cached activations (``IntermediatesCache.pin_memory``) to speed
    up copies to a GPU. Pinned memory belongs to an accelerator's driver, so on a CPU-only torch the call raises
    ``RuntimeError: Cannot access accelerator device when none is available``. Inside this context, and only when
    torch sees no accelerator, that one method does nothing (there is no GPU to copy to); it is restored on exit.
    """

    def __enter__(self):
        from llmcompressor.pipelines.cache import IntermediatesCache

        self._cls, self._original = IntermediatesCache, IntermediatesCache.pin_memory
        if not torch.accelerator.is_available():
            IntermediatesCache.pin_memory = lambda cache, batch_index, input_names=None: None
        return self

    def __exit__(self, *exc):
        self._cls.pin_memory = self._original
        return False


def pareto_frontier(points: dict[str, tuple[float, float]]) -> list[str]:
    """The labels of the points no other point beats on both axes (fewer bits AND lower error), by bits (pure)."""
    frontier, best = [], math.inf
    for label, (bits, error) in sorted(points.items(), key=lambda item: (item[1][0], item[1][1])):
        if error < best:
            frontier.append(label)
            best = error
    return frontier
