"""Module criticality (Chatterji, Neyshabur & Sedghi, ICLR 2020), measured with the engine.

For module i with initial parameters θ_i⁰ and trained θ_i^F, and the rest of the network trained,

    μ_i(ε) = min over α ∈ [0, 1], σ > 0 of  α² ‖θ_i^F − θ_i⁰‖²_F / σ²
             subject to  E_u[ L(network with module i set to θ_i^α + u) ] ≤ ε,
    θ_i^α = (1 − α) θ_i⁰ + α θ_i^F,   u ~ N(0, σ² I),

and the network's criticality is Σ_i μ_i(ε). A module that can be moved most of the way back to its
initialisation, and there stand noise, without the loss passing ε is not critical (small μ).

How we compute it:

* The minimum is taken over the grid ``alphas`` × ``sigmas`` (defaults :data:`DEFAULT_ALPHAS`: 0, 0.1, ..., 1 and
  :data:`DEFAULT_SIGMAS`: 13 values from 1e-4 to 1, three per decade, absolute std of the noise). The search is
  exact over the grid but skips points that cannot win: α ascending, σ descending, a module leaves the σ scan at
  its first feasible σ (larger σ means smaller μ) and is not evaluated where α²D²/σ² cannot beat its best.
* A point is one :func:`layercrit.measure` call: the reset is ``noise`` with absolute ``sigma`` over
  ``interpolate`` towards ``reinit`` (the checkpoint θ⁰), and its trials are the ``draws`` noise draws whose
  mean estimates the expectation. Draw k uses the same standard-normal sample at every (α, σ) (common random
  numbers), so the comparison between grid points is not blurred by sampling noise.
* L is the top-1 error on the evaluation images (``criterion="error"``, the 0–1 loss of the paper's
  experiments, which use the training set: pass training images to match) or the cross-entropy
  (``criterion="loss"``). ε defaults to the trained network's value plus ``tolerance``.
* Noise is added to parameters only; buffers (BatchNorm statistics) are interpolated. D = ‖θ^F − θ⁰‖_F over the
  module's parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from .data import EvalSet, load_data
from .errors import LayercritError
from .layers import DEFAULT_LAYERS, Target, select_targets
from .measure import as_resolved, check_sizes, measure
from .models import ResolvedModel
from .resets import Interpolate, Noise, Reinit

DEFAULT_ALPHAS = tuple(i / 10 for i in range(11))
DEFAULT_SIGMAS = tuple(10 ** (-4 + k / 3) for k in range(13))
CRITERIA = {"error": lambda rows: (100.0 - rows.top1_acc) / 100.0, "loss": lambda rows: rows.loss}
COLUMNS = ("model_id", "layer", "mu", "alpha", "sigma", "distance", "expected", "epsilon", "criterion", "draws",
           "evaluations", "data_id")


def module_criticality(
    model: str | nn.Module | ResolvedModel,
    data: str | EvalSet | tuple[torch.Tensor, torch.Tensor],
    *,
    init: str | Path,
    layers: str | Sequence[str | Target] = DEFAULT_LAYERS,
    groups: str | None = None,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    sigmas: Sequence[float] = DEFAULT_SIGMAS,
    draws: int = 5,
    criterion: str = "error",
    epsilon: float | None = None,
    tolerance: float = 0.05,
    seed: int = 0,
    images: int | None = 10_000,
    model_id: str | None = None,
    trust_checkpoint: bool = False,
    data_root: str | None = None,
    cache_dir: str | Path | None = None,
    on_evaluations: Callable[[pd.DataFrame], None] | None = None,
    **engine_options,
) -> pd.DataFrame:
    """μ_i(ε) of every selected module (see the module docstring), and their sum.

    Args:
        model, data, layers, groups, seed, images, model_id: as in :func:`layercrit.measure` (a group is one
            module here).
        init: checkpoint of the initial parameters θ⁰ (same architecture; read as ``reinit`` reads it).
        alphas, sigmas: the search grid (α in [0, 1]; σ > 0, the noise std in parameter units).
        draws: noise draws per grid point (the trials of each evaluation).
        criterion: ``error`` (top-1 error in [0, 1]) or ``loss`` (cross-entropy).
        epsilon: the bound on the expected criterion; default: the trained network's value + ``tolerance``.
        on_evaluations: called with every grid evaluation so far (one row per module and (α, σ)), to persist.
        engine_options: passed to :func:`layercrit.measure` (``batch_size``, ``device``, ``engine_name``, ...).

    Returns:
        One row per module (``layer``) with ``mu``, the minimising ``alpha`` and ``sigma`` (NaN and ``mu`` inf
        when no grid point meets ε), ``distance`` ‖θ^F − θ⁰‖_F, ``expected`` (the criterion at the minimiser),
        ``epsilon``; then a row ``layer == "network"`` whose ``mu`` is the sum.
    """
    if criterion not in CRITERIA:
        raise LayercritError(f"unknown criterion {criterion!r}: one of {', '.join(CRITERIA)}")
    if not alphas or not all(0.0 <= a <= 1.0 for a in alphas):
        raise LayercritError("module criticality needs alphas in [0, 1]")
    if not sigmas or not all(s > 0 for s in sigmas):
        raise LayercritError("module criticality needs sigmas > 0")
    if draws < 1:
        raise LayercritError("module criticality needs at least one noise draw (--draws)")
    check_sizes(images=images)
    resolved = as_resolved(model, seed=seed, model_id=model_id)
    evalset = load_data(EvalSet.from_tensors(*data) if isinstance(data, tuple) else data,
                        preprocessing=resolved.preprocessing, images=images, seed=seed, root=data_root,
                        cache_dir=cache_dir)
    targets = select_targets(resolved.model, layers, groups=groups)
    initial = Reinit(checkpoint=init, trust_checkpoint=trust_checkpoint)
    distance = {t.name: _distance(resolved.model, t, initial) for t in targets}
    model_id = model_id or resolved.spec
    evaluations: list[pd.DataFrame] = []

    def evaluate(alpha: float, sigma: float, chosen: list[Target]) -> dict[str, float]:
        reset = Noise(sigma=sigma, base=Interpolate(alpha=1.0 - alpha, base=initial), seed=seed)
        rows = measure(resolved, evalset, layers=chosen, reset=reset, trials=draws, seed=seed, model_id=model_id,
                       **engine_options)
        value = CRITERIA[criterion](rows)
        expected = value[rows.layer != "original"].groupby(rows.layer, sort=False).mean()
        evaluations.append(pd.DataFrame({
            "layer": expected.index, "alpha": alpha, "sigma": sigma, "expected": expected.values,
            "original": float(value[rows.layer == "original"].iloc[0])}))
        if on_evaluations is not None:
            on_evaluations(pd.concat(evaluations, ignore_index=True))
        return expected.to_dict()

    best = {t.name: (math.inf, math.nan, math.nan, math.nan) for t in targets}  # mu, alpha, sigma, expected
    bound = epsilon
    for alpha in sorted(alphas):
        open_targets = list(targets)
        for sigma in sorted(sigmas, reverse=True):
            open_targets = [t for t in open_targets if alpha**2 * distance[t.name] ** 2 / sigma**2 < best[t.name][0]]
            if not open_targets:
                break
            expected = evaluate(alpha, sigma, open_targets)
            if bound is None:
                bound = evaluations[0].original.iloc[0] + tolerance
            feasible = {name for name, value in expected.items() if value <= bound}
            for t in open_targets:
                if t.name in feasible:
                    best[t.name] = (alpha**2 * distance[t.name] ** 2 / sigma**2, alpha, sigma, expected[t.name])
            open_targets = [t for t in open_targets if t.name not in feasible]

    counts = pd.concat(evaluations).groupby("layer").size() if evaluations else pd.Series(dtype=int)
    rows = [{"layer": t.name, "mu": best[t.name][0], "alpha": best[t.name][1], "sigma": best[t.name][2],
             "distance": distance[t.name], "expected": best[t.name][3], "evaluations": int(counts.get(t.name, 0))}
            for t in targets]
    rows.append({"layer": "network", "mu": sum(r["mu"] for r in rows), "alpha": math.nan, "sigma": math.nan,
                 "distance": math.sqrt(sum(r["distance"] ** 2 for r in rows)), "expected": math.nan,
                 "evaluations": int(counts.sum())})
    table = pd.DataFrame(rows).assign(model_id=model_id, epsilon=bound, criterion=criterion, draws=draws,
                                      data_id=evalset.data_id)
    return table[list(COLUMNS)]


def _distance(model: nn.Module, target: Target, initial: Reinit) -> float:
    """‖θ^F − θ⁰‖_F over the parameters of the target's modules."""
    total = 0.0
    for name in target.modules:
        module = model.get_submodule(name)
        start = initial.new_state(name, module, 0)
        for key, param in module.named_parameters():
            total += float((param.detach().double().cpu() - start[key].double().cpu()).pow(2).sum())
    return math.sqrt(total)
