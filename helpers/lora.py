"""LoRA by the numbers: closed-form parameter counts, adapter summaries and the weight update.

peft's LoRA replaces a frozen ``nn.Linear`` weight ``W`` (shape ``(out, in)``) by ``W + scaling * B @ A``
with ``A = lora_A`` shaped ``(r, in)``, ``B = lora_B`` shaped ``(out, r)`` and ``scaling = lora_alpha / r``
(``lora_alpha / sqrt(r)`` with rsLoRA). One adapted Linear therefore adds ``r * (in + out)`` parameters.

Everything here reads dimensions from a config or a model, never from typed numbers:

- :func:`llama_linear_shapes`, :func:`lora_param_breakdown`, :func:`lora_param_count`: the closed form
  for any set of Llama projections, grouped-query attention included;
- :func:`summarize_adapter`: what an attached adapter really holds, counted by parameter name (an
  adapter loaded with ``PeftModel.from_pretrained`` is frozen, so "trainable" counts say 0);
- :func:`lora_delta_weight`: ``scaling * B @ A`` for one adapted Linear;
- :func:`update_ratios`, :func:`update_directions`: how large the update is, and along which directions of ``W``
  (the LoRA paper's Table 7);
- :func:`lora_scaling`, :func:`start_gradients`: ``lora_alpha / r`` against rsLoRA's ``lora_alpha / sqrt(r)``, and
  the gradient each gives ``lora_B`` at LoRA's start, rank by rank;
- :func:`adapter_file_layout`: the tensor bytes and header bytes of ``adapter_model.safetensors``;
- :func:`local_adapter_folder`: where an adapter's files are (a local folder, or its Hub snapshot);
- :func:`finetuning_memory`: weights, gradients and AdamW states of full fine-tuning, LoRA and QLoRA,
  from a config alone.
"""

from __future__ import annotations

import json
import math
import numbers
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import torch
from peft.tuners.lora.layer import LoraLayer

from helpers.memory import LINEAR_NAMES, estimate_footprint, linear_shapes, parameter_counts_from_config

ATTENTION_MODULES: tuple[str, ...] = LINEAR_NAMES[:4]  # q_proj, k_proj, v_proj, o_proj
MLP_MODULES: tuple[str, ...] = LINEAR_NAMES[4:]  # gate_proj, up_proj, down_proj


# ---------------------------------------------------------------------------------------------
# Closed-form counts from a config
# ---------------------------------------------------------------------------------------------


def llama_linear_shapes(config) -> dict[str, tuple[int, int]]:
    """Return ``{module name: (in_features, out_features)}`` for the seven projections of one layer.

    The dimensions come from :func:`helpers.memory.linear_shapes` (which reads them from the config,
    grouped-query attention included), turned around into the ``(in, out)`` order LoRA's ``A`` and ``B``
    follow: ``lora_A`` is ``(r, in)``, ``lora_B`` is ``(out, r)``.
    """
    shapes = linear_shapes(_as_attributes(config))
    return {name: (in_features, out_features) for name, (out_features, in_features) in shapes.items()}


def _as_attributes(config):
    """A parsed config.json read by attribute, so optional keys it lacks (head_dim, ...) read as None."""
    return SimpleNamespace(**config) if isinstance(config, Mapping) else config


def _num_layers(config) -> int:
    layers = getattr(_as_attributes(config), "num_hidden_layers", None)
    if isinstance(layers, bool) or not isinstance(layers, numbers.Integral) or layers <= 0:
        raise ValueError(f"The config's num_hidden_layers must be a positive integer, got {layers!r}.")
    return int(layers)


def _check_rank(r) -> int:
    if isinstance(r, bool) or not isinstance(r, numbers.Integral):
        raise ValueError(f"r must be a positive integer (the LoRA rank, e.g. 8, 16 or 32), got {r!r}.")
    if r <= 0:
        raise ValueError(f"r must be a positive integer (the LoRA rank, e.g. 8, 16 or 32), got {r}.")
    return int(r)


def _check_targets(target_modules) -> tuple[str, ...]:
    allowed = ", ".join(LINEAR_NAMES)
    if isinstance(target_modules, str) or not isinstance(target_modules, (Sequence, set, frozenset)):
        raise ValueError(f"target_modules must be a list of module names chosen from {allowed}; got {target_modules!r}.")
    names = list(target_modules)
    if not names:
        raise ValueError(f"target_modules is empty: list at least one of {allowed}.")
    unknown = [name for name in names if name not in LINEAR_NAMES]
    if unknown:
        raise ValueError(f"Unknown target module(s) {unknown}: a Llama layer's Linear modules are {allowed}.")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"target_modules lists {repeated} more than once: name each module once.")
    return tuple(name for name in LINEAR_NAMES if name in names)  # canonical order


@dataclass(frozen=True)
class LoraModuleCount:
    """One row of a breakdown: an adapted projection and the LoRA parameters it adds per layer."""

    module: str
    in_features: int
    out_features: int
    r: int

    @property
    def lora_A_shape(self) -> tuple[int, int]:
        return (self.r, self.in_features)

    @property
    def lora_B_shape(self) -> tuple[int, int]:
        return (self.out_features, self.r)

    @property
    def params_per_layer(self) -> int:
        return self.r * (self.in_features + self.out_features)


@dataclass(frozen=True)
class LoraBreakdown:
    """Per-module LoRA parameter counts for one config, rank and target set."""

    rows: tuple[LoraModuleCount, ...]
    num_layers: int
    r: int

    @property
    def params_per_layer(self) -> int:
        return sum(row.params_per_layer for row in self.rows)

    @property
    def total(self) -> int:
        return self.num_layers * self.params_per_layer

    def table(self) -> str:
        """A fixed-width text table: one row per module, then the per-layer and whole-model totals."""
        header = f"{'module':<10} {'in':>7} {'out':>7} {'lora_A':>14} {'lora_B':>14} {'params/layer':>13}"
        lines = [header, "-" * len(header)]
        for row in self.rows:
            lines.append(
                f"{row.module:<10} {row.in_features:>7,} {row.out_features:>7,} {str(row.lora_A_shape):>14} "
                f"{str(row.lora_B_shape):>14} {row.params_per_layer:>13,}"
            )
        lines.append("-" * len(header))
        lines.append(f"{'per layer':<55} {self.params_per_layer:>13,}")
        lines.append(f"{f'x {self.num_layers} layers':<55} {self.total:>13,}")
        return "\n".join(lines)


def lora_param_breakdown(config, r: int, target_modules: Sequence[str]) -> LoraBreakdown:
    """Return the per-module breakdown behind :func:`lora_param_count` (rows in the order the layer runs)."""
    rank = _check_rank(r)
    targets = _check_targets(target_modules)
    shapes = llama_linear_shapes(config)
    rows = tuple(LoraModuleCount(name, *shapes[name], rank) for name in targets)
    return LoraBreakdown(rows=rows, num_layers=_num_layers(config), r=rank)


def lora_param_count(config, r: int, target_modules: Sequence[str]) -> int:
    """Number of LoRA parameters (``lora_A`` plus ``lora_B``, no biases) for a Llama config.

    Each adapted Linear of shape ``(in, out)`` adds ``r * (in + out)``; every decoder layer has the
    same projections, so the total is ``num_hidden_layers * sum over targets of r * (in + out)``.
    ``target_modules`` is a list drawn from ``helpers.memory.LINEAR_NAMES`` (the seven projections);
    ``r`` a positive integer.
    """
    return lora_param_breakdown(config, r, target_modules).total


# ---------------------------------------------------------------------------------------------
# What an attached adapter holds
# ---------------------------------------------------------------------------------------------


