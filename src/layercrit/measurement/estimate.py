"""Each layer's expected criticality over resets (and images), with a confidence interval.

The estimand. A layer's criticality is an expectation: over random resets of the layer (rerandomize draws a
new init each trial) and over images. One *trial* is one reset draw evaluated on a block of images; its row's
``criticality`` is the mean of the per-image criticality ``1 - cos(softmax, clean softmax)`` over that block. The
estimate is the mean of the trial means, and the interval is a Student-t interval over trial means.

* **Fixed design** (the paper's: every trial on the same images). The interval is the plain 95% t-interval,
  ``mean ± t(0.975, n-1) · s / sqrt(n)``, over the ``n`` reset draws; it is conditional on the evaluated images
  (whose own sampling error is small at 10,000 images) and honest about the resets: with 3 trials the t quantile
  is 4.30, so intervals are wide when resets disagree. A deterministic reset (``zero``) computed once has no
  spread over resets: its interval is 0.
* **Sequential design** (``target_ci = H``; see :mod:`layercrit.measurement.sequential`). Each trial has its own
  block of images, so the interval covers image sampling too. The i.i.d. units are single draws, or mirrored pairs
  of draws (``W`` and ``-W``, rows with ``mirror_of``) whose mean is one unit; the pilot's rows (``pilot``) chose
  the design and are left out. Stein's two-stage procedure: the first ``first_stage`` units' spread ``s`` fixes
  the number of units ``n`` in advance of the rest
  (:func:`stein_units`), and the interval is ``mean ± t(0.975, first_stage - 1) · s / sqrt(n)`` over all ``n`` unit
  means (:func:`stein_half_width`), exact under normality at a data-dependent ``n`` because ``n`` depends on ``s``
  alone. It is the layer's own interval: at most ±H, unless the layer reached ``max_trials`` first (``capped``).
  A simulation on reset distributions measured on the zoo's layers (skewed ones included; tests/test_estimate.py)
  measures its coverage. Results of the earlier sequential design (looks on a schedule) carry ``ci_looks = K`` and
  get the t-interval at level α/K (Bonferroni) over their trials.

Rows carry what the estimator needs, so tables can be rebuilt from any results file: ``criticality``,
``computed_in_trial`` (copies of a deterministic reset are not new draws), ``n_images``, ``mirror_of``,
``pilot``, ``first_stage`` and ``ci_looks``. A layer reports its own interval (not ±H: most layers stop well
inside H, and reporting H would widen every aggregate of them); the target is a separate column. Aggregates over
layers (a stage's or a model's mean, differences) are :mod:`layercrit.measurement.aggregate`'s, over the same units.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

ALPHA = 0.05  # every interval in layercrit is at 95%


def half_width(values: Sequence[float], looks: int = 1, alpha: float = ALPHA) -> float:
    """Half-width of the t-interval of the mean of ``values`` at level 1 − α, split over ``looks`` looks.

    Returns NaN for fewer than two values (no estimate of the spread).
    """
    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2:
        return math.nan
    if np.ptp(x) == 0:
        return 0.0
    s = x.std(ddof=1)
    return float(stats.t.ppf(1 - alpha / (2 * looks), len(x) - 1) * s / math.sqrt(len(x)))


def stein_units(first_stage: Sequence[float], target: float, alpha: float = ALPHA) -> int:
    """Stein's number of units for a half-width of ``target``: ``max(k, ceil((t · s / target)²))`` from the first
    stage's ``k`` unit means (``s`` their standard deviation, ``t = t(1 − α/2, k − 1)``)."""
    k = len(first_stage)
    s = float(np.std(first_stage, ddof=1))
    return max(k, math.ceil((stats.t.ppf(1 - alpha / 2, k - 1) * s / target) ** 2 - 1e-9))


def stein_half_width(units: Sequence[float], first_stage: int, alpha: float = ALPHA) -> float:
    """Half-width of Stein's interval over ``units`` (unit means in order), whose first ``first_stage`` set their
    number: ``t(1 − α/2, first_stage − 1) · s_first / sqrt(len(units))``. With fewer units than ``first_stage`` (a
    trial cap came first), the plain t-interval over them."""
    if len(units) < first_stage:
        return half_width(units)
    s = float(np.std(units[:first_stage], ddof=1))
    return float(stats.t.ppf(1 - alpha / 2, first_stage - 1) * s / math.sqrt(len(units)))


