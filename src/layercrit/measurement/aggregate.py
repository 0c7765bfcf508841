"""Aggregates of layers' criticality (a stage's mean, a model's mean, a depth shift, a difference between models or
between two runs of one model), each with its interval, from the trial-level rows.

Every aggregate is a linear contrast ``θ = Σ_u c_u μ_u`` of *units* ``u`` (a layer of a model, or of one side of a
``diff``) with expected criticality ``μ_u``. Its estimate is ``θ̂ = Σ_u c_u x̄_u``, ``x̄_u`` the mean of the unit's
``n_u`` trials (reset draws). The interval accounts for how the trials of different units are related:

* **Pairing.** A trial row's *key* is what it shares with rows of other units: its reset draw and its images
  (``seed, trial, image_offset, n_images, data_id``, as far as the rows carry them). Trial ``t`` of every layer of a
  model sees the same images (the same block in the sequential design), and trial ``t`` of one layer in two models
  of one architecture at one seed draws the same weights, so rows with equal keys may be correlated; rows with
  different keys are independent (different draws on different blocks, or, in the fixed design, different draws
  on the same images, conditional on them).
* **Variance.** Write ``θ̂ = Σ_k z_k`` with ``z_k = Σ_{u present at k} (c_u / n_u) x_{u,k}``, a sum of independent
  per-key terms. Keys at which the same units are present form a *stratum* ``j`` (``N_j`` keys, units ``S_j``); all
  its ``z_k`` have one variance ``v_j``, estimated by the sample variance of ``Σ_{u∈S_j} (c_u/n_u) x_{u,k}`` over
  every key where all of ``S_j`` are present (so each unit pair's covariance comes from the trials they share, and
  the estimate is never negative). ``Var(θ̂) ≈ Σ_j N_j v̂_j``.
* **Degrees of freedom.** Satterthwaite's: ``ν = 2 V̂² / Var(V̂)``, with the covariances of the strata's sample
  variances taken from normal theory (for sample variances over key sets of sizes ``a`` and ``b`` sharing ``q``
  keys, whose per-key covariance is ``C``: ``2 q C² ((a−1)(b−1) + q − 1) / (a(a−1) b(b−1))``). When every unit has
  the same keys this is exactly the t-interval of the per-trial contrast ``Σ_u c_u x_{u,t}`` with ``n − 1``
  degrees of freedom; for one unit it is that unit's own t-interval; for units that share no key, Welch's.
* **Level.** ``t(1 − α/(2K), ν)`` with ``K`` the design's number of looks (``ci_looks``: 1 for the fixed design;
  the sequential design's interval at a data-dependent stop is at level α/K, and so are aggregates of its layers).
* **Bounds.** Criticality lies in [0, 1], so a contrast lies in ``[Σ min(c_u, 0), Σ max(c_u, 0)]``; the interval's
  ends are clipped to that range (which keeps its coverage), and ``half_width`` stays the symmetric one.

The units of the sequential design are those of each layer's own interval
(:func:`layercrit.measurement.estimate.unit_rows`): its pilot is left out and a mirrored pair of draws is one trial,
keyed by its first draw and block (the dependence through images between a pair and another layer's two single
draws on the same blocks is left out; the images' share of a trial's variance is small).

A deterministic reset (``zero``: later trials copy the first, ``computed_in_trial``) is a constant with no spread
over resets. Units with a single draw of a random reset have no variance estimate: the interval is NaN.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from ..errors import LayercritError
from .estimate import ALPHA, draws, unit_rows

KEY_COLUMNS = ("seed", "trial", "image_offset", "n_images", "data_id")
"""What a trial row shares with other units' rows: its reset draw and its images."""


@dataclass(frozen=True)
class Estimate:
    """A contrast's estimate and its interval (``low, high``: the ends, clipped to the contrast's range)."""

    value: float
    half_width: float
    low: float
    high: float
    se: float
    df: float
    paired: bool  # some weighted units share trials (keys), and their covariance entered the interval

    @property
    def excludes_zero(self) -> bool:
        return bool(self.low > 0 or self.high < 0)


