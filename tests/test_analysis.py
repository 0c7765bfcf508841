"""Specification of the analysis: criticality tables, metadata, figure order, statistics and `layercrit analyze`."""

import json
import math
import sys
import types

import numpy as np
import pandas as pd
import pytest
import yaml
from matplotlib.collections import QuadMesh
from scipy import stats

from layercrit.analysis import tables as analysis
from layercrit.analysis.per_layer import _kernel_text
from layercrit.cli import main
from layercrit.columns import COLUMNS
from layercrit.errors import LayercritError
from layercrit.results import read_table, write_results
from layercrit.sweeps.store import Store, Unit

PAPER_COLUMNS = ["top1_acc", "top5_acc", "loss", "batch_acc", "layer", "pred_cos_sim", "pred_l1_err", "pred_l2_err",
                 "pred_ce_loss", "trial", "recovered_acc", "model_id"]


def results(cos: dict[str, dict[str, list[float]]], *, accuracy: dict[str, float] | None = None,
            reset: str = "rerandomize") -> pd.DataFrame:
    """Rows in layercrit's format: pred_cos_sim per trial as given (recovered_acc and agreement equal to it)."""
    rows = []
    for model, layers in cos.items():
        if accuracy and model in accuracy:
            rows.append({"model_id": model, "layer": "original", "trial": 0, "reset": reset,
                         "top1_acc": accuracy[model], "pred_cos_sim": 1.0, "recovered_acc": 1.0, "agreement": 1.0})
        for layer, values in layers.items():
            for trial, value in enumerate(values):
                rows.append({"model_id": model, "layer": layer, "trial": trial, "reset": reset, "top1_acc": 10.0,
                             "pred_cos_sim": value, "recovered_acc": value, "agreement": value})
    return pd.DataFrame(rows)


def crit(table: pd.DataFrame, model: str, layer: str, column: str = "criticality_pct") -> float:
    return float(table.loc[(table.model_id == model) & (table.layer == layer), column].iloc[0])


# ---------------------------------------------------------------- per-layer criticality


def test_layer_criticality_is_the_percent_mean_and_sample_std_over_trials():
    table = analysis.layer_criticality(results({"m": {"model.conv1": [0.25, 0.25, 0.25],
                                                      "model.fc": [0.2, 0.4, 0.6]}}))
    assert crit(table, "m", "model.conv1") == pytest.approx(75.0)
    assert crit(table, "m", "model.conv1", "criticality_std_pct") == pytest.approx(0.0)
    assert crit(table, "m", "model.fc") == pytest.approx(60.0)  # 80, 60, 40
    assert crit(table, "m", "model.fc", "criticality_std_pct") == pytest.approx(20.0)
    assert list(table.trials) == [3, 3]


def test_a_single_trial_has_no_std_over_trials():
    table = analysis.layer_criticality(results({"m": {"model.fc": [0.5]}}))
    assert crit(table, "m", "model.fc") == pytest.approx(50.0)
    assert math.isnan(crit(table, "m", "model.fc", "criticality_std_pct"))


@pytest.mark.parametrize(("metric", "expected"), [("cos", 10.0), ("top1", 70.0), ("agreement", 50.0)])
def test_each_metric_reads_its_own_column(metric, expected):
    rows = pd.DataFrame([{"model_id": "m", "layer": "model.fc", "trial": 0, "pred_cos_sim": 0.9,
                          "recovered_acc": 0.3, "agreement": 0.5}])
    assert crit(analysis.layer_criticality(rows, metric), "m", "model.fc") == pytest.approx(expected)


def test_unknown_metric_is_an_error_naming_the_choices():
    with pytest.raises(LayercritError, match="unknown metric 'cosine': use one of cos, top1, agreement"):
        analysis.layer_criticality(results({"m": {"model.fc": [0.5]}}), "cosine")


def test_missing_columns_are_named_in_the_error():
    with pytest.raises(LayercritError, match="results lack column\\(s\\) trial"):
        analysis.layer_criticality(results({"m": {"model.fc": [0.5]}}).drop(columns=["trial"]))


def test_a_metric_the_paper_format_lacks_says_which_metric_works():
    paper = results({"m": {"model.fc": [0.5]}})[["model_id", "layer", "trial", "pred_cos_sim", "recovered_acc"]]
    with pytest.raises(LayercritError, match="metric 'agreement' needs agreement; try --metric cos"):
        analysis.layer_criticality(paper, "agreement")


def test_original_rows_are_not_layers():
    table = analysis.layer_criticality(results({"m": {"model.fc": [0.5]}}, accuracy={"m": 80.0}))
    assert list(table.layer) == ["model.fc"]


def test_results_with_only_the_original_model_are_an_error():
    only_original = results({"m": {}}, accuracy={"m": 80.0})
    with pytest.raises(LayercritError, match="no layer rows"):
        analysis.layer_criticality(only_original)


def test_layers_keep_network_order_merged_over_models_not_alphabetical():
    rows = results({
        "a": {"model.conv1": [0.5], "model.layer1.0.conv1": [0.5], "model.fc": [0.5]},
        "b": {"model.conv1": [0.5], "model.layer1.0.conv1": [0.5], "model.layer1.0.conv2": [0.5], "model.fc": [0.5]},
    })
    table = analysis.layer_criticality(rows)
    network = ["model.conv1", "model.layer1.0.conv1", "model.layer1.0.conv2", "model.fc"]
    assert analysis.layer_order(rows) == network
    assert list(table[table.model_id == "b"].layer) == network
    assert list(table[table.model_id == "a"].relative_depth) == [0.0, 0.5, 1.0]
    assert list(table[table.model_id == "a"].depth) == [0, 1, 3]


