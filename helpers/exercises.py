"""Exercises in the notebooks: a checker for each that says right or not yet, with a hint, never the answer.

A notebook poses an exercise in one cell and ends it with ``exercises.check("00.1", your_answer)``. An exercise about
the notebook's own model or tensors also names them, ``exercises.check("01.1", your_answer, model=model)``, so that it
has one right answer on every profile (the tiny model, or a real Llama's config with random weights). Three outcomes:

* **not attempted** (the answer is still ``...`` or ``None``, or the function still raises ``NotImplementedError``):
  a polite line, nothing else, so a notebook runs top to bottom before anyone has tried anything;
* **right**: ``✓ Exercise 00.1: right.`` and one sentence on what it shows;
* **not yet**: ``✗ Exercise 00.1, not yet: <hint>`` on stderr, which Jupyter shades red. It does not raise: a
  student's wrong answer should not stop the rest of the lesson from running, and every later cell works without it.

A checker accepts any correct way of getting there: a number is compared with a tolerance, a function is run on
several random inputs and compared with a reference computed here, not with a particular way of writing it. The
references are computed from first principles in this module (measured with torch where that is possible);
``helpers/solutions.py`` holds worked solutions, derived independently, and tests/test_exercises.py checks that every
checker accepts its solution, rejects a typical wrong answer with its hint, and greets the unattempted value politely.
"""

from __future__ import annotations

import copy
import functools
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from helpers import basics

RIGHT, NOT_YET, NOT_ATTEMPTED = "right", "not yet", "not attempted"


@dataclass(frozen=True)
class Verdict:
    """What a checker found: ``status`` (RIGHT, NOT_YET or NOT_ATTEMPTED) and one sentence for the student."""

    status: str
    message: str


@dataclass(frozen=True)
class Exercise:
    """One exercise: its key (``"00.1"``: notebook, number), what kind of answer it wants, its checker, and the names
    of what the notebook passes along with the answer (``context``: the model, a tensor), which the checker needs."""

    key: str
    kind: str  # "predict" (a value), "knob" (a setting found by trying) or "function" (code to write)
    question: str
    grade: Callable[..., Verdict]
    context: tuple[str, ...] = ()


EXERCISES: dict[str, Exercise] = {}

_HOW_TO_START = {
    "predict": "replace the ... with your prediction and run this cell again",
    "knob": "replace the ... with the value you found and run this cell again",
    "function": "replace the `raise NotImplementedError` line with your code and run this cell again",
}


def exercise(key: str, kind: str, question: str, context: tuple[str, ...] = ()):
    """Register the decorated function as the checker of exercise ``key``; it is called as
    ``grade(answer, **context)`` with the names listed in ``context``."""
    if kind not in _HOW_TO_START:
        raise ValueError(f"kind must be one of {', '.join(_HOW_TO_START)}, got {kind!r}")

    def register(grade: Callable[..., Verdict]) -> Callable[..., Verdict]:
        if key in EXERCISES:
            raise ValueError(f"exercise {key} is registered twice")
        EXERCISES[key] = Exercise(key, kind, question, grade, tuple(context))
        return grade

    return register


def _unattempted(answer: object) -> bool:
    return answer is ... or answer is None


def grade(key: str, answer: object, **context: object) -> Verdict:
    """Judge ``answer`` to exercise ``key`` without printing anything (the tests call this).

    ``context``: what the exercise is about (``EXERCISES[key].context`` names it, e.g. ``model``). Passing other names
    or leaving one out is a mistake in the notebook, not in the answer, so it raises ``TypeError``.
    """
    if key not in EXERCISES:
        raise KeyError(f"no exercise {key!r}; known: {', '.join(EXERCISES)}")
    found = EXERCISES[key]
    if set(context) != set(found.context):
        wanted = ", ".join(f"{name}=..." for name in found.context) or "nothing besides the answer"
        raise TypeError(f"exercise {key} is checked with {wanted}; got {', '.join(context) or 'no context'}: "
                        f'call exercises.check("{key}", your_answer'
                        + "".join(f", {name}={name}" for name in found.context) + ")")
    if _unattempted(answer):
        return Verdict(NOT_ATTEMPTED, _HOW_TO_START[found.kind])
    try:
        return found.grade(answer, **context)
    except NotImplementedError:  # the function's body is still the placeholder
        return Verdict(NOT_ATTEMPTED, _HOW_TO_START[found.kind])
    except Exception as error:  # noqa: BLE001 (any error in a student's code is a hint, not a crash)
        return Verdict(NOT_YET, f"running your answer raised {type(error).__name__}: {error}")


def check(key: str, answer: object, **context: object) -> None:
    """Print the verdict on ``answer`` to exercise ``key``: a polite note, ``✓ ... right`` or ``✗ ... not yet``.

    Never raises for a wrong or missing answer, so the notebook goes on; returns nothing, so no ``Out[]`` line.
    ``context``: what the exercise is about, as ``grade`` takes it.
    """
    verdict = grade(key, answer, **context)
    if verdict.status == NOT_ATTEMPTED:
        print(f"Exercise {key} not attempted yet: {verdict.message}.")
    elif verdict.status == RIGHT:
        print(f"✓ Exercise {key}: right. {verdict.message}")
    else:
        print(f"✗ Exercise {key}, not yet: {verdict.message}", file=sys.stderr)


def _number(answer: object, what: str) -> float:
    if isinstance(answer, bool) or not isinstance(answer, (int, float)) and not (
            isinstance(answer, torch.Tensor) and answer.numel() == 1):
        raise TypeError(f"{what} should be a number, got {type(answer).__name__}")
    value = float(answer)
    if not math.isfinite(value):
        raise ValueError(f"{what} should be a finite number, got {value}")
    return value


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)


# --- notebook 00 ------------------------------------------------------------------------------------------------


@exercise("00.1", "predict", "How far apart are neighbouring float16 values near 1000?")
def _float16_spacing_near_1000(answer: object) -> Verdict:
    predicted = _number(answer, "your prediction")
    value = torch.tensor(1000.0, dtype=torch.float16)
    above = (value.view(torch.int16) + 1).view(torch.float16)  # the next bit pattern is the next value
    measured = (above.float() - value.float()).item()
    if _close(predicted, measured):
        return Verdict(RIGHT, "Between 512 and 1024 float16 has 2**10 steps, so one step is 512 / 1024: the "
                              "spacing doubles with every power of two, the relative precision stays the same.")
    eps = torch.finfo(torch.float16).eps
    if _close(predicted, eps):
        return Verdict(NOT_YET, "that is the spacing near 1.0 (finfo's eps). Near 1000 the exponent is larger, "
                                "and the gap grows with it.")
    if _close(predicted, 1000 * eps):
        return Verdict(NOT_YET, "eps times 1000 is close, but spacings come in powers of two: find the power of "
                                "two just below 1000 and divide it by 2**10 (float16's mantissa steps).")
    return Verdict(NOT_YET, "write 1000 as 1.something x 2**e; float16 splits each power of two into 2**10 equal "
                            "steps (10 mantissa bits), so one step is 2**e / 2**10.")


@exercise("00.2", "predict", "3-bit zero-point quantization of values in [-1, 2.5]: how many levels, how far apart?")
def _three_bit_levels(answer: object) -> Verdict:
    if not isinstance(answer, (tuple, list)) or len(answer) != 2:
        raise TypeError("the answer should be a pair: (number of levels, step between levels)")
    levels, step = _number(answer[0], "the number of levels"), _number(answer[1], "the step")
    q_min, q_max = basics.code_range(3, symmetric=False)
    values = torch.tensor([-1.0, 2.5])
    scale, zero_point = basics.zero_point_scale(values.reshape(1, -1), bits=3)
    codes = torch.arange(q_min, q_max + 1, dtype=torch.float32)
    grid = basics.dequantize(codes, scale.reshape(()), zero_point.reshape(()))  # every value a code can stand for
    right_levels, right_step = grid.numel(), (grid[1] - grid[0]).item()
    if levels == right_levels and _close(step, right_step):
        return Verdict(RIGHT, "All 2**3 codes are used and the range is cut into 2**3 - 1 gaps: the lowest "
                              "code lands on -1, the highest on 2.5.")
    if levels == right_levels - 1:
        return Verdict(NOT_YET, "that is the count for absmax, which leaves one code unused to stay symmetric. "
                                "A zero point uses every code that 3 bits can write.")
    if levels != right_levels:
        return Verdict(NOT_YET, "count the different codes 3 bits can write.")
    if _close(step, (2.5 + 1) / levels):
        return Verdict(NOT_YET, "the number of levels is right; the step is not: n levels have n - 1 gaps "
                                "between them.")
    return Verdict(NOT_YET, "the number of levels is right; for the step, spread the whole range "
                            "(2.5 - (-1)) evenly from the lowest level to the highest.")


def _reference_group_scales(weight: torch.Tensor, group_size: int, bits: int) -> torch.Tensor:
    return basics.absmax_scale(basics.as_rows(weight, "group", group_size), bits).reshape(weight.shape[0], -1)


_GROUP_SCALE_CASES = ((8, 32, 8, 4), (5, 64, 16, 8), (3, 24, 24, 3), (6, 48, 12, 4))
"""(rows, columns, group size, bits) of the random matrices a student's function is tried on."""


@exercise("00.3", "function", "Write group_absmax_scales(weight, group_size, bits): one absmax scale per group.")
def _group_absmax_scales(answer: object) -> Verdict:
    if not callable(answer):
        raise TypeError("the answer should be your function itself (its name, without calling it)")
    for seed, (rows, columns, group_size, bits) in enumerate(_GROUP_SCALE_CASES):
        weight = basics.example_weight(rows, columns, seed=100 + seed)
        expected = _reference_group_scales(weight, group_size, bits)
        got = answer(weight.clone(), group_size, bits)
        if not isinstance(got, torch.Tensor):
            return Verdict(NOT_YET, f"your function returned {type(got).__name__}, not a tensor"
                                    + (": did it forget `return`?" if got is None else "."))
        where = f"on a {rows} x {columns} weight with groups of {group_size} and {bits} bits,"
        if got.numel() != expected.numel():
            return Verdict(NOT_YET, f"{where} it gave {got.numel()} scales; expected one per group of each row, "
                                    f"{expected.numel()} in all.")
        got = got.detach().float().reshape(expected.shape)
        if torch.allclose(got, expected, rtol=1e-5, atol=0):
            continue
        q_max = 2 ** (bits - 1) - 1
        if torch.allclose(got * (q_max + 1) / q_max, expected, rtol=1e-5, atol=0):
            return Verdict(NOT_YET, f"{where} the scales are a little too small: the largest absmax code is "
                                    "2**(bits - 1) - 1, not 2**(bits - 1).")
        by_columns = weight.t().reshape(-1, group_size).abs().amax(-1) / q_max
        if torch.allclose(got.reshape(-1), by_columns, rtol=1e-5, atol=0):
            return Verdict(NOT_YET, f"{where} the groups run down the columns; a group is consecutive weights "
                                    "of one row (reshape the rows, not the transpose).")
        return Verdict(NOT_YET, f"{where} some scales differ: cut each row into pieces of group_size, take each "
                                "piece's largest magnitude and divide it by the largest code.")
    return Verdict(RIGHT, "Your scales match on four random matrices, from 3 to 8 bits. Groups are just rows of "
                          "a reshaped matrix, so per-group costs no more code than per-channel.")


