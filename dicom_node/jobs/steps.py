"""Node-host steps of a job, free of Celery: prepare -> (worker infers) -> finalize -> deliver.

The steps the tasks call - prepare, finalize, deliver, analysis_failed - are the edges: they
read and write the ledger, the data folder and the metrics (held by `NodeRuntime`), and each
is idempotent: a redelivered queue message finds the job already past that step and does
nothing. Each resolves its bundle once - prepare the one in use now, finalize the one that
produced the result - and passes it on: the functions between (infer_request, load_source,
locate_lungs, find_similar, build_report, build_summary, build_lung_seg, remember) take what
they use, a manifest or an index of that bundle among it, and touch no ledger or metrics.

finalize: load the source -> lung outline on it -> similar items -> SR [+ SC] [+ SEG] ->
remember the image in the hospital index -> deliveries per object and destination.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import Path

import numpy as np
from pydicom import Dataset, dcmread

from dicom_node.jobs.model_store import BundleCache, ModelStore
from dicom_node.logs import describe_failure
from dicom_node.records.audit import AuditLog
from dicom_node.records.durable import write_durably
from dicom_node.records.ledger import (
    UNFINISHED,
    Delivery,
    DeliveryState,
    JobState,
    Ledger,
    OutputKind,
    OutputUids,
)
from dicom_node.records.metrics_store import MetricsStore
from dicom_node.results.delivery import (
    OUTBOX,
    backoff_seconds,
    outbox_name,
    send_files,
    to_outbox,
)
from dicom_node.results.display import Display
from dicom_node.results.display_cache import DisplayCache
from dicom_node.results.hospital_index import HospitalEntry, HospitalIndex
from dicom_node.results.labels import similar_cases_line
from dicom_node.results.lungs import lung_map_on_image, lung_mask, lung_outlines
from dicom_node.results.pixels import PixelDecodeError
from dicom_node.results.reduced_decode import TargetSize, decode_display_at
from dicom_node.results.reference_index import ReferenceIndex
from dicom_node.results.sc.builder import ScOptions, build_sc
from dicom_node.results.sc.render import SummaryFacts, render_summary
from dicom_node.results.seg.builder import SegOptions, build_seg
from dicom_node.results.sr.builder import (
    ReportOptions,
    build_sr,
    disagreement_text,
    is_present,
)
from dicom_node.results.sr.not_analysed import build_not_analysed_sr
from dicom_node.settings import Destination, Settings, SummarySyntaxName
from worker.bundle import Bundle, Manifest
from worker.contracts import (
    GateRefusal,
    InferRequest,
    InferResult,
    SimilarItem,
    decode_png,
    encode_png,
)
from worker.gate import GateVerdict, sanity_signals
from worker.preprocess import PreprocessParams, preprocess, preprocess_geometry

log = logging.getLogger(__name__)


class NodeRuntime:
    """What the node host's steps share inside one process; loaded on first use."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._reference: dict[str, ReferenceIndex] = {}
        self._hospital: dict[str, HospitalIndex] = {}

    @cached_property
    def ledger(self) -> Ledger:
        return Ledger(self.settings.ledger_path)

    @cached_property
    def bundles(self) -> BundleCache:
        return BundleCache(
            lambda: self.settings.bundle_in_use, ModelStore(self.settings.models_dir)
        )

    @cached_property
    def metrics(self) -> MetricsStore:
        return MetricsStore(self.settings.metrics_path)

    @cached_property
    def audit(self) -> AuditLog:
        return AuditLog(self.settings.audit_path)

    def reference_index_for(self, bundle: Bundle) -> ReferenceIndex:
        key = bundle.manifest.device_uid
        with self._lock:
            if key not in self._reference:
                self._reference[key] = ReferenceIndex(bundle)
            return self._reference[key]

    def hospital_index_for(self, bundle: Bundle) -> HospitalIndex:
        """A bundle's embedding space of the hospital index (node host only)."""
        manifest = bundle.manifest
        with self._lock:
            if manifest.hospital_space not in self._hospital:
                self._hospital[manifest.hospital_space] = HospitalIndex(
                    self.settings.hospital_dir,
                    space=manifest.hospital_space,
                    dim=manifest.index.dim,
                    metric=manifest.index.space,
                    m=manifest.index.m,
                    ef_construction=manifest.index.ef_construction,
                    ef_search=manifest.index.ef_search,
                )
            return self._hospital[manifest.hospital_space]

    @cached_property
    def display_cache(self) -> DisplayCache:
        """Display images decoded by prepare, for finalize in the same process."""
        return DisplayCache(self.settings.display_cache_mb * 1024 * 1024)

    def result_path(self, job_id: str, kind: OutputKind = OutputKind.SR) -> Path:
        return self.settings.results_dir / f"{job_id}-{kind}.dcm"

    @property
    def outputs(self) -> list[OutputKind]:
        """The objects each job produces, in sending order: the SR always."""
        kinds = [OutputKind.SR]
        if self.settings.produce_sc:
            kinds.append(OutputKind.SC)
        if self.settings.produce_seg:
            kinds.append(OutputKind.SEG)
        return kinds

    @property
    def destinations(self) -> list[str]:
        return [str(d) for d in self.settings.destinations] or [OUTBOX]