def test_results_mixing_reset_methods_need_a_choice():
    mixed = pd.concat([results({"m": {"model.fc": [0.5]}}, reset="rerandomize"),
                       results({"m": {"model.fc": [0.0]}}, reset="zero")])
    with pytest.raises(LayercritError, match=r"results mix reset methods \(rerandomize, zero\): choose one with --reset"):
        analysis.layer_criticality(mixed)
    assert crit(analysis.layer_criticality(mixed, reset="zero"), "m", "model.fc") == pytest.approx(100.0)
    with pytest.raises(LayercritError, match="no results with reset 'noise': the results hold rerandomize, zero"):
        analysis.layer_criticality(mixed, reset="noise")


def test_the_same_measurement_twice_is_an_error():
    once = results({"m": {"model.fc": [0.5]}})
    with pytest.raises(LayercritError, match="model 'm' layer 'model.fc' trial 0 appears more than once"):
        analysis.layer_criticality(pd.concat([once, once]))


# ---------------------------------------------------------------- display names


@pytest.mark.parametrize(("name", "kernel", "shown"), [
    ("model.layer1.0.conv1", "1x1", "[1.0] conv1:1x1"),
    ("model.layer1.0.conv1", None, "[1.0] conv1"),
    ("model.layer4.2.conv2", 3, "[4.2] conv2:3x3"),
    ("model.layer2.0.downsample.0", (1, 1), "[2.0] downsample:1x1"),
    ("model.layer2.0.downsample.1", None, "[2.0] downsample bn"),
    ("model.fc", None, "[Head] fc"),
    ("model.head.fc", None, "[Head] head.fc"),
    ("model.conv1", "7x7", "[0.0] conv1:7x7"),
    ("model.blocks.3.attn.qkv", None, "[3] attn.qkv"),
])
def test_display_names_follow_the_paper(name, kernel, shown):
    assert analysis.display_layer(name, _kernel_text(kernel)) == shown


def test_kernel_sizes_come_from_a_kernel_column_or_layer_info():
    rows = results({"m": {"model.conv1": [0.5], "model.layer1.0.conv2": [0.5], "model.fc": [0.5]}})
    rows["kernel"] = rows.layer.map({"model.conv1": "7x7", "model.layer1.0.conv2": None, "model.fc": None})
    table = analysis.layer_criticality(rows, layer_info={"model.layer1.0.conv2": {"kernel": 3}})
    assert list(table.layer_display) == ["[0.0] conv1:7x7", "[1.0] conv2:3x3", "[Head] fc"]


# ---------------------------------------------------------------- per-model table and metadata


def test_avg_criticality_is_the_mean_over_layers_of_the_trial_means():
    # one layer has three trials and the other one: a mean over rows would weight the first 3:1 (75 %)
    models = analysis.model_criticality(results({"m": {"model.conv1": [0.0, 0.0, 0.0], "model.fc": [1.0]}}))
    row = models.iloc[0]
    assert row.avg_criticality_pct == pytest.approx(50.0)
    assert row.std_over_layers_pct == pytest.approx(50.0)  # population std of (100, 0)
    assert row.layers == 2


def test_accuracy_comes_from_metadata_else_from_the_original_row():
    rows = results({"a": {"model.fc": [0.5]}, "b": {"model.fc": [0.5]}, "c": {"model.fc": [0.5]}},
                   accuracy={"a": 70.0, "b": 71.0})
    models = analysis.model_criticality(rows, meta={"a": {"accuracy": 76.5}}).set_index("model_id")
    assert models.loc["a", "accuracy"] == 76.5 and models.loc["a", "accuracy_source"] == "metadata"
    assert models.loc["b", "accuracy"] == 71.0 and models.loc["b", "accuracy_source"] == "original"
    assert math.isnan(models.loc["c", "accuracy"]) and pd.isna(models.loc["c", "accuracy_source"])


def test_models_without_metadata_are_category_other_named_by_their_id():
    rows = results({"known": {"model.fc": [0.5]}, "stranger": {"model.fc": [0.5]}})
    models = analysis.model_criticality(rows, meta={"known": {"category": "augmentation", "display": "Known"}})
    assert list(models.category) == ["augmentation", "other"]
    assert list(models.display) == ["Known", "stranger"]


def test_rows_can_follow_the_metadata_baseline_first_then_categories_in_metadata_order():
    meta = {"m1": {"category": "B"}, "m2": {"category": "A"}, "m3": {"category": "B"}, "m4": {"category": "C"}}
    rows = results({m: {"model.fc": [0.5]} for m in ("m5", "m3", "m2", "m1", "m4")})
    models = analysis.model_criticality(rows, meta=meta, baseline="m4", order="metadata")
    assert list(models.model_id) == ["m4", "m1", "m3", "m2", "m5"]
    assert list(models.is_baseline) == [True, False, False, False, False]


def test_rows_are_sorted_as_the_papers_notebook_baseline_then_category_then_model_id():
    meta = {"z_adv": {"category": "adversarial_training"}, "tv": {"category": "baseline"},
            "a_recipe": {"category": "training_recipes"}, "b_adv": {"category": "adversarial_training"},
            "aug": {"category": "augmentation"}}
    rows = results({m: {"model.fc": [0.5]} for m in ("stranger", "a_recipe", "z_adv", "aug", "tv", "b_adv")})
    models = analysis.model_criticality(rows, meta=meta)
    assert list(models.model_id) == ["tv", "b_adv", "z_adv", "aug", "a_recipe", "stranger"]


