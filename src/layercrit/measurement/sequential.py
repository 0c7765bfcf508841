"""The sequential design: more reset draws where a layer's interval is still wide, few images per draw.

The paper's design evaluates 3 resets of every layer on the same 10,000 images. Most of a layer's uncertainty is
over resets, not images, so that spends nearly all its compute where it does not help. With ``target_ci = H``,
layercrit instead estimates every layer's expected criticality (over resets and images) to ±H at 95%:

1. **Blocks.** Trial ``t`` of every layer is a fresh reset draw (seeded by (seed, t), as always) evaluated on
   block ``t`` of images: consecutive slices of the seeded image order (wrapping around the pool), the same for
   every layer of a run, so comparisons between its layers are paired; between runs (models, precisions) only
   where their block sizes agree: the pilot's always, later ones when ``images_per_trial`` is given.
2. **Pilot.** Trials ``0 .. min_trials-1`` run for every layer on blocks of ``pilot_images`` images.
3. **Images per trial** (unless given): Cochran's two-stage rule on the pilot's variance components, pooled over
   layers (:func:`layercrit.measurement.estimate.images_per_trial`), with a fixed per-trial overhead in image-forward
   equivalents (a constant, not a timing, so every process chooses the same size).
4. **Looks.** At the trial counts of :func:`~layercrit.measurement.estimate.look_schedule` (``min_trials``, ×1.5, ...,
   ``max_trials``), a layer whose Bonferroni-over-looks t-interval is ±H or narrower stops; the others get trials
   up to the next look. A layer still wider at ``max_trials`` stops there, its rows marked ``capped``.

Every trial is a deterministic computation of (layer, trial, block), and the block sizes follow from the pilot's
rows alone, so the same spec gives the same rows in any process, worker count or resumed sweep.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from ..data import EvalSet
from ..errors import LayercritError
from . import engine
from .estimate import ALPHA, half_width, images_per_trial, look_schedule
from .layers import Target
from .resets import Reset
from .tasks import Task, take

TRIAL_OVERHEAD = 64.0  # image-forward equivalents one more trial costs (reset, restore, clean block forward)
MIN_IMAGES_PER_TRIAL = 16
PILOT_IMAGES = 256
# No layer stops before this many reset draws: a t-interval from fewer is easily fooled by a reset distribution
# with rare large effects (few draws, none of them large: a small spread and a low mean together).
FIRST_LOOK = 10


@dataclass(frozen=True)
class SequentialDesign:
    """Options of the sequential design (see the module docstring)."""

    target_ci: float
    min_trials: int = 3
    max_trials: int = 100
    images_per_trial: int | None = None
    pilot_images: int = PILOT_IMAGES
    trial_overhead: float = TRIAL_OVERHEAD
    alpha: float = ALPHA

    def __post_init__(self) -> None:
        if not 0 < self.target_ci < 1:
            raise LayercritError(f"target_ci={self.target_ci}: give a half-width as a fraction of 1, e.g. 0.03")
        if self.min_trials < 2:
            raise LayercritError(f"trials={self.min_trials}: the sequential design needs trials >= 2 (its pilot)")
        if self.max_trials < self.min_trials:
            raise LayercritError(f"max_trials={self.max_trials}: give at least trials ({self.min_trials})")
        if self.images_per_trial is not None and self.images_per_trial < 1:
            raise LayercritError(f"images_per_trial={self.images_per_trial}: give at least 1")

    def check_pool(self, pool: int) -> None:
        """Refuse an evaluation set too small for the pilot: ``min_trials`` blocks of distinct images, each of at
        least :data:`MIN_IMAGES_PER_TRIAL` (fewer would wrap the same images round as if they were new ones)."""
        need = self.min_trials * MIN_IMAGES_PER_TRIAL
        if pool < need:
            raise LayercritError(f"images={pool}: the sequential design (target_ci=...) needs at least {need} "
                                 f"images, a pilot block of {MIN_IMAGES_PER_TRIAL} for each of its {self.min_trials} pilot "
                                 f"trials; give images={need} or more, or leave out target_ci")

    @property
    def looks(self) -> list[int]:
        return look_schedule(min(max(self.min_trials, FIRST_LOOK), self.max_trials), self.max_trials)

    def pilot_size(self, pool: int) -> int:
        return max(1, min(self.pilot_images, pool // self.min_trials))

    def block_size(self, pilot_rows: pd.DataFrame, pool: int) -> int:
        """Images per trial after the pilot: given, or Cochran's rule on the pilot rows (one row per layer and
        pilot trial, with ``criticality`` and ``criticality_sd``)."""
        highest = max(1, pool // self.min_trials)
        if self.images_per_trial is not None:
            return min(self.images_per_trial, pool)
        per_layer = pilot_rows.groupby("layer", sort=False)
        within = per_layer.criticality_sd.apply(lambda sd: float(np.mean(np.square(sd))))
        between = per_layer.criticality.var(ddof=1).fillna(0.0)
        return images_per_trial(within.to_numpy(), between.to_numpy(), pilot_images=self.pilot_size(pool),
                                overhead=self.trial_overhead, lowest=min(MIN_IMAGES_PER_TRIAL, highest),
                                highest=highest)

    def block(self, trial: int, pilot: int, size: int, pool: int) -> tuple[int, list[int]]:
        """Trial ``trial``'s block: its offset in the seeded image order and its positions (wrapping around)."""
        if trial < self.min_trials:
            offset, length = trial * pilot, pilot
        else:
            offset, length = self.min_trials * pilot + (trial - self.min_trials) * size, size
        return offset, [(offset + i) % pool for i in range(length)]

    def settled(self, criticality: Sequence[float]) -> bool:
        """A layer with these trial means (at a look) is known to ±target_ci."""
        width = half_width(criticality, len(self.looks), self.alpha)
        return not math.isnan(width) and width <= self.target_ci


