"""Delivery of result objects: C-STORE SCU to a destination, or the outbox folder."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit
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
#: pydicom decoding plugins preferred when a file is decompressed for a peer: Pillow's
#: libjpeg-turbo takes about half the time of pydicom's default (pylibjpeg's libjpeg) on the
#: summary image's JPEG (docs/BENCHMARKS.md). Other syntaxes: pydicom's choice.
_DECODER = {JPEGBaseline8Bit: "pillow"}


def requested_contexts(datasets: Sequence[Dataset]) -> list[tuple[str, list[str]]]:
    """The presentation contexts to propose for `datasets`: per SOP class, the uncompressed
    syntaxes for files that are not compressed (pynetdicom re-encodes them to whichever is
    accepted), and each compressed (or deflated) file's own transfer syntax in a context of
    its own, so that it is sent as it is: a peer picks one syntax per context, and in a shared
    one it would pick the uncompressed syntax the compressed file cannot be sent in.

    A file with compressed pixel data also brings the uncompressed context of its class: a
    peer that refuses its syntax gets it decompressed (`send_files`)."""
    contexts: dict[tuple[str, str], list[str]] = {}
    for ds in datasets:
        sop_class = str(ds.SOPClassUID)
        syntax = _syntax(ds)
        deflated = syntax.is_transfer_syntax and syntax.is_deflated
        if _compressed(syntax) or deflated:
            contexts.setdefault((sop_class, str(syntax)), [str(syntax)])
        if not deflated:
            contexts.setdefault((sop_class, ""), list(UNCOMPRESSED))
    return [(sop_class, syntaxes) for (sop_class, _), syntaxes in contexts.items()]


def _syntax(ds: Dataset) -> UID:
    meta = getattr(ds, "file_meta", None)
    return UID(str(meta.get("TransferSyntaxUID", ""))) if meta is not None else UID("")


def _compressed(syntax: UID) -> bool:
    """Pixel data encapsulated (compressed), by the file's transfer syntax."""
    return syntax.is_transfer_syntax and syntax.is_encapsulated


def as_accepted(ds: Dataset, accepted: Sequence[tuple[str, str]]) -> Dataset:
    """`ds` as it can go over an association whose accepted contexts are `accepted`
    (abstract syntax, transfer syntax): as it is if its own syntax was accepted for its class
    (or it is not compressed), else decompressed when an uncompressed one was - same SOP
    Instance UID, same pixels (for a lossy JPEG: as Pillow's decoder gives them). Raises
    ValueError when it cannot be decoded."""
    syntax = _syntax(ds)
    sop_class = str(ds.SOPClassUID)
    if not _compressed(syntax) or (sop_class, str(syntax)) in accepted:
        return ds
    if not any((sop_class, str(ts)) in accepted for ts in UNCOMPRESSED):
        return ds  # nothing to gain: send_c_store says that no context fits
    try:
        ds.decompress(generate_instance_uid=False, decoding_plugin=_DECODER.get(syntax, ""))
    except Exception as exc:  # no decoder, or a corrupt stream: that file alone fails
        raise ValueError(f"cannot decompress {syntax.name} for the peer: {exc}") from exc
    return ds


def send_files(
    paths: list[Path], destination: Destination, calling_ae: str, timeout: float = 30
) -> list[str | None]:
    """C-STORE several files in one association, in order; per file None (stored) or why not.

    Each file goes in its own transfer syntax when compressed (`requested_contexts`), or
    decompressed to a peer that accepts its class uncompressed only (`as_accepted`). A file
    whose SOP class the peer did not accept, or that cannot be decompressed for it, fails
    alone: the others are still sent.
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
    accepted = [
        (str(c.abstract_syntax), str(c.transfer_syntax[0])) for c in assoc.accepted_contexts
    ]
    outcomes: list[str | None] = []
    try:
        for ds in datasets:
            if not assoc.is_established:
                outcomes.append(f"association with {destination} ended early")
                continue
            syntax = _syntax(ds)
            try:
                sendable = as_accepted(ds, accepted)
            except ValueError as exc:
                outcomes.append(f"{destination} accepts this object uncompressed only: {exc}")
                continue
            if _syntax(sendable) != syntax:
                log.info(
                    "%s decompressed for %s, which does not accept %s for its class",
                    ds.SOPInstanceUID,
                    destination,
                    syntax.name,
                )
            try:
                response = assoc.send_c_store(sendable)
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
