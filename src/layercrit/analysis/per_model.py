"""The per-model table: each model's mean criticality with its interval, and its metadata, taken from the given
file, the results' own columns and the zoo registries (matched by the model's spec); the baseline and the order of
the rows."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from ..errors import LayercritError
from . import contrasts, variance
from .inputs import (
    BASELINE_CATEGORY,
    META_FIELDS,
    ORIGINAL,
    OTHER,
    _norm_name,
    load_meta,
    parse_budget,
)
from .per_layer import (
    _measurements,
    layer_criticality,
    model_intervals,
    stage_of,
)


def model_criticality(
    results: pd.DataFrame,
    metric: str = "cos",
    *,
    meta: Any = None,
    baseline: str | None = None,
    reset: str | None = None,
    registry: bool = True,
    order: str = "notebook",
) -> pd.DataFrame:
    """Per model: average criticality over its layers, accuracy, category and display name, in figure order.

    Args:
        results: results rows; a model's ``original`` row supplies its accuracy when the metadata has none.
        metric, reset: as in :func:`layer_criticality`.
        meta: model metadata in any form :func:`load_meta` takes, over any ``category, display, accuracy, budget,
            norm`` columns of the results (a sweep store exports them); models without either get category "other".
        baseline: model_id shown first; by default the one model of category "baseline", if there is one.
        registry: fill what ``meta`` and the results leave empty from the bundled zoos' records, for model ids of
            the paper's zoo or the Fashion-MNIST zoo (``tv_resnet50``, ``zoo:paper/tv_resnet50``, see
            :func:`registry_meta`).
        order: ``notebook`` (the paper's notebook: baseline first, then categories in alphabetical order, models by
            model_id; "other" last) or ``metadata`` (baseline first, then categories and models in the order the
            metadata lists them, zoo records in zoo order after them).

    Returns:
        Columns ``model_id, display, category, accuracy`` (percent), ``accuracy_source`` (``metadata``,
        ``zoo:paper``/``zoo:fmnist`` or ``original``), ``avg_criticality_pct`` (mean over layers of the per-layer
        mean, %), ``avg_criticality_ci_pct`` (95% half-width, %), ``std_over_layers_pct, layers, budget, norm,
        is_baseline, registry`` (the zoo that knows the model) and any other metadata fields, in ``order``.
    """
    return _summarize(layer_criticality(results, metric, reset=reset), results, load_meta(meta), baseline,
                      model_intervals(results, metric, reset=reset), registry=registry, order=order)


ORDERS = ("notebook", "metadata")
REGISTRY_ZOOS = ("paper", "fmnist")


def registry_meta(model_ids: Sequence[str], specs: dict[str, str] | None = None) -> pd.DataFrame:
    """What the bundled zoos' records say about these models (:func:`layercrit.zoo.entries`).

    A model is matched by its spec (``specs[model_id]``, the rows' ``model_spec``): ``zoo:ZOO/ID`` is looked up in
    its zoo, and any other spec (a user's checkpoint, whatever its id) matches nothing. Without a spec (the paper's
    CSV format), the id itself: ``zoo:ZOO/ID`` in its zoo, a plain id in every zoo, used only when exactly one zoo
    has it. A zoo that cannot be read (the Fashion-MNIST zoo when it is not installed) is skipped.

    Returns:
        Columns ``model_id``, :data:`META_FIELDS` and ``registry`` (``zoo:paper``, ``zoo:fmnist``), one row per
        known id, in zoo order then record order; unknown ids are left out.
    """
    from .. import zoo

    records: dict[str, dict[str, dict]] = {}
    for name in REGISTRY_ZOOS:
        try:
            records[name] = {str(entry["id"]): entry for entry in zoo.entries(name, replicates=True)}
        except LayercritError:
            continue
    rows = []
    for model_id in dict.fromkeys(map(str, model_ids)):
        spec = (specs or {}).get(model_id)
        key = str(spec) if isinstance(spec, str) and spec else model_id
        zoo_name, _, plain = key.removeprefix("zoo:").partition("/")
        if key.startswith("zoo:"):
            owners = [zoo_name] if plain in records.get(zoo_name, {}) else []
        elif key != model_id:
            owners = []  # a spec outside the zoos: the id is the user's own name
        else:
            plain, owners = model_id, [name for name, known in records.items() if model_id in known]
        if len(owners) == 1:
            record = records[owners[0]][plain]
            rank = (REGISTRY_ZOOS.index(owners[0]), list(records[owners[0]]).index(plain))
            rows.append({"model_id": model_id, **{field: record.get(field) for field in META_FIELDS},
                         "registry": f"zoo:{owners[0]}", "_rank": rank})
    table = pd.DataFrame(rows, columns=["model_id", *META_FIELDS, "registry", "_rank"])
    return table.sort_values("_rank", kind="stable").drop(columns="_rank").reset_index(drop=True)


def _summarize(layers: pd.DataFrame, results: pd.DataFrame, meta: pd.DataFrame, baseline: str | None,
               intervals: pd.Series, *, registry: bool = True, order: str = "notebook") -> pd.DataFrame:
    if order not in ORDERS:
        raise LayercritError(f"unknown row order {order!r}: one of {', '.join(ORDERS)}")
    meta = _with_embedded_meta(meta, results)
    per_model = layers.groupby("model_id", sort=False)["criticality_pct"]
    models = pd.DataFrame({"avg_criticality_pct": per_model.mean(), "std_over_layers_pct": per_model.std(ddof=0),
                           "layers": per_model.count()}).reset_index()
    models.insert(2, "avg_criticality_ci_pct", models["model_id"].map(intervals))
    models = models.merge(meta, on="model_id", how="left")
    from_meta = models["accuracy"].notna()
    specs = (results.dropna(subset=["model_spec"]).groupby("model_id", sort=False)["model_spec"].first().to_dict()
             if "model_spec" in results.columns else {})
    known = registry_meta(models["model_id"], specs) if registry else registry_meta([])
    models = _with_registry(models, known)
    from_registry = models["accuracy"].notna() & ~from_meta
    models["category"] = [str(c) if pd.notna(c) else OTHER for c in models["category"]]
    models["display"] = [str(d) if pd.notna(d) else m for d, m in zip(models["display"], models["model_id"], strict=True)]
    models["display"] = _with_seed_labels(models["display"], models["model_id"])
    models["accuracy"] = models["accuracy"].fillna(models["model_id"].map(_original_accuracy(results)))
    source = np.where(from_meta, "metadata", np.where(from_registry, models["registry"].astype(str), ORIGINAL))
    models["accuracy_source"] = pd.Series(source, index=models.index).where(models["accuracy"].notna())
    budgets = [parse_budget(value) for value in models["budget"]]
    models["budget"] = [epsilon for _, epsilon in budgets]
    models["norm"] = [_norm_name(given) if isinstance(given, str) else parsed
                      for given, (parsed, _) in zip(models["norm"], budgets, strict=True)]
    baseline = _resolve_baseline(baseline, models)
    models["is_baseline"] = models["model_id"] == baseline
    models = _presentation_order(models, [*meta["model_id"], *known["model_id"]], order)
    first = ["model_id", "display", "category", "accuracy", "accuracy_source", "avg_criticality_pct",
             "avg_criticality_ci_pct", "std_over_layers_pct", "layers", "budget", "norm", "is_baseline", "registry"]
    return models[first + [c for c in models.columns if c not in first]]


def _with_registry(models: pd.DataFrame, known: pd.DataFrame) -> pd.DataFrame:
    """``models`` with the metadata fields still empty taken from the zoo records in ``known``."""
    records = known.set_index("model_id").reindex(models["model_id"])
    models = models.assign(registry=records["registry"].to_numpy())
    for field in META_FIELDS:
        models[field] = models[field].astype(object).where(models[field].notna(), records[field].to_numpy())
    models["accuracy"] = pd.to_numeric(models["accuracy"], errors="coerce")
    return models


def _with_embedded_meta(meta: pd.DataFrame, results: pd.DataFrame) -> pd.DataFrame:
    """Fill gaps in ``meta`` from per-model fields the results carry (a sweep store exports each model's category,
    display, accuracy, budget); the given metadata wins field by field and keeps its order."""
    fields = [field for field in META_FIELDS if field in results.columns]
    if not fields:
        return meta
    embedded = load_meta(results.drop_duplicates("model_id")[["model_id", *fields]])
    merged = meta.set_index("model_id").combine_first(embedded.set_index("model_id"))
    order = list(dict.fromkeys([*meta["model_id"], *embedded["model_id"]]))
    return merged.reindex(order).rename_axis("model_id").reset_index()


def _original_accuracy(results: pd.DataFrame) -> pd.Series:
    if "top1_acc" not in results.columns:
        return pd.Series(dtype=float)
    original = results[results["layer"] == ORIGINAL]
    return original.groupby("model_id", sort=False)["top1_acc"].first().astype(float)


def _resolve_baseline(baseline: str | None, models: pd.DataFrame) -> str | None:
    ids = list(models["model_id"])
    if baseline is not None:
        if baseline not in ids:
            shown = ", ".join(ids[:8]) + (", ..." if len(ids) > 8 else "")
            raise LayercritError(f"baseline {baseline!r} is not among the results' models ({shown}): pick one of them")
        return baseline
    candidates = models.loc[models["category"] == BASELINE_CATEGORY, "model_id"]
    identities = [variance.method_and_seed(model_id) for model_id in candidates]
    if len({method for method, _ in identities}) != 1:
        return None
    return min(zip(candidates, identities, strict=True), key=lambda pair: pair[1][1])[0]  # seeds of one: seed 0


def _with_seed_labels(displays: pd.Series, model_ids: pd.Series) -> list[str]:
    """Display names that tell training seeds apart: ``Baseline (seed 1)`` for every model of a method measured in
    two or more seeds (``ID@seedN``; seed 0 too), the name unchanged otherwise, and unchanged where it is an id that
    already spells its seed (``baseline@seed1``)."""
    identities = [variance.method_and_seed(m) for m in model_ids]
    counts = pd.Series([method for method, _ in identities]).value_counts()
    spells_its_seed = [seed != 0 and str(d) == str(m) for d, m, (_, seed) in zip(displays, model_ids, identities,
                                                                               strict=True)]
    return [f"{d} (seed {seed})" if counts[method] >= 2 and not spelled else str(d)
            for d, spelled, (method, seed) in zip(displays, spells_its_seed, identities, strict=True)]


def _presentation_order(models: pd.DataFrame, meta_ids: list[str], order: str) -> pd.DataFrame:
    """The baseline first, then its method's other training seeds; then, ``notebook``: categories alphabetically ("other"
    last), within one the models by norm and training budget, numerically, then by model_id with its numbers compared
    as numbers (the paper's notebook sorts by category and model_id, then moves the baseline up: L∞ 2, 8, 24 here,
    not 2, 24, 8), a method's training seeds (``ID@seedN``) together in seed order; ``metadata``: categories in the
    order of their first model in ``meta_ids`` ("other" last), models in that order."""
    identities = [variance.method_and_seed(m) for m in models["model_id"]]
    methods = pd.Series([method for method, _ in identities], index=models.index)
    baseline_method = set(methods[models["is_baseline"]])
    first = methods.isin(baseline_method)
    if order == "notebook":
        keys = pd.DataFrame({"baseline": np.where(models["is_baseline"], 0, np.where(first, 1, 2)),
                             "other": models["category"] == OTHER,
                             "category": models["category"], "norm": models["norm"].fillna("").astype(str),
                             "budget": models["budget"].astype(float),
                             "method": [_natural_key(m) for m in methods],
                             "seed": [seed for _, seed in identities]})
        return models.loc[keys.sort_values(list(keys.columns), kind="stable", na_position="first").index].reset_index(
            drop=True)
    meta_rank = {m: i for i, m in enumerate(dict.fromkeys(meta_ids))}
    rank = pd.Series([meta_rank.get(m, len(meta_rank) + i) for i, m in enumerate(models["model_id"])],
                     index=models.index, dtype=float)
    rank[first] = -1 + rank[first] / (len(rank) + len(meta_rank) + 1)  # the baseline's seeds first, in their order
    rank[models["is_baseline"]] = -1
    models = models.assign(_rank=rank).sort_values("_rank", kind="stable")
    category_rank = {c: i for i, c in enumerate(pd.unique(models["category"]))}
    models["_category"] = models["category"].map(category_rank)
    return models.sort_values(["_category", "_rank"], kind="stable").drop(columns=["_rank", "_category"]).reset_index(
        drop=True)


_NUMBER = re.compile(r"(\d+(?:\.\d+)?)")


def _natural_key(text: str) -> str:
    """``text`` with each number zero-padded, so that text order is numeric order (``eps8`` before ``eps24``)."""
    def pad(match: re.Match) -> str:
        whole, _, fraction = match.group(1).partition(".")
        return f"{int(whole):012d}" + (f".{fraction}" if fraction else "")
    return _NUMBER.sub(pad, str(text))


def model_aggregates(results: pd.DataFrame, metric: str = "cos", *, reset: str | None = None,
                     baseline: str | None = None) -> pd.DataFrame:
    """Each model's mean criticality over all layers and each stage (:func:`stage_of`), its depth shift, and each
    minus the baseline's, in percent with 95% intervals (:func:`layercrit.analysis.contrasts.aggregate_table`)."""
    rows = _measurements(results, metric, reset)
    value = "criticality" if metric == "cos" else "_value"  # only cos criticality is known to lie in [0, 1]
    return contrasts.aggregate_table(rows.assign(**{value: rows["_crit"] / 100.0}),
                                     {name: stage_of(name) for name in rows["layer"].unique()}, baseline=baseline,
                                     value=value)