def _lora_layers(peft_model, adapter_name: str) -> list[tuple[str, LoraLayer]]:
    layers = [(name, module) for name, module in peft_model.named_modules() if isinstance(module, LoraLayer)]
    if not layers:
        raise ValueError("The model has no LoRA layers: attach an adapter with get_peft_model or PeftModel.from_pretrained.")
    found = [(name, module) for name, module in layers if adapter_name in module.lora_A]
    if not found:
        available = sorted({key for _, module in layers for key in module.lora_A.keys()})
        raise ValueError(f"No LoRA weights for adapter {adapter_name!r}; the model holds {available}.")
    return found


def _strip_peft_prefix(name: str) -> str:
    # PeftModel wraps the transformers model twice: base_model (the LoraModel) and .model (the original).
    prefix = "base_model.model."
    return name[len(prefix) :] if name.startswith(prefix) else name


def _uniform(values: Sequence):
    """The single value all entries share, or None when they differ (e.g. with rank_pattern)."""
    distinct = set(values)
    return values[0] if len(distinct) == 1 else None


@dataclass(frozen=True)
class LoraModuleSummary:
    """One adapted Linear: its path, shapes, rank, alpha, scaling, dtype and parameter count."""

    name: str
    in_features: int
    out_features: int
    lora_A_shape: tuple[int, ...]
    lora_B_shape: tuple[int, ...]
    r: int
    lora_alpha: float
    scaling: float
    dtype: torch.dtype
    num_params: int

    @property
    def target(self) -> str:
        """The module's own name (``q_proj``, ...), the part ``target_modules`` matches."""
        return self.name.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class AdapterSummary:
    """What one named adapter adds to a model, counted from the model's own tensors.

    ``r``, ``lora_alpha``, ``scaling`` and ``dtype`` are the values every adapted module shares, or
    ``None`` when they differ between modules (peft's ``rank_pattern`` / ``alpha_pattern``).
    ``num_params`` and ``num_bytes`` count every parameter whose name contains ``lora_A.<adapter>`` or
    ``lora_B.<adapter>``; ``num_trainable`` is how many of those currently require gradients.
    """

    adapter_name: str
    modules: tuple[LoraModuleSummary, ...]
    target_modules: tuple[str, ...]
    r: int | None
    lora_alpha: float | None
    scaling: float | None
    dtype: torch.dtype | None
    num_params: int
    num_bytes: int
    num_trainable: int

    def table(self) -> str:
        """One line per target type (q_proj, ...) with its shapes and how many layers have it."""
        header = f"{'target':<10} {'layers':>6} {'lora_A':>12} {'lora_B':>12} {'params each':>12}"
        lines = [header, "-" * len(header)]
        for target in self.target_modules:
            group = [m for m in self.modules if m.target == target]
            shapes = {(m.lora_A_shape, m.lora_B_shape, m.num_params) for m in group}
            a_shape, b_shape, params = shapes.pop() if len(shapes) == 1 else ("mixed", "mixed", "mixed")
            lines.append(f"{target:<10} {len(group):>6} {str(a_shape):>12} {str(b_shape):>12} {params:>12,}")
        return "\n".join(lines)


def summarize_adapter(peft_model, adapter_name: str = "default") -> AdapterSummary:
    """Summarize the LoRA adapter ``adapter_name`` attached to ``peft_model`` (a ``PeftModel``).

    Parameters are counted by name, not by ``requires_grad``: ``PeftModel.from_pretrained`` freezes
    the adapter, so ``print_trainable_parameters()`` reports 0 for a loaded adapter.
    """
    modules = []
    for name, layer in _lora_layers(peft_model, adapter_name):
        lora_A, lora_B = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
        modules.append(
            LoraModuleSummary(
                name=_strip_peft_prefix(name),
                in_features=layer.in_features,
                out_features=layer.out_features,
                lora_A_shape=tuple(lora_A.weight.shape),
                lora_B_shape=tuple(lora_B.weight.shape),
                r=int(layer.r[adapter_name]),
                lora_alpha=layer.lora_alpha[adapter_name],
                scaling=float(layer.scaling[adapter_name]),
                dtype=lora_A.weight.dtype,
                num_params=sum(p.numel() for p in (*lora_A.parameters(), *lora_B.parameters())),
            )
        )
    markers = (f"lora_A.{adapter_name}.", f"lora_B.{adapter_name}.")
    lora_params = [p for n, p in peft_model.named_parameters() if any(marker in n for marker in markers)]
    targets_present = {m.target for m in modules}
    return AdapterSummary(
        adapter_name=adapter_name,
        modules=tuple(modules),
        # Llama projections in the order they run, anything else (another architecture) after them.
        target_modules=tuple(t for t in LINEAR_NAMES if t in targets_present)
        + tuple(sorted(targets_present - set(LINEAR_NAMES))),
        r=_uniform([m.r for m in modules]),
        lora_alpha=_uniform([m.lora_alpha for m in modules]),
        scaling=_uniform([m.scaling for m in modules]),
        dtype=_uniform([m.dtype for m in modules]),
        num_params=sum(p.numel() for p in lora_params),
        num_bytes=sum(p.numel() * p.element_size() for p in lora_params),
        num_trainable=sum(p.numel() for p in lora_params if p.requires_grad),
    )


def _resolve_adapter_name(layer: LoraLayer, adapter_name: str | None) -> str:
    available = list(layer.lora_A.keys())
    if adapter_name is None:
        if len(available) == 1:
            return available[0]
        if "default" in available:
            return "default"
        raise ValueError(f"This layer holds several adapters {available}: pass adapter_name.")
    if adapter_name not in available:
        raise ValueError(f"This layer has no adapter {adapter_name!r}; it holds {available}.")
    return adapter_name


def lora_delta_weight(lora_module, adapter_name: str | None = None) -> torch.Tensor:
    """Return ``scaling * lora_B @ lora_A`` for one peft LoRA Linear, in float32, shaped ``(out, in)``.

    This is what the adapter adds to the base weight: the adapted layer computes
    ``base(x) + x @ delta.T`` (with dropout off). ``adapter_name`` defaults to the layer's only
    adapter, or ``"default"`` (peft's name for an adapter loaded without one) when there are several.
    The float32 product avoids slow half-precision matmuls on CPU and keeps the comparison exact.
    """
    if not isinstance(lora_module, LoraLayer):
        raise TypeError(
            f"Expected a peft LoRA layer (e.g. model.model.layers[0].self_attn.q_proj of a PeftModel), "
            f"got {type(lora_module).__name__}."
        )
    name = _resolve_adapter_name(lora_module, adapter_name)
    if name in getattr(lora_module, "lora_variant", {}):
        raise ValueError(f"Adapter {name!r} uses a LoRA variant (e.g. DoRA) whose update is not just scaling * B @ A.")
    weight_A = lora_module.lora_A[name].weight
    weight_B = lora_module.lora_B[name].weight
    if weight_A.dim() != 2:
        raise ValueError(f"lora_delta_weight handles Linear layers; this adapter's lora_A is {weight_A.dim()}-D.")
    return lora_module.scaling[name] * (weight_B.float() @ weight_A.float())


