"""`cxr-train calibrate BUNDLE DATASET`: a new threshold for a stated sensitivity, chosen on a
hospital's own labelled images (e.g. `cxr-node export-dataset`), as a new bundle version.

1. Score the dataset the way the node does (onnxruntime only, no torch): decode, the input
   gate's pixel checks, preprocessing, U-Net, the gate's model checks, the members. Images
   the gate refuses are not scored (the node would not score them either) and are counted.
2. The threshold: the highest t with sensitivity(t) >= the target (score >= t: positive).
   Its 95 % interval, and those of sensitivity and specificity at t, come from a percentile
   bootstrap over whole patient groups (training.metrics.bootstrap_indices, seeded): on each
   resample the threshold is chosen again; sensitivity and specificity are measured at t.
3. The new bundle: a copy with the same networks (checksums unchanged), the new threshold, a
   new version and device UID (every SR names the model version that made it), the source
   bundle's hospital-index space (same embeddings), the calibration set's scores as the
   reference distribution of the node's drift check, `calibration` in the manifest and a
   model-card section saying on what it was calibrated. `cxr-node models install` takes it
   like any other bundle.

The figures are measured on the images the threshold was chosen on, so they are optimistic;
the node's live agreement figures show how it does on the cases that follow.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid

from training.data import DataError, Record, read_dataset, read_display_image
from training.metrics import bootstrap_indices, percentile_ci
from worker.bundle import (
    MANIFEST_NAME,
    Bundle,
    Calibration,
    Interval,
    Manifest,
    ReferenceScores,
    load_bundle,
)
from worker.gate import GateVerdict, sanity_signals
from worker.inference import Ensemble
from worker.preprocess import preprocess

MODEL_CARD = "model_card.md"


class CalibrationError(Exception):
    """The bundle cannot be calibrated on this dataset; the message says why."""


@dataclass(frozen=True)
class Scored:
    """The dataset's scored images: labels (1 covid), scores, patient groups."""

    ids: list[str]
    y: np.ndarray
    score: np.ndarray
    groups: np.ndarray
    refused: int  # images the input gate refused


@dataclass(frozen=True)
class Rates:
    sensitivity: Interval
    specificity: Interval


@dataclass(frozen=True)
class Choice:
    target: float
    threshold: Interval
    at_threshold: Rates
    at_previous: Rates
    resamples: int
    seed: int


def score_records(
    bundle: Bundle,
    records: list[Record],
    progress: Callable[[Iterable[Record]], Iterable[Record]] = lambda r: r,
) -> Scored:
    """Each record through the node's scoring path (worker.inference, worker.gate)."""
    ensemble = Ensemble(bundle)
    manifest = bundle.manifest
    ids: list[str] = []
    y: list[int] = []
    scores: list[float] = []
    groups: list[str] = []
    refused = 0
    for record in progress(records):
        display = read_display_image(record.image)
        gate = manifest.gate
        if gate is not None and not GateVerdict.of(sanity_signals(display, gate.sanity)).analyse:
            refused += 1
            continue
        image = preprocess(display, manifest.preprocessing)
        segmented = ensemble.segment(image[None])
        if ensemble.gate is not None:
            signals = ensemble.gate.model_signals(image, segmented.lung_maps[0, 0])
            if not GateVerdict.of(signals).analyse:
                refused += 1
                continue
        (prediction,) = ensemble.classify(segmented)
        ids.append(record.id)
        y.append(int(record.label))
        scores.append(prediction.probability)
        groups.append(record.patient_group)
    return Scored(ids, np.array(y, dtype=np.int64), np.array(scores), np.array(groups), refused)


def threshold_for_sensitivity(positive_scores: np.ndarray, target: float) -> float:
    """The highest t such that at least `target` of the positives score >= t."""
    if not len(positive_scores):
        return math.nan
    ordered = np.sort(positive_scores)[::-1]
    needed = max(1, math.ceil(target * len(ordered) - 1e-9))
    return float(ordered[needed - 1])


