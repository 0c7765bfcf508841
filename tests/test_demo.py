"""``layercrit demo``: the shipped zoo measured end to end (on a few images), its files, table and failure modes."""

import pandas as pd
import pytest

from layercrit import cli, demo
from layercrit.errors import LayercritError
from layercrit.zoo import fmnist

IMAGES = 16
TRIALS = 2
CONV_AND_LINEAR_LAYERS = 22  # ResNet-20: 19 convs, 2 downsample convs, fc


@pytest.mark.slow
def test_demo_measures_every_zoo_model_and_writes_results_heatmap_and_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), "--images", str(IMAGES), "--trials", str(TRIALS)]) == 0
    records = fmnist.entries()

    results = pd.read_csv(out / "results.csv")
    assert list(results["model_id"].unique()) == [r["id"] for r in records]
    assert (results.groupby("model_id").size() == 1 + CONV_AND_LINEAR_LAYERS * TRIALS).all()
    assert set(results["reset"]) == {"rerandomize"} and set(results["n_images"]) == {IMAGES}
    assert (out / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.html").read_text()
    assert 'src="data:image/png;base64,' in report
    assert all(r["display"] in report for r in records)
    assert f"The demo&#x27;s {TRIALS} reset draws per layer are for speed" in report  # the heatmap says why it is dotted

    printed = capsys.readouterr().out.splitlines()
    table = printed[printed.index(next(line for line in printed if line.startswith("model "))) + 1:][:len(records)]
    for record, line in zip(records, table, strict=True):
        assert line.split()[:3] == [record["id"], record["category"], f"{record['accuracy']:.2f}"]
    assert f"heatmap: {out / 'heatmap.png'}" in printed and f"report:  {out / 'report.html'}" in printed


def test_summary_gives_each_models_mean_and_most_critical_layer_in_percent():
    rows = [("a", "original", 0, 0.0, 90.0), ("a", "conv1", 0, 0.10, 80.0), ("a", "conv1", 1, 0.30, 70.0),
            ("a", "fc", 0, 0.40, 60.0), ("a", "fc", 1, 0.10, 90.0),
            ("b", "original", 0, 0.0, 50.0), ("b", "conv1", 0, 0.05, 45.0), ("b", "fc", 0, 0.01, 49.0)]
    results = pd.DataFrame(rows, columns=["model_id", "layer", "trial", "criticality", "top1_acc"])
    summary = demo.summarize(results, {"a": {"category": "baseline", "accuracy": 91.5}})
    a, b = summary.to_dict(orient="records")
    assert a["most_critical_layer"] == "fc" and a["max_criticality"] == pytest.approx(25.0)
    assert a["mean_criticality"] == pytest.approx(22.5) and a["subset_top1"] == 90.0
    assert (a["category"], a["accuracy"]) == ("baseline", 91.5)
    assert b["most_critical_layer"] == "conv1" and b["mean_criticality"] == pytest.approx(3.0)
    assert pd.isna(b["category"]) and pd.isna(b["accuracy"])
    assert demo.format_summary(summary).splitlines()[2].split()[:3] == ["b", "?", "3.00"]


def test_interrupted_demo_keeps_the_models_that_finished(tmp_path, monkeypatch):
    measured = []
    real_measure = demo.measure

    def measure_then_stop(*args, **kwargs):
        if measured:
            raise KeyboardInterrupt
        measured.append(kwargs["model_id"])
        return real_measure(*args, **kwargs)

    monkeypatch.setattr(demo, "measure", measure_then_stop)
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo(tmp_path, images=8, trials=1, models=["baseline", "improved"], log=lambda line: None)
    results = pd.read_csv(tmp_path / "results.csv")
    assert set(results["model_id"]) == {"baseline"} == set(measured)


def test_unknown_demo_model_is_named_with_the_choices():
    with pytest.raises(LayercritError, match="no model 'resnet50' in the Fashion-MNIST zoo: one of baseline, improved"):
        demo.run_demo("unused", models=["baseline", "resnet50"])
