"""Have the scores drifted? Recent scores against the bundle's reference distribution.

The test is the two-sample Kolmogorov-Smirnov test: its statistic D is the largest distance
between the two empirical distribution functions; its p-value is the asymptotic one,
Q(sqrt(n m / (n + m)) * D) with Kolmogorov's Q(x) = 2 sum_k (-1)^(k-1) exp(-2 k^2 x^2)
(scipy's `kstwobign.sf`; tests compare both). A warning when p < alpha (`CXR_DRIFT_ALPHA`,
default 0.01). Scores are not independent of who is sent: a change of case mix (more
positives, another ward, a new modality) moves the distribution as much as a change of the
images does, and the warning says only that the two differ, not why.

numpy only, as the node installs no scipy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

TEST_NAME = "two-sample Kolmogorov-Smirnov"


@dataclass(frozen=True)
class Drift:
    """The outcome of the drift check of one bundle version."""

    recent: int  # scores in the window
    reference: int  # scores in the bundle's reference distribution (0: none)
    statistic: float | None = None  # D; None: no test made
    p_value: float | None = None
    alpha: float = 0.01
    note: str = ""  # why no test was made

    @property
    def tested(self) -> bool:
        return self.statistic is not None

    @property
    def warning(self) -> bool:
        return self.p_value is not None and self.p_value < self.alpha


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """sup |F_a - F_b| over every value of either sample."""
    a, b = np.sort(np.asarray(a, dtype=np.float64)), np.sort(np.asarray(b, dtype=np.float64))
    values = np.concatenate([a, b])
    fa = np.searchsorted(a, values, side="right") / len(a)
    fb = np.searchsorted(b, values, side="right") / len(b)
    return float(np.max(np.abs(fa - fb)))


def kolmogorov_sf(x: float, terms: int = 100) -> float:
    """P(K > x) of the Kolmogorov distribution (the limit of sqrt(n) D)."""
    if x <= 0.0:
        return 1.0
    if x < 0.2:  # the series converges slowly; the distribution is 1 to many decimals here
        return 1.0
    total = sum((-1) ** (k - 1) * math.exp(-2.0 * k * k * x * x) for k in range(1, terms + 1))
    return float(min(1.0, max(0.0, 2.0 * total)))


def ks_two_sample(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """D and its asymptotic two-sided p-value."""
    n, m = len(a), len(b)
    if not n or not m:
        raise ValueError("the test needs two non-empty samples")
    d = ks_statistic(a, b)
    return d, kolmogorov_sf(math.sqrt(n * m / (n + m)) * d)


def drift_check(
    recent: np.ndarray, reference: np.ndarray | None, alpha: float, min_scores: int
) -> Drift:
    """Recent scores against the reference ones; no test (and why) when either is missing
    or there are fewer than `min_scores` recent scores."""
    n = len(recent)
    if reference is None or not len(reference):
        return Drift(n, 0, alpha=alpha, note="no reference distribution in the bundle")
    if n < min_scores:
        return Drift(n, len(reference), alpha=alpha, note=f"fewer than {min_scores} recent scores")
    d, p = ks_two_sample(recent, reference)
    return Drift(n, len(reference), statistic=d, p_value=p, alpha=alpha)
