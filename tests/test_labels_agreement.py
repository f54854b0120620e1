"""The node's agreement and drift statistics (numpy only) against scikit-learn and scipy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dicom_node.learning.agreement import agreement, bootstrap_auc, midranks, roc_auc
from dicom_node.learning.drift import drift_check, kolmogorov_sf, ks_two_sample
from dicom_node.learning.live import LiveSettings, live_figures
from dicom_node.records.ledger import Job, JobState, Ledger
from tests.conftest import PLUMBING_BUNDLE

sklearn_metrics = pytest.importorskip("sklearn.metrics")
scipy_stats = pytest.importorskip("scipy.stats")

pytestmark = pytest.mark.train  # scikit-learn and scipy come with the training extra


def sample(n: int, seed: int, ties: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.4
    y[:2] = [True, False]
    s = rng.normal(0, 1, n) + 0.8 * y
    s = 1 / (1 + np.exp(-s))
    if ties:
        s = np.round(s, 1)
    return s, y


@pytest.mark.parametrize("ties", [False, True])
def test_auc_and_midranks_equal_scikit_learn_and_scipy(ties: bool) -> None:
    s, y = sample(200, 1, ties)
    assert np.array_equal(midranks(s), scipy_stats.rankdata(s))
    assert roc_auc(s[y], s[~y]) == pytest.approx(sklearn_metrics.roc_auc_score(y, s), abs=1e-12)


def test_sensitivity_specificity_counts_equal_scikit_learn() -> None:
    s, y = sample(150, 2)
    threshold = 0.55
    a = agreement(s, y, threshold, resamples=0)
    tn, fp, fn, tp = sklearn_metrics.confusion_matrix(y, s >= threshold).ravel()
    assert (a.true_positives, a.false_negatives, a.true_negatives, a.false_positives) == (
        tp,
        fn,
        tn,
        fp,
    )
    assert a.positives == int(y.sum()) and a.negatives == int((~y).sum())
    assert a.sensitivity == pytest.approx(sklearn_metrics.recall_score(y, s >= threshold))
    assert a.specificity == pytest.approx(tn / (tn + fp))
    assert a.roc_auc is not None and a.roc_auc.low is None  # no resamples asked


def test_bootstrap_interval_is_the_documented_protocol_with_scikit_learn() -> None:
    """The interval recomputed independently: the same draws, scikit-learn's AUC."""
    s, y = sample(60, 3)
    a = agreement(s, y, 0.5, resamples=300, seed=7)
    pos, neg = np.sort(s[y]), np.sort(s[~y])  # the documented order
    rng = np.random.default_rng(7)
    aucs = []
    for _ in range(300):
        p = pos[rng.integers(0, len(pos), len(pos))]
        n = neg[rng.integers(0, len(neg), len(neg))]
        labels = np.r_[np.ones(len(p)), np.zeros(len(n))]
        aucs.append(sklearn_metrics.roc_auc_score(labels, np.r_[p, n]))
    low, high = np.percentile(aucs, [2.5, 97.5])
    assert a.roc_auc is not None
    assert (a.roc_auc.low, a.roc_auc.high) == (pytest.approx(low), pytest.approx(high))
    assert a.roc_auc.low is not None and a.roc_auc.high is not None
    assert a.roc_auc.low < a.roc_auc.value < a.roc_auc.high
    assert np.array_equal(bootstrap_auc(pos, neg, 20, 7), bootstrap_auc(pos, neg, 20, 7))
    order = np.random.default_rng(1).permutation(len(s))  # the pairs in another order
    assert agreement(s[order], y[order], 0.5, resamples=300, seed=7) == a


def test_one_class_only_has_no_auc_and_no_missing_ratio() -> None:
    a = agreement(np.array([0.2, 0.9]), np.array([True, True]), 0.5, resamples=100)
    assert a.roc_auc is None and a.specificity is None and a.sensitivity == 0.5


