"""Analysis: criticality tables, per-model summaries and their correlation with accuracy, from any results.

Reads layercrit's results (CSV, Parquet, a run folder, a SQLite store) or a CSV in the paper's published format
(``model_id, layer, trial, pred_cos_sim, recovered_acc, ...``) and, with :func:`analyze`, writes the paper's tables,
figures and a self-contained HTML report. Criticality is in percent throughout: by default
100 × (1 − cosine similarity of the reset model's softmax to the unmodified model's).

Spreads follow the paper's code: the std over trials is the sample std (ddof=1, NaN for a single trial); the
std over layers or over models is the population std (ddof=0), as in its figure margins.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from scipy import stats as scipy_stats

from ..errors import LayercritError
from ..measurement import estimate
from ..results import read_table, write_table
from . import plots, report

ORIGINAL = "original"
OTHER = "other"
BASELINE_CATEGORY = "baseline"
MIN_CORRELATION_MODELS = 3
CI_THRESHOLD = 5.0  # heatmap cells with a wider 95% interval (± percentage points) are marked

# name -> (results column, what the criticality is). Criticality = 100 × (1 − column) for every metric.
METRICS: dict[str, tuple[str, str]] = {
    "cos": ("pred_cos_sim", "100 × (1 − cosine similarity of the softmax to the unmodified model's)"),
    "top1": ("recovered_acc", "100 × (1 − recovered top-1 accuracy)"),
    "agreement": ("agreement", "100 × (1 − top-1 agreement with the unmodified model)"),
}
AXIS_LABELS = {
    "cos": "Layer criticality [%]",
    "top1": "Criticality: 1 − recovered acc. [%]",
    "agreement": "Criticality: 1 − agreement [%]",
}
RESULT_KEYS = ("model_id", "layer", "trial")
META_FIELDS = ("category", "display", "accuracy", "budget", "norm")

_OPERATORS = {"downsample.0": "downsample", "downsample.1": "downsample bn"}
# Block positions in each family's module names (without ``model.``), tried in order: [stage.block] operator,
# with the family's operator names (ResNet's downsample.0/1 are its conv and BatchNorm, ConvNeXt's are not).
_FAMILIES = tuple((re.compile(pattern), operators) for pattern, operators in (
    (r"^layer(\d+)\.(\d+)(?:\.(.+))?$", _OPERATORS),  # ResNet (timm, torchvision)
    (r"^stages\.(\d+)\.blocks\.(\d+)(?:\.(.+))?$", {}),  # ConvNeXt and other timm stage/block models
    (r"^layers\.(\d+)\.blocks\.(\d+)(?:\.(.+))?$", {}),  # Swin
    (r"^s(\d+)\.b(\d+)(?:\.(.+))?$", {}),  # RegNet
    (r"^blocks\.(\d+)\.(\d+)(?:\.(.+))?$", {}),  # EfficientNet, MobileNetV3
    (r"^features\.denseblock(\d+)\.denselayer(\d+)(?:\.(.+))?$", {}),  # DenseNet
    (r"^blocks\.(\d+)(?:\.(.+))?$", {}),  # ViT, DeiT (timm)
    (r"^encoder\.layers\.encoder_layer_(\d+)(?:\.(.+))?$", {}),  # ViT (torchvision)
    (r"^(?:stages|layers)\.(\d+)(?:\.(.+))?$", {}),  # a stage's own layers (ConvNeXt downsample, Swin merging)
))
_STEM_MODULES = {"stem", "patch_embed"}
_HEAD_MODULES = {"fc", "head", "heads", "classifier", "conv_head", "fc_norm"}
_CUMULATIVE = {"prefix": "up to", "suffix": "from"}
_BUDGET = re.compile(
    r"^(?:(?P<norm>l\d|linf|l∞)\s*[:,]?\s*)?(?:(?:eps|ε|epsilon)\s*=?\s*)?"
    r"(?P<num>\d*\.?\d+(?:e[-+]?\d+)?)(?:\s*/\s*(?P<den>\d*\.?\d+))?$",
    re.IGNORECASE,
)


# ---------------------------------------------------------------- inputs


def load_results(results: pd.DataFrame | str | Path | Sequence[str | Path]) -> pd.DataFrame:
    """One table from a DataFrame or from results files (CSV, Parquet, SQLite store, run folder), concatenated."""
    if isinstance(results, pd.DataFrame):
        return results.copy()
    paths = [results] if isinstance(results, (str, Path)) else list(results)
    if not paths:
        raise LayercritError("no results given: pass one or more results files (CSV, Parquet, SQLite) or run folders")
    return pd.concat([read_table(path) for path in paths], ignore_index=True)


def load_meta(meta: pd.DataFrame | Mapping | Sequence[Mapping] | str | Path | None) -> pd.DataFrame:
    """Model metadata as a table with a ``model_id`` column and ``category, display, accuracy, budget, norm``.

    Args:
        meta: a DataFrame (``model_id`` as a column or the index); a dict ``{model_id: {field: value}}``; a list
            of records with ``model_id`` (or ``id``); a zoo manifest ``{models: [records]}``; the paper's
            ``{category: [model_id, ...]}``; or a YAML/JSON/CSV file holding any of these. Fields: ``category``,
            ``display`` (name in figures), ``accuracy`` (percent), ``budget`` (e.g. ``3``, ``l2 3``,
            ``linf 4/255``) and ``norm``; other fields are kept. ``None`` means no metadata.

    Returns:
        One row per model_id; absent fields are NaN.
    """
    if isinstance(meta, (str, Path)):
        meta = _read_meta_file(Path(meta))
    if meta is None:
        frame = pd.DataFrame({"model_id": pd.Series(dtype=str)})
    elif isinstance(meta, pd.DataFrame):
        frame = meta.reset_index() if meta.index.name in ("model_id", "id") else meta.copy()
    else:
        frame = _meta_records(meta)
    if "model_id" not in frame.columns and "id" in frame.columns:
        frame = frame.rename(columns={"id": "model_id"})
    if "model_id" not in frame.columns:
        raise LayercritError(
            "metadata has no model_id column: give one entry per model with model_id (or id) and any of "
            + ", ".join(META_FIELDS)
        )
    frame["model_id"] = frame["model_id"].astype(str)
    duplicated = frame["model_id"][frame["model_id"].duplicated()]
    if not duplicated.empty:
        raise LayercritError(f"metadata lists model {duplicated.iloc[0]!r} twice: keep one entry per model")
    for field in META_FIELDS:
        if field not in frame.columns:
            frame[field] = np.nan
    accuracy = pd.to_numeric(frame["accuracy"], errors="coerce")
    bad = frame["accuracy"].notna() & accuracy.isna()
    if bad.any():
        row = frame[bad].iloc[0]
        raise LayercritError(f"accuracy {row.accuracy!r} of model {row.model_id!r} is not a number: give percent, e.g. 76.1")
    frame["accuracy"] = accuracy
    return frame.reset_index(drop=True)


def _read_meta_file(path: Path) -> Any:
    if not path.is_file():
        raise LayercritError(f"metadata file not found: {path}")
    if path.suffix == ".csv":
        return pd.read_csv(path)
    if path.suffix == ".json":
        return json.loads(path.read_text())
    if path.suffix in (".yaml", ".yml"):
        return yaml.safe_load(path.read_text())
    raise LayercritError(f"cannot read metadata {path}: expected .yaml, .yml, .json or .csv")


def _meta_records(meta: Mapping | Sequence[Mapping]) -> pd.DataFrame:
    if isinstance(meta, Mapping) and isinstance(meta.get("models"), list):
        meta = meta["models"]  # a zoo manifest
    if isinstance(meta, Mapping):
        values = list(meta.values())
        if values and all(isinstance(v, (list, tuple)) for v in values):  # the paper's {category: [model_id, ...]}
            return pd.DataFrame([{"model_id": m, "category": c} for c, ids in meta.items() for m in ids])
        if all(v is None or isinstance(v, Mapping) for v in values):
            return pd.DataFrame([{**(fields or {}), "model_id": m} for m, fields in meta.items()],
                                columns=None if values else ["model_id"])
    elif isinstance(meta, Sequence) and all(isinstance(r, Mapping) for r in meta):
        return pd.DataFrame(list(meta))
    raise LayercritError(
        "metadata must map model_id -> {category, display, accuracy, budget}, list records with model_id, or map "
        "category -> [model_id, ...]"
    )


def parse_budget(value: Any) -> tuple[str | None, float]:
    """``(norm, epsilon)`` of a training budget: ``3`` → (None, 3.0); ``"linf 4/255"`` → ("Linf", 0.0157);
    ``"l2:3"`` / ``"L2 eps=3"`` → ("L2", 3.0). Missing values give ``(None, nan)``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None, math.nan
    if isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
        return None, float(value)
    match = _BUDGET.match(str(value).strip())
    if not match:
        raise LayercritError(
            f"cannot read training budget {value!r}: write a number, optionally after a norm, e.g. 3, 'l2 3' or "
            "'linf 4/255'"
        )
    epsilon = float(match["num"]) / (float(match["den"]) if match["den"] else 1.0)
    return (_norm_name(match["norm"]) if match["norm"] else None), epsilon


