"""Metrics of one evaluation: accuracy against the labels and similarity to the unmodified model's predictions.

Accumulated per image over batches, so the result does not depend on batch size or order. Names follow the
paper's published columns (``top1_acc``, ``pred_cos_sim``, ...).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .confidence import BettingCS


class PredictionMetrics:
    """Running sums of per-image metrics for one (layer, trial); :meth:`result` gives the row's values.

    With ``alpha`` set, also tracks confidence sequences (level 1 − alpha) for the per-image criticality and
    top-1, whose half-widths are reported as ``criticality_ci`` (fraction) and ``top1_ci`` (points).

    Images whose logits are not finite count as wrong, are flagged in ``nonfinite``, and get the most
    dissimilar value each similarity can take (cosine 0, L1 2, L2 √2, agreement 0); loss, ``pred_ce_loss``
    and ``pred_kl`` average over the finite images only.
    """

    def __init__(self, alpha: float | None = None) -> None:
        self.n = 0
        self.n_finite = 0
        self.sums = dict.fromkeys(("top1", "top5", "loss", "cos", "crit_sq", "l1", "l2", "ce", "kl", "agree"), 0.0)
        # With --target-ci: confidence sequences for per-image criticality and top-1 (see confidence.py).
        self.sequences = (BettingCS(alpha), BettingCS(alpha)) if alpha else None

    def settled(self, target: float) -> bool:
        """Both confidence sequences are narrower than ``target`` (a half-width, as a fraction)."""
        return self.sequences is not None and all(cs.half_width <= target for cs in self.sequences)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, clean_logits: torch.Tensor, labels: torch.Tensor) -> None:
        logits, clean_logits = logits.double(), clean_logits.double()
        finite = torch.isfinite(logits).all(dim=1)
        safe = torch.where(finite[:, None], logits, torch.zeros_like(logits))
        k = min(5, logits.shape[1])
        top = safe.topk(k, dim=1).indices
        hit = (top == labels[:, None]) & finite[:, None]
        probs, clean_probs = F.softmax(safe, dim=1), F.softmax(clean_logits, dim=1)
        diff = probs - clean_probs
        cos = F.cosine_similarity(probs, clean_probs, dim=1)
        l1, l2 = diff.abs().sum(dim=1), diff.norm(dim=1)
        agree = safe.argmax(dim=1) == clean_logits.argmax(dim=1)
        worst = {"cos": 0.0, "l1": 2.0, "l2": math.sqrt(2.0)}
        s = self.sums
        s["top1"] += hit[:, 0].sum().item()
        s["top5"] += hit.any(dim=1).sum().item()
        s["cos"] += torch.where(finite, cos, worst["cos"]).sum().item()
        per_image_criticality = torch.where(finite, 1 - cos, 1.0).clamp(0, 1)
        s["crit_sq"] += per_image_criticality.square().sum().item()
        s["l1"] += torch.where(finite, l1, worst["l1"]).sum().item()
        s["l2"] += torch.where(finite, l2, worst["l2"]).sum().item()
        s["agree"] += (agree & finite).sum().item()
        if finite.any():
            f_logits, f_clean = safe[finite], clean_logits[finite]
            s["loss"] += F.cross_entropy(f_logits, labels[finite], reduction="sum").item()
            # The paper's pred_ce_loss: F.cross_entropy(original_logits, reset_logits), i.e. the reset *logits*
            # (not probabilities) used as soft targets. Kept as is for compatibility; pred_kl is the sound measure.
            s["ce"] += F.cross_entropy(f_clean, f_logits, reduction="sum").item()
            s["kl"] += F.kl_div(F.log_softmax(f_logits, dim=1), F.log_softmax(f_clean, dim=1),
                                reduction="sum", log_target=True).item()
        self.n += len(labels)
        self.n_finite += int(finite.sum().item())
        if self.sequences is not None:
            self.sequences[0].update(per_image_criticality.cpu().numpy())
            self.sequences[1].update(hit[:, 0].double().cpu().numpy())

    def result(self, clean_top1: float | None = None) -> dict[str, float]:
        n, nf, s = max(self.n, 1), max(self.n_finite, 1), self.sums
        top1 = 100.0 * s["top1"] / n
        cos = s["cos"] / n
        return {
            "top1_acc": top1,
            "top5_acc": 100.0 * s["top5"] / n,
            "loss": s["loss"] / nf if self.n_finite else float("nan"),
            "recovered_acc": top1 / clean_top1 if clean_top1 else float("nan"),
            "pred_cos_sim": cos,
            "pred_l1_err": s["l1"] / n,
            "pred_l2_err": s["l2"] / n,
            "pred_ce_loss": s["ce"] / nf if self.n_finite else float("nan"),
            "pred_kl": s["kl"] / nf if self.n_finite else float("nan"),
            "agreement": s["agree"] / n,
            "criticality": 1.0 - cos,
            # spread of the per-image criticality over this evaluation's images (the sequential design's σ_w)
            "criticality_sd": math.sqrt(max(s["crit_sq"] / n - (1.0 - cos) ** 2, 0.0)),
            "nonfinite": self.n - self.n_finite,
            "n_images": self.n,
            "criticality_ci": self.sequences[0].half_width if self.sequences else float("nan"),
            "top1_ci": 100.0 * self.sequences[1].half_width if self.sequences else float("nan"),
        }
