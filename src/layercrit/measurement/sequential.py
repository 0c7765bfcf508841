"""The sequential design: more reset draws where a layer's interval is still wide, few images per draw.

The paper's design evaluates 3 resets of every layer on the same 10,000 images. Most of a layer's uncertainty is
over resets, not images, so that spends nearly all its compute where it does not help. With ``target_ci = H``,
layercrit instead estimates every layer's expected criticality (over resets and images) to ±H at 95% with Stein's
two-stage procedure (Stein 1945), on units that are single draws or mirrored pairs of draws:

1. **Blocks.** Trial ``t`` of every layer is evaluated on block ``t`` of images: consecutive slices of the seeded
   image order (wrapping around the pool), the same for every layer of a run, so comparisons between its layers
   are paired; between runs (models, precisions) only where their block sizes agree: the pilot's always, later
   ones when ``images_per_trial`` is given.
2. **Mirrored pairs.** A reset draw ``W`` from an init symmetric about zero is as likely as ``-W``
   (:func:`mirrors` checks what the reset draws: conv and linear weights from Kaiming or PyTorch's default init
   pass, BatchNorm's weight of 1 does not). For such a layer, trial ``2u + 1`` may be the mirror of trial ``2u``'s
   draw (rows say so in ``mirror_of``); the pair's mean is then one unit. Where the criticalities of ``W`` and
   ``-W`` are negatively correlated, a pair's mean varies less than the mean of two independent draws.
3. **Pilot.** Trials ``0 .. 2·min_trials - 1`` of every layer, on small blocks of ``pilot_images`` images:
   ``min_trials`` mirrored pairs where mirroring applies, single draws otherwise. It sets the images per trial
   after it
   (unless given: Cochran's two-stage rule on the pilot's variance components, pooled over layers,
   :func:`layercrit.measurement.estimate.images_per_trial`, with a fixed per-trial overhead in image-forward
   equivalents), and for each mirroring layer whether pairs pay: they do when the pilot's pair means vary less
   than half as much as its draws (``2 Var(pair means) < Var(draws)``, i.e. a negative pair correlation).
   Layers where they pay are measured in mirrored pairs from then on, the others in single draws. The pilot's
   rows (``pilot`` in the rows) take no part in the estimate: its blocks are smaller, so its units would vary
   otherwise than the ones after it, and Stein's interval needs units alike.
4. **Stage 1** ends when a layer has ``first_stage`` units after the pilot. From their spread ``s``,
   Stein's rule gives the layer's total number of units, ``n = max(first_stage, ceil((t · s / H)²))`` with
   ``t = t(0.975, first_stage - 1)``; a layer that would need more than ``max_trials`` trials stops there and is
   marked ``capped`` (as is one whose first stage the cap cuts short: its interval is then the t-interval over
   the units it has).
5. **Stage 2** runs the remaining units. The estimate is the mean of the ``n`` unit means; the interval is
   ``± t · s / sqrt(n)`` (:func:`layercrit.measurement.estimate.stein_half_width`): at most ±H unless capped, and
   exact at 95% for normal unit means, because ``n`` depends on the first stage's spread only, which is
   independent of the mean, and every choice before it on the pilot alone. How close it stays for the skewed reset distributions measured on the zoo is measured
   by simulation (tests/test_estimate.py).

Every trial is a deterministic computation of (layer, trial, block, mirrored or not), and every choice (block
size, mirroring, ``n``) follows from earlier rows alone, so the same spec gives the same rows in any process,
worker count or resumed sweep.
"""

from __future__ import annotations

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
from .estimate import ALPHA, images_per_trial, stein_units
from .layers import Target
from .resets import ModelState, Rerandomize, Reset
from .tasks import Task, take

TRIAL_OVERHEAD = 64.0  # image-forward equivalents one more trial costs (reset, restore, clean block forward)
MIN_IMAGES_PER_TRIAL = 16
PILOT_IMAGES = 32
# Units before Stein's rule: the first stage's spread, with FIRST_STAGE - 1 degrees of freedom, sets the interval.
# Stein's interval stands on that one spread, so the first stage must estimate it well also for skewed reset
# distributions (whose sample variance varies more than a normal's): at 10 units the simulated coverage on the
# skewed shapes was 93.3%, at 20 it is within [94%, 97.5%] (tests/test_estimate.py). More units are spent on the
# narrow layers, which need few.
FIRST_STAGE = 20