def _norm_name(norm: str) -> str:
    norm = str(norm).strip().lower()
    return "Linf" if norm in ("linf", "l∞", "inf") else norm.upper()


# ---------------------------------------------------------------- per-layer table


def _measurements(results: pd.DataFrame, metric: str, reset: str | None) -> pd.DataFrame:
    """The layer rows (not ``original``) with their criticality in percent as ``_crit``, validated."""
    if metric not in METRICS:
        raise LayercritError(f"unknown metric {metric!r}: use one of {', '.join(METRICS)}")
    column = METRICS[metric][0]
    missing = [c for c in (*RESULT_KEYS, column) if c not in results.columns]
    if missing:
        raise LayercritError(
            f"results lack column(s) {', '.join(missing)}: expected layercrit's results or the paper's CSV format"
            + (f" (metric {metric!r} needs {column}; try --metric cos)" if column in missing else "")
        )
    rows = _one_reset(results[results["layer"] != ORIGINAL], reset)
    if rows.empty:
        raise LayercritError("results hold no layer rows (only the original model): measure some layers first")
    repeated = rows[rows.duplicated(list(RESULT_KEYS))]
    if not repeated.empty:
        first = repeated.iloc[0]
        raise LayercritError(
            f"model {first.model_id!r} layer {first.layer!r} trial {first.trial} appears more than once: pass each "
            "run's results once"
        )
    absent = rows[rows[column].isna()]
    if not absent.empty:
        raise LayercritError(
            f"model {absent.model_id.iloc[0]!r} has no {column} values for metric {metric!r}: use another --metric"
        )
    return rows.assign(_crit=100.0 * (1.0 - rows[column].astype(float)))