def test_training_budgets_are_ordered_as_numbers_within_a_category():
    meta = {"pgd_linf_24": {"category": "adv", "budget": "linf 24/255"}, "pgd_linf_2": {"category": "adv",
            "budget": "linf 2/255"}, "pgd_linf_8": {"category": "adv", "budget": "linf 8/255"},
            "pgd_l2_1.5": {"category": "adv", "budget": "l2 1.5"}, "pgd_l2_0.5": {"category": "adv", "budget": "l2 0.5"},
            "eps10": {"category": "other_adv"}, "eps9": {"category": "other_adv"}}
    rows = results({m: {"model.fc": [0.5]} for m in meta})
    models = analysis.model_criticality(rows, meta=meta)
    assert list(models.model_id) == ["pgd_l2_0.5", "pgd_l2_1.5", "pgd_linf_2", "pgd_linf_8", "pgd_linf_24", "eps9",
                                     "eps10"]


def test_training_seeds_of_a_method_sit_together_after_seed_0_and_are_labelled_with_their_seed():
    meta = {"base": {"category": "baseline", "display": "Base"}, "base@seed2": {"category": "baseline", "display": "Base"},
            "base@seed1": {"category": "baseline", "display": "Base"}, "adv@seed1": {"category": "adv", "display": "Adv"},
            "aug": {"category": "aug", "display": "Aug"}, "adv": {"category": "adv", "display": "Adv"},
            "adv2": {"category": "adv", "display": "Adv2"}}
    rows = results({m: {"model.fc": [0.5]} for m in ("aug", "adv@seed1", "base@seed2", "adv2", "base@seed1", "adv",
                                                     "base")})
    in_metadata = analysis.model_criticality(rows, meta=meta, order="metadata")
    assert list(in_metadata.model_id[:3]) == ["base", "base@seed2", "base@seed1"], "seed 0, then the metadata's order"
    assert list(in_metadata.is_baseline[:3]) == [True, False, False], "seed 0 of the one baseline method"
    models = analysis.model_criticality(rows, meta=meta).set_index("model_id")
    assert list(models.index) == ["base", "base@seed1", "base@seed2", "adv", "adv@seed1", "adv2", "aug"]
    assert models.display["base@seed1"] == "Base (seed 1)" and models.display["adv"] == "Adv (seed 0)"
    assert models.display["adv2"] == "Adv2" and models.display["aug"] == "Aug", "one seed: no label"
    unnamed = analysis.model_criticality(rows, meta={m: {"category": c["category"]} for m, c in meta.items()})
    assert unnamed.set_index("model_id").display["base@seed1"] == "base@seed1", "an id already names its seed"
    assert unnamed.set_index("model_id").display["base"] == "base (seed 0)"
    chosen = analysis.model_criticality(rows, meta=meta, baseline="base@seed2")
    assert list(chosen.model_id[:3]) == ["base@seed2", "base", "base@seed1"], "a chosen seed leads its method"


def test_an_unknown_row_order_is_an_error_naming_the_orders():
    with pytest.raises(LayercritError, match="unknown row order 'random': one of notebook, metadata"):
        analysis.model_criticality(results({"a": {"model.fc": [0.5]}}), order="random")


def test_the_baseline_defaults_to_the_one_model_of_category_baseline():
    rows = results({m: {"model.fc": [0.5]} for m in ("x", "tv")})
    models = analysis.model_criticality(rows, meta={"baseline": ["tv"], "other_methods": ["x"]})
    assert list(models.model_id[models.is_baseline]) == ["tv"]
    assert models.model_id.iloc[0] == "tv"


def test_an_unknown_baseline_is_an_error_listing_the_models():
    with pytest.raises(LayercritError, match=r"baseline 'tv' is not among the results' models \(a\)"):
        analysis.model_criticality(results({"a": {"model.fc": [0.5]}}), baseline="tv")


def _meta_forms(tmp_path):
    record = {"category": "adversarial_training", "display": "PGD", "accuracy": 70.5, "budget": "l2 3",
              "lab": "ours"}
    yaml_path = tmp_path / "models.yaml"
    yaml_path.write_text(yaml.safe_dump({"m": record}))
    csv_path = tmp_path / "models.csv"
    pd.DataFrame([{"model_id": "m", **record}]).to_csv(csv_path, index=False)
    json_path = tmp_path / "manifest.json"
    json_path.write_text(json.dumps({"zoo": "z", "models": [{"id": "m", **record}]}))
    return {
        "dict": {"m": record},
        "records with id": [{"id": "m", **record}],
        "DataFrame indexed by model_id": pd.DataFrame([record], index=pd.Index(["m"], name="model_id")),
        "YAML file": yaml_path,
        "CSV file": str(csv_path),
        "zoo manifest (JSON)": json_path,
    }


@pytest.mark.parametrize("form", ["dict", "records with id", "DataFrame indexed by model_id", "YAML file", "CSV file",
                                  "zoo manifest (JSON)"])
def test_metadata_is_read_from_every_form_and_keeps_unknown_fields(form, tmp_path):
    meta = _meta_forms(tmp_path)[form]
    models = analysis.model_criticality(results({"m": {"model.fc": [0.5]}}), meta=meta)
    row = models.iloc[0]
    assert (row.category, row.display, row.accuracy, row.budget, row.norm) == (
        "adversarial_training", "PGD", 70.5, 3.0, "L2")
    assert row.lab == "ours"


