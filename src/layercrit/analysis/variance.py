"""Training seeds as a variance component: how much of a layer's criticality is the method, the seed, the reset,
the images; and each method's effect against the baseline with an interval that counts seed variance.

A model id names its training seed as ``ID@seedN`` (``zoo:fmnist/baseline@seed1``); an id without one is seed 0
of its method (``baseline``). Per *unit* (a layer, or a stage: the mean of its layers) the criticality of one
image under one reset of one training seed of one method is read as

    y = μ + method + seed(method) + reset(seed) + image(reset)

with variances σ²_method, σ²_seed, σ²_reset, σ²_image (percentage points²). The estimates are the method of
moments (one-way random-effects ANOVA, nested), from the trial rows:

* **image**: the mean over trials of ``criticality_sd²`` (the per-image variance within a trial; cos metric only).
* **reset**: the variance of a model's trial means less the image part ``σ²_image / n_images`` (exact when every
  trial has its own images, as in the sequential design; when trials share images, as in the fixed design, it
  removes at most ``σ²_image / n_images`` too much, under 0.01% of σ²_image at 10,000 images).
* **seed**: the variance of a method's model means over its seeds less the part their measurement errors add to
  it, pooled over the methods with two or more seeds. That part is ``Σ_s Var(ē_s − ē) / (k − 1)`` over the
  method's ``k`` seeds, the sampling variance of each seed's deviation from the method's mean over seeds, from
  the trials (:func:`model_units`' ``deviation_var``): the mean of the seeds' ``s² / trials`` when they were
  measured independently, less their covariances when they share images and reset draws (paired measurement,
  as in the zoo's findings: subtracting the full ``s² / trials`` there removes the shared part too, which is not
  in the spread; in the tests' simulation that left a tenth of the seed variance).
* **method**: the variance of the method means less their expected seed-and-measurement part (``s²_p / seeds``,
  ``s²_p`` the pooled variance of model means over seeds).

A stage's (and an aggregate's: the mean over all layers, the depth shift) method and seed components are those of
its contrast of the layers' means; its reset and image components the mean of its layers' (the spread of one
layer's draw). Negative moment estimates are reported as 0. Intervals: for the
seed component, the χ² interval of the pooled variance of model means over seeds (degrees of freedom Σ(seeds − 1))
less their measurement variance, which covers at its nominal level under normal seed effects (simulated in the
tests); for the others, a percentile bootstrap over seeds (each method's seeds drawn with replacement,
``bootstrap`` times). A bootstrap over seeds does not serve the seed component: with three seeds a method has only
ten distinct resamples, a resample repeats seeds, and its upper end fell at the estimate (seed SD 6.9 [1.4, 7.2]
points on the zoo's layer1, where the χ² interval is [4.7, 13.3]; 54% coverage in the tests' simulation with four
methods of three seeds, every miss below the truth, against 94% for the χ² interval); for the method component it
gives the uncertainty from seeds in the spread of these methods, taken as fixed.

A method's effect is the difference of its mean over seeds from the baseline's, with the two-sample t-interval
on the pooled variance of model means over seeds (degrees of freedom Σ(seeds − 1) over the methods with two or
more seeds); a method measured in one seed borrows the others' seed variance. Models are measured with their own
resets, on the same images: the small positive correlation this gives (r ≈ 0.1) makes the unpaired interval a
little wider than it needs to be, never narrower. The pooled interval assumes the methods vary alike between seeds;
where both sides have two or more seeds, Welch's interval from each side's own seeds is given beside it, which does
not assume so (and, with three seeds a side, has only about two degrees of freedom).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import pandas as pd
from scipy import stats

from ..errors import LayercritError
from ..measurement.aggregate import Trials, combine, mean_weights
from ..measurement.estimate import ALPHA
from ..seeds import method_and_seed
from . import per_layer
from .contrasts import ALL_LAYERS, DEPTH_SHIFT, aggregate_weights

COMPONENTS = ("method", "seed", "reset", "image")
LEVELS = ("layer", "stage", "aggregate")
AGGREGATES = (ALL_LAYERS, DEPTH_SHIFT)
BOOTSTRAP = 1000


def stage_of(layer: str) -> str:
    """The stage a layer belongs to: its first name part after an optional ``model.`` wrapper (``layer2.0.conv1``
    -> ``layer2``, ``conv1`` -> ``conv1``, ``fc`` -> ``fc``)."""
    return str(layer).removeprefix("model.").split(".")[0]


def has_seeds(model_ids: Iterable[str]) -> bool:
    """Whether some method among ``model_ids`` was measured in two or more training seeds."""
    methods = pd.Series([method_and_seed(m)[0] for m in dict.fromkeys(map(str, model_ids))], dtype=object)
    return bool((methods.value_counts() >= 2).any())


def model_units(rows: pd.DataFrame, *, value: str = "criticality_pct",
                stage: Callable[[str], str] = stage_of) -> pd.DataFrame:
    """Per (model, layer), per (model, stage) and per (model, aggregate): what the decomposition reads.

    A unit's ``mean`` and its sampling variance ``noise_var`` are those of the contrast of its layers
    (:class:`layercrit.measurement.aggregate.Trials`, the estimator of every aggregate layercrit reports: the
    sequential design's pilot left out, a mirrored pair one trial, covariances between layers and models taken from
    the trials they share). ``deviation_var`` is the sampling variance of the model's deviation from its method's
    mean over seeds: where seeds of a method were measured on the same images with the same reset draws (the zoo's
    findings do this, so that their differences are paired), their measurement errors are correlated and move
    together, and the spread of the seed means holds only the part that does not; subtracting each model's full
    ``noise_var`` then removes too much.

    Args:
        rows: trial rows (``model_id, layer, trial`` and ``value``; ``criticality_sd`` (fraction) and ``n_images``
            for the image component, ``computed_in_trial`` to count a deterministic reset once, the key columns
            of :data:`layercrit.measurement.aggregate.KEY_COLUMNS` to pair trials), ``original`` rows left out.
        value: the criticality column, in percent. stage: layer name -> stage name.

    Returns:
        Columns ``level`` (``layer``/``stage``/``aggregate``), ``unit``, ``model_id``, ``method``, ``seed``,
        ``mean``, ``noise_var``, ``deviation_var``, ``reset_var``, ``image_var`` (points²), ``trials``; layers and
        stages in network order, then the aggregates ``all layers`` and ``depth shift``
        (:func:`layercrit.analysis.contrasts.aggregate_weights`: the last numbered stage minus the mean of the
        stem and the first; only when the layers span two numbered stages). A stage's or aggregate's
        ``reset_var`` and ``image_var`` are the mean of its layers' (the spread of one layer's draw), its
        ``trials`` the fewest of its layers'.
    """
    missing = [c for c in ("model_id", "layer", "trial", value) if c not in rows]
    if missing:
        raise LayercritError(f"rows lack column(s) {', '.join(missing)} for the variance components")
    rows = rows[rows["layer"] != "original"]
    if rows.empty:
        raise LayercritError("no layer rows to decompose: measure some layers first")
    spreads = {key: tuple(v) for key, v in _draw_spreads(rows, value).iterrows()}
    trials = Trials(rows, ["model_id", "layer"], value=value, bounds=None)
    layers: dict[str, list[str]] = {}
    for model_id, layer in trials.units:
        layers.setdefault(model_id, []).append(layer)
    contrasts: dict[tuple[str, str], dict[str, dict[tuple[str, str], float]]] = {}  # (level, unit) -> model -> w
    for model_id, names in layers.items():
        stages: dict[str, list[str]] = {}
        for name in names:
            stages.setdefault(stage(name), []).append(name)
        combined = aggregate_weights(names, {name: per_layer.stage_of(name) for name in names})
        for level, unit, weights in [*(("layer", name, {name: 1.0}) for name in names),
                                     *(("stage", name, mean_weights(members)) for name, members in stages.items()),
                                     *(("aggregate", name, combined[name]) for name in AGGREGATES
                                       if name in combined)]:
            contrasts.setdefault((level, unit), {})[model_id] = {(model_id, layer): w for layer, w in weights.items()}
    out = []
    for (level, unit), by_model in sorted(contrasts.items(), key=lambda item: LEVELS.index(item[0][0])):
        methods: dict[str, list[str]] = {}
        for model_id in by_model:
            methods.setdefault(method_and_seed(model_id)[0], []).append(model_id)
        for method, members in methods.items():
            centre = combine(*((-1.0 / len(members), by_model[m]) for m in members))
            for model_id in members:
                weights = by_model[model_id]
                mean, noise = trials.moments(weights)
                deviation = trials.moments(combine((1.0, weights), (1.0, centre)))[1] if len(members) > 1 else 0.0
                spread = np.array([spreads[key] for key in weights])  # reset_var, image_var, trials per layer
                out.append({"level": level, "unit": unit, "model_id": model_id, "method": method,
                            "seed": method_and_seed(model_id)[1], "mean": mean, "noise_var": noise,
                            "deviation_var": deviation,
                            "reset_var": spread[:, 0].mean(), "image_var": spread[:, 1].mean(),
                            "trials": int(spread[:, 2].min())})
    return pd.DataFrame(out)


def _draw_spreads(rows: pd.DataFrame, value: str) -> pd.DataFrame:
    """Per (model, layer): the variance of one reset draw less its image part (``reset_var``), the per-image variance
    within a trial (``image_var``, from ``criticality_sd``), and the number of draws (``trials``; a deterministic
    reset's copies count once and it has no spread)."""
    copies = rows.groupby(["model_id", "layer"], sort=False).size()
    if "computed_in_trial" in rows:  # a deterministic reset's later trials copy the first: one draw
        rows = rows[rows["computed_in_trial"].fillna(rows["trial"]) == rows["trial"]]
    with_images = "criticality_sd" in rows and rows["criticality_sd"].notna().all()
    drawn = rows.assign(_y=rows[value].astype(float),
                        _image=np.square(100.0 * rows["criticality_sd"].astype(float)) if with_images else np.nan,
                        _n=rows["n_images"].astype(float) if with_images and "n_images" in rows else np.inf)
    spreads = drawn.groupby(["model_id", "layer"], sort=False).agg(
        between=("_y", "var"), trials=("_y", "size"), image_var=("_image", "mean"), images=("_n", "mean"))
    deterministic = (spreads["trials"] == 1) & (copies.reindex(spreads.index) > 1)  # one computation, repeated
    between = spreads["between"].mask(deterministic, 0.0)
    spreads["reset_var"] = between - (spreads["image_var"] / spreads["images"]).fillna(0.0)
    return spreads[["reset_var", "image_var", "trials"]]


class _Arrays:
    """:func:`model_units` as unit × model matrices (NaN where a model lacks a unit) and a model × method one-hot
    matrix, so that a bootstrap resample is a choice of columns."""

    def __init__(self, units: pd.DataFrame):
        self.keys = list(dict.fromkeys(zip(units["level"], units["unit"], strict=True)))
        models = units.drop_duplicates("model_id")
        self.models, self.methods = list(models["model_id"]), list(dict.fromkeys(models["method"]))
        table = units.set_index(["level", "unit", "model_id"])
        index = pd.MultiIndex.from_tuples(self.keys, names=["level", "unit"])

        def matrix(field: str) -> np.ndarray:
            return table[field].unstack("model_id").reindex(index=index, columns=self.models).to_numpy(float)

        self.mean, self.deviation = matrix("mean"), matrix("deviation_var")
        self.reset, self.image = matrix("reset_var"), matrix("image_var")
        self.onehot = (models["method"].to_numpy()[:, None] == np.array(self.methods)[None, :]).astype(float)

    def components(self, columns: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Per unit: the four variance estimates (unclipped), the pooled seed variance of model means and its
        degrees of freedom, from the models in ``columns`` (default all)."""
        cols = np.arange(len(self.models)) if columns is None else columns
        y, onehot = self.mean[:, cols], self.onehot[cols]
        present = np.isfinite(y)
        count = present.astype(float) @ onehot
        total = np.where(present, y, 0.0) @ onehot
        squares = np.where(present, y * y, 0.0) @ onehot
        deviation = np.where(present, self.deviation[:, cols], 0.0) @ onehot
        with np.errstate(invalid="ignore", divide="ignore"):
            means = total / count
            spread = (squares - count * means**2) / (count - 1)
            replicated = count >= 2
            weights = np.where(replicated, count - 1, 0.0)
            df = weights.sum(axis=1)
            pooled = np.where(replicated, weights * spread, 0.0).sum(axis=1) / df
            # (a bootstrap resample repeats seeds, which the deviations do not follow: the seed component's interval
            # is the χ² one of the full data, never a resample's)
            seed = np.where(replicated, weights * spread - deviation, 0.0).sum(axis=1) / df
            observed = count > 0
            methods = observed.sum(axis=1)
            grand = np.where(observed, means, 0.0).sum(axis=1) / methods
            between = np.where(observed, (means - grand[:, None]) ** 2, 0.0).sum(axis=1) / (methods - 1)
            expected = np.where(observed, pooled[:, None] / count, 0.0).sum(axis=1) / methods
            method = np.where(methods > 1, between - expected, np.nan)
        return {"method": method, "seed": np.where(df > 0, seed, np.nan), "reset": _mean(self.reset[:, cols]),
                "image": _mean(self.image[:, cols]), "pooled_seed_var": pooled, "df": df}

    def resample(self, rng: np.random.Generator) -> np.ndarray:
        """Columns of one bootstrap draw: each method's models drawn with replacement."""
        owner = self.onehot.argmax(axis=1)
        return np.concatenate([rng.choice(np.flatnonzero(owner == k), size=int((owner == k).sum()), replace=True)
                               for k in range(len(self.methods))])


def variance_components(units: pd.DataFrame, *, bootstrap: int = BOOTSTRAP, seed: int = 0) -> pd.DataFrame:
    """Per unit and component: variance (points², moment estimate clipped at 0), SD (points), share of the four,
    and a 95% interval of the SD (the seed component's from the χ² distribution, the others' by bootstrap over seeds).

    Args:
        units: :func:`model_units`. bootstrap: resamples (0: no bootstrap intervals). seed: of the resampling.

    Returns:
        Columns ``level, unit, component, variance_pct2, sd_pct, sd_low_pct, sd_high_pct, share, methods, seeds``
        (``seeds``: models measured for the unit).
    """
    arrays = _Arrays(units)
    point = arrays.components()
    seed_low, seed_high = _seed_interval(point)
    draws = [arrays.components(arrays.resample(rng)) for rng in _generators(bootstrap, seed)]
    models = units.groupby(["level", "unit"], sort=False).agg(methods=("method", "nunique"), seeds=("model_id", "size"))
    out = []
    for i, (level, unit) in enumerate(arrays.keys):
        values = {c: point[c][i] for c in COMPONENTS}
        total = sum(max(v, 0.0) for v in values.values() if np.isfinite(v))
        for component in COMPONENTS:
            variance = max(values[component], 0.0) if np.isfinite(values[component]) else np.nan
            sampled = np.sqrt(np.clip([d[component][i] for d in draws], 0.0, None)) if draws else np.array([])
            sampled = sampled[np.isfinite(sampled)]
            low, high = np.quantile(sampled, [ALPHA / 2, 1 - ALPHA / 2]) if len(sampled) else (np.nan, np.nan)
            if component == "seed":
                low, high = seed_low[i], seed_high[i]
            out.append({"level": level, "unit": unit, "component": component, "variance_pct2": variance,
                        "sd_pct": float(np.sqrt(variance)), "sd_low_pct": float(low), "sd_high_pct": float(high),
                        "share": variance / total if total > 0 else np.nan,
                        "methods": int(models.loc[(level, unit), "methods"]),
                        "seeds": int(models.loc[(level, unit), "seeds"])})
    return pd.DataFrame(out)


def _seed_interval(point: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per unit, the 95% interval of the seed SD: the χ² interval of the pooled variance of model means (``df``
    degrees of freedom), less the measurement variance the point estimate subtracts, clipped at 0."""
    pooled, df = point["pooled_seed_var"], point["df"]
    valid = df > 0
    dof = np.where(valid, df, 1.0)
    measurement = np.where(valid, pooled - point["seed"], 0.0)
    low = np.sqrt(np.clip(dof * pooled / stats.chi2.ppf(1 - ALPHA / 2, dof) - measurement, 0.0, None))
    high = np.sqrt(np.clip(dof * pooled / stats.chi2.ppf(ALPHA / 2, dof) - measurement, 0.0, None))
    return np.where(valid, low, np.nan), np.where(valid, high, np.nan)


def method_effects(units: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """Each method's effect on criticality against ``baseline`` (a method or a model id of it), per unit.

    Returns:
        Columns ``level, unit, method, seeds, baseline_seeds, effect_pct`` (mean over seeds minus the baseline's),
        ``ci_pct`` (95% half-width counting seed variance), ``low_pct, high_pct``, ``seed_sd_pct`` (pooled SD of
        model means over seeds), ``effect_over_seed_sd``, ``df`` and ``verdict`` (``higher``, ``lower``, or ``not
        told apart`` when the interval holds 0); ``welch_ci_pct`` and ``welch_df``: Welch's half-width and degrees
        of freedom from the two methods' own seeds (NaN unless each has two or more).
    """
    base = method_and_seed(baseline)[0]
    if base not in set(units["method"]):
        raise LayercritError(f"baseline {baseline!r} is not among the measured methods: pick one of "
                             f"{', '.join(dict.fromkeys(units['method']))}")
    arrays = _Arrays(units)
    point = arrays.components()
    pooled = {key: (point["pooled_seed_var"][i], point["df"][i]) for i, key in enumerate(arrays.keys)}
    out = []
    for (level, unit), group in units.groupby(["level", "unit"], sort=False):
        means = group.groupby("method", sort=False)["mean"].agg(["mean", "count", "var"])
        if base not in means.index:
            continue
        var, df = pooled[(level, unit)]
        sd = float(np.sqrt(var))
        t = stats.t.ppf(1 - ALPHA / 2, df) if df > 0 else np.nan
        for method, (mean, count, spread) in means.drop(index=base).iterrows():
            effect = float(mean - means.loc[base, "mean"])
            half = float(t * sd * np.sqrt(1 / count + 1 / means.loc[base, "count"]))
            welch_half, welch_df = _welch(spread, count, means.loc[base, "var"], means.loc[base, "count"])
            verdict = ("not told apart" if not np.isfinite(half) or abs(effect) <= half
                       else "higher" if effect > 0 else "lower")
            out.append({"level": level, "unit": unit, "method": method, "seeds": int(count),
                        "baseline_seeds": int(means.loc[base, "count"]), "effect_pct": effect, "ci_pct": half,
                        "low_pct": effect - half, "high_pct": effect + half, "seed_sd_pct": sd,
                        "effect_over_seed_sd": effect / sd if sd > 0 else np.nan, "df": int(df), "verdict": verdict,
                        "welch_ci_pct": welch_half, "welch_df": welch_df})
    return pd.DataFrame(out)


def _welch(var_a: float, n_a: float, var_b: float, n_b: float) -> tuple[float, float]:
    """Welch's 95% half-width and Welch–Satterthwaite degrees of freedom for a difference of two means (NaN
    unless both sides have two or more values)."""
    if n_a < 2 or n_b < 2:
        return np.nan, np.nan
    a, b = var_a / n_a, var_b / n_b
    if a + b == 0:
        return 0.0, np.nan
    df = (a + b) ** 2 / (a**2 / (n_a - 1) + b**2 / (n_b - 1))
    return float(stats.t.ppf(1 - ALPHA / 2, df) * np.sqrt(a + b)), float(df)


def _mean(values: np.ndarray) -> np.ndarray:
    """Row means over the finite entries (NaN for a row with none)."""
    finite = np.isfinite(values)
    with np.errstate(invalid="ignore"):
        return np.where(finite, values, 0.0).sum(axis=1) / finite.sum(axis=1)


def _generators(count: int, seed: int) -> list[np.random.Generator]:
    return [np.random.default_rng([seed, i]) for i in range(count)]


def seed_analysis(rows: pd.DataFrame, baseline: str | None, *, value: str = "criticality_pct",
                  image: bool = True, bootstrap: int = BOOTSTRAP) -> dict[str, pd.DataFrame]:
    """The variance components and, given a ``baseline``, the method effects of trial ``rows`` whose model ids name
    training seeds (``ID@seedN``). ``image``: the rows' ``criticality_sd`` is of ``value`` (the cos metric), so
    the image component can be read from it."""
    units = model_units(rows if image else rows.drop(columns="criticality_sd", errors="ignore"), value=value)
    tables = {"variance_components": variance_components(units, bootstrap=bootstrap)}
    if baseline is not None:
        tables["method_effects"] = method_effects(units, baseline)
    return tables
