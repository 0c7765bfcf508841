"""Training seeds as a variance component (layercrit.analysis.variance), on simulated data with known components."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from layercrit.analysis import variance
from layercrit.analysis.contrasts import aggregate_table
from layercrit.analysis.per_layer import stage_of
from layercrit.errors import LayercritError
from layercrit.seeds import method_and_seed

LAYERS = ("model.layer1.0.conv1", "model.layer1.0.conv2", "model.fc")
TRUE_SD = {"method": 4.0, "seed": 2.0, "reset": 3.0, "image": 20.0}  # points


def simulate(rng: np.random.Generator, *, methods: int, seeds: int, trials: int, images: int,
             effects: np.ndarray | None = None, sd: dict[str, float] = TRUE_SD, shared: float = 0.0,
             layers: tuple[str, ...] = LAYERS) -> pd.DataFrame:
    """Trial rows as the engine writes them: each trial's criticality is the mean over its own ``images`` images
    (per-image SD ``sd["image"]``, reported as ``criticality_sd``) of a reset drawn around its seed's value.
    ``shared``: the SD of a part of each trial's measurement error that every model shares at that trial and layer
    (paired measurement: the same images and reset draws for every model, as in the zoo's findings)."""
    effects = np.zeros(methods) if effects is None else effects
    m, s, layer, t = (a.ravel() for a in np.meshgrid(np.arange(methods), np.arange(seeds), np.arange(len(layers)),
                                                     np.arange(trials), indexing="ij"))
    seed_effect = rng.normal(0.0, sd["seed"], (methods, seeds, len(layers)))[m, s, layer]
    value = (30.0 + effects[m] + seed_effect + rng.normal(0.0, sd["reset"], len(m))
             + rng.normal(0.0, sd["image"] / np.sqrt(images), len(m)))
    if shared:
        value += rng.normal(0.0, shared, (len(layers), trials))[layer, t]
    return pd.DataFrame({"model_id": [f"m{a}" if b == 0 else f"m{a}@seed{b}" for a, b in zip(m, s, strict=True)],
                         "layer": np.array(layers)[layer], "trial": t, "criticality_pct": value,
                         "criticality_sd": sd["image"] / 100.0, "n_images": images})


def spread_effects(methods: int, sd: float) -> np.ndarray:
    """Fixed method effects whose variance over methods (ddof=1) is exactly ``sd²``."""
    effects = np.linspace(-1.0, 1.0, methods)
    return effects / effects.std(ddof=1) * sd


def test_a_seed_suffix_names_the_method_and_the_training_seed():
    assert method_and_seed("baseline@seed2") == ("baseline", 2)
    assert method_and_seed("zoo:fmnist/pgd_linf_8@seed1") == ("zoo:fmnist/pgd_linf_8", 1)
    assert method_and_seed("baseline") == ("baseline", 0)
    assert method_and_seed("my@seedling") == ("my@seedling", 0)
    assert variance.has_seeds(["baseline", "baseline@seed1", "improved"])
    assert not variance.has_seeds(["baseline", "improved", "baseline"])


def test_a_layer_belongs_to_its_first_name_part():
    assert [variance.stage_of(name) for name in LAYERS] == ["layer1", "layer1", "fc"]


@pytest.fixture(scope="module")
def large_design():
    rows = simulate(np.random.default_rng(7), methods=20, seeds=20, trials=10, images=50,
                    effects=spread_effects(20, TRUE_SD["method"]))
    units = variance.model_units(rows)
    return units, variance.variance_components(units, bootstrap=200)


@pytest.mark.parametrize("component", variance.COMPONENTS)
def test_every_component_is_recovered_within_ten_percent_in_a_large_design(large_design, component):
    _, table = large_design
    layers = table[(table.level == "layer") & (table.component == component)]
    assert len(layers) == len(LAYERS)
    assert np.allclose(layers.sd_pct, TRUE_SD[component], rtol=0.10), layers.sd_pct.tolist()


def test_a_stage_decomposes_the_mean_of_its_layers(large_design):
    _, table = large_design
    stage = table[(table.level == "stage") & (table.unit == "layer1")].set_index("component")
    # the two layers' seed effects are independent, so the stage mean's seed SD is 2/√2; the method effect is
    # shared by both layers; reset and image are the layers' own
    assert stage.loc["seed", "sd_pct"] == pytest.approx(TRUE_SD["seed"] / np.sqrt(2), rel=0.12)
    assert stage.loc["method", "sd_pct"] == pytest.approx(TRUE_SD["method"], rel=0.10)
    assert stage.loc["reset", "sd_pct"] == pytest.approx(TRUE_SD["reset"], rel=0.10)
    assert stage.loc["image", "sd_pct"] == pytest.approx(TRUE_SD["image"], rel=1e-9)
    assert stage[["share"]].sum().item() == pytest.approx(1.0)


def test_bootstrap_intervals_hold_the_estimate_and_are_narrow_with_many_seeds(large_design):
    _, table = large_design
    seed = table[table.component == "seed"]
    assert (seed.sd_low_pct <= seed.sd_pct).all() and (seed.sd_pct <= seed.sd_high_pct).all()
    assert ((seed.sd_high_pct - seed.sd_low_pct) < 0.5).all()


def test_the_seed_interval_with_three_seeds_reaches_well_above_its_estimate():
    # 4 methods x 3 seeds: 8 degrees of freedom, so the chi-square upper end of an SD is ~1.9x the estimate (a
    # bootstrap over seeds put it at the estimate: its resamples repeat seeds and only shrink the spread)
    units = variance.model_units(simulate(np.random.default_rng(2), methods=4, seeds=3, trials=40, images=50))
    seed = variance.variance_components(units, bootstrap=0).query("component == 'seed' and sd_pct > 0")
    assert len(seed) >= 3
    assert (seed.sd_high_pct >= 1.6 * seed.sd_pct).all(), seed[["sd_low_pct", "sd_pct", "sd_high_pct"]]
    assert (seed.sd_low_pct <= 0.8 * seed.sd_pct).all() and (seed.sd_low_pct > 0).all()


def test_seeds_measured_on_the_same_images_and_draws_keep_their_seed_component():
    # a shared measurement error (SD 6 per trial, 10 trials: variance 3.6 in every model's mean) moves all seeds
    # together and adds nothing to their spread; subtracting each mean's full sampling variance would leave
    # 4 - 3.6 of the seed variance 4
    rows = simulate(np.random.default_rng(8), methods=20, seeds=20, trials=10, images=50, shared=6.0,
                    effects=spread_effects(20, TRUE_SD["method"]))
    units = variance.model_units(rows)
    table = variance.variance_components(units, bootstrap=0)
    seed = table[(table.level == "layer") & (table.component == "seed")]
    assert np.allclose(seed.sd_pct, TRUE_SD["seed"], rtol=0.10), seed.sd_pct.tolist()
    by_method = units[units.level == "layer"].groupby(["unit", "method"])
    full = (by_method["mean"].var() - by_method["noise_var"].mean()).mean()  # each mean's full sampling variance
    assert full < 0.25 * TRUE_SD["seed"] ** 2, "subtracting the shared part as well removes most of the seed part"


def test_the_mean_over_layers_and_the_depth_shift_are_the_reported_aggregates():
    layers = ("model.conv1", "model.layer1.0.conv1", "model.layer2.0.conv1", "model.fc")
    rows = simulate(np.random.default_rng(4), methods=2, seeds=2, trials=5, images=50, layers=layers)
    units = variance.model_units(rows).set_index(["level", "unit", "model_id"])
    reported = aggregate_table(rows.assign(criticality=rows.criticality_pct / 100),
                               {layer: stage_of(layer) for layer in layers}).set_index(["aggregate", "model_id"])
    for aggregate in ("all layers", "depth shift"):
        for model_id in rows.model_id.unique():
            unit = units.loc[("aggregate", aggregate, model_id)]
            assert unit["mean"] == pytest.approx(reported.loc[(aggregate, model_id), "criticality_pct"], rel=1e-12)
            half = reported.loc[(aggregate, model_id), "criticality_ci_pct"]
            df = len(rows.trial.unique()) - 1  # every layer has the same trials
            assert np.sqrt(unit["noise_var"]) * stats.t.ppf(0.975, df) == pytest.approx(half, rel=1e-9)
    shift = units.loc[("aggregate", "depth shift", "m0"), "mean"]
    stage = units.xs("stage", level="level")["mean"]
    assert shift == pytest.approx(stage[("layer2", "m0")] - (stage[("conv1", "m0")] + stage[("layer1", "m0")]) / 2)


@pytest.mark.slow
@pytest.mark.parametrize("shared", [0.0, 4.0], ids=["independent", "paired"])
def test_the_seed_interval_covers_at_the_nominal_level_with_three_seeds(shared):
    rng = np.random.default_rng(5)
    effects = spread_effects(4, TRUE_SD["method"])
    low_misses = high_misses = total = 0
    for _ in range(300):
        units = variance.model_units(simulate(rng, methods=4, seeds=3, trials=4, images=50, effects=effects,
                                              shared=shared))
        table = variance.variance_components(units, bootstrap=0)
        seed = table[(table.level == "layer") & (table.component == "seed")]
        low_misses += int((seed.sd_low_pct > TRUE_SD["seed"]).sum())
        high_misses += int((seed.sd_high_pct < TRUE_SD["seed"]).sum())
        total += len(seed)
    coverage = 1 - (low_misses + high_misses) / total
    assert 0.93 <= coverage <= 0.97, coverage  # 900 intervals: 94.3% measured (93.6% paired); +- 2.2 SE of 95%
    assert low_misses >= 0.01 * total and high_misses >= 0.01 * total, "misses on both sides, not one"


@pytest.mark.slow
def test_seed_and_method_variances_are_unbiased_with_three_seeds():
    rng = np.random.default_rng(3)
    effects = spread_effects(4, TRUE_SD["method"])
    estimates = {"method": [], "seed": []}
    for _ in range(150):
        units = variance.model_units(simulate(rng, methods=4, seeds=3, trials=4, images=50, effects=effects))
        point = variance._Arrays(units).components()  # the unclipped moment estimates
        for name in estimates:
            estimates[name].append(point[name][0])
    for name, values in estimates.items():
        assert np.mean(values) == pytest.approx(TRUE_SD[name] ** 2, rel=0.10), name


@pytest.mark.slow
def test_method_effect_interval_covers_at_the_nominal_level_counting_seed_variance():
    rng = np.random.default_rng(11)
    effects = np.array([0.0, 3.0, -2.0])
    covered, welch_covered, total = 0, 0, 0
    for _ in range(400):
        units = variance.model_units(simulate(rng, methods=3, seeds=3, trials=3, images=50, effects=effects))
        table = variance.method_effects(units, "m0")
        layers = table[table.level == "layer"]
        truth = layers.method.map({"m1": 3.0, "m2": -2.0})
        covered += int(((layers.low_pct <= truth) & (truth <= layers.high_pct)).sum())
        welch_covered += int(((layers.effect_pct - truth).abs() <= layers.welch_ci_pct).sum())
        total += len(layers)
    assert 0.93 <= covered / total <= 0.97  # 2400 intervals: ± 3 standard errors of a 95% coverage
    # Welch's interval does not pool, so with 2 x 3 seeds it is a little conservative (96.5% measured here); the
    # band is ± 3 standard errors around 96.5%, which excludes both 95% and 98.5%.
    assert 0.953 <= welch_covered / total <= 0.977


def test_the_welch_interval_is_scipys_from_each_methods_own_seeds():
    units = variance.model_units(simulate(np.random.default_rng(1), methods=2, seeds=3, trials=3, images=50,
                                          effects=np.array([0.0, 1.0])))
    table = variance.method_effects(units, "m0")
    for row in table.itertuples():
        unit = units[(units.level == row.level) & (units.unit == row.unit)]
        result = stats.ttest_ind(unit[unit.method == "m1"]["mean"], unit[unit.method == "m0"]["mean"], equal_var=False)
        interval = result.confidence_interval()
        assert row.welch_ci_pct == pytest.approx((interval.high - interval.low) / 2, rel=1e-9)
        assert row.welch_df == pytest.approx(result.df, rel=1e-9)


def test_a_method_with_one_seed_borrows_the_pooled_seed_variance():
    rows = simulate(np.random.default_rng(5), methods=3, seeds=3, trials=3, images=50)
    rows = rows[~rows.model_id.str.startswith("m2@")]
    table = variance.method_effects(variance.model_units(rows), "m0").set_index(["unit", "method"])
    one, three = table.loc[("model.fc", "m2")], table.loc[("model.fc", "m1")]
    assert one.seeds == 1 and three.seeds == 3 and one.df == three.df == 4
    assert one.ci_pct / three.ci_pct == pytest.approx(np.sqrt((1 + 1 / 3) / (2 / 3)))
    assert one.effect_over_seed_sd == pytest.approx(one.effect_pct / one.seed_sd_pct)
    assert np.isnan(one.welch_ci_pct) and three.welch_ci_pct > 0, "Welch needs two or more seeds on each side"


def test_effects_need_a_measured_baseline():
    units = variance.model_units(simulate(np.random.default_rng(0), methods=2, seeds=2, trials=2, images=10))
    with pytest.raises(LayercritError, match="baseline 'nope' is not among the measured methods"):
        variance.method_effects(units, "nope")
    assert set(variance.method_effects(units, "m0@seed1").method) == {"m1"}


def test_a_deterministic_reset_counts_once_and_has_no_reset_variance():
    rows = pd.DataFrame({"model_id": ["a"] * 3 + ["a@seed1"] * 3, "layer": ["fc"] * 6, "trial": [0, 1, 2] * 2,
                         "computed_in_trial": [0, 0, 0] * 2, "criticality_pct": [10.0] * 3 + [14.0] * 3})
    units = variance.model_units(rows)
    assert units.trials.tolist() == [1] * 6  # fc as a layer, as a stage and as the mean of all layers, per model
    assert (units.noise_var == 0).all() and (units.deviation_var == 0).all()
    table = variance.variance_components(units, bootstrap=0).set_index(["level", "component"])
    assert table.loc[("layer", "seed"), "variance_pct2"] == pytest.approx(8.0)  # var(10, 14) with ddof 1


def as_results(rows: pd.DataFrame) -> pd.DataFrame:
    """Simulated trial rows in layercrit's results format."""
    return rows.assign(pred_cos_sim=1.0 - rows.criticality_pct / 100.0, reset="rerandomize").drop(
        columns="criticality_pct")


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory):
    from layercrit.analysis.tables import analyze

    rows = simulate(np.random.default_rng(2), methods=3, seeds=3, trials=3, images=100,
                    effects=np.array([0.0, 8.0, -1.0]))
    out = tmp_path_factory.mktemp("seeds")
    meta = pd.DataFrame({"model_id": rows.model_id.unique()}).assign(
        category=lambda f: np.where(f.model_id.str.startswith("m0"), "baseline", "other"))
    return rows, out, analyze(as_results(rows), out, meta=meta, pdf=False)


