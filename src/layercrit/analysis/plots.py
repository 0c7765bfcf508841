"""Figures of the analysis tables, sized and lettered to stay readable at paper size.

Each function returns a :class:`matplotlib.figure.Figure` built without pyplot, so nothing depends on (or changes)
the interactive backend and figures are freed with their last reference; :func:`save` writes PNG and PDF.
Axes carry labels (``heatmap``, ``categories``, ...) so callers and tests can find them in ``fig.axes``.

Every text is at least :data:`MIN_FONT` points at the figure's own size, so a figure printed at its width (a
heatmap made with ``width=FULL_WIDTH`` fills a two-column page, ``width=COLUMN_WIDTH`` one column) keeps every
label legible. Categories have one colour in every figure (:func:`category_colors`).
"""

from __future__ import annotations

import functools
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex, to_rgba
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.patches import Patch, Rectangle
from matplotlib.textpath import TextToPath
from matplotlib.ticker import FormatStrFormatter
from matplotlib.transforms import Bbox

CELL_IN = 0.14  # heatmap cell edge in inches when no width is given: fits a 6.5 pt label per row/column
FULL_WIDTH = 7.0  # inches: a figure across a two-column page
COLUMN_WIDTH = 3.3  # inches: a figure in one column
MIN_FONT = 6.0  # points: the smallest text in any figure
SMALL = 6.5
NORMAL = 7.5
LINE = 1.3  # label pitch / font size: neighbouring labels closer than this touch
# The notebook's colours for the paper's categories (tab10 in its order), the same in every figure; other
# categories take the remaining tab10 colours in name order.
CATEGORY_COLORS = {"baseline": "black", "adversarial_training": "C0", "augmentation": "C1", "contrastive": "C2",
                   "training_recipes": "C3", "freezing": "C4", "other": "0.6"}
_NORM_UNITS = {"Linf": (255.0, "ε (L∞, in 1/255)")}  # L∞ budgets read as multiples of one grey level


def category_colors(categories: Sequence[str]) -> dict[str, Any]:
    """One colour per category, in order of first appearance: the fixed :data:`CATEGORY_COLORS` for known
    categories (baseline black, other grey), the unused tab10 colours for the rest in name order; so a category's
    colour does not depend on the order the categories come in."""
    names = list(dict.fromkeys(categories))
    fixed = {to_hex(_tab10(c)) for c in CATEGORY_COLORS.values()}
    spare = iter(c for c in matplotlib.colormaps["tab10"].colors if to_hex(c) not in fixed)
    unknown = {name: next(spare, "0.3") for name in sorted(n for n in names if n not in CATEGORY_COLORS)}
    return {name: CATEGORY_COLORS.get(name, unknown.get(name)) for name in names}


def _tab10(color: str) -> Any:
    return matplotlib.colormaps["tab10"].colors[int(color[1:])] if color.startswith("C") else color


