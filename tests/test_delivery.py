"""Delivery reads a peer's C-STORE status by its category: Success and Warning mean stored."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import ComputedRadiographyImageStorage
from pynetdicom import AE, evt
from pynetdicom.events import Event

from dicom_node.results.delivery import DeliveryError, send_file, send_files
from dicom_node.settings import Destination
from tests.conftest import free_port
from tests.synthetic import synthetic_cr, write


class AnsweringPeer:
    """An in-process Storage SCP that answers every C-STORE with `status`."""

    def __init__(self) -> None:
        self.status = 0x0000
        self.received = 0
        self.port = free_port()
        ae = AE(ae_title="PACS")
        ae.add_supported_context(ComputedRadiographyImageStorage)
        server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )
        assert server is not None  # not blocking: the server runs in its own thread
        self.server = server

    def _store(self, event: Event) -> int:
        self.received += 1
        return self.status

    @property
    def destination(self) -> Destination:
        return Destination.parse(f"PACS@127.0.0.1:{self.port}")


@pytest.fixture
def peer() -> Iterator[AnsweringPeer]:
    answering = AnsweringPeer()
    yield answering
    answering.server.shutdown()


@pytest.mark.parametrize(
    "status",
    [
        0x0000,  # Success
        0xB000,  # Warning: coercion of data elements
        0xB007,  # Warning: data set does not match SOP class
        0x0107,  # Warning: attribute list error (a general status, not in the old list)
        0x0116,  # Warning: attribute value out of range
    ],
)
def test_success_and_every_warning_count_as_stored(
    peer: AnsweringPeer, tmp_path: Path, status: int
) -> None:
    peer.status = status
    path = write(synthetic_cr(size=64), tmp_path / "sr.dcm")
    assert send_files([path, path], peer.destination, "NODE") == [None, None]
    send_file(path, peer.destination, "NODE")  # does not raise
    assert peer.received == 3


@pytest.mark.parametrize(
    ("status", "category"),
    [
        (0xA700, "Failure"),  # out of resources
        (0xA900, "Failure"),
        (0xC000, "Failure"),  # cannot understand
        (0x0110, "Failure"),  # processing failure (general)
        (0xFE00, "Cancel"),
        (0x1234, "Unknown"),
    ],
)
def test_failure_cancel_and_unknown_statuses_are_not_stored(
    peer: AnsweringPeer, tmp_path: Path, status: int, category: str
) -> None:
    peer.status = status
    path = write(synthetic_cr(size=64), tmp_path / "sr.dcm")
    (error,) = send_files([path], peer.destination, "NODE")
    assert error is not None and f"0x{status:04X} ({category}" in error
    with pytest.raises(DeliveryError, match=f"0x{status:04X}"):
        send_file(path, peer.destination, "NODE")
