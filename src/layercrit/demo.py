"""The embedded default: measure every model of the bundled Fashion-MNIST zoo and write results, heatmap and report.

A miniature of the paper's experiment that runs in minutes on a laptop CPU: same architecture and data, different
training methods, every conv and linear layer rerandomized 3 times, on a seeded subset of the test set.
"""

from __future__ import annotations

import math
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


# ---------------------------------------------------------------- the language-model demo

LM_WINDOWS = 512
"""Evaluation windows per model (64 tokens each, of the held-out standard-library modules): the pool the sequential
design draws its blocks of windows from. ``skip`` is the same in every trial, so every trial needs windows of its
own: the pilot's 6 blocks of 32 and a first stage of 20 blocks of 16 (:meth:`SequentialDesign.check_pool`)."""
LM_TARGET_CI = 0.02


def run_lm_demo(
    out_dir: str | Path = "runs/demo-lm",
    *,
    windows: int = LM_WINDOWS,
    target_ci: float = LM_TARGET_CI,
    models: Sequence[str] | None = None,
    batch_size: int = 16,
    device: str | None = None,
    progress: bool | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Measure the language-model zoo: every block of every member skipped (``reset="skip"``, the block made the
    identity, as depth pruning removes it), each block's criticality over next-token distributions estimated to
    ± ``target_ci`` by the sequential design on ``windows`` held-out windows, Block Influence and angular distance
    beside it. Writes ``results.csv``, ``layers.csv``, ``proxies.csv`` (Spearman ρ of each proxy with criticality
    and with the change in NLL, with intervals), and the heatmap and report of :func:`analyze`.

    Returns:
        ``{"results", "layers", "proxies", "summary", "paths", "analysis"}``.
    """
    from .measurement.proxies import proxy_agreement

    records = zoo.entries("lm")
    if models:
        unknown = [m for m in models if m not in {r["id"] for r in records}]
        if unknown:
            raise LayercritError(f"no model {unknown[0]!r} in the language-model zoo: one of "
                                 f"{', '.join(r['id'] for r in records)}")
        records = [r for r in records if r["id"] in models]
    out = Path(out_dir)
    frames = []
    for record in records:
        frames.append(measure(f"zoo:lm/{record['id']}", "python-stdlib", groups="blocks", reset="skip",
                              target_ci=target_ci, images=windows, model_id=record["id"], batch_size=batch_size,
                              device=device, progress=progress))
        write_table(pd.concat(frames, ignore_index=True), out / "results.csv")
        log(f"measured {record['id']}")
    results = pd.concat(frames, ignore_index=True)
    layers = lm_layer_table(results)
    proxies = proxy_agreement(layers, quantities=("criticality", "delta_nll"))
    write_table(layers, out / "layers.csv")
    write_table(proxies, out / "proxies.csv")
    meta = lm_meta(results, records)
    analysis = analyze(results, out, meta=meta)
    paths = {"results": out / "results.csv", "layers": out / "layers.csv", "proxies": out / "proxies.csv",
             "heatmap": analysis["paths"]["heatmap"][0], "report": analysis["paths"]["report"]}
    return {"results": results, "layers": layers, "proxies": proxies, "summary": summarize_lm(layers, proxies),
            "paths": paths, "analysis": analysis}


def lm_meta(results: pd.DataFrame, records: Sequence[dict]) -> dict[str, dict]:
    """Each member's category (its id), display name and, as its accuracy, the unmodified model's next-token top-1
    on the windows (ids such as ``baseline`` also name image models: the figures must not take their accuracy)."""
    top1 = results[results.layer == "original"].groupby("model_id", sort=False).top1_acc.first()
    return {r["id"]: {"category": r["id"], "display": r["display"], "accuracy": round(float(top1[r["id"]]), 2)}
            for r in records if r["id"] in top1}


def lm_layer_table(results: pd.DataFrame) -> pd.DataFrame:
    """:func:`~layercrit.measurement.estimate.layer_table` of language-model rows, plus ``delta_nll`` (the block's
    next-token NLL minus the unmodified model's, nats) and ``delta_nll_ci``, and the model's ``perplexity``."""
    from .measurement.estimate import layer_table

    layers = layer_table(results)
    nll = layer_table(results, value="loss")
    original = results[results.layer == "original"].groupby("model_id", sort=False).loss.first()
    layers["delta_nll"] = nll.criticality.to_numpy() - layers.model_id.map(original).to_numpy()
    layers["delta_nll_ci"] = nll.criticality_ci.to_numpy()
    layers["perplexity"] = layers.model_id.map(original).map(math.exp)
    return layers


def summarize_lm(layers: pd.DataFrame, proxies: pd.DataFrame) -> pd.DataFrame:
    """Per model: perplexity on the windows, the most and least critical block (criticality ± 95%), and Spearman ρ
    of Block Influence with criticality across blocks."""
    rows = []
    for model_id, of_model in layers.groupby("model_id", sort=False):
        top = of_model.loc[of_model.criticality.idxmax()]
        low = of_model.loc[of_model.criticality.idxmin()]
        rho = proxies[(proxies.model_id == model_id) & (proxies.proxy == "block_influence")
                      & (proxies.quantity == "criticality")].iloc[0]
        rows.append({"model_id": model_id, "perplexity": of_model.perplexity.iloc[0],
                     "most_critical": f"{top.layer} {top.criticality:.3f} ± {top.criticality_ci:.3f}",
                     "least_critical": f"{low.layer} {low.criticality:.3f} ± {low.criticality_ci:.3f}",
                     "bi_rho": f"{rho.rho:+.2f}" + (f" [{rho.rho_low:+.2f}, {rho.rho_high:+.2f}]" if rho.rho_low == rho.rho_low
                                                    else f" (no interval with {rho.n} blocks)")})
    return pd.DataFrame(rows)
