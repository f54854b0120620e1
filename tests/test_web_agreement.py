"""The status page's and /metrics' agreement and drift figures (the e2e test checks their
values against scikit-learn: tests/test_labels_e2e.py)."""

from __future__ import annotations

from dicom_node.learning.agreement import Agreement, Interval
from dicom_node.learning.drift import Drift
from dicom_node.learning.gauges import figure_gauges
from dicom_node.learning.live import BundleFigures
from dicom_node.operations.web import StatusView, render_status

FIGURES = [
    BundleFigures(
        device_uid="1.2.3",
        name="cxr<b>",
        version="2.0",
        agreement=Agreement(
            positives=4,
            negatives=6,
            threshold=0.4,
            true_positives=3,
            false_negatives=1,
            true_negatives=5,
            false_positives=1,
            roc_auc=Interval(0.875, 0.6, 1.0),
            resamples=1000,
        ),
        drift=Drift(recent=50, reference=200, statistic=0.31, p_value=0.0004, alpha=0.01),
    ),
    BundleFigures("9.9", "", "(not installed: 9.9)", agreement=None, drift=Drift(3, 0, note="x")),
]


def view(figures: object) -> StatusView:
    def read() -> object:
        if isinstance(figures, Exception):
            raise figures
        return figures

    return StatusView(
        title="t",
        counts=lambda: {},
        recent=lambda: [],
        failures=lambda: [],
        bundle=lambda: {},
        installed=lambda: [],
        figures=read,  # type: ignore[arg-type]
    )


def test_page_shows_the_figures_escaped() -> None:
    page = render_status(view(FIGURES))
    assert "cxr&lt;b&gt; 2.0" in page and "<b> 2.0" not in page
    assert "0.7500 (3/4)" in page and "0.8333 (5/6)" in page
    assert "0.8750 (0.6000-1.0000) [95 % CI, 1000 resamples]" in page
    assert "DRIFT: p &lt; 0.01" in page and "0.3100" in page
    assert "no test: x" in page
    assert "two-sample Kolmogorov-Smirnov" in page


def test_page_stands_when_the_figures_fail() -> None:
    page = render_status(view(RuntimeError("hospital store locked")))
    assert "not available: hospital store locked" in page and "Jobs by state" in page


def test_gauges_only_for_defined_figures() -> None:
    gauges = {name: samples for name, _, _, samples in figure_gauges(FIGURES)}
    assert gauges["cxr_agreement_sensitivity"] == [(["cxr<b> 2.0", "1.2.3"], 0.75)]
    assert (["cxr<b> 2.0", "1.2.3", "low"], 0.6) in gauges["cxr_agreement_roc_auc"]
    assert gauges["cxr_drift_warning"] == [(["cxr<b> 2.0", "1.2.3"], 1.0)]
    assert len(gauges["cxr_drift_recent_scores"]) == 2  # the other bundle too, untested
    assert len(gauges["cxr_drift_p_value"]) == 1
