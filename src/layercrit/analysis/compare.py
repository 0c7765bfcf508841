"""Two measurements of the same model side by side, per layer: ``layercrit diff A B``.

Each side's estimate is :func:`layercrit.measurement.estimate.layer_table`'s: the mean criticality over reset draws
with the layer's own 95% interval. The difference is ``B − A`` with its interval from
:class:`layercrit.measurement.aggregate.Trials`, built from both sides' trial rows:

* **paired** where A and B share trials: the same reset draw on the same images (same seed, trial, image block and
  data), as two runs of one model at fp32 and bf16, or under two BatchNorm modes, are. The interval is then the
  t-interval of the per-trial differences, which removes the spread over resets and images that both sides share;
  this is what can detect a small change.
* **unpaired** where they share none (another seed, other images, other blocks): the estimates are independent, and
  the interval is Welch's.

Runs of the sequential design share the pilot's trials, and the later ones only when their blocks are the same size
(``--images-per-trial`` fixed, not chosen per run). :func:`conditions` names what differs between A and B.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from ..errors import LayercritError
from ..measurement.aggregate import Estimate, Trials, mean_weights
from ..measurement.estimate import layer_table

COLUMNS = ("layer", "criticality_a", "criticality_ci_a", "criticality_b", "criticality_ci_b", "difference",
           "difference_ci", "difference_low", "difference_high", "shared_trials", "paired", "significant")
# What a side's rows say about how they were made: (name shown, columns, as far as the rows carry them).
CONDITIONS = (
    ("model", ("model_spec",)),
    ("precision", ("precision",)),
    ("engine", ("engine",)),
    ("reset", ("reset",)),
    ("data", ("data_id",)),
    ("seed", ("seed",)),
    ("design", ("target_ci", "ci_looks")),
    ("images per trial", ("n_images",)),
    ("layercrit version", ("layercrit_version",)),
)


def compare(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """Per layer (in A's order, then B's other layers): each side's criticality and 95% half-width (fractions),
    ``difference`` = B − A, its 95% ``difference_ci`` and ends ``difference_low/high`` (clipped to [−1, 1]),
    ``shared_trials`` (the trials of this layer A and B share: same draw, same images), ``paired`` (they share all
    of them, see the module docstring) and ``significant`` (the interval of the difference excludes 0).

    Each side must hold one model and one reset (one run); split a sweep's table by model_id first.
    """
    sides = [_one_run(rows, name) for rows, name in ((a, "A"), (b, "B"))]
    merged = sides[0].merge(sides[1], on="layer", how="outer", suffixes=("_a", "_b"), sort=False)
    order = {layer: i for i, layer in enumerate([*sides[0].layer, *sides[1].layer])}
    merged = merged.sort_values("layer", key=lambda s: s.map(order), kind="stable").reset_index(drop=True)
    trials, common = _trials(a, b), set(sides[0].layer) & set(sides[1].layer)
    differences = [trials.estimate({("B", layer): 1.0, ("A", layer): -1.0}) if layer in common else None
                   for layer in merged.layer]
    nan = float("nan")
    merged["difference"] = [d.value if d else nan for d in differences]
    merged["difference_ci"] = [d.half_width if d else nan for d in differences]
    merged["difference_low"] = [d.low if d else nan for d in differences]
    merged["difference_high"] = [d.high if d else nan for d in differences]
    merged["shared_trials"] = [trials.shared(("A", layer), ("B", layer)) if layer in common else 0
                               for layer in merged.layer]
    merged["paired"] = [layer in common and trials.shared(("A", layer), ("B", layer)) == max(
        trials.trials(("A", layer)), trials.trials(("B", layer))) for layer in merged.layer]
    merged["significant"] = [bool(d and d.excludes_zero) for d in differences]
    return merged[list(COLUMNS)]


def mean_difference(a: pd.DataFrame, b: pd.DataFrame) -> Estimate:
    """B − A of the mean criticality over the layers both sides measured, paired as the layers are."""
    common = [layer for layer in dict.fromkeys(_layers(a)) if layer in set(_layers(b))]
    if not common:
        raise LayercritError("A and B have no layer in common: compare two runs of the same model")
    weights = mean_weights(common)
    return _trials(a, b).estimate({**{("B", layer): w for layer, w in weights.items()},
                                   **{("A", layer): -w for layer, w in weights.items()}})


@dataclass(frozen=True)
class Condition:
    """One way the two runs were made: its values in A and in B (text), and whether they differ."""

    name: str
    a: str
    b: str

    @property
    def differs(self) -> bool:
        return self.a != self.b


def conditions(a: pd.DataFrame, b: pd.DataFrame) -> list[Condition]:
    """How A and B were made, as far as both sides' rows say (:data:`CONDITIONS`; the model by its spec, else its
    ``model_id``)."""
    out = []
    for name, columns in CONDITIONS:
        if name == "model" and not all("model_spec" in rows for rows in (a, b)):
            columns = ("model_id",)
        if all(all(column in rows for column in columns) for rows in (a, b)):
            out.append(Condition(name, _values(a, columns), _values(b, columns)))
    return out


def _values(rows: pd.DataFrame, columns: tuple[str, ...]) -> str:
    rows = rows[rows.layer != "original"]
    parts = []
    for column in columns:
        values = sorted({str(v) for v in rows[column].dropna().unique()}, key=_natural)
        parts.append(", ".join(values[:3]) + (f", ... ({len(values)} values)" if len(values) > 3 else "")
                     if values else "none")
    return "; ".join(parts)


def _natural(text: str) -> tuple:
    try:
        return (0, float(text), text)
    except ValueError:
        return (1, 0.0, text)


def _trials(a: pd.DataFrame, b: pd.DataFrame) -> Trials:
    both = pd.concat([_as_criticality(a).assign(_side="A"), _as_criticality(b).assign(_side="B")], ignore_index=True)
    return Trials(both, ["_side", "layer"])


def _as_criticality(rows: pd.DataFrame) -> pd.DataFrame:
    if "criticality" not in rows and "pred_cos_sim" in rows:  # the paper's CSV format
        return rows.assign(criticality=1.0 - rows["pred_cos_sim"])
    return rows


def _layers(rows: pd.DataFrame) -> list[str]:
    return list(rows.loc[rows.layer != "original", "layer"])


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
