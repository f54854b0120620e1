"""training.invariance: the alterations, the change summary, the audit through a real bundle."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import cv2
import numpy as np
import pytest

from tests.conftest import PLUMBING_BUNDLE
from training.card import summary_lines, target_lines
from training.data import Record
from training.invariance import (
    black_border,
    change_summary,
    downscale_2x,
    invariance_audit,
    invariance_lines,
    jpeg_q75,
)
from training.results import EstimateJson, EvaluationReport
from worker.classes import CxrClass


def _chest_like(h: int = 300, w: int = 260, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    body = 120 + 80 * np.exp(-(((xx - w / 2) / (w / 3)) ** 2))
    lungs = ((np.abs(xx - w * 0.3) < w * 0.12) | (np.abs(xx - w * 0.7) < w * 0.12)) & (
        (yy > h * 0.2) & (yy < h * 0.8)
    )
    img = body - 70 * lungs + rng.normal(0, 6, (h, w))
    chest: np.ndarray = np.clip(img, 0, 255).astype(np.uint8)
    return chest


def test_alterations_keep_type_and_change_only_what_they_say() -> None:
    img = _chest_like()
    j = jpeg_q75(img)
    assert j.shape == img.shape and j.dtype == np.uint8
    assert 0 < np.mean(np.abs(j.astype(int) - img)) < 10  # lossy, but the same picture
    d = downscale_2x(img)
    assert d.shape == img.shape and d.dtype == np.uint8
    assert not np.array_equal(d, img)
    b = black_border(img, 0.1)
    assert b.shape == (img.shape[0] + 2 * 30, img.shape[1] + 2 * 26)
    assert b[:30].max() == 0 and b[:, :26].max() == 0
    assert np.array_equal(b[30:-30, 26:-26], img)


def test_change_summary_numbers() -> None:
    base = np.array([0.1, 0.5, 0.9, 0.3])
    altered = np.array([0.1, 0.6, 0.6, 0.31])
    s = change_summary(base, altered)
    assert s["n"] == 4
    assert s["mean_abs_change"] == pytest.approx((0 + 0.1 + 0.3 + 0.01) / 4)
    assert s["max"] == pytest.approx(0.3)
    assert s["fraction_over_0.05"] == pytest.approx(0.5)
    assert s["fraction_over_0.2"] == pytest.approx(0.25)
    assert s["meets_target"] is False
    assert change_summary(base, base + 0.01)["meets_target"] is True


def test_audit_runs_the_served_path(tmp_path: Path) -> None:
    records = []
    for i in range(6):
        path = tmp_path / f"img{i}.png"
        cv2.imwrite(str(path), _chest_like(seed=i, w=240 + 10 * i))
        records.append(
            Record(
                id=f"img{i}",
                image=str(path),
                patient_group=f"p{i}",
                label=CxrClass(i % 2),
                label_text="covid" if i % 2 else "negative",
                source="synthetic",
            )
        )
    out = invariance_audit(PLUMBING_BUNDLE, records, batch=4, figure=tmp_path / "inv.png")
    assert out["images"] == 6
    assert set(out["alterations"]) == {"jpeg_q75", "downscale_2x", "black_border"}
    for s in out["alterations"].values():
        assert s["n"] == 6
        assert 0.0 <= s["mean_abs_change"] <= s["max"] <= 1.0
        assert set(s["per_source_mean_abs_change"]) == {"synthetic"}
    text = "\n".join(invariance_lines(out))
    assert "| jpeg_q75" in text and "black_border" in text


def test_target_lines_report_unmet_targets() -> None:
    def est(v: float) -> EstimateJson:
        return {"value": v, "low": v - 0.01, "high": v + 0.01, "splits": 1, "samples": 100}

    # only the sections the targets read
    report = cast(
        EvaluationReport,
        {
            "same_source": {"estimates": {"roc_auc": est(0.80)}},
            "shortcut_audit": {
                "lung_masking": {
                    "original": est(0.95),
                    "lungs_masked_out": est(0.60),
                    "lungs_only": est(0.93),
                }
            },
            "retrieval": {"estimates": {"accuracy": est(0.90)}},
        },
    )
    text = "\n".join(target_lines(report))
    assert "| same-source ROC AUC >= 0.90 | 0.800 | NOT met |" in text
    assert "| AUC with the lungs masked out <= 0.65 | 0.600 | met |" in text
    assert "0.930 vs 0.950 | met |" in text
    assert "| kNN-4 vote accuracy >= 0.85 | 0.900 | met |" in text
    summary = "\n".join(summary_lines(report))
    assert "Of 4 release targets, 3 are met; not met: same-source ROC AUC >= 0.90." in summary
    assert "has **not** shown" in summary
    report["same_source"] = {"sources": ["ieee8023"], "estimates": {"roc_auc": est(0.95)}}
    summary = "\n".join(summary_lines(report))
    assert "Of 4 release targets, 4 are met." in summary and "not** shown" not in summary
