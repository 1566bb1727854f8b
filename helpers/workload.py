"""How much work a notebook does: the whole lesson, or the same cells on smaller sizes.

One setting, the ``COURSE_WORKLOAD`` environment variable, read by every notebook through the functions below:

- ``full`` (the default, and what every committed output shows): each cell uses the sizes its lesson chose;
- ``small``: the same cells with fewer held-out windows, pricer items, training steps, calibration sequences,
  generated tokens, timed repeats and bit widths compared (07 keeps 4 and 3 bits). ``make rehearse`` uses it: on random weights a long evaluation measures
  nothing, and the real models' 128,256-token vocabulary makes every scored token cost.

Only amounts of work shrink. Widths, vocabularies, layers, dtypes and schemes never do, so every law a notebook
checks (an estimate equals a measurement, from scratch equals the library) is checked on the real shapes. A cell
reads ``workload.windows(8)``: 8 under ``full``, at most the small limit under ``small``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import TypeVar

T = TypeVar("T")

WORKLOAD_ENV_VAR = "COURSE_WORKLOAD"


@dataclass(frozen=True)
class Workload:
    """Upper limits on each amount of work (``None``: the notebook's own choice stands)."""

    name: str
    eval_windows: int | None = None  # held-out windows per evaluation (perplexity, KL)
    pricer_items: int | None = None  # test items the pricer answers
    training_steps: int | None = None  # steps of a training run
    calibration_sequences: int | None = None  # sequences GPTQ and AWQ calibrate on
    new_tokens: int | None = None  # tokens generated per prompt
    timed_repeats: int | None = None  # repeats of a timing
    bit_widths: int | None = None  # how many of a comparison's bit widths (the first ones) are run

    def __post_init__(self) -> None:
        for field in fields(self)[1:]:
            limit = getattr(self, field.name)
            if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
                raise ValueError(f"workload {self.name!r}: {field.name} must be a positive int or None, got {limit!r}")

    def cap(self, amount: str, wanted: int) -> int:
        """``wanted``, or this workload's limit on ``amount`` when that is smaller."""
        if amount == "name" or amount not in {field.name for field in fields(self)}:
            raise ValueError(f"no amount of work called {amount!r}; "
                             f"choose one of: {', '.join(f.name for f in fields(self)[1:])}")
        if isinstance(wanted, bool) or not isinstance(wanted, int) or wanted < 1:
            raise ValueError(f"{amount}: the notebook's own choice must be a positive int, got {wanted!r}")
        limit = getattr(self, amount)
        return wanted if limit is None else min(wanted, limit)

    @property
    def reduced(self) -> bool:
        return any(getattr(self, field.name) is not None for field in fields(self)[1:])

    def describe(self) -> str:
        """One line: the name and each limit, e.g. ``small (at most: eval_windows 1, pricer_items 2, ...)``."""
        limits = [f"{field.name} {getattr(self, field.name)}" for field in fields(self)[1:]
                  if getattr(self, field.name) is not None]
        return f"{self.name} (at most: {', '.join(limits)})" if limits else f"{self.name} (each cell's own sizes)"


WORKLOADS = {
    "full": Workload("full"),
    "small": Workload("small", eval_windows=1, pricer_items=2, training_steps=4, calibration_sequences=2,
                      new_tokens=4, timed_repeats=1, bit_widths=2),
}


def current(environ: dict[str, str] | None = None) -> Workload:
    """The workload ``COURSE_WORKLOAD`` names (``full`` when unset); a clear error for any other value."""
    environ = os.environ if environ is None else environ
    name = environ.get(WORKLOAD_ENV_VAR, "").strip().lower() or "full"
    if name not in WORKLOADS:
        raise ValueError(f"{WORKLOAD_ENV_VAR}={environ[WORKLOAD_ENV_VAR]!r} is not a workload: choose one of "
                         f"{', '.join(WORKLOADS)} (or unset it for the full lesson).")
    return WORKLOADS[name]


def windows(wanted: int) -> int:
    """Held-out windows an evaluation scores."""
    return current().cap("eval_windows", wanted)


def items(wanted: int) -> int:
    """Test items the pricer answers."""
    return current().cap("pricer_items", wanted)


def steps(wanted: int) -> int:
    """Steps of a training run."""
    return current().cap("training_steps", wanted)


def sequences(wanted: int) -> int:
    """Calibration sequences."""
    return current().cap("calibration_sequences", wanted)


def new_tokens(wanted: int) -> int:
    """Tokens generated per prompt."""
    return current().cap("new_tokens", wanted)


def repeats(wanted: int) -> int:
    """Repeats of a timing."""
    return current().cap("timed_repeats", wanted)


def first(sequence: Sequence[T], amount: str) -> Sequence[T]:
    """The first items of ``sequence``: all of them, or this workload's limit on ``amount`` (e.g. ``"pricer_items"``)."""
    return sequence[:current().cap(amount, len(sequence))] if len(sequence) else sequence