def test_the_papers_category_json_is_metadata(tmp_path):
    path = tmp_path / "r50_categories.json"
    path.write_text(json.dumps({"baseline": ["tv_resnet50"], "contrastive": ["resnet50_dino"]}))
    meta = analysis.load_meta(path)
    assert dict(zip(meta.model_id, meta.category, strict=True)) == {"tv_resnet50": "baseline",
                                                                    "resnet50_dino": "contrastive"}


def test_metadata_without_model_ids_is_an_error(tmp_path):
    path = tmp_path / "models.csv"
    pd.DataFrame([{"name": "m", "category": "x"}]).to_csv(path, index=False)
    with pytest.raises(LayercritError, match="metadata has no model_id column: give one entry per model with model_id"):
        analysis.load_meta(path)


@pytest.mark.parametrize(("meta", "message"), [
    ({"m": {"accuracy": "high"}}, "accuracy 'high' of model 'm' is not a number"),
    ([{"model_id": "m"}, {"model_id": "m"}], "metadata lists model 'm' twice"),
    ({"m": 3}, "metadata must map model_id"),
    ("missing.yaml", "metadata file not found: missing.yaml"),
])
def test_bad_metadata_is_an_error_saying_what_to_fix(meta, message):
    with pytest.raises(LayercritError, match=message):
        analysis.load_meta(meta)


def test_metadata_in_an_unknown_file_format_is_an_error(tmp_path):
    path = tmp_path / "models.txt"
    path.write_text("m: baseline")
    with pytest.raises(LayercritError, match="expected .yaml, .yml, .json or .csv"):
        analysis.load_meta(path)


@pytest.mark.parametrize(("value", "parsed"), [
    (3, (None, 3.0)),
    ("0.5", (None, 0.5)),
    ("l2 3", ("L2", 3.0)),
    ("l2:0.25", ("L2", 0.25)),
    ("linf 4/255", ("Linf", 4 / 255)),
    ("L∞ ε=8", ("Linf", 8.0)),
    ("Linf, eps=2/255", ("Linf", 2 / 255)),
])
def test_training_budgets_are_parsed_with_their_norm(value, parsed):
    norm, epsilon = analysis.parse_budget(value)
    assert norm == parsed[0]
    assert epsilon == pytest.approx(parsed[1])


def test_an_unreadable_budget_is_an_error():
    with pytest.raises(LayercritError, match="cannot read training budget 'large': write a number"):
        analysis.parse_budget("large")


def test_a_norm_column_names_the_norm_of_numeric_budgets():
    models = analysis.model_criticality(results({"m": {"model.fc": [0.5]}}),
                                        meta={"m": {"budget": 8, "norm": "linf"}})
    assert (models.budget.iloc[0], models.norm.iloc[0]) == (8.0, "Linf")


# ---------------------------------------------------------------- statistics


