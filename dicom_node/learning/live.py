"""The live figures per bundle version: agreement with confirmed diagnoses, and drift.

A pair is one study with a confirmed diagnosis (`cxr-node label`) and the score a bundle gave
it: the highest score among the study's analysed instances (a study counts as positive when
any of its images does), per bundle version (device UID) that scored it. Diagnoses live in
the hospital store, scores in the ledger; neither is copied into the other.

Drift compares the scores of every instance a bundle analysed in the last `drift_days`
(per instance: the reference distribution is one score per image) with the bundle's
`reference_scores`.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dicom_node.jobs.model_store import ModelStore
from dicom_node.learning.agreement import Agreement, agreement
from dicom_node.learning.drift import Drift, drift_check
from dicom_node.records.ledger import Ledger, ScoredJob
from dicom_node.results.hospital_index import HospitalStore
from dicom_node.settings import Settings
from worker.bundle import BundleError, Manifest, load_bundle

log = logging.getLogger(__name__)

POSITIVE = "covid"


@dataclass(frozen=True)
class LiveSettings:
    """The settings the figures read (`Settings` fields of the same names)."""

    agreement_bootstrap: int = 1000
    drift_days: float = 30.0
    drift_alpha: float = 0.01
    drift_min_scores: int = 30

    @classmethod
    def of(cls, settings: Settings) -> LiveSettings:
        return cls(
            agreement_bootstrap=settings.agreement_bootstrap,
            drift_days=settings.drift_days,
            drift_alpha=settings.drift_alpha,
            drift_min_scores=settings.drift_min_scores,
        )


@dataclass(frozen=True)
class BundleFigures:
    """What the status page, `cxr-node status` and /metrics show for one bundle version."""

    device_uid: str  # "" for scores recorded before the model version was
    name: str
    version: str
    agreement: Agreement | None  # None: no study it scored has a confirmed diagnosis
    drift: Drift | None  # None: it scored nothing in the drift window

    @property
    def label(self) -> str:
        return f"{self.name} {self.version}".strip()


def study_scores(jobs: Iterable[ScoredJob]) -> dict[tuple[str, str], float]:
    """(device UID, study) -> the study's highest score by that bundle."""
    out: dict[tuple[str, str], float] = {}
    for job in jobs:
        key = (job.device_uid or "", job.study_instance_uid)
        out[key] = max(out.get(key, job.probability), job.probability)
    return out


def known_manifests(bundle_folders: Iterable[Path]) -> dict[str, Manifest]:
    """Device UID -> manifest of every bundle that can be found (unreadable ones skipped)."""
    found: dict[str, Manifest] = {}
    for folder in bundle_folders:
        try:
            manifest = load_bundle(folder, verify_checksums=False).manifest
        except BundleError as exc:
            log.debug("bundle %s not readable for the figures: %s", folder, exc)
            continue
        found.setdefault(manifest.device_uid, manifest)
    return found


@functools.lru_cache(maxsize=64)
def _agreement(
    scores: tuple[float, ...], positive: tuple[bool, ...], threshold: float | None, resamples: int
) -> Agreement:
    # the bootstrap costs time: computed again only when the pairs or the threshold change
    return agreement(np.array(scores), np.array(positive, dtype=bool), threshold, resamples)


def live_figures(
    ledger: Ledger,
    diagnoses: dict[str, str],
    manifests: dict[str, Manifest],
    settings: LiveSettings,
    now: float | None = None,
) -> list[BundleFigures]:
    """The figures of every bundle version that scored a labelled study or a recent instance,
    the most recently active first."""
    now = time.time() if now is None else now
    labelled = study_scores(ledger.scored(studies=diagnoses)) if diagnoses else {}
    recent = ledger.scored(since=now - settings.drift_days * 86400.0)
    by_bundle: dict[str, list[tuple[float, bool]]] = {}
    for (device_uid, study), score in sorted(labelled.items()):
        by_bundle.setdefault(device_uid, []).append((score, diagnoses[study] == POSITIVE))
    recent_scores: dict[str, list[float]] = {}
    last_seen: dict[str, float] = {}
    for job in recent:
        uid = job.device_uid or ""
        recent_scores.setdefault(uid, []).append(job.probability)
        last_seen[uid] = max(last_seen.get(uid, 0.0), job.received_at)
    out = []
    for uid in sorted(set(by_bundle) | set(recent_scores), key=lambda u: -last_seen.get(u, 0.0)):
        manifest = manifests.get(uid)
        threshold = manifest.threshold if manifest is not None else None
        pairs = by_bundle.get(uid, [])
        figures = None
        if pairs:
            scores, positive = zip(*pairs, strict=True)
            figures = _agreement(scores, positive, threshold, settings.agreement_bootstrap)
        drift = None
        if uid in recent_scores:
            reference = manifest.reference_scores if manifest is not None else None
            drift = drift_check(
                np.array(recent_scores[uid]),
                np.array(reference.scores) if reference is not None else None,
                settings.drift_alpha,
                settings.drift_min_scores,
            )
        out.append(
            BundleFigures(
                device_uid=uid,
                name=manifest.name if manifest is not None else "",
                version=manifest.version if manifest is not None else _unknown(uid),
                agreement=figures,
                drift=drift,
            )
        )
    return out


def _unknown(device_uid: str) -> str:
    return f"(not installed: {device_uid})" if device_uid else "(scored before versions were kept)"


def bundle_folders(settings: Settings) -> list[Path]:
    """Where the bundles that may have scored something are: the configured one and every
    installed one."""
    return [settings.bundle, *ModelStore(settings.models_dir).folders()]


def figures_source(settings: Settings, ledger: Ledger) -> Callable[[], list[BundleFigures]]:
    """`live_figures` read afresh on each call (the status page, a scrape, `cxr-node status`).
    The hospital store is opened only when it exists: reading never creates it."""
    hospital_db = settings.hospital_dir / "hospital.sqlite3"
    slice_ = LiveSettings.of(settings)

    def read() -> list[BundleFigures]:
        diagnoses = (
            HospitalStore(settings.hospital_dir).diagnoses() if hospital_db.is_file() else {}
        )
        manifests = known_manifests(bundle_folders(settings))
        return live_figures(ledger, diagnoses, manifests, slice_)

    return read
