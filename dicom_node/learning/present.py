"""The live figures as tables of text: one layout for the status page and `cxr-node status`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from dicom_node.learning.agreement import Agreement
from dicom_node.learning.drift import TEST_NAME, Drift
from dicom_node.learning.live import BundleFigures


@dataclass(frozen=True)
class TextTable:
    headers: list[str]
    rows: list[list[str]]


def _ratio(value: float | None, hits: int, of: int) -> str:
    return "n/a" if value is None else f"{value:.4f} ({hits}/{of})"


def _auc(a: Agreement) -> str:
    if a.roc_auc is None:
        return "n/a (needs both diagnoses)"
    if a.roc_auc.low is None:
        return f"{a.roc_auc.value:.4f} (no interval: too few cases)"
    return f"{a.roc_auc.text(4)} [95 % CI, {a.resamples} resamples]"


def agreement_table(figures: Sequence[BundleFigures]) -> TextTable:
    """Per bundle version: the counts, sensitivity and specificity at its threshold, AUC."""
    rows = []
    for f in figures:
        a = f.agreement
        if a is None:
            continue
        rows.append(
            [
                f.label,
                f.device_uid,
                "n/a" if a.threshold is None else f"{a.threshold:.4f}",
                str(a.positives),
                str(a.negatives),
                _ratio(a.sensitivity, a.true_positives, a.positives),
                _ratio(a.specificity, a.true_negatives, a.negatives),
                _auc(a),
            ]
        )
    headers = [
        "bundle",
        "device UID",
        "threshold",
        "positives",
        "negatives",
        "sensitivity",
        "specificity",
        "ROC AUC",
    ]
    return TextTable(headers, rows)


def _verdict(d: Drift) -> str:
    if not d.tested:
        return f"no test: {d.note}"
    if d.warning:
        return f"DRIFT: p < {d.alpha:g}"
    return f"no drift shown (p >= {d.alpha:g})"


def drift_table(figures: Sequence[BundleFigures], days: float) -> TextTable:
    """Per bundle version that scored in the window: the test of its recent scores."""
    rows = []
    for f in figures:
        d = f.drift
        if d is None:
            continue
        rows.append(
            [
                f.label,
                str(d.recent),
                str(d.reference) if d.reference else "none",
                "" if d.statistic is None else f"{d.statistic:.4f}",
                "" if d.p_value is None else f"{d.p_value:.4g}",
                _verdict(d),
            ]
        )
    headers = [
        "bundle",
        f"scores, last {days:g} days",
        "reference scores",
        "KS statistic D",
        "p-value",
        "verdict",
    ]
    return TextTable(headers, rows)


DRIFT_TEST = f"{TEST_NAME} test of the recent scores against the bundle's reference scores"


def figure_lines(figures: Sequence[BundleFigures], days: float) -> list[str]:
    """The same figures as lines of text, one block per bundle version (`cxr-node status`:
    a terminal is too narrow for the tables)."""
    out: list[str] = []
    for f in figures:
        out.append(f"{f.label} (device UID {f.device_uid or 'not recorded'})")
        a = f.agreement
        if a is None:
            out.append("  agreement: no study it scored has a confirmed diagnosis")
        else:
            threshold = "n/a" if a.threshold is None else f"{a.threshold:.4f}"
            out += [
                f"  agreement: {a.positives} confirmed positive, {a.negatives} confirmed negative "
                f"studies; threshold {threshold}",
                f"  sensitivity {_ratio(a.sensitivity, a.true_positives, a.positives)}, "
                f"specificity {_ratio(a.specificity, a.true_negatives, a.negatives)}, "
                f"ROC AUC {_auc(a)}",
            ]
        d = f.drift
        if d is not None:
            tested = (
                f"D {d.statistic:.4f}, p {d.p_value:.4g}: "
                if d.statistic is not None and d.p_value is not None
                else ""
            )
            out.append(
                f"  drift: {d.recent} scores in the last {days:g} days vs "
                f"{d.reference or 'no'} reference scores: {tested}{_verdict(d)}"
            )
    return out