def outlier_experiment(group_size: int) -> tuple[float, float]:
    """Exercise 00.4's measurement: (error of the other weights with the outlier, in groups of ``group_size``;
    error of the clean matrix, per channel), both 4-bit absmax on the lesson's example weight."""
    weight = basics.example_weight()
    planted = basics.with_outlier(weight, *OUTLIER_AT, OUTLIER_TIMES)
    others = torch.ones_like(weight, dtype=torch.bool)
    others[OUTLIER_AT] = False
    grouped = basics.quantize_tensor(planted, 4, granularity="group", group_size=group_size).dequantized
    clean = basics.quantize_tensor(weight, 4, granularity="channel").dequantized
    return basics.relative_error(weight[others], grouped[others]), basics.relative_error(weight, clean)


OUTLIER_AT = (5, 17)
OUTLIER_TIMES = 20.0
GROUP_SIZES = (8, 16, 32, 64, 128, 256)


@exercise("00.4", "knob", "The largest group size at which the matrix with the outlier is quantized (4-bit) at least "
                          "as well as the clean matrix per channel")
def _group_size_knob(answer: object) -> Verdict:
    size = _number(answer, "the group size")
    if size not in GROUP_SIZES:
        return Verdict(NOT_YET, f"try powers of two from {min(GROUP_SIZES)} up to {max(GROUP_SIZES)}: each "
                                "divides the 256 columns.")
    size = int(size)
    error, target = outlier_experiment(size)
    if error > target:
        return Verdict(NOT_YET, f"in groups of {size} the other weights keep {error:.3f} relative error, more than "
                                f"the clean matrix per channel ({target:.3f}): try smaller groups.")
    bigger = [g for g in GROUP_SIZES if g > size and outlier_experiment(g)[0] <= target]
    if bigger:
        return Verdict(NOT_YET, f"groups of {size} do pay the outlier back, but so do larger groups, which need "
                                "fewer scales: try larger ones.")
    return Verdict(RIGHT, "Smaller groups cost more scales for little gain; larger ones let the outlier coarsen too "
                          "many neighbours. (bitsandbytes' NF4 blocks hold 64 weights; GPTQ and AWQ use groups of "
                          "128.)")


# --- shared by the exercises below ------------------------------------------------------------------------------

_DATA = Path(__file__).resolve().parents[1] / "data"


def _hint_for(value: float, mistakes: list[tuple[float, str]], otherwise: str) -> Verdict:
    """NOT_YET with the hint of every typical mistake that gives ``value`` (several may coincide), or ``otherwise``."""
    hints = list(dict.fromkeys(hint for result, hint in mistakes if _close(value, result)))
    return Verdict(NOT_YET, " Or: ".join(hints) if hints else otherwise)


def _returned_tensor(got: object, what: str) -> Verdict | None:
    """A hint when a student's function returned something other than a tensor, else None."""
    if isinstance(got, torch.Tensor):
        return None
    return Verdict(NOT_YET, f"your function returned {type(got).__name__} as {what}, not a tensor"
                            + (": did it forget `return`?" if got is None else "."))


# --- notebook 01 ------------------------------------------------------------------------------------------------

SIXTEEN_BIT_BYTES = torch.finfo(torch.float16).bits // 8
"""Bytes of one number in a 16-bit KV cache (float16 or bfloat16)."""


def _cached_numbers(model: torch.nn.Module) -> tuple[int, int, int]:
    """Per token, read from the decoder's modules: the numbers a KV cache holds (every layer's key and value
    vectors), what it would hold with one key/value head per query head, and the number of layers."""
    layers = list(model.model.layers)
    cached = sum(layer.self_attn.k_proj.out_features + layer.self_attn.v_proj.out_features for layer in layers)
    without_gqa = sum(2 * layer.self_attn.q_proj.out_features for layer in layers)
    return cached, without_gqa, len(layers)


@exercise("01.1", "predict", "The KV cache of one token, in bytes, kept in 16-bit", context=("model",))
def _kv_cache_per_token(answer: object, *, model: torch.nn.Module) -> Verdict:
    predicted = _number(answer, "your prediction")
    cached, without_gqa, layers = _cached_numbers(model)
    right = cached * SIXTEEN_BIT_BYTES
    if _close(predicted, right):
        return Verdict(RIGHT, "Every layer keeps a key and a value vector per key/value head for every token it has "
                              "seen, so the cache grows with the context; GQA divides it by the query heads per group.")
    return _hint_for(predicted, [
        (right / 2, "half of it: every layer caches keys *and* values, each number in 2 bytes."),
        (right * 2, "twice too much: the cache is kept in 16-bit, 2 bytes a number, not float32's 4."),
        (without_gqa * SIXTEEN_BIT_BYTES, "that is the cache without GQA: only the key/value heads are cached, and "
                                          "each serves a whole group of query heads."),
        (right / layers, "that is one layer's share: every decoder layer keeps its own keys and values."),
    ], "count, for one token, the numbers each decoder layer caches (keys and values, for its key/value heads "
       "only), add up the layers, then the bytes at 16 bits a number.")


def _named_configs() -> list[tuple[str, object]]:
    """The configs a student's parameter count is tried on: the tiny model's and the three reference Llamas'."""
    from helpers import memory

    paths = {"the tiny model": _DATA / "tiny-llama" / "config.json",
             "Llama-3.2-1B": _DATA / "reference" / "llama-3.2-1b.config.json",
             "Llama-3.2-3B": _DATA / "reference" / "llama-3.2-3b.config.json",
             "Llama-3.1-8B": _DATA / "reference" / "llama-3.1-8b.config.json"}
    return [(name, memory.load_reference_config(path)) for name, path in paths.items()]


def decoder_layer_size(config) -> int:
    """Parameters of one decoder layer, measured: the layer built from ``config`` on the meta device, counted."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    with torch.device("meta"):
        layer = LlamaDecoderLayer(config, layer_idx=0)
    return sum(parameter.numel() for parameter in layer.parameters())


@exercise("01.2", "function", "Write decoder_layer_parameters(config): the parameters of one decoder layer.")
def _decoder_layer_parameters(answer: object) -> Verdict:
    if not callable(answer):
        raise TypeError("the answer should be your function itself (its name, without calling it)")
    for name, config in _named_configs():
        right = decoder_layer_size(config)
        got = answer(copy.deepcopy(config))
        if got is None:
            return Verdict(NOT_YET, "your function returned None: did it forget `return`?")
        counted = _number(got, "what your function returned")
        if counted == right:
            continue
        hidden, vocab = config.hidden_size, config.vocab_size
        query = config.num_attention_heads * config.head_dim
        key_value = config.num_key_value_heads * config.head_dim
        return _hint_for(counted, [
            (right - 2 * hidden, "the two RMSNorm weights (before attention, before the MLP) are parameters too."),
            (right + 2 * hidden * (query - key_value),
             "k_proj and v_proj are narrower than q_proj: they make num_key_value_heads x head_dim features "
             "(grouped-query attention)."),
            (right - hidden * config.intermediate_size, "the gated MLP has three matrices: gate_proj, up_proj and "
                                                        "down_proj."),
            (right + vocab * hidden, "just one decoder layer: the embeddings and lm_head sit outside the layers."),
            (right + 2 * vocab * hidden, "just one decoder layer: the embeddings and lm_head sit outside the layers."),
            (right * config.num_hidden_layers, "one decoder layer, not all num_hidden_layers of them."),
        ], f"on {name}'s config the count is off: add in_features x out_features for each of the layer's seven "
           "Linear layers (none has a bias) and the length of each RMSNorm weight.")
    return Verdict(RIGHT, "It agrees on the tiny model's config and on Llama-3.2-1B, 3.2-3B and 3.1-8B: a layer is "
                          "seven matrices and two norm vectors, and the MLP's three matrices hold most of it.")


@exercise("01.3", "predict", "What model.get_memory_footprint() returns for this float32 model, in bytes",
          context=("model",))
def _float32_footprint(answer: object, *, model: torch.nn.Module) -> Verdict:
    predicted = _number(answer, "your prediction")
    right = model.get_memory_footprint()
    if _close(predicted, right):
        return Verdict(RIGHT, "get_memory_footprint adds up the bytes of every parameter and every buffer (the "
                              "rotary frequencies are one). It sees nothing a quantization library keeps outside "
                              "them, as notebook 02 shows.")
    parameters = list(model.parameters())
    values = sum(parameter.numel() for parameter in parameters)
    parameter_bytes = sum(parameter.numel() * parameter.element_size() for parameter in parameters)
    every_name = sum(parameter.numel() * parameter.element_size()
                     for _, parameter in model.named_parameters(remove_duplicate=False))
    in_other_units = "write it in bytes: the cell prints MB and GB only for reading."
    return _hint_for(predicted, [
        (parameter_bytes, "the parameters alone fall a little short: the footprint counts every tensor the model "
                          "keeps in its state, and `model.named_buffers()` lists the ones that are not parameters."),
        (values, "that counts numbers; the footprint counts bytes, 4 for each float32 number."),
        (values * 2, "2 bytes a number is 16-bit; this model was loaded in float32."),
        (every_name, "a tied lm_head is the embedding matrix itself: its bytes count once."),
        (right / 1e6, in_other_units), (right / 1e9, in_other_units), (right / 2**20, in_other_units),
        (right / 2**30, in_other_units),
    ], "add up the bytes of everything the model stores: how many numbers, times the bytes of each.")


CPU_GB_CHOICES = range(1, 129)
"""Whole numbers of GB of CPU RAM exercise 01.4 accepts."""


@functools.lru_cache(maxsize=1)
def _llama_8b_on_meta() -> torch.nn.Module:
    from helpers import memory

    return memory.meta_model(_DATA / "reference" / "llama-3.1-8b.config.json")


def offload_plan(cpu_gb: int) -> dict:
    """Exercise 01.4's measurement: accelerate's device map for float32 Llama-3.1-8B with a T4's usable GPU memory
    and ``cpu_gb`` GB (10**9 bytes) of CPU RAM, decoder layers kept whole, as notebook 01 computes it."""
    import logging

    from accelerate import infer_auto_device_map

    from helpers import memory

    modeling_log = logging.getLogger("accelerate.utils.modeling")  # on a CPU machine: "device 0 missing"
    level = modeling_log.level
    modeling_log.setLevel(logging.ERROR)
    try:
        return infer_auto_device_map(_llama_8b_on_meta(), max_memory={0: memory.T4_USABLE_BYTES, "cpu": cpu_gb * 10**9},
                                     no_split_module_classes=["LlamaDecoderLayer"])
    finally:
        modeling_log.setLevel(level)


def _spills_to_disk(cpu_gb: int) -> bool:
    return "disk" in {str(device) for device in offload_plan(cpu_gb).values()}


@exercise("01.4", "knob", "The least CPU RAM (whole GB) beside a T4 at which nothing of float32 Llama-3.1-8B goes to "
                          "disk")
def _cpu_ram_knob(answer: object) -> Verdict:
    cpu_gb = _number(answer, "the CPU RAM")
    if cpu_gb not in CPU_GB_CHOICES:
        return Verdict(NOT_YET, f"try whole numbers of GB, from {min(CPU_GB_CHOICES)} to {max(CPU_GB_CHOICES)}.")
    cpu_gb = int(cpu_gb)
    if _spills_to_disk(cpu_gb):
        return Verdict(NOT_YET, f"with {cpu_gb} GB of CPU RAM part of the model still goes to disk: try more.")
    if cpu_gb > min(CPU_GB_CHOICES) and not _spills_to_disk(cpu_gb - 1):
        return Verdict(NOT_YET, f"{cpu_gb} GB is enough, but so is less: find the smallest.")
    return Verdict(RIGHT, "What the GPU cannot hold waits in CPU RAM, and only what is left goes to disk. The model "
                          "then runs, but every offloaded layer is copied to the GPU for every forward pass: fitting "
                          "on the GPU itself is what the next notebooks' quantization is for.")


# --- notebook 02 ------------------------------------------------------------------------------------------------

_INT8_CASES = ((8, 32), (16, 64), (5, 48), (12, 40))
"""(rows, columns) of the random weights a student's int8 quantizer is tried on."""