def prepare(node: NodeRuntime, job_id: str) -> InferRequest | GateRefusal | None:
    """Decode and preprocess a spooled instance for the bundle in use now; a GateRefusal when
    the bundle's input gate refuses the decoded pixels already (too small, blank, noise: see
    `not_analysed`); None when there is nothing to infer."""
    job = node.ledger.get(job_id)
    if job is None or job.state not in UNFINISHED or not job.spool_path:
        return None
    ds = dcmread(job.spool_path)
    bundle = node.bundles.current()
    target = display_target(node.settings, bundle.manifest)
    try:
        display = decode_display_at(ds, target, max_pixels=node.settings.max_pixels)
    except PixelDecodeError as exc:
        reason = f"pixel data not analysable: {exc}"
        if node.ledger.set_state(job_id, JobState.REJECTED, reason, only_from=UNFINISHED):
            node.metrics.inc("rejected")
        log.warning("job %s: %s", job_id, reason)  # the ledger's reason, word for word
        return None
    refusal = pixel_check(job_id, display, bundle)
    if refusal is not None:
        return refusal
    request = infer_request(job_id, display.image, bundle)
    node.display_cache.put(job_id, display)
    node.ledger.set_state(job_id, JobState.ANALYSING, only_from=UNFINISHED)
    node.metrics.observe("prepare", time.time() - job.received_at, once=job_id)
    return request


def display_target(settings: Settings, manifest: Manifest) -> TargetSize | None:
    """The smallest display image the outputs need; None: decode in full (CXR_DECODE_AT_SIZE
    off)."""
    if not settings.decode_at_size:
        return None
    return TargetSize.for_bundle(manifest, settings.summary_width)


def pixel_check(job_id: str, display: Display, bundle: Bundle) -> GateRefusal | None:
    """The input gate's checks of the decoded image itself (size, contrast, noise), which
    need no model; the worker checks the rest (lung fields, view, likeness to the training
    images). None: go on; also when the bundle has no gate. Size and aspect are the
    received image's, whatever size it was decoded at."""
    spec = bundle.manifest.gate
    if spec is None:
        return None
    verdict = GateVerdict.of(
        sanity_signals(display.image, spec.sanity, source_shape=display.grid.source_shape)
    )
    if verdict.analyse:
        return None
    manifest = bundle.manifest
    return GateRefusal(
        job_id=job_id,
        bundle_name=manifest.name,
        bundle_version=manifest.version,
        device_uid=manifest.device_uid,
        reasons=list(verdict.reasons),
        scores=verdict.scores(),
    )


def not_analysed(node: NodeRuntime, refusal: GateRefusal) -> list[str]:
    """The input gate refused the image: no score anywhere. The job ends `rejected` with the
    gate's reasons (ledger, status, metrics), and - unless `not_analysed_sr` is off - an SR
    that says so goes into the study. Returns the destinations still to deliver to."""
    job = node.ledger.get(refusal.job_id)
    if job is None or job.state not in UNFINISHED or not job.spool_path:
        return []
    node.display_cache.take(job.job_id)  # no summary image is made of it
    settings = node.settings
    if settings.not_analysed_sr:
        bundle = node.bundles.by_device_uid(refusal.device_uid)
        uids = node.ledger.output_uids(job.job_id)[OutputKind.SR]
        header = dcmread(job.spool_path, stop_before_pixels=True)
        sr = build_not_analysed_sr(header, refusal.reasons, bundle.manifest, uids, ReportOptions())
        _store(node, job.job_id, OutputKind.SR, sr)
        node.ledger.add_deliveries(job.job_id, node.destinations, [OutputKind.SR])
    reason = "not analysed (input gate): " + "; ".join(refusal.reasons)
    if node.ledger.set_state(job.job_id, JobState.REJECTED, reason, only_from=UNFINISHED):
        node.metrics.inc("rejected")
        node.metrics.inc("not_analysed")
    log.warning("job %s: %s", job.job_id, reason)  # scores and thresholds only: no patient data
    return _pending_destinations(node, job.job_id)


