"""Claims a notebook makes about its own numbers, printed and enforced in one call.

A notebook that prints "from-scratch bytes == stored bytes: True" teaches nothing if it would print False just as
quietly on another machine. ``check`` prints the claim with a ✓ and raises ``ClaimFailed`` when it does not hold,
so the strict CI lane (which compares outputs) and the lax GPU lanes (which only see exceptions) verify the same
lesson. Descriptive facts (tied or not, on Colab or not) stay plain prints; tests/test_notebooks.py tells the two
apart and fails on a printed True/False that no ``check`` enforced.

A claim a profile cannot make (its numbers do not bear on it) is passed as ``NotChecked(why)``: ``check`` prints
``- not checked: <claim> (<why>)`` instead of staying silent, so a reader sees what was left unverified.

Claims are of two kinds. A *law* holds for any weights (an estimate equals a measurement, from scratch equals the
library, a count equals its formula, memory comes back): ``check`` it, everywhere. An *observation* holds for the
trained models (a quality threshold, an adapter beating its base, outliers of a size): ``observe`` it. It is checked
like a law, except in the rehearsal (``make rehearse``: the real configs with random weights), where it prints
``- not checked: <claim> (random weights)``, never silently.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

CHECK_MARK = "✓"
"""Starts every line ``check`` prints: the mark of a claim that was verified when the cell ran."""


NOT_CHECKED_MARK = "-"
"""Starts every line ``check`` prints for a ``NotChecked`` claim: stated, not verified."""


class ClaimFailed(AssertionError):
    """A notebook's claim about its own numbers did not hold on this run."""


@dataclass(frozen=True)
class NotChecked:
    """The value of a claim that is not checked on this run, with the reason (``check`` prints both)."""

    reason: str

    def __post_init__(self) -> None:
        if not isinstance(self.reason, str) or not self.reason.strip() or "\n" in self.reason:
            raise ValueError(f"NotChecked needs the reason as one non-empty line, got {self.reason!r}")

    def __bool__(self) -> bool:
        raise TypeError("a NotChecked claim is neither true nor false: pass it to claims.check, which prints why.")


def _as_bool(holds: object, claim: str) -> bool:
    """A real truth value: bool, numpy bool or a one-element torch tensor; anything else is a programming error."""
    import numpy as np
    import torch

    if isinstance(holds, (bool, np.bool_)):
        return bool(holds)
    if isinstance(holds, torch.Tensor) and holds.dtype == torch.bool and holds.numel() == 1:
        return bool(holds)
    type_name = type(holds).__name__
    raise TypeError(f"check({claim!r}, ...) needs a bool (or a numpy/torch boolean scalar), got {type_name}: "
                    "compare the numbers first, e.g. check('a equals b', a == b).")


def check(claim: str, holds: object, detail: str = "") -> None:
    """Print ``✓ <claim>: True``; raise ``ClaimFailed`` (with ``detail``) when the claim is false.

    ``holds`` a ``NotChecked``: print ``- not checked: <claim> (<reason>)`` and verify nothing. Returns nothing, so a
    cell that ends with a check shows no ``Out[]`` line.
    """
    if not isinstance(claim, str) or not claim.strip():
        raise ValueError("check needs the claim as a non-empty sentence, e.g. check('estimate == measured', ok).")
    if "\n" in claim:
        raise ValueError(f"a claim is one line; got {claim!r}")
    if isinstance(holds, NotChecked):
        print(f"{NOT_CHECKED_MARK} not checked: {claim} ({holds.reason})")
        return
    truth = _as_bool(holds, claim)
    if not truth:
        raise ClaimFailed(f"This notebook's claim does not hold on this run: {claim!r}."
                          + (f" {detail}" if detail else "")
                          + " The lesson's numbers changed: look at the cells above before going on.")
    print(f"{CHECK_MARK} {claim}: True")


def check_all(claims: dict[str, object], detail: str = "") -> None:
    """``check`` every (claim, holds) pair in order; the first false one raises."""
    if not claims:
        raise ValueError("check_all needs at least one claim.")
    for claim, holds in claims.items():
        check(claim, holds, detail)


RANDOM_WEIGHTS_ENV_VAR = "COURSE_REHEARSAL"
"""Set by ``make rehearse`` (see ``helpers.environment``): the model's weights are random, so observations about
trained weights cannot be checked."""

RANDOM_WEIGHTS = NotChecked("random weights")


def weights_are_random() -> bool:
    """True in the rehearsal, whose checkpoints hold random weights."""
    return bool(os.environ.get(RANDOM_WEIGHTS_ENV_VAR, "").strip())


def observe(claim: str, holds: object, detail: str = "") -> None:
    """``check`` an observation: a claim that holds for the trained models, not for any weights. In the rehearsal
    it prints ``- not checked: <claim> (random weights)`` instead, and ``holds`` is not even looked at."""
    check(claim, RANDOM_WEIGHTS if weights_are_random() else holds, detail)


def observe_all(claims: dict[str, object], detail: str = "") -> None:
    """``observe`` every (claim, holds) pair in order; the first false one raises."""
    if not claims:
        raise ValueError("observe_all needs at least one claim.")
    for claim, holds in claims.items():
        observe(claim, holds, detail)