def bitsandbytes_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What bitsandbytes stores for ``weight`` (out x in) with LLM.int8: its int8 codes (``CB``) and row scales
    (``SCB``), from its own row-wise quantizer on the CPU."""
    import bitsandbytes.functional as bnb_functional

    codes, scales, _ = bnb_functional.int8_vectorwise_quant(weight.detach().cpu().to(torch.float16).contiguous())
    return codes, scales


@exercise("02.1", "function", "Write int8_rowwise(weight): LLM.int8's int8 codes and per-row scales (SCB).")
def _int8_rowwise(answer: object) -> Verdict:
    if not callable(answer):
        raise TypeError("the answer should be your function itself (its name, without calling it)")
    for seed, (rows, columns) in enumerate(_INT8_CASES):
        weight = basics.example_weight(rows, columns, seed=200 + seed)
        codes, scales = bitsandbytes_int8(weight)
        got = answer(weight.clone())
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            return Verdict(NOT_YET, "your function should return two tensors, (codes, scales)"
                                    + (": did it forget `return`?" if got is None else "."))
        for tensor, what in zip(got, ("its codes", "its scales")):
            if (wrong_type := _returned_tensor(tensor, what)) is not None:
                return wrong_type
        got_codes, got_scales = got[0].detach().cpu(), got[1].detach().cpu().float().reshape(-1)
        where = f"on a {rows} x {columns} weight,"
        if got_scales.numel() != rows:
            return Verdict(NOT_YET, f"{where} it gave {got_scales.numel()} scale(s); LLM.int8 keeps one per output "
                                    "row, its largest magnitude (reduce over dim 1).")
        if not torch.equal(got_scales, scales):
            if torch.equal(got_scales, weight.abs().amax(dim=1)):
                return Verdict(NOT_YET, f"{where} the scales are the float32 weight's; bitsandbytes takes each row's "
                                        "absmax of a float16 copy of the weight.")
            if torch.allclose(got_scales * 127, scales, rtol=1e-6, atol=0):
                return Verdict(NOT_YET, f"{where} SCB holds each row's absmax itself, not the step absmax / 127.")
            return Verdict(NOT_YET, f"{where} some scales differ from SCB: each row's largest |value| of the float16 "
                                    "copy, as a float32 number.")
        if got_codes.dtype != torch.int8 or got_codes.shape != weight.shape:
            return Verdict(NOT_YET, f"{where} the codes should be a torch.int8 tensor shaped like the weight, got "
                                    f"{got_codes.dtype} {tuple(got_codes.shape)}.")
        exact = weight.to(torch.float16).double() * 127 / scales.double().unsqueeze(1)
        if (got_codes.double() - exact).abs().max().item() <= 0.5 + 1e-4:  # a nearest integer (either, on a tie)
            continue
        off = got_codes.double() - exact
        if bool((off.abs() < 1 + 1e-4).all() and (got_codes.double().abs() <= exact.abs() + 1e-4).all()):
            return Verdict(NOT_YET, f"{where} the codes are truncated towards 0 (`.to(torch.int8)` alone does that); "
                                    "round to the nearest integer first.")
        return Verdict(NOT_YET, f"{where} some codes differ from bitsandbytes': round each value of the float16 copy "
                                "times 127 / its row's scale.")
    return Verdict(RIGHT, "Your codes and scales are bitsandbytes' on four random weights: each row's largest value "
                          "becomes +-127, and every other one lands on that row's grid of steps absmax / 127.")


TOY_ACTIVATIONS = (
    (0.4, -1.3, 6.0, 0.2, -0.8, 1.9, -0.5, 1.1),
    (-0.9, 0.7, -1.4, -7.5, 0.3, -6.2, 0.6, -2.0),
    (1.2, -0.1, 0.5, 0.9, -1.7, 0.4, -5.9, 0.3),
    (-0.3, 2.2, -0.6, 1.5, 0.8, -1.1, 0.2, -0.7),
    (0.6, -0.4, 1.3, 6.5, 9.0, 0.1, -1.0, 0.5),
    (-1.5, 0.9, -0.2, -0.6, 0.7, 2.4, 1.6, -0.8),
)
"""Exercise 02.2's activations: 6 tokens (rows) x 8 features (columns), a few of them outliers."""

LLM_INT8_THRESHOLD = 6.0
"""``BitsAndBytesConfig``'s default ``llm_int8_threshold``."""


def toy_activations() -> torch.Tensor:
    """Exercise 02.2's activations as a float32 tensor (tokens x features)."""
    return torch.tensor(TOY_ACTIVATIONS, dtype=torch.float32)


def float_path_columns(x: torch.Tensor, threshold: float) -> tuple[int, ...]:
    """The columns of ``x`` (tokens x features) LLM.int8 multiplies in floating point: those in which some value of
    the float16 activations bitsandbytes quantizes has ``|x| >= threshold``."""
    reached = (x.detach().cpu().reshape(-1, x.shape[-1]).to(torch.float16).abs() >= threshold).any(dim=0)
    return tuple(torch.nonzero(reached).flatten().tolist())


@exercise("02.2", "predict", "How many columns of the toy activations does llm_int8_threshold = 6.0 send to "
                             "floating point?")
def _columns_above_threshold(answer: object) -> Verdict:
    predicted = _number(answer, "your prediction")
    x = toy_activations()
    right = len(float_path_columns(x, LLM_INT8_THRESHOLD))
    if predicted == right:
        return Verdict(RIGHT, "A feature leaves int8 for the whole call as soon as one token's value reaches the "
                              "threshold: the split is by column, so the int8 product needs no exceptions inside it.")
    magnitude = x.abs()
    return _hint_for(predicted, [
        (int((magnitude >= LLM_INT8_THRESHOLD).sum()),
         "that counts values; bitsandbytes routes whole columns (features), and a column counts once however many of "
         "its values reach the threshold."),
        (int((magnitude >= LLM_INT8_THRESHOLD).any(dim=1).sum()), "that counts rows (tokens); the split is by column."),
        (int((x >= LLM_INT8_THRESHOLD).any(dim=0).sum()), "the sign does not matter: the test is on |x|."),
        (int((magnitude > LLM_INT8_THRESHOLD).any(dim=0).sum()), "a value of exactly the threshold counts: the test is "
                                                                 "|x| >= threshold."),
        (int((magnitude >= LLM_INT8_THRESHOLD - 0.1).any(dim=0).sum()),
         "5.9 is below the threshold: it stays in int8."),
    ], "count the columns in which at least one value has |x| >= 6.0.")


THRESHOLDS = (1, 2, 4, 6, 8, 16, 32, 64, 128, 256, 512, 1024)
"""The thresholds exercise 02.3 asks to try."""


@exercise("02.3", "knob", "The largest threshold that sends the same columns to floating point as 6.0 does",
          context=("x",))
def _threshold_knob(answer: object, *, x: torch.Tensor) -> Verdict:
    threshold = _number(answer, "the threshold")
    if threshold not in THRESHOLDS:
        return Verdict(NOT_YET, "try the thresholds of the list: 6.0 and the powers of two from 1 up.")
    default = float_path_columns(x, LLM_INT8_THRESHOLD)
    same = [t for t in THRESHOLDS if float_path_columns(x, t) == default]
    if threshold == max(same):
        return Verdict(RIGHT, "The threshold only has to fall in the gap between the ordinary features and the "
                              "outliers: anywhere in it, the split and the result are the same. 6.0 suits large "
                              "models because their outlier features lie far above it and the rest far below.")
    if float_path_columns(x, threshold) == default:
        return Verdict(NOT_YET, f"at {threshold:g} the same columns take the floating-point path, and larger "
                                "thresholds may keep them too: try larger.")
    if threshold < LLM_INT8_THRESHOLD:
        return Verdict(NOT_YET, f"at {threshold:g} more columns join the floating-point path: try larger.")
    return Verdict(NOT_YET, f"at {threshold:g} a column that 6.0 routes around int8 falls back into it: try smaller.")


# --- notebook 03 ------------------------------------------------------------------------------------------------

def _bitsandbytes_fp4_table() -> torch.Tensor:
    """bitsandbytes' FP4 table, in code order (the reference exercise 03.1 is checked against)."""
    import bitsandbytes.functional as bnb_functional

    return bnb_functional.get_4bit_type("fp4", device="cpu").float()


