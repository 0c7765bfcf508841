"""Cheap proxies of a transformer block's importance, from one clean pass, to set beside what removing it does.

* ``block_influence`` (ShortGPT, Men et al. 2024): 1 − cos(hidden state into the block, hidden state out of it).
* ``angular_distance`` (Gromov et al. 2024): arccos(cos(input of block ℓ, input of block ℓ+n)) / π for a window
  of n blocks starting at ℓ (n = 1 for a single block: its input and output).

Both are means over every counted token (the attention mask's real tokens) of every evaluation window; for a
window target (``groups='window:N'``) they compare the input of its first block with the output of its last.
:func:`proxy_agreement` then says how well each proxy ranks the blocks as a measured quantity does: Spearman's ρ
across blocks with a 95% interval (Fisher's z with the Bonett–Wright standard error), given from
:data:`MIN_BLOCKS_FOR_INTERVAL` blocks on (its coverage, simulated, is in docs/language-models.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from ..columns import PROXY_COLUMNS
from ..data.evalset import EvalSet
from .layers import Target
from .tasks import Task, take


def block_spans(model: nn.Module, targets: Sequence[Target]) -> dict[str, tuple[int, int]]:
    """The targets that are runs of consecutive transformer blocks: target name → (first, last) block index."""
    from ..errors import LayercritError
    from ..models.blocks import find_blocks

    try:
        names = find_blocks(model).names
    except LayercritError:
        return {}
    index = {name: i for i, name in enumerate(names)}
    spans = {}
    for target in targets:
        positions = [index.get(m) for m in target.modules]
        if positions and None not in positions and positions == list(range(positions[0], positions[-1] + 1)):
            spans[target.name] = (positions[0], positions[-1])
    return spans


@torch.no_grad()
def block_proxies(model: nn.Module, evalset: EvalSet, spans: Mapping[str, tuple[int, int]], task: Task, *,
                  batch_size: int, device: str) -> dict[str, dict[str, float]]:
    """``{target: {"block_influence": ..., "angular_distance": ...}}`` for the block ``spans`` (one clean pass)."""
    from ..models.blocks import find_blocks

    if not spans:
        return {}
    names = find_blocks(model).names
    inputs: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}
    handles = []
    for i, name in enumerate(names):
        block = model.get_submodule(name)

        def pre(module, args, kwargs, i=i):
            inputs[i] = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values()), None))

        def post(module, args, output, i=i):
            outputs[i] = output[0] if isinstance(output, tuple) else output

        handles += [block.register_forward_pre_hook(pre, with_kwargs=True), block.register_forward_hook(post)]
    sums = {name: [0.0, 0.0, 0] for name in spans}
    model.to(device)
    try:
        for start in range(0, len(evalset), batch_size):
            x = task.inputs(take(evalset.images, slice(start, start + batch_size)), device)
            task.call(model, x)
            mask = x.get("attention_mask") if isinstance(x, Mapping) else None
            for name, (first, last) in spans.items():
                cos = F.cosine_similarity(inputs[first].double(), outputs[last].double(), dim=-1).clamp(-1, 1)
                counted = cos[mask.bool()] if mask is not None and mask.shape == cos.shape else cos.flatten()
                sums[name][0] += counted.sum().item()
                sums[name][1] += (torch.arccos(counted) / math.pi).sum().item()
                sums[name][2] += counted.numel()
    finally:
        for handle in handles:
            handle.remove()
    return {name: {"block_influence": 1 - cos / n, "angular_distance": angle / n}
            for name, (cos, angle, n) in sums.items() if n}


def proxy_agreement(layers: pd.DataFrame, quantities: Sequence[str] = ("criticality",)) -> pd.DataFrame:
    """Spearman's ρ across the blocks of ``layers`` (a layer table with proxy columns) between each proxy and each
    measured quantity, with a 95% interval: one row per (grouping, proxy, quantity), with ``n`` blocks."""
    from scipy import stats

    by = [c for c in ("model_id", "reset", "alpha") if c in layers]
    rows = []
    groups = layers.groupby(by, sort=False, dropna=False) if by else [((), layers)]
    for key, group in groups:
        key = key if isinstance(key, tuple) else (key,)
        for proxy in PROXY_COLUMNS:
            for quantity in quantities:
                pair = group[[proxy, quantity]].dropna() if proxy in group and quantity in group else pd.DataFrame()
                n = len(pair)
                rho = float(stats.spearmanr(pair[proxy], pair[quantity]).statistic) if n >= 3 else math.nan
                low, high = _fisher_interval(rho, n)
                rows.append({**dict(zip(by, key, strict=True)), "proxy": proxy, "quantity": quantity, "rho": rho,
                             "rho_low": low, "rho_high": high, "n": n})
    return pd.DataFrame(rows)


MIN_BLOCKS_FOR_INTERVAL = 10
"""Fewest blocks for which :func:`proxy_agreement` gives an interval of ρ: with fewer, the Fisher interval's coverage
left [93%, 97.5%] in simulation (6 blocks: 98% at Pearson ρ = 0.5, 76% at 0.95), so none is given (NaN)."""


def _fisher_interval(rho: float, n: int, z_crit: float = 1.959964) -> tuple[float, float]:
    """95% interval of a Spearman ρ over n pairs: Fisher's z with Bonett & Wright's (2000) standard error; NaN for
    fewer than :data:`MIN_BLOCKS_FOR_INTERVAL` pairs. ρ = ±1 (every rank agrees) has an infinite z: the interval
    is taken around the nearest attainable ρ, 1 − 12/(n(n² − 1)), and reaches ±1 on that side."""
    if n < MIN_BLOCKS_FOR_INTERVAL or not math.isfinite(rho):
        return math.nan, math.nan
    edge = 1 - 12 / (n * (n * n - 1))
    centre = max(-edge, min(edge, rho))
    se = math.sqrt((1 + centre ** 2 / 2) / (n - 3))
    z = math.atanh(centre)
    low, high = math.tanh(z - z_crit * se), math.tanh(z + z_crit * se)
    beyond = (1 + edge) / 2
    return (-1.0 if rho < -beyond else low), (1.0 if rho > beyond else high)