def _rates(y: np.ndarray, score: np.ndarray, t: float) -> tuple[float, float]:
    pos, neg = score[y == 1], score[y == 0]
    sens = float(np.mean(pos >= t)) if len(pos) else math.nan
    spec = float(np.mean(neg < t)) if len(neg) else math.nan
    return sens, spec


def choose(scored: Scored, target: float, previous: float, resamples: int, seed: int) -> Choice:
    """The threshold for `target` sensitivity, with its interval and the rates at it (and at
    the previous threshold), by a bootstrap over patient groups."""
    y, score = scored.y, scored.score
    if not np.any(y == 1):
        raise CalibrationError("the dataset holds no scored positive image: no sensitivity")
    if not np.any(y == 0):
        raise CalibrationError("the dataset holds no scored negative image: no specificity")
    t = threshold_for_sensitivity(score[y == 1], target)
    rng = np.random.default_rng(seed)
    boot_t: list[float] = []
    boot: dict[str, list[float]] = {n: [] for n in ("sens", "spec", "prev_sens", "prev_spec")}
    for idx in bootstrap_indices(len(y), scored.groups, resamples, rng):
        yb, sb = y[idx], score[idx]
        boot_t.append(threshold_for_sensitivity(sb[yb == 1], target))
        for prefix, at in (("", t), ("prev_", previous)):
            sens, spec = _rates(yb, sb, at)
            boot[f"{prefix}sens"].append(sens)
            boot[f"{prefix}spec"].append(spec)

    def interval(value: float, values: list[float]) -> Interval:
        low, high = percentile_ci(np.array(values))
        return Interval(value=value, low=low, high=high)

    sens, spec = _rates(y, score, t)
    prev_sens, prev_spec = _rates(y, score, previous)
    return Choice(
        target=target,
        threshold=interval(t, boot_t),
        at_threshold=Rates(interval(sens, boot["sens"]), interval(spec, boot["spec"])),
        at_previous=Rates(
            interval(prev_sens, boot["prev_sens"]), interval(prev_spec, boot["prev_spec"])
        ),
        resamples=resamples,
        seed=seed,
    )


def _text(i: Interval, digits: int = 4) -> str:
    if not math.isfinite(i.low):
        return f"{i.value:.{digits}f}"
    return f"{i.value:.{digits}f} ({i.low:.{digits}f}-{i.high:.{digits}f})"


def card_section(manifest: Manifest, previous: Manifest, dataset_name: str) -> str:
    """The model card's words for the calibration (`manifest.calibration`)."""
    c = manifest.calibration
    assert c is not None
    return "\n".join(
        [
            "",
            f"## Calibration on {dataset_name} ({c.calibrated_at:%Y-%m-%d})",
            "",
            f"`cxr-train calibrate` on {c.dataset}: {c.images} images of {c.patient_groups} "
            f"patient groups ({c.positives} COVID-19, {c.negatives} negative)"
            + (
                f"; {c.not_scored} images refused by the input gate were not scored"
                if c.not_scored
                else ""
            )
            + ".",
            "",
            f"Networks, preprocessing, input gate and reference set are those of {previous.name} "
            f"{previous.version} (device UID {previous.device_uid}), unchanged. Only the "
            f"threshold is new: {_text(c.threshold)}, the highest with a sensitivity of at "
            f"least {c.target_sensitivity:g} on these images (previously "
            f"{c.previous_threshold:.4f}).",
            "",
            "| threshold | sensitivity | specificity |",
            "|---|---|---|",
            f"| new {c.threshold.value:.4f} | {_text(c.sensitivity)} | {_text(c.specificity)} |",
            f"| previous {c.previous_threshold:.4f} | {_text(c.previous_sensitivity)} | "
            f"{_text(c.previous_specificity)} |",
            "",
            f"95 % intervals: percentile bootstrap over patient groups ({c.bootstrap} "
            f"resamples, seed {c.seed}); the threshold is chosen again on each resample. The "
            "figures are measured on the images the threshold was chosen on: expect fewer on "
            "new cases (the node's status page measures them live).",
            "",
            "The node's drift check compares recent scores with this calibration set's "
            f"{c.images} scores (`reference_scores`).",
            "",
        ]
    )


