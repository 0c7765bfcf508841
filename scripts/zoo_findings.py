"""The measurement behind the README's "What the demo shows": every member of the Fashion-MNIST zoo under the
sequential design, then each of the paper's findings as a comparison with its 95% interval.

    .venv/bin/python scripts/zoo_findings.py --out runs/zoo-findings        # about 3 min on 2 CPU cores

Each member is measured with ``layercrit.measure`` (``rerandomize``, every conv/linear layer, the 10,000 test
images, ``target_ci`` ±0.03; seed 0) and kept in ``OUT/ID.csv``, so a killed run goes on with the members it lacks.
It prints, and writes to ``OUT/findings.md``:

- per model and stage (stem ``conv1``, ``layer1``..``layer3``, ``fc``): the mean criticality of the stage's layers
  in percent, ± the mean of their 95% half-widths (as :func:`layercrit.measurement.estimate.model_table`: it bounds
  the half-width of the average whatever the correlation between layers);
- per model: test accuracy (manifest), mean criticality ± its half-width, and the *depth shift*: the deep stage's
  (``layer3``) criticality minus the mean of the early stages' (stem and ``layer1``), in points;
- each finding as a difference from the baseline with its half-width (members are measured with their own
  resets, so half-widths of a difference add in quadrature);
- Spearman's ρ between test accuracy and mean criticality;
- with ``--seeds``, the training-seed replicates (``ID@seedN``) the zoo holds are measured too, and each method's
  effect on every stage, the mean and the depth shift is set against its seed variance
  (:func:`layercrit.analysis.variance.method_effects`: mean over seeds minus the baseline's, 95% interval on the
  pooled variance over seeds, effect ÷ seed SD).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pandas as pd
from scipy import stats

import layercrit
from layercrit.analysis import variance
from layercrit.measurement.estimate import layer_table, model_table
from layercrit.zoo import fmnist

STAGES = ("conv1", "layer1", "layer2", "layer3", "fc")
EARLY, DEEP = ("conv1", "layer1"), ("layer3",)


def stage_of(layer: str) -> str:
    """``model.layer2.0.conv1`` -> ``layer2``; ``model.conv1`` -> ``conv1``."""
    return layer.removeprefix("model.").split(".")[0]


def measure_zoo(out: Path, *, images: int, target_ci: float, models: list[str]) -> pd.DataFrame:
    frames = []
    for model_id in models:
        path = out / f"{model_id}.csv"
        if not path.is_file():
            rows = layercrit.measure(f"zoo:fmnist/{model_id}", "fashion-mnist", images=images, target_ci=target_ci,
                                     seed=0, batch_size=500, progress=False)
            rows.assign(model_id=model_id).to_csv(path.with_suffix(".tmp"), index=False)
            path.with_suffix(".tmp").replace(path)
            print(f"measured {model_id}", flush=True)
        frames.append(pd.read_csv(path))
    return pd.concat(frames, ignore_index=True)


def stage_table(layers: pd.DataFrame) -> pd.DataFrame:
    """Per model and stage: mean criticality of its layers and the mean of their half-widths (fractions), from
    :func:`layer_table`'s rows."""
    return (layers.assign(stage=layers.layer.map(stage_of)).groupby(["model_id", "stage"], sort=False)
            .agg(criticality=("criticality", "mean"), criticality_ci=("criticality_ci", "mean")).reset_index())


def shift(stages: pd.DataFrame, model_id: str) -> tuple[float, float]:
    """Depth shift of one model: deep minus early stage criticality (fraction) and its half-width."""
    s = stages[stages.model_id == model_id].set_index("stage")
    deep, early = s.loc[list(DEEP)], s.loc[list(EARLY)]
    value = deep.criticality.mean() - early.criticality.mean()
    width = math.hypot(deep.criticality_ci.mean(), early.criticality_ci.mean())
    return value, width


def pct(value: float, width: float) -> str:
    return f"{100 * value:.1f} ± {100 * width:.1f}"


