"""The DICOM SCP: Verification and Storage of chest radiographs.

The C-STORE handler checks, spools durably, records in the ledger and enqueues; it never
raises, and every outcome is a named status (`dicom_node.dimse_status`). Decoding and analysis
happen later, on the node's queue.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import socketserver
import ssl
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

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
)
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # made at import
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node import dimse_status
from dicom_node.logs import describe_failure
from dicom_node.receiving.checks import Verdict, check_instance
from dicom_node.receiving.security import (
    Network,
    address_allowed,
    is_valid_uid,
    networks,
    server_tls_context,
)
from dicom_node.records.audit import AuditLog
from dicom_node.records.durable import free_bytes, write_durably
from dicom_node.records.keys import ACCESSION_KEY_FILE, accession_hash, load_or_create_key
from dicom_node.records.ledger import Job, JobState, Ledger, Refusal
from dicom_node.settings import Settings

log = logging.getLogger(__name__)

VERIFICATION = UID(Verification)


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


#: Called with the job id of every instance to analyse, after it is durable and in the ledger.
Enqueue = Callable[[str], None]


class StoreEvents:
    """Told of each C-STORE outcome (the audit log and the metrics); does nothing by default.
    Called after the outcome is decided; an error here never changes the status."""

    def received(self, job: Job, address: str) -> None:
        """A new instance is durable and in the ledger (state received or rejected)."""

    def duplicate(self, sop_instance_uid: str, calling_ae: str, address: str) -> None:
        """An instance already in the ledger arrived again (answered with success)."""

    def refused(self, code: int, sop_instance_uid: str, calling_ae: str, address: str) -> None:
        """An instance was refused with an error status."""


#: What the handler decided: a status, and for a refusal the short reason it gives the sender
#: (the Error Comment) and keeps in the ledger.
Outcome = tuple[int, str]
STORED: Outcome = (dimse_status.SUCCESS, "")


@dataclass
class StoreHandler:
    settings: Settings
    ledger: Ledger
    enqueue: Enqueue
    events: StoreEvents = field(default_factory=StoreEvents)

    def __call__(self, event: Event) -> Dataset:
        started = time.perf_counter()
        try:
            code, reason = self._store(event, started)
        except Exception as exc:  # the handler must answer, whatever happened
            # no traceback: its messages can quote attribute values (patient data)
            log.error(
                "C-STORE failed unexpectedly (%s); answering %s",
                describe_failure(exc),
                dimse_status.describe(dimse_status.CANNOT_UNDERSTAND),
            )
            code, reason = dimse_status.CANNOT_UNDERSTAND, "unexpected error in the node"
        response = Dataset()
        response.Status = code
        if code != dimse_status.SUCCESS:
            comment = dimse_status.error_comment(reason or dimse_status.describe(code))
            response.ErrorComment = comment  # the sender sees why
            calling_ae, address = event.assoc.requestor.ae_title.strip(), _address(event)
            self._tell(
                lambda: self.ledger.add_refusal(
                    Refusal(time.time(), code, calling_ae, address, comment)
                )
            )
            self._tell(lambda: self.events.refused(code, _sop_uid(event), calling_ae, address))
        return response

    @cached_property
    def _accession_secret(self) -> bytes:
        return load_or_create_key(self.settings.keys_dir / ACCESSION_KEY_FILE)

    def _accession_key(self, ds: Dataset) -> str | None:
        """The keyed hash of the study's Accession Number (`cxr-node label --csv` finds the
        study by it); None when it has none or it cannot be read."""
        try:
            return accession_hash(self._accession_secret, str(ds.get("AccessionNumber") or ""))
        except Exception as exc:  # a malformed value costs the lookup, not the instance
            log.warning("accession number not recorded (%s)", type(exc).__name__)
            return None

    @staticmethod
    def _tell(call: Callable[[], None]) -> None:
        try:
            call()
        except Exception as exc:
            log.error("C-STORE event hook failed (%s); the status stands", describe_failure(exc))

    def read(self, event: Event) -> Dataset:
        """The received data set with its file meta (subclasses read it from a file)."""
        ds = event.dataset
        ds.file_meta = event.file_meta
        return ds

    def spool(self, event: Event, path: Path) -> None:
        """Make the received instance durable at `path` (raises OSError on failure)."""
        write_durably(path, event.encoded_dataset(include_meta=True))

    def received_bytes(self, event: Event) -> int:
        """Size of the data set as received (subclasses: of the file it was written to)."""
        encoded = getattr(event.request, "DataSet", None)
        return encoded.getbuffer().nbytes if encoded is not None else 0

    def _store(self, event: Event, started: float) -> Outcome:
        calling_ae = event.assoc.requestor.ae_title.strip()
        size = self.received_bytes(event)
        if size > self.settings.max_instance_mb * 1024 * 1024:
            log.warning(
                "C-STORE from %s refused with %s: %d bytes exceed %d MB",
                calling_ae,
                dimse_status.describe(dimse_status.OUT_OF_RESOURCES),
                size,
                self.settings.max_instance_mb,
            )
            return (
                dimse_status.OUT_OF_RESOURCES,
                f"instance larger than the node's {self.settings.max_instance_mb} MB limit",
            )

        try:
            ds = self.read(event)
            sop_uid = str(ds.get("SOPInstanceUID", "")).strip()
        except Exception as exc:
            log.warning(
                "C-STORE from %s refused: data set cannot be parsed (%s)",
                calling_ae,
                type(exc).__name__,
            )
            return dimse_status.CANNOT_UNDERSTAND, "data set cannot be parsed"

        try:  # values are decoded on access: a malformed one raises here
            check = check_instance(ds, str(event.context.abstract_syntax), self.settings.max_pixels)
        except Exception as exc:
            log.warning(
                "C-STORE sop=%s from %s refused: data set cannot be read (%s)",
                _loggable(sop_uid),
                calling_ae,
                describe_failure(exc),
            )
            return dimse_status.CANNOT_UNDERSTAND, "data set cannot be read"
        if check.verdict is Verdict.REFUSE:
            log.warning(
                "C-STORE sop=%s from %s refused with %s: %s",
                _loggable(sop_uid),
                calling_ae,
                dimse_status.describe(check.status),
                check.reason,
            )
            return check.status, check.reason

        existing = self.ledger.by_sop_instance(sop_uid)
        if existing is not None:
            self._tell(lambda: self.events.duplicate(sop_uid, calling_ae, _address(event)))
            log.info(
                "C-STORE sop=%s duplicate of job %s (%s): not analysed again",
                sop_uid,
                existing.job_id,
                existing.state,
            )
            return STORED

        min_free = self.settings.min_free_disk_mb * 1024 * 1024
        if min_free and free_bytes(self.settings.spool_dir) < min_free:
            log.error(
                "C-STORE sop=%s refused with %s: free disk below threshold",
                sop_uid,
                dimse_status.describe(dimse_status.OUT_OF_RESOURCES),
            )
            return dimse_status.OUT_OF_RESOURCES, "node disk nearly full"

        job_id = uuid.uuid4().hex[:16]
        spool_path = self.settings.spool_dir / f"{job_id}.dcm"
        try:
            self.spool(event, spool_path)
        except OSError as exc:
            log.error(
                "C-STORE sop=%s refused with %s: spool write failed (%s)",
                sop_uid,
                dimse_status.describe(dimse_status.OUT_OF_RESOURCES),
                exc.strerror,
            )
            return dimse_status.OUT_OF_RESOURCES, "node could not store the instance"

        job = Job.received(
            job_id,
            sop_instance_uid=sop_uid,
            sop_class_uid=str(ds.SOPClassUID),
            study_instance_uid=str(ds.StudyInstanceUID),
            series_instance_uid=str(ds.SeriesInstanceUID),
            calling_ae=calling_ae,
            spool_path=str(spool_path),
            not_analysed_because=None if check.verdict is Verdict.ANALYSE else check.reason,
            accession_key=self._accession_key(ds),
        )
        if not self.ledger.add(job):  # a concurrent association stored it first
            spool_path.unlink(missing_ok=True)
            log.info("C-STORE sop=%s duplicate (concurrent): not analysed again", sop_uid)
            self._tell(lambda: self.events.duplicate(sop_uid, calling_ae, _address(event)))
            return STORED
        self._tell(lambda: self.events.received(job, _address(event)))

        if job.state is JobState.RECEIVED:
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
        return STORED


def _address(event: Event) -> str:
    return str(event.assoc.requestor.address)


def _sop_uid(event: Event) -> str:
    """The SOP Instance UID from the C-STORE request (no data set decoding)."""
    request = getattr(event, "request", None)
    return str(getattr(request, "AffectedSOPInstanceUID", "") or "")


@dataclass
class SizeGuard:
    """Aborts an association whose data set being received grows past `limit` bytes.

    pynetdicom gathers a data set in memory before the C-STORE handler sees it; the handler
    answers 0xA700 to an instance over CXR_MAX_INSTANCE_MB, and this guard (on every PDU
    received) stops a transfer at twice that, so no peer can make the node hold more."""

    limit: int
    _received: weakref.WeakKeyDictionary[object, int] = field(
        default_factory=weakref.WeakKeyDictionary
    )
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, event: Event) -> None:
        items = getattr(event.pdu, "presentation_data_value_items", None)
        if not items:
            return
        with self._lock:
            total = self._received.get(event.assoc, 0)
            for item in items:
                value = item.presentation_data_value or b""
                if value and value[0] & 1:  # a command fragment: a new message begins
                    total = 0
                else:
                    total += max(0, len(value) - 1)
            self._received[event.assoc] = total
        if total > self.limit:
            log.warning(
                "association from %s aborted: data set over %d bytes",
                event.assoc.requestor.ae_title.strip(),
                self.limit,
            )
            event.assoc.abort()


def _loggable(uid: str) -> str:
    """A UID for a log line: a refused one may be anything, so it is quoted and cut short."""
    return uid if is_valid_uid(uid) else repr(uid[:80]) if uid else "?"


def handle_echo(event: Event) -> int:
    log.info("C-ECHO from %s", event.assoc.requestor.ae_title.strip())
    return dimse_status.SUCCESS


def make_ae(settings: Settings) -> AE:
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_pdu_size = settings.max_pdu_size
    ae.maximum_associations = settings.max_associations
    ae.acse_timeout = settings.acse_timeout_s
    ae.dimse_timeout = settings.dimse_timeout_s
    ae.network_timeout = settings.network_timeout_s
    ae.add_supported_context(VERIFICATION)
    for sop_class in STORAGE_CLASSES:
        ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
    if settings.allowed_calling_aes:
        ae.require_calling_aet = list(settings.allowed_calling_aes)
    ae.require_called_aet = True
    return ae


class GuardedServer(ThreadedAssociationServer):
    """pynetdicom's server, with the checks that come before any DICOM is read: the source
    address allow-list (the connection is closed at once), and a time limit on the TLS
    handshake, which pynetdicom does in its accept loop with a blocking socket (a silent
    client would otherwise stop the node accepting anyone). Such refusals come before any
    association, so pynetdicom raises no event for them: they go to the audit log here."""

    allowed: list[Network] = []  # noqa: RUF012  (set once, before serving)
    handshake_timeout_s: float = 30.0
    audit: AuditLog | None = None

    def _refused(self, address: tuple[str, int], reason: str) -> None:
        # called before the socket is closed: the line is written when the peer sees the
        # refusal. AuditLog.record logs an unwritable file and never raises for it.
        if self.audit is not None:
            self.audit.record(
                "association",
                address=str(address[0]),
                port=int(address[1]),
                outcome="refused",
                reason=reason,
            )

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        client, address = self.socket.accept()
        if not address_allowed(str(address[0]), self.allowed):
            log.warning("connection from %s refused: address not allowed", address[0])
            self._refused(address, "address not allowed")
            _close(client)
            raise OSError("address not allowed")  # socketserver skips the request
        if self.ssl_context is None:
            return client, address
        client.settimeout(self.handshake_timeout_s)
        try:
            wrapped = self.ssl_context.wrap_socket(client, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            log.warning("connection from %s refused: TLS handshake failed (%s)", address[0], exc)
            self._refused(address, "TLS handshake failed")
            _close(client)
            raise OSError("TLS handshake failed") from exc
        wrapped.settimeout(None)
        return wrapped, address

    def shutdown(self) -> None:
        """Stop serving and close the socket. (pynetdicom's own shutdown also takes the
        server off its AE's list of the servers that `AE.start_server` started; this one
        was made with `AE.make_server` and started here, so it is on no such list.)"""
        socketserver.BaseServer.shutdown(self)  # stops serve_forever
        self.server_close()


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def serve_guarded(
    settings: Settings,
    handler: StoreHandler,
    server_class: type[GuardedServer],
    extra_handlers: list[tuple[Any, Callable[[Event], None]]] | None = None,
    thread_name: str = "scp-accept",
) -> GuardedServer:
    """Listen in a background thread with every guard: allow-lists, TLS, limits, size guard.
    The single SCP and each receiver process (`dicom_node.receiving.processes`) start their
    server here."""
    ae = make_ae(settings)
    handlers: list[Any] = [
        (evt.EVT_C_STORE, handler),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_PDU_RECV, SizeGuard(2 * settings.max_instance_mb * 1024 * 1024)),
    ]
    handlers += extra_handlers or []
    server = ae.make_server(
        (settings.bind, settings.port),
        ssl_context=server_tls_context(settings),
        evt_handlers=handlers,
        server_class=server_class,
    )
    assert isinstance(server, GuardedServer)
    server.allowed = networks(settings)
    server.handshake_timeout_s = settings.acse_timeout_s
    server.audit = AuditLog(settings.audit_path)
    threading.Thread(target=server.serve_forever, name=thread_name, daemon=True).start()
    return server


def start_scp(
    settings: Settings,
    ledger: Ledger,
    enqueue: Enqueue,
    events: StoreEvents | None = None,
    extra_handlers: list[tuple[Any, Callable[[Event], None]]] | None = None,
) -> ThreadedAssociationServer:
    """Start listening in the background; the caller shuts the server down. `events` and
    `extra_handlers` (notification events such as EVT_ACCEPTED) feed the audit log."""
    settings.make_dirs()
    handler = StoreHandler(settings, ledger, enqueue, events or StoreEvents())
    server = serve_guarded(settings, handler, GuardedServer, extra_handlers)
    log.info(
        "SCP %s listening on %s:%d%s",
        settings.ae_title,
        settings.bind,
        settings.port,
        " (DICOM TLS)" if settings.tls else "",
    )
    return server