def images_per_trial(within_var: Sequence[float], between_var: Sequence[float], *, pilot_images: int,
                     overhead: float, lowest: int, highest: int) -> int:
    """Cochran's optimal second-stage size for two-stage sampling, pooled over layers.

    A layer's trial mean on ``m`` images has variance ``σ_b² + σ_w²/m`` (σ_b²: spread of the true criticality over
    resets; σ_w²: per-image variance within a reset). Reaching a given variance of the mean costs
    ``n (m + c) ∝ (σ_b² + σ_w²/m)(m + c)`` image-forwards, with ``c`` the per-trial overhead in image-forward
    equivalents; summed over layers this is least at ``m* = sqrt(c Σσ_w² / Σσ_b²)`` (Cochran, Sampling
    Techniques, §10.6). ``between_var`` here are the pilot's raw variances of trial means, from which the image
    part ``σ_w²/pilot_images`` is removed.
    """
    within = float(np.sum(within_var))
    between = float(np.sum(np.maximum(np.asarray(between_var) - np.asarray(within_var) / pilot_images, 0.0)))
    if between <= 0:
        return highest
    return int(min(highest, max(lowest, round(math.sqrt(overhead * within / between)))))


def layer_table(rows: pd.DataFrame, by: Sequence[str] | None = None, *, value: str = "criticality") -> pd.DataFrame:
    """Per layer: ``criticality`` (mean over reset draws, fraction), ``criticality_ci`` (the 95% half-width of the
    layer's own interval over its units, see the module docstring), ``criticality_low``/``criticality_high`` (the
    interval's ends, clipped to [0, 1] for criticality: the estimand cannot leave it), ``target_ci`` (the
    sequential design's target ±H, NaN for the fixed design), ``trials`` (evaluations: reset draws and their
    mirrors), ``images`` (image-forwards spent on the layer), and ``capped`` (the sequential design stopped at its
    trial cap before reaching its target).

    ``by`` are the grouping columns above ``layer`` (default: those of ``model_id``, ``reset``, ``alpha`` present).
    ``value`` is the column to estimate (another metric, in its own units, not clipped: the sequential design chose
    its number of units for ``criticality``, so Stein's interval applies to it only; other metrics get the
    t-interval over the same units). Layers keep the order of their first row. Results without the design
    columns (the paper's CSV) are read as the fixed design.
    """
    by = _grouping(rows, by)
    if value == "criticality" and value not in rows and "pred_cos_sim" in rows:  # the paper's CSV format
        rows = rows.assign(criticality=1.0 - rows["pred_cos_sim"])
    # the proxies of transformer blocks (one value per layer), where the rows have them
    proxies = [c for c in ("block_influence", "angular_distance") if c in rows and rows[c].notna().any()]
    out = []
    for key, group in rows[rows.layer != "original"].groupby([*by, "layer"], sort=False, dropna=False):
        drawn = draws(group)
        units = estimate_units(drawn, value)
        if _stein(group) and value == "criticality":
            width = stein_half_width(units, int(group.first_stage.max()))
        else:  # the fixed design; another metric; or a result of the earlier sequential design (K looks)
            width = half_width(units, looks_of(group))
        if len(drawn) == 1 and len(group) > 1:
            width = 0.0  # a deterministic reset: every trial is this one computation
        mean = float(np.mean(units))
        low, high = mean - width, mean + width
        if value == "criticality":
            low, high = max(low, 0.0), min(high, 1.0)
        target = group.target_ci.max() if value == "criticality" and "target_ci" in group else math.nan
        out.append({
            **dict(zip([*by, "layer"], key, strict=True)),
            "criticality": mean,
            "criticality_ci": width,
            "criticality_low": low,
            "criticality_high": high,
            "target_ci": float(target),
            "trials": len(drawn),
            "images": int(drawn.n_images.sum()) if "n_images" in drawn else None,
            "capped": bool(group.capped.fillna(False).astype(bool).any()) if "capped" in group else False,
            **{proxy: float(group[proxy].iloc[0]) for proxy in proxies},
        })
    return pd.DataFrame(out, columns=[*by, "layer", "criticality", "criticality_ci", "criticality_low",
                                      "criticality_high", "target_ci", "trials", "images", "capped", *proxies])


