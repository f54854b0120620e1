"""Delivery of result objects: C-STORE SCU to a destination, or the outbox folder."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from dicom_node import dimse_status
from dicom_node.records.durable import write_durably
from dicom_node.settings import Destination

log = logging.getLogger(__name__)

OUTBOX = "outbox"


class DeliveryError(Exception):
    """The destination did not confirm storage; the message says why."""


def backoff_seconds(attempt: int, first: float, cap: float = 600.0) -> float:
    """Delay before retry number `attempt` (1-based): first, 2*first, 4*first, ... capped."""
    return float(min(cap, first * (2 ** max(0, attempt - 1))))


def send_file(path: Path, destination: Destination, calling_ae: str, timeout: float = 30) -> None:
    """C-STORE one file; raise DeliveryError unless the peer says it stored it."""
    (error,) = send_files([path], destination, calling_ae, timeout)
    if error is not None:
        raise DeliveryError(error)


def outbox_name(source_sop_instance_uid: str, kind: str) -> str:
    """The outbox file of one result object, named after the image it is about:
    "<SOP Instance UID of the received X-ray>-<sr|sc|seg>.dcm". (The UID was checked to be a
    valid UID when the image was received, so it is a safe file name.)"""
    return f"{source_sop_instance_uid}-{kind}.dcm"


def to_outbox(path: Path, outbox: Path, name: str | None = None) -> Path:
    """Copy a result file into the outbox durably, as `name` (default: its own name)."""
    target = outbox / (name or path.name)
    write_durably(target, path.read_bytes())
    return target


UNCOMPRESSED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]


def requested_contexts(datasets: Sequence[Dataset]) -> list[tuple[str, list[str]]]:
    """The presentation contexts to propose for `datasets`: per SOP class, the uncompressed
    syntaxes for files that are not compressed (pynetdicom re-encodes them to whichever is
    accepted), and each compressed (or deflated) file's own transfer syntax in a context of
    its own, so that it is sent as it is: a peer picks one syntax per context, and in a shared
    one it would pick the uncompressed syntax the compressed file cannot be sent in."""
    contexts: dict[tuple[str, str], list[str]] = {}
    for ds in datasets:
        sop_class = str(ds.SOPClassUID)
        meta = getattr(ds, "file_meta", None)
        syntax = UID(str(meta.get("TransferSyntaxUID", ""))) if meta is not None else UID("")
        if syntax and (syntax.is_encapsulated or syntax.is_deflated):
            contexts.setdefault((sop_class, str(syntax)), [str(syntax)])
        else:
            contexts.setdefault((sop_class, ""), list(UNCOMPRESSED))
    return [(sop_class, syntaxes) for (sop_class, _), syntaxes in contexts.items()]


def send_files(
    paths: list[Path], destination: Destination, calling_ae: str, timeout: float = 30
) -> list[str | None]:
    """C-STORE several files in one association, in order; per file None (stored) or why not.

    Each file goes in its own transfer syntax when compressed (`requested_contexts`). A file
    whose SOP class or syntax the peer did not accept fails alone: the others are still sent.
    """
    datasets = [dcmread(path) for path in paths]
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for sop_class, syntaxes in requested_contexts(datasets):
        ae.add_requested_context(sop_class, syntaxes)
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        offered = ", ".join(dict.fromkeys(ds.SOPClassUID.name for ds in datasets))
        return [f"association with {destination} was not established (offered {offered})"] * len(
            paths
        )
    outcomes: list[str | None] = []
    try:
        for ds in datasets:
            if not assoc.is_established:
                outcomes.append(f"association with {destination} ended early")
                continue
            try:
                response = assoc.send_c_store(ds)
            except ValueError as exc:  # no accepted presentation context for this class
                outcomes.append(f"{destination} does not accept this object: {exc}")
                continue
            code = getattr(response, "Status", None)
            if code is None:
                outcomes.append(f"no C-STORE response from {destination} (timeout or abort)")
            elif not dimse_status.stored(code):
                outcomes.append(
                    f"{destination} answered C-STORE with {dimse_status.describe(code)}"
                )
            else:
                outcomes.append(None)
    finally:
        if assoc.is_established:
            assoc.release()
    return outcomes
