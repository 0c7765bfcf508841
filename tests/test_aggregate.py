"""Aggregates over layers (stage and model means, depth shifts, differences) with intervals from the trial-level
rows: closed-form cases, how rows are paired, and coverage and width measured by simulation."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from layercrit.errors import LayercritError
from layercrit.measurement.aggregate import Trials, combine, contrast, mean_weights, model_table
from layercrit.measurement.estimate import half_width, layer_table

T_2 = stats.t.ppf(0.975, 2)


def trial_rows(model_id, layer, values, *, first_trial=0, **columns):
    trials = range(first_trial, first_trial + len(values))
    return pd.DataFrame({"model_id": model_id, "layer": layer, "trial": list(trials), "computed_in_trial": list(trials),
                         "criticality": values, **columns})


def test_a_stage_mean_of_layers_sharing_their_trials_is_the_t_interval_of_the_per_trial_means():
    rows = pd.concat([trial_rows("m", "a", [0.1, 0.2, 0.3]), trial_rows("m", "b", [0.3, 0.5, 0.4])])
    result = Trials(rows).estimate({("m", "a"): 0.5, ("m", "b"): 0.5})
    per_trial = np.array([0.2, 0.35, 0.35])  # s = sqrt(0.0075), n = 3
    assert result.value == pytest.approx(0.3)
    assert result.half_width == pytest.approx(T_2 * math.sqrt(0.0075 / 3))
    assert result.half_width == pytest.approx(half_width(per_trial))
    assert result.df == pytest.approx(2) and result.paired
    # a depth shift of the same two layers: b - a per trial is 0.2, 0.3, 0.1
    shift = Trials(rows).estimate({("m", "b"): 1, ("m", "a"): -1})
    assert shift.value == pytest.approx(0.2) and shift.half_width == pytest.approx(T_2 * 0.1 / math.sqrt(3))


def test_one_layer_alone_gets_its_own_t_interval():
    rows = trial_rows("m", "a", [0.1, 0.2, 0.3, 0.25])
    result = Trials(rows).estimate({("m", "a"): 1})
    assert result.half_width == pytest.approx(layer_table(rows).criticality_ci.item())
    assert not result.paired


def test_units_that_share_no_trial_get_welchs_interval():
    # A: 3 trials on its own draws and images, B: 4 others (different image offsets)
    a = trial_rows("A", "conv1", [0.1, 0.2, 0.3], image_offset=[0, 10, 20])
    b = trial_rows("B", "conv1", [0.3, 0.5, 0.4, 0.45], image_offset=[5, 15, 25, 35])
    result = Trials(pd.concat([a, b])).estimate({("B", "conv1"): 1, ("A", "conv1"): -1})
    va, vb = 0.01 / 3, np.var([0.3, 0.5, 0.4, 0.45], ddof=1) / 4
    welch_df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 3)
    assert result.value == pytest.approx(0.2125)
    assert result.df == pytest.approx(welch_df)
    assert result.half_width == pytest.approx(stats.t.ppf(0.975, welch_df) * math.sqrt(va + vb))
    assert not result.paired


def test_rows_pair_when_they_share_draw_and_images_and_not_otherwise():
    a = trial_rows("A", "conv1", [0.50, 0.70, 0.60, 0.80], seed=0, image_offset=0, n_images=100)
    b = a.assign(model_id="B", criticality=a.criticality + [0.011, 0.009, 0.010, 0.010])  # B = A + 0.01, ±0.001
    paired = Trials(pd.concat([a, b])).estimate({("B", "conv1"): 1, ("A", "conv1"): -1})
    assert paired.paired and paired.value == pytest.approx(0.01)
    assert paired.half_width == pytest.approx(half_width([0.011, 0.009, 0.010, 0.010]))
    assert paired.excludes_zero
    other_seed = Trials(pd.concat([a, b.assign(seed=1)])).estimate({("B", "conv1"): 1, ("A", "conv1"): -1})
    assert not other_seed.paired and not other_seed.excludes_zero
    assert other_seed.half_width > 50 * paired.half_width


def test_a_deterministic_reset_is_a_constant_in_an_aggregate():
    zero = trial_rows("m", "fc", [0.4, 0.4, 0.4]).assign(computed_in_trial=0)
    random = trial_rows("m", "conv1", [0.1, 0.2, 0.3])
    result = Trials(pd.concat([random, zero])).estimate({("m", "conv1"): 0.5, ("m", "fc"): 0.5})
    assert result.value == pytest.approx(0.3)
    assert result.half_width == pytest.approx(0.5 * T_2 * 0.1 / math.sqrt(3))


def test_intervals_are_clipped_to_the_range_of_the_aggregate():
    rows = trial_rows("m", "a", [0.1, 0.95])  # two trials: t(0.975, 1) = 12.7, a half-width of 5.4
    layer = layer_table(rows).iloc[0]
    assert layer.criticality_ci > 1 and (layer.criticality_low, layer.criticality_high) == (0.0, 1.0)
    pair = pd.concat([rows, trial_rows("m", "b", [0.5, 0.6])])
    shift = Trials(pair).estimate({("m", "b"): 1, ("m", "a"): -1})
    assert (shift.low, shift.high) == (-1.0, 1.0)  # a difference of two criticalities lies in [-1, 1]
    mean = Trials(pair).estimate(mean_weights([("m", "a"), ("m", "b")]))
    assert (mean.low, mean.high) == (0.0, 1.0)


def test_the_model_table_is_the_mean_over_layers_paired_over_trials():
    rows = pd.concat([trial_rows("m", "conv1", [0.1, 0.2, 0.3]), trial_rows("m", "fc", [0.3, 0.4, 0.5])])
    table = model_table(rows)
    assert table.criticality.item() == pytest.approx(0.3)
    assert table.criticality_ci.item() == pytest.approx(half_width([0.2, 0.3, 0.4]))


def test_a_unit_with_two_rows_of_one_trial_is_an_error():
    rows = trial_rows("m", "a", [0.1, 0.2])
    with pytest.raises(LayercritError, match="pass each run's results once"):
        Trials(pd.concat([rows, rows]))


def test_combine_adds_weighted_contrasts():
    early, deep = mean_weights(["a", "b"]), mean_weights(["c"])
    assert combine((1, deep), (-1, early)) == {"c": 1.0, "a": -0.5, "b": -0.5}
    assert combine((1, early), (-1, early)) == {}


# ---------------------------------------------------------------- coverage and width by simulation

# Reset distributions of the shapes measured on the Fashion-MNIST baseline's layers (tests/test_estimate.py).
KINDS = {
    "narrow": (lambda r, n: 0.68 + 0.2 * r.beta(5, 3, n), 0.68 + 0.2 * 5 / 8),
    "left-skewed": (lambda r, n: 0.9 * r.beta(4, 1.5, n), 0.9 * 4 / 5.5),
    "right-skewed": (lambda r, n: 0.8 * r.beta(1.5, 4, n), 0.8 * 1.5 / 5.5),
    "uniform": (lambda r, n: r.uniform(0.1, 0.9, n), 0.5),
    "rare outliers": (lambda r, n: np.where(r.random(n) < 0.03, 0.5, 0.91), 0.03 * 0.5 + 0.97 * 0.91),
}


def normal_layers(rng, keys, layers, *, rho=0.3, sd=0.1, pilot_sd=None):
    """Correlated normal trial means (ρ between layers at a shared key: the images they share); the first 3 keys
    (the sequential design's pilot, on larger blocks) optionally with a smaller spread."""
    mean = np.linspace(0.2, 0.8, layers)
    shared = rng.normal(size=(keys, 1))
    noise = math.sqrt(rho) * shared + math.sqrt(1 - rho) * rng.normal(size=(keys, layers))
    scale = np.full((keys, 1), sd)
    if pilot_sd is not None:
        scale[:3] = pilot_sd
    return mean + scale * noise, mean


def skewed_layers(rng, keys, kinds):
    """Layers of the zoo's shapes, with a shared image-block effect (sd 0.02) at each key."""
    values = np.column_stack([KINDS[kind][0](rng, keys) for kind in kinds]) + 0.02 * rng.normal(size=(keys, 1))
    return values, np.array([KINDS[kind][1] for kind in kinds])


def two_runs(rng, keys, *, paired):
    """One layer measured twice (fp32 and bf16, say): B = A + 0.01 + a small perturbation on shared keys; unpaired,
    B's trials are other draws on other images, and B has 40 of them against A's 10."""
    a = 0.5 + 0.15 * rng.normal(size=keys)
    if paired:
        return np.column_stack([a, a + 0.01 + 0.005 * rng.normal(size=keys)]), np.array([0.5, 0.51])
    values = np.full((50, 2), np.nan)
    values[:10, 0], values[10:, 1] = a[:10], 0.51 + 0.05 * rng.normal(size=40)
    return values, np.array([0.5, 0.51])


def stopped_at(values, trials):
    """Keep each layer's first ``trials[u]`` trials: layers that stopped at different looks."""
    for unit, n in enumerate(trials):
        values[n:, unit] = np.nan
    return values


SHIFT = np.array([-0.5, -0.5, 0, 0, 0.5, 0.5])  # deep (last two layers) minus early (first two)
MEAN = np.full(6, 1 / 6)
NESTED = [10, 10, 15, 23, 35, 100]  # trials per layer, as layers stop at the sequential design's looks
ZOO = ["narrow", "rare outliers", "left-skewed", "right-skewed", "uniform", "left-skewed"]


def nested_normal(rng):
    values, truth = normal_layers(rng, 100, 6, pilot_sd=0.05)
    return stopped_at(values, NESTED), truth


def nested_zoo(rng):
    values, truth = skewed_layers(rng, 100, ZOO)
    return stopped_at(values, NESTED), truth


SCENARIOS = {
    "fixed design, 3 trials, stage mean": (lambda r: normal_layers(r, 3, 6), MEAN),
    "fixed design, 3 trials, depth shift": (lambda r: normal_layers(r, 3, 6), SHIFT),
    "layers stopped at different looks, mean": (nested_normal, MEAN),
    "layers stopped at different looks, depth shift": (nested_normal, SHIFT),
    "the zoo's skewed shapes, mean": (nested_zoo, MEAN),
    "the zoo's skewed shapes, depth shift": (nested_zoo, SHIFT),
    "two runs of one model on shared draws and images": (lambda r: two_runs(r, 20, paired=True), np.array([-1.0, 1.0])),
    "two runs on different draws and images": (lambda r: two_runs(r, 20, paired=False), np.array([-1.0, 1.0])),
}


@pytest.mark.slow
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_aggregate_intervals_cover_at_95_percent_and_are_no_wider_than_needed(scenario):
    """Over 2,000 simulated data sets per scenario: coverage of the 95% interval in [93.5%, 96.5%] (±3 binomial
    standard errors), and the variance the interval uses is unbiased for the estimate's actual variance (mean
    ratio in [0.9, 1.1]): its width is the t quantile times the estimate's true spread, not more."""
    sample, weights = SCENARIOS[scenario]
    rng = np.random.default_rng(sorted(SCENARIOS).index(scenario))
    covered, variances, estimates = 0, [], []
    for _ in range(2000):
        values, truth = sample(rng)
        result = contrast(values, weights)
        covered += abs(result.value - weights @ truth) <= result.half_width
        variances.append(result.se ** 2)
        estimates.append(result.value)
    assert 0.935 <= covered / 2000 <= 0.965
    assert 0.9 <= np.mean(variances) / np.var(estimates) <= 1.1
