"""The embedded default: measure every model of the bundled Fashion-MNIST zoo and write results, heatmap and report.

A miniature of the paper's experiment that runs in minutes on a laptop CPU: same architecture and data, different
training methods, every conv and linear layer rerandomized 3 times, on a seeded subset of the test set.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd

from . import zoo
from .analysis.tables import analyze
from .errors import LayercritError
from .measurement.measure import measure
from .results import write_table

DEMO_IMAGES = 300
"""Test images per model: sized so that the whole demo stays under 5 minutes on 2 CPU cores."""
HEATMAP_NOTE = (
    "The demo's {trials} reset draws per layer are for speed: most intervals are wider than ±5 points (dotted). A "
    "layer's criticality varies over resets with an SD of 0.03-0.22 (median 0.12) on the baseline, so ±5 points "
    "takes up to 75 draws (median 22) per layer, several times the demo's compute; scripts/zoo_findings.py measures "
    "the zoo to ±3 points.")
BASELINE = "baseline"
META_FIELDS = ("category", "display", "accuracy", "budget")


def run_demo(
    out_dir: str | Path = "runs/demo",
    *,
    images: int = DEMO_IMAGES,
    trials: int = 3,
    models: Sequence[str] | None = None,
    batch_size: int = 500,
    device: str | None = None,
    data_root: str | None = None,
    progress: bool | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Measure the Fashion-MNIST zoo with ``rerandomize`` and write ``results.csv``, ``heatmap.png``, ``report.html``.

    ``results.csv`` is rewritten after every model, so an interrupted demo keeps the models that finished. The
    figures, tables and report come from :func:`layercrit.analysis.tables.analyze` (written into ``out_dir`` too).

    Args:
        out_dir: output folder (created). images: Fashion-MNIST test images per model (seeded subset).
        trials: rerandomizations per layer. models: zoo ids to measure (default: the whole zoo, in zoo order).
        batch_size, device, data_root, progress: as in :func:`layercrit.measure`.
        log: receives one line per finished model.

    Returns:
        ``{"results": all rows, "summary": one row per model (see :func:`summarize`), "paths": name → file,
        "analysis": what analyze returned}``.
    """
    records = _records(models)
    meta = {r["id"]: {field: r.get(field) for field in META_FIELDS} for r in records}
    out = Path(out_dir)
    results_path = out / "results.csv"
    frames = []
    for record in records:
        frames.append(measure(
            f"zoo:fmnist/{record['id']}", "fashion-mnist", reset="rerandomize", trials=trials, images=images,
            model_id=record["id"], batch_size=batch_size, device=device, data_root=data_root, progress=progress,
        ))
        write_table(pd.concat(frames, ignore_index=True), results_path)
        log(f"measured {record['id']}")
    results = pd.concat(frames, ignore_index=True)
    analysis = analyze(results, out, meta=meta, baseline=BASELINE if BASELINE in meta else None,
                       heatmap_note=HEATMAP_NOTE.format(trials=trials))
    paths = {"results": results_path, "heatmap": analysis["paths"]["heatmap"][0], "report": analysis["paths"]["report"]}
    return {"results": results, "summary": summarize(results, meta), "paths": paths, "analysis": analysis}


def summarize(results: pd.DataFrame, meta: dict[str, dict]) -> pd.DataFrame:
    """Per model: category, test accuracy (zoo record), top-1 on the demo images, mean and top layer criticality.

    Criticality is in percent, 100 × (1 − cosine similarity of the softmax), averaged over trials (and layers for
    the mean).

    Returns:
        One row per model in the order of ``results``: ``model_id, category, accuracy, subset_top1,
        mean_criticality, most_critical_layer, max_criticality``.
    """
    rows = []
    for model_id, rows_of_model in results.groupby("model_id", sort=False):
        original = rows_of_model[rows_of_model["layer"] == "original"].iloc[0]
        per_layer = (rows_of_model[rows_of_model["layer"] != "original"]
                     .groupby("layer", sort=False)["criticality"].mean() * 100)
        rows.append({
            "model_id": model_id,
            "category": meta.get(model_id, {}).get("category"),
            "accuracy": meta.get(model_id, {}).get("accuracy"),
            "subset_top1": original["top1_acc"],
            "mean_criticality": per_layer.mean(),
            "most_critical_layer": per_layer.idxmax(),
            "max_criticality": per_layer.max(),
        })
    return pd.DataFrame(rows)


def format_summary(summary: pd.DataFrame) -> str:
    """The summary as a printable table."""
    lines = [f"{'model':<15} {'category':<21} {'acc %':>6} {'mean crit %':>11}  most critical layer (crit %)"]
    for row in summary.itertuples():
        accuracy = f"{row.accuracy:6.2f}" if pd.notna(row.accuracy) else f"{'?':>6}"
        category = row.category if pd.notna(row.category) else ""
        lines.append(f"{row.model_id:<15} {category:<21} {accuracy} {row.mean_criticality:11.2f}  "
                     f"{row.most_critical_layer.removeprefix('model.')} ({row.max_criticality:.1f})")
    return "\n".join(lines)


def _records(models: Sequence[str] | None) -> list[dict]:
    records = zoo.entries("fmnist")
    if not models:
        return records
    by_id = {r["id"]: r for r in records}
    unknown = [m for m in models if m not in by_id]
    if unknown:
        raise LayercritError(f"no model {unknown[0]!r} in the Fashion-MNIST zoo: one of {', '.join(by_id)}")
    return [by_id[m] for m in models]