def run(
    model: nn.Module,
    evalset: EvalSet,
    targets: Sequence[Target],
    reset: Reset,
    design: SequentialDesign,
    options: engine.EngineOptions,
    on_chunk: Callable[[list[dict]], None] | None = None,
    memo: dict | None = None,
    task: Task | None = None,
) -> list[dict]:
    """Run the sequential design with the engine (``memo`` and ``task`` as for :func:`layercrit.measurement.engine.run`); rows as it gives
    them (original first), each (layer, trial) row with its block's ``image_offset``, ``ci_looks`` and ``capped``."""
    by_name = {target.name: target for target in targets}
    originals: dict[int, dict] = {}  # the unmodified model on each block, by offset
    rows: list[dict] = []
    quiet = replace(options, progress=False)
    memo = {} if memo is None else memo  # the model's structure, probed in the first call and kept for the others
    bar = tqdm(desc="trials", unit="trial", disable=not options.progress, total=design.max_trials)

    def evaluate(layers: list[str], trial: int, offset: int, positions: list[int]) -> list[dict]:
        block = _subset(evalset, positions)
        options = quiet
        if quiet.on_logits is not None:  # the engine counts positions in the block; the logits file in the pool
            index, save = torch.tensor(positions), quiet.on_logits
            options = replace(quiet, on_logits=lambda layer, t, part, logits: save(layer, t, index[part], logits))
        original, *measured = engine.run(model, block, [by_name[name] for name in layers], reset, [trial], options,
                                         memo=memo, task=task)
        originals.setdefault(offset, original)
        rows.extend(measured)
        if on_chunk is not None:
            on_chunk([_pooled(originals), *rows])
        bar.update(1)
        return measured

    with bar, engine.layout(model, options):
        measured = design_loop(design, list(by_name), len(evalset), evaluate)
    return [_pooled(originals), *measured]


def design_loop(
    design: SequentialDesign,
    layers: list[str],
    pool: int,
    evaluate: Callable[[list[str], int, int, list[int]], list[dict]],
) -> list[dict]:
    """The design itself, apart from any model: which layers get which trial on which images.

    ``evaluate(layers, trial, offset, positions)`` measures trial ``trial`` of each of ``layers`` on the images at
    ``positions`` of the seeded order and returns one row per layer (``layer``, ``criticality``,
    ``criticality_sd``, ``n_images``, ...). Returns every row, each with ``image_offset``, ``target_ci``,
    ``ci_looks`` and ``capped`` added.
    """
    pilot = design.pilot_size(pool)
    size = pilot
    looks = design.looks
    rows: list[dict] = []

    def run_trial(active: list[str], trial: int) -> None:
        offset, positions = design.block(trial, pilot, size, pool)
        rows.extend({**row, "image_offset": offset} for row in evaluate(active, trial, offset, positions))

    for trial in range(design.min_trials):
        run_trial(layers, trial)
    size = design.block_size(pd.DataFrame(rows), pool)
    for trial in range(design.min_trials, looks[0]):
        run_trial(layers, trial)
    active = _unsettled(layers, rows, design)
    for done, look in itertools.pairwise(looks):
        if not active:
            break
        for trial in range(done, look):
            run_trial(active, trial)
        active = _unsettled(active, rows, design)
    for row in rows:
        row.update(target_ci=design.target_ci, ci_looks=len(looks), capped=row["layer"] in active)
    return rows


def _unsettled(layers: list[str], rows: list[dict], design: SequentialDesign) -> list[str]:
    by_layer: dict[str, list[float]] = {}
    for row in rows:
        by_layer.setdefault(row["layer"], []).append(row["criticality"])
    return [name for name in layers if not design.settled(by_layer[name])]


def _subset(evalset: EvalSet, positions: list[int]) -> EvalSet:
    index = torch.tensor(positions)
    decode = evalset.decode
    return replace(evalset, images=take(evalset.images, index), labels=evalset.labels[index],
                   decode=None if decode is None else lambda part: decode([positions[i] for i in part]))


def _pooled(originals: dict[int, dict]) -> dict:
    """The unmodified model's row over every block evaluated: image-weighted means of the blocks' rows."""
    blocks = list(originals.values())
    n = sum(row["n_images"] for row in blocks)
    pooled = dict(blocks[0])
    for key, value in blocks[0].items():
        if isinstance(value, float) and key != "criticality_sd":
            pooled[key] = sum(row[key] * row["n_images"] for row in blocks) / n
    pooled.update(n_images=n, image_offset=0, criticality=0.0, criticality_sd=0.0, recovered_acc=1.0)
    return pooled
