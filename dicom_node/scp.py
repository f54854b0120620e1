"""The DICOM SCP: Verification and Storage of chest radiographs.

The C-STORE handler checks, spools durably, records in the ledger and enqueues; it never
raises, and every outcome is a named status (`dicom_node.status`). Decoding and analysis
happen later, on the node's queue.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydicom import Dataset
from pydicom.uid import (
    JPEG2000,
    UID,
    ComputedRadiographyImageStorage,
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pynetdicom import AE, _config, evt
from pynetdicom.events import Event
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node import status
from dicom_node.checks import Verdict, check_instance
from dicom_node.ledger import Job, JobState, Ledger
from dicom_node.settings import Settings
from dicom_node.spool import free_bytes, write_durably

log = logging.getLogger(__name__)

VERIFICATION = UID("1.2.840.10008.1.1")

# Identifiers (which can hold patient data) never go to pynetdicom's log.
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False

STORAGE_CLASSES: tuple[UID, ...] = (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
)
TRANSFER_SYNTAXES: list[str] = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
]

#: The largest PDU the node accepts. Larger PDUs mean fewer of them per 10 MB radiograph,
#: each costing Python time; DCMTK senders offered "unlimited" (0) send smaller ones than
#: when offered 1 MiB, which received fastest (bench/ingest.py).
MAX_PDU_BYTES = 1 << 20

#: Called with the job id of every instance to analyse, after it is durable and in the ledger.
Enqueue = Callable[[str], None]


@dataclass
class StoreHandler:
    settings: Settings
    ledger: Ledger
    enqueue: Enqueue

    def __call__(self, event: Event) -> int:
        started = time.perf_counter()
        try:
            return self._store(event, started)
        except Exception:  # the handler must answer, whatever happened
            log.exception("C-STORE failed unexpectedly; answering 0x%04X", status.CANNOT_UNDERSTAND)
            return status.CANNOT_UNDERSTAND

    def read(self, event: Event) -> Dataset:
        """The received data set with its file meta (subclasses read it from a file)."""
        ds = event.dataset
        ds.file_meta = event.file_meta
        return ds

    def spool(self, event: Event, path: Path) -> None:
        """Make the received instance durable at `path` (raises OSError on failure)."""
        write_durably(path, event.encoded_dataset(include_meta=True))

    def _store(self, event: Event, started: float) -> int:
        calling_ae = event.assoc.requestor.ae_title.strip()
        try:
            ds = self.read(event)
            sop_uid = str(ds.get("SOPInstanceUID", "")).strip()
        except Exception as exc:
            log.warning(
                "C-STORE from %s refused: data set cannot be parsed (%s)",
                calling_ae,
                type(exc).__name__,
            )
            return status.CANNOT_UNDERSTAND

        check = check_instance(ds, str(event.context.abstract_syntax), self.settings.max_pixels)
        if check.verdict is Verdict.REFUSE:
            log.warning(
                "C-STORE sop=%s from %s refused with 0x%04X: %s",
                sop_uid or "?",
                calling_ae,
                check.status,
                check.reason,
            )
            return check.status

        existing = self.ledger.by_sop_instance(sop_uid)
        if existing is not None:
            log.info(
                "C-STORE sop=%s duplicate of job %s (%s): not analysed again",
                sop_uid,
                existing.job_id,
                existing.state,
            )
            return status.SUCCESS

        min_free = self.settings.min_free_disk_mb * 1024 * 1024
        if min_free and free_bytes(self.settings.spool_dir) < min_free:
            log.error(
                "C-STORE sop=%s refused with 0x%04X: free disk below threshold",
                sop_uid,
                status.OUT_OF_RESOURCES,
            )
            return status.OUT_OF_RESOURCES

        job_id = uuid.uuid4().hex[:16]
        spool_path = self.settings.spool_dir / f"{job_id}.dcm"
        try:
            self.spool(event, spool_path)
        except OSError as exc:
            log.error(
                "C-STORE sop=%s refused with 0x%04X: spool write failed (%s)",
                sop_uid,
                status.OUT_OF_RESOURCES,
                exc.strerror,
            )
            return status.OUT_OF_RESOURCES

        analyse = check.verdict is Verdict.ANALYSE
        now = time.time()
        job = Job(
            job_id=job_id,
            sop_instance_uid=sop_uid,
            sop_class_uid=str(ds.SOPClassUID),
            study_instance_uid=str(ds.StudyInstanceUID),
            series_instance_uid=str(ds.SeriesInstanceUID),
            calling_ae=calling_ae,
            spool_path=str(spool_path),
            state=JobState.RECEIVED if analyse else JobState.REJECTED,
            reason=None if analyse else check.reason,
            sr_series_uid=generate_uid(),
            sr_sop_uid=generate_uid(),
            probability=None,
            received_at=now,
            updated_at=now,
        )
        if not self.ledger.add(job):  # a concurrent association stored it first
            spool_path.unlink(missing_ok=True)
            log.info("C-STORE sop=%s duplicate (concurrent): not analysed again", sop_uid)
            return status.SUCCESS

        if analyse:
            try:
                self.enqueue(job_id)
            except Exception as exc:  # the ledger keeps it; the sweep enqueues it later
                log.warning(
                    "job %s: enqueue failed (%s); the recovery sweep will retry",
                    job_id,
                    type(exc).__name__,
                )
            log.info(
                "job %s: received sop=%s from %s in %.0f ms",
                job_id,
                sop_uid,
                calling_ae,
                (time.perf_counter() - started) * 1000,
            )
        else:
            log.info(
                "job %s: received sop=%s from %s, not analysed: %s",
                job_id,
                sop_uid,
                calling_ae,
                check.reason,
            )
        return status.SUCCESS


def handle_echo(event: Event) -> int:
    log.info("C-ECHO from %s", event.assoc.requestor.ae_title.strip())
    return status.SUCCESS


def make_ae(settings: Settings) -> AE:
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_pdu_size = MAX_PDU_BYTES
    ae.add_supported_context(VERIFICATION)
    for sop_class in STORAGE_CLASSES:
        ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
    if settings.allowed_calling_aes:
        ae.require_calling_aet = list(settings.allowed_calling_aes)
    ae.require_called_aet = True
    return ae


def start_scp(settings: Settings, ledger: Ledger, enqueue: Enqueue) -> ThreadedAssociationServer:
    """Start listening in the background; the caller shuts the server down."""
    settings.make_dirs()
    handler = StoreHandler(settings, ledger, enqueue)
    ae = make_ae(settings)
    server: ThreadedAssociationServer | None = ae.start_server(
        (settings.bind, settings.port),
        block=False,
        evt_handlers=[(evt.EVT_C_STORE, handler), (evt.EVT_C_ECHO, handle_echo)],
    )
    assert server is not None  # block=False always returns the server
    log.info("SCP %s listening on %s:%d", settings.ae_title, settings.bind, settings.port)
    return server
