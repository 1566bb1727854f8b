"""Worked solutions of the notebooks' exercises. Open this file on purpose, after a real try.

Each solution shows one way of getting there (any correct way passes the checker in ``helpers/exercises.py``).
``answer(key)`` returns what you would pass to ``exercises.check(key, ...)``; tests/test_exercises.py feeds every
checker its solution.
"""

from __future__ import annotations

import torch


# --- notebook 00 ------------------------------------------------------------------------------------------------


def exercise_00_1() -> float:
    """Spacing of float16 values near 1000.

    1000 = 1.953125 x 2**9, so it lies between 2**9 = 512 and 2**10 = 1024. float16 has 10 mantissa bits: every
    power-of-two interval is cut into 2**10 equal steps, here 512 / 1024 wide.
    """
    exponent = 9  # 2**9 <= 1000 < 2**10
    mantissa_bits = 10
    return 2.0**exponent / 2**mantissa_bits


def exercise_00_2() -> tuple[int, float]:
    """3-bit zero-point quantization of values in [-1, 2.5]: (number of levels, step).

    A zero point uses every code: 2**3 = 8 of them. The lowest stands for -1, the highest for 2.5, and the 8 levels
    have 7 equal gaps between them.
    """
    levels = 2**3
    step = (2.5 - (-1.0)) / (levels - 1)
    return levels, step


def exercise_00_3(weight: torch.Tensor, group_size: int, bits: int) -> torch.Tensor:
    """One absmax scale per group of ``group_size`` consecutive weights of each row.

    Reshaping each row into pieces of ``group_size`` makes every group a row of its own; the rest is per-row absmax:
    the largest magnitude divided by the largest code, 2**(bits - 1) - 1.
    """
    rows = weight.shape[0]
    groups = weight.reshape(rows, -1, group_size)  # (rows, groups per row, group_size)
    largest_code = 2 ** (bits - 1) - 1
    return groups.abs().amax(dim=-1) / largest_code  # (rows, groups per row)


def exercise_00_4() -> int:
    """The largest group size that pays back the outlier (4-bit absmax), found by trying every size.

    Smaller groups keep the outlier's large scale to fewer neighbours; the error of the other weights shrinks as the
    groups do, and the first size (from the largest) whose error is no worse than the clean matrix per channel is
    the answer.
    """
    from helpers import basics
    from helpers.exercises import GROUP_SIZES, OUTLIER_AT, OUTLIER_TIMES

    weight = basics.example_weight()
    planted = basics.with_outlier(weight, *OUTLIER_AT, OUTLIER_TIMES)
    others = torch.ones_like(weight, dtype=torch.bool)
    others[OUTLIER_AT] = False
    clean = basics.relative_error(weight, basics.quantize_tensor(weight, 4, granularity="channel").dequantized)
    for group_size in sorted(GROUP_SIZES, reverse=True):
        grouped = basics.quantize_tensor(planted, 4, granularity="group", group_size=group_size).dequantized
        if basics.relative_error(weight[others], grouped[others]) <= clean:
            return group_size
    raise AssertionError("no group size pays the outlier back")


_SOLUTIONS = {"00.1": exercise_00_1, "00.2": exercise_00_2, "00.4": exercise_00_4}
_FUNCTIONS = {"00.3": exercise_00_3}


def answer(key: str) -> object:
    """What a solved notebook passes to ``exercises.check(key, ...)``: a value, or the function itself."""
    if key in _FUNCTIONS:
        return _FUNCTIONS[key]
    if key in _SOLUTIONS:
        return _SOLUTIONS[key]()
    raise KeyError(f"no solution for exercise {key!r}")


KEYS = tuple(sorted([*_SOLUTIONS, *_FUNCTIONS]))