def _one_reset(rows: pd.DataFrame, reset: str | None) -> pd.DataFrame:
    """Means over trials only make sense for one reset method at a time."""
    present = sorted(map(str, rows["reset"].dropna().unique())) if "reset" in rows.columns else []
    if reset is not None:
        rows = rows[rows["reset"] == reset] if "reset" in rows.columns else rows.iloc[:0]
        if rows.empty:
            raise LayercritError(f"no results with reset {reset!r}: the results hold {', '.join(present) or 'none'}")
    elif len(present) > 1:
        raise LayercritError(f"results mix reset methods ({', '.join(present)}): choose one with --reset NAME")
    return rows


def layer_order(results: pd.DataFrame) -> list[str]:
    """Layer names in network order, merged over models.

    Each model's rows list its layers in network order (as ``measure`` and the paper's code write them); a layer
    only some models have is placed right after the layer that precedes it in those models.
    """
    order: list[str] = []
    for _, names in results[results["layer"] != ORIGINAL].groupby("model_id", sort=False)["layer"]:
        at = -1
        for name in dict.fromkeys(names):
            if name in order:
                at = order.index(name)
            else:
                at += 1
                order.insert(at, name)
    return order


def display_layer(name: str, kernel: Any = None) -> str:
    """A short readable layer name: ``model.layer1.0.conv1`` → ``[1.0] conv1:1x1`` (with the kernel size when
    known), ``model.fc`` → ``[Head] fc``, ``model.conv1`` → ``[0.0] conv1``. Other families get their block
    position the same way (``blocks.3.attn.qkv`` → ``[3] attn.qkv``, ``stages.1.blocks.2.conv_dw`` →
    ``[1.2] conv_dw``, ``s2.b1.conv1.conv`` → ``[2.1] conv1.conv``); a group is shown by its position alone
    (``model.layer1.0`` → ``[1.0]``), a cumulative target as ``up to …`` / ``from …``; other names lose only
    ``model.``."""
    mode, _, rest = name.partition(":")
    if mode in _CUMULATIVE and rest:
        return f"{_CUMULATIVE[mode]} {display_layer(rest, kernel)}"
    short = name.removeprefix("model.")
    suffix = f":{kernel}" if kernel else ""
    for family, operators in _FAMILIES:
        match = family.match(short)
        if match:
            *position, operator = match.groups()
            shown = f"[{'.'.join(position)}]"
            return f"{shown} {operators.get(operator, operator)}{suffix}" if operator else shown
    first = short.split(".")[0]
    if first in _HEAD_MODULES:
        return f"[Head] {short}{suffix}"
    if "." not in short or first in _STEM_MODULES:
        return f"[0.0] {short}{suffix}"
    return f"{short}{suffix}"