def not_analysed_or_fail(node: NodeRuntime, refusal: GateRefusal) -> list[str]:
    """`not_analysed`, with an error building or storing the SR ending the job failed."""
    return _results_or_fail(node, refusal.job_id, lambda: not_analysed(node, refusal))


def _store(node: NodeRuntime, job_id: str, kind: OutputKind, ds: Dataset) -> None:
    """A result object, durably in the results folder (delivery reads it from there)."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    write_durably(node.result_path(job_id, kind), buffer.getvalue())


def _pending_destinations(node: NodeRuntime, job_id: str) -> list[str]:
    """Where the job's objects still have to go, each destination once."""
    pending = [
        d.destination for d in node.ledger.deliveries(job_id) if d.state is DeliveryState.PENDING
    ]
    return list(dict.fromkeys(pending))


def _results_or_fail(node: NodeRuntime, job_id: str, build: Callable[[], list[str]]) -> list[str]:
    """`build` the job's results; an error building or storing them ends the job in the
    visible failed state (an operator can retry it) instead of being redone forever."""
    try:
        return build()
    except Exception as exc:
        analysis_failed(node, job_id, f"results not built: {describe_failure(exc)}")
        return []


def infer_request(job_id: str, display: np.ndarray, bundle: Bundle) -> InferRequest:
    """The worker's input: the display image preprocessed as `bundle` was trained."""
    image = preprocess(display, bundle.manifest.preprocessing)
    return InferRequest(
        job_id=job_id, bundle_fingerprint=bundle.fingerprint, image_png=encode_png(image)
    )


def analysis_failed(node: NodeRuntime, job_id: str, error: str) -> None:
    if node.ledger.set_state(
        job_id, JobState.FAILED, f"analysis failed: {error}", only_from=UNFINISHED
    ):
        node.metrics.inc("failed", stage="analysis")
    log.error("job %s: analysis failed: %s", job_id, error)


@dataclass(frozen=True)
class Source:
    """The received instance, loaded once for finalize."""

    header: Dataset  # without pixel data
    display: Display | None  # decoded display image; None if it cannot be decoded again


@dataclass(frozen=True)
class Lungs:
    """The worker's lung map on the source image's pixel grid."""

    mask: np.ndarray | None = None  # bool Rows x Columns
    outlines: list[np.ndarray] = field(default_factory=list)  # closed (col, row) polylines


def load_source(
    spool_path: str,
    display: Display | None,
    max_pixels: int,
    target: TargetSize | None = None,
) -> Source:
    """The header, and the display image: the one prepare kept (`display`), or decoded again
    (at a reduced size `target` allows; None: in full)."""
    if display is not None:
        return Source(header=dcmread(spool_path, stop_before_pixels=True), display=display)
    ds = dcmread(spool_path)
    try:
        display = decode_display_at(ds, target, max_pixels=max_pixels)
    except PixelDecodeError as exc:  # prepare decoded it, so this is unexpected
        log.error("source %s cannot be decoded again: %s", spool_path, exc)
        display = None
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if keyword in ds:
            delattr(ds, keyword)
    return Source(header=ds, display=display)


def locate_lungs(source: Source, result: InferResult, preprocessing: PreprocessParams) -> Lungs:
    """Undo the preprocessing geometry (of the bundle that produced `result`) on the worker's
    lung map, and the display image's reduction: the mask and outlines are on the received
    image's grid (Rows x Columns) whatever size it was decoded at."""
    if source.display is None or not result.lung_mask_png:
        return Lungs()
    display = source.display
    geometry = preprocess_geometry(display.image, preprocessing)
    mask = lung_mask(lung_map_on_image(decode_png(result.lung_mask_png), geometry, display.grid))
    return Lungs(mask=mask, outlines=lung_outlines(mask))


def patient_key(hospital: HospitalIndex, header: Dataset) -> str | None:
    return hospital.patient_key(
        str(header.get("PatientID") or ""), str(header.get("IssuerOfPatientID") or "")
    )


