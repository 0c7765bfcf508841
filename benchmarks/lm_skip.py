"""Benchmark: which blocks a language model can lose, by layercrit's sequential design against SLEB's loop.

    .venv/bin/python benchmarks/lm_skip.py [--model zoo:lm/baseline] [--windows 512] [--target-ci 0.02]

SLEB (Song et al. 2024) removes each block in turn and evaluates the whole model on every evaluation window:
``blocks × windows`` full window-forwards (plus one for the unmodified model). layercrit measures the same
intervention as ``--groups blocks --reset skip --target-ci 0.02``: each block made the identity, its criticality
(1 − cos of next-token distributions) estimated to ± 0.02 on blocks of windows drawn by the sequential design, the
fast engine replaying the blocks before the skipped one from the clean pass. Both run in this one process, on the
same held-out windows (``python-stdlib``). Prints forwards, wall seconds, and Spearman ρ between SLEB's perplexity
increase and layercrit's criticality (and its change in NLL) across blocks.
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import time

import torch
from scipy import stats

import layercrit
from layercrit.data.text import load_text
from layercrit.measurement.estimate import layer_table
from layercrit.models.blocks import drop_blocks, find_blocks
from layercrit.resolve import resolve_model
from layercrit.training_lm import perplexity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="zoo:lm/baseline")
    parser.add_argument("--windows", type=int, default=512)  # skip with --target-ci: windows of its own per trial
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--target-ci", type=float, default=0.02)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    resolved = resolve_model(args.model)
    model = resolved.model
    data = load_text("python-stdlib", resolved.tokenizer, seq_len=args.seq_len, windows=args.windows)
    ids, mask = data.images["input_ids"], data.images["attention_mask"]
    n_blocks = len(find_blocks(model))

    start = time.perf_counter()
    clean = perplexity(model, ids, mask)
    sleb = [perplexity(drop_blocks(copy.deepcopy(model), [i]), ids, mask) for i in range(n_blocks)]
    sleb_s = time.perf_counter() - start
    sleb_forwards = (n_blocks + 1) * len(ids)

    start = time.perf_counter()
    fixed = layercrit.measure(resolved, data, groups="blocks", reset="skip", trials=1, images=args.windows,
                              seq_len=args.seq_len, batch_size=16, progress=False)
    fixed_s = time.perf_counter() - start
    fixed_forwards = (n_blocks + 1) * len(ids)

    start = time.perf_counter()
    rows = layercrit.measure(resolved, data, groups="blocks", reset="skip", target_ci=args.target_ci,
                             images=args.windows, seq_len=args.seq_len, batch_size=16, progress=False)
    ours_s = time.perf_counter() - start
    layers = layer_table(rows)
    nll = layer_table(rows, value="loss")
    ours_forwards = int(rows[rows.layer == "original"].n_images.iloc[0] / (args.seq_len - 1)) + int(
        layers.images.sum() / (args.seq_len - 1))

    print(f"{args.model}: {n_blocks} blocks, {len(ids)} windows of {args.seq_len} tokens, perplexity {clean:.2f}; "
          f"torch {torch.__version__}, {args.threads} thread(s), {platform.machine()}")
    print(f"{'block':<18}{'SLEB ppl':>10}{'crit':>8}{'± 95%':>8}{'ΔNLL':>8}{'BI':>8}{'windows':>9}")
    for i, row in layers.reset_index(drop=True).iterrows():
        print(f"{row.layer:<18}{sleb[i]:10.2f}{row.criticality:8.4f}{row.criticality_ci:8.4f}"
              f"{nll.criticality[i] - math.log(clean):8.4f}{row.block_influence:8.4f}"
              f"{int(row.images / (args.seq_len - 1)):9d}")
    rho_crit = stats.spearmanr(sleb, layers.criticality).statistic
    rho_nll = stats.spearmanr(sleb, nll.criticality).statistic
    print(f"SLEB drop-one loop:      {sleb_forwards} window-forwards (full model), {sleb_s:.1f} s")
    print(f"layercrit skip, 1 trial on every window: {fixed_forwards} window-evaluations (suffix replay), "
          f"{fixed_s:.1f} s")
    print(f"layercrit skip, ±{args.target_ci}: {ours_forwards} window-evaluations (suffix replay), {ours_s:.1f} s")
    print(f"Spearman rho across blocks, SLEB perplexity vs criticality {rho_crit:+.2f}, vs ΔNLL {rho_nll:+.2f}; "
          f"fixed-design criticality vs sequential {stats.spearmanr(layer_table(fixed).criticality, layers.criticality).statistic:+.2f}")


if __name__ == "__main__":
    main()