def _fp4_magnitudes(exponent_rises: bool = False) -> list[float]:
    """The magnitudes of codes 0-7 by the rule exercise 03.1 states (or with the exponent read the usual way round),
    before they are divided by the largest: exponent field e = 1, 2, 3 gives (1 + m/2) x 2**(4 - e); e = 0 gives
    0 or 0.0625."""
    values = []
    for code in range(8):
        e, m = code >> 1, code & 1
        if e == 0:
            values.append(0.0625 * m)
        else:
            values.append((1 + m / 2) * 2.0 ** ((e - 1) if exponent_rises else (4 - e)))
    return values


@exercise("03.1", "function", "Write fp4_table(): bitsandbytes' 16 FP4 values in code order, derived from the bits.")
def _fp4_table(answer: object) -> Verdict:
    if not callable(answer):
        raise TypeError("the answer should be your function itself (its name, without calling it)")
    got = answer()
    if isinstance(got, (list, tuple)):
        got = torch.tensor([_number(v, "each value") for v in got], dtype=torch.float32)
    if (wrong_type := _returned_tensor(got, "the table")) is not None:
        return wrong_type
    if got.numel() != 16:
        return Verdict(NOT_YET, f"your table has {got.numel()} values; 4 bits write 16 codes, one value each.")
    got = got.detach().cpu().float().reshape(-1)
    right = _bitsandbytes_fp4_table()
    if torch.allclose(got, right, rtol=1e-6, atol=0):
        return Verdict(RIGHT, "Your 16 values are bitsandbytes' FP4 table: sign, two exponent bits and one mantissa "
                              "bit, so two values per power of two and a long, sparse tail towards zero, which is "
                              "where NF4 puts most of its levels instead.")
    if torch.allclose(got / got.abs().max(), right, rtol=1e-6, atol=0):
        return Verdict(NOT_YET, "the shape is right but the scale is not: a 4-bit table spans [-1, 1], so divide "
                                "every value by the largest magnitude.")
    if torch.allclose(got.abs(), right.abs(), rtol=1e-6, atol=0):
        return Verdict(NOT_YET, "the magnitudes are right, some signs are not: the sign is the highest bit (code >= "
                                "8 is negative), and codes 8 to 15 repeat codes 0 to 7 with a minus sign.")
    rising = torch.tensor(_fp4_magnitudes(exponent_rises=True) * 2)
    rising = rising * torch.tensor([1.0] * 8 + [-1.0] * 8)
    if torch.allclose(got / got.abs().max(), rising / rising.abs().max(), rtol=1e-6, atol=0):
        return Verdict(NOT_YET, "the exponent runs the wrong way: in bitsandbytes' FP4 a larger exponent field "
                                "means a smaller power of two (2**(4 - e)).")
    sorted_right = right.sort().values
    if torch.allclose(got, sorted_right, rtol=1e-6, atol=0):
        return Verdict(NOT_YET, "those are the right values, sorted; the table is in code order: entry k is what "
                                "the bits of k stand for.")
    return Verdict(NOT_YET, "some values differ: for each code take the sign (bit 3), the exponent field (bits 2-1) "
                            "and the mantissa bit (bit 0), apply the rule of the exercise, then divide by the largest "
                            "magnitude.")


@exercise("03.2", "predict", "The bytes of this layer's absmax scales, as bitsandbytes stores them without double "
                             "quantization", context=("weight",))
def _absmax_bytes(answer: object, *, weight: torch.Tensor) -> Verdict:
    predicted = _number(answer, "your prediction")
    blocks = weight.numel() // 64
    float32_bytes = torch.finfo(torch.float32).bits // 8
    right = blocks * float32_bytes
    if _close(predicted, right):
        return Verdict(RIGHT, "One float32 per block of 64 weights, whatever the weight's shape: blocks run through "
                              "the flattened weight, so a block can even span two rows. Next to the packed codes (half "
                              "a byte a weight) the scales add an eighth.")
    return _hint_for(predicted, [
        (blocks, "that is the number of scales; each is a float32, so count its bytes."),
        (blocks * 2, "the absmax is stored in float32, 4 bytes each, not 16 bits."),
        (weight.shape[0] * float32_bytes, "that is one scale per row; bitsandbytes takes one per block of 64 "
                                          "consecutive weights of the flattened weight."),
        (weight.numel() / 2, "that is the packed codes (two to a byte); the question is about the scales beside them."),
        (blocks * float32_bytes * 8, "that is in bits; the question asks for bytes."),
    ], "count the blocks of 64 in the whole weight (rows x columns / 64), then the bytes of one float32 each.")


DOUBLE_QUANT_BLOCKSIZE = 128
"""Exercise 03.3: the block size of the 4-bit codes whose bits per weight the student predicts."""


@exercise("03.3", "predict", "Bits per weight of NF4 with double quantization in blocks of 128 (the 8-bit scales in "
                             "groups of 256)")
def _double_quant_bits(answer: object) -> Verdict:
    predicted = _number(answer, "your prediction")
    size = DOUBLE_QUANT_BLOCKSIZE
    right = 4 + scale_bits_per_weight(size, double_quant=True)
    if _close(predicted, right):
        return Verdict(RIGHT, "The 4 bits of the code, 8 bits shared by 128 weights, and 32 bits shared by 128 x 256: "
                              "doubling the block halves the cost of the scales, and double quantization cuts it by "
                              "almost four again.")
    return _hint_for(predicted, [
        (4 + scale_bits_per_weight(size, double_quant=False), "that is without double quantization: the scales are "
                                                              "8-bit codes, with one float32 per 256 blocks."),
        (scale_bits_per_weight(size, double_quant=True), "that is the scales alone; every weight also has its "
                                                         "4-bit code."),
        (4 + scale_bits_per_weight(64, double_quant=True), "that is for blocks of 64; here a block holds 128 weights."),
        (4 + 8 / size, "almost: the 8-bit codes have float32 scales of their own, one per 256 blocks."),
        (4 + 8 / size + 32 / 256, "the second-level float32 is shared by 256 blocks, that is by 128 x 256 weights."),
    ], "add up per weight: the 4-bit code, an 8-bit scale code shared by the 128 weights of a block, and a float32 "
       "shared by 256 such blocks.")


# --- notebook 03a -----------------------------------------------------------------------------------------------

GPUS_TO_PICK_FOR = {"a V100": (7, 0), "an RTX 3090": (8, 6), "an H100": (9, 0)}
"""Exercise 03a.1: GPUs named by their compute capability, in the order of the answer."""


def _as_dtype(value: object) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and isinstance(getattr(torch, value.removeprefix("torch."), None), torch.dtype):
        return getattr(torch, value.removeprefix("torch."))
    raise TypeError(f"each answer should be a torch dtype such as torch.float32 (or its name), got {value!r}")


@exercise("03a.1", "predict", "The compute dtype the course's rule picks for a V100, an RTX 3090 and an H100")
def _compute_dtype_pick(answer: object) -> Verdict:
    from helpers import models
    from helpers.environment import Hardware

    if not isinstance(answer, (tuple, list)) or len(answer) != len(GPUS_TO_PICK_FOR):
        raise TypeError("the answer should be three dtypes, for a V100, an RTX 3090 and an H100, e.g. (a, b, c)")
    predicted = [_as_dtype(value) for value in answer]
    right = [models.compute_dtype_for(Hardware("cuda", compute_capability=capability))[0]
             for capability in GPUS_TO_PICK_FOR.values()]
    if predicted == right:
        return Verdict(RIGHT, "bfloat16 from compute capability 8.0 (Ampere) on, where it runs in hardware; float16 "
                              "before it, where bfloat16 would be emulated. The rule reads the capability, not "
                              "torch.cuda.is_bf16_supported(), which counts emulation too.")
    if all(dtype == torch.bfloat16 for dtype in predicted):
        return Verdict(NOT_YET, "bfloat16 everywhere is what trusting torch.cuda.is_bf16_supported() would give; one "
                                "of these GPUs only emulates it.")
    if torch.float32 in predicted:
        return Verdict(NOT_YET, "float32 is the rule's answer on a CPU; every GPU here has a fast 16-bit dtype.")
    wrong = [name for name, p, r in zip(GPUS_TO_PICK_FOR, predicted, right) if p != r]
    return Verdict(NOT_YET, f"not for {' and '.join(wrong)}: compare each GPU's compute capability with the one from "
                            "which bfloat16 runs in hardware.")


COPY_DTYPE = torch.float16
"""Exercise 03a.2: the compute dtype of the dense copy the student predicts."""


@exercise("03a.2", "predict", "The bytes of the dense copy this layer makes for one call, computing in float16",
          context=("layer",))
def _dense_copy_bytes(answer: object, *, layer: torch.nn.Module) -> Verdict:
    predicted = _number(answer, "your prediction")
    weights = layer.out_features * layer.in_features
    element = torch.finfo(COPY_DTYPE).bits // 8
    right = weights * element
    if _close(predicted, right):
        return Verdict(RIGHT, "Every weight, rebuilt in the compute dtype: four times the packed codes in 16 bits, "
                              "eight times in float32. It lives only while the layer multiplies, one layer at a time.")
    return _hint_for(predicted, [
        (weights / 2, "that is the packed 4-bit codes; the copy holds every weight again in the compute dtype."),
        (weights * 4, "that is a float32 copy; the question asks for float16, 2 bytes a weight."),
        (weights, "one byte a weight is neither the packed codes nor float16: count float16's bytes."),
        (weights * element * 8, "that is in bits; the question asks for bytes."),
        (weights / 64 * 4, "that is the absmax scales; the copy is the whole weight."),
    ], "the copy holds every weight of the layer (out_features x in_features) in float16.")


@exercise("03a.3", "function", "Write largest_dense_copy(config, dtype): the bytes of the largest temporary dense "
                               "weight a 4-bit Llama makes")