def _kernel_text(value: Any) -> str | None:
    """``3`` / ``"3"`` / ``(3, 3)`` / ``"3x3"`` → ``"3x3"``; missing → None."""
    if isinstance(value, Mapping):
        value = value.get("kernel")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (list, tuple, np.ndarray)):
        return "x".join(str(int(v)) for v in value)
    text = str(value).strip()
    return f"{text}x{text}" if text.isdigit() else text or None


def _kernels(rows: pd.DataFrame, layer_info: Mapping[str, Any] | None) -> dict[str, str]:
    kernels: dict[str, str] = {}
    if "kernel" in rows.columns:
        for name, value in rows.dropna(subset=["kernel"]).drop_duplicates("layer")[["layer", "kernel"]].itertuples(
                index=False):
            kernels[name] = _kernel_text(value)
    for name, value in (layer_info or {}).items():
        kernels[name] = _kernel_text(value)
    return {name: k for name, k in kernels.items() if k}


def layer_criticality(
    results: pd.DataFrame,
    metric: str = "cos",
    *,
    reset: str | None = None,
    layer_info: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """Per (model_id, layer): criticality mean and std over trials, in percent.

    Args:
        results: results rows (layercrit's columns or the paper's); the ``original`` rows are ignored.
        metric: ``cos`` (100 × (1 − pred_cos_sim), the paper's), ``top1`` (100 × (1 − recovered_acc)) or
            ``agreement`` (100 × (1 − agreement)).
        reset: keep only rows of this reset method (required when the results mix several).
        layer_info: layer name → kernel size (``3``, ``"3x3"``, ``(3, 3)`` or ``{"kernel": ...}``) for the display
            names; a ``kernel`` column in the results serves too.

    Returns:
        Columns ``model_id, layer, layer_display, depth`` (index in the network order over all models),
        ``relative_depth`` (0 = the model's first measured layer, 1 = its last), ``criticality_pct,
        criticality_std_pct, trials``, ``criticality_ci_pct`` (half-width of the 95% interval of the mean over resets,
        see :mod:`layercrit.measurement.estimate`) and ``capped`` (the sequential design hit its trial cap); models in order of
        appearance, layers in network order.
    """
    rows = _measurements(results, metric, reset)
    depth = {name: i for i, name in enumerate(layer_order(rows))}
    model_rank = {m: i for i, m in enumerate(pd.unique(rows["model_id"]))}
    table = (rows.groupby(["model_id", "layer"], sort=False)["_crit"]
             .agg(criticality_pct="mean", criticality_std_pct="std", trials="count").reset_index())
    table["depth"] = table["layer"].map(depth)
    table = table.sort_values(["model_id", "depth"], key=lambda c: c.map(model_rank) if c.name == "model_id" else c)
    position = table.groupby("model_id", sort=False).cumcount()
    count = table.groupby("model_id", sort=False)["layer"].transform("size")
    table["relative_depth"] = (position / (count - 1).clip(lower=1)).astype(float)
    kernels = _kernels(rows, layer_info)
    table["layer_display"] = [display_layer(name, kernels.get(name)) for name in table["layer"]]
    intervals = _estimates(rows, metric, estimate.layer_table, by=["model_id"])
    table = table.merge(intervals[["model_id", "layer", "criticality_ci_pct", "capped"]], on=["model_id", "layer"],
                        how="left")
    columns = ["model_id", "layer", "layer_display", "depth", "relative_depth", "criticality_pct",
               "criticality_std_pct", "criticality_ci_pct", "trials", "capped"]
    return table[columns].reset_index(drop=True)


def _estimates(rows: pd.DataFrame, metric: str, table, by: list[str]) -> pd.DataFrame:
    """``estimate.layer_table`` / ``model_table`` of the metric's criticality, with the interval in percent."""
    value = "criticality" if metric == "cos" else "_value"  # the sequential design's ±target is on cos criticality
    estimates = table(rows.assign(**{value: rows["_crit"] / 100.0}), by, value=value)
    return estimates.assign(criticality_ci_pct=100.0 * estimates["criticality_ci"])


def model_intervals(results: pd.DataFrame, metric: str = "cos", *, reset: str | None = None) -> pd.Series:
    """Per model_id: half-width (percent) of the 95% interval of its average criticality over layers
    (:func:`layercrit.measurement.estimate.model_table`)."""
    table = _estimates(_measurements(results, metric, reset), metric, estimate.model_table, by=["model_id"])
    return table.set_index("model_id")["criticality_ci_pct"]


def interpolation_curves(results: pd.DataFrame, metric: str = "cos") -> pd.DataFrame:
    """Criticality along an interpolation sweep (``--reset interpolate --alpha a1,a2,...``), per layer.

    Returns:
        One row per (model_id, reset, layer, alpha), in network order then α: ``criticality_pct`` (over
        trials, percent) and ``layer_display``. ``reset`` is the strategy without its α
        (``interpolate(rerandomize)``), so sweeps over different bases stay apart.
    """
    if metric not in METRICS:
        raise LayercritError(f"unknown metric {metric!r}: use one of {', '.join(METRICS)}")
    if "alpha" not in results.columns or results["alpha"].isna().all():
        raise LayercritError("results have no alpha column: measure with --reset interpolate --alpha a1,a2,...")
    rows = results[results["alpha"].notna() & (results["layer"] != ORIGINAL)]
    rows = rows.assign(reset=rows["reset"].astype(str).str.replace(r",alpha=[^)]*", "", regex=True),
                       _crit=100.0 * (1.0 - rows[METRICS[metric][0]].astype(float)))
    depth = {name: i for i, name in enumerate(layer_order(rows))}
    table = (rows.groupby(["model_id", "reset", "layer", "alpha"], sort=False)["_crit"].mean()
             .rename("criticality_pct").reset_index())
    table = table.assign(_depth=table["layer"].map(depth)).sort_values(["model_id", "reset", "_depth", "alpha"],
                                                                       kind="stable")
    table.insert(3, "layer_display", [display_layer(name) for name in table["layer"]])
    return table.drop(columns="_depth").reset_index(drop=True)


def interpolation_area(curves: pd.DataFrame) -> pd.DataFrame:
    """The area under each curve of :func:`interpolation_curves` (trapezoids over the measured α, percent × α).

    Over α from 0 to 1 the area is the mean criticality along the path; a layer that stays robust until large α
    has a small area. Returns one row per (model_id, reset, layer) with ``area``, ``alpha_min``, ``alpha_max``.
    """
    def area(curve: pd.DataFrame) -> pd.Series:
        if len(curve) < 2:
            raise LayercritError("the area under a curve needs at least two alphas: --alpha 0,0.25,0.5,0.75,1")
        return pd.Series({"area": float(np.trapezoid(curve["criticality_pct"], curve["alpha"])),
                          "alpha_min": curve["alpha"].min(), "alpha_max": curve["alpha"].max()})

    keys = ["model_id", "reset", "layer", "layer_display"]
    return curves.groupby(keys, sort=False)[["alpha", "criticality_pct"]].apply(area).reset_index()


# ---------------------------------------------------------------- per-model table


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
            records[name] = {str(entry["id"]): entry for entry in zoo.entries(name)}
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
    return candidates.iloc[0] if len(candidates) == 1 else None


def _presentation_order(models: pd.DataFrame, meta_ids: list[str], order: str) -> pd.DataFrame:
    """Baseline first; then, ``notebook``: categories alphabetically ("other" last), models by model_id (the
    paper's notebook sorts by category and model_id, then moves the baseline up); ``metadata``: categories in the
    order of their first model in ``meta_ids`` ("other" last), models in that order."""
    if order == "notebook":
        keys = pd.DataFrame({"baseline": ~models["is_baseline"], "other": models["category"] == OTHER,
                             "category": models["category"], "model_id": models["model_id"]})
        return models.loc[keys.sort_values(list(keys.columns), kind="stable").index].reset_index(drop=True)
    meta_rank = {m: i for i, m in enumerate(dict.fromkeys(meta_ids))}
    rank = pd.Series([meta_rank.get(m, len(meta_rank) + i) for i, m in enumerate(models["model_id"])],
                     index=models.index, dtype=float)
    rank[models["is_baseline"]] = -1
    models = models.assign(_rank=rank).sort_values("_rank", kind="stable")
    category_rank = {c: i for i, c in enumerate(pd.unique(models["category"]))}
    models["_category"] = models["category"].map(category_rank)
    return models.sort_values(["_category", "_rank"], kind="stable").drop(columns=["_rank", "_category"]).reset_index(
        drop=True)


# ---------------------------------------------------------------- statistics and derived tables


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


# ---------------------------------------------------------------- everything at once

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
}


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
) -> dict[str, Any]:
    """Write every table, figure and ``report.html`` for ``results`` into ``out_dir``.

    Args:
        results: a DataFrame or results paths (CSV, Parquet, SQLite store, run folder; layercrit's or the paper's
            CSV format).
        out_dir: created if needed. Tables are written first, then figures (PNG and PDF), then the report.
        meta, baseline, registry, order: as in :func:`model_criticality`; ``metric``, ``reset``, ``layer_info`` as
            in :func:`layer_criticality`.
        ci_threshold: heatmap cells whose 95% interval is wider than ± this (percentage points) are marked.
        heatmap_exclude: categories left out of the heatmaps and their margins (default: ``freezing``, the frozen
            random backbone, as in the paper's notebook); they stay in the tables and the other figures.

    Returns:
        ``{"layers", "models", "correlations", "profile"}`` DataFrames, ``"stats"`` (what ``stats.json`` holds),
        ``"paths"`` (name → written file, figures as (png, pdf)) and ``"figures"`` (name → Figure).
    """
    frame = load_results(results)
    layers = layer_criticality(frame, metric, reset=reset, layer_info=layer_info)
    models = _summarize(layers, frame, load_meta(meta), baseline, model_intervals(frame, metric, reset=reset),
                        registry=registry, order=order)
    correlation = correlations(models)
    profile = depth_profile(layers, models)
    baseline_id = next(iter(models.loc[models["is_baseline"], "model_id"]), None)

    out = Path(out_dir)
    paths: dict[str, Any] = {
        "layer_criticality": write_table(layers, out / "layer_criticality.csv"),
        "model_criticality": write_table(models, out / "model_criticality.csv"),
        "correlations": write_table(correlation, out / "correlations.csv"),
        "depth_profile": write_table(profile, out / "depth_profile.csv"),
    }
    excluded = list(models.loc[models["category"].isin(list(heatmap_exclude)), "model_id"])
    figures, skipped = _figures(layers, models, correlation, profile, metric, ci_threshold, excluded)
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
    }
    paths["stats"] = out / "stats.json"
    paths["stats"].write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n")
    for name, figure in figures.items():
        paths[name] = plots.save(figure, out / name)
    note = f" Left out: {', '.join(excluded)} (category {', '.join(heatmap_exclude)})." if excluded else ""
    conditions = pd.DataFrame(stats["run_conditions"])
    paths["run_conditions"] = write_table(conditions, out / "run_conditions.csv")
    paths["report"] = report.write_report(
        out / "report.html",
        title="Layer criticality",
        conditions=conditions,
        summary=_summary_lines(stats),
        figures=[(FIGURE_CAPTIONS[name].format(ci_threshold=ci_threshold, excluded=note), paths[name][0])
                 for name in figures],
        tables=[("Rank correlation of average criticality with accuracy", correlation),
                ("Models", models), ("Criticality over relative depth", profile), ("Layers", layers)],
    )
    return {"layers": layers, "models": models, "correlations": correlation, "profile": profile, "stats": stats,
            "paths": paths, "figures": figures}


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
