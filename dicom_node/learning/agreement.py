"""How the model's scores agree with confirmed diagnoses: pure functions of numpy arrays.

numpy only, as the node installs neither scipy nor scikit-learn (tests compare every figure
with scikit-learn's). A study is positive when its score >= the threshold (the SR's rule,
`results.sr.builder.is_present`).

The ROC AUC is the Mann-Whitney statistic on mid-ranks (ties count one half). Its 95 %
interval is a stratified percentile bootstrap: each class's scores sorted (so the interval
does not depend on the order the pairs come in), `resamples` times the positives and then
the negatives are drawn with replacement, each class keeping its size, from one
`numpy.random.default_rng(seed)` (per resample: positive indices, then negative indices),
and the 2.5th and 97.5th percentiles (numpy's linear interpolation) of the resampled AUCs
are the bounds. Stratified, so every resample holds both classes and rests on the same
counts as the figure itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: The seed of the bootstrap: the same data give the same interval on every node and scrape.
BOOTSTRAP_SEED = 0


@dataclass(frozen=True)
class Interval:
    value: float
    low: float | None = None  # None: no interval (too few cases, or no resamples asked)
    high: float | None = None

    def text(self, digits: int = 3) -> str:
        if self.low is None or self.high is None:
            return f"{self.value:.{digits}f}"
        return f"{self.value:.{digits}f} ({self.low:.{digits}f}-{self.high:.{digits}f})"


@dataclass(frozen=True)
class Agreement:
    """Scores of confirmed studies against their diagnoses, at one threshold."""

    positives: int
    negatives: int
    threshold: float | None  # None: the bundle that scored is not installed any more
    true_positives: int
    false_negatives: int
    true_negatives: int
    false_positives: int
    roc_auc: Interval | None  # None: one class is missing
    resamples: int

    @property
    def sensitivity(self) -> float | None:
        if self.threshold is None or not self.positives:
            return None
        return self.true_positives / self.positives

    @property
    def specificity(self) -> float | None:
        if self.threshold is None or not self.negatives:
            return None
        return self.true_negatives / self.negatives


def midranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)
    return (last - (counts - 1) / 2.0)[inverse]


def roc_auc(positive_scores: np.ndarray, negative_scores: np.ndarray) -> float:
    """The probability that a positive scores above a negative (ties: one half)."""
    n_pos, n_neg = len(positive_scores), len(negative_scores)
    if not n_pos or not n_neg:
        raise ValueError("the ROC AUC needs at least one positive and one negative")
    ranks = midranks(np.concatenate([positive_scores, negative_scores]))
    u = float(ranks[:n_pos].sum()) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def bootstrap_auc(
    positive_scores: np.ndarray, negative_scores: np.ndarray, resamples: int, seed: int
) -> np.ndarray:
    """The AUCs of `resamples` stratified resamples (the protocol in the module's docstring)."""
    rng = np.random.default_rng(seed)
    n_pos, n_neg = len(positive_scores), len(negative_scores)
    out = np.empty(resamples)
    for b in range(resamples):
        pos = positive_scores[rng.integers(0, n_pos, n_pos)]
        neg = negative_scores[rng.integers(0, n_neg, n_neg)]
        out[b] = roc_auc(pos, neg)
    return out


def agreement(
    scores: np.ndarray,
    positive: np.ndarray,
    threshold: float | None,
    resamples: int,
    seed: int = BOOTSTRAP_SEED,
) -> Agreement:
    """The figures of scores (one per study) against confirmed diagnoses (True: positive)."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    if scores.shape != positive.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and diagnoses {positive.shape} differ")
    pos, neg = np.sort(scores[positive]), np.sort(scores[~positive])
    called = scores >= threshold if threshold is not None else np.zeros(len(scores), bool)
    auc: Interval | None = None
    if len(pos) and len(neg):
        value = roc_auc(pos, neg)
        if resamples > 0 and len(pos) > 1 and len(neg) > 1:
            low, high = np.percentile(bootstrap_auc(pos, neg, resamples, seed), [2.5, 97.5])
            auc = Interval(value, float(low), float(high))
        else:
            auc = Interval(value)
    return Agreement(
        positives=len(pos),
        negatives=len(neg),
        threshold=threshold,
        true_positives=int(np.sum(called & positive)),
        false_negatives=int(np.sum(~called & positive)),
        true_negatives=int(np.sum(~called & ~positive)),
        false_positives=int(np.sum(called & ~positive)),
        roc_auc=auc,
        resamples=resamples if auc is not None and auc.low is not None else 0,
    )
