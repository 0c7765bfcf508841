"""Module criticality (Chatterji, Neyshabur & Sedghi, ICLR 2020), measured with the engine.

For module i with initial parameters θ_i⁰ and trained θ_i^F, and the rest of the network trained,

    μ_i(ε) = min over α ∈ [0, 1], σ > 0 of  α² ‖θ_i^F − θ_i⁰‖²_F / σ_i²
             subject to  E_u[ L(network with module i set to θ_i^α + u) ] ≤ ε,
    θ_i^α = (1 − α) θ_i⁰ + α θ_i^F,   u ~ N(0, σ_i² I),

and the network's criticality is Σ_i μ_i(ε). A module that can be moved most of the way back to its
initialisation, and there stand noise, without the loss passing ε is not critical (small μ).

The default procedure is the paper's experimental one (its definition takes L and ε on the training set):

* **Data.** The images given; pass the training set (``fashion-mnist-train``, or a folder of training images) to
  follow the definition. The table's ``data_id`` says which set was used.
* **Threshold** (``epsilon_rule="relative"``): ε = (1 + ``tolerance``) × L(θ^F), tolerance 0.01, i.e. 1.01 times
  the trained network's own value on those images. ``epsilon_rule="additive"`` gives ε = L(θ^F) + tolerance
  (default 0.05, layercrit's earlier rule); ``epsilon`` sets ε directly.
* **Loss** (``criterion``): ``loss``, the cross-entropy (default: a relative bound on the 0–1 error of a network
  that fits its training set is 0, which no noise passes); ``error``, the top-1 error in [0, 1], the 0–1 loss of
  the definition; or a callable from :func:`layercrit.measure`'s rows to one value per row.
* **Noise scale** (``sigma_scale="relative"``): the grid's σ is relative to the module's trained weights. Module
  i gets noise of per-entry std σ_i = σ · ‖θ_i^F‖_F / √k_i (k_i its number of parameters), so the noise vector's
  norm is about σ · ‖θ_i^F‖_F whatever the module's size or scale: a layer of small weights no longer gets
  relatively huge noise. ``sigma_scale="absolute"`` takes σ_i = σ in parameter units, the same for every module.
  μ is always computed with the std actually used (α²D²/σ_i²), reported as ``noise_std``.
* **Grid.** α ∈ {0, 0.1, …, 1} (:data:`DEFAULT_ALPHAS`) and σ ∈ 13 values from 1e-4 to 1, three per decade
  (:data:`DEFAULT_SIGMAS`; a log grid is our choice: the paper's code base is not public, and Google's
  Meta-Dataset implementation of this measure, ``meta_dataset/analysis/transferability/criticality.py``, uses 11
  linear steps up to 1). The result is the grid minimum, an upper bound of the continuous μ.
* **Expectation.** ``draws`` noise samples per grid point (default 10, as that implementation's default), whose
  mean estimates E_u. Draw k uses the same standard-normal sample at every (α, σ) (common random numbers), so
  grid points are compared without fresh sampling noise between them.

How the search runs: each grid point is one :func:`layercrit.measure` call whose reset is ``noise`` over
``interpolate`` towards ``reinit`` (the checkpoint θ⁰). It is exact over the grid but skips points that cannot
win: α ascending, σ descending, a module leaves the σ scan at its first feasible σ (larger σ means smaller μ) and
is not evaluated where α²D²/σ_i² cannot beat its best. Noise is added to parameters only; buffers (BatchNorm
statistics) are interpolated. D = ‖θ^F − θ⁰‖_F over the module's parameters. A module no grid point lets
through has μ = ∞.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from ..data import EvalSet
from ..errors import LayercritError
from ..models import ResolvedModel
from ..spec import DEFAULT_LAYERS, Experiment
from .layers import Target
from .prepare import execute, prepare
from .resets import Interpolate, Noise, Reinit, Reset, State

DEFAULT_ALPHAS = tuple(i / 10 for i in range(11))
DEFAULT_SIGMAS = tuple(10 ** (-4 + k / 3) for k in range(13))
DEFAULT_DRAWS = 10
SIGMA_SCALES = ("relative", "absolute")
EPSILON_RULES = {"relative": 0.01, "additive": 0.05}  # rule -> default tolerance
Criterion = Callable[[pd.DataFrame], pd.Series]
CRITERIA: dict[str, Criterion] = {"error": lambda rows: (100.0 - rows.top1_acc) / 100.0, "loss": lambda rows: rows.loss}
COLUMNS = ("model_id", "layer", "mu", "alpha", "sigma", "noise_std", "distance", "weight_norm", "expected", "epsilon",
           "criterion", "sigma_scale", "draws", "evaluations", "data_id")


def module_criticality(
    model: str | nn.Module | ResolvedModel,
    data: str | EvalSet | tuple[torch.Tensor, torch.Tensor],
    *,
    init: str | Path,
    layers: str | Sequence[str | Target] = DEFAULT_LAYERS,
    groups: str | None = None,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    sigmas: Sequence[float] = DEFAULT_SIGMAS,
    sigma_scale: str = "relative",
    draws: int = DEFAULT_DRAWS,
    criterion: str | Criterion = "loss",
    epsilon: float | None = None,
    epsilon_rule: str = "relative",
    tolerance: float | None = None,
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
            module here). ``data`` should be training images (e.g. ``fashion-mnist-train``), as in the definition.
        init: checkpoint of the initial parameters θ⁰ (same architecture; read as ``reinit`` reads it).
        alphas, sigmas: the search grid (α in [0, 1]; σ > 0).
        sigma_scale: ``relative`` (default: module i's noise std is σ·‖θ_i^F‖_F/√k_i) or ``absolute`` (σ itself).
        draws: noise draws per grid point (the trials of each evaluation; default 10).
        criterion: ``loss`` (cross-entropy, default), ``error`` (top-1 error in [0, 1]) or a callable taking
            :func:`layercrit.measure`'s rows and returning one value per row.
        epsilon: the bound on the expected criterion; default from ``epsilon_rule`` and ``tolerance``.
        epsilon_rule: ``relative`` (default: ε = (1 + tolerance)·L(θ^F), tolerance 0.01) or ``additive``
            (ε = L(θ^F) + tolerance, tolerance 0.05), L(θ^F) the trained network's value on ``data``.
        tolerance: see ``epsilon_rule``; None for the rule's default.
        on_evaluations: called with every grid evaluation so far (one row per module and (α, σ)), to persist.
        engine_options: any other field of :class:`~layercrit.spec.Experiment` (``batch_size``, ``device``,
            ``engine``, ``resize``, ``mean``/``std``, ...).

    Returns:
        One row per module (``layer``) with ``mu``, the minimising ``alpha``, ``sigma`` (grid value) and
        ``noise_std`` (σ_i; all NaN and ``mu`` inf when no grid point meets ε), ``distance`` ‖θ^F − θ⁰‖_F,
        ``weight_norm`` ‖θ^F‖_F, ``expected`` (the criterion at the minimiser), ``epsilon``; then a row
        ``layer == "network"`` whose ``mu`` is the sum.

    Example:
        >>> table = module_criticality("final.pth", "fashion-mnist-train", init="init.pth",
        ...                            arch="layercrit:fmnist_resnet20")  # doctest: +SKIP
    """
    measure_rows = _criterion(criterion)
    if not alphas or not all(0.0 <= a <= 1.0 for a in alphas):
        raise LayercritError("module criticality needs alphas in [0, 1]")
    if not sigmas or not all(s > 0 for s in sigmas):
        raise LayercritError("module criticality needs sigmas > 0")
    if sigma_scale not in SIGMA_SCALES:
        raise LayercritError(f"unknown sigma scale {sigma_scale!r}: one of {', '.join(SIGMA_SCALES)}")
    if epsilon_rule not in EPSILON_RULES:
        raise LayercritError(f"unknown epsilon rule {epsilon_rule!r}: one of {', '.join(EPSILON_RULES)}")
    if draws < 1:
        raise LayercritError("module criticality needs at least one noise draw (--draws)")
    tolerance = EPSILON_RULES[epsilon_rule] if tolerance is None else tolerance
    initial = Reinit(checkpoint=init, trust_checkpoint=trust_checkpoint)
    spec = Experiment(layers=layers, groups=groups, reset=initial, trials=draws, seed=seed, images=images,
                      data_root=data_root, cache_dir=cache_dir, **engine_options)
    prepared = prepare(model, data, spec, model_id=model_id)
    resolved, evalset, targets = prepared.model, prepared.evalset, prepared.targets
    distance = {t.name: _distance(resolved.model, t, initial) for t in targets}
    norm = {t.name: _norm(resolved.model, t) for t in targets}
    scale = {t.name: _noise_scale(resolved.model, t, sigma_scale) for t in targets}
    model_id = model_id or resolved.spec
    evaluations: list[pd.DataFrame] = []

    def evaluate(alpha: float, sigma: float, chosen: list[Target]) -> dict[str, float]:
        stds = {module: sigma * scale[t.name] for t in chosen for module in t.modules}
        reset = _ModuleNoise(stds, base=Interpolate(alpha=1.0 - alpha, base=initial), seed=seed)
        rows = execute(prepared.select(layers=chosen, reset=reset))
        value = measure_rows(rows)
        expected = value[rows.layer != "original"].groupby(rows.layer, sort=False).mean()
        evaluations.append(pd.DataFrame({
            "layer": expected.index, "alpha": alpha, "sigma": sigma,
            "noise_std": [sigma * scale[name] for name in expected.index], "expected": expected.values,
            "original": float(value[rows.layer == "original"].iloc[0])}))
        if on_evaluations is not None:
            on_evaluations(pd.concat(evaluations, ignore_index=True))
        return expected.to_dict()

    def mu(alpha: float, sigma: float, name: str) -> float:
        return alpha**2 * distance[name] ** 2 / (sigma * scale[name]) ** 2

    best = {t.name: (math.inf, math.nan, math.nan, math.nan) for t in targets}  # mu, alpha, sigma, expected
    bound = epsilon
    for alpha in sorted(alphas):
        open_targets = list(targets)
        for sigma in sorted(sigmas, reverse=True):
            open_targets = [t for t in open_targets if mu(alpha, sigma, t.name) < best[t.name][0]]
            if not open_targets:
                break
            expected = evaluate(alpha, sigma, open_targets)
            if bound is None:
                bound = _bound(evaluations[0].original.iloc[0], epsilon_rule, tolerance)
            for t in open_targets:
                if expected[t.name] <= bound:
                    best[t.name] = (mu(alpha, sigma, t.name), alpha, sigma, expected[t.name])
            open_targets = [t for t in open_targets if expected[t.name] > bound]

    counts = pd.concat(evaluations).groupby("layer").size() if evaluations else pd.Series(dtype=int)
    rows = [{"layer": t.name, "mu": best[t.name][0], "alpha": best[t.name][1], "sigma": best[t.name][2],
             "noise_std": best[t.name][2] * scale[t.name], "distance": distance[t.name], "weight_norm": norm[t.name],
             "expected": best[t.name][3], "evaluations": int(counts.get(t.name, 0))}
            for t in targets]
    rows.append({"layer": "network", "mu": sum(r["mu"] for r in rows), "alpha": math.nan, "sigma": math.nan,
                 "noise_std": math.nan, "distance": math.sqrt(sum(r["distance"] ** 2 for r in rows)),
                 "weight_norm": math.sqrt(sum(r["weight_norm"] ** 2 for r in rows)), "expected": math.nan,
                 "evaluations": int(counts.sum())})
    name = criterion if isinstance(criterion, str) else getattr(criterion, "__name__", "custom")
    table = pd.DataFrame(rows).assign(model_id=model_id, epsilon=bound, criterion=name, sigma_scale=sigma_scale,
                                      draws=draws, data_id=evalset.data_id)
    return table[list(COLUMNS)]


