"""`cxr-train calibrate`: a threshold for a stated sensitivity, as a new bundle version."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from dicom_node.jobs.model_store import ModelStore, smoke_test
from tests.conftest import PLUMBING_BUNDLE
from tests.synthetic import synthetic_cr, write
from training.calibrate import (
    CalibrationError,
    Scored,
    calibrate,
    choose,
    threshold_for_sensitivity,
)
from worker.bundle import load_bundle

pytestmark = pytest.mark.train  # scikit-learn (training.metrics)


def test_threshold_is_the_highest_that_reaches_the_sensitivity() -> None:
    rng = np.random.default_rng(0)
    for n in (1, 5, 37):
        scores = np.round(rng.random(n), 1)  # ties
        for target in (0.5, 0.8, 0.9, 1.0):
            t = threshold_for_sensitivity(scores, target)
            assert np.mean(scores >= t) >= target
            higher = [c for c in np.unique(scores) if c > t]
            assert all(np.mean(scores >= c) < target for c in higher)


def _scored(n: int, seed: int) -> Scored:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.5).astype(np.int64)
    score = np.clip(rng.normal(0.4 + 0.2 * y, 0.15), 0, 1)
    groups = np.array([f"g{i // 2}" for i in range(n)])  # two images per patient
    return Scored([f"i{i}" for i in range(n)], y, score, groups, refused=0)


def test_choice_with_bootstrap_intervals_over_patient_groups() -> None:
    scored = _scored(120, 1)
    choice = choose(scored, 0.9, previous=0.5, resamples=200, seed=0)
    t = choice.threshold
    assert t.low <= t.value <= t.high and t.low < t.high
    sens = choice.at_threshold.sensitivity
    assert sens.value >= 0.9 and sens.low <= sens.value <= sens.high
    assert choice == choose(scored, 0.9, previous=0.5, resamples=200, seed=0)  # seeded
    prev = choice.at_previous.sensitivity.value
    assert prev == pytest.approx(np.mean(scored.score[scored.y == 1] >= 0.5))
    only_negatives = Scored(["a"], np.array([0]), np.array([0.3]), np.array(["g"]), 0)
    with pytest.raises(CalibrationError, match="no scored positive"):
        choose(only_negatives, 0.9, 0.5, 10, 0)


def _dataset(folder: Path, n: int) -> Path:
    folder.mkdir()
    rows = []
    for i in range(n):
        write(synthetic_cr(size=96, seed=i), folder / f"{i}.dcm")
        rows.append(
            {
                "image": f"{i}.dcm",
                "patient_group": f"p{i % 5}",
                "label": "covid" if i % 2 else "negative",
            }
        )
    with (folder / "metadata.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["image", "patient_group", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return folder


def test_calibrated_bundle_installs_and_keeps_the_networks(tmp_path: Path) -> None:
    data = _dataset(tmp_path / "site", 10)
    out = tmp_path / "calibrated"
    new, scored, choice = calibrate(PLUMBING_BUNDLE, data, out, 0.8, resamples=50)
    source = load_bundle(PLUMBING_BUNDLE).manifest
    m = new.manifest
    assert len(scored.y) == 10 and scored.refused == 0  # the plumbing bundle has no gate
    assert m.threshold == pytest.approx(threshold_for_sensitivity(scored.score[scored.y == 1], 0.8))
    assert m.device_uid != source.device_uid and m.version.startswith(f"{source.version}+cal")
    assert m.hospital_space == source.device_uid  # the same embeddings: the same index
    assert [x.sha256 for x in m.members] == [x.sha256 for x in source.members]
    assert m.reference_scores is not None and m.reference_scores.scores == sorted(scored.score)
    c = m.calibration
    assert c is not None and (c.positives, c.negatives, c.patient_groups) == (5, 5, 5)
    assert c.previous_device_uid == source.device_uid and c.target_sensitivity == 0.8
    card = (out / "model_card.md").read_text()
    assert "## Calibration on site" in card and f"{m.threshold:.4f}" in card
    target = ModelStore(tmp_path / "models").install(out, PLUMBING_BUNDLE, smoke_test)
    assert load_bundle(target).manifest.device_uid == m.device_uid
    with pytest.raises(CalibrationError, match="not empty"):
        calibrate(PLUMBING_BUNDLE, data / "metadata.csv", out, 0.8, resamples=10)
    with pytest.raises(CalibrationError, match="target sensitivity"):
        calibrate(PLUMBING_BUNDLE, data, tmp_path / "x", 0.0)
    assert choice.threshold.value == m.threshold
