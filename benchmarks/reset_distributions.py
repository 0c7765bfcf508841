"""Measure the reset distributions of the Fashion-MNIST zoo's layers, each draw with its mirror, for the coverage
simulation of the sequential design (tests/test_estimate.py reads the file this writes).

    .venv/bin/python benchmarks/reset_distributions.py --models baseline pgd_linf_8 --draws 40 --images 250

For every conv and linear layer of each model: ``--draws`` rerandomize draws ``W`` (seed 2000, an image order and
resets the designs' own runs do not use) and their mirrors ``-W``, each evaluated on the same ``--images`` test
images (the paper's fixed design). Writes one row per (model, layer, draw): ``criticality`` of ``W``,
``mirrored`` (of ``-W``) and ``sd_within`` (the per-image spread of criticality within ``W``'s evaluation), rounded
to 5 decimals.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch

import layercrit
from layercrit.measurement.layers import select_targets
from layercrit.measurement.measure import as_resolved
from layercrit.measurement.resets import get_reset
from layercrit.measurement.sequential import Mirrored

SEED = 2000
OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "reset_distributions.csv"


def measure_model(model: str, draws: int, images: int) -> pd.DataFrame:
    resolved = as_resolved(f"zoo:fmnist/{model}", seed=SEED, model_id=model)
    targets = select_targets(resolved.model, "conv,linear")
    options = {"images": images, "device": "cpu", "batch_size": images, "model_id": model, "seed": SEED,
               "layers": targets, "progress": False}
    plain = layercrit.measure(resolved, "fashion-mnist", trials=draws, **options)
    base = get_reset("rerandomize", seed=SEED, fresh=resolved.fresh)
    mirrored = layercrit.measure(resolved, "fashion-mnist", trials=list(range(1, draws + 1)),
                                 reset=Mirrored(base, targets), **options)
    plain, mirrored = plain[plain.layer != "original"], mirrored[mirrored.layer != "original"]
    out = plain[["model_id", "layer", "trial", "criticality", "criticality_sd"]].rename(
        columns={"trial": "draw", "criticality_sd": "sd_within"})
    mirror = mirrored.assign(draw=mirrored.trial - 1)[["layer", "draw", "criticality"]]
    out = out.merge(mirror.rename(columns={"criticality": "mirrored"}), on=["layer", "draw"])
    return out[["model_id", "layer", "draw", "criticality", "mirrored", "sd_within"]].round(5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["baseline", "pgd_linf_8"])
    parser.add_argument("--draws", type=int, default=40)
    parser.add_argument("--images", type=int, default=250)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    frames = []
    for model in args.models:
        start = time.perf_counter()
        frames.append(measure_model(model, args.draws, args.images))
        pd.concat(frames).to_csv(args.out, index=False)
        print(f"{model}: {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
