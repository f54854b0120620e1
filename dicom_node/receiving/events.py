"""What the SCP tells the audit log and the metrics: each C-STORE outcome and each association."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from pynetdicom import evt
from pynetdicom.events import Event

from dicom_node.receiving.scp import StoreEvents
from dicom_node.records.audit import AuditLog
from dicom_node.records.ledger import Job, JobState
from dicom_node.records.metrics_store import MetricsStore
from dicom_node.settings import Settings

log = logging.getLogger(__name__)


class NodeStoreEvents(StoreEvents):
    """C-STORE outcomes to the audit log and the metrics."""

    def __init__(self, audit: AuditLog, metrics: MetricsStore) -> None:
        self.audit = audit
        self.metrics = metrics

    def received(self, job: Job, address: str) -> None:
        self.metrics.inc("received")
        if job.state is JobState.REJECTED:
            self.metrics.inc("rejected")
        self.audit.record(
            "received",
            job_id=job.job_id,
            calling_ae=job.calling_ae,
            address=address,
            sop_class_uid=job.sop_class_uid,
            sop_instance_uid=job.sop_instance_uid,
            series_instance_uid=job.series_instance_uid,
            study_instance_uid=job.study_instance_uid,
            outcome="analyse" if job.state is JobState.RECEIVED else "not analysed",
            reason=job.reason,
        )

    def duplicate(self, sop_instance_uid: str, calling_ae: str, address: str) -> None:
        self.audit.record(
            "received",
            calling_ae=calling_ae,
            address=address,
            sop_instance_uid=sop_instance_uid,
            outcome="duplicate",
        )

    def refused(self, code: int, sop_instance_uid: str, calling_ae: str, address: str) -> None:
        status = f"0x{code:04X}"
        self.metrics.inc("refused", status=status)
        self.audit.record(
            "refused",
            calling_ae=calling_ae,
            address=address,
            sop_instance_uid=sop_instance_uid or None,
            status=status,
        )


def rejection_reason(calling: str, called: str | None, settings: Settings) -> str:
    """Why the SCP rejected an association, in the words of the log and the audit log."""
    if called is not None and called != settings.ae_title:
        return f"called AE title is not this node's ({settings.ae_title}): unknown called AE"
    if settings.allowed_calling_aes and calling not in settings.allowed_calling_aes:
        return "calling AE title not allowed (CXR_ALLOWED_CALLING_AES)"
    return (
        f"association limit reached ({settings.max_associations} at once, "
        "CXR_MAX_ASSOCIATIONS) or negotiation failed"
    )


def association_handlers(
    audit: AuditLog, settings: Settings
) -> list[tuple[Any, Callable[[Event], None]]]:
    """EVT_ACCEPTED / EVT_REJECTED to the audit log: who called, from where, and the outcome;
    a rejection also to the node's log, with the reason (the sender only sees a reject code)."""

    def record(event: Event, outcome: str) -> None:
        requestor = event.assoc.requestor
        calling = requestor.ae_title.strip()
        primitive = getattr(requestor, "primitive", None)
        called = str(getattr(primitive, "called_ae_title", "") or "").strip() or None
        reason = None
        if outcome == "rejected":
            reason = rejection_reason(calling, called, settings)
            log.warning(
                "association from %s (calling AE %r, called AE %r) rejected: %s",
                requestor.address,
                calling,
                called or "",
                reason,
            )
        try:
            audit.record(
                "association",
                calling_ae=calling,
                called_ae=called,
                address=str(requestor.address),
                port=int(requestor.port),
                outcome=outcome,
                reason=reason,
            )
        except Exception:  # never disturb the association
            log.exception("audit of an association failed")

    return [
        (evt.EVT_ACCEPTED, lambda event: record(event, "accepted")),
        (evt.EVT_REJECTED, lambda event: record(event, "rejected")),
    ]