class Trials:
    """The trial-level values of many units, aligned on their keys (:data:`KEY_COLUMNS`).

    Args:
        rows: results rows (``original`` rows are ignored); each unit's reset draws (a deterministic reset's copies
            dropped).
        unit: the columns that name a unit (default ``model_id`` and ``layer``, those present).
        value: the column estimated.
        bounds: the range of ``value`` (criticality: [0, 1]); ``None`` for no clipping.
    """

    def __init__(self, rows: pd.DataFrame, unit: Sequence[str] | None = None, *, value: str = "criticality",
                 bounds: tuple[float, float] | None = (0.0, 1.0)) -> None:
        unit = list(unit) if unit is not None else [c for c in ("model_id", "layer") if c in rows]
        rows = rows[rows.layer != "original"] if "layer" in rows else rows
        if rows.empty:
            raise LayercritError("no trial rows to aggregate: measure some layers first")
        rows = unit_rows(rows, unit, value).reset_index(drop=True)  # the sequential design's units, as per layer
        unit_of_row = rows.groupby(unit, sort=False, dropna=False).ngroup().to_numpy()
        first = rows.iloc[np.unique(unit_of_row, return_index=True)[1]]
        # units in order of appearance; with one column, its values (not 1-tuples)
        self.units = list(first[unit[0]]) if len(unit) == 1 else list(first[unit].itertuples(index=False, name=None))
        drawn = rows.index.isin(draws(rows).index)
        rows_per_unit = np.bincount(unit_of_row, minlength=len(self.units))
        draws_per_unit = np.bincount(unit_of_row[drawn], minlength=len(self.units))
        self.constant = (draws_per_unit == 1) & (rows_per_unit > 1)  # a deterministic reset's copies
        looks = rows.ci_looks.fillna(1) if "ci_looks" in rows else pd.Series(1, index=rows.index)
        self.looks = looks.groupby(unit_of_row).max().to_numpy(dtype=int)
        keys = [c for c in KEY_COLUMNS if c in rows]
        if not keys:
            raise LayercritError("the rows have no trial column: aggregates need each row's trial")
        unit_index = unit_of_row[drawn]
        key_index = rows[drawn].groupby(keys, sort=True, dropna=False).ngroup().to_numpy()
        if np.unique(unit_index * (key_index.max() + 1) + key_index).size < len(key_index):
            raise LayercritError("a unit has two rows with the same trial, images and seed: pass each run's results "
                                 "once (or name the runs apart, e.g. by model_id)")
        self.values = np.full((key_index.max() + 1, len(self.units)), np.nan)
        self.values[key_index, unit_index] = rows.loc[drawn, value].to_numpy(dtype=np.float64)
        self.bounds = bounds
        self._position = {u: i for i, u in enumerate(self.units)}

    def shared(self, a: Hashable, b: Hashable) -> int:
        """How many trials (keys) units ``a`` and ``b`` share."""
        present = ~np.isnan(self.values[:, [self._position[a], self._position[b]]])
        return int(present.all(1).sum())

    def trials(self, unit: Hashable) -> int:
        return int((~np.isnan(self.values[:, self._position[unit]])).sum())

    def estimate(self, weights: Mapping[Hashable, float], alpha: float = ALPHA) -> Estimate:
        """The contrast ``Σ weights[u] μ_u`` with its interval at level 1 − α (see the module docstring)."""
        used, c = self._weights(weights)
        return contrast(self.values[:, used], c, constant=self.constant[used],
                        looks=max(int(self.looks[used].max()), 1), alpha=alpha, bounds=self.bounds)

    def moments(self, weights: Mapping[Hashable, float]) -> tuple[float, float]:
        """The contrast's estimate and its estimated sampling variance ``V̂`` (no interval: for estimators built
        on many contrasts, such as the variance components of :mod:`layercrit.analysis.variance`)."""
        used, c = self._weights(weights)
        value, variance, _, _ = _moments(self.values[:, used], c, self.constant[used])
        return value, variance

    def _weights(self, weights: Mapping[Hashable, float]) -> tuple[np.ndarray, np.ndarray]:
        """The columns a contrast uses and their weights."""
        c = np.zeros(len(self.units))
        for name, weight in weights.items():
            if name not in self._position:
                raise LayercritError(f"no trials of {name!r} to aggregate")
            c[self._position[name]] += weight
        used = np.flatnonzero(c)
        if used.size == 0:
            raise LayercritError("an aggregate needs at least one unit with a nonzero weight")
        return used, c[used]


def contrast(values: np.ndarray, weights: np.ndarray, *, constant: np.ndarray | None = None, looks: int = 1,
             alpha: float = ALPHA, bounds: tuple[float, float] | None = None) -> Estimate:
    """The estimator itself, on a keys × units matrix of trial values (NaN: the unit has no trial at that key).

    Args:
        values: trial values, one row per key (draw and images), one column per unit.
        weights: ``c_u`` per column.
        constant: columns that are deterministic (no spread over resets).
        looks: the design's number of looks ``K`` (level α/K).
        alpha: the error rate.
        bounds: the range of one unit's expectation, to clip the interval's ends to.
    """
    value, variance, df, paired = _moments(values, weights, constant)
    width = 0.0 if variance == 0 else float(stats.t.ppf(1 - alpha / (2 * looks), df) * math.sqrt(variance))
    low, high = value - width, value + width
    if bounds is not None and not math.isnan(width):
        low = max(low, float(np.sum(np.where(weights > 0, bounds[0], bounds[1]) * weights)))
        high = min(high, float(np.sum(np.where(weights > 0, bounds[1], bounds[0]) * weights)))
    return Estimate(value, width, low, high, math.sqrt(variance), df, paired)


def _moments(values: np.ndarray, weights: np.ndarray,
             constant: np.ndarray | None) -> tuple[float, float, float, bool]:
    """``(θ̂, V̂, ν, paired)`` of the contrast on a keys × units matrix (:func:`contrast`'s arguments)."""
    present = ~np.isnan(values)
    n = present.sum(0)
    if (n == 0).any():
        raise LayercritError("an aggregate's unit has no trials")
    value = float(np.sum(weights * np.nansum(values, 0) / n))
    random = np.ones(values.shape[1], bool) if constant is None else ~np.asarray(constant)
    return value, *_variance(values[:, random], present[:, random], weights[random] / n[random])


