"""Tables derived from the per-layer and per-model tables: criticality against accuracy (correlations with their
p-values), the model × layer matrix of the heatmaps, and depth profiles."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from .inputs import (
    MIN_CORRELATION_MODELS,
)


def correlations(models: pd.DataFrame, *, x: str = "avg_criticality_pct", y: str = "accuracy") -> pd.DataFrame:
    """Spearman ρ and Kendall τ (two-sided p-values) between two model columns, default avg criticality vs accuracy.

    Computed over all models with both values, over each category alone and over all but each category (the
    paper reports all and all but adversarial training); subsets with fewer than 3 models are left out.

    Returns:
        Columns ``subset`` ("all", "only CATEGORY", "without CATEGORY"), ``n, spearman_rho, spearman_p,
        kendall_tau, kendall_p``.
    """
    usable = models[models[x].notna() & models[y].notna()]
    subsets = [("all", usable)]
    categories = list(pd.unique(usable["category"]))
    if len(categories) > 1:
        for category in categories:
            subsets.append((f"only {category}", usable[usable["category"] == category]))
            subsets.append((f"without {category}", usable[usable["category"] != category]))
    rows = []
    for name, subset in subsets:
        if len(subset) < MIN_CORRELATION_MODELS:
            continue
        with warnings.catch_warnings():  # constant inputs give NaN, which the table shows
            warnings.simplefilter("ignore", scipy_stats.ConstantInputWarning)
            warnings.simplefilter("ignore", RuntimeWarning)
            spearman = scipy_stats.spearmanr(subset[x], subset[y])
            kendall = scipy_stats.kendalltau(subset[x], subset[y])
        rows.append({"subset": name, "n": len(subset), "spearman_rho": float(spearman.statistic),
                     "spearman_p": float(spearman.pvalue), "kendall_tau": float(kendall.statistic),
                     "kendall_p": float(kendall.pvalue)})
    return pd.DataFrame(rows, columns=["subset", "n", "spearman_rho", "spearman_p", "kendall_tau", "kendall_p"])


def criticality_matrix(layers: pd.DataFrame, models: pd.DataFrame, value: str = "criticality_pct") -> pd.DataFrame:
    """Models × layers of one column of the layer table: rows in ``models`` order, columns in network order."""
    columns = layers.drop_duplicates("layer").sort_values("depth")["layer"]
    matrix = layers.pivot(index="model_id", columns="layer", values=value)
    return matrix.reindex(index=list(models["model_id"]), columns=list(columns))


def depth_profile(layers: pd.DataFrame, models: pd.DataFrame) -> pd.DataFrame:
    """Criticality over relative depth per category: mean and std over the category's models.

    Each model's profile is interpolated onto the relative depths of all models, so models of different depth
    share one axis (for models of one architecture the values are exact).

    Returns:
        Columns ``category, relative_depth, criticality_pct, criticality_std_pct, models``, categories in ``models``
        order.
    """
    grid = np.unique(layers["relative_depth"].round(9))
    curves = {model: np.interp(grid, rows["relative_depth"], rows["criticality_pct"])
              for model, rows in layers.groupby("model_id", sort=False)}
    frames = []
    for category, group in models.groupby("category", sort=False):
        stack = np.stack([curves[m] for m in group["model_id"]])
        frames.append(pd.DataFrame({"category": category, "relative_depth": grid, "criticality_pct": stack.mean(0),
                                    "criticality_std_pct": stack.std(0), "models": len(stack)}))
    return pd.concat(frames, ignore_index=True)