class _ModuleNoise(Noise):
    """``noise`` over ``base`` with its own std per module (σ_i of the module docstring), in one engine call.

    The draw is Noise's: a standard-normal sample fixed by (seed, trial, module, tensor), times the std, so draw k
    is the same sample at every grid point."""

    def __init__(self, stds: Mapping[str, float], *, base: Reset, seed: int):
        super().__init__(sigma=0.0, base=base, seed=seed)
        self.stds = dict(stds)

    def new_state(self, layer: str, module: nn.Module, trial: int) -> State:
        self.sigma = self.stds[layer]
        return super().new_state(layer, module, trial)

    def label(self) -> str:
        return f"noise({self.base.label()},sigma=per-module)"


def _criterion(criterion: str | Criterion) -> Criterion:
    if callable(criterion):
        return criterion
    if criterion not in CRITERIA:
        raise LayercritError(f"unknown criterion {criterion!r}: one of {', '.join(CRITERIA)}")
    return CRITERIA[criterion]


def _bound(trained: float, rule: str, tolerance: float) -> float:
    """ε from the trained network's criterion value."""
    if rule == "additive":
        return trained + tolerance
    if trained < 0:
        raise LayercritError(f"a relative epsilon needs a criterion >= 0, the trained network's is {trained:g}: "
                             "use epsilon_rule='additive' (--epsilon-rule additive) or give epsilon")
    return (1.0 + tolerance) * trained


