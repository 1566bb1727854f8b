"""Published results as data, printed beside the course's own measurement ("against the published result").

``data/published_results.json`` holds figures from the papers and projects the course builds on, each with its
source (paper, table, arXiv id), the setting it was measured in (model, scale, metric) and the relation it shows.
A notebook never compares absolute values across models: it sets a *relation* it measured (an ordering, a ratio, a
threshold) beside the published one, and says what differs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

RESULTS_FILE = Path(__file__).resolve().parents[1] / "data" / "published_results.json"


@dataclass(frozen=True)
class PublishedResult:
    """One published figure or table: where it comes from, what it measured, and its numbers."""

    key: str
    source: str
    arxiv: str  # "" for a repository or an article
    setting: str  # model, scale and metric of the published measurement
    statement: str  # the relation it shows, in words
    figures: dict[str, float]
    unit: str

    @property
    def citation(self) -> str:
        return f"{self.source}, arXiv:{self.arxiv}" if self.arxiv else self.source

    def figure(self, name: str) -> float:
        """One named figure, with the available names when it is not there."""
        if name not in self.figures:
            raise KeyError(f"{self.key} has no figure {name!r}; it has: {', '.join(self.figures)}")
        return self.figures[name]

    def ranking(self, lower_is_better: bool = True) -> list[str]:
        """The figures' names from best to worst."""
        return sorted(self.figures, key=self.figures.__getitem__, reverse=not lower_is_better)


def load(path: Path = RESULTS_FILE) -> dict[str, PublishedResult]:
    """Every published result in the data file, checked for the fields a panel needs."""
    raw = json.loads(Path(path).read_text())
    results = {}
    for key, entry in raw.items():
        missing = {"source", "arxiv", "setting", "statement", "figures", "unit"} - entry.keys()
        if missing:
            raise ValueError(f"{path}: published result {key!r} lacks {', '.join(sorted(missing))}")
        if not entry["figures"] or not all(isinstance(v, (int, float)) for v in entry["figures"].values()):
            raise ValueError(f"{path}: published result {key!r} needs numeric figures")
        results[key] = PublishedResult(key=key, **entry)
    return results


def get(key: str) -> PublishedResult:
    """One published result by key, with the valid keys when it is unknown."""
    results = load()
    if key not in results:
        raise KeyError(f"no published result {key!r}; data/published_results.json has: {', '.join(results)}")
    return results[key]


def panel(key: str, ours: str, differs: str) -> str:
    """Print (and return) the published relation beside the course's own measurement, with what differs.

    ``ours`` states what this notebook measured (computed, formatted by the caller); ``differs`` says what is not
    the same between the two measurements (model, scale, metric, hardware).
    """
    for name, text in (("ours", ours), ("differs", differs)):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"panel({key!r}) needs {name} as a non-empty sentence")
    result = get(key)
    text = "\n".join([
        f"Published ({result.citation}):",
        f"    {result.statement}",
        f"    measured on: {result.setting}",
        f"This course: {ours}",
        f"What differs: {differs}",
    ])
    print(text)
    return text