def heatmap(
    matrix: pd.DataFrame,
    *,
    categories: Sequence[str] | None = None,
    label: str = "Layer criticality [%]",
    cmap: str = "viridis_r",
    vmin: float | None = 0.0,
    vmax: float | None = 100.0,
    margins: bool = True,
    uncertain: pd.DataFrame | None = None,
    width: float | None = None,
) -> Figure:
    """Rows × columns of ``matrix`` as coloured cells, the paper's main figure.

    Args:
        matrix: values with row labels (models) as index and column labels (layers, network order) as columns;
            NaN cells (a layer a model lacks) are left grey.
        categories: one category per row; draws a coloured band per run of equal categories left of the rows.
        label: colour bar label. cmap, vmin, vmax: colour scale (``None`` = the data's extreme).
        margins: per-row (right) and per-column (bottom) mean ± std of the values (population std), in grey;
            the caption should say so.
        uncertain: booleans shaped like ``matrix``; a dot marks each True cell (e.g. an interval wider than a
            threshold, which the caption should state).
        width: the figure's width in inches (e.g. :data:`FULL_WIDTH`, :data:`COLUMN_WIDTH`); the cells share
            what the labels leave, and when columns are too narrow for one label each, every k-th column (and its
            bottom margin) is labelled. Row labels too long for the width are shortened with "…". Default: cells
            of :data:`CELL_IN` and every label, the figure as large as that makes it.

    Returns:
        The figure; axes labelled ``heatmap`` (and ``categories`` when given).
    """
    values = matrix.to_numpy(dtype=float)
    n_rows, n_cols = values.shape
    rows = [str(r) for r in matrix.index]
    columns = [str(c) for c in matrix.columns]
    band = 0.3 if categories is not None else 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN row or column is shown as "–"
        row_margins = [_mean_std(m, s) for m, s in zip(np.nanmean(values, 1), np.nanstd(values, 1), strict=True)]
        col_margins = [_mean_std(m, s) for m, s in zip(np.nanmean(values, 0), np.nanstd(values, 0), strict=True)]
    right = (_text_width(row_margins, MIN_FONT) + MIN_FONT * LINE + 6) if margins else 0.0  # points
    beside = (8 + 6 + _text_width(["100"], SMALL) + NORMAL * LINE + 6) / 72  # colour bar, ticks, label: inches
    if width is None:
        size = (CELL_IN * n_cols + band + beside + 2.4, CELL_IN * n_rows + 2.6)
        cells_in = CELL_IN * n_cols
    else:
        fixed = (band + beside) * 72 + right + 12  # points
        limit = max(0.55 * (width * 72 - fixed), 24.0)
        if categories is not None and _text_width(rows, SMALL) > limit:
            rows = short_labels(rows, list(categories))
        rows = _shorten(rows, limit, SMALL)
        cells_in = max((width * 72 - fixed - _text_width(rows, SMALL) - 6) / 72, 0.3 * width)
        header = _text_width(columns, SMALL) + (_text_width(col_margins, MIN_FONT) if margins else 0)
        size = (width, n_rows * SMALL * LINE / 72 + (header + 30) / 72 + (0.6 if categories is not None else 0.1))
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(1, 3, width_ratios=[band or 1e-6, cells_in, beside], wspace=0.0)
    ax = fig.add_subplot(grid[1])
    holder = fig.add_subplot(grid[2])
    holder.set_axis_off()
    if categories is not None:
        bands = fig.add_subplot(grid[0], sharey=ax)
    else:
        fig.add_subplot(grid[0]).set_axis_off()
    ax.set_label("heatmap")
    finite = values[np.isfinite(values)]
    mesh = ax.pcolormesh(np.ma.masked_invalid(values), cmap=cmap,
                         vmin=vmin if vmin is not None else (finite.min() if finite.size else 0.0),
                         vmax=vmax if vmax is not None else (finite.max() if finite.size else 1.0))
    ax.set_facecolor("0.85")
    ax.set_xlim(0, n_cols)
    ax.set_ylim(n_rows, 0)
    ax.set_yticks(np.arange(n_rows) + 0.5, rows, fontsize=SMALL)
    ax.tick_params(axis="x", top=True, labeltop=True, bottom=False, labelbottom=False, length=0)
    ax.tick_params(axis="y", length=0)
    if uncertain is not None:
        marked_rows, marked_cols = np.nonzero(uncertain.to_numpy(dtype=bool))
        ax.scatter(marked_cols + 0.5, marked_rows + 0.5, s=3, c="white", edgecolors="black", linewidths=0.3,
                   label="uncertain")
    if categories is not None:
        ax.tick_params(axis="y", labelleft=False)
        bands.tick_params(axis="y", labelleft=True, length=0, labelsize=SMALL)
        _category_bands(fig, bands, list(categories), size[0])
    bar = holder.inset_axes([8 / (beside * 72), 0.2, 6 / (beside * 72), 0.6])
    colorbar = fig.colorbar(mesh, cax=bar)
    colorbar.set_label(label, fontsize=NORMAL)
    colorbar.ax.tick_params(labelsize=SMALL)
    if margins:
        _row_margin(ax, row_margins)
    step = 1
    while True:  # label every step-th column: as many as fit once the layout has sized the cells
        shown = np.arange(0, n_cols, step)
        ax.set_xticks(shown + 0.5, [columns[i] for i in shown], rotation=90, fontsize=SMALL)
        bottom = _column_margin(ax, shown, [col_margins[i] for i in shown]) if margins else None
        fig.draw_without_rendering()
        pitch = ax.get_position().width * fig.get_figwidth() * 72 / n_cols  # points per column
        needed = math.ceil(SMALL * LINE / pitch)
        if width is None or needed <= step:
            break
        step = needed
        if bottom is not None:
            bottom.remove()
    return fig


