"""The measurement behind the README's "What the demo shows": every member of the Fashion-MNIST zoo under the
sequential design, then each of the paper's findings as a comparison with its 95% interval.

    .venv/bin/python scripts/zoo_findings.py --out runs/zoo-findings        # a few minutes on 2 CPU cores

Each member is measured with ``layercrit.measure`` (``rerandomize``, every conv/linear layer, the 10,000 test
images, ``target_ci`` ±0.03, seed 0, and one block size for every member, ``--images-per-trial``, so that trial
``t`` of every member sees the same images and draws the same reset: differences between members are paired) and
kept in ``OUT/ID.csv``, so a killed run goes on with the members it lacks. It prints, and writes to
``OUT/findings.md``:

- per model and stage (stem ``conv1``, ``layer1``..``layer3``, ``fc``) and over all layers: the mean criticality
  in percent with its 95% interval, and the *depth shift*: ``layer3`` minus the mean of the stem's and ``layer1``'s
  (:func:`layercrit.analysis.contrasts.aggregate_table`: intervals from the trial-level rows, paired where the
  layers share trials, at the design's level);
- each model's depth shift and stage means minus the baseline's, with their intervals (paired: the members share
  blocks and draws), and how much wider they would be unpaired;
- Spearman's ρ between test accuracy and mean criticality; the layers that hit the trial cap.
- with ``--seeds``, the training-seed replicates (``ID@seedN``) the zoo holds are measured too, and each method's
  effect on every stage, the mean and the depth shift is set against its seed variance
  (:func:`layercrit.analysis.variance.method_effects`: mean over seeds minus the baseline's, 95% interval on the
  pooled variance over seeds, effect ÷ seed SD).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

import layercrit
from layercrit.analysis import variance
from layercrit.analysis.contrasts import ALL_LAYERS, DEPTH_SHIFT, aggregate_table
from layercrit.analysis.tables import stage_of
from layercrit.measurement.aggregate import interval_text
from layercrit.measurement.estimate import layer_table
from layercrit.zoo import fmnist

STAGES = {"stem": "conv1", "layer1": "layer1", "layer2": "layer2", "layer3": "layer3", "head": "fc"}
IMAGES_PER_TRIAL = 32  # one block size for the zoo (Cochran's rule picks 18-39 per member; one size pairs them)


def measure_zoo(out: Path, *, images: int, target_ci: float, images_per_trial: int | None,
                models: list[str]) -> pd.DataFrame:
    frames = []
    for model_id in models:
        path = out / f"{model_id}.csv"
        if not path.is_file():
            rows = layercrit.measure(f"zoo:fmnist/{model_id}", "fashion-mnist", images=images, target_ci=target_ci,
                                     images_per_trial=images_per_trial, seed=0, batch_size=500, progress=False)
            rows.assign(model_id=model_id).to_csv(path.with_suffix(".tmp"), index=False)
            path.with_suffix(".tmp").replace(path)
            print(f"measured {model_id}", flush=True)
        frames.append(pd.read_csv(path))
    return pd.concat(frames, ignore_index=True)


def module_stage(layer: str) -> str:
    """``model.layer2.0.conv1`` -> ``layer2``; ``model.conv1`` -> ``conv1``."""
    return layer.removeprefix("model.").split(".")[0]


def aggregates(rows: pd.DataFrame) -> pd.DataFrame:
    return aggregate_table(rows, {layer: stage_of(layer) for layer in rows.layer.unique()}, baseline="baseline")


def report(rows: pd.DataFrame, target_ci: float) -> str:
    records = {r["id"]: r for r in fmnist.entries(replicates=True)}
    ids = list(dict.fromkeys(rows.model_id))
    table = aggregates(rows).set_index(["model_id", "aggregate"])
    # the same rows with every member on its own draws and blocks: what the intervals would be unpaired
    unpaired = aggregates(rows.assign(seed=rows.model_id.map({m: i for i, m in enumerate(ids)}))).set_index(
        ["model_id", "aggregate"])
    columns = [*STAGES, ALL_LAYERS, DEPTH_SHIFT]
    lines = ["| model | test acc. | " + " | ".join(f"`{STAGES.get(c, c)}`" for c in columns) + " |",
             "|---" * (len(columns) + 2) + "|"]
    for model_id in ids:
        cells = [interval_text(*table.loc[(model_id, c), ["criticality_pct", "criticality_ci_pct",
                                                          "criticality_low_pct", "criticality_high_pct"]], digits=1)
                 for c in columns]
        lines.append(f"| {model_id} | {records[model_id]['accuracy']:.1f} | " + " | ".join(cells) + " |")
    lines += ["", "Minus the baseline's (points; paired: the members share blocks and reset draws; * the interval "
              "excludes 0; in brackets the unpaired half-width):", "",
              "| model | " + " | ".join(f"`{STAGES.get(c, c)}`" for c in columns) + " |", "|---" * (len(columns) + 1)
              + "|"]
    ratios = []
    for model_id in ids[1:] if ids[0] == "baseline" else [i for i in ids if i != "baseline"]:
        cells = []
        for c in columns:
            r, u = table.loc[(model_id, c)], unpaired.loc[(model_id, c)]
            mark = "*" if r.differs else ""
            cells.append(f"{r.minus_baseline_pct:+.1f} ± {r.minus_baseline_ci_pct:.1f}{mark} "
                         f"({u.minus_baseline_ci_pct:.1f})")
            ratios.append(u.minus_baseline_ci_pct / r.minus_baseline_ci_pct)
        lines.append(f"| {model_id} | " + " | ".join(cells) + " |")
    layers = layer_table(rows)
    accuracy = [records[i]["accuracy"] for i in ids]
    mean = [table.loc[(i, ALL_LAYERS), "criticality_pct"] for i in ids]
    rho, p = stats.spearmanr(accuracy, mean)
    kept = [k for k, i in enumerate(ids) if i != "frozen_random"]
    rho_kept, p_kept = stats.spearmanr([accuracy[k] for k in kept], [mean[k] for k in kept])
    stopped = layers[~layers.capped]
    lines += ["", f"Pairing: the unpaired half-widths of these differences are {np.median(ratios):.2f}× the paired "
              f"ones at the median (range {min(ratios):.2f}–{max(ratios):.2f}).",
              f"Spearman ρ(test accuracy, mean criticality): {rho:.2f} (p = {p:.2g}, n = {len(ids)}); without "
              f"frozen_random {rho_kept:.2f} (p = {p_kept:.2g}).",
              f"Layers that hit the 100-trial cap before ±{target_ci:g}: {int(layers.capped.sum())} of {len(layers)}; "
              f"the others' own half-widths are {np.median(stopped.criticality_ci) / target_ci:.2f}× the target at "
              "the median.",
              f"Images per trial: {', '.join(map(str, sorted(rows[rows.layer != 'original'].n_images.unique())))}; "
              f"trials per layer "
              f"{layers.trials.min()}–{layers.trials.max()} (median {layers.trials.median():g}); image-forwards "
              f"{int(layers.images.sum()):,}."]
    if variance.has_seeds(ids):
        lines += ["", *seed_effects(rows)]
    return "\n".join(lines)


def seed_effects(rows: pd.DataFrame) -> list[str]:
    """Each method's effect against the baseline per stage, on the mean and on the depth shift, counting seed
    variance (points)."""
    units = variance.model_units(rows.assign(criticality_pct=100 * rows.criticality), stage=module_stage)
    units = units[units.level != "layer"].replace({"unit": {ALL_LAYERS: "mean"}})
    effects = variance.method_effects(units, "baseline")
    lines = ["Method effects against the baseline, counting seed variance (points; mean over seeds, 95% interval "
             "on the pooled variance of model means over seeds; Welch: the half-width from the two methods' own "
             "seeds, where each has two or more, with its degrees of freedom):", "",
             "| method | seeds | unit | effect | seed SD | effect ÷ seed SD | verdict | Welch |", "|---" * 8 + "|"]
    for row in effects.itertuples():
        welch = f"± {row.welch_ci_pct:.1f} (df {row.welch_df:.1f})" if pd.notna(row.welch_ci_pct) else ""
        lines.append(f"| {row.method} | {row.seeds} (baseline {row.baseline_seeds}) | {row.unit} | "
                     f"{row.effect_pct:+.1f} ± {row.ci_pct:.1f} | {row.seed_sd_pct:.2f} | "
                     f"{row.effect_over_seed_sd:+.1f} | {row.verdict} | {welch} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/zoo-findings")
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--target-ci", type=float, default=0.03)
    parser.add_argument("--images-per-trial", type=int, default=IMAGES_PER_TRIAL,
                        help="one block size for every member (0: Cochran's rule per member, unpaired after the pilot)")
    parser.add_argument("--models", nargs="+", default=[r["id"] for r in fmnist.entries()])
    parser.add_argument("--seeds", action="store_true", help="also measure the zoo's training-seed replicates")
    args = parser.parse_args()
    if args.seeds:
        args.models += [r["id"] for r in fmnist.seed_replicates()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = measure_zoo(out, images=args.images, target_ci=args.target_ci,
                       images_per_trial=args.images_per_trial or None, models=args.models)
    text = report(rows, args.target_ci)
    (out / "findings.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
