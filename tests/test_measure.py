"""The measurement: what one row means, and that measuring leaves the model as it was."""

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import layercrit
from layercrit.errors import LayercritError
from layercrit.measurement.resets import Rerandomize, snapshot, trial_seed

from .conftest import TinyCNN


def _logits(resolved, images):
    with torch.no_grad():
        return resolved.model(images.float() / 255)


def test_zero_reset_of_classifier_gives_uniform_predictions(tiny_model, tiny_data):
    images, labels = tiny_data
    df = layercrit.measure(tiny_model, tiny_data, layers="fc", reset="zero", trials=1)
    row = df[df.layer == "model.fc"].iloc[0]
    clean = F.softmax(_logits(tiny_model, images), dim=1)
    uniform = torch.full_like(clean, 0.1)
    # All logits zero: every image gets the same (uniform) prediction, so top-1 is one class for every image.
    shares = {round(100.0 * (labels == c).float().mean().item(), 6) for c in range(10)}
    assert round(row.top1_acc, 6) in shares
    assert row.pred_cos_sim == pytest.approx(F.cosine_similarity(clean, uniform, dim=1).mean().item(), abs=1e-6)
    assert row.loss == pytest.approx(np.log(10), abs=1e-6)


def test_layer_whose_output_is_unused_has_zero_criticality(tiny_model, tiny_data):
    df = layercrit.measure(tiny_model, tiny_data, layers="unused", trials=2)
    rows = df[df.layer == "model.unused"]
    assert len(rows) == 2
    assert (rows.criticality == 0).all() and (rows.agreement == 1).all()


def _paper_pred_similarity(a, b):
    """Transcribed from the paper's code (main.py, pred_similarity): a = original logits, b = reset logits."""
    a_probs, b_probs = F.softmax(a, dim=1), F.softmax(b, dim=1)
    return (
        torch.nn.CosineSimilarity(dim=1)(a_probs, b_probs).mean().item(),
        torch.norm(a_probs - b_probs, p=1, dim=1).mean().item(),
        torch.norm(a_probs - b_probs, p=2, dim=1).mean().item(),
        torch.nn.CrossEntropyLoss()(a.float(), b.float()).item(),
    )


@pytest.mark.parametrize("layer", ["model.conv1", "model.conv2", "model.fc"])
def test_metrics_equal_a_hand_computation(tiny_model, tiny_data, layer):
    images, labels = tiny_data
    df = layercrit.measure(tiny_model, tiny_data, layers=layer, reset="rerandomize", trials=2, seed=3)
    clean = _logits(tiny_model, images)
    module = tiny_model.model.get_submodule(layer)
    trained = snapshot(module)
    for trial in range(2):
        with torch.random.fork_rng():
            torch.manual_seed(trial_seed(3, trial))
            fresh = TinyCNN()
        module.load_state_dict(fresh.get_submodule(layer.removeprefix("model.")).state_dict())
        reset = _logits(tiny_model, images)
        module.load_state_dict(trained)
        row = df[(df.layer == layer) & (df.trial == trial)].iloc[0]
        cos, l1, l2, ce = _paper_pred_similarity(clean, reset)
        top5 = (reset.topk(5, dim=1).indices == labels[:, None]).any(dim=1).float().mean().item()
        probs, clean_probs = F.softmax(reset, 1), F.softmax(clean, 1)
        assert row.top1_acc == pytest.approx(100 * (reset.argmax(1) == labels).float().mean().item())
        assert row.top5_acc == pytest.approx(100 * top5)
        assert row.loss == pytest.approx(F.cross_entropy(reset, labels).item(), rel=1e-5)
        assert row.pred_cos_sim == pytest.approx(cos, abs=1e-6)
        assert row.criticality == pytest.approx(1 - cos, abs=1e-6)
        assert row.pred_l1_err == pytest.approx(l1, abs=1e-6)
        assert row.pred_l2_err == pytest.approx(l2, abs=1e-6)
        assert row.pred_ce_loss == pytest.approx(ce, rel=1e-5)
        assert row.pred_kl == pytest.approx(F.kl_div(probs.log(), clean_probs, reduction="batchmean").item(), abs=1e-5)
        assert row.agreement == pytest.approx((reset.argmax(1) == clean.argmax(1)).float().mean().item())
        original_top1 = df[df.layer == "original"].top1_acc.item()
        assert row.recovered_acc == pytest.approx(row.top1_acc / original_top1)


