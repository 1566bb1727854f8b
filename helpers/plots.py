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


def levels_over_histogram(values, tables: dict, title_format: str, xlabel: str, bins: int = 120):
    """One histogram of ``values`` per table, with the table's entries drawn over it as vertical lines.

    ``tables`` maps a name (e.g. "NF4") to its 1-D tensor of levels; ``title_format`` is formatted with ``name=``.
    """
    if not tables:
        raise ValueError("levels_over_histogram needs at least one table of levels, e.g. {'NF4': levels}")
    if len(values) == 0:
        raise ValueError("levels_over_histogram needs at least one value to histogram")
    fig, axes = plt.subplots(len(tables), 1, figsize=(8, 2.3 * len(tables)), sharex=True, squeeze=False)
    for ax, (name, table) in zip(axes[:, 0], tables.items()):
        ax.hist(values, bins=bins, range=(-1, 1), color="#9aa9bd")
        ax.vlines(list(table), 0, 1, transform=ax.get_xaxis_transform(), colors="crimson", linewidth=1)
        ax.set_ylabel("weights")
        ax.set_title(title_format.format(name=name), fontsize=10)
        ax.spines[["top", "right"]].set_visible(False)
    axes[-1, 0].set_xlabel(xlabel)
    fig.tight_layout()
    plt.show()


def labelled_scatter(points: dict[str, tuple[float, float]], title: str, xlabel: str, ylabel: str,
                     log_x: bool = False, log_y: bool = False):
    """One labelled point per key: ``{label: (x, y)}``, e.g. each scheme at its size and its quality loss.

    Each label goes to the first of a few places around its point where it overlaps no label placed before, so
    points at the same size (FP4 and NF4 store the same bits) stay readable. A log x axis is in powers of two,
    with plain numbers on its ticks.
    """
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    if not points:
        raise ValueError("labelled_scatter needs at least one point")
    for label, (x, y) in points.items():
        if (log_x and x <= 0) or (log_y and y <= 0):
            raise ValueError(f"point {label!r} = ({x}, {y}) cannot go on a log axis; leave it out or use a linear axis")
    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    colors = {label: ax.scatter([x], [y], s=36, zorder=3).get_facecolor()[0] for label, (x, y) in points.items()}
    if log_x:
        ax.set_xscale("log", base=2)
        xs = [x for x, _ in points.values()]
        ticks = [t for t in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32) if min(xs) / 1.5 <= t <= max(xs) * 1.5]
        ax.set_xticks(ticks)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
    if log_y:
        ax.set_yscale("log")
    ax.grid(True, which="major", alpha=0.3)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.canvas.draw()
    placed = []
    offsets = [(dx, dy) for dy in (4, -12, 16, -24, 28, -36) for dx in (8, -8)]
    for label, (x, y) in sorted(points.items(), key=lambda item: (-item[1][1], item[1][0])):
        for dx, dy in offsets + [offsets[0]]:  # the first free place, else the first place
            text = ax.annotate(label, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=8,
                               ha="left" if dx > 0 else "right", color=colors[label],
                               arrowprops={"arrowstyle": "-", "color": colors[label], "linewidth": 0.6, "shrinkB": 3})
            box = text.get_window_extent(fig.canvas.get_renderer())
            if not any(box.overlaps(other) for other in placed):
                break
            text.remove()
        placed.append(box)
    plt.show()


