"""--log-batches (each batch's top-1, the paper's batch_acc) and --per-class (each class's accuracy, its drop and
agreement per (layer, trial)), checked against values computed by hand on a 3-class linear model."""

import json

import pandas as pd
import pytest
import torch
from torch import nn

from layercrit import cli, measure
from layercrit.errors import LayercritError
from layercrit.measurement.breakdown import Breakdown

BRIGHT = [0, 1, 2, 0, 1, 2, 1, 2]  # the one lit channel of each image: the clean model predicts it
LABELS = [0, 1, 1, 0, 2, 2, 1, 0]


class Linear3(nn.Module):
    """Logits = the image's three channels: the top-1 class is the brightest channel."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)
        with torch.no_grad():
            self.fc.weight.copy_(torch.eye(3))
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(x.flatten(1))


@pytest.fixture
def zeroed(tmp_path):
    images = torch.zeros(8, 3, 1, 1, dtype=torch.uint8)
    images[torch.arange(8), torch.tensor(BRIGHT)] = 255
    # zero: all logits equal, so every image is predicted class 0 (argmax takes the first)
    return measure(Linear3(), (images, torch.tensor(LABELS)), layers="fc", reset="zero", trials=2, images=None,
                   batch_size=3, log_batches=True, per_class=tmp_path / "per_class.csv")


def test_batch_acc_lists_each_batchs_top1_in_percent(zeroed):
    acc = {(row.layer, row.trial): json.loads(row.batch_acc) for row in zeroed.itertuples()}
    # batches: images 0-2, 3-5, 6-7
    assert acc["original", 0] == pytest.approx([200 / 3, 200 / 3, 50.0])  # predictions 012 | 012 | 12
    assert acc["fc", 0] == acc["fc", 1] == pytest.approx([100 / 3, 100 / 3, 50.0])  # all predicted 0
    assert pd.api.types.is_float_dtype(zeroed.top1_acc) and not pd.api.types.is_numeric_dtype(zeroed.batch_acc)
    assert list(zeroed.columns).index("batch_acc") > list(zeroed.columns).index("top1_ci")


def test_per_class_accuracy_drop_and_agreement_match_the_hand_computed_values(zeroed, tmp_path):
    table = pd.read_csv(tmp_path / "per_class.csv")
    assert list(table.columns) == ["model_id", "reset", "layer", "trial", "class", "accuracy", "accuracy_drop",
                                   "agreement", "n"]
    original = table[table.layer == "original"].set_index("class")
    assert original.accuracy.tolist() == pytest.approx([200 / 3, 200 / 3, 50.0])
    assert original.agreement.tolist() == [1.0, 1.0, 1.0] and original.n.tolist() == [3, 3, 2]
    for trial in (0, 1):  # zero is computed once and recorded for both trials
        reset = table[(table.layer == "fc") & (table.trial == trial)].set_index("class")
        assert reset.accuracy.tolist() == pytest.approx([100.0, 0.0, 0.0])
        assert reset.accuracy_drop.tolist() == pytest.approx([-100 / 3, 200 / 3, 50.0])
        # class 0's images were predicted 0, 0, 2 before; class 1's 1, 2, 1; class 2's 1, 2
        assert reset.agreement.tolist() == pytest.approx([2 / 3, 0.0, 0.0])
        assert reset.n.tolist() == [3, 3, 2]


def test_a_redone_unit_starts_its_counts_again():
    breakdown = Breakdown(torch.tensor([0, 1, 1, 0]))
    clean = torch.eye(2)[[0, 1, 1, 0]]
    breakdown(None, 0, slice(0, 4), clean)
    breakdown("fc", 0, slice(0, 2), clean[:2])
    breakdown("fc", 0, slice(0, 1), clean[:1])  # the engine halved the batch and redoes the chunk
    breakdown("fc", 0, slice(1, 2), clean[1:2])
    assert json.loads(breakdown.batch_acc("fc", 0)) == [100.0, 100.0]


def test_run_writes_batch_acc_and_per_class_csv_consistent_with_the_rows(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["run", "--model", "zoo:fmnist/baseline", "--data", "fashion-mnist", "--images", "30",
                     "--layers", "fc", "--trials", "2", "--batch-size", "10", "--device", "cpu", "--quiet",
                     "--out", str(out), "--log-batches", "--per-class"]) == 0
    rows = pd.read_csv(out / "results.csv")
    assert pd.api.types.is_float_dtype(rows.top1_acc)
    for row in rows.itertuples():
        batches = json.loads(row.batch_acc)
        assert len(batches) == 3 and sum(batches) / 3 == pytest.approx(row.top1_acc)
    per_class = pd.read_csv(out / "per_class.csv")
    for (layer, trial), group in per_class.groupby(["layer", "trial"]):
        row = rows[(rows.layer == layer) & (rows.trial == trial)].iloc[0]
        assert group.n.sum() == 30
        assert (group.accuracy * group.n).sum() / 30 == pytest.approx(row.top1_acc)
        assert (group.agreement * group.n).sum() / 30 == pytest.approx(row.agreement)


def test_the_sequential_design_refuses_them(tiny_model, tiny_data):
    with pytest.raises(LayercritError, match="fixed design: leave out target_ci"):
        measure(tiny_model, tiny_data, images=None, target_ci=0.1, log_batches=True)


@pytest.mark.parametrize("key", ["log_batches", "per_class"])
def test_a_sweep_refuses_them_naming_the_run_flag(key):
    from layercrit.sweeps.sweep import SweepConfig

    with pytest.raises(LayercritError, match=rf"{key}: a sweep does not keep it yet; use 'layercrit run --"):
        SweepConfig.from_dict({"data": "fashion-mnist", key: True,
                               "models": [{"id": "m", "spec": "zoo:fmnist/baseline"}]})
