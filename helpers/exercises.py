"""Exercises in the notebooks: a checker for each that says right or not yet, with a hint, never the answer.

A notebook poses an exercise in one cell and ends it with ``exercises.check("00.1", your_answer)``. Three outcomes:

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

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

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
    """One exercise: its key (``"00.1"``: notebook, number), what kind of answer it wants, and its checker."""

    key: str
    kind: str  # "predict" (a value), "knob" (a setting found by trying) or "function" (code to write)
    question: str
    grade: Callable[[object], Verdict]


EXERCISES: dict[str, Exercise] = {}

_HOW_TO_START = {
    "predict": "replace the ... with your prediction and run this cell again",
    "knob": "replace the ... with the value you found and run this cell again",
    "function": "replace the `raise NotImplementedError` line with your code and run this cell again",
}


def exercise(key: str, kind: str, question: str):
    """Register the decorated function as the checker of exercise ``key``."""
    if kind not in _HOW_TO_START:
        raise ValueError(f"kind must be one of {', '.join(_HOW_TO_START)}, got {kind!r}")

    def register(grade: Callable[[object], Verdict]) -> Callable[[object], Verdict]:
        if key in EXERCISES:
            raise ValueError(f"exercise {key} is registered twice")
        EXERCISES[key] = Exercise(key, kind, question, grade)
        return grade

    return register


def _unattempted(answer: object) -> bool:
    return answer is ... or answer is None


def grade(key: str, answer: object) -> Verdict:
    """Judge ``answer`` to exercise ``key`` without printing anything (the tests call this)."""
    if key not in EXERCISES:
        raise KeyError(f"no exercise {key!r}; known: {', '.join(EXERCISES)}")
    found = EXERCISES[key]
    if _unattempted(answer):
        return Verdict(NOT_ATTEMPTED, _HOW_TO_START[found.kind])
    try:
        return found.grade(answer)
    except NotImplementedError:  # the function's body is still the placeholder
        return Verdict(NOT_ATTEMPTED, _HOW_TO_START[found.kind])
    except Exception as error:  # noqa: BLE001 (any error in a student's code is a hint, not a crash)
        return Verdict(NOT_YET, f"running your answer raised {type(error).__name__}: {error}")


def check(key: str, answer: object) -> None:
    """Print the verdict on ``answer`` to exercise ``key``: a polite note, ``✓ ... right`` or ``✗ ... not yet``.

    Never raises for a wrong or missing answer, so the notebook goes on; returns nothing, so no ``Out[]`` line.
    """
    verdict = grade(key, answer)
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