def test_analyze_writes_the_seed_tables_and_figure_when_a_method_has_seeds(analyzed):
    rows, out, result = analyzed
    components = pd.read_csv(out / "variance_components.csv")
    effects = pd.read_csv(out / "method_effects.csv")
    assert result["paths"]["variance_components"] == (out / "variance_components.png",)  # pdf=False: PNG only
    assert (out / "variance_components.png").is_file()
    assert set(components.component) == set(variance.COMPONENTS)
    assert set(components.unit) == {*LAYERS, "layer1", "fc", "all layers"}  # no depth shift: one numbered stage
    assert set(effects.method) == {"m1", "m2"} and (effects.seeds == 3).all()
    expected = variance.seed_analysis(rows, "m0")
    pd.testing.assert_frame_equal(result["method_effects"], expected["method_effects"])
    m1 = effects[(effects.level == "stage") & (effects.method == "m1")]
    assert (m1.verdict == "higher").all(), "an effect of 8 points against a seed SD of 2 is told apart"
    assert result["stats"]["baseline"] == "m0", "the seed-0 model of the one method whose seeds are all baselines"
    assert result["stats"]["seed_replicates"] == sorted(m for m in rows.model_id.unique() if "@seed" in m)
    assert "Method effects against the baseline" in (out / "report.html").read_text()


def test_analyze_writes_no_seed_tables_without_replicates(tmp_path):
    from layercrit.analysis.tables import analyze

    rows = simulate(np.random.default_rng(2), methods=2, seeds=1, trials=3, images=100)
    result = analyze(as_results(rows), tmp_path, pdf=False)
    assert "variance_components" not in result and not (tmp_path / "variance_components.csv").exists()
