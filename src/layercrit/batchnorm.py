"""BatchNorm running statistics recomputed on data: the one recalibration, used by the resets (``--bn recalibrate``)
and by training (the zoo's frozen random backbone, a member's statistics after training)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .data.evalset import to_model_input


def recalibrate_batchnorm(model: nn.Module, norms: Iterable[_BatchNorm], batches: Iterable,
                          run: Callable[[object], object] | None = None) -> None:
    """Set the running statistics of ``norms`` to the exact statistics of their inputs while ``model`` runs on
    ``batches``: a cumulative average, not a momentum. ``run(batch)`` calls the model on one batch (default: the
    batch is images, uint8 or float in [0, 1], on the model's device). Each BatchNorm's momentum and eval mode are
    restored; nothing else of the model changes mode."""
    norms = list(norms)
    momenta = [bn.momentum for bn in norms]
    if run is None:
        device = next(model.parameters()).device
        run = lambda batch: model(to_model_input(batch.to(device)))  # noqa: E731
    try:
        for bn in norms:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over the batches
            bn.train()
        with torch.no_grad():
            for batch in batches:
                run(batch)
    finally:
        for bn, momentum in zip(norms, momenta, strict=True):
            bn.momentum = momentum
            bn.eval()