def base_weight_float32(lora_module) -> torch.Tensor:
    """The frozen base weight under a LoRA layer as float32 ``(out, in)``: dequantized for a 4-bit or 8-bit base.

    For a 4-bit base this is ``Q(W)``, the weight the adapter was trained against, not the original ``W``.
    """
    if not isinstance(lora_module, LoraLayer):
        raise TypeError(f"Expected a peft LoRA layer, got {type(lora_module).__name__}.")
    base = lora_module.get_base_layer()
    weight = base.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:  # bitsandbytes Linear4bit (kept on the portable CPU path by models.load_model)
        if getattr(quant_state, "packing_format_for_cpu", False):
            raise ValueError("This 4-bit weight was repacked for bitsandbytes' AVX512-BF16 CPU kernel; load the "
                             "model with helpers.models.load_model, which keeps the portable layout.")
        import bitsandbytes as bnb

        return bnb.functional.dequantize_4bit(weight.data, quant_state).float()
    if weight.dtype == torch.int8:  # bitsandbytes Linear8bitLt: int8 rows and their float32 scales
        from helpers import quantization

        return quantization.dequantize_int8_rowwise(*quantization.int8_storage_of(base)).float()
    return weight.detach().float()


def update_ratios(peft_model, adapter_name: str = "default") -> dict[str, float]:
    """``||ΔW|| / ||W||`` (Frobenius norms) of every adapted module, keyed by module name: a diagnostic.

    ``W`` is the base weight the adapter was trained against (dequantized for a 4-bit or 8-bit base). No paper sets
    a threshold on this ratio; LoRA's premise is that ``ΔW`` has low rank, not that it is small. For inputs with
    independent entries of equal spread, the ratio is also the typical relative change of the layer's output
    (``E||ΔW x||² = ||ΔW||² E[x_i²]``). The LoRA paper reports ``||ΔW_q|| / ||W_q||`` of 6.91 / 61.95 for GPT-3 at
    r = 4 (its Table 7; :func:`update_directions` repeats that table's measurement).
    """
    ratios = {}
    for name, layer in _lora_layers(peft_model, adapter_name):
        delta = lora_delta_weight(layer, adapter_name)
        base = base_weight_float32(layer).to(delta.device)
        ratios[_strip_peft_prefix(name)] = (delta.norm() / base.norm()).item()
    return ratios


@dataclass(frozen=True)
class UpdateDirections:
    """The LoRA paper's Table 7 for one layer: how much of ``W`` lies along the update's own directions.

    Each ``along_*`` is ``||Uᵀ W V||`` (Frobenius) with ``U`` and ``V`` the top-``r`` left and right singular
    directions of the update, of ``W`` itself, or of a random matrix.
    """

    rank: int
    weight_norm: float  # ||W||
    update_norm: float  # ||ΔW||
    along_update: float
    along_weight: float
    along_random: float

    @property
    def amplification(self) -> float:
        """``||ΔW|| / ||Uᵀ W V||`` along the update's directions: how much the update enlarges what ``W`` has there."""
        return self.update_norm / self.along_update


def _orthonormal_columns(matrix: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(matrix, mode="reduced").Q


def update_directions(weight: torch.Tensor, lora_B: torch.Tensor, lora_A: torch.Tensor, scaling: float,
                      weight_singular_values: torch.Tensor | None = None, seed: int = 0) -> UpdateDirections:
    """Project ``weight`` (``W``, ``(out, in)``) on the top-``r`` directions of ``ΔW = scaling · B @ A``, of ``W`` and
    of a random matrix, as in the LoRA paper's section 7.3 (Table 7).

    The update's singular directions come from its factors (a QR of each, then the SVD of an ``r x r`` core), so no
    ``(out, in)`` decomposition is needed. Along ``W``'s own top-``r`` directions ``Uᵀ W V`` is diagonal, holding its
    ``r`` largest singular values: pass them (``torch.linalg.svdvals(W)``) if already computed, or they are. The
    random directions are orthonormalized columns of ``helpers.environment.portable_randn`` (the same on every CPU).
    Computed in float32 on the weight's device.
    """
    from helpers.environment import portable_randn

    for name, tensor in (("weight", weight), ("lora_B", lora_B), ("lora_A", lora_A)):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2 or not tensor.is_floating_point():
            raise ValueError(f"{name} must be a 2-D float tensor, got {getattr(tensor, 'shape', type(tensor).__name__)}.")
    rank = lora_A.shape[0]
    if lora_B.shape != (weight.shape[0], rank) or lora_A.shape != (rank, weight.shape[1]):
        raise ValueError(f"lora_B {tuple(lora_B.shape)} and lora_A {tuple(lora_A.shape)} do not fit a weight "
                         f"{tuple(weight.shape)}: they must be (out, r) and (r, in).")
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real) or not scaling > 0:
        raise ValueError(f"scaling must be a positive number (lora_alpha / r), got {scaling!r}.")
    W = weight.float()
    B, A = lora_B.to(W.device).float(), lora_A.to(W.device).float()
    (Q_B, R_B), (Q_A, R_A) = torch.linalg.qr(B, mode="reduced"), torch.linalg.qr(A.T, mode="reduced")
    core_U, core_S, core_Vh = torch.linalg.svd(scaling * R_B @ R_A.T)  # ΔW = (Q_B core_U) S (Q_A core_Vh^T)^T
    U, V = Q_B @ core_U, Q_A @ core_Vh.T
    if weight_singular_values is None:
        weight_singular_values = torch.linalg.svdvals(W)
    top = weight_singular_values.to(W.device).float().sort(descending=True).values[:rank]
    random_U = _orthonormal_columns(portable_randn(W.shape[0], rank, seed=seed).to(W.device))
    random_V = _orthonormal_columns(portable_randn(W.shape[1], rank, seed=seed + 1).to(W.device))
    return UpdateDirections(
        rank=rank, weight_norm=W.norm().item(), update_norm=core_S.norm().item(),
        along_update=(U.T @ W @ V).norm().item(), along_weight=top.norm().item(),
        along_random=(random_U.T @ W @ random_V).norm().item())


def lora_scaling(lora_alpha: float, r: int, use_rslora: bool = False) -> float:
    """peft's ``scaling``: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora=True`` (rsLoRA,
    arXiv:2312.03732)."""
    r = _check_rank(r)
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, numbers.Real) or not lora_alpha > 0:
        raise ValueError(f"lora_alpha must be a positive number, got {lora_alpha!r}.")
    if not isinstance(use_rslora, bool):
        raise TypeError(f"use_rslora must be True or False, got {use_rslora!r}.")
    return lora_alpha / (math.sqrt(r) if use_rslora else r)


@dataclass(frozen=True)
class StartGradient:
    """One peft LoRA layer at its start (``B = 0``): its ``scaling`` and the size of the gradient reaching ``lora_B``."""

    r: int
    scaling: float  # peft's own value on the layer
    gradient_norm: float  # ||∂L/∂lora_B||