def _variance(x: np.ndarray, present: np.ndarray, a: np.ndarray) -> tuple[float, float, bool]:
    """``(V̂, ν, paired)`` of ``Σ_k Σ_u a_u x[k, u]`` over the present entries: stratified by which units are present
    at a key, Satterthwaite's degrees of freedom (module docstring)."""
    keep = present.any(1)
    if not keep.any():
        return 0.0, math.inf, False
    x, present = np.where(present, x, 0.0)[keep], present[keep]
    patterns, counts = np.unique(present, axis=0, return_counts=True)
    # covers[k, j]: all of stratum j's units are present at key k; y[k, j] = Σ_{u∈S_j} a_u x[k, u] there
    covers = (present.astype(np.int64) @ patterns.T.astype(np.int64)) == patterns.sum(1)
    sizes = covers.sum(0)
    if (sizes < 2).any():
        return math.nan, math.nan, False
    y = x @ (patterns * a).T
    y = np.where(covers, y - (y * covers).sum(0) / sizes, 0.0)  # centred: covariances without cancellation
    both = covers.T.astype(np.float64) @ covers  # q_ij: keys where strata i and j are both covered
    sums = y.T @ covers  # Σ over those keys of y_i
    with np.errstate(invalid="ignore", divide="ignore"):
        cov = np.where(both >= 2, (y.T @ y - sums * sums.T / both) / (both - 1), 0.0)
    variance = max(float(counts @ np.diag(cov)), 0.0)
    paired = bool((patterns.sum(1) > 1).any())
    if variance == 0:
        return 0.0, math.inf, paired
    a_i, a_j = sizes[:, None], sizes[None, :]  # Var(V̂) under normal theory
    spread = float(counts @ (2 * both * cov ** 2 * ((a_i - 1) * (a_j - 1) + both - 1)
                             / (a_i * (a_i - 1) * a_j * (a_j - 1))) @ counts)
    df = 2 * variance ** 2 / spread if spread > 0 else math.inf
    return variance, float(np.clip(df, sizes.min() - 1, len(x) - 1)), paired


def mean_weights(units: Iterable[Hashable]) -> dict[Hashable, float]:
    """Equal weights summing to 1: the mean over ``units``."""
    units = list(dict.fromkeys(units))
    return {u: 1.0 / len(units) for u in units}


def combine(*terms: tuple[float, Mapping[Hashable, float]]) -> dict[Hashable, float]:
    """``Σ factor · weights`` over ``(factor, weights)`` terms, e.g. ``combine((1, deep), (-1, early))``."""
    out: dict[Hashable, float] = {}
    for factor, weights in terms:
        for name, weight in weights.items():
            out[name] = out.get(name, 0.0) + factor * weight
    return {name: weight for name, weight in out.items() if weight != 0}


def model_table(rows: pd.DataFrame, by: Sequence[str] | None = None, *, value: str = "criticality") -> pd.DataFrame:
    """Per model: mean criticality over its layers (fraction) with the 95% half-width of that mean
    (:class:`Trials`: paired over the trials the layers share), ``criticality_low/high`` (the interval's ends,
    clipped to [0, 1] for criticality), ``layers``, ``trials`` (the fewest of a layer) and ``images`` (spent).

    ``by``: the columns that name a model (default: those of ``model_id``, ``reset``, ``alpha`` present).
    """
    by = list(by) if by is not None else [c for c in ("model_id", "reset", "alpha") if c in rows]
    rows = rows[rows.layer != "original"]
    out = []
    for key, group in rows.groupby(by, sort=False, dropna=False) if by else [((), rows)]:
        trials = Trials(group, ["layer"], value=value, bounds=(0.0, 1.0) if value == "criticality" else None)
        result = trials.estimate(mean_weights(trials.units))
        drawn = draws(group)
        out.append({**dict(zip(by, key if isinstance(key, tuple) else (key,), strict=True)),
                    "criticality": result.value, "criticality_ci": result.half_width,
                    "criticality_low": result.low, "criticality_high": result.high, "layers": len(trials.units),
                    "trials": int(drawn.groupby("layer").size().min()),
                    "images": int(drawn.n_images.sum()) if "n_images" in drawn else None})
    return pd.DataFrame(out)


def interval_text(value: float, half_width: float, low: float, high: float, *, digits: int = 4,
                  scale: float = 1.0) -> str:
    """``"0.6247 ± 0.0312"``, or, when the symmetric interval would leave the range its ends were clipped to,
    ``"0.6247 [0.0000, 1.0000]"`` (the clipped ends). ``scale``: 100 for percent."""
    tolerance = 1e-12 * max(1.0, abs(value))
    if math.isnan(half_width) or (value - half_width >= low - tolerance and value + half_width <= high + tolerance):
        return f"{scale * value:.{digits}f} ± {scale * half_width:.{digits}f}"
    return f"{scale * value:.{digits}f} [{scale * low:.{digits}f}, {scale * high:.{digits}f}]"
