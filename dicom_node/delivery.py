"""Delivery of result objects: C-STORE SCU to a destination, or the outbox folder."""

from __future__ import annotations

import logging
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from dicom_node.settings import Destination
from dicom_node.spool import write_durably

log = logging.getLogger(__name__)

OUTBOX = "outbox"


class DeliveryError(Exception):
    """The destination did not confirm storage; the message says why."""


def backoff_seconds(attempt: int, first: float, cap: float = 600.0) -> float:
    """Delay before retry number `attempt` (1-based): first, 2*first, 4*first, ... capped."""
    return float(min(cap, first * (2 ** max(0, attempt - 1))))


def send_file(path: Path, destination: Destination, calling_ae: str, timeout: float = 30) -> None:
    """C-STORE one file; raise DeliveryError unless the peer answers with a success status."""
    ds = dcmread(path)
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(ds.SOPClassUID, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        raise DeliveryError(f"association with {destination} was not established")
    try:
        response = assoc.send_c_store(ds)
    finally:
        assoc.release()
    code = getattr(response, "Status", None)
    if code is None:
        raise DeliveryError(f"no C-STORE response from {destination} (timeout or abort)")
    # 0x0000 success; 0xB000, 0xB007, 0xB006: warnings, the object was stored.
    if code not in (0x0000, 0xB000, 0xB006, 0xB007):
        raise DeliveryError(f"{destination} answered C-STORE with status 0x{code:04X}")


def to_outbox(path: Path, outbox: Path) -> Path:
    target = outbox / path.name
    write_durably(target, path.read_bytes())
    return target