def _parameters(model: nn.Module, target: Target) -> list[torch.Tensor]:
    return [p.detach().double().cpu() for name in target.modules for p in model.get_submodule(name).parameters()]


def _norm(model: nn.Module, target: Target) -> float:
    """‖θ^F‖_F over the target's parameters."""
    return math.sqrt(sum(float(p.pow(2).sum()) for p in _parameters(model, target)))


def _noise_scale(model: nn.Module, target: Target, sigma_scale: str) -> float:
    """What σ is multiplied by for this target: 1 (absolute), or ‖θ^F‖_F/√k, the root mean square of its k
    trained parameters (relative)."""
    if sigma_scale == "absolute":
        return 1.0
    count = sum(p.numel() for p in _parameters(model, target))
    norm = _norm(model, target)
    if not norm:
        raise LayercritError(f"{target.name} has no non-zero trained parameters to scale the noise by: "
                             "use sigma_scale='absolute' (--sigma-scale absolute)")
    return norm / math.sqrt(count)


def _distance(model: nn.Module, target: Target, initial: Reinit) -> float:
    """‖θ^F − θ⁰‖_F over the parameters of the target's modules."""
    total = 0.0
    for name in target.modules:
        module = model.get_submodule(name)
        start = initial.new_state(name, module, 0)
        for key, param in module.named_parameters():
            total += float((param.detach().double().cpu() - start[key].double().cpu()).pow(2).sum())
    return math.sqrt(total)
