"""Metrics of one evaluation: accuracy against the labels and similarity to the unmodified model's predictions.

Every metric declares itself once, in :data:`METRICS`: its column, what it means, and either its value per image
(the row holds the mean over images, accumulated over batches, so the result does not depend on batch size or
order) or how it is derived from the others. The engine's rows read this list; the row schema
(:data:`layercrit.columns.METRIC_COLUMNS`, which the store and the analysis read without importing the measuring
code) names the same columns in the same order, which a test checks: adding a metric is one entry here, its name
there (and a test).
Names follow the paper's published columns (``top1_acc``, ``pred_cos_sim``, ...).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .confidence import BettingCS


@dataclass(frozen=True)
class Reference:
    """The unmodified model's side of one batch, computed once and shared by every (layer, trial) scored against
    it: the fast engine scores each batch's clean predictions against many resets, and for a language model (a
    1,000-position × 2,048-token batch) these softmaxes cost more than the forward itself.

    ``dtype`` is what the per-item values are computed in: float64 (the default, every image task's) or the
    float32 of a per-position task (:attr:`layercrit.measurement.tasks.Task.score_dtype`), whose softmaxes over a
    vocabulary at every position cost 3× more in float64; the means over items accumulate in float64 either way.
    """

    logits: torch.Tensor
    probs: torch.Tensor  # softmax
    log_probs: torch.Tensor  # log_softmax
    kl_weight: torch.Tensor  # exp(log_probs): what F.kl_div(..., log_target=True) weighs by (softmax's last bits differ)
    top1: torch.Tensor

    @classmethod
    def of(cls, clean_logits: torch.Tensor, dtype: torch.dtype = torch.float64) -> Reference:
        logits = clean_logits.to(dtype)
        log_probs = F.log_softmax(logits, dim=1)
        return cls(logits=logits, probs=F.softmax(logits, dim=1), log_probs=log_probs, kl_weight=log_probs.exp(),
                   top1=logits.argmax(dim=1))


@dataclass(frozen=True)
class Batch:
    """One batch's predictions, as the per-image metrics see them (in the Reference's dtype; non-finite logits as 0).
    Each quantity is computed once and shared by the metrics that use it; the values are those of the plain
    ``torch.nn.functional`` expressions named beside them, bit for bit (tests/test_metrics.py)."""

    logits: torch.Tensor  # the reset model's, N × classes
    clean: Reference  # the unmodified model's
    labels: torch.Tensor
    finite: torch.Tensor  # N bools: the reset logits are all finite
    probs: torch.Tensor  # F.softmax(logits)
    log_probs: torch.Tensor  # F.log_softmax(logits)
    top: torch.Tensor  # N × min(5, classes): the reset model's best classes, best first
    moved: torch.Tensor  # probs - clean probs


def _kl(b: Batch) -> torch.Tensor:
    """KL(clean ‖ reset) per item: F.kl_div(log_probs, clean_log_probs, log_target=True, reduction="none").sum(1)."""
    return (b.clean.kl_weight * (b.clean.log_probs - b.log_probs)).sum(1)


@dataclass(frozen=True)
class Metric:
    """A column of the results rows.

    Either ``per_image`` (a value per image; the column is the mean × ``scale``; images with non-finite logits
    count as ``worst``, or are left out of the mean with ``finite_only``), or ``derive`` (computed from the
    accumulated :class:`PredictionMetrics` and the row's other columns).
    """

    column: str
    description: str
    per_image: Callable[[Batch], torch.Tensor] | None = None
    worst: float = 0.0
    finite_only: bool = False
    scale: float = 1.0
    derive: Callable[[PredictionMetrics, dict], float] | None = None


def _hit(b: Batch, k: int) -> torch.Tensor:
    return (b.top[:, :k] == b.labels[:, None]).any(dim=1)


def _criticality_sd(m: PredictionMetrics, row: dict) -> float:
    return math.sqrt(max(m.criticality_sq / max(m.n, 1) - row["criticality"] ** 2, 0.0))


def _half_width(which: int, scale: float) -> Callable[[PredictionMetrics, dict], float]:
    return lambda m, row: scale * m.sequences[which].half_width if m.sequences else float("nan")


METRICS: tuple[Metric, ...] = (
    Metric("top1_acc", "top-1 accuracy against the labels (percent)", lambda b: _hit(b, 1), scale=100.0),
    Metric("top5_acc", "top-5 accuracy (percent)", lambda b: _hit(b, 5), scale=100.0),
    Metric("loss", "cross-entropy against the labels",  # F.cross_entropy(logits, labels), from the shared log_softmax
           lambda b: F.nll_loss(b.log_probs, b.labels, reduction="none"), finite_only=True),
    Metric("recovered_acc", "top-1 as a share of the unmodified model's top-1",
           derive=lambda m, row: row["top1_acc"] / m.clean_top1 if m.clean_top1 else float("nan")),
    Metric("pred_cos_sim", "mean cosine similarity of the reset and the unmodified model's softmax",
           lambda b: F.cosine_similarity(b.probs, b.clean.probs, dim=1)),
    Metric("pred_l1_err", "mean L1 distance of the two softmax vectors", lambda b: b.moved.abs().sum(1),
           worst=2.0),
    Metric("pred_l2_err", "mean L2 distance of the two softmax vectors", lambda b: b.moved.norm(dim=1),
           worst=math.sqrt(2.0)),
    # The paper's pred_ce_loss: F.cross_entropy(original_logits, reset_logits), i.e. the reset *logits* (not
    # probabilities) used as soft targets. Kept as is for compatibility; pred_kl is the sound measure.
    Metric("pred_ce_loss", "the paper's F.cross_entropy(original_logits, reset_logits)",  # with soft targets:
           lambda b: -(b.clean.log_probs * b.logits).sum(1), finite_only=True),  # -(log_softmax(input) * target).sum
    Metric("pred_kl", "mean KL(original softmax ‖ reset softmax)", _kl, finite_only=True),
    Metric("agreement", "share of images whose top-1 class is unchanged",
           lambda b: b.logits.argmax(dim=1) == b.clean.top1),  # argmax, not topk: ties (a zeroed head) as before
    Metric("criticality", "1 − pred_cos_sim: how far the predictions moved", derive=lambda m, row: 1.0 - row["pred_cos_sim"]),
    Metric("criticality_sd", "standard deviation of the per-image criticality over the row's images",
           derive=_criticality_sd),
    Metric("nonfinite", "images whose reset logits were not finite", derive=lambda m, row: m.n - m.n_finite),
    Metric("n_images", "images evaluated", derive=lambda m, row: m.n),
    Metric("criticality_ci", "half-width of the per-image criticality's confidence sequence (--image-target-ci)",
           derive=_half_width(0, 1.0)),
    Metric("top1_ci", "half-width of top-1's confidence sequence, in points (--image-target-ci)",
           derive=_half_width(1, 100.0)),
)
"""Every metric column, in the rows' order."""

METRIC_COLUMNS = tuple(metric.column for metric in METRICS)


class PredictionMetrics:
    """Running sums of the per-image metrics of :data:`METRICS` for one (layer, trial); :meth:`result` gives the
    row's values.

    With ``alpha`` set, also tracks confidence sequences (level 1 − alpha) for the per-image criticality and
    top-1, whose half-widths are reported as ``criticality_ci`` (fraction) and ``top1_ci`` (points).

    Images whose logits are not finite count as wrong, are flagged in ``nonfinite``, and get each metric's
    ``worst`` value (cosine 0, L1 2, L2 √2, agreement 0); loss, ``pred_ce_loss`` and ``pred_kl`` average over the
    finite images only.
    """

    def __init__(self, alpha: float | None = None) -> None:
        self.n = 0
        self.n_finite = 0
        self.clean_top1: float | None = None
        self.sums = {metric.column: 0.0 for metric in METRICS if metric.per_image is not None}
        self.criticality_sq = 0.0  # of the per-image criticality, for criticality_sd (the sequential design's σ_w)
        # With --image-target-ci: confidence sequences for per-image criticality and top-1 (see confidence.py).
        self.sequences = (BettingCS(alpha), BettingCS(alpha)) if alpha else None

    def settled(self, target: float) -> bool:
        """Both confidence sequences are narrower than ``target`` (a half-width, as a fraction)."""
        return self.sequences is not None and all(cs.half_width <= target for cs in self.sequences)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, clean: torch.Tensor | Reference, labels: torch.Tensor) -> None:
        """Add a batch: the reset model's logits, the unmodified model's (or their :class:`Reference`, to share it
        between the (layer, trial)s scored against one batch) and the labels."""
        clean = clean if isinstance(clean, Reference) else Reference.of(clean)
        logits = logits.to(clean.logits.dtype)
        finite = torch.isfinite(logits).all(dim=1)
        safe = logits if bool(finite.all()) else torch.where(finite[:, None], logits, torch.zeros_like(logits))
        probs = F.softmax(safe, dim=1)
        batch = Batch(logits=safe, clean=clean, labels=labels, finite=finite, probs=probs,
                      log_probs=F.log_softmax(safe, dim=1), top=safe.topk(min(5, logits.shape[1]), dim=1).indices,
                      moved=probs - clean.probs)
        values = {}
        for metric in METRICS:
            if metric.per_image is None:
                continue
            value = metric.per_image(batch).double()
            values[metric.column] = value
            kept = value[finite] if metric.finite_only else torch.where(finite, value, metric.worst)
            self.sums[metric.column] += kept.sum().item()
        criticality = torch.where(finite, 1 - values["pred_cos_sim"], 1.0).clamp(0, 1)
        self.criticality_sq += criticality.square().sum().item()
        self.n += len(labels)
        self.n_finite += int(finite.sum().item())
        if self.sequences is not None:
            self.sequences[0].update(criticality.cpu().numpy())
            self.sequences[1].update(torch.where(finite, values["top1_acc"], 0.0).cpu().numpy())

    def result(self, clean_top1: float | None = None) -> dict[str, float]:
        """The row's metric columns, in :data:`METRICS` order; ``clean_top1``: the unmodified model's top-1."""
        self.clean_top1 = clean_top1
        row: dict[str, float] = {}
        for metric in METRICS:
            if metric.per_image is not None:
                count = self.n_finite if metric.finite_only else self.n
                row[metric.column] = metric.scale * self.sums[metric.column] / count if count else (
                    float("nan") if metric.finite_only else 0.0)
        for metric in METRICS:
            if metric.derive is not None:
                row[metric.column] = metric.derive(self, row)
        return {column: row[column] for column in METRIC_COLUMNS}