def per_layer_errors(errors: dict[str, list[float]], difference: tuple[str, str], title: str):
    """Left: each scheme's relative error per layer, as grouped bars (in %). Right: how much the second scheme of
    ``difference`` adds to the first's error in each layer, in % of the first's error, each bar labelled."""
    if not errors:
        raise ValueError("per_layer_errors needs at least one scheme's errors")
    layers = {len(values) for values in errors.values()}
    if len(layers) != 1 or 0 in layers:
        raise ValueError(f"every scheme needs one error per layer, the same number for all; got lengths {sorted(layers)}")
    base, other = difference
    for name in difference:
        if name not in errors:
            raise ValueError(f"difference names {name!r}, which is not in errors ({', '.join(errors)})")
    n_layers = layers.pop()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / len(errors)
    for i, (name, values) in enumerate(errors.items()):
        xs = [layer + (i - (len(errors) - 1) / 2) * width for layer in range(n_layers)]
        left.bar(xs, [100 * v for v in values], width=width, label=name)
    left.set_xticks(range(n_layers))
    left.set_xlabel("decoder layer")
    left.set_ylabel("relative weight error (%)")
    left.legend(frameon=False, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    added = [100 * (o / b - 1) for o, b in zip(errors[other], errors[base])]
    bars = right.bar(range(n_layers), added, color="tab:gray")
    for bar, value in zip(bars, added):
        right.annotate(f"{value:+.2f}%", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                       va="bottom" if value >= 0 else "top", fontsize=8)
    right.axhline(0, color="black", linewidth=0.8)
    right.margins(y=0.15)
    right.set_xticks(range(n_layers))
    right.set_xlabel("decoder layer")
    right.set_ylabel(f"error added, % of {base}'s")
    right.set_title(f"{other} vs {base}", fontsize=10)
    for ax in (left, right):
        ax.spines[["top", "right"]].set_visible(False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    plt.show()


def llm_int8_decomposition(feature_max_before, feature_max_after, threshold: float, float_columns: list[int],
                           tokens: int, out_features: int, float_dtype: str, title: str):
    """LLM.int8's mixed-precision decomposition of one layer's input, in two panels.

    Left: each input feature's largest |x| before and after a feature was planted, with the threshold as a line.
    Right: the product ``X @ W.T`` split by feature: the ``float_columns`` of X (and the matching rows of W.T)
    multiplied in ``float_dtype``, every other column in int8; the two results are added. Shapes are printed on
    the blocks (not drawn to scale).
    """
    from matplotlib.patches import Rectangle

    before, after = [float(v) for v in feature_max_before], [float(v) for v in feature_max_after]
    if not before or len(before) != len(after):
        raise ValueError("feature_max_before and feature_max_after need one value per feature, the same number")
    features = len(after)
    if not float_columns or any(not 0 <= c < features for c in float_columns):
        raise ValueError(f"float_columns must name at least one of the {features} features")
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [1, 1.25]})
    left.plot(range(features), before, color="#9aa9bd", linewidth=0.8, label="as trained")
    left.plot(range(features), after, color="#4c72b0", linewidth=0.8, alpha=0.8, label="planted")
    left.axhline(threshold, color="crimson", linestyle="--", linewidth=1, label=f"threshold {threshold:g}")
    for column in float_columns:
        left.annotate(f"feature {column}: {after[column]:.0f}", (column, after[column]), xytext=(6, -4),
                      textcoords="offset points", fontsize=8, color="#c44e52")
    left.set_xlabel("input feature")
    left.set_ylabel("largest |x| over the tokens")
    left.legend(frameon=False, fontsize=8, loc="center right")
    left.spines[["top", "right"]].set_visible(False)
    n = len(float_columns)
    picked = f"{float_columns[0]}{', ...' if n > 1 else ''}"
    blocks = [  # (x, y, width, height, colour, label inside, label beside)
        (0.0, 1.8, 2.2, 1.2, "#4c72b0", f"X, other columns\n{tokens} x {features - n}", ""),
        (2.8, 1.8, 1.6, 1.2, "#4c72b0", f"W.T, other rows\n{features - n} x {out_features}", ""),
        (0.0, 0.2, 0.25, 1.2, "#c44e52", "", f"X[:, {picked}]\n{tokens} x {n}"),
        (2.8, 0.9, 1.6, 0.25, "#c44e52", "", f"W.T[{picked}]\n{n} x {out_features}"),
        (5.3, 0.9, 1.6, 1.2, "#55a868", f"Y\n{tokens} x {out_features}", ""),
    ]
    for x, y, width, height, colour, inside, beside in blocks:
        right.add_patch(Rectangle((x, y), width, height, color=colour, alpha=0.8))
        if inside:
            right.text(x + width / 2, y + height / 2, inside, ha="center", va="center", fontsize=8, color="white")
        else:
            right.text(x + width + 0.1, y + height / 2, beside, ha="left", va="center", fontsize=8, color=colour)
    for x, y, symbol in ((2.5, 2.4, "@"), (2.5, 0.8, "@"), (1.1, 1.6, "+"), (4.85, 1.5, "=")):
        right.text(x, y, symbol, ha="center", va="center", fontsize=13)
    right.text(4.5, 2.4, "int8 x int8:\nexact integer sums,\nthen rescaled", fontsize=7.5, va="center")
    right.text(4.5, 0.45, f"in {float_dtype}, with W's\ncolumns dequantized", fontsize=7.5, va="center",
               color="#c44e52")
    right.set_xlim(-0.1, 7.0)
    right.set_ylim(0, 3.1)
    right.axis("off")
    right.set_title("the decomposition (shapes, not to scale)", fontsize=10)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    plt.show()


