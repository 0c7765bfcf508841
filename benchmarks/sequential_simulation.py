"""Cost and coverage of the sequential design on simulated layers whose expected criticality is known.

    .venv/bin/python benchmarks/sequential_simulation.py --runs 30                  # this checkout's design
    PYTHONPATH=/path/to/older/checkout/src .venv/bin/python benchmarks/sequential_simulation.py --runs 30

Drives whichever layercrit is imported (its ``design_loop`` and ``layer_table``, as it reports intervals) with the
populations of tests/test_estimate.py: reset distributions of the zoo's shapes at the baseline's pair correlations,
30 layers per run, ±``--target``, a 10,000-image pool. Prints coverage (all layers and the skewed ones), capped
layers and image-forwards (reset evaluations) per run, trials per layer and the median half-width.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' populations

from tests.test_estimate import _distributions, _Population  # noqa: E402

from layercrit.measurement import sequential  # noqa: E402
from layercrit.measurement.estimate import layer_table  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--target", type=float, default=0.03)
    parser.add_argument("--no-mirror", action="store_true", help="single draws only (this checkout's design)")
    args = parser.parse_args()
    table = _distributions()
    both = table.melt(id_vars=["layer"], value_vars=["criticality", "mirrored"])
    skewed = both.groupby("layer").value.skew().abs() > 0.5
    mirrors = "symmetric" in inspect.signature(sequential.design_loop).parameters  # Stein's design, or the earlier
    start = time.perf_counter()
    tables = []
    for run in range(args.runs):
        population = _Population(table, seed=run)
        layers = list(population.layers)
        if mirrors:
            design = sequential.SequentialDesign(args.target, mirror=not args.no_mirror)
            rows = sequential.design_loop(design, layers, 10_000, population.evaluate, layers)
        else:
            design = sequential.SequentialDesign(args.target)
            rows = sequential.design_loop(design, layers, 10_000, population.evaluate)  # no mirrors there
        result = layer_table(pd.DataFrame(rows).assign(model_id="sim", run=run), ["model_id", "run"])
        tables.append(result.assign(truth=result.layer.map(population.truth)))
    result = pd.concat(tables, ignore_index=True)
    result["covered"] = (result.criticality - result.truth).abs() <= result.criticality_ci
    result["skewed"] = result.layer.map(skewed)
    print(f"{'Stein' if mirrors else 'earlier rule'}{', single draws' if args.no_mirror else ''}: "
          f"{args.runs} runs of {len(layers)} layers in {time.perf_counter() - start:.0f} s; "
          f"coverage {result.covered.mean():.4f} (skewed {result[result.skewed].covered.mean():.4f}); "
          f"capped per run {result.capped.sum() / args.runs:.2f}; image-forwards per run "
          f"{result.images.sum() / args.runs:,.0f}; trials per layer {result.trials.mean():.1f}; "
          f"median half-width {result.criticality_ci.median():.4f}")


if __name__ == "__main__":
    main()
