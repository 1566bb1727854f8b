"""Outlier features (LLM.int8, Dettmers et al. 2022, arXiv:2208.07339): counted, planted, and routed around int8.

LLM.int8 multiplies in floating point every input *column* (feature) in which some value reaches the threshold
(``llm_int8_threshold``, 6.0 by default), and everything else in int8. The paper calls a feature *systematic* when it
reaches that magnitude in at least 25% of the layers and at least 6% of the sequence positions; in large models a
handful of such features carry the outliers.

This module measures those features on a model's hidden states (``find_systematic_features``), plants one without
changing what the model computes (``planted_feature``: one channel of an RMSNorm weight times a power of two, the
matching input column of the next linear layers divided by it, SmoothQuant's migration run backwards), and runs a
bitsandbytes ``Linear8bitLt`` with and without the decomposition (``int8_linear``, ``run_int8``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

LLM_INT8_THRESHOLD = 6.0
"""``BitsAndBytesConfig``'s default ``llm_int8_threshold``, the outlier magnitude of the LLM.int8 paper."""

SYSTEMATIC_LAYER_SHARE = 0.25
"""LLM.int8's criterion: a systematic feature reaches the threshold in at least this share of the layers..."""

SYSTEMATIC_POSITION_SHARE = 0.06
"""...and at least this share of the sequence positions."""


def outlier_columns(x: torch.Tensor, threshold: float = LLM_INT8_THRESHOLD) -> torch.Tensor:
    """The columns of ``x`` (tokens x features) in which some ``|value| >= threshold``, sorted, as int64 on the CPU:
    the columns LLM.int8 takes out of int8 and multiplies in floating point."""
    _check_threshold(threshold)
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or not x.dtype.is_floating_point:
        raise ValueError("x must be a floating-point tensor of at least 2 dimensions (tokens x features), got "
                         f"{type(x).__name__} {getattr(x, 'shape', '')}")
    reached = (x.detach().reshape(-1, x.shape[-1]).abs() >= threshold).any(dim=0)
    return torch.nonzero(reached).flatten().cpu()


def _check_threshold(threshold: float) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold > 0:
        raise ValueError(f"threshold must be a positive number (LLM.int8 uses {LLM_INT8_THRESHOLD}), got {threshold!r}")


# ----------------------------------------------------------------------------------------------------------
# Systematic features of a model's hidden states
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureReport:
    """Which features of the hidden states reach the threshold, in how many layers and at how many positions."""

    threshold: float
    layers: int
    positions: int
    layer_share: dict[int, float]  # every feature that reaches the threshold somewhere -> share of layers
    position_share: dict[int, float]  # ... -> share of positions (in any layer)
    largest: float  # the largest |x| of any feature anywhere
    systematic: tuple[int, ...]  # features that meet both shares

    def describe(self) -> str:
        lines = [f"{self.layers} layers x {self.positions:,} positions: {len(self.layer_share)} features reach "
                 f"|x| >= {self.threshold:g} somewhere (largest |x| {self.largest:.1f}); "
                 f"{len(self.systematic)} systematic (in >= {SYSTEMATIC_LAYER_SHARE:.0%} of layers and >= "
                 f"{SYSTEMATIC_POSITION_SHARE:.0%} of positions)"]
        for feature in self.systematic:
            lines.append(f"  feature {feature}: {self.layer_share[feature]:.0%} of layers, "
                         f"{self.position_share[feature]:.1%} of positions")
        return "\n".join(lines)


def summarize_features(layer_hits: torch.Tensor, position_hits: torch.Tensor, largest: float, threshold: float,
                       layer_share: float = SYSTEMATIC_LAYER_SHARE,
                       position_share: float = SYSTEMATIC_POSITION_SHARE) -> FeatureReport:
    """LLM.int8's criteria applied to hits already counted.

    Args:
        layer_hits: bool (layers x features): the feature reached the threshold somewhere in that layer.
        position_hits: bool (positions x features): the feature reached it at that position in some layer.
        largest: the largest |x| seen; threshold: the magnitude counted.
    """
    if layer_hits.dtype != torch.bool or position_hits.dtype != torch.bool or layer_hits.dim() != 2 \
            or position_hits.dim() != 2 or layer_hits.shape[1] != position_hits.shape[1]:
        raise ValueError("layer_hits (layers x features) and position_hits (positions x features) must be bool "
                         "matrices with the same number of features")
    layers, positions = layer_hits.shape[0], position_hits.shape[0]
    layer_counts, position_counts = layer_hits.sum(dim=0).tolist(), position_hits.sum(dim=0).tolist()
    reached = torch.nonzero(layer_hits.any(dim=0)).flatten().tolist()
    systematic = tuple(f for f in reached if layer_counts[f] / layers >= layer_share  # correctly rounded shares
                       and position_counts[f] / positions >= position_share)
    return FeatureReport(threshold=threshold, layers=layers, positions=positions,
                         layer_share={f: layer_counts[f] / layers for f in reached},
                         position_share={f: position_counts[f] / positions for f in reached},
                         largest=float(largest), systematic=systematic)


