"""Confidence sequences for means of [0, 1]-bounded per-image values, valid under optional stopping.

Used by ``--target-ci``: a unit stops once its criticality and top-1 are pinned down well enough. Checking a
plain normal interval after every batch and stopping when it is narrow inflates the error rate (the classic
optional-stopping problem); a confidence *sequence* holds at all times simultaneously, so stopping whenever it
is narrow keeps its coverage. We use the predictable-plug-in empirical-Bernstein confidence sequence (PrPl-EB) of
Waudby-Smith & Ramdas, "Estimating means of bounded random variables by betting", JRSS-B 2024, eq. (13):

    λ_t = min(sqrt(2 log(2/α) / (σ̂²_{t-1} t log(1+t))), c)        c = 1/2
    σ̂²_t = (1/4 + Σ_{i≤t} (x_i − μ̂_i)²) / (t + 1),    μ̂_t = (1/2 + Σ_{i≤t} x_i) / (t + 1)
    center_t = Σ λ_i x_i / Σ λ_i
    width_t = (log(2/α) + Σ v_i ψ_E(λ_i)) / Σ λ_i,   v_i = 4 (x_i − μ̂_{i−1})²,   ψ_E(λ) = (−log(1−λ) − λ) / 4

Everything is a running sum, so batches are processed vectorised and only the sums are carried.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

LAMBDA_CAP = 0.5


@dataclass
class BettingCS:
    """Running state of one PrPl-EB confidence sequence at level 1 − ``alpha``."""

    alpha: float = 0.05
    t: int = 0
    sum_x: float = 0.0  # Σ x_i, for μ̂
    sum_sq: float = 0.0  # Σ (x_i − μ̂_i)², for σ̂²
    sum_lambda: float = 0.0
    sum_lambda_x: float = 0.0
    sum_v_psi: float = 0.0

    def update(self, x: np.ndarray) -> None:
        """Add a batch of observations in [0, 1], in order."""
        x = np.asarray(x, dtype=np.float64)
        if x.size == 0:
            return
        if x.min() < 0 or x.max() > 1:
            raise ValueError("observations must lie in [0, 1]")
        n = np.arange(self.t + 1, self.t + len(x) + 1, dtype=np.float64)  # t of each observation
        cum_x = self.sum_x + np.cumsum(x)
        mu = (0.5 + cum_x) / (n + 1)  # μ̂_t (after x_t)
        mu_prev = np.concatenate(([(0.5 + self.sum_x) / (self.t + 1)], mu[:-1]))  # μ̂_{t−1}
        cum_sq = self.sum_sq + np.cumsum((x - mu) ** 2)
        sigma2_prev = np.concatenate(([(0.25 + self.sum_sq) / (self.t + 1)], ((0.25 + cum_sq) / (n + 1))[:-1]))
        lam = np.minimum(np.sqrt(2 * math.log(2 / self.alpha) / (sigma2_prev * n * np.log1p(n))), LAMBDA_CAP)
        v = 4 * (x - mu_prev) ** 2
        psi = (-np.log1p(-lam) - lam) / 4
        self.t += len(x)
        self.sum_x = float(cum_x[-1])
        self.sum_sq = float(cum_sq[-1])
        self.sum_lambda += float(lam.sum())
        self.sum_lambda_x += float((lam * x).sum())
        self.sum_v_psi += float((v * psi).sum())

    @property
    def center(self) -> float:
        return self.sum_lambda_x / self.sum_lambda if self.sum_lambda else 0.5

    @property
    def half_width(self) -> float:
        if not self.sum_lambda:
            return math.inf
        return (math.log(2 / self.alpha) + self.sum_v_psi) / self.sum_lambda

    def interval(self) -> tuple[float, float]:
        """The current interval, clipped to [0, 1]."""
        return max(0.0, self.center - self.half_width), min(1.0, self.center + self.half_width)
