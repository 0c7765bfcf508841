"""Benchmark: the paper's fixed design against the sequential design (``--target-ci``) on the Fashion-MNIST zoo.

    .venv/bin/python benchmarks/sequential.py                       # whole zoo, targets 0.03 and 0.02
    .venv/bin/python benchmarks/sequential.py --models baseline --reference-models baseline --reference-trials 100

For every zoo model and every layer (conv and linear), in one process:

* ``paper``: 3 trials × all 10,000 test images (the paper's design), with its 95% t-intervals over the 3 resets;
* ``seq 0.03`` / ``seq 0.02``: the sequential design at that target (default trial cap 100);
* for ``--reference-models``: a high-precision reference, ``--reference-trials`` independent (reset, image block)
  draws per layer (seed 1000: other resets and another image order than the runs it checks), blocks of
  ``--reference-images`` images.

Prints per design: image-forwards (reset evaluations plus the clean forwards of the blocks), wall seconds, both
as ratios to the paper's design; the distribution of per-layer interval half-widths; how many layers reached the
target or hit the cap; and coverage of the reference by each design's intervals, raw and allowing for the
reference's own 95% error (``|estimate - reference| <= sqrt(ci² + ci_ref²)``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import layercrit
from layercrit import zoo
from layercrit.measurement.estimate import layer_table

REFERENCE_SEED = 1000


def run(model: str, **options) -> tuple[pd.DataFrame, float]:
    start = time.perf_counter()
    rows = layercrit.measure(f"zoo:fmnist/{model}", "fashion-mnist", model_id=model, device="cpu",
                             batch_size=500, **options)
    return rows, time.perf_counter() - start


def forwards(rows: pd.DataFrame) -> int:
    """Image-forwards of a run: every computed reset evaluation plus the unmodified model on every image seen."""
    measured = rows[(rows.layer != "original") & (rows.computed_in_trial == rows.trial)]
    return int(measured.n_images.sum() + rows[rows.layer == "original"].n_images.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", help="zoo ids (default: the whole zoo)")
    parser.add_argument("--targets", nargs="+", type=float, default=[0.03, 0.02])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--reference-models", nargs="*", default=["baseline", "pgd_linf_8"])
    parser.add_argument("--reference-trials", type=int, default=200)
    parser.add_argument("--reference-images", type=int, default=200)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default="runs/bench-sequential", help="folder for the rows and the summary")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = args.models or [entry["id"] for entry in zoo.entries("fmnist")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    designs = {"paper": {"trials": 3}}
    designs.update({f"seq {t:g}": {"trials": 3, "target_ci": t} for t in args.targets})
    tables, cost = [], []
    for model in models:
        for name, options in designs.items():
            rows, seconds = run(model, images=args.images, **options)
            rows.to_csv(out / f"{model}-{name.replace(' ', '_')}.csv", index=False)
            table = layer_table(rows).assign(design=name)
            tables.append(table)
            cost.append({"model": model, "design": name, "seconds": seconds, "forwards": forwards(rows)})
            print(f"{model:<14} {name:<9} {seconds:7.1f} s {forwards(rows):>10,} image-forwards", flush=True)
    layers = pd.concat(tables, ignore_index=True)

    references = []
    for model in args.reference_models:
        rows, seconds = run(model, images=args.images, seed=REFERENCE_SEED, trials=args.reference_trials,
                            target_ci=1e-6, max_trials=args.reference_trials,
                            images_per_trial=args.reference_images)
        reference = layer_table(rows)[["layer", "criticality", "trials"]]
        rows_ci = layer_table(rows.assign(target_ci=np.nan, ci_looks=1))  # the plain t-interval of the reference
        references.append(reference.assign(model_id=model, reference_ci=rows_ci.criticality_ci.to_numpy())
                          .rename(columns={"criticality": "reference", "trials": "reference_trials"}))
        print(f"{model:<14} reference {seconds:7.1f} s ({args.reference_trials} draws per layer)", flush=True)

    cost = pd.DataFrame(cost)
    totals = cost.groupby("design", sort=False)[["seconds", "forwards"]].sum()
    totals["x_fewer_forwards"] = totals.loc["paper", "forwards"] / totals.forwards
    totals["x_less_time"] = totals.loc["paper", "seconds"] / totals.seconds
    widths = layers.groupby("design", sort=False).criticality_ci.describe(percentiles=[0.1, 0.5, 0.9])
    reached = layers.groupby("design", sort=False).apply(
        lambda t: pd.Series({"layers": len(t), "capped": int(t.capped.sum()),
                             "ci<=0.03": int((t.criticality_ci <= 0.03 + 1e-12).sum())}), include_groups=False)
    summary = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
               "cpu_flags": _cpu_flags(), "torch": torch.__version__, "threads": args.threads,
               "date": time.strftime("%Y-%m-%d"), "models": models, "images": args.images}
    print(json.dumps(summary))
    print("\ncost over the zoo\n" + totals.to_string(float_format=lambda v: f"{v:,.2f}"))
    print("\nper-layer 95% half-widths (fraction)\n" + widths.to_string(float_format=lambda v: f"{v:.4f}"))
    print("\nlayers at the target / capped\n" + reached.to_string())
    if references:
        reference = pd.concat(references, ignore_index=True)
        checked = layers.merge(reference, on=["model_id", "layer"])
        error = (checked.criticality - checked.reference).abs()
        checked["covered"] = error <= checked.criticality_ci
        checked["covered_allowing_reference"] = error <= np.hypot(checked.criticality_ci, checked.reference_ci)
        coverage = checked.groupby("design", sort=False)[["covered", "covered_allowing_reference"]].mean()
        coverage["layers"] = checked.groupby("design", sort=False).size()
        print("\ncoverage of the reference (share of layers)\n" + coverage.to_string(float_format=lambda v: f"{v:.3f}"))
        print(f"reference half-widths: median {reference.reference_ci.median():.4f}, "
              f"max {reference.reference_ci.max():.4f}")
        checked.to_csv(out / "coverage.csv", index=False)
    layers.to_csv(out / "layers.csv", index=False)
    cost.to_csv(out / "cost.csv", index=False)


def _cpu_flags() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return " ".join(flag for flag in wanted if f" {flag}" in flags)


if __name__ == "__main__":
    main()