@pytest.mark.parametrize(("n", "m", "shift"), [(40, 300, 0.0), (200, 225, 0.15), (35, 60, 0.4)])
def test_ks_test_equals_scipy(n: int, m: int, shift: float) -> None:
    rng = np.random.default_rng(n)
    a, b = rng.beta(2, 5, n) + shift, rng.beta(2, 5, m)
    d, p = ks_two_sample(a, b)
    assert d == pytest.approx(scipy_stats.ks_2samp(a, b).statistic, abs=1e-12)
    en = n * m / (n + m)
    assert p == pytest.approx(scipy_stats.kstwobign.sf(np.sqrt(en) * d), rel=1e-9, abs=1e-12)


def test_kolmogorov_survival_function_on_its_whole_range() -> None:
    for x in (0.0, 0.1, 0.2, 0.5, 1.0, 1.36, 1.63, 3.0):
        assert kolmogorov_sf(x) == pytest.approx(scipy_stats.kstwobign.sf(x), abs=1e-10)


def test_drift_check_warns_only_when_the_distributions_part() -> None:
    rng = np.random.default_rng(0)
    reference = rng.beta(2, 5, 300)
    same = drift_check(rng.beta(2, 5, 100), reference, 0.01, 30)
    moved = drift_check(rng.beta(5, 2, 100), reference, 0.01, 30)
    assert same.tested and not same.warning
    assert moved.tested and moved.warning and moved.p_value is not None and moved.p_value < 1e-6
    assert not drift_check(rng.random(10), reference, 0.01, 30).tested
    none = drift_check(rng.random(100), None, 0.01, 30)
    assert not none.tested and none.note == "no reference distribution in the bundle"


def _job(ledger: Ledger, n: int, study: str, p: float, device: str, at: float) -> None:
    job = Job.received(
        f"job{n:04d}",
        sop_instance_uid=f"1.2.3.{n}",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
        study_instance_uid=study,
        series_instance_uid=f"1.2.4.{n}",
        calling_ae="MOD",
        spool_path=None,
        at=at,
    )
    ledger.add(job)
    ledger.set_state(job.job_id, JobState.ANALYSED, probability=p, device_uid=device)


def test_live_figures_per_bundle_version_study_max(tmp_path: Path) -> None:
    from worker.bundle import load_bundle

    manifest = load_bundle(PLUMBING_BUNDLE, verify_checksums=False).manifest
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    now = 1_000_000.0
    uid = manifest.device_uid
    # study A: two images, the higher counts; B, C single; D by another (unknown) bundle
    _job(ledger, 1, "A", 0.2, uid, now - 10)
    _job(ledger, 2, "A", 0.7, uid, now - 9)
    _job(ledger, 3, "B", 0.4, uid, now - 8)
    _job(ledger, 4, "C", 0.6, uid, now - 7)
    _job(ledger, 5, "D", 0.9, "9.9.9", now - 40 * 86400)  # outside the drift window
    _job(ledger, 6, "E", 0.1, uid, now - 6)  # not labelled
    diagnoses = {"A": "covid", "B": "covid", "C": "negative", "D": "covid", "Z": "negative"}
    figures = live_figures(
        ledger, diagnoses, {uid: manifest}, LiveSettings(agreement_bootstrap=0), now=now
    )
    by_uid = {f.device_uid: f for f in figures}
    mine = by_uid[uid].agreement
    assert mine is not None and (mine.positives, mine.negatives) == (2, 1)
    assert mine.threshold == manifest.threshold == 0.5
    assert (mine.true_positives, mine.false_positives) == (1, 1)  # A 0.7 >= 0.5; C 0.6
    assert mine.roc_auc is not None and mine.roc_auc.value == 0.5  # A > C, B < C
    other = by_uid["9.9.9"]
    assert other.agreement is not None and other.agreement.threshold is None
    assert other.agreement.sensitivity is None and other.drift is None
    assert "not installed" in other.version
    drift = by_uid[uid].drift
    assert drift is not None and drift.recent == 5 and not drift.tested  # 5 < 30 scores