def hidden_state_inputs(model: torch.nn.Module) -> list[list[torch.nn.Module]]:
    """Per decoder layer, the modules whose input is a hidden state: ``q_proj`` (attention in) and ``gate_proj``
    (MLP in). ``down_proj``'s input is the MLP's inner product, not a hidden state, so it is not counted."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no model.layers: pass a Llama-architecture causal LM")
    return [[layer.self_attn.q_proj, layer.mlp.gate_proj] for layer in layers]


def find_systematic_features(model: torch.nn.Module, input_ids: torch.Tensor, threshold: float = LLM_INT8_THRESHOLD,
                             layer_share: float = SYSTEMATIC_LAYER_SHARE,
                             position_share: float = SYSTEMATIC_POSITION_SHARE) -> FeatureReport:
    """Run the decoder (not ``lm_head``) on ``input_ids`` and apply LLM.int8's criteria to its hidden states.

    A feature counts for a layer when it reaches ``threshold`` in either of the layer's two hidden-state inputs, and
    for a position when it reaches it there in any layer. Memory: two bool matrices, never the hidden states.
    """
    _check_threshold(threshold)
    per_layer = hidden_state_inputs(model)
    hidden = per_layer[0][0].in_features
    layer_hits = torch.zeros(len(per_layer), hidden, dtype=torch.bool)
    position_hits = torch.zeros(input_ids.numel(), hidden, dtype=torch.bool)
    largest = [0.0]

    def record(index: int, x: torch.Tensor) -> None:
        magnitude = x.detach().reshape(-1, hidden).abs()
        reached = (magnitude >= threshold).cpu()
        layer_hits[index] |= reached.any(dim=0)
        position_hits.logical_or_(reached)
        largest[0] = max(largest[0], magnitude.max().item())

    hooks = [module.register_forward_pre_hook(lambda module, args, index=index: record(index, args[0]))
             for index, modules in enumerate(per_layer) for module in modules]
    try:
        with torch.no_grad():
            model.model(input_ids=input_ids)
    finally:
        for hook in hooks:
            hook.remove()
    return summarize_features(layer_hits, position_hits, largest[0], threshold, layer_share, position_share)


# ----------------------------------------------------------------------------------------------------------
# Planting an outlier feature without changing the function
# ----------------------------------------------------------------------------------------------------------


def _check_power_of_two(factor: int) -> None:
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1 or factor & (factor - 1):
        raise ValueError(f"factor must be a power of two (1, 2, 4, ...), got {factor!r}: multiplying and dividing "
                         "by a power of two only changes exponents, so the planted model computes the same bits.")


def choose_planting(x: torch.Tensor, threshold: float = LLM_INT8_THRESHOLD) -> tuple[int, int]:
    """``(feature, factor)``: the feature of ``x`` (tokens x features) whose smallest |x| is largest, and the smallest
    power of two that lifts that smallest value to ``threshold``, so the feature reaches it at every position."""
    _check_threshold(threshold)
    smallest = x.detach().reshape(-1, x.shape[-1]).abs().amin(dim=0).float()
    feature = int(smallest.argmax())
    if smallest[feature] == 0:
        raise ValueError("every feature of x is 0 at some position: no factor lifts it to the threshold everywhere")
    factor = 2 ** max(0, math.ceil(math.log2(threshold / smallest[feature].item())))
    return feature, factor


def _check_planting(norm: torch.nn.Module, linears: Sequence[torch.nn.Module], channel: int) -> None:
    width = norm.weight.shape[0]
    if not linears or any(linear.weight.shape[1] != width for linear in linears):
        raise ValueError(f"every linear layer must read the norm's {width} features (weight shape (out, {width}))")
    if isinstance(channel, bool) or not isinstance(channel, int) or not 0 <= channel < width:
        raise ValueError(f"channel must be an int in [0, {width}), got {channel!r}")


@contextmanager
def planted_feature(norm: torch.nn.Module, linears: Sequence[torch.nn.Module], channel: int,
                    factor: int) -> Iterator[None]:
    """Inside the block, ``norm.weight[channel]`` is ``factor`` times larger and column ``channel`` of each linear
    layer's weight ``factor`` times smaller: the same function, with an outlier feature in the linear layers' input.

    ``factor`` is a power of two, so both changes are exact and every product ``(k x) (w / k)`` equals ``x w`` bit for
    bit. On leaving, the saved values are copied back (exactly, whatever happened inside).
    """
    _check_power_of_two(factor)
    _check_planting(norm, linears, channel)
    saved_norm = norm.weight.detach()[channel].clone()
    saved_columns = [linear.weight.detach()[:, channel].clone() for linear in linears]
    try:
        with torch.no_grad():
            norm.weight[channel] *= factor
            for linear in linears:
                linear.weight[:, channel] /= factor
        yield
    finally:
        with torch.no_grad():
            norm.weight[channel] = saved_norm
            for linear, column in zip(linears, saved_columns):
                linear.weight[:, channel] = column


def input_and_logits(model: torch.nn.Module, module: torch.nn.Module,
                     input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass: ``module``'s input (tokens x features, a copy) and the model's logits."""
    recorded = []
    hook = module.register_forward_pre_hook(lambda m, args: recorded.append(args[0].detach().flatten(0, -2).clone()))
    try:
        with torch.no_grad():
            logits = model(input_ids=input_ids).logits
    finally:
        hook.remove()
    return recorded[0], logits