def quantization_number_lines(rows: dict[str, tuple], title: str, xlabel: str):
    """One number line per scheme: its quantization levels as ticks, the values as dots, each dot joined to the
    level it rounds to. ``rows`` maps a label to ``(levels, values, rounded)``, 1-D sequences of floats (``values``
    and ``rounded`` of equal length). Levels outside the values' range are drawn faded: codes the data never uses.
    """
    if not rows:
        raise ValueError("quantization_number_lines needs at least one scheme, e.g. {'absmax': (levels, x, x_hat)}")
    prepared = {}
    for label, (levels, values, rounded) in rows.items():
        levels, values, rounded = ([float(v) for v in seq] for seq in (levels, values, rounded))
        if not levels or not values or len(values) != len(rounded):
            raise ValueError(f"{label}: need levels, and one rounded value per value")
        prepared[label] = (levels, values, rounded)
    low = min(min(v) for _, v, _ in prepared.values())
    high = max(max(v) for _, v, _ in prepared.values())
    fig, axes = plt.subplots(len(prepared), 1, figsize=(8, 1.5 * len(prepared)), sharex=True, squeeze=False)
    for ax, (label, (levels, values, rounded)) in zip(axes[:, 0], prepared.items()):
        ax.axhline(0, color="#555555", linewidth=0.8)
        for level in levels:
            used = low - 1e-9 <= level <= high + 1e-9
            ax.vlines(level, -0.35, 0.35, color="crimson" if used else "#e8a3a8", linewidth=2 if used else 1.2)
        for value, target in zip(values, rounded):
            ax.annotate("", xy=(target, 0.05), xytext=(value, 0.75),
                        arrowprops={"arrowstyle": "->", "color": "#4c72b0", "linewidth": 0.8})
        ax.plot(values, [0.75] * len(values), "o", color="#4c72b0", markersize=4)
        ax.set_ylim(-0.6, 1.1)
        ax.set_yticks([])
        ax.set_title(label, fontsize=9, loc="left")
        ax.spines[["top", "right", "left"]].set_visible(False)
    for ax in axes[:-1, 0]:
        ax.spines["bottom"].set_visible(False)
        ax.tick_params(axis="x", length=0)
    axes[-1, 0].set_xlabel(xlabel)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    plt.show()


def error_heatmaps(panels: dict[str, object], title: str, colorbar_label: str, mark: tuple[int, int] | None = None):
    """One heat map per panel (2-D arrays of the same shape, e.g. |W - W_hat|), on one shared colour scale, stacked
    vertically, with one colour bar. ``mark`` circles one (row, column) in every panel (e.g. a planted outlier)."""
    import numpy as np

    if not panels:
        raise ValueError("error_heatmaps needs at least one panel")
    arrays = {label: np.asarray(values, dtype=np.float64) for label, values in panels.items()}
    shapes = {a.shape for a in arrays.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"every panel must be a 2-D array of one shape, got {sorted(shapes)}")
    rows, columns = next(iter(shapes))
    top = max(float(a.max()) for a in arrays.values()) or 1.0
    fig, axes = plt.subplots(len(arrays), 1, figsize=(8, 1.1 + 1.45 * len(arrays)), squeeze=False,
                             layout="constrained")
    for ax, (label, values) in zip(axes[:, 0], arrays.items()):
        image = ax.imshow(values, cmap="magma", vmin=0, vmax=top, aspect="auto", interpolation="nearest")
        if mark is not None:
            ax.plot(mark[1], mark[0], "o", markersize=9, markerfacecolor="none", markeredgecolor="#3fbf3f")
        ax.set_title(label, fontsize=9, loc="left")
        ax.set_ylabel("row")
    axes[-1, 0].set_xlabel(f"column (of {columns})")
    fig.colorbar(image, ax=axes[:, 0].tolist(), label=colorbar_label, shrink=0.9)
    fig.suptitle(title, fontsize=11)
    plt.show()
def lora_update_shapes(out_features: int, in_features: int, r: int, scaling: float, title: str):
    """``W + scaling · B @ A`` drawn to scale: one box per matrix, ``W`` ``(out, in)``, ``B`` ``(out, r)`` and
    ``A`` ``(r, in)``, each labelled with its shape and its number of values (rows down, columns across, as
    PyTorch stores a Linear's weight)."""
    from matplotlib.patches import Rectangle

    for name, value in (("out_features", out_features), ("in_features", in_features), ("r", r)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if r > min(out_features, in_features):
        raise ValueError(f"r = {r} is larger than the layer allows ({out_features} x {in_features})")
    gap = 0.25 * max(out_features, in_features)
    boxes = {  # name: (left, width, height, label)
        "W": (0.0, in_features, out_features, f"W\n{out_features:,} x {in_features:,}\n{out_features * in_features:,} values"),
        "B": (in_features + 2 * gap, r, out_features, f"B = lora_B\n{out_features:,} x {r}\n{out_features * r:,} values"),
        "A": (in_features + 3 * gap + r, in_features, r, f"A = lora_A\n{r} x {in_features:,}\n{r * in_features:,} values"),
    }
    fig, ax = plt.subplots(figsize=(9, 3.6))
    for name, (left, width, height, label) in boxes.items():
        ax.add_patch(Rectangle((left, -height), width, height, facecolor="tab:blue" if name == "W" else "tab:orange",
                               alpha=0.35, edgecolor="black", linewidth=1, label=name))
        ax.text(left + width / 2, -height - 0.05 * out_features, label, ha="center", va="top", fontsize=8)
    ax.text(in_features + gap, -out_features / 2, f"+  {scaling:g} x", ha="center", va="center", fontsize=12)
    ax.text(in_features + 2.5 * gap + r, -r / 2, "@", ha="center", va="center", fontsize=12)
    ax.set_xlim(-0.05 * gap, in_features + 3.05 * gap + r + in_features)
    ax.set_ylim(-1.5 * out_features, 0.02 * out_features)
    ax.set_aspect("equal")
    ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    plt.show()
