"""Analysis: criticality tables, per-model summaries and their correlation with accuracy, from any results.

Reads layercrit's results (CSV, Parquet, a run folder, a SQLite store) or a CSV in the paper's published format
(``model_id, layer, trial, pred_cos_sim, recovered_acc, ...``) and, with :func:`analyze`, writes the paper's tables,
figures and a self-contained HTML report. Criticality is in percent throughout: by default
100 × (1 − cosine similarity of the reset model's softmax to the unmodified model's).

Spreads follow the paper's code: the std over trials is the sample std (ddof=1, NaN for a single trial); the
std over layers or over models is the population std (ddof=0), as in its figure margins.

Each job has its module: :mod:`~layercrit.analysis.inputs` (results and metadata in),
:mod:`~layercrit.analysis.per_layer` and :mod:`~layercrit.analysis.per_model` (the two tables),
:mod:`~layercrit.analysis.correlation` (what is derived from them); this one runs them all (:func:`analyze`) and
names the public functions of the analysis in one place.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..results import write_table
from . import plots, report, variance
from .correlation import correlations, criticality_matrix, depth_profile
from .inputs import (
    AXIS_LABELS,
    CI_THRESHOLD,
    META_FIELDS,
    METRICS,
    MIN_CORRELATION_MODELS,
    ORIGINAL,
    load_meta,
    load_results,
    parse_budget,
)
from .per_layer import (
    _measurements,
    display_layer,
    interpolation_area,
    interpolation_curves,
    layer_criticality,
    layer_order,
    model_intervals,
    stage_of,
)
from .per_model import _summarize, model_aggregates, model_criticality, registry_meta

# The analysis's public functions, wherever they are defined in the package.
__all__ = ["META_FIELDS", "METRICS", "analyze", "correlations", "criticality_matrix", "depth_profile",
           "display_layer", "interpolation_area", "interpolation_curves", "layer_criticality", "layer_order",
           "load_meta", "load_results", "model_aggregates", "model_criticality", "model_intervals", "parse_budget",
           "registry_meta", "run_conditions", "stage_of", "summary"]

HEATMAP_EXCLUDE = ("freezing",)  # the notebook leaves the frozen random backbone out of its figures

FIGURE_CAPTIONS = {
    "heatmap": "Layer criticality (mean over trials) per model and layer, full page width (7 in); grey margins: mean "
               "± std over layers (right) and over models (bottom); a dot marks a cell whose 95% interval over "
               "resets is wider than ±{ci_threshold:g} points.{excluded}",
    "heatmap_column": "The same at one column's width (3.3 in): every k-th layer named, long model names shortened.",
    "heatmap_std": "Standard deviation of the criticality over trials, on a fixed 0–100 scale.{excluded}",
    "heatmap_delta": "Criticality minus the baseline's, per layer.{excluded}",
    "accuracy_vs_criticality": "Average criticality vs accuracy, by category; legend: rank correlations over all "
                               "models.",
    "budget_vs_criticality": "Average criticality vs training budget (ε), one panel per norm (L∞ in 1/255); the "
                             "model trained with ε = 0 appears in every panel.",
    "depth_vs_criticality": "Criticality over relative depth per category (mean ± std over models).",
    "variance_components": "SD of criticality from the training method, the seed within a method, the reset and "
                           "the image (one image under one reset), per stage and per layer, with 95% intervals (the "
                           "seed component's from the χ² distribution, the others' by bootstrap over seeds).",
}


SEED_TABLES = {"variance_components": "Variance components over training methods and seeds",
               "method_effects": "Method effects against the baseline, counting seed variance"}


def analyze(
    results: pd.DataFrame | str | Path | Sequence[str | Path],
    out_dir: str | Path,
    *,
    meta: Any = None,
    baseline: str | None = None,
    metric: str = "cos",
    reset: str | None = None,
    layer_info: Mapping[str, Any] | None = None,
    ci_threshold: float = CI_THRESHOLD,
    registry: bool = True,
    order: str = "notebook",
    heatmap_exclude: Sequence[str] = HEATMAP_EXCLUDE,
    heatmap_note: str = "",
    pdf: bool = True,
) -> dict[str, Any]:
    """Write every table, figure and ``report.html`` for ``results`` into ``out_dir``.

    Args:
        results: a DataFrame or results paths (CSV, Parquet, SQLite store, run folder; layercrit's or the paper's
            CSV format).
        out_dir: created if needed. Tables are written first, then figures (PNG, and PDF unless ``pdf`` is
            False: the PDFs take half of the figures' time), then the report.
        meta, baseline, registry, order: as in :func:`model_criticality`; ``metric``, ``reset``, ``layer_info`` as
            in :func:`layer_criticality`.
        ci_threshold: heatmap cells whose 95% interval is wider than ± this (percentage points) are marked.
        heatmap_exclude: categories left out of the heatmaps and their margins (default: ``freezing``, the frozen
            random backbone, as in the paper's notebook); they stay in the tables and the other figures.
        heatmap_note: a sentence added to the heatmap's caption (what the caller knows about its design).

    Returns:
        ``{"layers", "models", "aggregates", "correlations", "profile"}`` DataFrames, ``"stats"`` (what
        ``stats.json`` holds),
        ``"paths"`` (name → written file, figures as (png, pdf)) and ``"figures"`` (name → Figure); when some
        method was measured in two or more training seeds (model ids ``ID@seedN``), also ``"variance_components"``
        and (with a baseline) ``"method_effects"`` (:mod:`layercrit.analysis.variance`), written as CSV with the
        figure ``variance_components``.
    """
    frame = load_results(results)
    layers = layer_criticality(frame, metric, reset=reset, layer_info=layer_info)
    models = _summarize(layers, frame, load_meta(meta), baseline, model_intervals(frame, metric, reset=reset),
                        registry=registry, order=order)
    correlation = correlations(models)
    profile = depth_profile(layers, models)
    baseline_id = next(iter(models.loc[models["is_baseline"], "model_id"]), None)
    aggregates = model_aggregates(frame, metric, reset=reset, baseline=baseline_id)

    out = Path(out_dir)
    paths: dict[str, Any] = {
        "layer_criticality": write_table(layers, out / "layer_criticality.csv"),
        "model_criticality": write_table(models, out / "model_criticality.csv"),
        "correlations": write_table(correlation, out / "correlations.csv"),
        "depth_profile": write_table(profile, out / "depth_profile.csv"),
        "aggregates": write_table(aggregates, out / "aggregates.csv"),
    }
    excluded = list(models.loc[models["category"].isin(list(heatmap_exclude)), "model_id"])
    figures, skipped = _figures(layers, models, correlation, profile, metric, ci_threshold, excluded)
    seeds = (variance.seed_analysis(_measurements(frame, metric, reset), baseline_id, value="_crit",
                                    image=metric == "cos") if variance.has_seeds(models["model_id"]) else {})
    paths.update({name: write_table(table, out / f"{name}.csv") for name, table in seeds.items()})
    if seeds:
        figures["variance_components"] = plots.variance_plot(seeds["variance_components"])
    stats = {
        "metric": metric,
        "criticality": METRICS[metric][1],
        "baseline": baseline_id,
        "models": len(models),
        "layers": int(layers["layer"].nunique()),
        "order": order,
        "registry": sorted(set(models["registry"].dropna())),
        "heatmap_excluded": excluded,
        "correlations": _json_safe(correlation.to_dict(orient="records")),
        "skipped_figures": skipped,
        "run_conditions": _json_safe(run_conditions(frame).to_dict(orient="records")),
        "seed_replicates": sorted(m for m in models["model_id"] if variance.method_and_seed(m)[1] != 0),
    }
    paths["stats"] = out / "stats.json"
    paths["stats"].write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n")
    for name, figure in figures.items():
        paths[name] = plots.save(figure, out / name, pdf=pdf)
    note = f" Left out: {', '.join(excluded)} (category {', '.join(heatmap_exclude)})." if excluded else ""
    conditions = pd.DataFrame(stats["run_conditions"])
    paths["run_conditions"] = write_table(conditions, out / "run_conditions.csv")
    paths["report"] = report.write_report(
        out / "report.html",
        title="Layer criticality",
        conditions=conditions,
        summary=_summary_lines(stats),
        figures=[(FIGURE_CAPTIONS[name].format(ci_threshold=ci_threshold, excluded=note)
                  + (f" {heatmap_note}" if heatmap_note and name == "heatmap" else ""), paths[name][0])
                 for name in figures],
        tables=[("Rank correlation of average criticality with accuracy", correlation),
                ("Models", models), (AGGREGATES_HEADING, aggregates), ("Criticality over relative depth", profile),
                ("Layers", layers), *[(SEED_TABLES[name], table) for name, table in seeds.items()]],
    )
    return {"layers": layers, "models": models, "aggregates": aggregates, "correlations": correlation,
            "profile": profile, "stats": stats, "paths": paths, "figures": figures, **seeds}


AGGREGATES_HEADING = ("Means over all layers and over each stage, and the depth shift (last stage minus the mean of "
                      "the stem and the first stage), each minus the baseline's; 95% intervals from the trials, "
                      "paired where they share draws and images")


CONDITIONS = ("reset", "data_id", "seed", "engine", "precision", "target_ci", "layercrit_version")


def run_conditions(results: pd.DataFrame) -> pd.DataFrame:
    """How the results were made, read from the rows themselves (so any output, a run, a sweep's export, the demo, or
    the paper's CSV, says it): per reset, design and data set, the models, images per evaluation, reset draws per
    layer, seed, engine, precision, the sequential design's target and layercrit's version, as far as the rows
    carry them."""
    keys = [c for c in CONDITIONS if c in results.columns]
    measured = results[results["layer"] != ORIGINAL]
    if not keys:
        return pd.DataFrame({"models": [measured["model_id"].nunique()], "rows": [len(measured)]})
    table = []
    for key, group in measured.groupby(keys, sort=False, dropna=False):
        row = dict(zip(keys, key, strict=True))
        row["models"] = group["model_id"].nunique()
        row["layers"] = group["layer"].nunique()
        draws = group.groupby(["model_id", "layer"])["trial"].nunique()
        row["trials per layer"] = (f"{draws.min()}" if draws.min() == draws.max()
                                   else f"{draws.min()}–{draws.max()} (median {draws.median():g})")
        if "n_images" in group:
            images = group["n_images"]
            row["images per evaluation"] = (f"{images.min():g}" if images.min() == images.max()
                                            else f"{images.min():g}–{images.max():g}")
        table.append(row)
    return pd.DataFrame(table)


def _figures(layers, models, correlation, profile, metric, ci_threshold,
             excluded: Sequence[str] = ()) -> tuple[dict[str, Any], dict[str, str]]:
    """The figures that the data supports, and why the others were left out; ``excluded`` models are left out of
    the heatmaps (and so of their margins)."""
    label = AXIS_LABELS[metric]
    average = f"Avg. {label[0].lower()}{label[1:]}"
    shown = models[~models["model_id"].isin(list(excluded))].reset_index(drop=True)
    columns = layers.drop_duplicates("layer").sort_values("depth")["layer_display"]
    rows = [f"{d} [{a:.2f}%]" if pd.notna(a) else d for d, a in zip(shown["display"], shown["accuracy"], strict=True)]

    def matrix(value: str) -> pd.DataFrame:
        return criticality_matrix(layers, shown, value).set_axis(rows, axis=0).set_axis(list(columns), axis=1)

    mean = matrix("criticality_pct")
    categories = list(shown["category"])
    uncertain = pd.DataFrame(~(matrix("criticality_ci_pct").to_numpy() <= ci_threshold) & np.isfinite(mean.to_numpy()))
    figures = {
        "heatmap": plots.heatmap(mean, categories=categories, label=label, uncertain=uncertain,
                                 width=plots.FULL_WIDTH),
        "heatmap_column": plots.heatmap(mean, categories=categories, label=label, uncertain=uncertain,
                                        width=plots.COLUMN_WIDTH),
        "heatmap_std": plots.heatmap(matrix("criticality_std_pct"), categories=categories, label="Std. over trials [%]",
                                     cmap="Reds", vmax=100.0, width=plots.FULL_WIDTH),
    }
    skipped = {}
    if shown["is_baseline"].any():
        delta = mean - mean.iloc[int(np.flatnonzero(shown["is_baseline"])[0])].to_numpy()
        figures["heatmap_delta"] = plots.heatmap(delta, categories=categories, label="Criticality − baseline [%]",
                                                 cmap="coolwarm", vmin=-100.0, vmax=100.0, width=plots.FULL_WIDTH)
    elif models["is_baseline"].any():
        skipped["heatmap_delta"] = "the baseline's category is left out of the heatmaps (--heatmap-exclude)"
    else:
        skipped["heatmap_delta"] = "no baseline: give --baseline MODEL_ID (or one model of category 'baseline')"
    if models["accuracy"].notna().any():
        overall = correlation[correlation["subset"] == "all"]
        figures["accuracy_vs_criticality"] = plots.accuracy_scatter(
            models, correlation=overall.iloc[0].to_dict() if len(overall) else None, xlabel=average)
    else:
        skipped["accuracy_vs_criticality"] = "no accuracies: add accuracy to the metadata or measure the original model"
    if models["budget"].notna().any():
        figures["budget_vs_criticality"] = plots.budget_plot(models, ylabel=average)
    else:
        skipped["budget_vs_criticality"] = "no training budgets: add budget (e.g. 'linf 4/255') to the metadata"
    figures["depth_vs_criticality"] = plots.profile_plot(profile, ylabel=label)
    return figures, skipped


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value.item() if isinstance(value, np.generic) else value


def _summary_lines(stats: Mapping[str, Any]) -> list[str]:
    lines = [f"{stats['models']} models, {stats['layers']} layers; criticality = {stats['criticality']}",
             f"baseline: {stats['baseline'] or 'none'}"]
    if stats.get("registry"):
        lines.append(f"metadata from the zoo registries: {', '.join(stats['registry'])} (--no-registry to ignore)")
    if stats.get("heatmap_excluded"):
        lines.append(f"left out of the heatmaps: {', '.join(stats['heatmap_excluded'])} (--heatmap-exclude)")
    if not stats["correlations"]:
        lines.append(f"correlation with accuracy: fewer than {MIN_CORRELATION_MODELS} models with accuracy")
    for row in stats["correlations"]:
        lines.append(f"{row['subset']:<32} n={row['n']:<3} Spearman ρ={_num(row['spearman_rho'])} "
                     f"(p={_num(row['spearman_p'], '.2g')})  Kendall τ={_num(row['kendall_tau'])} "
                     f"(p={_num(row['kendall_p'], '.2g')})")
    lines += [f"figure left out: {name}: {why}" for name, why in stats["skipped_figures"].items()]
    return lines


def _num(value: float | None, spec: str = ".3f") -> str:
    return "nan" if value is None else format(value, spec)


def summary(result: Mapping[str, Any]) -> str:
    """The printable summary of an :func:`analyze` result: sizes, baseline, correlations, left-out figures."""
    return "\n".join(_summary_lines(result["stats"]))
