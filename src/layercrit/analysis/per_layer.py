"""The per-layer table: each (model, layer)'s criticality over trials with its 95% interval, layer names as shown
(``[stage.block] operator``), network order; interpolation curves and the area under them."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from ..errors import LayercritError
from ..measurement import aggregate, estimate
from . import contrasts
from .inputs import (
    METRICS,
    ORIGINAL,
    RESULT_KEYS,
)

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


def stage_of(name: str) -> str | None:
    """The stage a layer belongs to, from its name: the name up to its stage number (``model.layer2.0.conv1`` →
    ``layer2``, ``stages.1.blocks.2.conv_dw`` → ``stages.1``), ``stem`` (``conv1``, ``stem.*``, ``patch_embed``),
    ``head`` (``fc``, ``head``, ``classifier``, ...), or None (a group, a cumulative target, an unknown family)."""
    if ":" in name:
        return None
    short = name.removeprefix("model.")
    for family, _ in _FAMILIES:
        match = family.match(short)
        if match:
            return short[:match.end(1)]
    first = short.split(".")[0]
    if first in _HEAD_MODULES:
        return contrasts.HEAD
    return contrasts.STEM if "." not in short or first in _STEM_MODULES else None


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
        criticality_std_pct, trials``, ``criticality_ci_pct`` (half-width of the layer's own 95% interval of the mean
        over resets, see :mod:`layercrit.measurement.estimate`), ``criticality_low_pct, criticality_high_pct`` (its
        ends, clipped to [0, 100] for ``cos``), ``target_ci_pct`` (the sequential design's target, NaN for the fixed
        design) and ``capped`` (the sequential design hit its trial cap); models in order of appearance, layers in
        network order.
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
    interval = ["criticality_ci_pct", "criticality_low_pct", "criticality_high_pct", "target_ci_pct"]
    table = table.merge(intervals[["model_id", "layer", *interval, "capped"]], on=["model_id", "layer"], how="left")
    columns = ["model_id", "layer", "layer_display", "depth", "relative_depth", "criticality_pct",
               "criticality_std_pct", *interval, "trials", "capped"]
    return table[columns].reset_index(drop=True)


def _estimates(rows: pd.DataFrame, metric: str, table, by: list[str]) -> pd.DataFrame:
    """``estimate.layer_table`` / ``model_table`` of the metric's criticality, with the interval in percent."""
    value = "criticality" if metric == "cos" else "_value"  # the sequential design's ±target is on cos criticality
    estimates = table(rows.assign(**{value: rows["_crit"] / 100.0}), by, value=value)
    percent = {f"{name}_pct": 100.0 * estimates[name] for name in ("criticality_ci", "criticality_low",
                                                                    "criticality_high", "target_ci") if name in estimates}
    return estimates.assign(**percent)


def model_intervals(results: pd.DataFrame, metric: str = "cos", *, reset: str | None = None) -> pd.Series:
    """Per model_id: half-width (percent) of the 95% interval of its average criticality over layers
    (:func:`layercrit.measurement.aggregate.model_table`: paired over the trials its layers share)."""
    table = _estimates(_measurements(results, metric, reset), metric, aggregate.model_table, by=["model_id"])
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