def _random_models(n_per_category: dict[str, int], seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    categories = [c for c, n in n_per_category.items() for _ in range(n)]
    return pd.DataFrame({"model_id": [f"m{i}" for i in range(len(categories))], "category": categories,
                         "avg_criticality_pct": rng.uniform(20, 60, len(categories)),
                         "accuracy": rng.uniform(55, 80, len(categories))})


def test_correlations_match_scipy_over_all_models_and_each_subset():
    models = _random_models({"adversarial_training": 5, "augmentation": 4})
    table = analysis.correlations(models).set_index("subset")
    subsets = {
        "all": models,
        "only adversarial_training": models[models.category == "adversarial_training"],
        "without adversarial_training": models[models.category != "adversarial_training"],
        "only augmentation": models[models.category == "augmentation"],
        "without augmentation": models[models.category != "augmentation"],
    }
    assert set(table.index) == set(subsets)
    for name, subset in subsets.items():
        spearman = stats.spearmanr(subset.avg_criticality_pct, subset.accuracy)
        kendall = stats.kendalltau(subset.avg_criticality_pct, subset.accuracy)
        row = table.loc[name]
        assert row.n == len(subset)
        assert row.spearman_rho == pytest.approx(spearman.statistic)
        assert row.spearman_p == pytest.approx(spearman.pvalue)
        assert row.kendall_tau == pytest.approx(kendall.statistic)
        assert row.kendall_p == pytest.approx(kendall.pvalue)


def test_correlations_leave_out_subsets_of_fewer_than_three_models_and_models_without_accuracy():
    models = _random_models({"a": 4, "b": 2})
    models.loc[0, "accuracy"] = np.nan
    table = analysis.correlations(models)
    # usable: 3 of a, 2 of b; "only b" and "without a" have 2 models
    assert list(table.subset) == ["all", "only a", "without b"]
    assert list(table.n) == [5, 3, 3]


# ---------------------------------------------------------------- reading results


def test_the_papers_csv_format_gives_the_same_tables_as_layercrits(tmp_path):
    rows = results({"a": {"model.conv1": [0.1, 0.3, 0.2], "model.layer1.0.conv1": [0.9, 0.8, 0.7], "model.fc": [0.5] * 3},
                    "b": {"model.conv1": [0.6, 0.6, 0.5], "model.layer1.0.conv1": [0.2, 0.1, 0.4], "model.fc": [0.4] * 3}})
    write_results(rows, tmp_path / "run")
    paper = rows.assign(top5_acc=20.0, loss=1.0, batch_acc=np.nan, pred_l1_err=1.0, pred_l2_err=0.5,
                        pred_ce_loss=-3.0, trial=rows.trial.astype(float))[PAPER_COLUMNS]
    paper.to_csv(tmp_path / "paper.csv", index=False)
    ours = analysis.layer_criticality(analysis.load_results([tmp_path / "run"]))
    theirs = analysis.layer_criticality(analysis.load_results(tmp_path / "paper.csv"))
    pd.testing.assert_frame_equal(ours, theirs)
    pd.testing.assert_frame_equal(ours, analysis.layer_criticality(rows))


def test_read_table_sends_sqlite_stores_to_the_store_export(tmp_path, monkeypatch):
    store = tmp_path / "runs.sqlite"
    store.write_bytes(b"")
    exported = results({"m": {"model.fc": [0.5]}})
    calls = []
    fake = types.ModuleType("layercrit.sweeps.store")
    fake.export_frame = lambda path: calls.append(path) or exported
    fake.status_frame = lambda path: pd.DataFrame({"units": [1], "done": [1], "pending": [0], "failed": [0]})
    monkeypatch.setitem(sys.modules, "layercrit.sweeps.store", fake)
    assert read_table(store) is exported
    assert calls == [store]


def test_a_sweep_stores_model_metadata_is_used_and_given_metadata_overrides_it(tmp_path):
    path = tmp_path / "sweep.sqlite"
    rows = results({"tv": {"model.conv1": [0.5], "model.fc": [0.5]}, "adv": {"model.conv1": [0.2], "model.fc": [0.4]}},
                   accuracy={"tv": 70.0, "adv": 60.0})
    for column in COLUMNS:
        if column not in rows:
            rows[column] = "x" if column in ("model_spec", "data_id", "engine", "precision", "layercrit_version") else 0
    with Store(path, create=True) as store:
        for position, (model, record) in enumerate({"tv": {"category": "baseline", "accuracy": 76.1},
                                                    "adv": {"category": "adversarial_training", "budget": "l2 3",
                                                            "display": "PGD"}}.items()):
            store.set_model(model, position, {"spec": "test", "metadata": record}, ["model.conv1", "model.fc"])
            unit = Unit(model, "rerandomize", 0, 0, ("model.conv1", "model.fc"))
            store.add_units([unit])
            store.record_done(unit, rows[rows.model_id == model], seconds=0.1, worker="w", batch_size=1)
    models = analysis.model_criticality(read_table(path), meta={"adv": {"display": "PGD L2 ε=3"}}).set_index("model_id")
    assert list(models.index) == ["tv", "adv"] and bool(models.loc["tv", "is_baseline"])
    assert list(models.category) == ["baseline", "adversarial_training"]
    assert list(models.display) == ["tv", "PGD L2 ε=3"]
    assert list(models.accuracy) == [76.1, 60.0]  # the store's metadata, else the original row
    assert models.loc["adv", "budget"] == 3.0


def test_no_results_is_an_error():
    with pytest.raises(LayercritError, match="no results given"):
        analysis.load_results([])


# ---------------------------------------------------------------- analyze: every table, figure and the report


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory):
    out = tmp_path_factory.mktemp("analysis")
    layers = ["model.conv1", "model.layer1.0.conv1", "model.layer1.0.conv2", "model.layer2.0.conv1", "model.fc"]
    rng = np.random.default_rng(3)
    cos = {m: {layer: list(rng.uniform(0, 1, 2)) for layer in layers} for m in ("tv", "adv1", "adv2", "adv3", "aug")}
    meta = {"tv": {"category": "baseline", "accuracy": 76.0},
            "adv1": {"category": "adversarial_training", "accuracy": 70.0, "budget": "l2 1"},
            "adv2": {"category": "adversarial_training", "accuracy": 65.0, "budget": "l2 3"},
            "adv3": {"category": "adversarial_training", "accuracy": 60.0, "budget": "linf 4/255"}}
    return out, analysis.analyze(results(cos), out, meta=meta)


def test_analyze_writes_every_table_and_figure(analyzed):
    out, result = analyzed
    for name in ("layer_criticality", "model_criticality", "correlations", "depth_profile"):
        assert result["paths"][name] == out / f"{name}.csv"
    pd.testing.assert_frame_equal(pd.read_csv(out / "model_criticality.csv")[["model_id", "avg_criticality_pct"]],
                                  result["models"][["model_id", "avg_criticality_pct"]])
    assert len(pd.read_csv(out / "layer_criticality.csv")) == 5 * 5
    for name in ("heatmap", "heatmap_std", "heatmap_delta", "accuracy_vs_criticality", "budget_vs_criticality",
                 "depth_vs_criticality"):
        png, pdf = result["paths"][name]
        assert png == out / f"{name}.png" and png.stat().st_size > 1000
        assert pdf == out / f"{name}.pdf" and pdf.read_bytes().startswith(b"%PDF")
    assert result["paths"]["report"] == out / "report.html"


