"""The numbers a reader compares across models: each model's mean criticality over all its layers and over each
stage, its *depth shift* (the last stage minus the mean of the stem and the first stage), and each of these minus
the baseline's, every one with its 95% interval from the trial-level rows
(:class:`layercrit.measurement.aggregate.Trials`: paired where trials share draws and images, so a stage's interval
is that of its layers' mean, not the mean of their intervals).

Stages come from the layers' names (``stage_of`` in :mod:`layercrit.analysis.tables`: ``layer1``, ``stages.2``, ...,
``stem`` and ``head``); layers without one (groups, cumulative targets, unknown families) count in the mean only.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import pandas as pd

from ..measurement.aggregate import Estimate, Trials, combine, mean_weights

ALL_LAYERS = "all layers"
DEPTH_SHIFT = "depth shift"
STEM, HEAD = "stem", "head"
COLUMNS = ["model_id", "aggregate", "layers", "criticality_pct", "criticality_ci_pct", "criticality_low_pct",
           "criticality_high_pct", "minus_baseline_pct", "minus_baseline_ci_pct", "minus_baseline_low_pct",
           "minus_baseline_high_pct", "paired", "differs"]


def aggregate_weights(layers: list[str], stages: Mapping[str, str | None]) -> dict[str, dict[Hashable, float]]:
    """One model's aggregates as weights over its ``layers`` (network order): ``all layers``, each stage (in network
    order), and ``depth shift`` when the layers span at least two numbered stages."""
    by_stage: dict[str, list[str]] = {}
    for layer in layers:
        if stages.get(layer):
            by_stage.setdefault(stages[layer], []).append(layer)
    out = {ALL_LAYERS: mean_weights(layers), **{name: mean_weights(members) for name, members in by_stage.items()}}
    numbered = [name for name in by_stage if name not in (STEM, HEAD)]
    if len(numbered) >= 2:
        early = [mean_weights(by_stage[name]) for name in ((STEM,) if STEM in by_stage else ()) + (numbered[0],)]
        out[DEPTH_SHIFT] = combine((1.0, out[numbered[-1]]), *((-1.0 / len(early), w) for w in early))
    return out


def aggregate_table(rows: pd.DataFrame, stages: Mapping[str, str | None], *, baseline: str | None = None,
                    value: str = "criticality") -> pd.DataFrame:
    """Per model and aggregate (:func:`aggregate_weights`): the estimate with its 95% interval (percent; ends
    clipped to the aggregate's range for ``criticality``) and, with a ``baseline`` model id, the same aggregate
    minus the baseline's, ``paired`` (the two share trials) and ``differs`` (its interval excludes 0).

    Args:
        rows: results rows (``model_id, layer, trial``, ``value``; ``original`` rows are ignored).
        stages: layer name → stage (``None``: no stage).
        baseline: the model the others are compared with.
        value: the column estimated, a fraction (criticality: 1 − cosine similarity).
    """
    trials = Trials(rows, ["model_id", "layer"], value=value, bounds=(0.0, 1.0) if value == "criticality" else None)
    layers: dict[str, list[str]] = {}
    for model_id, layer in trials.units:
        layers.setdefault(model_id, []).append(layer)
    weights = {model_id: {name: {(model_id, layer): w for layer, w in ws.items()}
                          for name, ws in aggregate_weights(names, stages).items()}
               for model_id, names in layers.items()}
    table = []
    for model_id, aggregates in weights.items():
        for name, w in aggregates.items():
            own = trials.estimate(w)
            row = {"model_id": model_id, "aggregate": name, "layers": len(w), **_percent("criticality", own)}
            reference = weights.get(baseline, {}).get(name)
            if reference is not None and model_id != baseline:
                difference = trials.estimate(combine((1.0, w), (-1.0, reference)))
                row.update(_percent("minus_baseline", difference), paired=difference.paired,
                           differs=difference.excludes_zero)
            table.append(row)
    return pd.DataFrame(table, columns=COLUMNS)


def _percent(prefix: str, estimate: Estimate) -> dict[str, float]:
    return {f"{prefix}_pct": 100 * estimate.value, f"{prefix}_ci_pct": 100 * estimate.half_width,
            f"{prefix}_low_pct": 100 * estimate.low, f"{prefix}_high_pct": 100 * estimate.high}