def _largest_dense_copy(answer: object) -> Verdict:
    from helpers import memory

    if not callable(answer):
        raise TypeError("the answer should be your function itself (its name, without calling it)")
    for name, config in _named_configs():
        for dtype in (torch.float16, torch.float32):
            right = memory.dense_copy_bytes(config, dtype)
            got = answer(copy.deepcopy(config), dtype)
            if got is None:
                return Verdict(NOT_YET, "your function returned None: did it forget `return`?")
            value = _number(got, "what your function returned")
            if _close(value, right):
                continue
            shapes = memory.linear_shapes(config).values()
            element = torch.finfo(dtype).bits // 8
            layer_sum = sum(rows * columns for rows, columns in shapes) * element
            square = config.hidden_size ** 2 * element
            return _hint_for(value, [
                (layer_sum, "that adds up every Linear of a layer; bitsandbytes rebuilds one weight at a time, so only "
                            "the largest counts."),
                (layer_sum * config.num_hidden_layers, "that is every Linear of the model; the copies exist one at a "
                                                       "time."),
                (square, "q_proj is hidden x hidden, but the MLP's matrices are larger."),
                (right * 2 if dtype == torch.float16 else right / 2, "the bytes of one weight follow `dtype`."),
                (right / element, "that counts weights; the question asks for bytes in `dtype`."),
            ], f"on {name}'s config in {dtype} the bytes are off: find the decoder Linear with the most weights "
               "(memory.linear_shapes gives every shape) and count its weights in `dtype`.")
    return Verdict(RIGHT, "It agrees on the tiny model and on the three real Llamas: the largest copy is one MLP "
                          "projection, which a memory plan must leave room for above the 4-bit weights.")


# --- notebook 04 ------------------------------------------------------------------------------------------------

SHAPES_RANK = 8
SHAPES_MODULE = "layers.0.mlp.down_proj"
"""Exercise 04.1: the LoRA matrices of this module of the notebook's model, at this rank."""


def _in_and_out(model: torch.nn.Module, suffix: str) -> tuple[int, int]:
    """(in_features, out_features) of the Linear whose name ends with ``suffix``, read from the module itself."""
    for name, module in model.named_modules():
        if name.endswith(suffix) and hasattr(module, "in_features"):
            return module.in_features, module.out_features
    raise ValueError(f"the model has no module named ...{suffix}")


def _shape_pair(answer: object) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if isinstance(answer, (str, bytes)) or not hasattr(answer, "__len__") or len(answer) != 2:
        raise TypeError("the answer should be two shapes, (shape of lora_A's weight, shape of lora_B's weight)")
    return tuple(tuple(int(_number(n, "each dimension")) for n in shape) for shape in answer)


@exercise("04.1", "predict", "The shapes of lora_A's and lora_B's weights for layer 0's mlp.down_proj at r = 8",
          context=("model",))
def _lora_shapes(answer: object, *, model: torch.nn.Module) -> Verdict:
    shape_a, shape_b = _shape_pair(answer)
    fan_in, fan_out = _in_and_out(model, SHAPES_MODULE)
    r = SHAPES_RANK
    if (shape_a, shape_b) == ((r, fan_in), (fan_out, r)):
        return Verdict(RIGHT, "lora_A takes the layer's input down to r numbers, lora_B brings them up to its output; "
                              "as Linear weights they are stored (out_features, in_features), and B @ A has the "
                              "shape of the weight it corrects.")
    if r not in shape_a or r not in shape_b:
        return Verdict(NOT_YET, "at rank r, one dimension of each matrix is r: it is the inner dimension of B @ A.")
    if (shape_a, shape_b) == ((fan_in, r), (r, fan_out)):
        return Verdict(NOT_YET, "PyTorch stores a Linear's weight as (out_features, in_features), not (in, out).")
    if (shape_a, shape_b) == ((r, fan_out), (fan_in, r)):
        return Verdict(NOT_YET, "down_proj goes from the MLP's intermediate width back to the hidden size: its "
                                "input is the wide side.")
    if (shape_a, shape_b) == ((fan_out, r), (r, fan_in)):
        return Verdict(NOT_YET, "lora_A comes first: it reads the layer's input; lora_B writes the layer's output.")
    return Verdict(NOT_YET, "read the layer's in_features and out_features (print it), then: lora_A maps in -> r, "
                            "lora_B maps r -> out, each stored (out_features, in_features).")


SCALING_ALPHA, SCALING_RANK = 16, 64
"""Exercise 04.2: the scaling peft uses for this lora_alpha at this rank."""


@exercise("04.2", "predict", "peft's scaling for lora_alpha = 16 at r = 64: (plain LoRA, with use_rslora=True)")
def _rslora_scaling(answer: object) -> Verdict:
    if isinstance(answer, (str, bytes)) or not hasattr(answer, "__len__") or len(answer) != 2:
        raise TypeError("the answer should be two numbers: (scaling of plain LoRA, scaling with use_rslora=True)")
    plain, stable = (_number(value, "each scaling") for value in answer)
    alpha, r = SCALING_ALPHA, SCALING_RANK
    right_plain, right_stable = alpha / r, alpha / math.sqrt(r)
    if _close(plain, right_plain) and _close(stable, right_stable):
        return Verdict(RIGHT, "At this rank rsLoRA multiplies the update by sqrt(r) times more than plain LoRA: the "
                              "factor that keeps the start of training equally fast at every rank.")
    if _close(plain, right_stable) and _close(stable, right_plain):
        return Verdict(NOT_YET, "the two are swapped: plain LoRA divides by r, rsLoRA by its square root.")
    if _close(plain, r / alpha) or _close(stable, math.sqrt(r) / alpha):
        return Verdict(NOT_YET, "lora_alpha goes on top: the scaling is lora_alpha divided by the rank (or its root).")
    if not _close(plain, right_plain):
        return Verdict(NOT_YET, "the first number is off: plain LoRA multiplies B @ A by lora_alpha / r.")
    return Verdict(NOT_YET, "the second number is off: use_rslora=True divides lora_alpha by the square root of r.")


ALL_LINEAR_RANK = 16
ALL_LINEAR_CONFIG = "llama-3.2-3b"
"""Exercise 04.3: LoRA on every linear layer of the decoder (peft's target_modules="all-linear") at this rank."""


def _reference_config(name: str):
    from helpers import memory

    return memory.load_reference_config(_DATA / "reference" / f"{name}.config.json")


def _projection_shapes(config) -> dict[str, tuple[int, int]]:
    """(in, out) of the seven projections of one decoder layer, from the config's widths."""
    hidden, intermediate = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    query, key_value = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    return {"q_proj": (hidden, query), "k_proj": (hidden, key_value), "v_proj": (hidden, key_value),
            "o_proj": (query, hidden), "gate_proj": (hidden, intermediate), "up_proj": (hidden, intermediate),
            "down_proj": (intermediate, hidden)}


@exercise("04.3", "predict", "LoRA parameters of Llama-3.2-3B with every decoder Linear adapted (all-linear) at r = 16")
def _all_linear_count(answer: object) -> Verdict:
    predicted = _number(answer, "your count")
    config, r = _reference_config(ALL_LINEAR_CONFIG), ALL_LINEAR_RANK
    shapes = _projection_shapes(config)
    layers = config.num_hidden_layers
    per_layer = sum(r * (fan_in + fan_out) for fan_in, fan_out in shapes.values())
    right = layers * per_layer
    if _close(predicted, right):
        return Verdict(RIGHT, "Every adapted Linear adds r x (in + out); the MLP's wide matrices cost most of it, and "
                              "the whole adapter stays around a percent of the base model.")
    attention = layers * sum(r * sum(shapes[name]) for name in ("q_proj", "k_proj", "v_proj", "o_proj"))
    hidden = config.hidden_size
    no_gqa = layers * (per_layer + 2 * r * (hidden - shapes["k_proj"][1]))
    return _hint_for(predicted, [
        (attention, "that is attention only: all-linear adapts the MLP's gate_proj, up_proj and down_proj too."),
        (per_layer, "that is one decoder layer: multiply by num_hidden_layers."),
        (no_gqa, "k_proj and v_proj are narrower than q_proj: num_key_value_heads x head_dim outputs (GQA)."),
        (layers * sum(r * fan_in for fan_in, _ in shapes.values()), "lora_B counts too: r x out besides A's r x in."),
        (layers * sum(fan_in * fan_out for fan_in, fan_out in shapes.values()),
         "that is the size of the weights themselves, not of the low-rank update."),
        (right + r * (hidden + config.vocab_size), "all-linear leaves out lm_head, the output layer."),
        (right / 1e6, "give the count itself, not in millions."),
    ], "for each of the seven projections add r x (in_features + out_features), read the widths from the config "
       "(GQA makes k_proj and v_proj narrower), and multiply by the number of decoder layers.")


def _forward_cases() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float, int]]:
    """(x, weight, lora_A, lora_B, lora_alpha, r) for a few layer shapes and settings; B is nonzero, as after training."""
    cases = []
    for seed, (fan_in, fan_out, r, alpha) in enumerate([(24, 40, 4, 8), (48, 16, 8, 32), (32, 32, 16, 8)]):
        generator = torch.Generator().manual_seed(500 + seed)
        draw = functools.partial(torch.randn, generator=generator)
        cases.append((draw(2, 5, fan_in), draw(fan_out, fan_in) / fan_in**0.5, draw(r, fan_in) / fan_in**0.5,
                      draw(fan_out, r) / r**0.5, float(alpha), r))
    return cases


def peft_lora_output(x, weight, lora_a, lora_b, lora_alpha, r) -> torch.Tensor:
    """What peft's own LoRA Linear computes for these weights, in eval mode (dropout off)."""
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as LoraLinear

    base = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    config = LoraConfig(r=r, lora_alpha=lora_alpha)
    layer = LoraLinear(base, "default", config=config, r=r, lora_alpha=lora_alpha)
    with torch.no_grad():
        base.weight.copy_(weight)
        layer.lora_A["default"].weight.copy_(lora_a)
        layer.lora_B["default"].weight.copy_(lora_b)
        return layer.eval()(x)


@exercise("04.4", "function", "Write lora_forward(x, weight, lora_A, lora_B, lora_alpha, r): what a LoRA Linear "
                              "computes, matched against peft's layer.")
