"""Association-level refusals say why in the node's log (the sender only sees a reject code):
an unknown called AE title, a calling AE title not allowed. Real DCMTK echoscu as the peer."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import pytest

from dicom_node.receiving.events import association_handlers
from dicom_node.receiving.scp import start_scp
from dicom_node.records.audit import AuditLog
from dicom_node.records.ledger import Ledger
from dicom_node.settings import Settings
from tests.conftest import PLUMBING_BUNDLE, free_port, require_tool

pytestmark = pytest.mark.integration


def echo(port: int, calling: str, called: str) -> int:
    exe = require_tool("echoscu")
    done = subprocess.run(
        [exe, "-aet", calling, "-aec", called, "127.0.0.1", str(port)],
        capture_output=True,
        timeout=60,
    )
    return done.returncode


@pytest.mark.parametrize(
    ("calling", "called", "why"),
    [
        (
            "CR_ROOM1",
            "NOTTHENODE",
            "called AE title is not this node's (CXRNODE): unknown called AE",
        ),
        ("INTRUDER", "CXRNODE", "calling AE title not allowed (CXR_ALLOWED_CALLING_AES)"),
    ],
)
def test_rejected_association_is_logged_with_its_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, calling: str, called: str, why: str
) -> None:
    settings = Settings(
        port=free_port(),
        bind="127.0.0.1",
        data_dir=tmp_path / "node",
        bundle=PLUMBING_BUNDLE,
        min_free_disk_mb=0,
        allowed_calling_aes=["CR_ROOM1"],
    )
    audit = AuditLog(settings.audit_path)
    server = start_scp(
        settings,
        Ledger(settings.ledger_path),
        lambda _job: None,
        extra_handlers=association_handlers(audit, settings),
    )
    try:
        with caplog.at_level(logging.INFO):
            assert echo(settings.port, "CR_ROOM1", "CXRNODE") == 0  # allowed: no warning
            assert echo(settings.port, calling, called) != 0
    finally:
        server.shutdown()
    warnings = [r.getMessage() for r in caplog.records if r.name == "dicom_node.receiving.events"]
    assert warnings == [
        f"association from 127.0.0.1 (calling AE {calling!r}, called AE {called!r}) rejected: {why}"
    ]
