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
* **Sequential design** (``target_ci = H``; see :mod:`layercrit.measurement.sequential`). Each trial has its own block of
  images, so the interval covers image sampling too. The stopping rule looks at the interval only at the trial
  counts of a fixed schedule (:func:`look_schedule`, ``K`` looks) and splits the error rate over them
  (Bonferroni: ``t(1 - α/(2K), n-1)``); the intervals at all ``K`` looks then hold together with probability
  ≥ 1 − α when trial means are normal, so the interval at a data-dependent stop keeps its level. A layer stops
  once that interval is ±H or narrower, and is reported with that interval, its own (not ± H: most layers stop
  well inside H, and reporting H would widen every aggregate of them); the target is a separate column. A layer
  that reaches ``max_trials`` first is marked ``capped``. A simulation over bounded reset distributions of the
  shapes measured on real layers (skewed, rare outliers; tests/test_estimate.py) measures the coverage.
  ``ci_looks`` in the rows is ``K`` (1 for the fixed design).

Rows carry what the estimator needs, so tables can be rebuilt from any results file: ``criticality``,
``computed_in_trial`` (copies of a deterministic reset are not new draws), ``n_images`` and ``ci_looks``. Aggregates
over layers (a stage's or a model's mean, differences) are :mod:`layercrit.measurement.aggregate`'s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

ALPHA = 0.05  # every interval in layercrit is at 95%
LOOK_GROWTH = 1.5  # the sequential design looks at n, 1.5 n, 2.25 n, ... trials


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


def look_schedule(min_trials: int, max_trials: int, growth: float = LOOK_GROWTH) -> list[int]:
    """Trial counts at which the sequential design looks at a layer's interval: ``min_trials``, then ×``growth``
    (rounded up), ending with ``max_trials``."""
    looks = [max(min_trials, 2)]
    while looks[-1] < max_trials:
        looks.append(min(max_trials, max(looks[-1] + 1, math.ceil(looks[-1] * growth))))
    return looks


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
    layer's own t-interval over its draws, at the design's level, see the module docstring),
    ``criticality_low``/``criticality_high`` (the interval's ends, clipped to [0, 1] for criticality: the estimand
    cannot leave it), ``target_ci`` (the sequential design's target ±H, NaN for the fixed design), ``trials`` (reset
    draws), ``images`` (image-forwards spent on the layer), and ``capped`` (the sequential design stopped at its
    trial cap before reaching its target).

    ``by`` are the grouping columns above ``layer`` (default: those of ``model_id``, ``reset``, ``alpha`` present).
    ``value`` is the column to estimate (another metric, in its own units, not clipped: the sequential design's
    target applies to ``criticality`` only). Layers keep the order of their first row. Results without the design
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
        mean = float(drawn[value].mean())
        width = half_width(drawn[value], looks_of(group))
        if len(drawn) == 1 and len(group) > 1:
            width = 0.0  # a deterministic reset: every trial is this one computation
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


def looks_of(group: pd.DataFrame) -> int:
    """The number of looks the rows' interval accounts for (``ci_looks``; 1 for the fixed design)."""
    return int(group.ci_looks.max()) if "ci_looks" in group and group.ci_looks.notna().any() else 1
