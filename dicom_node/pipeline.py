"""Node-host steps of a job, free of Celery: prepare -> (worker infers) -> finalize -> deliver.

Each step reads and writes the ledger and the data folder, and is idempotent: a redelivered
queue message finds the job already past that step and does nothing.
"""

from __future__ import annotations

import io
import logging
import threading
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from pydicom import Dataset, dcmread

from dicom_node.delivery import OUTBOX, DeliveryError, backoff_seconds, send_file, to_outbox
from dicom_node.ledger import UNFINISHED, DeliveryState, JobState, Ledger
from dicom_node.pixels import PixelDecodeError, decode_display
from dicom_node.report import ReportOptions, ReportUids, build_sr
from dicom_node.retrieval import ReferenceIndex
from dicom_node.settings import Destination, Settings
from dicom_node.spool import write_durably
from worker.bundle import Bundle, load_bundle
from worker.contracts import InferRequest, InferResult, encode_png
from worker.preprocess import preprocess

log = logging.getLogger(__name__)


class NodeRuntime:
    """What the node host's steps share inside one process; loaded on first use."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()

    @cached_property
    def ledger(self) -> Ledger:
        return Ledger(self.settings.ledger_path)

    @cached_property
    def bundle(self) -> Bundle:
        with self._lock:
            return load_bundle(self.settings.bundle)

    @cached_property
    def reference_index(self) -> ReferenceIndex:
        return ReferenceIndex(self.bundle)

    def result_path(self, job_id: str) -> Path:
        return self.settings.results_dir / f"{job_id}-sr.dcm"

    @property
    def destinations(self) -> list[str]:
        return [str(d) for d in self.settings.destinations] or [OUTBOX]


def prepare(node: NodeRuntime, job_id: str) -> InferRequest | None:
    """Decode and preprocess a spooled instance; None when there is nothing to infer."""
    job = node.ledger.get(job_id)
    if job is None or job.state not in UNFINISHED or not job.spool_path:
        return None
    ds = dcmread(job.spool_path)
    try:
        display = decode_display(ds, max_pixels=node.settings.max_pixels)
    except PixelDecodeError as exc:
        node.ledger.set_state(job_id, JobState.REJECTED, f"pixel data not analysable: {exc}")
        log.warning("job %s: not analysable: %s", job_id, exc)
        return None
    image = preprocess(display, node.bundle.manifest.preprocessing)
    node.ledger.set_state(job_id, JobState.ANALYSING, only_from=UNFINISHED)
    return InferRequest(
        job_id=job_id, bundle_fingerprint=node.bundle.fingerprint, image_png=encode_png(image)
    )


def analysis_failed(node: NodeRuntime, job_id: str, error: str) -> None:
    node.ledger.set_state(
        job_id, JobState.FAILED, f"analysis failed: {error}", only_from=UNFINISHED
    )
    log.error("job %s: analysis failed: %s", job_id, error)


def build_report(
    node: NodeRuntime, source: Dataset, result: InferResult, sr_series_uid: str, sr_sop_uid: str
) -> Dataset:
    similar = node.reference_index.query(result.embedding, node.settings.similar_k)
    options = ReportOptions(
        include_similar=node.settings.similar_k > 0,
        include_similar_labels=node.settings.similar_labels,
    )
    uids = ReportUids(series_instance_uid=sr_series_uid, sop_instance_uid=sr_sop_uid)
    return build_sr(source, result, node.bundle.manifest, similar, uids, options)


def finalize(node: NodeRuntime, result: InferResult) -> list[str]:
    """Build and store the SR; return the destinations it is still to be delivered to."""
    job = node.ledger.get(result.job_id)
    if job is None or job.state not in UNFINISHED or not job.spool_path:
        return []
    source = dcmread(job.spool_path, stop_before_pixels=True)
    sr = build_report(node, source, result, job.sr_series_uid, job.sr_sop_uid)
    buffer = io.BytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    write_durably(node.result_path(job.job_id), buffer.getvalue())
    node.ledger.add_deliveries(job.job_id, node.destinations)
    node.ledger.set_state(
        job.job_id, JobState.ANALYSED, probability=result.probability, only_from=UNFINISHED
    )
    log.info(
        "job %s: analysed, p=%.3f, bundle %s %s, %.0f ms inference",
        job.job_id,
        result.probability,
        result.bundle_name,
        result.bundle_version,
        result.inference_ms,
    )
    return [
        d.destination
        for d in node.ledger.deliveries(job.job_id)
        if d.state is DeliveryState.PENDING
    ]


@dataclass(frozen=True)
class DeliveryOutcome:
    delivered: bool
    retry_in: float | None = None


def deliver(node: NodeRuntime, job_id: str, destination: str) -> DeliveryOutcome:
    """One delivery attempt; says whether and when to try again."""
    pending = [
        d
        for d in node.ledger.deliveries(job_id)
        if d.destination == destination and d.state is DeliveryState.PENDING
    ]
    if not pending:
        return DeliveryOutcome(delivered=False)
    path = node.result_path(job_id)
    try:
        if destination == OUTBOX:
            to_outbox(path, node.settings.outbox_dir)
        else:
            send_file(path, Destination.parse(destination), node.settings.ae_title)
    except (DeliveryError, OSError) as exc:
        error = str(exc)
        attempts = pending[0].attempts + 1
        final = attempts >= node.settings.delivery_attempts
        state = DeliveryState.FAILED if final else DeliveryState.PENDING
        node.ledger.record_attempt(job_id, destination, state, error)
        if final:
            log.error(
                "job %s: delivery to %s failed after %d attempts, dead-lettered: %s",
                job_id,
                destination,
                attempts,
                error,
            )
            return DeliveryOutcome(delivered=False)
        delay = backoff_seconds(attempts, node.settings.delivery_backoff_s)
        log.warning(
            "job %s: delivery to %s failed (attempt %d), retry in %.0f s: %s",
            job_id,
            destination,
            attempts,
            delay,
            error,
        )
        return DeliveryOutcome(delivered=False, retry_in=delay)
    node.ledger.record_attempt(job_id, destination, DeliveryState.DELIVERED)
    log.info("job %s: SR delivered to %s", job_id, destination)
    return DeliveryOutcome(delivered=True)
