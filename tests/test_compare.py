"""layercrit diff A B: per layer each side's criticality ± 95% half-width, B − A and its half-width
sqrt(hA² + hB²), checked against closed-form values."""

import math

import pandas as pd
import pytest

from layercrit import cli
from layercrit.analysis.compare import compare

T_2 = 4.302652729911275  # t(0.975, 2 degrees of freedom)


def rows(model_id: str, values: dict[str, list[float]]) -> pd.DataFrame:
    table = [{"model_id": model_id, "reset": "rerandomize", "layer": "original", "trial": 0, "criticality": 0.0}]
    for layer, trials in values.items():
        table += [{"model_id": model_id, "reset": "rerandomize", "layer": layer, "trial": t, "criticality": c}
                  for t, c in enumerate(trials)]
    return pd.DataFrame(table)


A = rows("fp32", {"conv1": [0.1, 0.2, 0.3], "fc": [0.3, 0.3, 0.3]})
B = rows("bf16", {"conv1": [0.5, 0.6, 0.7], "fc": [0.2, 0.3, 0.4], "head": [0.9, 0.9, 0.9]})


def test_the_difference_and_its_half_width_are_the_closed_form_ones():
    table = compare(A, B).set_index("layer")
    h = T_2 * 0.1 / math.sqrt(3)  # each of A's conv1, B's conv1 and B's fc: sd 0.1 over 3 trials
    conv1, fc = table.loc["conv1"], table.loc["fc"]
    assert (conv1.criticality_a, conv1.criticality_b) == pytest.approx((0.2, 0.6))
    assert (conv1.criticality_ci_a, conv1.criticality_ci_b) == pytest.approx((h, h))
    assert conv1.difference == pytest.approx(0.4) and conv1.difference_ci == pytest.approx(math.sqrt(2) * h)
    assert bool(conv1.significant)
    assert fc.difference == pytest.approx(0.0) and fc.difference_ci == pytest.approx(h)  # A's fc has no spread
    assert not fc.significant
    assert list(table.index) == ["conv1", "fc", "head"]  # A's layers in order, then B's others
    assert math.isnan(table.loc["head"].difference) and not table.loc["head"].significant


def test_diff_prints_and_writes_the_table_from_two_run_folders(tmp_path, capsys):
    for name, table in (("a", A), ("b", B)):
        (tmp_path / name).mkdir()
        table.to_csv(tmp_path / name / "results.csv", index=False)
    out = tmp_path / "d.csv"
    assert cli.main(["diff", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "B-A +0.4000 ± 0.3513 *" in printed and "1 of 3 layers differ" in printed
    pd.testing.assert_frame_equal(pd.read_csv(out), compare(A, B), check_dtype=False)


def test_a_side_holding_several_models_is_a_one_line_error(tmp_path, capsys):
    both = pd.concat([A, B])
    both.to_csv(tmp_path / "both.csv", index=False)
    A.to_csv(tmp_path / "a.csv", index=False)
    assert cli.main(["diff", str(tmp_path / "both.csv"), str(tmp_path / "a.csv"), "--out", str(tmp_path / "d.csv")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("layercrit: error: A holds several values of model_id (fp32, bf16)") and err.count("\n") == 1