def start_gradients(in_features: int, out_features: int, ranks: Sequence[int], lora_alpha: float,
                    use_rslora: bool, tokens: int = 64, seed: int = 0) -> list[StartGradient]:
    """Build a peft LoRA layer ``(in_features -> out_features)`` at each rank and measure ``||∂L/∂lora_B||`` at LoRA's
    start, for ``L = sum(g * output)`` with random inputs ``x`` and a random gradient ``g`` from above.

    ``lora_B`` starts at 0 and ``lora_A`` is random with the spread peft gives it (variance ``1 / (3 in)``, whatever
    the rank), drawn with ``portable_randn`` (the first ``r`` rows of one draw). The gradient is
    ``scaling · gᵀ (x Aᵀ)``: a sum over ``r`` independent rows of ``A``, so its size grows like ``scaling · sqrt(r)``.
    With ``lora_alpha / r`` it shrinks as ``1 / sqrt(r)``; with rsLoRA's ``lora_alpha / sqrt(r)`` it stays level.
    Runs on the CPU in float32 and leaves torch's random number generator as it found it.
    """
    from collections import OrderedDict

    from peft import LoraConfig, get_peft_model

    from helpers.environment import portable_randn

    ranks = [_check_rank(r) for r in ranks]
    lora_scaling(lora_alpha, 1, use_rslora)  # the same checks of lora_alpha and use_rslora
    if not ranks or max(ranks) > min(in_features, out_features):
        raise ValueError(f"ranks must be non-empty and at most min(in_features, out_features) = "
                         f"{min(in_features, out_features)}, got {ranks}.")
    x = portable_randn(tokens, in_features, seed=seed)
    g = portable_randn(tokens, out_features, seed=seed + 1)
    A_rows = portable_randn(max(ranks), in_features, seed=seed + 2) / math.sqrt(3 * in_features)
    results = []
    with torch.random.fork_rng(devices=[]):  # peft draws its own lora_A, which we replace
        for r in ranks:
            base = torch.nn.Sequential(OrderedDict(proj=torch.nn.utils.skip_init(
                torch.nn.Linear, in_features, out_features, bias=False)))
            config = LoraConfig(r=r, lora_alpha=lora_alpha, use_rslora=use_rslora, target_modules=["proj"],
                                lora_dropout=0.0)
            layer = get_peft_model(base, config).base_model.model.proj
            with torch.no_grad():
                layer.base_layer.weight.zero_()  # its output does not reach the gradient of lora_B
                layer.lora_A["default"].weight.copy_(A_rows[:r])
            (layer(x) * g).sum().backward()
            results.append(StartGradient(r, layer.scaling["default"],
                                         layer.lora_B["default"].weight.grad.norm().item()))
    return results


# ---------------------------------------------------------------------------------------------
# The adapter file
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SafetensorsLayout:
    """Where the bytes of a ``.safetensors`` file go: an 8-byte length, a JSON header, then tensor data."""

    path: Path
    file_bytes: int
    header_bytes: int
    tensor_bytes: int
    num_params: int
    tensors: dict[str, tuple[str, tuple[int, ...]]]  # name -> (dtype code such as "F32", shape)