def test_analyze_writes_stage_means_depth_shifts_and_differences_from_the_baseline(analyzed):
    out, result = analyzed
    table = result["aggregates"]
    pd.testing.assert_frame_equal(pd.read_csv(out / "aggregates.csv")[["model_id", "aggregate", "criticality_pct"]],
                                  table[["model_id", "aggregate", "criticality_pct"]])
    tv = table[table.model_id == "tv"].set_index("aggregate")
    assert list(tv.index) == ["all layers", "stem", "layer1", "layer2", "head", "depth shift"]
    layers = result["layers"].set_index(["model_id", "layer"]).criticality_pct
    stage = (layers["tv", "model.layer1.0.conv1"] + layers["tv", "model.layer1.0.conv2"]) / 2
    assert tv.loc["layer1", "criticality_pct"] == pytest.approx(stage)
    assert tv.loc["depth shift", "criticality_pct"] == pytest.approx(
        layers["tv", "model.layer2.0.conv1"] - (layers["tv", "model.conv1"] + stage) / 2)
    adv = table[table.model_id == "adv1"].set_index("aggregate")
    assert adv.loc["layer1", "minus_baseline_pct"] == pytest.approx(
        adv.loc["layer1", "criticality_pct"] - tv.loc["layer1", "criticality_pct"])
    assert tv.minus_baseline_pct.isna().all() and adv.minus_baseline_ci_pct.notna().all()
    assert "Means over all layers and over each stage" in (out / "report.html").read_text()


@pytest.mark.parametrize("name, stage", [
    ("model.conv1", "stem"), ("model.layer2.0.downsample.0", "layer2"), ("model.fc", "head"),
    ("stages.1.blocks.2.conv_dw", "stages.1"), ("blocks.3.attn.qkv", "blocks.3"), ("patch_embed.proj", "stem"),
    ("prefix:model.layer1.0", None), ("features.weird.thing", None)])
def test_a_layers_stage_comes_from_its_name(name, stage):
    assert analysis.stage_of(name) == stage


def test_stats_json_holds_the_correlations_and_the_baseline(analyzed):
    out, result = analyzed
    saved = json.loads((out / "stats.json").read_text())
    assert saved == result["stats"]
    assert saved["baseline"] == "tv" and saved["metric"] == "cos" and saved["models"] == 5 and saved["layers"] == 5
    overall = saved["correlations"][0]
    models = result["models"].dropna(subset=["accuracy"])
    assert overall["subset"] == "all" and overall["n"] == 4
    assert overall["spearman_rho"] == pytest.approx(stats.spearmanr(models.avg_criticality_pct, models.accuracy).statistic)
    assert saved["skipped_figures"] == {}


def test_analyze_leaves_out_figures_without_data_and_says_why(tmp_path):
    result = analysis.analyze(results({"a": {"model.fc": [0.5]}, "b": {"model.fc": [0.4]}}), tmp_path, pdf=False)
    skipped = result["stats"]["skipped_figures"]
    assert set(skipped) == {"heatmap_delta", "accuracy_vs_criticality", "budget_vs_criticality"}
    assert "--baseline" in skipped["heatmap_delta"]
    assert not (tmp_path / "heatmap_delta.png").exists()
    assert (tmp_path / "heatmap.png").is_file() and (tmp_path / "report.html").is_file()
    assert "fewer than 3 models with accuracy" in analysis.summary(result)


def test_cli_analyze_prints_the_correlations_and_writes_the_report(tmp_path, capsys):
    rows = results({m: {"model.conv1": [0.2 * i], "model.fc": [0.1 * i]} for i, m in enumerate("abc", 1)},
                   accuracy={"a": 70.0, "b": 72.0, "c": 75.0})
    write_results(rows, tmp_path / "run")
    assert main(["analyze", str(tmp_path / "run"), "--out", str(tmp_path / "figures")]) == 0
    printed = capsys.readouterr().out
    models = analysis.model_criticality(rows)
    rho = stats.spearmanr(models.avg_criticality_pct, models.accuracy).statistic
    assert f"Spearman ρ={rho:.3f}" in printed
    assert str(tmp_path / "figures" / "report.html") in printed
    assert (tmp_path / "figures" / "report.html").is_file()