# ----------------------------------------------------------------------------------------------------------
# bitsandbytes' LLM.int8 on one layer, with and without the decomposition
# ----------------------------------------------------------------------------------------------------------


def int8_linear(weight: torch.Tensor, threshold: float, device: str | torch.device = "cpu") -> torch.nn.Module:
    """A bitsandbytes ``Linear8bitLt`` holding ``weight`` (out x in) as int8, in eval mode, on ``device``.

    Eval mode matters on a CPU: in training mode bitsandbytes 0.50.2 multiplies by the dequantized weight and never
    quantizes the activations, so there is no decomposition to see.
    """
    import bitsandbytes as bnb

    if threshold < 0:
        raise ValueError(f"threshold must be >= 0 (0: no decomposition), got {threshold!r}")
    out_features, in_features = weight.shape
    layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=False, has_fp16_weights=False, threshold=threshold)
    layer.weight = bnb.nn.Int8Params(weight.detach().float().cpu().clone(), requires_grad=False,
                                     has_fp16_weights=False)
    return layer.to(device).eval()  # moving the float weight to a device is what quantizes it


@dataclass(frozen=True)
class Int8Run:
    """One call of a ``Linear8bitLt``: the columns it multiplied in floating point and its relative errors."""

    float_columns: tuple[int, ...]
    activation_error: float  # against its own dequantized weight on the unquantized input: the activations' part
    error: float | None  # against a given float output (weights' rounding included), when one was given


def run_int8(layer: torch.nn.Module, x: torch.Tensor, threshold: float,
             reference: torch.Tensor | None = None) -> Int8Run:
    """Run a ``Linear8bitLt`` on ``x`` (tokens x in) with ``threshold`` (0: int8 only), then put its threshold back.

    ``activation_error`` compares with ``x @ dequantized_weight.T`` in float32, so only the activations' quantization
    counts; ``error`` compares with ``reference`` (e.g. the float32 layer's output), when given.
    """
    from helpers.quantization import dequantize_int8_rowwise, int8_storage_of

    if threshold < 0:
        raise ValueError(f"threshold must be >= 0 (0: no decomposition), got {threshold!r}")
    weights_only = x.float() @ dequantize_int8_rowwise(*int8_storage_of(layer)).T.to(x.device)
    configured = layer.state.threshold
    layer.state.threshold = threshold
    try:
        with torch.no_grad():
            output = layer(x).float()
    finally:
        layer.state.threshold = configured
    idx = layer.state.idx if threshold > 0 else None
    columns = tuple(idx.tolist()) if isinstance(idx, torch.Tensor) else ()

    def relative(to: torch.Tensor) -> float:
        to = to.float().to(output.device)
        return ((output - to).norm() / to.norm()).item()

    return Int8Run(columns, relative(weights_only), None if reference is None else relative(reference))
