"""Benchmark: the sequential design (Stein's two-stage procedure, mirrored pairs) against the earlier sequential
rule (looks at 10, 15, ..., 100 trials with Bonferroni-split t-intervals, reported as ±H) on the Fashion-MNIST zoo.

    .venv/bin/python benchmarks/sequential.py --earlier-src /path/to/old/checkout/src      # whole zoo at ±0.03
    .venv/bin/python benchmarks/sequential.py --models baseline --designs earlier --earlier-src ... --out X &
    .venv/bin/python benchmarks/sequential.py --models baseline --designs stein --reference-models --out X &
    .venv/bin/python benchmarks/sequential.py --summarize --out X      # the runs above, side by side

For every zoo model and every layer (conv and linear), in one run:

* ``earlier``: the earlier rule, run in a child process from ``--earlier-src`` (the ``src`` folder of a layercrit
  checkout before Stein's design, e.g. commit 1c3bab9), reported as it reported: ``max(its interval, ±H)``;
* ``stein``: this checkout's ``--target-ci`` (pilot 3 draws and their mirrors × 32 images, Cochran's block size,
  first stage of 10 units, Stein's total, mirrored pairs where the pilot shows they pay);
* ``stein, single draws``: the same with ``mirror=False``, to separate what Stein's rule and the pairs each give;
* ``paper``: 3 trials × all images, the paper's design;
* for ``--reference-models``: a reference, ``--reference-trials`` independent (reset, image block) draws per layer
  (seed 1000: other resets and another image order than the runs it checks), blocks of ``--reference-images``.

Prints per design: image-forwards (reset evaluations plus the unmodified model on every block), wall and CPU
seconds inside ``measure`` (start-up excluded; CPU seconds are the fairer measure on a shared machine), as ratios
to the earlier rule; per-layer half-widths; layers capped, and of
the layers the earlier rule capped how many each design settles; coverage of the reference, raw and allowing for
the reference's own 95% error (``|estimate - reference| <= sqrt(ci² + ci_ref²)``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import layercrit
from layercrit import zoo
from layercrit.measurement.estimate import layer_table

REFERENCE_SEED = 1000
# The child process that runs the earlier rule: the same measure() call under another layercrit.
CHILD = """
import sys, time, json, torch, layercrit
options = json.loads(sys.argv[1])
torch.set_num_threads(options.pop("threads"))
out = options.pop("out")
start, cpu = time.perf_counter(), time.process_time()
rows = layercrit.measure(**options)
seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
rows.to_csv(out, index=False)
print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "file": layercrit.__file__}))
"""
NAMES = {"earlier": "earlier", "stein": "stein", "single": "stein, single draws", "paper": "paper"}


def run(model: str, **options) -> tuple[pd.DataFrame, float, float]:
    start, cpu = time.perf_counter(), time.process_time()
    rows = layercrit.measure(f"zoo:fmnist/{model}", "fashion-mnist", model_id=model, device="cpu",
                             batch_size=500, progress=False, **options)
    return rows, time.perf_counter() - start, time.process_time() - cpu


def run_earlier(src: str, model: str, out: Path, threads: int, **options) -> tuple[pd.DataFrame, float, float]:
    call = {"model": f"zoo:fmnist/{model}", "data": "fashion-mnist", "model_id": model, "device": "cpu",
            "batch_size": 500, "progress": False, "out": str(out), "threads": threads, **options}
    env = {**os.environ, "PYTHONPATH": src}
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(call)], env=env, check=True,
                          capture_output=True, text=True)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    if not report["file"].startswith(str(Path(src).resolve())):
        raise SystemExit(f"--earlier-src {src}: the child imported {report['file']}")
    return pd.read_csv(out), report["seconds"], report["cpu_seconds"]


def forwards(rows: pd.DataFrame) -> int:
    """Image-forwards of a run: every computed reset evaluation plus the unmodified model on every image seen."""
    measured = rows[(rows.layer != "original") & (rows.computed_in_trial == rows.trial)]
    return int(measured.n_images.sum() + rows[rows.layer == "original"].n_images.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", help="zoo ids (default: the whole zoo)")
    parser.add_argument("--target", type=float, default=0.03)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--designs", nargs="*", default=["earlier", "stein", "single"], choices=list(NAMES),
                        help="earlier (needs --earlier-src), stein, single (stein with single draws only), paper")
    parser.add_argument("--earlier-src", help="src folder of a layercrit checkout with the earlier rule")
    parser.add_argument("--reference-models", nargs="*", default=["baseline"])
    parser.add_argument("--reference-trials", type=int, default=100)
    parser.add_argument("--reference-images", type=int, default=100)
    parser.add_argument("--summarize", action="store_true", help="run nothing: summarize the runs in --out (from "
                        "several invocations, e.g. one per design run side by side)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default="runs/bench-sequential", help="folder for the rows and the summary")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = args.models or [entry["id"] for entry in zoo.entries("fmnist")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.summarize:
        measure_all(args, models, out)
    summarize(args, out)


def measure_all(args, models: list[str], out: Path) -> None:
    """Every model under every design, then the references; each run's rows and cost into ``out``."""
    sequential = {"trials": 3, "target_ci": args.target, "images": args.images}
    options = {"stein": sequential, "single": {**sequential, "mirror": False},
               "paper": {"trials": 3, "images": args.images}}
    for model in models:
        for design in args.designs:
            path = out / f"{model}-{design}.csv"
            if design == "earlier":
                if not args.earlier_src:
                    raise SystemExit("--designs earlier needs --earlier-src")
                rows, seconds, cpu = run_earlier(args.earlier_src, model, path, args.threads, **sequential)
            else:
                rows, seconds, cpu = run(model, **options[design])
            rows.to_csv(path, index=False)
            cost = {"model": model, "design": NAMES[design], "seconds": seconds, "cpu_seconds": cpu,
                    "forwards": forwards(rows), "load_average": os.getloadavg()[0]}
            path.with_suffix(".json").write_text(json.dumps(cost))
            print(f"{model:<14} {NAMES[design]:<20} {seconds:7.1f} s ({cpu:7.1f} CPU s) "
                  f"{cost['forwards']:>10,} image-forwards", flush=True)
    for model in args.reference_models:
        rows, seconds, _ = run(model, images=args.images, seed=REFERENCE_SEED, trials=3, mirror=False,
                               target_ci=1e-6, max_trials=args.reference_trials,
                               images_per_trial=args.reference_images)
        rows.to_csv(out / f"{model}-reference.csv", index=False)
        print(f"{model:<14} reference {seconds:7.1f} s ({args.reference_trials} draws per layer)", flush=True)


