"""Estimates of expected criticality with intervals: closed-form cases, and the sequential design's coverage
measured by simulation."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from layercrit.measurement.aggregate import Trials, model_table
from layercrit.measurement.estimate import (
    half_width,
    images_per_trial,
    layer_table,
    stein_half_width,
    stein_units,
)
from layercrit.measurement.sequential import SequentialDesign, design_loop


def test_half_width_is_the_student_t_interval_over_trials():
    assert half_width([0.1, 0.2, 0.3]) == pytest.approx(stats.t.ppf(0.975, 2) * 0.1 / math.sqrt(3))
    assert half_width([0.4, 0.4, 0.4]) == 0.0
    assert math.isnan(half_width([0.4]))


def test_half_width_over_k_looks_spends_alpha_over_k_at_each():
    values = [0.1, 0.3, 0.2, 0.25]
    s = np.std(values, ddof=1)
    assert half_width(values, looks=10) == pytest.approx(stats.t.ppf(1 - 0.05 / 20, 3) * s / 2)
    assert half_width(values, looks=10) > half_width(values)


def test_stein_sets_the_number_of_units_from_the_first_stages_spread():
    first = [0.1, 0.3, 0.2, 0.4, 0.5, 0.3, 0.2, 0.1, 0.4, 0.3]
    t, s = stats.t.ppf(0.975, 9), np.std(first, ddof=1)
    assert stein_units(first, 0.03) == math.ceil((t * s / 0.03) ** 2)  # 53
    assert stein_units(first, 0.5) == 10  # never fewer than the first stage
    assert stein_units([0.3] * 10, 0.03) == 10


def test_steins_interval_uses_the_first_stages_spread_over_all_units():
    units = [0.1, 0.3, 0.2, 0.4, 0.5, 0.3, 0.2, 0.1, 0.4, 0.3, 0.9, 0.9, 0.9, 0.9]
    t, s = stats.t.ppf(0.975, 9), np.std(units[:10], ddof=1)
    assert stein_half_width(units, 10) == pytest.approx(t * s / math.sqrt(14))
    # a cap that came before the first stage's end: the t-interval over the units there are
    assert stein_half_width(units[:6], 10) == pytest.approx(half_width(units[:6]))


def test_images_per_trial_is_cochrans_optimum_pooled_over_layers():
    # σ_w² = 0.09, σ_b² = 0.0225 (the pilot's raw variance adds σ_w²/256), overhead 64: m* = sqrt(64·0.09/0.0225) = 16
    m = images_per_trial([0.09], [0.0225 + 0.09 / 256], pilot_images=256, overhead=64, lowest=1, highest=10_000)
    assert m == 16
    # no spread over resets: as many images per trial as allowed; bounds are respected
    assert images_per_trial([0.09], [0.09 / 256], pilot_images=256, overhead=64, lowest=1, highest=500) == 500
    assert images_per_trial([0.09], [1.0], pilot_images=256, overhead=64, lowest=8, highest=500) == 8


def _rows(criticality, *, layer="conv1", computed=None, n_images=100, **extra):
    trials = range(len(criticality))
    computed = computed if computed is not None else list(trials)
    return pd.DataFrame({"model_id": "m", "reset": "r", "layer": layer, "trial": list(trials),
                         "computed_in_trial": computed, "criticality": criticality, "n_images": n_images, **extra})


def test_layer_table_reports_mean_interval_draws_and_images_spent():
    rows = pd.concat([_rows([0.1, 0.2, 0.3]), _rows([0.5, 0.5, 0.5], layer="fc", computed=[0, 0, 0])])
    table = layer_table(rows).set_index("layer")
    assert table.loc["conv1", "criticality"] == pytest.approx(0.2)
    assert table.loc["conv1", "criticality_ci"] == pytest.approx(stats.t.ppf(0.975, 2) * 0.1 / math.sqrt(3))
    assert table.loc["conv1", "trials"] == 3 and table.loc["conv1", "images"] == 300
    # a deterministic reset computed once: one draw, no spread over resets, 100 images spent
    assert table.loc["fc", "criticality_ci"] == 0 and table.loc["fc", "trials"] == 1
    assert table.loc["fc", "images"] == 100
    assert list(table.index) == ["conv1", "fc"]


def test_a_mirrored_pair_is_one_unit_of_the_sequential_interval_and_the_pilot_is_left_out():
    # trial 0 and 1 are the pilot; then trials 2/3 and 4/5 are draws and their mirrors, 6 and 7 single draws; the
    # first stage is 3 units
    rows = _rows([0.9, 0.9, 0.2, 0.6, 0.5, 0.3, 0.1, 0.7], mirror_of=[None, 0, None, 2, None, 4, None, None],
                 pilot=[True, True] + [False] * 6, first_stage=3, target_ci=0.1)
    units = [0.4, 0.4, 0.1, 0.7]
    table = layer_table(rows)
    assert table.criticality.item() == pytest.approx(np.mean(units))
    t, s = stats.t.ppf(0.975, 2), np.std(units[:3], ddof=1)
    assert table.criticality_ci.item() == pytest.approx(t * s / math.sqrt(4))
    assert table.trials.item() == 8  # evaluations, the pilot's and the mirrors included


def test_results_of_the_earlier_sequential_rule_get_their_own_bonferroni_interval():
    rows = _rows([0.1, 0.3, 0.2, 0.25], ci_looks=10, target_ci=0.03)
    assert layer_table(rows).criticality_ci.item() == pytest.approx(half_width([0.1, 0.3, 0.2, 0.25], looks=10))


def test_model_table_pairs_trials_in_the_fixed_design():
    rows = pd.concat([_rows([0.1, 0.2, 0.3]), _rows([0.3, 0.4, 0.5], layer="fc")])
    table = model_table(rows)
    assert table.criticality.item() == pytest.approx(0.3)
    per_trial = [0.2, 0.3, 0.4]  # the two layers' average at each trial
    assert table.criticality_ci.item() == pytest.approx(half_width(per_trial))


# Reset distributions of the shapes measured on the Fashion-MNIST zoo's layers (per layer over resets: spread 0.03
# to 0.23, skewness -1.8 to +1.8), each an inverse CDF of a uniform.
SHAPES = {
    "narrow": lambda u: 0.68 + 0.2 * stats.beta.ppf(u, 5, 3),
    "uniform": lambda u: 0.1 + 0.8 * u,
    "skewed left": lambda u: 0.9 * stats.beta.ppf(u, 6, 1.2),
    "skewed right": lambda u: 0.8 * stats.beta.ppf(u, 1.2, 6),
    "very skewed left": lambda u: np.clip(0.95 + 0.13 * np.log(u), 0.02, 1.0),
    "very skewed right": lambda u: np.clip(0.05 - 0.13 * np.log(1 - u), 0.0, 0.98),
}
# Correlations of the criticalities of W and -W measured on the baseline (40 pairs on 500 images): -0.66
# (layer3.0.downsample.0), -0.48 (layer2.0.downsample.0), -0.32 (layer2.0.conv1), +0.37 (conv1); and none.
PAIR_CORRELATIONS = (-0.66, -0.48, -0.32, 0.0, 0.37)


def _distributions(pairs: int = 2_000, seed: int = 0) -> pd.DataFrame:
    """One model's layers: every shape at every pair correlation, ``pairs`` draws each with its mirror (a Gaussian
    copula: the two halves have the same distribution, as W and -W do), per-image spread 0.25."""
    rng = np.random.default_rng(seed)
    rows = []
    for shape, inverse in SHAPES.items():
        for rho in PAIR_CORRELATIONS:
            z = rng.multivariate_normal([0, 0], [[1, rho], [rho, 1]], size=pairs)
            drawn, mirrored = inverse(stats.norm.cdf(z[:, 0])), inverse(stats.norm.cdf(z[:, 1]))
            rows.append(pd.DataFrame({"model_id": "sim", "layer": f"{shape}, rho {rho:+.2f}", "shape": shape,
                                      "rho": rho, "criticality": drawn, "mirrored": mirrored, "sd_within": 0.25}))
    return pd.concat(rows, ignore_index=True)


class _Population:
    """Layers whose reset distributions are given as draws and their mirrors (``criticality``, ``mirrored``), so
    their expected criticality is known: the mean over all of them.

    A simulated trial draws one of them (or, mirrored, the other half of the pair the trial before drew) and adds
    the image sampling error of its block: normal with the layer's per-image spread ``sd_within`` over
    sqrt(block).
    """

    def __init__(self, table: pd.DataFrame, seed: int, trials: int = 100):
        self.layers, self.truths = {}, {}
        for index, (layer, rows) in enumerate(table.groupby("layer", sort=False)):
            values = np.stack([rows.criticality.to_numpy(), rows.mirrored.to_numpy()])  # [W or -W, draw]
            rng = np.random.default_rng([seed, index])
            # each trial's draw (a pair and which half) and its block's standard normal image error, in advance
            pair, half = rng.integers(values.shape[1], size=trials), rng.integers(2, size=trials)
            within = float(np.sqrt(np.mean(rows.sd_within ** 2)))
            self.layers[layer] = (values, pair, half, rng.standard_normal(trials), within)
            self.truths[layer] = float(values.mean())

    def truth(self, layer: str) -> float:
        return self.truths[layer]

    def evaluate(self, layers, trial, offset, positions, mirrored=frozenset()):
        rows = []
        for layer in layers:
            values, pair, half, noise, within = self.layers[layer]
            drawn = trial - 1 if layer in mirrored else trial  # a mirror: the other half of the trial before's pair
            theta = values[half[drawn] ^ (layer in mirrored), pair[drawn]]
            rows.append({"layer": layer, "trial": trial, "computed_in_trial": trial,
                         "criticality": theta + noise[trial] * within / math.sqrt(len(positions)),
                         "criticality_sd": within, "n_images": len(positions)})
        return rows


@pytest.fixture(scope="module")
def distributions() -> pd.DataFrame:
    table = _distributions()
    both = table.melt(id_vars=["model_id", "layer"], value_vars=["criticality", "mirrored"])
    shape = both.groupby(["model_id", "layer"]).value.agg(["std", "skew"]).reset_index()
    return table.merge(shape, on=["model_id", "layer"])


def _simulate(distributions: pd.DataFrame, repeats: int, **options) -> pd.DataFrame:
    """Each model's layers through the design ``repeats`` times (one run of a model: its layers together, so that
    Cochran's rule pools them as in a real run); one row per (repeat, model, layer) with the layer table's columns,
    the truth and whether the interval covered it."""
    tables = []
    for model, layers in distributions.groupby("model_id", sort=False):
        for repeat in range(repeats):
            population = _Population(layers, seed=repeat)
            design = SequentialDesign(0.03, **options)
            rows = pd.DataFrame(design_loop(design, list(population.layers), 10_000, population.evaluate,
                                            list(population.layers)))
            tables.append(rows.assign(model_id=model, repeat=repeat,
                                      truth=rows.layer.map(population.truth)))
    rows = pd.concat(tables, ignore_index=True)
    table = layer_table(rows, ["model_id", "repeat"])
    truth = rows.groupby(["model_id", "repeat", "layer"]).truth.first()
    table = table.join(truth, on=["model_id", "repeat", "layer"])
    table["covered"] = (table.criticality - table.truth).abs() <= table.criticality_ci
    return table.merge(distributions.groupby(["model_id", "layer"])[["std", "skew"]].first().reset_index(),
                       on=["model_id", "layer"])


@pytest.fixture(scope="module")
def simulated(distributions) -> pd.DataFrame:
    return _simulate(distributions, repeats=REPEATS)


REPEATS = 60  # 60 runs of the 30 layers: 1,800 simulated layers, 1,200 of them skewed


@pytest.mark.slow
def test_sequential_design_covers_the_expected_criticality_at_95_percent_and_not_more(simulated):
    """Coverage of Stein's interval on reset distributions of the zoo's shapes, mirrored pairs included, against
    the truth, from both sides: within [94%, 97.5%] overall, and on the skewed layers (|skewness| > 0.5) within
    that band widened by one binomial standard error of the estimate (0.65 points at 1,200 layers)."""
    assert 0.94 <= simulated.covered.mean() <= 0.975
    skewed = simulated[simulated["skew"].abs() > 0.5]
    se = math.sqrt(0.95 * 0.05 / len(skewed))
    assert len(skewed) == 1_200
    assert 0.94 - se <= skewed.covered.mean() <= 0.975 + se
    # every layer reached ±0.03 or says it hit the cap
    assert ((simulated.criticality_ci <= 0.03 + 1e-12) | simulated.capped).all()


@pytest.mark.slow
def test_mirrored_pairs_settle_layers_single_draws_leave_capped(distributions, simulated):
    single = _simulate(distributions, repeats=REPEATS, mirror=False)
    mirrored, alone = (table[table.layer.str.contains("rho -0.66|rho -0.48")]  # strongly anticorrelated mirrors
                       for table in (simulated, single))
    assert mirrored.capped.sum() < 0.7 * alone.capped.sum()
    assert mirrored.images.sum() < alone.images.sum()
    assert 0.94 <= single.covered.mean() <= 0.975  # Stein's interval holds with single draws too


@pytest.mark.slow
def test_the_papers_three_trial_interval_undercovers_on_skewed_layers(distributions):
    """The paper's design: 3 draws, its t-interval over them (t = 4.30). Measured here on the same distributions,
    without image error (its 10,000 images are fixed): below 95% on the skewed layers, as on the zoo's (92.9%)."""
    rng = np.random.default_rng(0)
    covered = []
    for _, rows in distributions.groupby(["model_id", "layer"]):
        values = np.concatenate([rows.criticality, rows.mirrored])
        truth = values.mean()
        draws = values[rng.integers(len(values), size=(2_000, 3))]
        width = stats.t.ppf(0.975, 2) * draws.std(axis=1, ddof=1) / math.sqrt(3)
        covered.append({"skewed": abs(rows["skew"].iloc[0]) > 0.5,
                        "covered": float((np.abs(draws.mean(axis=1) - truth) <= width).mean())})
    covered = pd.DataFrame(covered).groupby("skewed").covered.mean()
    assert covered[True] < 0.94 and covered[True] < covered[False]


def test_an_aggregate_of_one_sequential_layer_uses_the_units_of_its_own_interval():
    # the pilot left out and each mirrored pair one trial, as in the layer's own estimate; otherwise the aggregate
    # would count the pilot's draws and treat a draw and its mirror as independent
    values = [0.9, 0.9, 0.2, 0.6, 0.5, 0.3, 0.1, 0.7]
    rows = _rows(values, mirror_of=[None, 0, None, 2, None, 4, None, None], pilot=[True, True] + [False] * 6,
                 first_stage=3, target_ci=0.1, seed=0, image_offset=[100 * t for t in range(8)])
    units = [0.4, 0.4, 0.1, 0.7]
    estimate = Trials(rows).estimate({("m", "conv1"): 1.0})
    assert estimate.value == pytest.approx(layer_table(rows).criticality.item())
    assert estimate.half_width == pytest.approx(half_width(units))
    assert estimate.df == pytest.approx(len(units) - 1)