def _lora_forward(answer: object) -> Verdict:
    if not callable(answer):
        raise TypeError("the answer should be your function itself (its name, without calling it)")
    for x, weight, lora_a, lora_b, alpha, r in _forward_cases():
        got = answer(x.clone(), weight.clone(), lora_a.clone(), lora_b.clone(), alpha, r)
        if (wrong_type := _returned_tensor(got, "the output")) is not None:
            return wrong_type
        right = peft_lora_output(x, weight, lora_a, lora_b, alpha, r)
        where = f"for a layer {weight.shape[1]} -> {weight.shape[0]} at r = {r}, lora_alpha = {alpha:g},"
        if tuple(got.shape) != tuple(right.shape):
            return Verdict(NOT_YET, f"{where} it returned shape {tuple(got.shape)}: the output keeps x's leading "
                                    "dimensions and has out_features values.")
        got = got.detach().float()
        if torch.allclose(got, right, rtol=1e-5, atol=1e-5):
            continue
        base, update = x @ weight.T, (x @ lora_a.T) @ lora_b.T
        for scale, hint in ((1.0, "the low-rank path is multiplied by the scaling, lora_alpha / r."),
                            (alpha, "the scaling is lora_alpha divided by r, not lora_alpha alone."),
                            (alpha / math.sqrt(r), "that is rsLoRA's scaling: plain LoRA divides lora_alpha by r.")):
            if torch.allclose(got, base + scale * update, rtol=1e-5, atol=1e-5):
                return Verdict(NOT_YET, f"{where} {hint}")
        if torch.allclose(got, alpha / r * update, rtol=1e-5, atol=1e-5):
            return Verdict(NOT_YET, f"{where} it returned the update alone: the frozen base layer's output comes first.")
        if torch.allclose(got, base, rtol=1e-5, atol=1e-5):
            return Verdict(NOT_YET, f"{where} it returned the base layer's output alone: add the low-rank path.")
        return Verdict(NOT_YET, f"{where} the output differs: x goes through weight (as a Linear does, x @ W.T), and "
                                "separately through lora_A, then lora_B, scaled; the two are added.")
    return Verdict(RIGHT, "It matches peft's LoRA Linear on three layer shapes: base output plus the scaled low-rank "
                          "path, without ever forming B @ A.")


# --- notebook 05 ------------------------------------------------------------------------------------------------

ROW_LENGTH = 13
PACKED_BITS = (1, 2, 4, 8)
"""Exercise 05.1: one row of ROW_LENGTH codes, packed at each of these bit widths."""