def test_original_row_describes_the_unmodified_model(tiny_model, tiny_data):
    images, labels = tiny_data
    df = layercrit.measure(tiny_model, tiny_data, layers="conv", trials=1)
    original = df[df.layer == "original"].iloc[0]
    clean = _logits(tiny_model, images)
    assert df.layer.iloc[0] == "original"
    assert original.top1_acc == pytest.approx(100 * (clean.argmax(1) == labels).float().mean().item())
    assert original.pred_cos_sim == pytest.approx(1.0) and original.criticality == pytest.approx(0.0, abs=1e-7)


def test_two_runs_give_identical_tables(tiny_model, tiny_data):
    first = layercrit.measure(tiny_model, tiny_data, trials=2)
    second = layercrit.measure(tiny_model, tiny_data, trials=2)
    assert first.equals(second)


def test_model_is_bit_identical_after_a_run(tiny_model, tiny_data):
    before = {k: v.clone() for k, v in tiny_model.model.state_dict().items()}
    for engine in ("fast", "naive"):
        layercrit.measure(tiny_model, tiny_data, layers="conv,linear,bn", trials=2, engine=engine)
        after = tiny_model.model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)


def test_rows_follow_network_order_with_every_trial(tiny_model, tiny_data):
    df = layercrit.measure(tiny_model, tiny_data, trials=2)
    assert list(df.layer) == ["original"] + [n for n in
                                             ["model.conv1", "model.conv2", "model.unused", "model.fc"] for _ in range(2)]
    assert list(df.trial[1:]) == [0, 1] * 4


def test_rows_carry_their_provenance(tiny_model, tiny_data):
    df = layercrit.measure(tiny_model, tiny_data, trials=1, seed=5, model_id="tiny")
    assert set(df.model_id) == {"tiny"} and set(df.seed) == {5} and set(df.reset) == {"rerandomize"}
    assert set(df.n_images) == {48} and df.data_id.iloc[0].startswith("tensors-")
    assert set(df.layercrit_version) == {layercrit.__version__}


def test_zero_reset_is_computed_once_and_recorded_for_every_trial(tiny_model, tiny_data):
    df = layercrit.measure(tiny_model, tiny_data, layers="conv1", reset="zero", trials=3)
    rows = df[df.layer == "model.conv1"]
    assert list(rows.trial) == [0, 1, 2] and list(rows.computed_in_trial) == [0, 0, 0]
    assert rows.criticality.nunique() == 1


def test_fresh_batchnorm_is_deterministic_so_its_trials_are_shared(tiny_model, tiny_data):
    df = layercrit.measure(tiny_model, tiny_data, layers="bn", reset="rerandomize", trials=2)
    assert list(df[df.layer == "model.bn1"].computed_in_trial) == [0, 0]


@pytest.mark.slow
def test_rerandomize_trial_draws_the_same_weights_in_two_processes():
    code = (
        "import torch, timm; from layercrit.measurement.resets import Rerandomize;"
        "r = Rerandomize(seed=7, fresh=lambda: timm.create_model('resnet10t', num_classes=5));"
        "m = timm.create_model('resnet10t', num_classes=5);"
        "s = r.new_state('layer2.0.conv1', m.get_submodule('layer2.0.conv1'), 1);"
        "print(float(s['weight'].double().sum()), float(s['weight'].double().abs().sum()))"
    )
    outputs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
               for _ in range(2)}
    assert len(outputs) == 1
    import timm

    here = Rerandomize(seed=7, fresh=lambda: timm.create_model("resnet10t", num_classes=5))
    m = timm.create_model("resnet10t", num_classes=5)
    w = here.new_state("layer2.0.conv1", m.get_submodule("layer2.0.conv1"), 1)["weight"].double()
    assert outputs.pop().split() == [repr(float(w.sum())), repr(float(w.abs().sum()))]
    other_trial = here.new_state("layer2.0.conv1", m.get_submodule("layer2.0.conv1"), 0)["weight"]
    assert not torch.equal(other_trial, w.float())


