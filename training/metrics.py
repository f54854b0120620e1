"""Binary classification metrics (scikit-learn) and bootstrap confidence intervals.

Positive class = COVID-19 (label 1), score = its probability. Metrics that are undefined on the
data (an AUC with one class present) are NaN rather than an error or a warning, so a bootstrap
resample that draws one class only drops out of the interval.

Confidence intervals: percentile bootstrap, resampling patient groups (images of one patient
are not independent), pooled over K splits when several are given (the paper: 10 x 100).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import average_precision_score, confusion_matrix, roc_auc_score, roc_curve

from training.results import EstimateJson

MetricFn = Callable[[np.ndarray, np.ndarray], float]


def _check(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y).astype(np.int64).ravel()
    score = np.asarray(score, dtype=np.float64).ravel()
    if y.shape != score.shape:
        raise ValueError(f"{y.shape[0]} labels for {score.shape[0]} scores")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    return y, score


def confusion(y: np.ndarray, predicted: np.ndarray) -> tuple[int, int, int, int]:
    """(tn, fp, fn, tp)."""
    cm = confusion_matrix(
        np.asarray(y).astype(bool), np.asarray(predicted).astype(bool), labels=[False, True]
    )
    tn, fp, fn, tp = (int(v) for v in cm.ravel())
    return tn, fp, fn, tp


def _ratio(a: int, b: int) -> float:
    return a / b if b else float("nan")


def roc_auc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve; NaN when one class is missing."""
    y, score = _check(y, score)
    if y.min() == y.max():
        return float("nan")
    return float(roc_auc_score(y, score))


def average_precision(y: np.ndarray, score: np.ndarray) -> float:
    """PR AUC as average precision; NaN without a positive."""
    y, score = _check(y, score)
    if not y.any():
        return float("nan")
    return float(average_precision_score(y, score))


def youden_threshold(y: np.ndarray, score: np.ndarray, fallback: float = 0.5) -> float:
    """The score threshold maximising sensitivity + specificity - 1 (predict >= threshold).

    `fallback` when the scores do not separate the classes at all (J <= 0 everywhere, e.g.
    all scores tied) or one class is missing: no threshold is better than another then.
    """
    y, score = _check(y, score)
    if y.min() == y.max():
        return fallback
    fpr, tpr, thresholds = roc_curve(y, score, drop_intermediate=False)
    j = tpr - fpr
    best = int(np.argmax(j))
    if j[best] <= 0:
        return fallback
    return float(min(thresholds[best], 1.0))


THRESHOLD_METRICS: tuple[str, ...] = ("accuracy", "sensitivity", "specificity")
SCORE_METRICS: dict[str, MetricFn] = {"roc_auc": roc_auc, "pr_auc": average_precision}
METRICS: tuple[str, ...] = (*THRESHOLD_METRICS, *SCORE_METRICS)


def binary_metrics(y: np.ndarray, score: np.ndarray, threshold: float) -> dict[str, float]:
    """accuracy, sensitivity, specificity at `threshold` (score >= threshold is positive), AUCs."""
    y, score = _check(y, score)
    tn, fp, fn, tp = confusion(y, score >= threshold)
    out = {
        "accuracy": _ratio(tn + tp, tn + fp + fn + tp),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
    }
    out.update({name: fn(y, score) for name, fn in SCORE_METRICS.items()})
    return out


# --------------------------------------------------------------------------- bootstrap


def bootstrap_indices(
    n: int, groups: Sequence[str] | np.ndarray | None, samples: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """`samples` resamples of row indices: whole groups drawn with replacement (or rows)."""
    if groups is None:
        return list(rng.integers(0, n, size=(samples, n)))
    groups = np.asarray(groups)
    _, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(inverse.max() + 1)]
    out = []
    for _ in range(samples):
        picked = rng.integers(0, len(members), size=len(members))
        out.append(np.concatenate([members[g] for g in picked]))
    return out


def bootstrap_metrics(
    y: np.ndarray,
    score: np.ndarray,
    threshold: float,
    groups: Sequence[str] | np.ndarray | None,
    samples: int,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """Each metric on `samples` bootstrap resamples: name -> array [samples] (NaN allowed)."""
    y, score = _check(y, score)
    out: dict[str, list[float]] = {name: [] for name in METRICS}
    for idx in bootstrap_indices(len(y), groups, samples, rng):
        for name, value in binary_metrics(y[idx], score[idx], threshold).items():
            out[name].append(value)
    return {name: np.asarray(values) for name, values in out.items()}


def percentile_ci(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if not len(values):
        return float("nan"), float("nan")
    alpha = (1.0 - level) / 2.0
    return float(np.quantile(values, alpha)), float(np.quantile(values, 1.0 - alpha))


@dataclass(frozen=True)
class Estimate:
    """A metric with its 95% CI; `splits` and `samples` say where the interval comes from."""

    value: float
    low: float
    high: float
    splits: int
    samples: int

    def as_dict(self) -> EstimateJson:
        return {
            "value": self.value,
            "low": self.low,
            "high": self.high,
            "splits": self.splits,
            "samples": self.samples,
        }

    def text(self, digits: int = 3) -> str:
        if not np.isfinite(self.value):
            return "n/a"
        if not np.isfinite(self.low):
            return f"{self.value:.{digits}f}"
        return f"{self.value:.{digits}f} ({self.low:.{digits}f}-{self.high:.{digits}f})"


@dataclass(frozen=True)
class SplitScores:
    """One split's evaluation set: labels, scores, patient groups and the decision threshold."""

    y: np.ndarray
    score: np.ndarray
    groups: np.ndarray
    threshold: float


def estimates(
    splits: Sequence[SplitScores], samples: int, seed: int, level: float = 0.95
) -> dict[str, Estimate]:
    """Each metric: mean over splits, CI from the pooled K x `samples` bootstrap values."""
    if not splits:
        raise ValueError("no split to estimate from")
    rng = np.random.default_rng(seed)
    points: dict[str, list[float]] = {name: [] for name in METRICS}
    pooled: dict[str, list[np.ndarray]] = {name: [] for name in METRICS}
    for s in splits:
        for name, value in binary_metrics(s.y, s.score, s.threshold).items():
            points[name].append(value)
        for name, values in bootstrap_metrics(
            s.y, s.score, s.threshold, s.groups, samples, rng
        ).items():
            pooled[name].append(values)
    out: dict[str, Estimate] = {}
    for name in METRICS:
        finite = [v for v in points[name] if np.isfinite(v)]
        value = float(np.mean(finite)) if finite else float("nan")
        low, high = percentile_ci(np.concatenate(pooled[name]), level)
        out[name] = Estimate(value, low, high, len(splits), samples)
    return out


def estimate_one(
    fn: Callable[[np.ndarray], float],
    n: int,
    groups: Sequence[str] | np.ndarray | None,
    samples: int,
    seed: int,
) -> Estimate:
    """A statistic of row indices (e.g. a mean Dice) with a bootstrap CI."""
    rng = np.random.default_rng(seed)
    value = fn(np.arange(n))
    values = np.array([fn(idx) for idx in bootstrap_indices(n, groups, samples, rng)])
    low, high = percentile_ci(values)
    return Estimate(float(value), low, high, 1, samples)