def _column_margin(ax, shown: np.ndarray, texts: list[str]):
    bottom = ax.secondary_xaxis("bottom")
    bottom.set_xticks(shown + 0.5, texts, rotation=90)
    bottom.set_label("column margin")
    bottom.tick_params(axis="x", length=0, labelsize=MIN_FONT, labelcolor="0.35")
    return bottom


def _row_margin(ax, texts: list[str]) -> None:
    right = ax.secondary_yaxis("right")
    right.set_yticks(np.arange(len(texts)) + 0.5, texts)
    right.set_label("row margin")
    right.tick_params(axis="y", length=0, labelsize=MIN_FONT, labelcolor="0.35")


def _mean_std(mean: float, std: float) -> str:
    return "–" if np.isnan(mean) else f"{mean:.0f}±{std:.0f}"


def _text_width(texts: Sequence[str], size: float) -> float:
    """The widest of ``texts`` in points at font ``size`` (matplotlib's default font, measured from its glyph
    advances, not guessed: at most about a point wider than the ink)."""
    return max((_one_text_width(t, size) for t in texts if t), default=0.0)


@functools.lru_cache(maxsize=8192)
def _one_text_width(text: str, size: float) -> float:
    width, _, _ = _TEXT_TO_PATH.get_text_width_height_descent(text, FontProperties(size=size), ismath=False)
    return float(width)


_TEXT_TO_PATH = TextToPath()


_TAIL = re.compile(r"(?: \(seed \d+\))?(?: \[[^\]]*\])?$")  # a row label's training seed and accuracy


def _name_and_tail(text: str) -> tuple[str, str]:
    """``Baseline (SGD) (seed 1) [92.40%]`` -> (``Baseline (SGD)``, `` (seed 1) [92.40%]``)."""
    start = _TAIL.search(text).start()
    return text[:start], text[start:]


def _shorten(texts: list[str], limit: float, size: float) -> list[str]:
    """Each text cut to at most ``limit`` points at ``size``: its name ends in "…" where cut, its training seed and
    accuracy stay."""
    out = []
    for text in texts:
        name, tail = _name_and_tail(text)
        cut = name
        while len(cut) > 1 and _text_width([(cut if cut == name else cut + "…") + tail], size) > limit:
            cut = cut[:-1].rstrip()
        out.append(text if cut == name else cut + "…" + tail)
    return out