def find_similar(
    header: Dataset,
    result: InferResult,
    reference: ReferenceIndex,
    similar_k: int,
    hospital: HospitalIndex | None,
    hospital_k: int,
) -> list[SimilarItem]:
    """Earlier hospital studies of other patients first (none when `hospital` is None), then
    reference-set items; both indexes in the embedding space of the bundle that produced the
    result."""
    items: list[SimilarItem] = []
    if hospital is not None and hospital_k > 0:
        try:
            items += hospital.query(
                result.embedding,
                hospital_k,
                patient_key=patient_key(hospital, header),
                study_instance_uid=str(header.StudyInstanceUID),
            )
        except Exception:  # the result matters more than its neighbours
            log.exception(
                "job %s: hospital index query failed; the SR lists no hospital studies",
                result.job_id,
            )
    if similar_k > 0:
        items += reference.query(result.embedding, similar_k)
    return items


def report_options(settings: Settings, similar: list[SimilarItem]) -> ReportOptions:
    return ReportOptions(
        include_similar=bool(similar),
        include_similar_labels=settings.similar_labels,
        hospital_fields=frozenset(settings.hospital_fields),
    )


def build_report(
    header: Dataset,
    result: InferResult,
    manifest: Manifest,
    uids: OutputUids,
    similar: list[SimilarItem],
    lungs: Lungs,
    options: ReportOptions,
) -> Dataset:
    return build_sr(header, result, manifest, similar, uids, options, lungs.outlines)


def build_summary(
    source: Source,
    result: InferResult,
    manifest: Manifest,
    uids: OutputUids,
    lungs: Lungs,
    width: int,
    similar_cases: str | None = None,
    *,
    syntax: SummarySyntaxName,
) -> Dataset | None:
    if source.display is None:
        return None
    header = source.header
    facts = SummaryFacts(
        finding_present=is_present(result.probability, manifest.threshold),
        probability=result.probability,
        threshold=manifest.threshold,
        model_name=manifest.name,
        model_version=manifest.version,
        analysed_at=datetime.now().astimezone(),
        image_date=str(header.get("ContentDate") or header.get("StudyDate") or "") or None,
        plumbing=manifest.random_weights,
        disagreeing_members=(
            tuple(result.member_probabilities.values())
            if disagreement_text(result.member_probabilities)
            else ()
        ),
        similar_cases=similar_cases,
    )
    display = source.display
    outlines = [display.grid.points_to_display(outline) for outline in lungs.outlines]
    summary = render_summary(display.image, outlines, facts, width)
    return build_sc(
        header,
        summary,
        manifest,
        uids.series_instance_uid,
        uids.sop_instance_uid,
        ScOptions(syntax=syntax),
    )


def build_lung_seg(
    source: Source, manifest: Manifest, uids: OutputUids, lungs: Lungs
) -> Dataset | None:
    if lungs.mask is None:
        return None
    return build_seg(
        source.header,
        lungs.mask,
        manifest,
        uids.series_instance_uid,
        uids.sop_instance_uid,
        SegOptions(),
    )


def remember(hospital: HospitalIndex, header: Dataset, result: InferResult) -> None:
    """Add the analysed image to the hospital index (once: a redone job finds it there)."""
    entry = HospitalEntry(
        sop_instance_uid=str(header.SOPInstanceUID),
        sop_class_uid=str(header.SOPClassUID),
        study_instance_uid=str(header.StudyInstanceUID),
        series_instance_uid=str(header.SeriesInstanceUID),
        study_date=str(header.get("StudyDate") or "") or None,
        probability=result.probability,
        patient_key=patient_key(hospital, header),
    )
    try:
        hospital.add(entry, result.embedding)
    except Exception:  # the result goes out all the same
        log.exception("job %s: the image could not be added to the hospital index", result.job_id)


def _optional(job_id: str, kind: OutputKind, build: Callable[[], Dataset | None]) -> Dataset | None:
    """An object besides the SR: its failure is logged and costs only that object."""
    try:
        return build()
    except Exception:
        log.exception("job %s: the %s could not be built; the SR goes without it", job_id, kind)
        return None


