"""layercrit diff A B: per layer each side's criticality ± 95% half-width and B − A with its interval, paired
where A and B share their trials (draws and images) and Welch's otherwise, checked against closed-form values and
on a real model measured twice."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

import layercrit
from layercrit import cli
from layercrit.analysis.compare import compare, conditions, mean_difference

from .conftest import TinyCNN

T_2 = 4.302652729911275  # t(0.975, 2 degrees of freedom)


def rows(model_id: str, values: dict[str, list[float]], **columns) -> pd.DataFrame:
    table = [{"model_id": model_id, "reset": "rerandomize", "layer": "original", "trial": 0, "criticality": 0.0}]
    for layer, trials in values.items():
        table += [{"model_id": model_id, "reset": "rerandomize", "layer": layer, "trial": t, "criticality": c}
                  for t, c in enumerate(trials)]
    return pd.DataFrame(table).assign(**columns)


A = rows("fp32", {"conv1": [0.1, 0.2, 0.3], "fc": [0.3, 0.3, 0.3]}, seed=0, precision="fp32", data_id="d0")
B = rows("bf16", {"conv1": [0.5, 0.6, 0.7], "fc": [0.2, 0.3, 0.4], "head": [0.9, 0.9, 0.9]}, seed=0,
         precision="bf16", data_id="d0")


def test_runs_sharing_draws_and_images_get_the_t_interval_of_the_per_trial_differences():
    table = compare(A, B).set_index("layer")
    h = T_2 * 0.1 / math.sqrt(3)  # sd 0.1 over 3 trials: A's conv1, B's conv1, B's fc
    conv1, fc = table.loc["conv1"], table.loc["fc"]
    assert (conv1.criticality_a, conv1.criticality_b) == pytest.approx((0.2, 0.6))
    assert (conv1.criticality_ci_a, conv1.criticality_ci_b) == pytest.approx((h, h))
    # B - A per trial: 0.4, 0.4, 0.4 on conv1 (no spread at all), -0.1, 0, 0.1 on fc
    assert conv1.difference == pytest.approx(0.4) and conv1.difference_ci == pytest.approx(0.0, abs=1e-12)
    assert bool(conv1.paired) and bool(conv1.significant)
    assert fc.difference == pytest.approx(0.0) and fc.difference_ci == pytest.approx(h) and not fc.significant
    assert list(table.index) == ["conv1", "fc", "head"]  # A's layers in order, then B's others
    assert math.isnan(table.loc["head"].difference) and not table.loc["head"].significant


def test_runs_on_other_draws_get_welchs_interval_of_two_independent_estimates():
    table = compare(A, B.assign(seed=1)).set_index("layer")
    h = T_2 * 0.1 / math.sqrt(3)
    conv1 = table.loc["conv1"]
    assert not conv1.paired
    # two equal variances with 2 degrees of freedom each: Welch's df = 4
    assert conv1.difference_ci == pytest.approx(stats.t.ppf(0.975, 4) * math.sqrt(2) * h / T_2)


def test_conditions_name_what_differs_between_the_runs():
    made = {c.name: c for c in conditions(A, B.assign(data_id="d1"))}
    assert made["precision"].differs and (made["precision"].a, made["precision"].b) == ("fp32", "bf16")
    assert made["data"].differs and not made["seed"].differs
    assert made["model"].differs  # by model_id when the rows have no model_spec


@pytest.fixture(scope="module")
def two_runs():
    """A tiny CNN measured twice on the same 200 images with the same reset draws: as it is (A) and with its
    classifier's weights scaled by 1.02 (B, a change as small as a precision's)."""
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (200, 1, 16, 16), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (200,), generator=generator)

    def measure(scale):
        torch.manual_seed(0)
        model = TinyCNN().eval()
        with torch.no_grad():
            model.fc.weight.mul_(scale)
        return layercrit.measure(model, (images, labels), fresh_model=TinyCNN, trials=5, progress=False,
                                 mean=(0.5,), std=(0.25,), model_id=f"x{scale}")

    return measure(1.0), measure(1.02)


def test_pairing_detects_a_small_change_that_independent_intervals_cannot(two_runs):
    a, b = two_runs
    paired = compare(a, b).set_index("layer")
    unpaired = compare(a, b.assign(seed=1)).set_index("layer")  # as if B had drawn other resets
    assert paired.paired.all() and not unpaired.paired.any()
    detected = paired.index[paired.significant]
    assert len(detected) >= 2
    assert not unpaired.loc[detected].significant.any()
    assert (unpaired.loc[detected].difference_ci > 10 * paired.loc[detected].difference_ci).all()
    assert mean_difference(a, b).excludes_zero and not mean_difference(a, b.assign(seed=1)).excludes_zero


def test_diff_says_what_differs_and_that_it_pairs(tmp_path, capsys):
    for name, table in (("a", A), ("b", B)):
        (tmp_path / name).mkdir()
        table.to_csv(tmp_path / name / "results.csv", index=False)
    out = tmp_path / "d.csv"
    assert cli.main(["diff", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "A and B differ in: model (fp32 -> bf16); precision (fp32 -> bf16)" in printed
    assert "paired: A and B share their reset draws and images" in printed
    assert "B-A 0.4000 ± 0.0000 *" in printed and "1 of 3 layers differ" in printed
    assert "warning" not in printed
    pd.testing.assert_frame_equal(pd.read_csv(out), compare(A, B), check_dtype=False)


def test_diff_warns_when_the_images_differ_and_says_it_cannot_pair(tmp_path, capsys):
    A.to_csv(tmp_path / "a.csv", index=False)
    B.assign(data_id="d1").to_csv(tmp_path / "b.csv", index=False)
    assert cli.main(["diff", str(tmp_path / "a.csv"), str(tmp_path / "b.csv"), "--out", str(tmp_path / "d.csv")]) == 0
    printed = capsys.readouterr().out
    assert "data (d0 -> d1)" in printed and "warning: A and B were measured on different images" in printed
    assert "unpaired: A and B share no trial" in printed


def test_a_side_holding_several_models_is_a_one_line_error(tmp_path, capsys):
    both = pd.concat([A, B])
    both.to_csv(tmp_path / "both.csv", index=False)
    A.to_csv(tmp_path / "a.csv", index=False)
    assert cli.main(["diff", str(tmp_path / "both.csv"), str(tmp_path / "a.csv"), "--out", str(tmp_path / "d.csv")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("layercrit: error: A holds several values of model_id (fp32, bf16)") and err.count("\n") == 1


def test_an_interval_that_would_leave_its_range_is_printed_clipped():
    from layercrit.measurement.aggregate import interval_text

    assert interval_text(0.6247, 1.3737, 0.0, 1.0) == "0.6247 [0.0000, 1.0000]"
    assert interval_text(0.6247, 0.0312, 0.5935, 0.6559) == "0.6247 ± 0.0312"
    assert np.isnan(float(interval_text(0.5, float("nan"), float("nan"), float("nan")).split("± ")[1]))


def test_runs_sharing_only_their_pilot_are_partly_paired(tmp_path, capsys):
    """Two sequential runs whose block sizes differ after the pilot: the pilot's trials pair, the later do not."""
    a = rows("fp32", {"conv1": [0.1, 0.2, 0.3, 0.25, 0.15]}, seed=0, data_id="d0",
             n_images=[0, 256, 256, 256, 30, 30], image_offset=[0, 0, 256, 512, 768, 798])
    b = a.assign(model_id="bf16", n_images=[0, 256, 256, 256, 40, 40], image_offset=[0, 0, 256, 512, 768, 808],
                 criticality=a.criticality + 0.01)
    table = compare(a, b)
    assert table.shared_trials.item() == 3 and not table.paired.item()
    a.to_csv(tmp_path / "a.csv", index=False)
    b.to_csv(tmp_path / "b.csv", index=False)
    assert cli.main(["diff", str(tmp_path / "a.csv"), str(tmp_path / "b.csv"), "--out", str(tmp_path / "d.csv")]) == 0
    printed = capsys.readouterr().out
    assert "partly paired: A and B share 3 of their trials" in printed and "images per trial (30, 256 -> 40, 256)" in printed
