"""The live figures as Prometheus gauges (read at scrape time, like the node's other gauges).

Labels: `bundle` ("name version") and `device_uid`. A figure that is not defined (no
positive yet, no interval, no drift test) has no sample rather than NaN.
"""

from __future__ import annotations

from collections.abc import Sequence

from dicom_node.learning.live import BundleFigures

Sample = tuple[list[str], float]
Gauge = tuple[str, str, list[str], list[Sample]]

_LABELS = ["bundle", "device_uid"]


def figure_gauges(figures: Sequence[BundleFigures]) -> list[Gauge]:
    studies: list[Sample] = []
    sensitivity: list[Sample] = []
    specificity: list[Sample] = []
    threshold: list[Sample] = []
    auc: list[Sample] = []
    recent: list[Sample] = []
    statistic: list[Sample] = []
    p_value: list[Sample] = []
    warning: list[Sample] = []
    for f in figures:
        key = [f.label, f.device_uid]
        a = f.agreement
        if a is not None:
            studies += [
                ([*key, "covid"], float(a.positives)),
                ([*key, "negative"], float(a.negatives)),
            ]
            if a.threshold is not None:
                threshold.append((key, a.threshold))
            if a.sensitivity is not None:
                sensitivity.append((key, a.sensitivity))
            if a.specificity is not None:
                specificity.append((key, a.specificity))
            if a.roc_auc is not None:
                auc.append(([*key, "value"], a.roc_auc.value))
                if a.roc_auc.low is not None and a.roc_auc.high is not None:
                    auc += [([*key, "low"], a.roc_auc.low), ([*key, "high"], a.roc_auc.high)]
        d = f.drift
        if d is not None:
            recent.append((key, float(d.recent)))
            if d.statistic is not None and d.p_value is not None:
                statistic.append((key, d.statistic))
                p_value.append((key, d.p_value))
                warning.append((key, 1.0 if d.warning else 0.0))
    return [
        (
            "cxr_agreement_studies",
            "studies with a confirmed diagnosis scored by each bundle version",
            [*_LABELS, "diagnosis"],
            studies,
        ),
        ("cxr_agreement_threshold", "the bundle version's decision threshold", _LABELS, threshold),
        (
            "cxr_agreement_sensitivity",
            "confirmed-positive studies scored at or above the threshold / confirmed positives",
            _LABELS,
            sensitivity,
        ),
        (
            "cxr_agreement_specificity",
            "confirmed-negative studies scored below the threshold / confirmed negatives",
            _LABELS,
            specificity,
        ),
        (
            "cxr_agreement_roc_auc",
            "ROC AUC of the scores against confirmed diagnoses, with its 95 % stratified "
            "bootstrap interval (bound=low, high)",
            [*_LABELS, "bound"],
            auc,
        ),
        (
            "cxr_drift_recent_scores",
            "instances scored by the bundle version in the drift window (CXR_DRIFT_DAYS)",
            _LABELS,
            recent,
        ),
        (
            "cxr_drift_ks_statistic",
            "two-sample Kolmogorov-Smirnov D: recent scores vs the bundle's reference scores",
            _LABELS,
            statistic,
        ),
        ("cxr_drift_p_value", "asymptotic p-value of that test", _LABELS, p_value),
        (
            "cxr_drift_warning",
            "1 when the p-value is below CXR_DRIFT_ALPHA (the distributions differ)",
            _LABELS,
            warning,
        ),
    ]