@dataclass(frozen=True)
class SequentialDesign:
    """Options of the sequential design (see the module docstring).

    Args:
        target_ci: the 95% half-width to reach (fraction).
        min_trials: pilot draws per layer (each with its mirror where mirroring applies; otherwise as many more
            single draws): the pilot is ``2 · min_trials`` trials.
        max_trials: at most this many trials (evaluations) per layer; a layer that needs more is ``capped``.
        images_per_trial: images per trial after the pilot (default: Cochran's rule on the pilot).
        pilot_images: images per pilot trial.
        trial_overhead: what one more trial costs beyond its images, in image-forwards (for Cochran's rule).
        first_stage: units (draws or mirrored pairs) after the pilot before Stein's rule sets a layer's total.
        mirror: measure in mirrored pairs where the pilot shows they pay (False: single draws only).
        alpha: 1 − the level of the intervals.
    """

    target_ci: float
    min_trials: int = 3
    max_trials: int = 100
    images_per_trial: int | None = None
    pilot_images: int = PILOT_IMAGES
    trial_overhead: float = TRIAL_OVERHEAD
    first_stage: int = FIRST_STAGE
    mirror: bool = True
    alpha: float = ALPHA

    def __post_init__(self) -> None:
        if not 0 < self.target_ci < 1:
            raise LayercritError(f"target_ci={self.target_ci}: give a half-width as a fraction of 1, e.g. 0.03")
        if self.min_trials < 2:
            raise LayercritError(f"trials={self.min_trials}: the sequential design needs trials >= 2 (its pilot)")
        if self.first_stage < 2:
            raise LayercritError(f"first_stage={self.first_stage}: give at least 2 units (a spread needs two)")
        if self.max_trials < self.pilot_trials:
            raise LayercritError(f"max_trials={self.max_trials}: give at least twice trials ({self.pilot_trials}, "
                                 "the pilot)")
        if self.images_per_trial is not None and self.images_per_trial < 1:
            raise LayercritError(f"images_per_trial={self.images_per_trial}: give at least 1")

    def check_pool(self, pool: int, *, repeats: bool = False, reset: str = "") -> None:
        """Refuse an evaluation set too small for the pilot: ``2 · min_trials`` blocks of distinct images, each of
        at least :data:`MIN_IMAGES_PER_TRIAL` (fewer would wrap the same images round as if they were new ones).
        With ``repeats`` (a reset that is the same in every trial), the first stage needs images of its own too:
        ``first_stage`` blocks of at least :data:`MIN_IMAGES_PER_TRIAL` after the pilot's."""
        need = self.pilot_trials * MIN_IMAGES_PER_TRIAL
        if pool < need:
            raise LayercritError(f"images={pool}: the sequential design (target_ci=...) needs at least {need} "
                                 f"images, a pilot block of {MIN_IMAGES_PER_TRIAL} for each of its {self.pilot_trials} "
                                 f"pilot trials; give images={need} or more, or leave out target_ci")
        if repeats and pool - self.pilot_trials * self.pilot_size(pool) < self.first_stage * MIN_IMAGES_PER_TRIAL:
            need = self.pilot_trials * self.pilot_images + self.first_stage * MIN_IMAGES_PER_TRIAL
            raise LayercritError(
                f"images={pool}: reset {reset or 'this reset'} is the same in every trial, so each trial of the "
                f"sequential design (target_ci=...) needs images of its own, {self.first_stage} blocks of at least "
                f"{MIN_IMAGES_PER_TRIAL} after the pilot's {self.pilot_trials}; give images={need} or more, or leave "
                "out target_ci (trials=1: every image once)")

    @property
    def pilot_trials(self) -> int:
        return 2 * self.min_trials

    def pilot_size(self, pool: int) -> int:
        return max(1, min(self.pilot_images, pool // self.pilot_trials))

    def block_size(self, pilot_rows: pd.DataFrame, pool: int) -> int:
        """Images per trial after the pilot: given, or Cochran's rule on the pilot rows (one row per layer and
        pilot trial, with ``criticality`` and ``criticality_sd``)."""
        highest = max(1, pool // self.pilot_trials)
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
        if trial < self.pilot_trials:
            offset, length = trial * pilot, pilot
        else:
            offset, length = self.pilot_trials * pilot + (trial - self.pilot_trials) * size, size
        return offset, [(offset + i) % pool for i in range(length)]

    def trials_needed(self, first_stage_means: Sequence[float], done: int, step: int) -> tuple[int, bool]:
        """A layer's trials in all after a first stage that took ``done`` trials (``step`` per unit: 2 for
        mirrored pairs): Stein's number of units from the first stage's unit means, and whether the trial cap
        cut it."""
        extra = (stein_units(first_stage_means, self.target_ci, self.alpha) - self.first_stage) * step
        room = (self.max_trials - done) // step * step
        return done + min(extra, room), extra > room


def pairs_pay(pilot: Sequence[float]) -> bool:
    """Whether mirrored pairs beat independent draws, from pilot trial means in pair order ``(W, -W), ...``:
    the pair means vary less than half as much as the draws (a negative correlation within pairs)."""
    x = np.asarray(pilot, dtype=np.float64)
    pair_means = x.reshape(-1, 2).mean(axis=1)
    return bool(2 * pair_means.var(ddof=1) < x.var(ddof=1))


def mirrors(reset: Reset, model: nn.Module, target: Target) -> bool:
    """Whether ``-W`` is as likely as ``W`` for the reset's draws of ``target``: a ``rerandomize`` whose draw of
    every tensor of the target is zero or centred on zero (mean within 4 standard errors of 0, with a spread).

    This reads one draw: it tells a symmetric init (Kaiming, PyTorch's default uniform, a zero bias) from a
    constant one (a BatchNorm weight of 1) or one centred elsewhere, not a skewed init with mean zero (none of
    PyTorch's or timm's)."""
    if not isinstance(reset, Rerandomize):
        return False
    for name in target.modules:
        for tensor in reset.new_state(name, model.get_submodule(name), 0).values():
            x = tensor.detach().double().flatten()
            if not tensor.is_floating_point() or not torch.isfinite(x).all():
                return False
            if not x.any():
                continue
            spread = float(x.std()) if len(x) > 1 else 0.0
            if spread == 0 or abs(float(x.mean())) > 4 * spread / math.sqrt(len(x)):
                return False
    return True


class Mirrored(Reset):
    """``base``'s draw of trial ``t - 1``, negated, as trial ``t`` of the ``targets`` (the other layers: ``base``'s
    draw of trial ``t``). BatchNorm statistics around a target follow ``base``'s policy for the mirrored state."""

    def __init__(self, base: Reset, targets: Sequence[Target]):
        super().__init__(seed=base.seed, fresh=base.fresh)
        self.base = base
        self.bn = base.bn
        self.targets = {target.name: target for target in targets}
        self._drawn: tuple[int, dict[str, ModelState]] | None = None

    def new_states(self, model: nn.Module, target: Target, trial: int) -> ModelState:
        if target.name not in self.targets:
            return self.base.new_states(model, target, trial)
        if self._drawn is None or self._drawn[0] != trial:
            # every mirrored target at once: a rerandomize keeps one fresh instance, the draw of trial - 1
            self._drawn = (trial, {name: {module: {key: -value for key, value in
                                                   self.base.new_state(module, model.get_submodule(module),
                                                                       trial - 1).items()}
                                          for module in t.modules}
                                   for name, t in self.targets.items()})
        return self.bn.adjust(model, target, dict(self._drawn[1][target.name]))

    def describe(self) -> str:
        return self.base.describe()


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
    """Run the sequential design with the engine (``memo`` and ``task`` as for :func:`layercrit.measurement.engine.run`);
    rows as it gives them (original first), each (layer, trial) row with its block's ``image_offset``, ``mirror_of``,
    ``pilot``, ``first_stage`` and ``capped``."""
    by_name = {target.name: target for target in targets}
    originals: dict[int, dict] = {}  # the unmodified model on each block, by offset
    rows: list[dict] = []
    quiet = replace(options, progress=False)
    memo = {} if memo is None else memo  # the model's structure, probed in the first call and kept for the others
    bar = tqdm(desc="trials", unit="trial", disable=not options.progress, total=design.max_trials)
    symmetric = [name for name, target in by_name.items() if design.mirror and mirrors(reset, model, target)]

    def evaluate(layers: list[str], trial: int, offset: int, positions: list[int], mirrored: set[str]) -> list[dict]:
        block = _subset(evalset, positions)
        options = quiet
        if quiet.on_logits is not None:  # the engine counts positions in the block; the logits file in the pool
            index, save = torch.tensor(positions), quiet.on_logits
            options = replace(quiet, on_logits=lambda layer, t, part, logits: save(layer, t, index[part], logits))
        strategy = Mirrored(reset, [by_name[name] for name in mirrored]) if mirrored else reset
        original, *measured = engine.run(model, block, [by_name[name] for name in layers], strategy, [trial],
                                         options, memo=memo, task=task)
        originals.setdefault(offset, original)
        rows.extend(measured)
        if on_chunk is not None:
            on_chunk([_pooled(originals), *rows])
        bar.update(1)
        return measured

    repeats = engine.draws_repeat(model, targets, reset)
    if repeats:
        design.check_pool(len(evalset), repeats=True, reset=reset.name)
    with bar, engine.layout(model, options):
        measured = design_loop(design, list(by_name), len(evalset), evaluate, symmetric, repeats=repeats)
    return [_pooled(originals), *measured]


def design_loop(
    design: SequentialDesign,
    layers: list[str],
    pool: int,
    evaluate: Callable[[list[str], int, int, list[int], set[str]], list[dict]],
    symmetric: Sequence[str] = (),
    repeats: bool = False,
) -> list[dict]:
    """The design itself, apart from any model: which layers get which trial on which images, mirrored or not.

    With ``repeats`` (a reset whose every trial is the same state: ``zero``, ``rewind``, ``skip``), a trial adds
    only its images, so no block wraps around the pool: the blocks after the pilot are at most the size that lets
    ``first_stage`` of them fit in the images left, a layer runs at most the distinct blocks that the pool holds, and
    one that needs more is ``capped`` with the interval over those (wrapping would count the same images again as
    if they were new, and the interval would shrink with no new information).

    ``evaluate(layers, trial, offset, positions, mirrored)`` measures trial ``trial`` of each of ``layers`` on the
    images at ``positions`` of the seeded order, those in ``mirrored`` with the negated draw of trial
    ``trial - 1``, and returns one row per layer (``layer``, ``criticality``, ``criticality_sd``, ``n_images``,
    ...). ``symmetric`` are the layers whose draws may be mirrored (:func:`mirrors`). Returns every row, each with
    ``image_offset``, ``mirror_of``, ``pilot``, ``target_ci``, ``first_stage``, ``ci_looks`` and ``capped`` added. With
    ``design.mirror`` off, no layer is mirrored.
    """
    pilot = design.pilot_size(pool)
    size = pilot
    symmetric = set(symmetric) if design.mirror else set()
    paired = set(symmetric)  # layers measured in mirrored pairs (after the pilot: where they pay)
    by_layer: dict[str, list[dict]] = {name: [] for name in layers}
    units = dict.fromkeys(layers, 0)  # each layer's units after the pilot (a pair counts when its first half runs)
    needed: dict[str, int] = {}  # trials a layer runs in all, once stage 1 has set it
    capped: set[str] = set()
    rows: list[dict] = []
    trial = 0
    last = design.max_trials  # with repeats: the trials whose blocks do not wrap, once the block size is known
    while trial < last:
        active = [name for name in layers if trial < needed.get(name, design.max_trials)]
        if not active:
            break
        if trial == design.pilot_trials:
            size = design.block_size(pd.DataFrame(rows), pool)
            if repeats:
                left = pool - design.pilot_trials * pilot  # images no trial has seen
                if design.images_per_trial is None:  # blocks small enough for a first stage of distinct ones
                    size = max(1, min(size, left // design.first_stage))
                last = min(last, design.pilot_trials + left // size)
                if trial >= last:
                    break
            paired = {name for name in symmetric
                      if pairs_pay([row["criticality"] for row in rows if row["layer"] == name])}
        mirrored = {name for name in active if trial % 2 and name in paired}
        offset, positions = design.block(trial, pilot, size, pool)
        for row in evaluate(active, trial, offset, positions, mirrored):
            row = {**row, "image_offset": offset, "mirror_of": trial - 1 if row["layer"] in mirrored else None,
                   "pilot": trial < design.pilot_trials}
            rows.append(row)
            if not row["pilot"]:
                by_layer[row["layer"]].append(row)
                units[row["layer"]] += row["mirror_of"] is None
        trial += 1
        for name in active:
            pair_open = name in paired and trial % 2 == 1
            if name not in needed and units[name] == design.first_stage and not pair_open:
                needed[name], cut = design.trials_needed(unit_means(by_layer[name]), trial, 2 if name in paired else 1)
                if cut:
                    capped.add(name)
    capped |= {name for name in layers if name not in needed or needed[name] > last}  # the cap came first
    for row in rows:
        row.update(target_ci=design.target_ci, first_stage=design.first_stage, ci_looks=1,
                   capped=row["layer"] in capped)
    return rows


def unit_means(rows: Sequence[dict]) -> list[float]:
    """A layer's unit means in trial order: a mirrored pair's mean, or a single draw's criticality."""
    units: dict[int, list[float]] = {}
    for row in rows:
        mirror_of = row.get("mirror_of")
        key = row["trial"] if mirror_of is None or (isinstance(mirror_of, float) and math.isnan(mirror_of)) \
            else int(mirror_of)
        units.setdefault(key, []).append(row["criticality"])
    return [sum(values) / len(values) for _, values in sorted(units.items())]


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