def finalize(node: NodeRuntime, result: InferResult) -> list[str]:
    """Build and store the result objects; return the destinations still to deliver to."""
    job = node.ledger.get(result.job_id)
    if job is None or job.state not in UNFINISHED or not job.spool_path:
        return []
    started = time.time()
    node.metrics.observe("infer", result.inference_ms / 1000.0, once=job.job_id)
    if job.state is JobState.ANALYSING:  # since prepare: queue wait and inference
        node.metrics.observe("queue_infer", started - job.updated_at, once=job.job_id)
    settings = node.settings
    # The bundle that produced the result (a newer one may be installed meanwhile): its
    # preprocessing geometry, embedding space and identity in the SR.
    bundle = node.bundles.by_device_uid(result.device_uid)
    manifest = bundle.manifest
    hospital = node.hospital_index_for(bundle) if settings.hospital_index else None
    uids = node.ledger.output_uids(job.job_id)
    source = load_source(
        job.spool_path,
        node.display_cache.take(job.job_id),
        settings.max_pixels,
        display_target(settings, manifest),
    )
    lungs = _optional_lungs(job.job_id, source, result, manifest.preprocessing)
    similar = find_similar(
        source.header,
        result,
        node.reference_index_for(bundle),
        settings.similar_k,
        hospital,
        settings.hospital_k,
    )

    objects = {
        OutputKind.SR: build_report(
            source.header,
            result,
            manifest,
            uids[OutputKind.SR],
            similar,
            lungs,
            report_options(settings, similar),
        )
    }
    builders = {
        OutputKind.SC: lambda: build_summary(
            source,
            result,
            manifest,
            uids[OutputKind.SC],
            lungs,
            settings.summary_width,
            similar_cases_line(
                similar,
                show_reference=settings.similar_labels,
                show_hospital=settings.similar_labels and "label" in settings.hospital_fields,
            ),
            syntax=settings.summary_syntax,
        ),
        OutputKind.SEG: lambda: build_lung_seg(source, manifest, uids[OutputKind.SEG], lungs),
    }
    for kind in node.outputs[1:]:
        built = _optional(job.job_id, kind, builders[kind])
        if built is not None:
            objects[kind] = built
    for kind, ds in objects.items():
        _store(node, job.job_id, kind, ds)

    if hospital is not None:
        remember(hospital, source.header, result)
    node.ledger.add_deliveries(job.job_id, node.destinations, list(objects))
    if node.ledger.set_state(
        job.job_id,
        JobState.ANALYSED,
        probability=result.probability,
        only_from=UNFINISHED,
        device_uid=result.device_uid,
    ):
        node.metrics.inc("analysed")
        node.metrics.observe("finalize", time.time() - started, once=job.job_id)
    log.info(
        "job %s: analysed, p=%.3f, bundle %s %s, %.0f ms inference; %s; %d lung outline(s), "
        "%d similar",
        job.job_id,
        result.probability,
        result.bundle_name,
        result.bundle_version,
        result.inference_ms,
        "+".join(str(k) for k in objects),
        len(lungs.outlines),
        len(similar),
    )
    return _pending_destinations(node, job.job_id)


def _optional_lungs(
    job_id: str, source: Source, result: InferResult, preprocessing: PreprocessParams
) -> Lungs:
    try:
        return locate_lungs(source, result, preprocessing)
    except Exception:
        log.exception("job %s: lung outline failed; results go without it", job_id)
        return Lungs()


@dataclass(frozen=True)
class DeliveryOutcome:
    delivered: bool
    retry_in: float | None = None


#: How long one delivery run may hold its claim on a job's deliveries to a destination: well
#: over what sending its objects can take (30 s time-outs per step), so a live run keeps it,
#: and a run that died frees it for the recovery sweep.
CLAIM_LEASE_S = 300.0


def deliver(node: NodeRuntime, job_id: str, destination: str) -> DeliveryOutcome:
    """One delivery attempt of every object still pending for `destination` (one
    association); says whether and when to try again. Each object keeps its own count of
    attempts and is dead-lettered on its own.

    Only the run that claims the deliveries sends (`Ledger.claim`): a second queue message
    for the same job and destination finds nothing to do."""
    if not node.ledger.claim(job_id, destination, CLAIM_LEASE_S):
        log.debug("job %s: nothing to send to %s, or another run is sending", job_id, destination)
        return DeliveryOutcome(delivered=False)
    try:
        return _deliver_claimed(node, job_id, destination)
    finally:
        node.ledger.release(job_id, destination)


