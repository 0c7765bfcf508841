"""Finer than a row: each batch's top-1 (``--log-batches``, the paper's ``batch_acc`` column) and each class's
accuracy and agreement (``--per-class``, ``OUT/per_class.csv``), per (layer, trial).

:class:`Breakdown` is an engine ``on_logits`` hook: it sees every evaluated batch's logits with the images'
positions, and takes their labels from the evaluation set. The unmodified model's batches come first (the engine
evaluates it before any reset on the same batch), so each reset batch is compared with its clean predictions.
"""

from __future__ import annotations

import json

import pandas as pd
import torch


class _Unit:
    def __init__(self, classes: int) -> None:
        self.start = -1  # first position of the last batch: a batch starting at or before it is a redo
        self.batches: list[tuple[int, int]] = []  # (correct, images) per batch
        self.hits = torch.zeros(classes, dtype=torch.long)
        self.agree = torch.zeros(classes, dtype=torch.long)
        self.n = torch.zeros(classes, dtype=torch.long)


class Breakdown:
    """Per (layer, trial): each batch's top-1 and each class's hits, agreements and images.

    Args:
        labels: the evaluation set's labels, indexed by the positions the engine hands over.
    """

    def __init__(self, labels: torch.Tensor) -> None:
        self.labels = labels.long()
        self.clean: torch.Tensor | None = None  # the unmodified model's top-1 class per position
        self.units: dict[tuple[str, int], _Unit] = {}

    def __call__(self, layer: str | None, trial: int, positions: slice | torch.Tensor, logits: torch.Tensor) -> None:
        index = torch.arange(positions.start, positions.stop) if isinstance(positions, slice) else positions.long()
        labels = self.labels[index]
        predicted = logits.argmax(dim=1).cpu()
        if layer is None:
            if self.clean is None:
                self.clean = torch.full((len(self.labels),), -1, dtype=torch.long)
            self.clean[index] = predicted
        key = ("original" if layer is None else layer, trial)
        unit = self.units.get(key)
        first = int(index[0]) if len(index) else 0
        if unit is None or first <= unit.start:  # new, or redone from the start (the engine halved the batch)
            unit = self.units[key] = _Unit(logits.shape[1])
        unit.start = first
        hit = predicted == labels
        agree = predicted == self.clean[index]
        unit.batches.append((int(hit.sum()), len(index)))
        unit.hits += torch.bincount(labels[hit], minlength=len(unit.n))
        unit.agree += torch.bincount(labels[agree], minlength=len(unit.n))
        unit.n += torch.bincount(labels, minlength=len(unit.n))

    def batch_acc(self, layer: str, trial: int) -> str | None:
        """Each batch's top-1 in percent, as a JSON list (the paper's ``batch_acc``); None when not evaluated."""
        unit = self.units.get((layer, trial))
        return None if unit is None else json.dumps([100.0 * c / n for c, n in unit.batches])

    def per_class(self, rows: pd.DataFrame) -> pd.DataFrame:
        """Long table, per row of ``rows`` (original included) and class with images: ``accuracy`` (%),
        ``accuracy_drop`` (the unmodified model's accuracy on the class minus this), ``agreement`` (share of the
        class's images whose top-1 is unchanged) and ``n``."""
        original = self.units[("original", 0)]
        clean_accuracy = 100.0 * original.hits / original.n.clamp(min=1)
        out = []
        ids = [c for c in ("model_id", "reset", "alpha") if c in rows]
        for row in rows.itertuples(index=False):
            computed = row.trial if row.layer == "original" else row.computed_in_trial
            unit = self.units.get((row.layer, int(computed)))
            if unit is None:
                continue
            accuracy = 100.0 * unit.hits / unit.n.clamp(min=1)
            for c in torch.nonzero(unit.n).flatten().tolist():
                out.append({**{k: getattr(row, k) for k in ids}, "layer": row.layer, "trial": row.trial, "class": c,
                            "accuracy": float(accuracy[c]), "accuracy_drop": float(clean_accuracy[c] - accuracy[c]),
                            "agreement": float(unit.agree[c] / unit.n[c]), "n": int(unit.n[c])})
        return pd.DataFrame(out, columns=[*ids, "layer", "trial", "class", "accuracy", "accuracy_drop", "agreement",
                                          "n"])