def _category_bands(fig: Figure, ax, categories: list[str], width: float) -> None:
    """One rectangle per run of equal categories, named inside when it is tall enough, plus a legend."""
    ax.set_label("categories")
    ax.set_xlim(0, 1)
    ax.set_xticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    colors = category_colors(categories)
    start = 0
    for end in range(1, len(categories) + 1):
        if end < len(categories) and categories[end] == categories[start]:
            continue
        name = categories[start]
        ax.add_patch(Rectangle((0, start), 1, end - start, facecolor=to_rgba(colors[name], 0.75), edgecolor="white",
                               linewidth=0.8, label=name))
        if end - start >= 3:
            ax.text(0.5, (start + end) / 2, name.replace("_", " "), rotation=90, ha="center", va="center",
                    fontsize=MIN_FONT, color="white" if _dark(colors[name]) else "black", clip_on=True)
        start = end
    handles = [Patch(facecolor=to_rgba(c, 0.75), label=n.replace("_", " ")) for n, c in colors.items()]
    entry = _text_width([h.get_label() for h in handles], SMALL) + 3.5 * SMALL  # text, handle and spacing
    fig.legend(handles=handles, loc="outside lower center", ncols=max(1, min(len(handles), int(width * 72 // entry))),
               fontsize=SMALL, frameon=False, title="Category", title_fontsize=SMALL)


def _dark(color: Any) -> bool:
    r, g, b, _ = to_rgba(color)
    return 0.299 * r + 0.587 * g + 0.114 * b < 0.5


def short_labels(displays: Sequence[str], categories: Sequence[str]) -> list[str]:
    """Point labels: each display name without the words every model of its category shares, when the category
    has several models (``PGD Adversarial Training (L2, ε=3)`` → ``L2, ε=3`` among the adversarial models); the
    training seeds of one model are not several models (their names stay)."""
    displays, categories = [str(d) for d in displays], list(categories)
    names = [_name_and_tail(d)[0] for d in displays]
    shortened = list(displays)
    for category in dict.fromkeys(categories):
        members = [i for i, c in enumerate(categories) if c == category]
        if len({names[i] for i in members}) < 2:
            continue
        common = _common_prefix([names[i] for i in members])
        for i in members:
            rest = displays[i][len(common):]
            if common.endswith("(") and ")" in rest and "(" not in rest.split(")")[0]:
                rest = rest.replace(")", "", 1)  # the parenthesis the common part opened
            shortened[i] = rest.strip() or displays[i]
    return shortened


def _common_prefix(texts: list[str]) -> str:
    """The longest prefix of every text that ends at a space or an opening parenthesis."""
    prefix = texts[0]
    for text in texts[1:]:
        while not text.startswith(prefix):
            prefix = prefix[:-1]
    cut = max(prefix.rfind(" "), prefix.rfind("("))
    prefix = prefix[:cut + 1] if cut >= 0 else ""
    opened = []  # a parenthesis the prefix leaves open: cut right after it, so the rest keeps its words
    for i, char in enumerate(prefix):
        if char == "(":
            opened.append(i)
        elif char == ")" and opened:
            opened.pop()
    return prefix[:opened[0] + 1] if opened else prefix


def accuracy_scatter(
    models: pd.DataFrame,
    *,
    correlation: Mapping[str, Any] | None = None,
    xlabel: str = "Avg. layer criticality [%]",
    ylabel: str = "Accuracy [%]",
    labels: bool = True,
) -> Figure:
    """Average criticality vs accuracy, one colour per category, each point labelled; the legend gives ρ and τ.

    Args:
        models: the model table (``avg_criticality_pct, accuracy, category``, and ``display`` for the labels); models
            without accuracy are left out.
        correlation: a row of the correlations table (``n, spearman_rho, spearman_p, kendall_tau, kendall_p``).
        labels: name each point (:func:`short_labels` of ``display``), placed where it overlaps least.
    """
    fig = Figure(figsize=(FULL_WIDTH, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(label="scatter")
    colors = category_colors(list(models["category"]))
    shown = models[models["accuracy"].notna()]
    for category, group in shown.groupby("category", sort=False):
        ax.scatter(group["avg_criticality_pct"], group["accuracy"], s=16, color=colors[category], edgecolor="white",
                   linewidth=0.4, label=category.replace("_", " "), zorder=3)
    ax.set_xlabel(xlabel, fontsize=NORMAL)
    ax.set_ylabel(ylabel, fontsize=NORMAL)
    ax.tick_params(labelsize=SMALL)
    ax.grid(alpha=0.3, linewidth=0.5)
    fig.legend(loc="outside right upper", fontsize=SMALL, title=_correlation_text(correlation),
               title_fontsize=SMALL, frameon=False)
    if labels and len(shown):
        names = short_labels(shown.get("display", shown.get("model_id")), list(shown["category"]))
        _label_points(fig, ax, shown["avg_criticality_pct"].to_numpy(float), shown["accuracy"].to_numpy(float), names,
                      [colors[c] for c in shown["category"]])
    return fig


def _label_points(fig: Figure, ax, x: np.ndarray, y: np.ndarray, names: list[str], colors: list[Any]) -> None:
    """Put each name beside its point where it overlaps least with the points and the names already placed:
    right, left, above or below it, then diagonally, then farther out with a thin leader line."""
    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    points = ax.transData.transform(np.column_stack([x, y]))
    taken = [Bbox.from_bounds(px - 2.5, py - 2.5, 5, 5) for px, py in points]
    sides = [(1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (-1, 1), (1, -1), (-1, -1)]
    places = [(dx * reach, dy * reach) for reach in (4, 12) for dx, dy in sides]
    for name, color, xi, yi in zip(names, colors, x, y, strict=True):
        best = None
        for offset in places:
            options = {"xytext": offset, "textcoords": "offset points", "fontsize": MIN_FONT, "color": color,
                       "ha": {1: "left", 0: "center", -1: "right"}[int(np.sign(offset[0]))],
                       "va": {1: "bottom", 0: "center", -1: "top"}[int(np.sign(offset[1]))]}
            if max(map(abs, offset)) > 4:
                options["arrowprops"] = {"arrowstyle": "-", "color": color, "linewidth": 0.4, "shrinkA": 0,
                                         "shrinkB": 2}
            text = ax.annotate(name, (xi, yi), **options)
            box = text.get_window_extent(renderer)
            text.remove()
            overlap = sum(_overlap(box, other) for other in taken) + _outside(box, ax.bbox)
            if best is None or overlap < best[0]:
                best = (overlap, options, box)
            if overlap == 0:
                break
        _, options, box = best
        ax.annotate(name, (xi, yi), label="point label", **options)
        taken.append(box)


def _overlap(a, b) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


def _outside(box, frame) -> float:
    """Area of ``box`` outside ``frame``."""
    return box.width * box.height - _overlap(box, frame)


def _correlation_text(row: Mapping[str, Any] | None) -> str:
    if not row:
        return "too few models for a correlation"
    return (f"n = {row['n']}\nSpearman ρ = {row['spearman_rho']:.2f} (p = {row['spearman_p']:.2g})\n"
            f"Kendall τ = {row['kendall_tau']:.2f} (p = {row['kendall_p']:.2g})")


def budget_plot(models: pd.DataFrame, *, ylabel: str = "Avg. layer criticality [%]") -> Figure:
    """Average criticality vs training budget (e.g. adversarial ε), one panel per norm, each with its own ε axis.

    L∞ budgets are shown in units of 1/255. A model trained with budget 0 is the common origin of every norm and
    appears in each panel. Points take their category's colour and are joined in order of ε; an axis whose
    budgets span more than a decade is symmetric-logarithmic (linear below the smallest non-zero ε), so small
    budgets are not squashed together. Panels are axes labelled ``budget NORM``.
    """
    shown = models[models["budget"].notna()].assign(norm=lambda m: m["norm"].fillna("unspecified norm"))
    zero = shown[shown["budget"] == 0]
    norms = sorted(set(shown.loc[shown["budget"] != 0, "norm"])) or sorted(set(shown["norm"]))
    fig = Figure(figsize=(min(FULL_WIDTH, 3.0 * len(norms) + 0.6), 2.5), layout="constrained")
    axes = fig.subplots(1, len(norms), sharey=True, squeeze=False)[0]
    colors = category_colors(list(models["category"]))
    for ax, norm in zip(axes, norms, strict=True):
        ax.set_label(f"budget {norm}")
        factor, xlabel = _NORM_UNITS.get(norm, (1.0, f"ε ({norm})"))
        group = pd.concat([zero[zero["norm"] != norm], shown[shown["norm"] == norm]]).sort_values("budget")
        eps = group["budget"].to_numpy(float) * factor
        ax.plot(eps, group["avg_criticality_pct"], color="0.6", linewidth=0.8, zorder=1, label=norm)
        ax.scatter(eps, group["avg_criticality_pct"], s=18, c=[colors[c] for c in group["category"]], edgecolor="white",
                   linewidth=0.4, zorder=2)
        positive = eps[eps > 0]
        if len(positive) and positive.max() > 10 * positive.min():
            ax.set_xscale("symlog", linthresh=float(positive.min()), linscale=0.5)
            ax.set_xticks(sorted(set(eps)), [f"{e:g}" for e in sorted(set(eps))], rotation=90)
        ax.set_xlabel(xlabel, fontsize=NORMAL)
        ax.set_title(norm.replace("Linf", "L∞"), fontsize=NORMAL)
        ax.tick_params(labelsize=SMALL)
        ax.grid(alpha=0.3, linewidth=0.5)
    axes[0].set_ylabel(ylabel, fontsize=NORMAL)
    return fig


def profile_plot(profile: pd.DataFrame, *, ylabel: str = "Layer criticality [%]") -> Figure:
    """Criticality over relative depth, one line (mean) and band (± std over models) per category.

    Args:
        profile: the table of :func:`layercrit.analysis.tables.depth_profile`.
    """
    fig = Figure(figsize=(4.6, 2.6), layout="constrained")
    ax = fig.add_subplot(label="profile")
    colors = category_colors(list(profile["category"]))
    for category, group in profile.groupby("category", sort=False):
        x, mean, std = group["relative_depth"], group["criticality_pct"], group["criticality_std_pct"]
        ax.plot(x, mean, color=colors[category], linewidth=1.2,
                label=f"{category.replace('_', ' ')} ({group['models'].iloc[0]})")
        ax.fill_between(x, mean - std, mean + std, color=colors[category], alpha=0.15, linewidth=0)
    ax.set_xlim(0, 1)
    ax.set_xlabel("Relative depth (0 = first layer, 1 = last)", fontsize=NORMAL)
    ax.set_ylabel(ylabel, fontsize=NORMAL)
    ax.tick_params(labelsize=SMALL)
    ax.grid(alpha=0.3, linewidth=0.5)
    fig.legend(loc="outside right upper", fontsize=SMALL, title="Category (models)", title_fontsize=SMALL,
               frameon=False)
    return fig


def save(fig: Figure, stem: str | Path, *, dpi: int = 200, pdf: bool = True) -> tuple[Path, ...]:
    """Write ``STEM.png`` and, with ``pdf``, ``STEM.pdf`` (fonts embedded as TrueType so the PDF text stays
    editable); the paths, PNG first."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    png, vector = stem.parent / f"{stem.name}.png", stem.parent / f"{stem.name}.pdf"
    with matplotlib.rc_context({"pdf.fonttype": 42}):
        fig.savefig(png, dpi=dpi)
        if pdf:
            fig.savefig(vector)
    return (png, vector) if pdf else (png,)


COMPONENT_COLORS = {"method": "tab:red", "seed": "tab:orange", "reset": "tab:blue", "image": "tab:gray"}


def variance_plot(components: pd.DataFrame) -> Figure:
    """The SD of each variance component (method, seed within method, reset, image) per stage and for the mean over
    all layers and the depth shift (bars) and per layer (lines), with their 95% intervals (``variance_components``'s),
    on a log scale; an estimate of 0 (a moment estimate clipped there) sits on the axis floor, half the smallest
    positive value, as a hollow triangle.

    Args:
        components: the table of :func:`layercrit.analysis.variance.variance_components`.
    """
    fig = Figure(figsize=(7.0, 2.8), layout="constrained")
    stages_ax, layers_ax = fig.subplots(1, 2, width_ratios=[1, 2])
    stages = components[components["level"].isin(["stage", "aggregate"])]
    layers = components[components["level"] == "layer"]
    names = list(dict.fromkeys(stages["unit"]))
    aggregates = int((stages.drop_duplicates("unit")["level"] == "aggregate").sum())
    shown = components[["sd_pct", "sd_low_pct", "sd_high_pct"]].to_numpy(float)
    positive = shown[np.isfinite(shown) & (shown > 0)]
    floor = 0.5 * positive.min() if len(positive) else 0.1
    width = 0.8 / len(COMPONENT_COLORS)
    for k, (component, color) in enumerate(COMPONENT_COLORS.items()):
        rows = stages[stages["component"] == component].set_index("unit").reindex(names)
        x = np.arange(len(names)) + (k - 1.5) * width
        error = np.vstack([rows["sd_pct"] - rows["sd_low_pct"], rows["sd_high_pct"] - rows["sd_pct"]])
        stages_ax.bar(x, rows["sd_pct"], width, color=color, label=component,
                      yerr=np.where(np.isfinite(error), np.clip(error, 0, None), 0), error_kw={"linewidth": 0.6})
        _mark_zeros(stages_ax, x, rows["sd_pct"].to_numpy(float), floor, color)  # a 0 bar does not show on a log scale
        line = layers[layers["component"] == component]
        position = np.arange(len(line))
        sd = line["sd_pct"].to_numpy(float)
        layers_ax.plot(position, np.where(sd > 0, sd, floor), color=color, linewidth=1.2, marker="o", markersize=2)
        _mark_zeros(layers_ax, position, sd, floor, color)
        layers_ax.fill_between(position, np.clip(line["sd_low_pct"], floor, None), line["sd_high_pct"], color=color,
                               alpha=0.15, linewidth=0)
    stages_ax.set_xticks(np.arange(len(names)), names, fontsize=SMALL, rotation=45, ha="right",
                         rotation_mode="anchor")
    if 0 < aggregates < len(names):  # the stages, then the aggregates of all layers
        stages_ax.axvline(len(names) - aggregates - 0.5, color="black", linewidth=0.6, linestyle="--")
    layer_names = list(dict.fromkeys(layers["unit"]))
    layers_ax.set_xticks(np.arange(len(layer_names)), [n.removeprefix("model.") for n in layer_names], fontsize=4,
                         rotation=90)
    for ax, title in ((stages_ax, "per stage, and overall" if aggregates else "per stage"), (layers_ax, "per layer")):
        ax.set_yscale("log")
        ax.set_ylim(bottom=floor)
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(FormatStrFormatter(""))
        ax.set_title(title, fontsize=NORMAL)
        ax.tick_params(axis="y", which="both", labelsize=SMALL)
        ax.grid(alpha=0.3, linewidth=0.5)
    stages_ax.set_ylabel("SD of criticality [points]", fontsize=NORMAL)
    fig.legend(*stages_ax.get_legend_handles_labels(), loc="outside right upper", fontsize=SMALL,
               title="Component", title_fontsize=SMALL, frameon=False)
    return fig


def _mark_zeros(ax: Any, x: np.ndarray, sd: np.ndarray, floor: float, color: str) -> None:
    """A hollow triangle on the axis floor at each ``x`` whose SD estimate is 0."""
    zero = sd == 0
    if zero.any():
        ax.plot(x[zero], np.full(zero.sum(), floor), linestyle="none", marker="v", markersize=4,
                markerfacecolor="white", markeredgecolor=color)