def test_nonfinite_logits_count_as_wrong_and_keep_similarities_defined(tiny_model, tiny_data, tmp_path):
    state = {k: v.clone() for k, v in tiny_model.model.model.state_dict().items()}
    state["fc.bias"][3] = float("nan")  # the reset, not the trained model, gives NaN logits
    torch.save(state, tmp_path / "nan.pth")
    df = layercrit.measure(tiny_model, tiny_data, layers="fc", reset="reinit",
                           reset_options={"checkpoint": tmp_path / "nan.pth"}, trials=1)
    row = df[df.layer == "model.fc"].iloc[0]
    assert row.nonfinite == 48 and row.top1_acc == 0
    assert row.pred_cos_sim == 0 and row.pred_l1_err == pytest.approx(2.0)
    assert np.isnan(row.loss)


def test_labels_beyond_the_model_outputs_are_refused(tiny_model):
    images = torch.zeros(4, 1, 16, 16, dtype=torch.uint8)
    with pytest.raises(LayercritError, match="labels go up to 12 but the model has 10 outputs"):
        layercrit.measure(tiny_model, (images, torch.tensor([0, 1, 2, 12])))


def test_zero_trials_is_refused(tiny_model, tiny_data):
    with pytest.raises(LayercritError, match=r"trials=0: give at least 1"):
        layercrit.measure(tiny_model, tiny_data, trials=0)


def test_rows_name_the_kernel_size_of_convolutions(tiny_model, tiny_data):
    df = layercrit.measure(tiny_model, tiny_data, trials=1)
    kernels = dict(zip(df.layer, df.kernel, strict=True))
    assert kernels["model.conv1"] == "3x3" and kernels["model.unused"] == "1x1"
    assert pd.isna(kernels["model.fc"]) and pd.isna(kernels["original"])


# ---------------------------------------------------------------- the metrics, declared once


def test_every_metric_is_declared_once_and_every_reader_takes_its_columns_from_there(tiny_model, tiny_data):
    from pathlib import Path

    from layercrit.columns import COLUMNS, METRIC_COLUMNS
    from layercrit.measurement.metrics import METRICS

    assert METRIC_COLUMNS == tuple(m.column for m in METRICS) and len(set(METRIC_COLUMNS)) == len(METRICS)
    assert all((m.per_image is None) != (m.derive is None) and m.description for m in METRICS)
    df = layercrit.measure(tiny_model, tiny_data, layers="fc", trials=1)
    assert [c for c in df.columns if c in METRIC_COLUMNS] == list(METRIC_COLUMNS)
    assert set(METRIC_COLUMNS) <= set(COLUMNS)  # the sweep store's schema
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    table = [line for line in readme.splitlines() if line.startswith("| `")]
    undocumented = [c for c in METRIC_COLUMNS if not any(f"`{c}`" in line.split("|")[1] for line in table)]
    assert undocumented == []


def test_a_metric_added_to_the_registry_is_accumulated_per_image_with_its_worst_value(monkeypatch):
    from layercrit.measurement import metrics

    margin = metrics.Metric("margin", "top logit minus the second", lambda b: b.logits.topk(2, dim=1).values
                            .diff(dim=1).neg().squeeze(1), worst=-1.0)
    monkeypatch.setattr(metrics, "METRICS", (*metrics.METRICS, margin))
    monkeypatch.setattr(metrics, "METRIC_COLUMNS", (*metrics.METRIC_COLUMNS, "margin"))
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 0.5, 2.5], [float("nan"), 0.0, 0.0]])
    m = metrics.PredictionMetrics()
    m.update(logits[:2], logits[:2], torch.tensor([0, 2]))  # two batches: the result does not depend on the split
    m.update(logits[2:], torch.zeros(1, 3), torch.tensor([1]))
    row = m.result()
    assert row["margin"] == pytest.approx((2.0 + 2.0 - 1.0) / 3)
    assert list(row)[-1] == "margin" and row["nonfinite"] == 1 and row["top1_acc"] == pytest.approx(200 / 3)