def calibrated_manifest(
    previous: Manifest,
    scored: Scored,
    choice: Choice,
    dataset: Path,
    version: str | None,
    now: datetime,
) -> Manifest:
    """The new version's manifest: the previous one with the new threshold and its record."""
    digest = hashlib.sha256(dataset.read_bytes()).hexdigest()
    calibration = Calibration(
        dataset=f"{dataset.name} (sha256 {digest})",
        images=len(scored.y),
        patient_groups=len(set(scored.groups.tolist())),
        positives=int(np.sum(scored.y == 1)),
        negatives=int(np.sum(scored.y == 0)),
        not_scored=scored.refused,
        target_sensitivity=choice.target,
        threshold=choice.threshold,
        sensitivity=choice.at_threshold.sensitivity,
        specificity=choice.at_threshold.specificity,
        bootstrap=choice.resamples,
        seed=choice.seed,
        previous_version=previous.version,
        previous_device_uid=previous.device_uid,
        previous_threshold=previous.threshold,
        previous_sensitivity=choice.at_previous.sensitivity,
        previous_specificity=choice.at_previous.specificity,
        calibrated_at=now,
    )
    separator = "." if "+" in previous.version else "+"
    return previous.model_copy(
        update={
            "version": version or f"{previous.version}{separator}cal{now:%Y%m%d%H%M}",
            "created": now,
            "device_uid": generate_uid(),
            "threshold": float(np.clip(choice.threshold.value, 0.0, 1.0)),
            "embedding_space": previous.hospital_space,
            "reference_scores": ReferenceScores(
                source=f"calibration set {dataset.name}: {len(scored.score)} images",
                scores=sorted(float(s) for s in scored.score),
            ),
            "calibration": calibration,
        }
    )


def write_calibrated(source: Bundle, manifest: Manifest, out: Path, dataset_name: str) -> Bundle:
    """Copy the bundle to `out` with the new manifest and card section; check it loads."""
    if out.exists() and any(out.iterdir()):
        raise CalibrationError(f"{out} exists and is not empty")
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source.root, staging, symlinks=False)
    (staging / MANIFEST_NAME).write_text(
        json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n", encoding="utf-8"
    )
    card = staging / MODEL_CARD
    before = card.read_text(encoding="utf-8") if card.is_file() else ""
    card.write_text(before + card_section(manifest, source.manifest, dataset_name), "utf-8")
    load_bundle(staging)  # every checksum, before it is used
    if out.exists():
        out.rmdir()
    staging.rename(out)
    return load_bundle(out)


def dataset_csv(dataset: Path) -> Path:
    """The CSV of a dataset given as the CSV or its folder (export-dataset's metadata.csv)."""
    dataset = Path(dataset)
    return dataset / "metadata.csv" if dataset.is_dir() else dataset


def calibrate(
    bundle_dir: Path,
    dataset: Path,
    out: Path,
    target: float,
    resamples: int = 1000,
    seed: int = 0,
    version: str | None = None,
    progress: Callable[[Iterable[Record]], Iterable[Record]] = lambda r: r,
) -> tuple[Bundle, Scored, Choice]:
    """The whole command: read, score, choose, write. Returns the new bundle."""
    if not 0.0 < target <= 1.0:
        raise CalibrationError(f"the target sensitivity must be in (0, 1], not {target}")
    source = load_bundle(bundle_dir)
    csv_path = dataset_csv(dataset)
    try:
        records, _ = read_dataset(csv_path)
    except (DataError, OSError) as exc:
        raise CalibrationError(str(exc)) from exc
    scored = score_records(source, records, progress)
    choice = choose(scored, target, source.manifest.threshold, resamples, seed)
    now = datetime.now(UTC)
    manifest = calibrated_manifest(source.manifest, scored, choice, csv_path, version, now)
    name = csv_path.parent.name if csv_path.name == "metadata.csv" else csv_path.name
    return write_calibrated(source, manifest, Path(out), name), scored, choice