@exercise("05.1", "predict", "Bytes one row of 13 codes takes when packed at 1, 2, 4 and 8 bits")
def _packed_row_bytes(answer: object) -> Verdict:
    if not isinstance(answer, (tuple, list)) or len(answer) != len(PACKED_BITS):
        raise TypeError("the answer should be four numbers, the bytes at 1, 2, 4 and 8 bits, e.g. (a, b, c, d)")
    predicted = [_number(value, "each number of bytes") for value in answer]
    right = [math.ceil(ROW_LENGTH * bits / 8) for bits in PACKED_BITS]
    if predicted == right:
        return Verdict(RIGHT, "A row of n codes of b bits takes n*b/8 bytes rounded up: packing runs along the row, "
                              "so each row is padded on its own and no byte mixes two rows.")
    mistakes = {
        "a byte that holds only some of the codes is still a whole byte: the last one is padded with empty slots.":
            [ROW_LENGTH * bits // 8 for bits in PACKED_BITS],
        "bytes come whole: the last one is padded with empty slots.": [ROW_LENGTH * bits / 8 for bits in PACKED_BITS],
        "those are bits; the question asks for bytes.": [ROW_LENGTH * bits for bits in PACKED_BITS],
        "that is how many codes fit in one byte; the question is how many bytes the whole row takes.":
            [8 // bits for bits in PACKED_BITS],
    }
    for hint, values in mistakes.items():
        if all(_close(p, v) for p, v in zip(predicted, values)):
            return Verdict(NOT_YET, hint)
    wrong = ("one", "two", "three", "all four")[sum(p != r for p, r in zip(predicted, right)) - 1]
    return Verdict(NOT_YET, f"{wrong} of the four {'is' if wrong == 'one' else 'are'} off: count how many codes fit "
                            "in a byte at each width, then the bytes the row needs, the last one possibly part-filled.")


_THREE_BIT_SHAPES = ((1, 10), (3, 20), (4, 50), (2, 3, 30))
"""Shapes of the codes a student's 3-bit packer is tried on (the last dimension a multiple of ten)."""


def _random_codes(shape: tuple[int, ...], bits: int, seed: int) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.random.default_rng(seed).integers(0, 2**bits, size=shape, dtype=np.uint8))


def _three_bit_words(codes: torch.Tensor, first_lowest: bool = True, wrap_at_byte: bool = False) -> torch.Tensor:
    """Ten 3-bit codes to a word as arithmetic: code k times 8**k (its 3-bit slot), summed; int64."""
    groups = codes.long().reshape(*codes.shape[:-1], -1, 10)
    if not first_lowest:
        groups = groups.flip(-1)
    place = torch.tensor([8**k for k in range(10)], dtype=torch.int64)
    shifted = groups * place
    return (shifted % 256 if wrap_at_byte else shifted).sum(dim=-1)


@exercise("05.2", "function", "Write pack_3bit_int32(codes): ten 3-bit codes to an int32, the first lowest.")
def _pack_3bit_int32(answer: object) -> Verdict:
    if not callable(answer):
        raise TypeError("the answer should be your function itself (its name, without calling it)")
    cases = [_random_codes(shape, 3, seed=300 + i) for i, shape in enumerate(_THREE_BIT_SHAPES)]
    cases.append(torch.full((2, 10), 7, dtype=torch.uint8))  # every bit of the thirty set
    for codes in cases:
        got = answer(codes.clone())
        if (wrong_type := _returned_tensor(got, "the packed words")) is not None:
            return wrong_type
        where = f"on codes of shape {tuple(codes.shape)},"
        expected = _three_bit_words(codes)
        if tuple(got.shape) != tuple(expected.shape):
            return Verdict(NOT_YET, f"{where} it returned shape {tuple(got.shape)}; ten codes go into each int32, "
                                    "along the last dimension, and the other dimensions stay.")
        if got.dtype != torch.int32:
            return Verdict(NOT_YET, f"{where} it returned {got.dtype}; the words should be torch.int32.")
        got = got.detach().cpu().long()
        if torch.equal(got, expected):
            continue
        if torch.equal(got, _three_bit_words(codes, first_lowest=False)):
            return Verdict(NOT_YET, f"{where} the order is reversed: the first code of each ten goes into the lowest "
                                    "3 bits, the next one above it.")
        if torch.equal(got, _three_bit_words(codes, wrap_at_byte=True)):
            return Verdict(NOT_YET, f"{where} high bits are lost: a uint8 shifted left drops what passes bit 7, so "
                                    "widen the codes to int32 before shifting.")
        return Verdict(NOT_YET, f"{where} some words differ: code k of each group of ten belongs at bits 3k to "
                                "3k + 2 (shift it left by 3k), and the ten are combined with OR or a sum.")
    return Verdict(RIGHT, "Ten 3-bit codes fill 30 of an int32's 32 bits: 3.2 bits a weight, where one code per byte "
                          "would take 8. Some 3-bit kernels go further and let codes straddle words, 32 codes in "
                          "three int32s.")


BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
"""The block sizes bitsandbytes' 4-bit quantization accepts (exercise 05.3 asks to try them)."""


def scale_bits_per_weight(blocksize: int, double_quant: bool, blocksize2: int = 256) -> float:
    """Bits per weight that NF4's block scales cost, by arithmetic: a float32 per block, or, with double
    quantization, an 8-bit code per block plus a float32 per ``blocksize2`` blocks."""
    float32_bits, code_bits = torch.finfo(torch.float32).bits, torch.iinfo(torch.uint8).bits
    return code_bits / blocksize + float32_bits / (blocksize * blocksize2) if double_quant else float32_bits / blocksize


@exercise("05.3", "knob", "The smallest block size at which float32 scales cost no more bits per weight than double "
                          "quantization's in blocks of 64")
def _block_size_knob(answer: object) -> Verdict:
    size = _number(answer, "the block size")
    if size not in BLOCK_SIZES:
        return Verdict(NOT_YET, f"try the block sizes bitsandbytes accepts: powers of two from {min(BLOCK_SIZES)} "
                                f"to {max(BLOCK_SIZES)}.")
    size = int(size)
    budget = scale_bits_per_weight(64, double_quant=True)
    if scale_bits_per_weight(size, double_quant=False) > budget:
        return Verdict(NOT_YET, f"in blocks of {size} float32 scales still cost more than double quantization's: "
                                "try larger blocks.")
    if any(scale_bits_per_weight(b, double_quant=False) <= budget for b in BLOCK_SIZES if b < size):
        return Verdict(NOT_YET, f"blocks of {size} are cheap enough, but so are smaller ones, which fit the weights "
                                "more closely: try smaller.")
    return Verdict(RIGHT, "Double quantization buys the accuracy of blocks of 64 for the scale bits of much larger "
                          "blocks: one outlier spoils 64 weights instead of hundreds. That is the trade QLoRA made.")


_NIBBLE_SHAPES = ((3, 5), (1, 2), (4, 6), (16, 64))
"""Weight shapes a student's unpacking of bitsandbytes' bytes is tried on ((3, 5): an odd count, one padding nibble)."""

BITSANDBYTES_NF4_PADDING = 7
"""bitsandbytes pads an odd count with the code of 0.0, 7 in its NF4 table."""


def _bitsandbytes_bytes(codes: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' storage of 4-bit ``codes``, by arithmetic: flattened, a pair per byte, the first times 16."""
    flat = codes.reshape(-1).long()
    if flat.numel() % 2:
        flat = torch.cat([flat, torch.tensor([BITSANDBYTES_NF4_PADDING])])
    return (flat[0::2] * 16 + flat[1::2]).to(torch.uint8).reshape(-1, 1)


@exercise("05.4", "function", "Write unpack_bitsandbytes(packed, shape): the 4-bit codes of bitsandbytes' bytes.")
def _unpack_bitsandbytes(answer: object) -> Verdict:
    if not callable(answer):
        raise TypeError("the answer should be your function itself (its name, without calling it)")
    for seed, shape in enumerate(_NIBBLE_SHAPES):
        codes = _random_codes(shape, 4, seed=400 + seed)
        got = answer(_bitsandbytes_bytes(codes), torch.Size(shape))
        if (wrong_type := _returned_tensor(got, "the codes")) is not None:
            return wrong_type
        where = f"for a weight of shape {shape},"
        if got.numel() == codes.numel() + 1:
            return Verdict(NOT_YET, f"{where} it returned one code too many: an odd count leaves a padding nibble at "
                                    "the end, which is not a weight.")
        if tuple(got.shape) != shape:
            return Verdict(NOT_YET, f"{where} it returned shape {tuple(got.shape)}; reshape the codes to `shape`.")
        got = got.detach().cpu().long()
        if torch.equal(got, codes.long()):
            continue
        stored = _bitsandbytes_bytes(codes).reshape(-1).long()
        low_first = torch.stack((stored % 16, stored // 16), dim=1).reshape(-1)[: codes.numel()]
        if torch.equal(got.reshape(-1), low_first):
            return Verdict(NOT_YET, f"{where} the nibbles are in the wrong order: bitsandbytes keeps the first code "
                                    "of each byte in the high nibble (byte >> 4), the second in the low one.")
        if got.max().item() > 15:
            return Verdict(NOT_YET, f"{where} some codes are above 15: a high nibble must be shifted down (>> 4) and "
                                    "a low one masked (& 0xF), so that each code keeps only its own 4 bits.")
        return Verdict(NOT_YET, f"{where} some codes differ: the high nibble of each byte is the first code of its "
                                "pair, the low nibble the second, in the order the weight was flattened.")
    return Verdict(RIGHT, "Two whole-tensor operations and a reshape undo bitsandbytes' packing; section 8 does the "
                          "same on a real NF4 weight.")


# --- notebook 06 ------------------------------------------------------------------------------------------------

def _lora_count(config, r: int, targets) -> int:
    sizes = _projection_shapes(config)
    return config.num_hidden_layers * sum(r * (i + o) for name, (i, o) in sizes.items() if name in set(targets))


def _base_count(config) -> int:
    """Every parameter of a Llama config: embeddings, the layers (seven Linears, two norms), the final norm, and
    lm_head unless it is tied to the embeddings."""
    hidden, vocab = config.hidden_size, config.vocab_size
    per_layer = sum(i * o for i, o in _projection_shapes(config).values()) + 2 * hidden
    lm_head = 0 if getattr(config, "tie_word_embeddings", False) else vocab * hidden
    return vocab * hidden + config.num_hidden_layers * per_layer + hidden + lm_head


@exercise("06.1", "predict", "The trainable share print_trainable_parameters will print, in percent",
          context=("model", "lora_config"))
def _trainable_percent(answer: object, *, model: torch.nn.Module, lora_config) -> Verdict:
    predicted = _number(answer, "your prediction")
    config = model.config
    r, targets = lora_config.r, lora_config.target_modules
    lora_params, base = _lora_count(config, r, targets), _base_count(config)
    right = 100 * lora_params / (base + lora_params)
    if math.isclose(predicted, right, rel_tol=1e-4, abs_tol=1e-4):
        return Verdict(RIGHT, "peft divides LoRA's parameters by everything the model holds, the LoRA matrices "
                              "included, and counts a 4-bit weight as the values it stands for, not its packed "
                              "bytes. A few percent on the tiny model; well under one percent on a real Llama.")
    packed = base - sum(i * o for i, o in _projection_shapes(config).values()) * config.num_hidden_layers // 2
    alpha_count = _lora_count(config, int(lora_config.lora_alpha), targets)
    return _hint_for(predicted, [
        (100 * lora_params / base, "the total peft prints includes the LoRA matrices themselves: divide by base "
                                   "plus LoRA."),
        (right / 100, "print_trainable_parameters prints a percentage, not a fraction: multiply by 100."),
        (100 * lora_params / (packed + lora_params), "a 4-bit weight counts as the values it stands for (peft "
                                                     "doubles the packed bytes back), not as its packed bytes."),
        (100 * alpha_count / (base + alpha_count), "the inner size of A and B is r; lora_alpha only scales the "
                                                   "update."),
    ], "count LoRA's parameters, r x (in_features + out_features) for each target Linear of every layer, then "
       "divide by everything the model holds, LoRA included, and give a percentage.")


@exercise("06.2", "predict", "The learning rate AdamW uses for the first step of the run", context=("settings",))
def _first_learning_rate(answer: object, *, settings) -> Verdict:
    predicted = _number(answer, "your prediction")
    warmup = max(settings.warmup_steps, 1)
    right = settings.learning_rate * min(1.0, 1 / warmup)
    if math.isclose(predicted, right, rel_tol=1e-3):
        return Verdict(RIGHT, "The warm-up counts the first step as step 1 of its ramp, so even the first update "
                              "moves the fresh LoRA matrices a little; a ramp that started at 0 would waste a step.")
    return _hint_for(predicted, [
        (0.0, "a ramp that starts at 0 would make the first step do nothing: here the first step is step 1 of "
              "the warm-up."),
        (settings.learning_rate, "that is the rate once the warm-up is over; the first step is the warm-up's "
                                 "first."),
        (settings.learning_rate / (warmup + 1), "the ramp reaches the full rate at its last step, warmup_steps in: "
                                                "count the first step as 1 of warmup_steps."),
    ], "the rate grows linearly to settings.learning_rate over settings.warmup_steps steps, and the first step is "
       "the first of those.")


def _epoch_ends_by_counting(n_items: int, batch_size: int, steps: int) -> list[int]:
    """Steps (from 1) during which the count of items seen crosses a multiple of ``n_items``."""
    return [step for step in range(1, steps + 1) if step * batch_size // n_items > (step - 1) * batch_size // n_items]


EPOCH_CASES = ((240, 8, 30), (100, 8, 30), (10, 4, 10), (1000, 8, 30), (5, 8, 4), (12, 4, 9))
"""(n_items, batch_size, steps) a student's epoch_ends is tried on: one pass, a ragged last batch, passes ending
inside a batch, no pass completed, a batch larger than the items."""


@exercise("06.3", "function", "Write epoch_ends(n_items, batch_size, steps): the steps at which a pass ends.")
def _epoch_ends(answer: object) -> Verdict:
    if not callable(answer):
        raise TypeError("the answer should be your function itself (its name, without calling it)")
    for n_items, batch_size, steps in EPOCH_CASES:
        got = answer(n_items, batch_size, steps)
        where = f"for {n_items} items, batches of {batch_size} and {steps} steps,"
        if got is None:
            return Verdict(NOT_YET, "your function returned None: did it forget `return`?")
        got = [int(step) for step in got]
        expected = _epoch_ends_by_counting(n_items, batch_size, steps)
        if got == expected:
            continue
        if got == [step - 1 for step in expected]:
            return Verdict(NOT_YET, f"{where} each step is one too early: count steps from 1, as the loss curve's "
                                    "x axis does.")
        if got == [s for s in range(1, steps + 1) if s % math.ceil(n_items / batch_size) == 0]:
            return Verdict(NOT_YET, f"{where} the steps drift: when the items do not fill whole batches, a pass "
                                    "ends in the middle of a batch and the next pass starts in that same batch.")
        if len(got) > len(expected):
            return Verdict(NOT_YET, f"{where} it returned more steps than passes end: a step after which no new "
                                    "multiple of n_items has been read ends no pass.")
        return Verdict(NOT_YET, f"{where} some steps differ: after step s the run has read s x batch_size items; "
                                "a pass ends at the step whose count first reaches the next multiple of n_items.")
    return Verdict(RIGHT, "A pass ends where the count of items read crosses a multiple of the dataset's size; when "
                          "batches do not divide it evenly, the ends drift from one pass to the next.")


# --- notebook 06a -----------------------------------------------------------------------------------------------

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK_CHOICES = tuple(2**k for k in range(11))
"""Ranks exercise 06a.1 accepts: powers of two from 1 to 1024."""


def _qlora_8b_fits_a_t4(r: int) -> bool:
    """Exercise 06a.1's measurement: QLoRA of Llama-3.1-8B, every decoder Linear adapted at rank ``r``, weights,
    gradients and AdamW states (no activations) within a T4's usable memory, by the course's estimator."""
    from helpers import lora, memory

    config = memory.load_reference_config(_DATA / "reference" / "llama-3.1-8b.config.json")
    return lora.finetuning_memory(config, r, ALL_LINEAR)["qlora"].total <= memory.T4_USABLE_BYTES


@exercise("06a.1", "knob", "The largest power-of-two rank at which QLoRA of Llama-3.1-8B with all-linear targets "
                           "fits a T4, activations left out")
def _largest_rank_knob(answer: object) -> Verdict:
    r = _number(answer, "the rank")
    if r not in RANK_CHOICES:
        return Verdict(NOT_YET, f"try powers of two from {min(RANK_CHOICES)} to {max(RANK_CHOICES)}.")
    r = int(r)
    if not _qlora_8b_fits_a_t4(r):
        return Verdict(NOT_YET, f"at r = {r} the total passes a T4's usable memory: try a smaller rank.")
    if r < max(RANK_CHOICES) and _qlora_8b_fits_a_t4(2 * r):
        return Verdict(NOT_YET, f"r = {r} fits, and so does the next power of two: try larger.")
    return Verdict(RIGHT, "Each rank adds only r x (in + out) values per adapted Linear, 16 bytes each with their "
                          "gradient and AdamW states: the 4-bit base dominates far into the ranks people use. The "
                          "activations left out are what really limits a run on a T4.")


def _adamw_state_bytes(sizes: list[int], eight_bit: bool, scales: bool = True, code_books: bool = True) -> int:
    """AdamW's two moments for tensors of these sizes: float32 (8 bytes a value), or bitsandbytes' 8-bit states
    (1 byte per moment for a tensor of at least 4096 values, plus a float32 scale per 256 values per moment, and two
    256-entry float32 code books shared by every tensor)."""
    if not eight_bit:
        return 8 * sum(sizes)
    total = sum(2 * n + (8 * math.ceil(n / 256) if scales else 0) if n >= 4096 else 8 * n for n in sizes)
    return total + (2 * 256 * 4 if code_books and any(n >= 4096 for n in sizes) else 0)


@exercise("06a.2", "predict", "AdamW's state bytes for this adapter, in 32-bit and in 8-bit: (a, b)", context=("model",))
def _optimizer_state_bytes(answer: object, *, model: torch.nn.Module) -> Verdict:
    if not isinstance(answer, (tuple, list)) or len(answer) != 2:
        raise TypeError("the answer should be two numbers, the bytes in 32-bit and in 8-bit, e.g. (a, b)")
    predicted = [_number(value, "each number of bytes") for value in answer]
    sizes = [p.numel() for name, p in model.named_parameters() if ".lora_A." in name or ".lora_B." in name]
    if not sizes:
        raise ValueError("the model has no LoRA matrices: pass the wrapped model")
    right = [_adamw_state_bytes(sizes, False), _adamw_state_bytes(sizes, True)]
    if all(_close(p, v) for p, v in zip(predicted, right)):
        return Verdict(RIGHT, "Two moments per trainable value: 8 bytes in float32, a little over 2 in 8 bits. For "
                              "an adapter both are megabytes; the bigger risk on a GPU is a spike of activations.")
    if _close(predicted[0], right[0]):
        return _hint_for(predicted[1], [
            (_adamw_state_bytes(sizes, True, scales=False), "the 8-bit codes need their scales: one float32 per "
                                                           "256 values, for each of the two moments."),
            (_adamw_state_bytes(sizes, True, code_books=False), "add the two code books (256 float32 entries "
                                                               "each), stored once for all tensors."),
            (2 * sum(sizes), "2 bytes a value is the codes alone: add the scales and the code books."),
            (sum(sizes), "AdamW keeps two moments, each an 8-bit code."),
        ], "the 32-bit figure is right; for 8 bits count, per tensor, a byte per value per moment, a float32 per "
           "256 values per moment, then the shared code books.")
    return _hint_for(predicted[0], [
        (4 * sum(sizes), "AdamW keeps two moments per value (exp_avg and exp_avg_sq), 4 bytes each."),
        (16 * sum(sizes), "count the optimizer's states only, not the weight and its gradient."),
        (8 * sum(sizes) / 1e6, "write it in bytes, not MB."),
    ], "the 32-bit figure is off: add up the values of every lora_A and lora_B, then two float32 moments each.")


def _energy_in_top(residual: torch.Tensor, rank: int) -> float:
    energy = torch.linalg.svdvals(residual.detach().float().cpu()).double() ** 2
    return (energy[:rank].sum() / energy.sum()).item()


LOFTQ_SCALING = 1.5
"""Exercise 06a.3's scaling: lora_alpha = 1.5 r."""


@exercise("06a.3", "predict", "The error ratio of peft's LoftQ split on this layer if lora_alpha were 1.5 r",
          context=("residual", "lora_config"))
def _loftq_ratio(answer: object, *, residual: torch.Tensor, lora_config) -> Verdict:
    predicted = _number(answer, "your prediction")
    share = _energy_in_top(residual, lora_config.r)
    right = math.sqrt(1 - share + (1 - LOFTQ_SCALING) ** 2 * share)
    if math.isclose(predicted, right, abs_tol=2e-3):
        return Verdict(RIGHT, "peft's B @ A is the best rank-r piece R_r, and the layer adds 1.5 times it: the "
                              "overshoot, half of R_r, stays as error beside the part no rank-r term reaches.")
    return _hint_for(predicted, [
        (1.0, "the error equals the default start's only at scaling 2, where the overshoot is all of R_r."),
        (math.sqrt(1 - share), "that is the split for scaling, which divides by the scaling first; peft's split "
                               "adds 1.5 R_r."),
        (1 - share + (1 - LOFTQ_SCALING) ** 2 * share, "that is the squared ratio: take its square root."),
        (math.sqrt(1 - share + abs(1 - LOFTQ_SCALING) * share), "the overshoot's energy is (scaling - 1) squared "
                                                               "times R_r's."),
    ], "the two pieces are orthogonal: add the energy left outside the top r directions to (scaling - 1) squared "
       "times the energy inside them, relative to the whole, and take the square root.")


# --- notebook 07 ------------------------------------------------------------------------------------------------

WIDE_GROUP_SIZE = 128
"""Exercise 07.1: 4-bit codes in groups of WIDE_GROUP_SIZE, with a 16-bit scale and a 16-bit zero point per group."""


def groupwise_bits_per_weight(bits: int, group_size: int, scale_bits: int, zero_point_bits: int) -> float:
    """Bits per weight of a group-wise format, counted from one group's storage: ``group_size`` codes of ``bits``
    bits, one scale and one zero point."""
    return (group_size * bits + scale_bits + zero_point_bits) / group_size


@exercise("07.1", "predict", "Bits per weight of 4-bit codes in groups of 128 with a 16-bit scale and a 16-bit zero "
                             "point per group")
def _wide_group_bits(answer: object) -> Verdict:
    predicted = _number(answer, "your prediction")
    sixteen = torch.finfo(torch.float16).bits
    right = groupwise_bits_per_weight(4, WIDE_GROUP_SIZE, sixteen, sixteen)
    if _close(predicted, right):
        return Verdict(RIGHT, "A group's scale and zero point are shared by all its weights, so doubling the group "
                              "halves what they cost per weight; a 16-bit zero point costs as much as the scale.")
    return _hint_for(predicted, [
        (groupwise_bits_per_weight(4, WIDE_GROUP_SIZE, sixteen, 0),
         "count the zero point too: here it is a 16-bit number per group, like the scale."),
        (groupwise_bits_per_weight(4, WIDE_GROUP_SIZE, sixteen, 4),
         "here the zero point is a 16-bit number, not a packed 4-bit code."),
        (groupwise_bits_per_weight(4, 64, sixteen, sixteen), "the groups here hold 128 weights, not 64."),
        (groupwise_bits_per_weight(4, 64, sixteen, 4), "that is the format measured above; this one has groups of "
                                                       "128 and a 16-bit zero point."),
        (4, "that counts the codes alone: add each group's scale and zero point, shared by its weights."),
        (2 * sixteen / WIDE_GROUP_SIZE, "that is only what the scale and zero point add: add the codes' own bits."),
    ], "add the codes' bits to the scale's and the zero point's, divided among the weights of one group.")


CLIPPED_BITS = 2
"""Exercise 07.2: the bit width at which to predict what a symmetric grid keeps of a positive maximum."""


def symmetric_share_kept(bits: int) -> float:
    """What symmetric round-to-nearest (compressed-tensors' convention) keeps of a group's largest weight when it is
    positive, measured: a group whose largest magnitude is +1, quantized and dequantized with helpers.groupwise."""
    from helpers import groupwise

    group = torch.tensor([[1.0, -0.25, 0.5, -0.75]])
    q = groupwise.quantize_groupwise(group, bits, group_size=group.shape[1], symmetric=True)
    return groupwise.dequantize_groupwise(q)[0, 0].item()


@exercise("07.2", "predict", "What fraction of a group's positive maximum does 2-bit symmetric round-to-nearest keep?")
def _share_kept(answer: object) -> Verdict:
    predicted = _number(answer, "your prediction")
    right = symmetric_share_kept(CLIPPED_BITS)

    def near(value: float) -> bool:  # a fraction written with three decimals counts
        return abs(predicted - value) <= 5e-4

    if near(right):
        return Verdict(RIGHT, "The top code sits half a step below where the scale puts the largest magnitude, and "
                              "at 2 bits a step is a large share of the range: a positive outlier loses a third. An "
                              "asymmetric grid, or Q4_0's signed extreme, avoids this.")
    mistakes = [
        (1.0, "a symmetric grid has one level more below zero than above: the largest positive weight cannot reach "
              "the scale's end of the range."),
        (1 - right, "that is the share lost; the question asks for the share kept."),
        (symmetric_share_kept(4), "that is the 4-bit share; at 2 bits the top code is a larger step from the end."),
        (symmetric_share_kept(3), "that is the 3-bit share; at 2 bits the top code is a larger step from the end."),
        (0.5, "the scale maps the largest magnitude half a step past the top code, not a whole step."),
    ]
    hints = [hint for value, hint in mistakes if near(value)]
    return Verdict(NOT_YET, hints[0] if hints else "write the top code and the point the scale maps the largest "
                                                   "magnitude to, both in steps, and divide.")


_Q4_1_SHAPES = ((1, 32), (4, 64), (3, 96), (2, 2, 64))
"""Shapes a student's Q4_1 quantizer is tried on (the last dimension a multiple of 32)."""


def gguf_py_q4_1(x: torch.Tensor) -> torch.Tensor:
    """gguf-py's Q4_1 bytes of ``x`` (its reference quantizer, byte-identical to llama.cpp's), as a uint8 tensor."""
    from gguf import GGMLQuantizationType, quants

    return torch.from_numpy(quants.quantize(x.detach().cpu().float().numpy(), GGMLQuantizationType.Q4_1))


def _q4_1_cases() -> list[torch.Tensor]:
    cases = [basics.example_weight(math.prod(shape[:-1]), shape[-1], seed=700 + i).reshape(shape)
             for i, shape in enumerate(_Q4_1_SHAPES)]
    flat = torch.full((1, 64), 0.25)  # a constant block: its step is 0, and every code must be 0
    flat[0, 32:] = torch.linspace(-1, 2, 32)
    return [*cases, flat]


@exercise("07.3", "function", "Write quantize_q4_1(x): llama.cpp's Q4_1 bytes, matching gguf-py's quantizer.")
def _quantize_q4_1(answer: object) -> Verdict:
    if not callable(answer):
        raise TypeError("the answer should be your function itself (its name, without calling it)")
    for x in _q4_1_cases():
        got = answer(x.clone())
        if (wrong_type := _returned_tensor(got, "the bytes")) is not None:
            return wrong_type
        expected = gguf_py_q4_1(x)
        where = f"on a weight of shape {tuple(x.shape)},"
        if got.dtype != torch.uint8:
            return Verdict(NOT_YET, f"{where} it returned {got.dtype}; the answer is raw bytes, torch.uint8.")
        if tuple(got.shape) != tuple(expected.shape):
            return Verdict(NOT_YET, f"{where} it returned shape {tuple(got.shape)}: each block of 32 weights takes "
                                    "20 bytes (d and m as float16, then 16 bytes of codes), one row per row of x.")
        got = got.detach().cpu()
        if torch.equal(got, expected):
            continue
        g, e = got.reshape(-1, 20), expected.reshape(-1, 20)
        if torch.equal(g[:, :2], e[:, 2:4]) and torch.equal(g[:, 2:4], e[:, :2]):
            return Verdict(NOT_YET, f"{where} d and m are swapped: the step d comes first, then the minimum m.")
        if not torch.equal(g[:, 2:4], e[:, 2:4]):
            return Verdict(NOT_YET, f"{where} m (bytes 2-3 of each block) differs: Q4_1 stores each block's "
                                    "smallest value, as float16, and counts its codes up from it.")
        if not torch.equal(g[:, :2], e[:, :2]):
            return Verdict(NOT_YET, f"{where} d (bytes 0-1 of each block) differs: unlike Q4_0's signed extreme, "
                                    "Q4_1's 16 levels span the block from its minimum to its maximum.")
        swapped = (e[:, 4:] >> 4) | (e[:, 4:] << 4)
        if torch.equal(g[:, 4:], swapped):
            return Verdict(NOT_YET, f"{where} the nibbles are in the wrong order: as in Q4_0, the first 16 codes of "
                                    "a block go in the low nibbles, the last 16 in the high ones.")
        return Verdict(NOT_YET, f"{where} some codes differ: count each weight's steps d up from m, rounding to "
                                "the nearest code in float32 as Q4_0's code does, and keep them within 0..15.")
    return Verdict(RIGHT, "Your bytes are gguf-py's: Q4_1 pays 16 more bits per block of 32 than Q4_0 (5 bits per "
                          "weight against 4.5) for a minimum that lets its grid follow a lopsided block, the same "
                          "trade as an asymmetric group with a zero point.")