def adapter_file_layout(path: str | Path) -> SafetensorsLayout:
    """Read the header of ``adapter_model.safetensors`` (or the folder holding it) without loading tensors.

    The file is ``tensor_bytes`` of raw tensor data plus ``header_bytes`` (the 8-byte little-endian
    header length and the JSON header naming every tensor's dtype, shape and byte range): that header
    is why the file is a little larger than the parameters it stores.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "adapter_model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pass an adapter folder or its adapter_model.safetensors.")
    with path.open("rb") as file:
        (json_length,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(json_length))
    header.pop("__metadata__", None)
    tensors = {name: (entry["dtype"], tuple(entry["shape"])) for name, entry in header.items()}
    return SafetensorsLayout(
        path=path,
        file_bytes=path.stat().st_size,
        header_bytes=8 + json_length,
        tensor_bytes=sum(entry["data_offsets"][1] - entry["data_offsets"][0] for entry in header.values()),
        num_params=sum(math.prod(shape) for _, shape in tensors.values()),
        tensors=tensors,
    )


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def local_adapter_folder(adapter_id: str | Path) -> Path:
    """Return the folder that holds an adapter's ``adapter_config.json`` and ``adapter_model.safetensors``.

    ``adapter_id`` is either a local folder (the shipped ``data/pricer-adapter``) or a Hub repository id
    (``owner/name``); for a repository the two files are fetched once into the Hugging Face cache, and the
    cached snapshot folder is returned, so the file itself can be inspected (e.g. by ``adapter_file_layout``).
    """
    if not isinstance(adapter_id, (str, Path)) or not str(adapter_id).strip():
        raise ValueError(f"adapter_id must be a folder path or a Hub repository id such as 'owner/name', got {adapter_id!r}.")
    folder = Path(adapter_id)
    if folder.is_dir():
        missing = [name for name in ADAPTER_FILES if not (folder / name).is_file()]
        if missing:
            raise FileNotFoundError(f"The adapter folder {folder} lacks {', '.join(missing)}: is it a peft LoRA adapter "
                                    "saved with save_pretrained?")
        return folder
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(adapter_id), allow_patterns=list(ADAPTER_FILES)))
    except Exception as error:  # huggingface_hub raises several types (offline, unknown repo, gated)
        raise FileNotFoundError(
            f"{adapter_id!r} is not a local folder, and its Hub repository could not be read "
            f"({type(error).__name__}). Check the path, or unset HF_HUB_OFFLINE to download it."
        ) from error


# ---------------------------------------------------------------------------------------------
# Memory of fine-tuning: weights, gradients and optimizer states
# ---------------------------------------------------------------------------------------------

FINETUNING_METHODS: tuple[str, ...] = ("full", "lora", "qlora")
LORA_WEIGHT_DTYPE = torch.float32  # peft keeps adapter weights in float32 even on a 16-bit or 4-bit base
ADAMW_STATES_PER_PARAMETER = 2  # exp_avg and exp_avg_sq, each in the parameter's dtype


@dataclass(frozen=True)
class FinetuningMemory:
    """Bytes a fine-tuning method keeps while training, activations excluded (they depend on batch and length).

    AdamW's per-tensor step counters (one scalar per trainable tensor) are left out: a few bytes.
    """

    method: str
    base_description: str
    trainable_params: int
    weights: int  # every stored weight: the frozen (maybe quantized) base and the trainable parameters
    gradients: int  # one gradient per trainable parameter
    optimizer_states: int  # AdamW's two moments per trainable parameter

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer_states


def _float_scheme(dtype: torch.dtype) -> str:
    schemes = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    if dtype not in schemes:
        raise ValueError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype!r}.")
    return schemes[dtype]


def finetuning_memory(config, r: int, target_modules: Sequence[str], lora_base_dtype: torch.dtype = torch.bfloat16,
                      qlora_other_dtype: torch.dtype = torch.float32) -> dict[str, FinetuningMemory]:
    """Training memory of full fine-tuning, LoRA and QLoRA for a Llama config, computed from the config alone.

    - ``"full"``: every parameter trains, in float32: weights, gradients and AdamW's two moments take
      4 bytes each per parameter.
    - ``"lora"``: the base is frozen in ``lora_base_dtype`` (bfloat16 by default); only the LoRA matrices
      (float32) have gradients and optimizer states.
    - ``"qlora"``: the base's decoder Linear weights are 4-bit NF4 with double quantization (constants
      included); everything else of the base is in ``qlora_other_dtype``, float32 by default because
      ``peft.prepare_model_for_kbit_training`` upcasts it; the LoRA matrices train as in ``"lora"``.

    Weights come from :func:`helpers.memory.estimate_footprint` (exact to the byte for a loaded model)
    plus the LoRA matrices from :func:`lora_param_count`.
    """
    config = _as_attributes(config)  # a parsed config.json may lack optional keys such as head_dim
    lora_params = lora_param_count(config, r, target_modules)  # validates r and target_modules
    lora_element = LORA_WEIGHT_DTYPE.itemsize
    full_params = sum(parameter_counts_from_config(config).values())
    lora_base = estimate_footprint(config, _float_scheme(lora_base_dtype))
    _float_scheme(qlora_other_dtype)  # validate: the non-quantized modules are one of the float dtypes
    qlora_base = estimate_footprint(config, "nf4-dq", qlora_other_dtype)
    full_element = torch.float32.itemsize
    base_name, other_name = (str(dtype).removeprefix("torch.") for dtype in (lora_base_dtype, qlora_other_dtype))

    def adapter_method(method: str, base_true_bytes: int, description: str) -> FinetuningMemory:
        return FinetuningMemory(method, description, lora_params, base_true_bytes + lora_params * lora_element,
                                lora_params * lora_element, ADAMW_STATES_PER_PARAMETER * lora_params * lora_element)

    return {
        "full": FinetuningMemory("full", "float32, every parameter trains", full_params,
                                 estimate_footprint(config, "fp32").true, full_params * full_element,
                                 ADAMW_STATES_PER_PARAMETER * full_params * full_element),
        "lora": adapter_method("lora", lora_base.true, f"frozen {base_name} base + float32 LoRA"),
        "qlora": adapter_method("qlora", qlora_base.true,
                                f"frozen NF4 (double quant) base, rest {other_name} + float32 LoRA"),
    }


# --------------------------------------------------------------------------------------------- a short QLoRA run

@dataclass(frozen=True)
class TrainingSettings:
    """The hyper-parameters of notebook 06's short QLoRA run, decided per profile and hardware."""

    steps: int
    batch_size: int
    learning_rate: float
    warmup_steps: int
    gradient_checkpointing: bool
    loss_scaling: bool
    reasons: tuple[str, ...]

    def learning_rate_at(self, step: int) -> float:
        """Linear warm-up to ``learning_rate`` over ``warmup_steps``, then constant (step counts from 0)."""
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        return self.learning_rate * min(1.0, (step + 1) / max(self.warmup_steps, 1))

    def with_steps(self, steps: int) -> "TrainingSettings":
        """The same run cut to ``steps`` (``helpers.workload.steps``: fewer only under a small workload), warm-up
        still a tenth of the steps; ``self`` when nothing changes."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        if steps == self.steps:
            return self
        return replace(self, steps=steps, warmup_steps=steps // 10,
                       reasons=(*self.reasons, f"{steps} steps instead of {self.steps}: a small workload "
                                               f"(helpers.workload)"))


def training_settings(profile_name: str, compute_dtype: torch.dtype, on_gpu: bool) -> TrainingSettings:
    """Notebook 06's run for a profile (pure, so every combination is tested without a GPU).

    - Learning rate: 2e-3 suits the 6.8M-parameter tiny Llama; a 3B or 8B model takes the QLoRA paper's 2e-4
      (larger models need smaller steps), in both cases after a linear warm-up over a tenth of the steps.
    - Loss scaling: with float16 compute (a T4) small gradients underflow to zero in the 4-bit layers' backward,
      so the loss is scaled up before ``backward`` and the gradients scaled back (``torch.amp.GradScaler``);
      bfloat16 and float32 have float32's range and need none.
    - Gradient checkpointing on a GPU only, non-reentrant (saves activation memory; on a CPU it only costs time).
    """
    if compute_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"compute_dtype must be torch.float32, torch.bfloat16 or torch.float16, got {compute_dtype!r}")
    if profile_name == "tiny":
        steps, batch_size, learning_rate = 30, 8, 2e-3
        why_rate = "2e-3: the tiny Llama has 6.8M parameters and learns the format in a few dozen steps"
    elif profile_name in ("llama-3.2-3b", "llama-3.1-8b"):
        steps, batch_size, learning_rate = 60, 4, 2e-4
        why_rate = "2e-4, the QLoRA paper's rate for models of this size (2e-3 would overshoot)"
    else:
        raise ValueError(f"No training settings for profile {profile_name!r}: add them to helpers.lora.training_settings.")
    loss_scaling = compute_dtype == torch.float16
    reasons = (
        f"learning rate {why_rate}, warmed up linearly over {steps // 10} steps",
        "loss scaling on: float16 compute" if loss_scaling else f"no loss scaling: {compute_dtype} has float32's range",
        "gradient checkpointing on (non-reentrant): saves GPU memory" if on_gpu
        else "gradient checkpointing off: on a CPU it would only cost time",
    )
    return TrainingSettings(steps, batch_size, learning_rate, steps // 10, on_gpu, loss_scaling, reasons)


# --------------------------------------------------------------------------------------------- the same run through TRL


def sft_config_kwargs(settings: TrainingSettings, output_dir: str | Path, save_steps: int,
                      save_total_limit: int, seed: int = 0) -> dict:
    """Keyword arguments for ``trl.SFTConfig`` that make ``SFTTrainer`` repeat notebook 06's explicit loop.

    Each one undoes a default that would make the two runs differ (pure, so it is tested without trl's trainer):

    - ``train_sampling_strategy="sequential"`` and ``shuffle_dataset=False``: the items in the order the loop took
      them (transformers' default sampler is random);
    - ``max_grad_norm=0.0``: no gradient clipping (transformers clips at 1.0 by default; the loop does not clip);
    - ``bf16=False`` (trl turns bfloat16 autocast on unless told otherwise) and ``fp16`` only where the loop scales
      the loss (float16 compute), so that the trainer's ``GradScaler`` is on exactly when the loop's is;
    - ``activation_checkpointing`` (transformers 5's name for gradient checkpointing) as the loop decided (trl's
      default is on);
    - ``completion_only_loss=True``: the loss on the answer tokens only, as ``helpers.pricer.encode_for_training``;
    - ``max_length=None``: nothing truncated (trl truncates at 1,024 tokens by default);
    - ``logging_steps=1``: one logged loss per step, the curve to compare; checkpoints every ``save_steps`` steps, of
      which only the last ``save_total_limit`` are kept on disk.

    The optimizer and the learning-rate schedule are not here: pass the loop's own to ``SFTTrainer(optimizers=...)``.
    """
    if not isinstance(settings, TrainingSettings):
        raise TypeError(f"settings must be the TrainingSettings of helpers.lora.training_settings, got {type(settings).__name__}.")
    for name, value in (("save_steps", save_steps), ("save_total_limit", save_total_limit)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}.")
    if not str(output_dir).strip():
        raise ValueError("output_dir is empty: pass the folder for the checkpoints (e.g. a tempfile.TemporaryDirectory).")
    return {
        "output_dir": str(output_dir),
        "max_steps": settings.steps,
        "per_device_train_batch_size": settings.batch_size,
        "gradient_accumulation_steps": 1,
        "learning_rate": settings.learning_rate,
        "train_sampling_strategy": "sequential",
        "shuffle_dataset": False,
        "max_grad_norm": 0.0,
        "bf16": False,
        "fp16": settings.loss_scaling,
        "activation_checkpointing": settings.gradient_checkpointing,  # transformers 5's name for it
        "activation_checkpointing_kwargs": {"use_reentrant": False},
        "completion_only_loss": True,
        "max_length": None,
        "logging_steps": 1,
        "save_strategy": "steps",
        "save_steps": save_steps,
        "save_total_limit": save_total_limit,
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "dataloader_pin_memory": False,  # batches of a few kB: pinning buys nothing (and warns on a CPU)
        "seed": seed,
    }


def training_autocast(settings: TrainingSettings, device: torch.device | str):
    """The autocast context of ``SFTTrainer(fp16=True)``, for the explicit loop and every loss compared with it.

    With float16 compute the trainer (through accelerate) runs each forward pass under float16 autocast, and leaves
    ``model.forward`` wrapped in it afterwards. The loop computes under the same context, so the two runs are the
    same computation by construction; where the loss is not scaled (float32 or bfloat16 compute) the context is off
    and nothing changes.
    """
    if not isinstance(settings, TrainingSettings):
        raise TypeError(f"settings must be helpers.lora.TrainingSettings, got {type(settings).__name__}.")
    return torch.autocast(torch.device(device).type, dtype=torch.float16, enabled=settings.loss_scaling)


def schedule_after_step(scheduler, scaler, scale_before: float) -> bool:
    """Advance the learning-rate schedule unless the loss scaler skipped the optimizer step; True when it advanced.

    A ``GradScaler`` that finds inf or NaN gradients skips ``optimizer.step()`` and lowers its scale; accelerate then
    skips the scheduler too (its ``step_was_skipped``), so the loop does the same. Call it after ``scaler.update()``
    with the scale read before ``scaler.step``. A disabled scaler never skips.
    """
    if scaler.get_scale() < scale_before:
        return False
    scheduler.step()
    return True


def trainer_loss_tolerance(compute_dtype: torch.dtype) -> float:
    """How far a logged ``SFTTrainer`` loss may be from the explicit loop's at the same step (absolute).

    Both runs compute the same mean cross-entropy, but not in the same order: trl scores the answer tokens with its
    fused LM head (in tiles, without the full logits) and divides a sum by the count. In float32 those differences
    stay in the late decimals over a short run (1e-3 leaves a wide margin); with float16 mixed precision the trainer
    also runs the LoRA matmuls under autocast, so its losses may differ by a few hundredths.
    """
    if compute_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"compute_dtype must be torch.float32, torch.bfloat16 or torch.float16, got {compute_dtype!r}")
    return 1e-3 if compute_dtype == torch.float32 else 5e-2


def checkpoint_folders(output_dir: str | Path) -> list[str]:
    """The ``checkpoint-<step>`` folders a transformers Trainer left in ``output_dir``, in step order."""
    folder = Path(output_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder: pass the trainer's output_dir.")
    found = [p.name for p in folder.iterdir() if p.is_dir() and p.name.startswith("checkpoint-")
             and p.name.removeprefix("checkpoint-").isdigit()]
    return sorted(found, key=lambda name: int(name.removeprefix("checkpoint-")))


# --------------------------------------------------------------------------------------------- reading a loss curve


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """The mean of each value and the ``window - 1`` before it (fewer at the start), as a list as long as ``values``."""
    if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
        raise ValueError(f"window must be a positive int (how many steps to average), got {window!r}.")
    values = [float(v) for v in values]
    return [sum(values[max(0, i + 1 - window): i + 1]) / (i + 1 - max(0, i + 1 - window)) for i in range(len(values))]


def epoch_ends(n_items: int, batch_size: int, steps: int) -> list[int]:
    """The steps (counted from 1) after which a pass over ``n_items`` items, taken in order, is complete.

    Step ``s`` has seen ``s * batch_size`` items; an epoch ends at the first step that reaches a multiple of
    ``n_items``. A run of fewer than ``n_items / batch_size`` steps has none.
    """
    for name, value in (("n_items", n_items), ("batch_size", batch_size), ("steps", steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}.")
    ends, epoch = [], 1
    for step in range(1, steps + 1):
        if step * batch_size >= epoch * n_items:
            ends.append(step)
            epoch = step * batch_size // n_items + 1
    return ends


# --------------------------------------------------------------------------------------------- optimizer states

OPTIMIZERS: tuple[str, ...] = ("adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit")
BNB_8BIT_BLOCKSIZE = 256  # bitsandbytes' 8-bit optimizers keep one float32 scale (absmax) per 256 values per state
BNB_MIN_8BIT_SIZE = 4096  # tensors with fewer values keep 32-bit states (bitsandbytes' min_8bit_size default)
BNB_PAGED_MIN_SIZE = 100_000  # bitsandbytes pages only state buffers of at least this many values
BNB_QMAP_BYTES = 2 * 256 * 4  # the two 256-entry float32 code books of an 8-bit optimizer, shared by all tensors


@dataclass(frozen=True)
class OptimizerStateMemory:
    """Bytes of AdamW's two moments for one optimizer; ``paged`` of them may move to CPU RAM when the GPU is full."""

    optimizer: str
    trainable_params: int
    total: int
    paged: int


def lora_tensor_sizes(config, r: int, target_modules: Sequence[str]) -> list[int]:
    """The number of values of every LoRA matrix (``lora_A``: ``r * in``, ``lora_B``: ``out * r``), layer by layer."""
    breakdown = lora_param_breakdown(config, r, target_modules)
    per_layer = [size for row in breakdown.rows for size in (row.r * row.in_features, row.out_features * row.r)]
    return per_layer * breakdown.num_layers


def optimizer_state_memory(tensor_sizes: Sequence[int], optimizer: str) -> OptimizerStateMemory:
    """AdamW's state bytes for trainable tensors of the given sizes, as bitsandbytes or torch allocate them.

    - ``"adamw"`` (torch or bitsandbytes, 32-bit): two float32 moments, 8 bytes per value.
    - ``"adamw8bit"``: each tensor of at least ``BNB_MIN_8BIT_SIZE`` values keeps both moments as uint8 codes
      (2 bytes per value) plus one float32 scale per block of ``BNB_8BIT_BLOCKSIZE`` values per moment; smaller
      tensors stay 32-bit; the two code books are counted once.
    - ``"paged_..."``: the same bytes, but buffers of at least ``BNB_PAGED_MIN_SIZE`` values live in CUDA unified
      memory, which the driver moves to CPU RAM when the GPU runs out instead of failing: they save no bytes, they
      survive memory spikes. Paging needs a CUDA GPU; on a CPU bitsandbytes falls back to ordinary buffers.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}.")
    sizes = list(tensor_sizes)
    if any(isinstance(n, bool) or not isinstance(n, numbers.Integral) or n <= 0 for n in sizes):
        raise ValueError("tensor_sizes must be positive ints (the number of values of each trainable tensor).")
    eight_bit = optimizer.endswith("8bit")
    total = paged = 0
    for n in sizes:
        if eight_bit and n >= BNB_MIN_8BIT_SIZE:
            state, scales = 2 * n, 2 * 4 * math.ceil(n / BNB_8BIT_BLOCKSIZE)
        else:
            state, scales = ADAMW_STATES_PER_PARAMETER * 4 * n, 0
        total += state + scales
        if optimizer.startswith("paged_") and n >= BNB_PAGED_MIN_SIZE:
            paged += state
    if eight_bit and any(n >= BNB_MIN_8BIT_SIZE for n in sizes):
        total += BNB_QMAP_BYTES
    return OptimizerStateMemory(optimizer, sum(sizes), total, paged)


def runnable_optimizers(on_gpu: bool) -> dict[str, str]:
    """Which of ``OPTIMIZERS`` really run on this hardware, each with the reason (pure: tested with the GPU faked)."""
    if not isinstance(on_gpu, bool):
        raise TypeError(f"on_gpu must be a bool, got {on_gpu!r}.")
    runs = {"adamw": "torch.optim.AdamW, everywhere",
            "adamw8bit": "bitsandbytes.optim.AdamW8bit: bitsandbytes has CPU and CUDA kernels for it"}
    if on_gpu:
        runs["paged_adamw"] = "bitsandbytes.optim.PagedAdamW: CUDA unified memory"
        runs["paged_adamw8bit"] = "bitsandbytes.optim.PagedAdamW8bit: CUDA unified memory"
    return runs



def release_paged_buffers(optimizer: torch.optim.Optimizer) -> int:
    """Drop a bitsandbytes optimizer's paged state buffers from bitsandbytes' global page manager; returns their bytes.

    A paged optimizer (``PagedAdamW``, ``PagedAdamW8bit``, on CUDA) allocates each large state buffer in unified
    memory and also appends it to ``GlobalPageManager.paged_tensors``, a process-wide list bitsandbytes never empties:
    ``del optimizer`` alone leaves every buffer alive. Call this before deleting the optimizer. On a CPU, where
    bitsandbytes falls back to ordinary buffers, nothing is registered and it returns 0.
    """
    manager = getattr(optimizer, "page_mng", None)
    if manager is None:
        return 0
    own = {id(t) for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)}
    dropped = [t for t in manager.paged_tensors if id(t) in own]
    manager.paged_tensors[:] = [t for t in manager.paged_tensors if id(t) not in own]
    return sum(t.nelement() * t.element_size() for t in dropped)

# --------------------------------------------------------------------------------------------- QLoRA against LoRA

DEQUANTIZE_4BIT_OP = "bitsandbytes::dequantize_4bit"  # every whole-weight dequantization, inside a product or not
PRODUCT_4BIT_OP = "bitsandbytes::gemm_4bit"  # every forward product with a 4-bit weight (bitsandbytes 0.50)


@dataclass(frozen=True)
class TrainingStepMeasurement:
    """One forward and backward pass of a batch, watched by ``helpers.memory.TensorPeak``."""

    loss: float
    step_peak_bytes: int  # the most bytes the step's own tensors held at once (activations, copies, gradients)
    step_peak_op: str | None  # the operator whose result reached that peak
    gpu_peak_bytes: int | None  # the CUDA allocator's peak above what was allocated before the step; None on a CPU
    products_4bit: int  # forward products with a 4-bit weight
    dequantized_forward: int  # whole 4-bit weights rebuilt in the forward
    dequantized_backward: int  # ... and in the backward (for the gradient of the layer's input)
    inputs_needing_grad_4bit: int  # 4-bit layers whose input required a gradient in this step
    seconds: tuple[float, ...]  # wall-clock seconds of each timed repeat (not compared by CI)


def measure_training_step(model: torch.nn.Module, batch: Mapping[str, torch.Tensor],
                          timed_repeats: int = 3) -> TrainingStepMeasurement:
    """Measure a training step of ``model`` on ``batch``: one watched forward + backward, then ``timed_repeats``
    timed ones. The optimizer is left out on purpose (it is the same for LoRA and QLoRA, and a step would change
    the weights): gradients are computed, measured and reset to None, the weights never change.

    Measure without gradient checkpointing: with it, the backward pass recomputes the forward, whose products and
    dequantizations then count as the backward's. The count of bitsandbytes ``Linear4bit`` layers whose input
    needed a gradient, taken with forward hooks, is what the backward's dequantizations should equal:
    ``MatMul4Bit.backward`` rebuilds the weight only for that gradient.
    """
    import time

    from helpers.memory import TensorPeak

    if isinstance(timed_repeats, bool) or not isinstance(timed_repeats, int) or timed_repeats < 1:
        raise ValueError(f"timed_repeats must be a positive int, got {timed_repeats!r}.")
    if "labels" not in batch:
        raise ValueError("batch has no 'labels': pass a training batch (helpers.pricer.collate_for_training).")
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("no parameter requires a gradient: wrap the model with peft.get_peft_model first.")
    device = next(model.parameters()).device
    batch = {name: tensor.to(device) for name, tensor in batch.items()}
    import bitsandbytes as bnb

    layers_4bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]  # not peft's wrappers around them
    needing_grad: list[bool] = []
    hooks = [m.register_forward_pre_hook(lambda _, args: needing_grad.append(bool(args[0].requires_grad)))
             for m in layers_4bit]
    on_gpu = device.type == "cuda"

    def step() -> float:
        loss = model(**batch).loss
        loss.backward()
        for p in trainable:
            p.grad = None
        return loss.item()

    try:
        if on_gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            allocated_before = torch.cuda.memory_allocated()
        with TensorPeak() as watched:
            loss = model(**batch).loss
            forward_counts = dict(watched.op_counts)
            loss.backward()
        gpu_peak = torch.cuda.max_memory_allocated() - allocated_before if on_gpu else None
        loss_value = loss.item()
        del loss
        for p in trainable:
            p.grad = None
    finally:
        for hook in hooks:
            hook.remove()
    seconds = []
    for _ in range(timed_repeats):
        start = time.perf_counter()
        step()
        if on_gpu:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    dequantized_forward = forward_counts.get(DEQUANTIZE_4BIT_OP, 0)
    return TrainingStepMeasurement(
        loss=loss_value, step_peak_bytes=watched.peak_bytes, step_peak_op=watched.peak_op, gpu_peak_bytes=gpu_peak,
        products_4bit=forward_counts.get(PRODUCT_4BIT_OP, 0), dequantized_forward=dequantized_forward,
        dequantized_backward=watched.op_counts.get(DEQUANTIZE_4BIT_OP, 0) - dequantized_forward,
        inputs_needing_grad_4bit=sum(needing_grad), seconds=tuple(seconds))


# --------------------------------------------------------------------------------------------- LoftQ

def loftq_factors(residual: torch.Tensor, rank: int, scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """LoftQ's starting LoRA matrices for one layer: ``A`` (r, in) and ``B`` (out, r) such that
    ``scaling * B @ A`` is the best rank-``r`` approximation of ``residual = W - Q(W)``, the quantization error.

    The singular value decomposition ``U S V^T`` of the residual gives it: keep the ``r`` largest singular values,
    and give each factor the square root of each (``B = U_r sqrt(S_r)``, ``A = sqrt(S_r) V_r^T``), divided by
    ``sqrt(scaling)`` so that the layer's update ``scaling * B @ A`` is that approximation. peft 0.21.2's LoftQ
    makes the same split without the division, whatever ``lora_alpha / r`` is (peft issue #1982): pass
    ``scaling=1.0`` to get its factors. Computed in float32 on the residual's device.
    """
    if not isinstance(residual, torch.Tensor) or residual.dim() != 2 or not residual.is_floating_point():
        raise ValueError(f"residual must be a 2-D float tensor (out, in), got "
                         f"{getattr(residual, 'shape', type(residual).__name__)}.")
    rank = _check_rank(rank)
    if rank > min(residual.shape):
        raise ValueError(f"rank {rank} is larger than the residual allows (its shape is {tuple(residual.shape)}).")
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real) or not scaling > 0 or math.isinf(scaling):
        raise ValueError(f"scaling must be a positive number (lora_alpha / r), got {scaling!r}.")
    return _split(*_top_singular(residual, rank), scaling)


def _top_singular(residual: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top ``rank`` singular triplets, as tensors of their own: a slice would keep the whole U and Vh alive
    (``svd_cache`` holds these for every layer: on a 3B model, gigabytes instead of megabytes)."""
    U, S, Vh = torch.linalg.svd(residual.float(), full_matrices=False)
    return U[:, :rank].clone(), S[:rank].clone(), Vh[:rank].clone()


def _split(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    root = (S / scaling).sqrt()
    return (root[:, None] * Vh).contiguous(), (U * root).contiguous()


def loftq_error_ratio_formula(residual: torch.Tensor, rank: int, scaling: float) -> float:
    """``‖R - scaling·R_r‖ / ‖R‖`` when the update is ``scaling`` times the best rank-r approximation ``R_r``.

    ``R_r`` and ``R - R_r`` are orthogonal, so the squared error is ``‖R - R_r‖² + (1 - scaling)²‖R_r‖²``: at
    ``scaling = 1`` LoftQ removes ``‖R_r‖²``, at ``scaling = 2`` it leaves the error exactly as large as before.
    """
    S = torch.linalg.svdvals(residual.double())
    kept, rest = (S[:rank] ** 2).sum(), (S[rank:] ** 2).sum()
    return math.sqrt((rest + (1 - scaling) ** 2 * kept) / (kept + rest))


def apply_loftq_(peft_model, original_weight, split_for_scaling: bool = True, adapter_name: str = "default",
                 svd_cache: dict | None = None) -> dict[str, float]:
    """Set every 4-bit LoRA layer's ``A`` and ``B`` to LoftQ's start (in place) and return, per layer,
    ``‖W - Q(W) - scaling·B@A‖ / ‖W - Q(W)‖``: 1.0 is the default start (``B = 0``), lower is better.

    ``original_weight(name)`` returns a layer's unquantized weight ``W`` by its checkpoint name (e.g.
    ``model.layers.0.self_attn.q_proj.weight``; ``helpers.models.checkpoint_reader`` gives one). With
    ``split_for_scaling=False`` the factors are peft 0.21.2's, which ignore ``lora_alpha / r``. Pass the same dict
    as ``svd_cache`` to two calls and the second reuses the first's decompositions (on a 3B model, over a hundred
    SVDs of 3072 x 3072 matrices).
    """
    layers = [(name, module) for name, module in _lora_layers(peft_model, adapter_name)
              if getattr(module.get_base_layer().weight, "quant_state", None) is not None]
    if not layers:
        raise ValueError("No LoRA layer on a bitsandbytes 4-bit weight: LoftQ starts from a model loaded in 4 bits "
                         "(helpers.models.load_model(profile, 'nf4-dq')) and wrapped with get_peft_model.")
    ratios = {}
    with torch.no_grad():
        for name, module in layers:
            A, B = module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight
            quantized = base_weight_float32(module)
            residual = original_weight(_strip_peft_prefix(name) + ".weight").to(quantized.device).float() - quantized
            scaling = module.scaling[adapter_name]
            if svd_cache is None or name not in svd_cache:
                top = _top_singular(residual, _check_rank(A.shape[0]))
                if svd_cache is not None:
                    svd_cache[name] = top
            else:
                top = svd_cache[name]
            new_A, new_B = _split(*top, scaling if split_for_scaling else 1.0)
            A.copy_(new_A.to(A.dtype))
            B.copy_(new_B.to(B.dtype))
            ratios[_strip_peft_prefix(name)] = ((residual - scaling * (B.float() @ A.float())).norm()
                                                / residual.norm()).item()
    return ratios


@dataclass(frozen=True)
class LoftQSteps:
    """What ``loftq_alternation`` found: the weight error after each step, and where the last step left the layer."""

    errors: tuple[float, ...]  # ||W - Q_t - L_t|| / ||W - Q_1|| after step t = 1, 2, ... (1.0 = the default start)
    quantized: torch.Tensor  # Q of the last step, dequantized: the 4-bit base it would need
    low_rank: torch.Tensor  # L of the last step: the best rank-r approximation of W - Q, what scaling * B @ A holds


def loftq_alternation(weight: torch.Tensor, quantized: torch.Tensor, quantize, rank: int, steps: int) -> LoftQSteps:
    """LoftQ's alternation (Li et al., 2023; peft's ``LoftQConfig(loftq_iter=steps)``), on one weight.

    Step 1 starts from ``quantized`` = Q(W), the 4-bit weight the model already holds, and takes ``L_1``, the best
    rank-``rank`` approximation of ``W - Q_1`` (an SVD, split as peft splits it). That is all peft's
    ``replace_lora_weights_loftq`` (and this course's ``apply_loftq_``) does: it cannot change a base that is
    already quantized. Each further step quantizes again what the low-rank part leaves, ``Q_{t+1} =
    quantize(W - L_t)`` (``quantize`` returns the dequantized weight), then approximates ``W - Q_{t+1}`` again:
    only ``init_lora_weights="loftq"``, which quantizes the base itself, can do that. Computed in float32.
    """
    for name, value in (("weight", weight), ("quantized", quantized)):
        if not isinstance(value, torch.Tensor) or value.dim() != 2 or not value.is_floating_point():
            raise ValueError(f"{name} must be a 2-D float tensor (out, in), got "
                             f"{getattr(value, 'shape', type(value).__name__)}.")
    if weight.shape != quantized.shape:
        raise ValueError(f"weight {tuple(weight.shape)} and quantized {tuple(quantized.shape)} differ in shape.")
    if not callable(quantize):
        raise TypeError("quantize must be a function from a weight to its dequantized quantized value.")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int (1 = LoftQ's first step only), got {steps!r}.")
    weight, current = weight.float(), quantized.float()
    first_error = (weight - current).norm()
    errors = []
    for step in range(steps):
        if step > 0:
            current = quantize(weight - low_rank).float()
        residual = weight - current
        A, B = _split(*_top_singular(residual, _check_rank(rank)), 1.0)
        low_rank = B @ A
        errors.append(((residual - low_rank).norm() / first_error).item())
    return LoftQSteps(tuple(errors), current, low_rank)


def trl_cast_report(trainable: Sequence[torch.Tensor], quantized_base: bool, hardware) -> str:
    """What trl's ``SFTTrainer`` did to the LoRA matrices' dtype, when it does it, and what that means on this
    hardware (pure, given the parameters and a ``helpers.environment.Hardware``).

    trl 1.16 (``SFTTrainer.__init__``) casts every trainable parameter but DoRA's magnitude vector to bfloat16
    when the model was loaded in 4 or 8 bits (``is_loaded_in_4bit`` / ``is_loaded_in_8bit``), whatever ``bf16=``
    and ``fp16=`` say, following the QLoRA paper. A GPU without native bfloat16 (compute capability below 8.0: a
    T4) then trains the adapter in emulated bfloat16.
    """
    if not isinstance(quantized_base, bool):
        raise TypeError(f"quantized_base must be True or False, got {quantized_base!r}.")
    dtypes = sorted({str(p.dtype) for p in trainable})
    lines = [f"LoRA dtypes after SFTTrainer(...): {dtypes}"]
    if not quantized_base:
        return lines[0] + " (trl casts to bfloat16 only on a base loaded in 4 or 8 bits)"
    lines.append("  trl casts every trainable parameter to bfloat16 on a base loaded in 4 or 8 bits, "
                 "whatever bf16= and fp16= say")
    if hardware.device != "cuda":
        lines.append("  on a GPU without native bfloat16 (a T4: compute capability 7.5) they would train in emulated "
                     "bfloat16; this notebook casts them back to float32 below")
    elif not hardware.bf16_native:
        major, minor = hardware.compute_capability or (0, 0)
        lines.append(f"  WARNING: {hardware.gpu_name} (compute capability {major}.{minor}) has no native bfloat16: a "
                     "plain SFTTrainer run trains the adapter in emulated bfloat16 (slower, 8 significant bits per "
                     "update); this notebook casts them back to float32 below, do the same in your own runs")
    else:
        lines.append(f"  {hardware.gpu_name} computes bfloat16 natively: the cast costs precision (8 significant "
                     "bits), not speed; this notebook casts them back to float32 below to compare with the loop")
    return "\n".join(lines)


def peft_loftq_runs_here(on_gpu: bool) -> tuple[bool, str]:
    """Whether peft's own LoftQ (``replace_lora_weights_loftq``) can run here, and why (pure)."""
    if not isinstance(on_gpu, bool):
        raise TypeError(f"on_gpu must be a bool, got {on_gpu!r}.")
    if on_gpu:
        return True, "a CUDA GPU is here: peft's replace_lora_weights_loftq runs, and is compared with ours"
    return False, ("peft 0.21.2's LoftQ moves every weight to 'cuda' (or 'xpu') before its SVD, so it cannot run "
                   "on a CPU; tests/test_qlora_questions.py checks our split against peft's own decomposition instead")