def test_cli_analyze_reports_user_mistakes_in_one_line(tmp_path, capsys):
    assert main(["analyze", str(tmp_path / "nothing.csv"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == f"layercrit: error: results not found: {tmp_path / 'nothing.csv'}\n"


def test_layer_and_model_tables_carry_95_percent_intervals_over_resets_in_percent():
    rows = results({"m": {"model.conv1": [0.9, 0.8, 0.7], "model.fc": [0.5, 0.5, 0.2]}})
    layers = analysis.layer_criticality(rows).set_index("layer")
    t = stats.t.ppf(0.975, 2)
    assert layers.loc["model.conv1", "criticality_ci_pct"] == pytest.approx(100 * t * 0.1 / np.sqrt(3))
    models = analysis.model_criticality(rows)
    per_trial = 100 * (1 - np.array([0.7, 0.65, 0.45]))  # both layers' criticality averaged at each trial
    assert models.avg_criticality_ci_pct.item() == pytest.approx(t * per_trial.std(ddof=1) / np.sqrt(3))


def test_sequential_rows_report_each_layers_own_stein_interval_beside_the_target():
    rows = results({"m": {"model.conv1": [0.90, 0.91, 0.90, 0.91], "model.fc": [0.1, 0.9, 0.2, 0.8]}})
    rows = rows.assign(target_ci=0.03, first_stage=3, mirror_of=np.nan, capped=rows.layer == "model.fc",
                       n_images=50)
    layers = analysis.layer_criticality(rows).set_index("layer")
    own = 100 * stats.t.ppf(0.975, 2) * np.std([0.90, 0.91, 0.90], ddof=1) / 2
    assert layers.loc["model.conv1", "criticality_ci_pct"] == pytest.approx(own)  # narrower than the target
    assert own < 3.0 and (layers.target_ci_pct == 3.0).all()
    assert layers.loc["model.fc", "criticality_ci_pct"] > 3.0 and layers.loc["model.fc", "capped"]


# ---------------------------------------------------------------- the paper's own results, without extra files

PAPER_IDS = ["robust_resnet50_linf_eps4.0", "resnet50_frozen_random", "tv_resnet50", "resnet50_swav",
             "robust_resnet50_l2_eps3", "resnet50.a1_in1k", "robust_resnet50_l2_eps0", "robust_resnet50_linf_eps1.0"]
PAPER_LAYERS = ["model.conv1", "model.layer1.0.conv1", "model.layer1.0.conv2", "model.layer1.0.conv3",
                "model.layer1.0.downsample.0", "model.fc"]


def paper_csv(path, ids=PAPER_IDS, seed=0):
    """A results.csv in the paper's published format (its columns, no original rows, no reset column)."""
    rng = np.random.default_rng(seed)
    rows = [{"model_id": m, "layer": layer, "trial": float(trial), "pred_cos_sim": rng.uniform(0.1, 0.9)}
            for m in ids for trial in range(3) for layer in PAPER_LAYERS]
    frame = pd.DataFrame(rows).assign(top1_acc=10.0, top5_acc=20.0, loss=1.0, batch_acc=np.nan, pred_l1_err=1.0,
                                      pred_l2_err=0.5, pred_ce_loss=-3.0, recovered_acc=lambda f: f.pred_cos_sim)
    frame[PAPER_COLUMNS].to_csv(path, index=False)
    return path


def test_paper_model_ids_take_category_name_accuracy_and_budget_from_the_registry(tmp_path):
    models = analysis.model_criticality(analysis.load_results(paper_csv(tmp_path / "results.csv"))).set_index(
        "model_id")
    linf = models.loc["robust_resnet50_linf_eps4.0"]
    assert (linf.category, linf.display, linf.accuracy) == ("adversarial_training",
                                                           "PGD Adversarial Training (Linf, ε=4.0)", 63.87)
    assert (linf.norm, linf.budget) == ("Linf", pytest.approx(4 / 255))
    l2 = models.loc["robust_resnet50_l2_eps3"]
    assert (l2.norm, l2.budget, l2.accuracy_source, l2.registry) == ("L2", 3.0, "zoo:paper", "zoo:paper")
    assert models.loc["tv_resnet50", "is_baseline"] and models.loc["tv_resnet50", "display"] == "Baseline"
    assert models.loc["resnet50_frozen_random", "category"] == "freezing"
    assert math.isnan(models.loc["resnet50_frozen_random", "accuracy"])  # the paper reports none
    assert math.isnan(models.loc["resnet50_swav", "budget"])


def test_zoo_specs_and_fashion_mnist_zoo_ids_are_recognised_too():
    rows = results({m: {"model.fc": [0.5]} for m in ("zoo:paper/resnet50_swav", "zoo:fmnist/pgd_l2_1.5",
                                                      "pgd_linf_8", "zoo:paper/not_a_model")})
    models = analysis.model_criticality(rows).set_index("model_id")
    assert models.loc["zoo:paper/resnet50_swav", ["category", "display", "accuracy"]].tolist() == [
        "contrastive", "SwAV", 75.31]
    assert (models.loc["zoo:fmnist/pgd_l2_1.5", "norm"], models.loc["zoo:fmnist/pgd_l2_1.5", "budget"]) == ("L2", 1.5)
    assert models.loc["pgd_linf_8", "budget"] == pytest.approx(8 / 255)
    assert models.loc["pgd_linf_8", "registry"] == "zoo:fmnist"
    assert models.loc["zoo:paper/not_a_model", "category"] == "other"


def test_given_and_embedded_metadata_win_over_the_registry_field_by_field():
    rows = results({"tv_resnet50": {"model.fc": [0.5]}, "resnet50_swav": {"model.fc": [0.5]}})
    rows["display"] = np.where(rows.model_id == "resnet50_swav", "SwAV (ours)", None)
    models = analysis.model_criticality(rows, meta={"tv_resnet50": {"accuracy": 76.5}}).set_index("model_id")
    assert models.loc["tv_resnet50", ["accuracy", "accuracy_source", "display"]].tolist() == [
        76.5, "metadata", "Baseline"]
    assert models.loc["resnet50_swav", ["display", "accuracy"]].tolist() == ["SwAV (ours)", 75.31]


def test_the_registry_can_be_ignored():
    models = analysis.model_criticality(results({"tv_resnet50": {"model.fc": [0.5]}}), registry=False)
    assert models.category.tolist() == ["other"] and models.registry.isna().all()


def test_a_plain_id_two_zoos_share_is_not_guessed(monkeypatch):
    from layercrit import zoo

    fake = {"paper": [{"id": "baseline", "category": "baseline", "accuracy": 76.0}],
            "fmnist": [{"id": "baseline", "category": "baseline", "accuracy": 77.7}]}
    monkeypatch.setattr(zoo, "entries", lambda name, replicates=False: fake[name])
    known = analysis.registry_meta(["baseline", "zoo:fmnist/baseline"])
    assert known.model_id.tolist() == ["zoo:fmnist/baseline"] and known.accuracy.tolist() == [77.7]


@pytest.fixture(scope="module")
def paper_result(tmp_path_factory):
    """analyze on a results.csv in the paper's format, with nothing else (the command line's own tests are below)."""
    folder = tmp_path_factory.mktemp("paper")
    return analysis.analyze(paper_csv(folder / "results.csv"), folder / "out", pdf=False)  # PDFs: `analyzed`


@pytest.fixture(scope="module")
def paper_analysis(paper_result):
    """The folder that analysis wrote."""
    return paper_result["paths"]["model_criticality"].parent


def test_the_papers_results_alone_give_every_figure_of_the_notebook(paper_analysis):
    stats_json = json.loads((paper_analysis / "stats.json").read_text())
    assert stats_json["skipped_figures"] == {} and stats_json["baseline"] == "tv_resnet50"
    assert stats_json["registry"] == ["zoo:paper"]
    for name in ("heatmap", "heatmap_column", "heatmap_std", "heatmap_delta", "accuracy_vs_criticality",
                 "budget_vs_criticality"):
        assert (paper_analysis / f"{name}.png").is_file()
    models = pd.read_csv(paper_analysis / "model_criticality.csv")
    assert models.model_id.tolist() == ["tv_resnet50", "robust_resnet50_l2_eps0", "robust_resnet50_l2_eps3",
                                        "robust_resnet50_linf_eps1.0", "robust_resnet50_linf_eps4.0", "resnet50_swav",
                                        "resnet50_frozen_random", "resnet50.a1_in1k"]



def rows_of(figure) -> list[str]:
    return [t.get_text() for t in next(a for a in figure.axes if a.get_label() == "categories").get_yticklabels()]


def test_the_frozen_random_model_is_left_out_of_the_heatmaps_and_their_margins(paper_result):
    assert paper_result["stats"]["heatmap_excluded"] == ["resnet50_frozen_random"]
    for name in ("heatmap", "heatmap_column", "heatmap_std", "heatmap_delta"):
        rows = rows_of(paper_result["figures"][name])
        assert len(rows) == len(PAPER_IDS) - 1 and not any("Frozen" in r for r in rows)
    margins = next(a for a in paper_result["figures"]["heatmap"].axes if a.get_label() == "heatmap").child_axes
    layers = paper_result["layers"]
    first_layer = layers[(layers.model_id != "resnet50_frozen_random") & (layers.layer == "model.conv1")]
    column = next(m for m in margins if m.get_label() == "column margin").get_xticklabels()[0].get_text()
    assert column == f"{first_layer.criticality_pct.mean():.0f}±{first_layer.criticality_pct.std(ddof=0):.0f}"
    assert "resnet50_frozen_random" in set(paper_result["models"].model_id)  # still in the tables


def test_the_std_heatmap_is_on_a_fixed_0_to_100_scale(paper_result):
    mesh = next(c for a in paper_result["figures"]["heatmap_std"].axes if a.get_label() == "heatmap"
                for c in a.collections if isinstance(c, QuadMesh))
    assert mesh.get_clim() == (0.0, 100.0)


def test_the_heatmaps_come_at_full_page_and_single_column_width(paper_result):
    widths = {name: paper_result["figures"][name].get_figwidth() for name in ("heatmap", "heatmap_column")}
    assert widths == {"heatmap": 7.0, "heatmap_column": 3.3}


def test_the_budget_figure_of_the_papers_results_has_an_l2_and_an_linf_panel(paper_result):
    axes = {a.get_label(): a for a in paper_result["figures"]["budget_vs_criticality"].axes}
    models = paper_result["models"].set_index("model_id")
    linf = axes["budget Linf"].get_lines()[0]
    np.testing.assert_allclose(linf.get_xdata(), [0.0, 1.0, 4.0])  # ε = 0, then 1/255 and 4/255
    np.testing.assert_allclose(linf.get_ydata(), models.loc[["robust_resnet50_l2_eps0", "robust_resnet50_linf_eps1.0",
                                                             "robust_resnet50_linf_eps4.0"], "avg_criticality_pct"])
    np.testing.assert_allclose(axes["budget L2"].get_lines()[0].get_xdata(), [0.0, 3.0])


@pytest.mark.slow  # end to end (two whole analyses / a sweep / a filled disk): CI runs it
def test_cli_analyze_takes_the_notebook_options(tmp_path, capsys):
    path = paper_csv(tmp_path / "results.csv")
    assert main(["analyze", str(path), "--out", str(tmp_path / "out"), "--order", "metadata", "--heatmap-exclude", "",
                 "--no-registry"]) == 0
    saved = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert saved["order"] == "metadata" and saved["heatmap_excluded"] == [] and saved["registry"] == []
    assert "budget_vs_criticality" in saved["skipped_figures"]  # without the registry, nothing knows the budgets
    assert "metadata from the zoo registries" not in capsys.readouterr().out
    assert main(["analyze", str(path), "--out", str(tmp_path / "kept"), "--heatmap-exclude", "freezing,contrastive"]) == 0
    kept = json.loads((tmp_path / "kept" / "stats.json").read_text())
    assert kept["heatmap_excluded"] == ["resnet50_swav", "resnet50_frozen_random"]
    printed = capsys.readouterr().out
    assert "metadata from the zoo registries: zoo:paper" in printed and "left out of the heatmaps: resnet50_swav" in printed


def test_no_pdf_writes_every_figure_as_png_only(tmp_path, capsys):
    path = paper_csv(tmp_path / "results.csv", ids=["tv_resnet50", "robust_resnet50_l2_eps3"])
    assert main(["analyze", str(path), "--out", str(tmp_path / "out"), "--no-pdf"]) == 0
    pngs = sorted(p.stem for p in (tmp_path / "out").glob("*.png"))
    assert "heatmap" in pngs and not list((tmp_path / "out").glob("*.pdf"))
