"""Figures of the analysis tables, sized and lettered to stay readable at paper size.

Each function returns a :class:`matplotlib.figure.Figure` built without pyplot, so nothing depends on (or changes)
the interactive backend and figures are freed with their last reference; :func:`save` writes PNG and PDF.
Axes carry labels (``heatmap``, ``categories``, ...) so callers and tests can find them in ``fig.axes``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

CELL_IN = 0.14  # heatmap cell edge in inches: fits a 6.5 pt label per row/column
SMALL = 6.5
NORMAL = 7.5
_SPECIAL_COLORS = {"baseline": "black", "other": "0.6"}


def category_colors(categories: Sequence[str]) -> dict[str, Any]:
    """One colour per category, stable for a given order: baseline black, other grey, the rest tab10 in order."""
    palette = iter(matplotlib.colormaps["tab10"].colors)
    colors = {}
    for category in dict.fromkeys(categories):
        colors[category] = _SPECIAL_COLORS.get(category) or next(palette, "0.3")
    return colors


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
) -> Figure:
    """Rows × columns of ``matrix`` as coloured cells, the paper's main figure.

    Args:
        matrix: values with row labels (models) as index and column labels (layers, network order) as columns;
            NaN cells (a layer a model lacks) are left grey.
        categories: one category per row; draws a coloured band per run of equal categories left of the rows.
        label: colour bar label. cmap, vmin, vmax: colour scale (``None`` = the data's extreme).
        margins: per-row (right) and per-column (bottom) mean ± std of the values (population std).
        uncertain: booleans shaped like ``matrix``; a dot marks each True cell (e.g. an interval wider than a
            threshold, which the caption should state).

    Returns:
        The figure; axes labelled ``heatmap`` (and ``categories`` when given).
    """
    values = matrix.to_numpy(dtype=float)
    n_rows, n_cols = values.shape
    band = 0.3 if categories is not None else 0.0
    fig = Figure(figsize=(CELL_IN * n_cols + band + 3.6, CELL_IN * n_rows + 2.6), layout="constrained")
    if categories is not None:
        grid = fig.add_gridspec(1, 2, width_ratios=[band, CELL_IN * n_cols], wspace=0.0)
        ax = fig.add_subplot(grid[1])
        bands = fig.add_subplot(grid[0], sharey=ax)
    else:
        ax = fig.add_subplot()
    ax.set_label("heatmap")
    finite = values[np.isfinite(values)]
    mesh = ax.pcolormesh(np.ma.masked_invalid(values), cmap=cmap,
                         vmin=vmin if vmin is not None else (finite.min() if finite.size else 0.0),
                         vmax=vmax if vmax is not None else (finite.max() if finite.size else 1.0))
    ax.set_facecolor("0.85")
    ax.set_xlim(0, n_cols)
    ax.set_ylim(n_rows, 0)
    ax.set_xticks(np.arange(n_cols) + 0.5, [str(c) for c in matrix.columns], rotation=90, fontsize=SMALL)
    ax.set_yticks(np.arange(n_rows) + 0.5, [str(r) for r in matrix.index], fontsize=SMALL)
    ax.tick_params(axis="x", top=True, labeltop=True, bottom=False, labelbottom=False, length=0)
    ax.tick_params(axis="y", length=0)
    if margins:
        _margins(ax, values)
    if uncertain is not None:
        rows, cols = np.nonzero(uncertain.to_numpy(dtype=bool))
        ax.scatter(cols + 0.5, rows + 0.5, s=3, c="white", edgecolors="black", linewidths=0.3, label="uncertain")
    if categories is not None:
        ax.tick_params(axis="y", labelleft=False)
        bands.tick_params(axis="y", labelleft=True, length=0, labelsize=SMALL)
        _category_bands(fig, bands, list(categories))
    colorbar = fig.colorbar(mesh, ax=ax, fraction=0.04, pad=0.02, aspect=30)
    colorbar.set_label(label, fontsize=NORMAL)
    colorbar.ax.tick_params(labelsize=SMALL)
    return fig


def _margins(ax, values: np.ndarray) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN row or column is shown as "–"
        rows = [_mean_std(m, s) for m, s in zip(np.nanmean(values, 1), np.nanstd(values, 1), strict=True)]
        cols = [_mean_std(m, s) for m, s in zip(np.nanmean(values, 0), np.nanstd(values, 0), strict=True)]
    right = ax.secondary_yaxis("right")
    right.set_yticks(np.arange(values.shape[0]) + 0.5, rows)
    bottom = ax.secondary_xaxis("bottom")
    bottom.set_xticks(np.arange(values.shape[1]) + 0.5, cols, rotation=90)
    right.set_label("row margin")
    bottom.set_label("column margin")
    right.set_ylabel("mean ± std over columns", fontsize=SMALL, color="0.35")
    bottom.set_xlabel("mean ± std over rows", fontsize=SMALL, color="0.35")
    for axis, name in ((right, "y"), (bottom, "x")):
        axis.tick_params(axis=name, length=0, labelsize=SMALL - 1, labelcolor="0.35")


def _mean_std(mean: float, std: float) -> str:
    return "–" if np.isnan(mean) else f"{mean:.0f}±{std:.0f}"


def _category_bands(fig: Figure, ax, categories: list[str]) -> None:
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
                    fontsize=SMALL - 1, color="white" if _dark(colors[name]) else "black", clip_on=True)
        start = end
    handles = [Patch(facecolor=to_rgba(c, 0.75), label=n.replace("_", " ")) for n, c in colors.items()]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 5), fontsize=SMALL,
               frameon=False, title="Category", title_fontsize=SMALL)


def _dark(color: Any) -> bool:
    r, g, b, _ = to_rgba(color)
    return 0.299 * r + 0.587 * g + 0.114 * b < 0.5


def accuracy_scatter(
    models: pd.DataFrame,
    *,
    correlation: Mapping[str, Any] | None = None,
    xlabel: str = "Avg. layer criticality [%]",
    ylabel: str = "Accuracy [%]",
) -> Figure:
    """Average criticality vs accuracy, one colour per category; the legend title gives ρ and τ.

    Args:
        models: the model table (``avg_criticality, accuracy, category``); models without accuracy are left out.
        correlation: a row of the correlations table (``n, spearman_rho, spearman_p, kendall_tau, kendall_p``).
    """
    fig = Figure(figsize=(4.6, 2.8), layout="constrained")
    ax = fig.add_subplot(label="scatter")
    colors = category_colors(list(models["category"]))
    shown = models[models["accuracy"].notna()]
    for category, group in shown.groupby("category", sort=False):
        ax.scatter(group["avg_criticality"], group["accuracy"], s=16, color=colors[category], edgecolor="white",
                   linewidth=0.4, label=category.replace("_", " "))
    ax.set_xlabel(xlabel, fontsize=NORMAL)
    ax.set_ylabel(ylabel, fontsize=NORMAL)
    ax.tick_params(labelsize=SMALL)
    ax.grid(alpha=0.3, linewidth=0.5)
    fig.legend(loc="outside right upper", fontsize=SMALL, title=_correlation_text(correlation),
               title_fontsize=SMALL, frameon=False)
    return fig


def _correlation_text(row: Mapping[str, Any] | None) -> str:
    if not row:
        return "too few models for a correlation"
    return (f"n = {row['n']}\nSpearman ρ = {row['spearman_rho']:.2f} (p = {row['spearman_p']:.2g})\n"
            f"Kendall τ = {row['kendall_tau']:.2f} (p = {row['kendall_p']:.2g})")


def budget_plot(models: pd.DataFrame, *, ylabel: str = "Avg. layer criticality [%]") -> Figure:
    """Average criticality vs training budget (e.g. adversarial ε), one line per norm (models with a budget)."""
    fig = Figure(figsize=(3.6, 2.5), layout="constrained")
    ax = fig.add_subplot(label="budget")
    shown = models[models["budget"].notna()].assign(norm=lambda m: m["norm"].fillna("unspecified norm"))
    for norm, group in shown.groupby("norm", sort=True):
        group = group.sort_values("budget")
        ax.plot(group["budget"], group["avg_criticality"], marker="o", markersize=4, linewidth=1, label=norm)
    ax.set_xlabel("Training budget (ε)", fontsize=NORMAL)
    ax.set_ylabel(ylabel, fontsize=NORMAL)
    ax.tick_params(labelsize=SMALL)
    ax.grid(alpha=0.3, linewidth=0.5)
    ax.legend(fontsize=SMALL, title="Norm", title_fontsize=SMALL, frameon=False)
    return fig


def profile_plot(profile: pd.DataFrame, *, ylabel: str = "Layer criticality [%]") -> Figure:
    """Criticality over relative depth, one line (mean) and band (± std over models) per category.

    Args:
        profile: the table of :func:`layercrit.analysis.depth_profile`.
    """
    fig = Figure(figsize=(4.6, 2.6), layout="constrained")
    ax = fig.add_subplot(label="profile")
    colors = category_colors(list(profile["category"]))
    for category, group in profile.groupby("category", sort=False):
        x, mean, std = group["relative_depth"], group["criticality_mean"], group["criticality_std"]
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


def save(fig: Figure, stem: str | Path, *, dpi: int = 200) -> tuple[Path, Path]:
    """Write ``STEM.png`` and ``STEM.pdf`` (fonts embedded as TrueType so the PDF text stays editable)."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    png, pdf = stem.parent / f"{stem.name}.png", stem.parent / f"{stem.name}.pdf"
    with matplotlib.rc_context({"pdf.fonttype": 42}):
        fig.savefig(png, dpi=dpi)
        fig.savefig(pdf)
    return png, pdf