def _deliver_claimed(node: NodeRuntime, job_id: str, destination: str) -> DeliveryOutcome:
    pending = [
        d
        for d in node.ledger.deliveries(job_id)
        if d.destination == destination and d.state is DeliveryState.PENDING
    ]
    if not pending:
        return DeliveryOutcome(delivered=False)
    if destination not in node.destinations:
        # results go only where the settings say, whatever a queue message or an old ledger
        # row names (the destinations may have changed since the job was analysed)
        for delivery in pending:
            node.ledger.record_attempt(
                job_id,
                destination,
                DeliveryState.FAILED,
                "not a configured destination (CXR_DESTINATIONS)",
                delivery.kind,
            )
        log.error("job %s: %s is not a configured destination: not sent", job_id, destination)
        return DeliveryOutcome(delivered=False)
    paths = [node.result_path(job_id, d.kind) for d in pending]
    started = time.time()
    if destination == OUTBOX:
        job = node.ledger.get(job_id)
        source_uid = job.sop_instance_uid if job is not None else job_id
        errors = [
            _to_outbox(path, node.settings.outbox_dir, outbox_name(source_uid, str(d.kind)))
            for path, d in zip(paths, pending, strict=True)
        ]
    else:
        try:
            target = Destination.parse(destination)
            errors = send_files(paths, target, node.settings.ae_title)
        except (OSError, ValueError) as exc:  # unreadable result file, bad destination
            errors = [str(exc)] * len(paths)

    node.metrics.observe("deliver", time.time() - started)
    retry_in: float | None = None
    for delivery, error in zip(pending, errors, strict=True):
        kind = delivery.kind
        attempts = delivery.attempts + 1
        _audit_delivery(node, job_id, delivery, error, attempts)
        if error is None:
            node.ledger.record_attempt(job_id, destination, DeliveryState.DELIVERED, kind=kind)
            node.metrics.inc("delivered", kind=str(kind), destination=destination)
            log.info("job %s: %s delivered to %s", job_id, kind.upper(), destination)
            continue
        if attempts >= node.settings.delivery_attempts:
            node.ledger.record_attempt(job_id, destination, DeliveryState.FAILED, error, kind)
            node.metrics.inc("failed", stage="delivery")
            log.error(
                "job %s: delivery of the %s to %s failed after %d attempts, dead-lettered: %s",
                job_id,
                kind.upper(),
                destination,
                attempts,
                error,
            )
            continue
        node.ledger.record_attempt(job_id, destination, DeliveryState.PENDING, error, kind)
        node.metrics.inc("delivery_retries", destination=destination)
        delay = backoff_seconds(attempts, node.settings.delivery_backoff_s)
        retry_in = delay if retry_in is None else min(retry_in, delay)
        log.warning(
            "job %s: delivery of the %s to %s failed (attempt %d), retry in %.0f s: %s",
            job_id,
            kind.upper(),
            destination,
            attempts,
            delay,
            error,
        )
    delivered = all(error is None for error in errors)
    job = node.ledger.get(job_id)
    if job is not None and job.state is JobState.DELIVERED:
        node.metrics.observe("end_to_end", time.time() - job.received_at, once=job_id)
    return DeliveryOutcome(delivered=delivered, retry_in=retry_in)


def _audit_delivery(
    node: NodeRuntime, job_id: str, delivery: Delivery, error: str | None, attempt: int
) -> None:
    """One audit line per object and attempt: its UIDs, where it went, and how it went."""
    job = node.ledger.get(job_id)
    uids = node.ledger.output_uids(job_id).get(delivery.kind)
    node.audit.record(
        "delivery",
        job_id=job_id,
        kind=str(delivery.kind),
        sop_instance_uid=uids.sop_instance_uid if uids else None,
        series_instance_uid=uids.series_instance_uid if uids else None,
        study_instance_uid=job.study_instance_uid if job else None,
        source_sop_instance_uid=job.sop_instance_uid if job else None,
        destination=delivery.destination,
        status="delivered" if error is None else f"failed: {error}",
        attempt=attempt,
    )


def _to_outbox(path: Path, outbox: Path, name: str) -> str | None:
    try:
        to_outbox(path, outbox, name)
    except OSError as exc:
        return str(exc)
    return None


def prepare_or_fail(node: NodeRuntime, job_id: str) -> InferRequest | GateRefusal | None:
    """`prepare`, with an unexpected error ending the job in the visible failed state (an
    operator can retry it) rather than leaving it to be redone forever by the sweep."""
    try:
        return prepare(node, job_id)
    except Exception as exc:
        analysis_failed(node, job_id, f"preparation failed: {describe_failure(exc)}")
        return None


def finalize_or_fail(node: NodeRuntime, result: InferResult) -> list[str]:
    """`finalize`, with an error building or storing the results ending the job in the
    visible failed state."""
    return _results_or_fail(node, result.job_id, lambda: finalize(node, result))