def report(rows: pd.DataFrame, target_ci: float) -> str:
    records = {r["id"]: r for r in fmnist.entries(replicates=True)}
    layers = layer_table(rows)
    stages = stage_table(layers)
    models = model_table(rows).set_index("model_id")
    ids = list(dict.fromkeys(rows.model_id))
    lines = ["| model | test acc. | " + " | ".join(f"`{s}`" for s in STAGES) + " | mean | depth shift |",
             "|---" * (len(STAGES) + 4) + "|"]
    for model_id in ids:
        s = stages[stages.model_id == model_id].set_index("stage")
        cells = [pct(s.loc[stage, "criticality"], s.loc[stage, "criticality_ci"]) for stage in STAGES]
        m = models.loc[model_id]
        lines.append(f"| {model_id} | {records[model_id]['accuracy']:.1f} | " + " | ".join(cells)
                     + f" | {pct(m.criticality, m.criticality_ci)} | {pct(*shift(stages, model_id))} |")
    base_value, base_width = shift(stages, "baseline")
    lines += ["", "Depth shift against the baseline's (points; > 0: deep layers matter more than in the baseline):", ""]
    for model_id in ids:
        if model_id != "baseline":
            value, width = shift(stages, model_id)
            lines.append(f"- {model_id}: {pct(value - base_value, math.hypot(width, base_width))}")
    accuracy = [records[i]["accuracy"] for i in ids]
    mean = [models.loc[i, "criticality"] for i in ids]
    rho, p = stats.spearmanr(accuracy, mean)
    kept = [i for i in ids if i != "frozen_random"]
    rho_kept, p_kept = stats.spearmanr([records[i]["accuracy"] for i in kept], [models.loc[i, "criticality"] for i in kept])
    capped = int(layers.capped.sum())
    lines += ["", f"Spearman ρ(test accuracy, mean criticality): {rho:.2f} (p = {p:.2g}, n = {len(ids)}); without "
              f"frozen_random {rho_kept:.2f} (p = {p_kept:.2g}).",
              f"Layers that hit the 100-trial cap before ±{target_ci:g}: {capped} of {len(layers)}."]
    if variance.has_seeds(ids):
        lines += ["", *seed_effects(rows)]
    return "\n".join(lines)


def seed_effects(rows: pd.DataFrame) -> list[str]:
    """Each method's effect against the baseline per stage, on the mean and on the depth shift, counting seed
    variance (points)."""
    rows = rows.assign(criticality_pct=100 * rows.criticality)
    stages = variance.model_units(rows, stage=stage_of)
    stages = stages[stages.level == "stage"]
    overall = variance.model_units(rows, stage=lambda layer: "mean")
    by_stage = stages.set_index(["model_id", "unit"])
    deep = by_stage.xs(DEEP[0], level="unit")
    early = [by_stage.xs(stage, level="unit") for stage in EARLY]
    shift_units = deep[["method", "seed"]].assign(
        level="shift", unit="depth shift", mean=deep["mean"] - sum(e["mean"] for e in early) / len(early),
        noise_var=deep["noise_var"] + sum(e["noise_var"] for e in early) / len(early) ** 2,
        reset_var=float("nan"), image_var=float("nan"), trials=deep["trials"]).reset_index()
    units = pd.concat([stages, overall[overall.level == "stage"], shift_units], ignore_index=True)
    effects = variance.method_effects(units, "baseline")
    lines = ["Method effects against the baseline, counting seed variance (points; mean over seeds, 95% interval "
             "on the pooled variance of model means over seeds):", "",
             "| method | seeds | unit | effect | seed SD | effect ÷ seed SD | verdict |", "|---" * 7 + "|"]
    for row in effects.itertuples():
        lines.append(f"| {row.method} | {row.seeds} (baseline {row.baseline_seeds}) | {row.unit} | "
                     f"{row.effect_pct:+.1f} ± {row.ci_pct:.1f} | {row.seed_sd_pct:.2f} | "
                     f"{row.effect_over_seed_sd:+.1f} | {row.verdict} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/zoo-findings")
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--target-ci", type=float, default=0.03)
    parser.add_argument("--models", nargs="+", default=[r["id"] for r in fmnist.entries()])
    parser.add_argument("--seeds", action="store_true", help="also measure the zoo's training-seed replicates")
    args = parser.parse_args()
    if args.seeds:
        args.models += [r["id"] for r in fmnist.seed_replicates()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = report(measure_zoo(out, images=args.images, target_ci=args.target_ci, models=args.models), args.target_ci)
    (out / "findings.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