def _grouping(rows: pd.DataFrame, by: Sequence[str] | None) -> list[str]:
    return list(by) if by is not None else [c for c in ("model_id", "reset", "alpha") if c in rows]


def draws(group: pd.DataFrame) -> pd.DataFrame:
    """The rows that are reset draws of their own (a deterministic reset's later trials copy the first)."""
    if "computed_in_trial" not in group:
        return group
    return group[group.computed_in_trial.fillna(group.trial) == group.trial]


def estimate_units(drawn: pd.DataFrame, value: str) -> list[float]:
    """The i.i.d. units' means in trial order: a mirrored pair's mean (the draw and the row with its
    ``mirror_of``), or one draw's value; the sequential design's pilot rows are left out (:func:`_estimated`)."""
    drawn = _estimated(drawn)
    if "mirror_of" not in drawn or drawn.mirror_of.isna().all():
        return drawn[value].tolist()
    units, index = np.unique(drawn.mirror_of.fillna(drawn.trial).to_numpy(dtype=np.int64), return_inverse=True)
    values = drawn[value].to_numpy(dtype=np.float64)
    return (np.bincount(index, values) / np.bincount(index)).tolist()


def unit_rows(rows: pd.DataFrame, unit: Sequence[str], value: str) -> pd.DataFrame:
    """The rows as the estimate's units, for estimators that work on rows (:mod:`layercrit.measurement.aggregate`):
    the sequential design's pilot rows left out (per ``unit``, unless nothing follows them), and a mirrored pair as
    one row, the first draw's, holding the pair's mean ``value`` and both rows' ``n_images``."""
    unit = list(unit)
    if "pilot" in rows and rows.pilot.fillna(False).astype(bool).any():
        pilot = rows.pilot.fillna(False).astype(bool)
        after = (~pilot).groupby([rows[c] for c in unit], sort=False, dropna=False).transform("sum")
        rows = rows[~(pilot & (after > 0))]
    if "mirror_of" not in rows or rows.mirror_of.isna().all():
        return rows
    if "n_images" not in rows:
        rows = rows.assign(n_images=0)
    mirrored = rows.mirror_of.notna() & (rows.mirror_of != rows.trial)  # a row that mirrors an earlier trial's draw
    second = rows[mirrored]
    partner = {(*key, int(trial)): (v, n) for *key, trial, v, n in
               second[[*unit, "mirror_of", value, "n_images"]].itertuples(index=False, name=None)}
    first = rows[~mirrored].copy()
    found = [partner.get((*key, int(trial))) for *key, trial in first[[*unit, "trial"]].itertuples(index=False, name=None)]
    has = np.array([f is not None for f in found], dtype=bool)
    if has.any():
        first.loc[has, value] = (first.loc[has, value].to_numpy(np.float64)
                                 + np.array([f[0] for f in found if f is not None], dtype=np.float64)) / 2
        first.loc[has, "n_images"] = (first.loc[has, "n_images"].to_numpy()
                                      + np.array([f[1] for f in found if f is not None]))
    return first


def _estimated(drawn: pd.DataFrame) -> pd.DataFrame:
    """The rows of the estimate: the sequential design's pilot sets the design and is left out, unless the trial
    cap left nothing after it."""
    if "pilot" not in drawn or not drawn.pilot.fillna(False).astype(bool).any():
        return drawn
    after = drawn[~drawn.pilot.fillna(False).astype(bool)]
    return after if len(after) else drawn


def _stein(group: pd.DataFrame) -> bool:
    return "first_stage" in group and group.first_stage.notna().any()


def looks_of(group: pd.DataFrame) -> int:
    """The number of looks the rows' interval accounts for (``ci_looks``; 1 for the fixed design)."""
    return int(group.ci_looks.max()) if "ci_looks" in group and group.ci_looks.notna().any() else 1
