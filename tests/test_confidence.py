"""The confidence sequence behind --target-ci keeps its coverage when we stop as soon as it is narrow."""

import numpy as np
import pytest

from layercrit.measurement.confidence import BettingCS


def stop_when_narrow(stream, target, alpha=0.05, batch=50):
    cs = BettingCS(alpha=alpha)
    for start in range(0, len(stream), batch):
        cs.update(stream[start:start + batch])
        if cs.half_width <= target:
            break
    return cs


@pytest.mark.parametrize("kind, mean", [("bernoulli", 0.9), ("bernoulli", 0.5), ("beta", 0.05), ("beta", 0.3)])
def test_coverage_holds_under_optional_stopping(kind, mean):
    rng = np.random.default_rng(0)
    misses, runs, stopped = 0, 200, []
    for _ in range(runs):
        if kind == "bernoulli":
            stream = (rng.random(10_000) < mean).astype(float)
        else:  # skewed values in [0, 1] like per-image 1 − cos
            stream = rng.beta(mean * 4, (1 - mean) * 4, 10_000)
        cs = stop_when_narrow(stream, target=0.03)
        low, high = cs.interval()
        misses += not (low <= mean <= high)
        stopped.append(cs.t)
    assert misses / runs <= 0.05 + 0.02  # α plus Monte-Carlo slack (200 runs)
    assert np.median(stopped) < 10_000  # and it does stop early


def test_interval_narrows_as_observations_accumulate_and_batches_do_not_matter():
    rng = np.random.default_rng(1)
    x = rng.random(1000) * 0.2
    whole, batched = BettingCS(), BettingCS()
    whole.update(x)
    for start in range(0, 1000, 37):
        batched.update(x[start:start + 37])
    assert whole.half_width == pytest.approx(batched.half_width) and whole.center == pytest.approx(batched.center)
    early = BettingCS()
    early.update(x[:100])
    assert whole.half_width < early.half_width


def test_constant_stream_converges_to_its_value():
    cs = BettingCS()
    cs.update(np.ones(5000))
    low, high = cs.interval()
    assert high == 1.0 and low > 0.99


def test_values_outside_the_unit_interval_are_refused():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        BettingCS().update(np.array([0.5, 1.5]))
