"""The report's figures (matplotlib, Agg backend, PNG). Each function writes one file.

When matplotlib is missing the figures are skipped, with a note in the report, so that the
numbers still come out on a machine without it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import ConfusionMatrixDisplay, precision_recall_curve, roc_curve


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def roc(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: Path) -> Path:
    """ROC curves, one per (y, score) entry; AUCs in the legend come from the caller's names."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, (y, score) in curves.items():
        if len(np.unique(y)) < 2:
            continue
        fpr, tpr, _ = roc_curve(y, score)
        ax.plot(fpr, tpr, label=name)
    ax.plot([0, 1], [0, 1], ":", color="gray")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC (test)")
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def pr(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, (y, score) in curves.items():
        if not np.sum(y):
            continue
        precision, recall, _ = precision_recall_curve(y, score)
        ax.step(recall, precision, where="post", label=name)
    ax.set(xlabel="recall (sensitivity)", ylabel="precision", title="Precision-recall (test)")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8, loc="lower left")
    return _save(fig, path)


def confusion(counts: tuple[int, int, int, int], labels: Sequence[str], path: Path) -> Path:
    tn, fp, fn, tp = counts
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4, 4))
    ConfusionMatrixDisplay(np.array([[tn, fp], [fn, tp]]), display_labels=list(labels)).plot(
        ax=ax, cmap="Blues", colorbar=False, text_kw={"fontsize": 14}
    )
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix (test, split 0)")
    return _save(fig, path)


def score_histogram(y: np.ndarray, score: np.ndarray, threshold: float, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.linspace(0, 1, 21)
    for value, name in ((0, "negative"), (1, "covid")):
        ax.hist(
            score[y == value], bins=bins, alpha=0.6, label=f"{name} (n={int((y == value).sum())})"
        )
    ax.axvline(threshold, color="k", linestyle="--", label=f"threshold {threshold:.2f}")
    ax.set(xlabel="ensemble P(COVID-19)", ylabel="images", title="Scores by true label (test)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def scatter(points: np.ndarray, categories: Sequence[str], title: str, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 5))
    cats = np.asarray(categories)
    for cat in sorted(set(cats.tolist())):
        sel = cats == cat
        ax.scatter(points[sel, 0], points[sel, 1], s=10, alpha=0.7, label=f"{cat} ({sel.sum()})")
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=7, markerscale=1.5)
    return _save(fig, path)


def days(days: np.ndarray, score: np.ndarray, labels: np.ndarray, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for value, name in ((0, "negative"), (1, "covid")):
        sel = labels == value
        if sel.any():
            ax.scatter(days[sel], score[sel], s=14, alpha=0.7, label=name)
    ax.set(xlabel="days since admission / symptom onset", ylabel="P(COVID-19)")
    ax.set_title("Score vs days (out-of-sample scores)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    return _save(fig, path)


def bars(
    values: Mapping[str, tuple[float | None, float | None, float | None]], title: str, path: Path
) -> Path:
    """Value with [low, high] error bars per name (undefined: NaN or None, drawn as 0)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    names = list(values)
    v = np.array([values[n][0] for n in names], dtype=np.float64)
    lo = np.array([values[n][1] for n in names], dtype=np.float64)
    hi = np.array([values[n][2] for n in names], dtype=np.float64)
    err = np.nan_to_num(np.vstack([v - lo, hi - v]), nan=0.0).clip(min=0)
    ax.bar(range(len(names)), np.nan_to_num(v), yerr=err, capsize=4, color="#4c72b0")
    ax.set_xticks(range(len(names)), labels=names, fontsize=7)
    ax.axhline(0.5, color="gray", linestyle=":")
    ax.set(ylim=(0, 1.05), ylabel="ROC AUC", title=title)
    return _save(fig, path)