def summarize(args, out: Path) -> None:
    tables, cost, references = [], [], []
    for path in sorted(out.glob("*.json")):
        record = json.loads(path.read_text())
        rows = pd.read_csv(path.with_suffix(".csv"))
        table = layer_table(rows).assign(design=record["design"])
        if record["design"] == "earlier":  # as the earlier rule reported a layer that stopped: estimate ± the target
            table["criticality_ci"] = np.maximum(table.criticality_ci, args.target)
        tables.append(table)
        cost.append(record)
    for path in sorted(out.glob("*-reference.csv")):
        rows = pd.read_csv(path)
        plain = rows.assign(first_stage=np.nan, target_ci=np.nan, ci_looks=1, pilot=False)  # t-interval over draws
        reference = layer_table(plain)[["model_id", "layer", "criticality", "criticality_ci", "trials"]]
        references.append(reference.rename(columns={"criticality": "reference", "criticality_ci": "reference_ci",
                                                    "trials": "reference_trials"}))
    if not tables:
        print(f"no design runs in {out} yet")
        return
    layers = pd.concat(tables, ignore_index=True)
    layers.to_csv(out / "layers.csv", index=False)
    cost = pd.DataFrame(cost)
    cost.to_csv(out / "cost.csv", index=False)
    order = [name for name in NAMES.values() if name in set(cost.design)]
    totals = cost.groupby("design")[["seconds", "cpu_seconds", "forwards"]].sum().loc[order]
    base = order[0]
    for column, ratio in (("forwards", "x_fewer_forwards"), ("seconds", "x_less_time"),
                          ("cpu_seconds", "x_less_cpu")):
        totals[ratio] = totals.loc[base, column] / totals[column]
    widths = layers.groupby("design").criticality_ci.describe(percentiles=[0.1, 0.5, 0.9]).loc[order]
    earlier = layers[(layers.design == "earlier") & layers.capped]
    capped_before = set(zip(earlier.model_id, earlier.layer, strict=True))

    def reach(t: pd.DataFrame) -> pd.Series:
        capped = set(zip(t[t.capped].model_id, t[t.capped].layer, strict=True))
        return pd.Series({"layers": len(t), "capped": len(capped),
                          f"ci<={args.target:g}": int((t.criticality_ci <= args.target + 1e-12).sum()),
                          "earlier's capped settled": len(capped_before - capped)})

    reached = layers.groupby("design").apply(reach, include_groups=False).loc[order]
    summary = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
               "cpu_flags": _cpu_flags(), "torch": torch.__version__, "threads": args.threads,
               "date": time.strftime("%Y-%m-%d %H:%M"), "models": sorted(set(cost.model)), "target": args.target}
    print(json.dumps(summary))
    print(f"\ncost over the models (ratios to {base})\n" + totals.to_string(float_format=lambda v: f"{v:,.2f}"))
    print("\nper-layer 95% half-widths (fraction)\n" + widths.to_string(float_format=lambda v: f"{v:.4f}"))
    print("\nlayers at the target / capped\n" + reached.to_string())
    if references:
        reference = pd.concat(references, ignore_index=True)
        checked = layers.merge(reference, on=["model_id", "layer"])
        error = (checked.criticality - checked.reference).abs()
        checked["covered"] = error <= checked.criticality_ci
        checked["covered_allowing_reference"] = error <= np.hypot(checked.criticality_ci, checked.reference_ci)
        coverage = checked.groupby("design")[["covered", "covered_allowing_reference"]].mean()
        coverage["layers"] = checked.groupby("design").size()
        print("\ncoverage of the reference (share of layers)\n"
              + coverage.loc[[d for d in order if d in coverage.index]].to_string(float_format=lambda v: f"{v:.3f}"))
        print(f"reference half-widths: median {reference.reference_ci.median():.4f}, "
              f"max {reference.reference_ci.max():.4f}")
        checked.to_csv(out / "coverage.csv", index=False)


def _cpu_flags() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return " ".join(flag for flag in wanted if f" {flag}" in flags)


if __name__ == "__main__":
    main()
