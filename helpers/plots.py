"""Figures the notebooks share. Each function draws and shows one figure, and returns nothing
(so a cell ending with a plot call prints no object repr)."""

from __future__ import annotations

import matplotlib.pyplot as plt


def bar_chart(values: dict[str, float], title: str, ylabel: str, annotate_format: str = "{:,.0f}",
              log_scale: bool = False, colors: list[str] | None = None):
    """Vertical bars, one per key, each annotated with its value."""
    if not values:
        raise ValueError("bar_chart needs at least one value")
    fig, ax = plt.subplots(figsize=(7, 3.6))
    bars = ax.bar(list(values), list(values.values()), color=colors)
    for bar, value in zip(bars, values.values()):
        ax.annotate(annotate_format.format(value), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=9)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    if log_scale:
        ax.set_yscale("log")
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    plt.show()


def grouped_bar_chart(groups: dict[str, dict[str, float]], title: str, ylabel: str,
                      annotate_format: str = "{:,.1f}", reference_line: tuple[float, str] | None = None):
    """Bars grouped by outer key (e.g. model), one bar per inner key (e.g. scheme); optional horizontal line."""
    if not groups:
        raise ValueError("grouped_bar_chart needs at least one group")
    series = list(next(iter(groups.values())))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(8, 3.8))
    for i, name in enumerate(series):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        values = [groups[group][name] for group in groups]
        bars = ax.bar(xs, values, width=width, label=name)
        for bar, value in zip(bars, values):
            ax.annotate(annotate_format.format(value), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)
    if reference_line is not None:
        ax.axhline(reference_line[0], color="crimson", linestyle="--", linewidth=1, label=reference_line[1])
    ax.set_xticks(range(len(groups)), list(groups))
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.legend(frameon=False, fontsize=8)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    plt.show()
