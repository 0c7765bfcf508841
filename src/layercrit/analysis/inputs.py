"""Analysis inputs: results from any source (layercrit's rows, a run folder, a store, the paper's CSV) and model
metadata (files, mappings, budgets), and the names the analysis shares (the metrics a criticality is read from,
the metadata fields)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from ..config_files import error_text, load_json, load_yaml
from ..errors import LayercritError
from ..results import read_table

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
_BUDGET = re.compile(
    r"^(?:(?P<norm>l\d|linf|l∞)\s*[:,]?\s*)?(?:(?:eps|ε|epsilon)\s*=?\s*)?"
    r"(?P<num>\d*\.?\d+(?:e[-+]?\d+)?)(?:\s*/\s*(?P<den>\d*\.?\d+))?$",
    re.IGNORECASE,
)



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
    try:
        if path.suffix == ".json":
            return load_json(path.read_text())
        if path.suffix in (".yaml", ".yml"):
            return load_yaml(path.read_text())
    except (ValueError, yaml.YAMLError) as error:
        raise LayercritError(f"cannot read metadata {path}: {error_text(error)}") from None
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

