"""The metrics share their softmaxes (the clean side's once per batch) and give the values of the plain
torch.nn.functional expressions they stand for, bit for bit."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from layercrit.measurement.metrics import METRIC_COLUMNS, PredictionMetrics, Reference


def plain_row(logits: torch.Tensor, clean: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """The per-item metrics written as their torch.nn.functional expressions, each computed on its own."""
    logits, clean = logits.double(), clean.double()
    finite = torch.isfinite(logits).all(dim=1)
    safe = torch.where(finite[:, None], logits, torch.zeros_like(logits))
    probs, clean_probs = F.softmax(safe, dim=1), F.softmax(clean, dim=1)
    top = safe.topk(min(5, safe.shape[1]), dim=1).indices
    values = {
        "top1_acc": (top[:, :1] == labels[:, None]).any(1).double(),
        "top5_acc": (top == labels[:, None]).any(1).double(),
        "loss": F.cross_entropy(safe, labels, reduction="none"),
        "pred_cos_sim": F.cosine_similarity(probs, clean_probs, dim=1),
        "pred_l1_err": (probs - clean_probs).abs().sum(1),
        "pred_l2_err": (probs - clean_probs).norm(dim=1),
        "pred_ce_loss": F.cross_entropy(clean, safe, reduction="none"),
        "pred_kl": F.kl_div(F.log_softmax(safe, dim=1), F.log_softmax(clean, dim=1), reduction="none",
                            log_target=True).sum(1),
        "agreement": (safe.argmax(1) == clean.argmax(1)).double(),
    }
    worst = {"pred_l1_err": 2.0, "pred_l2_err": math.sqrt(2.0)}
    finite_only = {"loss", "pred_ce_loss", "pred_kl"}
    return {name: (value[finite].sum() if name in finite_only else torch.where(finite, value, worst.get(name, 0.0))
                   .sum()).item() for name, value in values.items()}


@pytest.mark.parametrize("classes", [10, 2048])
def test_shared_softmaxes_give_the_plain_expressions_bit_for_bit(classes):
    generator = torch.Generator().manual_seed(classes)
    clean = 3 * torch.randn(64, classes, generator=generator)
    logits = clean + torch.randn(64, classes, generator=generator)
    logits[3, 1] = float("inf")  # a non-finite row
    logits[5] = 0.0  # a zeroed head: every class ties
    labels = torch.randint(0, classes, (64,), generator=generator)
    metrics = PredictionMetrics()
    metrics.update(logits, Reference.of(clean), labels)
    expected = plain_row(logits, clean, labels)
    assert set(expected) <= set(METRIC_COLUMNS)
    assert {name: metrics.sums[name] for name in expected} == expected


def test_a_reference_shared_by_many_resets_gives_what_each_computes_alone():
    generator = torch.Generator().manual_seed(0)
    clean = torch.randn(32, 10, generator=generator)
    labels = torch.randint(0, 10, (32,), generator=generator)
    shared, alone = PredictionMetrics(), PredictionMetrics()
    reference = Reference.of(clean)
    for _ in range(3):
        logits = clean + torch.randn(32, 10, generator=generator)
        shared.update(logits, reference, labels)
        alone.update(logits, clean, labels)
    np.testing.assert_equal(shared.result(), alone.result())  # exact; NaN equals NaN


def test_float32_scoring_of_a_language_model_batch_gives_the_float64_values_to_their_last_reported_digits():
    """Per-position tasks score in float32 (tasks.CausalLanguageModel.score_dtype); images keep float64."""
    from layercrit.measurement.tasks import CausalLanguageModel, ImageClassification

    assert CausalLanguageModel.score_dtype == torch.float32 and ImageClassification.score_dtype == torch.float64
    generator = torch.Generator().manual_seed(1)
    clean = 4 * torch.randn(1008, 2048, generator=generator)  # a batch of 16 windows' positions × vocabulary
    labels = torch.randint(0, 2048, (1008,), generator=generator)
    for noise in (1e-3, 0.3, 3.0):  # a block that barely matters, one that matters, one that breaks the model
        logits = clean + noise * torch.randn(1008, 2048, generator=generator)
        rows = {}
        for dtype in (torch.float32, torch.float64):
            metrics = PredictionMetrics()
            metrics.update(logits, Reference.of(clean, dtype), labels)
            rows[dtype] = metrics.result()
        single, double = rows[torch.float32], rows[torch.float64]
        assert single["criticality"] == pytest.approx(double["criticality"], rel=1e-4, abs=1e-6)  # ~1e-7 measured
        assert single["pred_kl"] == pytest.approx(double["pred_kl"], rel=1e-3, abs=1e-6)
        for name in ("loss", "pred_l1_err", "pred_l2_err", "pred_ce_loss"):
            assert single[name] == pytest.approx(double[name], rel=1e-5), name
        for name in ("top1_acc", "top5_acc", "agreement"):
            assert single[name] == double[name], name
