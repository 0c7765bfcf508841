"""Two measurements of the same model side by side, per layer: ``layercrit diff A B``.

Each side's estimate is :func:`layercrit.measurement.estimate.layer_table`'s: the mean criticality over reset draws with its
95% half-width. The difference is ``B − A``; its half-width combines the two in quadrature,
``sqrt(h_A² + h_B²)``, which is the 95% half-width of a difference of two independent, normally distributed
estimates (it treats the t quantiles of each side as the normal's, so with few trials it is the sides' own
t-intervals that carry the small-sample width). Two runs that share their reset draws (same seed and trials) are
positively correlated, and the interval is then conservative. A layer measured on one side only has no difference.
"""

from __future__ import annotations

import math

import pandas as pd

from ..errors import LayercritError
from ..measurement.estimate import layer_table

COLUMNS = ("layer", "criticality_a", "criticality_ci_a", "criticality_b", "criticality_ci_b", "difference",
           "difference_ci", "significant")


def compare(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """Per layer (in A's order, then B's other layers): each side's criticality and 95% half-width (fractions),
    ``difference`` = B − A, ``difference_ci`` (see the module docstring) and ``significant`` (the interval of the
    difference excludes 0).

    Each side must hold one model and one reset (one run); split a sweep's table by model_id first.
    """
    sides = [_one_run(rows, name) for rows, name in ((a, "A"), (b, "B"))]
    merged = sides[0].merge(sides[1], on="layer", how="outer", suffixes=("_a", "_b"), sort=False)
    order = {layer: i for i, layer in enumerate([*sides[0].layer, *sides[1].layer])}
    merged = merged.sort_values("layer", key=lambda s: s.map(order), kind="stable").reset_index(drop=True)
    merged["difference"] = merged.criticality_b - merged.criticality_a
    merged["difference_ci"] = [math.hypot(x, y) for x, y in zip(merged.criticality_ci_a, merged.criticality_ci_b,
                                                                  strict=True)]
    merged["significant"] = merged.difference.abs() > merged.difference_ci
    return merged[list(COLUMNS)]


def _one_run(rows: pd.DataFrame, name: str) -> pd.DataFrame:
    for column in ("model_id", "reset", "alpha"):
        if column in rows and rows[column].nunique() > 1:
            values = ", ".join(map(str, rows[column].unique()[:4]))
            raise LayercritError(f"{name} holds several values of {column} ({values}): compare one run with one "
                                 "other (export one model's rows, or give run folders)")
    return layer_table(rows, by=[])[["layer", "criticality", "criticality_ci"]]



def check_comparable(a: pd.DataFrame, b: pd.DataFrame) -> None:
    """Refuse, in one line, two runs of different models (their ``model_spec``s differ; ``model_id`` may, as
    ``--model-id fp32`` and ``bf16`` do) and two runs without a layer in common: there is no difference to compute,
    only a table of missing numbers."""
    if "model_spec" in a and "model_spec" in b:
        specs = [rows.model_spec.dropna().unique() for rows in (a, b)]
        if all(len(spec) == 1 for spec in specs) and specs[0][0] != specs[1][0]:
            raise LayercritError(f"A is model {specs[0][0]!r}, B {specs[1][0]!r}: diff compares two runs of one model "
                                 "(other resets, seeds or designs); compare models with layercrit analyze")
    layers = [[layer for layer in rows.layer.unique() if layer != "original"] for rows in (a, b)]
    if not set(layers[0]) & set(layers[1]):
        raise LayercritError(f"A and B have no layer in common (A: {_few(layers[0])}; B: {_few(layers[1])}): diff "
                             "compares the same layers of two runs")


def _few(names: list) -> str:
    return ", ".join(map(str, names[:4])) + (f" (+{len(names) - 4} more)" if len(names) > 4 else "") or "none"
