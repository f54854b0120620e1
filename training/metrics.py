"""Binary classification metrics and bootstrap confidence intervals (numpy only).

Positive class = COVID-19 (label 1), score = its probability. Definitions match scikit-learn
(`roc_auc_score`, `average_precision_score`, `roc_curve`, `precision_recall_curve`); the tests
compare them. Metrics that are undefined on the data (an AUC with one class present) are NaN.

Confidence intervals: percentile bootstrap, resampling patient groups (images of one patient
are not independent), pooled over K splits when several are given (the paper: 10 x 100).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

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
    y = np.asarray(y).astype(bool)
    p = np.asarray(predicted).astype(bool)
    return (
        int((~y & ~p).sum()),
        int((~y & p).sum()),
        int((y & ~p).sum()),
        int((y & p).sum()),
    )


def _ratio(a: int, b: int) -> float:
    return a / b if b else float("nan")


def accuracy(y: np.ndarray, predicted: np.ndarray) -> float:
    tn, fp, fn, tp = confusion(y, predicted)
    return _ratio(tn + tp, tn + fp + fn + tp)


def sensitivity(y: np.ndarray, predicted: np.ndarray) -> float:
    _, _, fn, tp = confusion(y, predicted)
    return _ratio(tp, tp + fn)


def specificity(y: np.ndarray, predicted: np.ndarray) -> float:
    tn, fp, _, _ = confusion(y, predicted)
    return _ratio(tn, tn + fp)


def _ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given their average rank."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    boundaries = np.flatnonzero(np.diff(sorted_values)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(values)]])
    average = (starts + ends + 1) / 2.0  # mean of 1-based ranks start+1..end
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat(average, ends - starts)
    return ranks


def roc_auc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U / (n_pos n_neg), ties count one half)."""
    y, score = _check(y, score)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    rank_sum = _ranks(score)[y == 1].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _distinct_thresholds(
    y: np.ndarray, score: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative (false positives, true positives) at each distinct score, descending."""
    order = np.argsort(-score, kind="mergesort")
    s, t = score[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tps = np.cumsum(t)[last]
    fps = (last + 1) - tps
    return fps.astype(np.float64), tps.astype(np.float64), s[last]


def roc_curve(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), starting at (0, 0) with threshold +inf, one point per score."""
    y, score = _check(y, score)
    fps, tps, thresholds = _distinct_thresholds(y, score)
    fpr = np.r_[0.0, fps / fps[-1] if fps[-1] else np.full_like(fps, np.nan)]
    tpr = np.r_[0.0, tps / tps[-1] if tps[-1] else np.full_like(tps, np.nan)]
    return fpr, tpr, np.r_[np.inf, thresholds]


def precision_recall_curve(
    y: np.ndarray, score: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, thresholds) in increasing threshold order, ending at (1, 0)."""
    y, score = _check(y, score)
    fps, tps, thresholds = _distinct_thresholds(y, score)
    precision = tps / (tps + fps)
    recall = tps / tps[-1] if tps[-1] else np.full_like(tps, np.nan)
    return np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0], thresholds[::-1]


def average_precision(y: np.ndarray, score: np.ndarray) -> float:
    """PR AUC as average precision: sum over thresholds of (R_n - R_n-1) P_n."""
    y, score = _check(y, score)
    if y.sum() == 0:
        return float("nan")
    precision, recall, _ = precision_recall_curve(y, score)
    return float(-np.sum(np.diff(recall) * precision[:-1]))


def youden_threshold(y: np.ndarray, score: np.ndarray, fallback: float = 0.5) -> float:
    """The score threshold maximising sensitivity + specificity - 1 (predict >= threshold).

    `fallback` when the scores do not separate the classes at all (J <= 0 everywhere, e.g.
    all scores tied) or one class is missing: no threshold is better than another then.
    """
    fpr, tpr, thresholds = roc_curve(y, score)
    if np.isnan(fpr).any() or np.isnan(tpr).any():
        return fallback
    j = tpr - fpr
    best = int(np.argmax(j))
    if j[best] <= 0:
        return fallback
    return float(min(thresholds[best], 1.0))


THRESHOLD_METRICS: dict[str, MetricFn] = {
    "accuracy": accuracy,
    "sensitivity": sensitivity,
    "specificity": specificity,
}
SCORE_METRICS: dict[str, MetricFn] = {"roc_auc": roc_auc, "pr_auc": average_precision}
METRICS: tuple[str, ...] = (*THRESHOLD_METRICS, *SCORE_METRICS)


def binary_metrics(y: np.ndarray, score: np.ndarray, threshold: float) -> dict[str, float]:
    """accuracy, sensitivity, specificity at `threshold` (score >= threshold is positive), AUCs."""
    y, score = _check(y, score)
    predicted = score >= threshold
    out = {name: fn(y, predicted) for name, fn in THRESHOLD_METRICS.items()}
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

    def as_dict(self) -> dict[str, float | int]:
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


def metrics_table(
    rows: Mapping[str, Mapping[str, Estimate]], names: Sequence[str] = METRICS
) -> list[str]:
    """Markdown table: one row per key, one column per metric."""
    lines = ["| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for key, est in rows.items():
        lines.append(f"| {key} | " + " | ".join(est[n].text() for n in names) + " |")
    return lines
