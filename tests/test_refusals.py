"""A refused instance tells the sender why (Error Comment) and the operator what happened (the
ledger's refusals, the status page, `cxr-node status`), with no patient data anywhere.
Sender: DCMTK storescu, whose debug output shows the C-STORE response's Error Comment."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from dicom_node import dimse_status
from dicom_node.operations.web import StatusView, render_status
from dicom_node.records.ledger import Ledger, Refusal
from tests.conftest import require_tool
from tests.peers import Scp
from tests.synthetic import synthetic_cr, write

_STATUS_RE = re.compile(r"DIMSE Status\s*:\s*0x([0-9A-Fa-f]{4})")
_COMMENT_RE = re.compile(r"\(0000,0902\) LO \[(.*?)\]")


def storescu(port: int, path: Path, calling: str = "MODALITY") -> tuple[int, str | None]:
    """The C-STORE status and Error Comment storescu received."""
    exe = require_tool("storescu")
    done = subprocess.run(
        [exe, "-d", "-aet", calling, "-aec", "CXRNODE", "127.0.0.1", str(port), str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = done.stdout + done.stderr
    statuses = _STATUS_RE.findall(out)
    assert statuses, out[-3000:]
    comment = _COMMENT_RE.search(out)
    return int(statuses[-1], 16), comment.group(1) if comment else None


def _missing_study(folder: Path) -> Path:
    ds = synthetic_cr(size=64)
    del ds.StudyInstanceUID
    return write(ds, folder / "no-study.dcm")


def _no_pixels(folder: Path) -> Path:
    ds = synthetic_cr(size=64)
    del ds.PixelData
    return write(ds, folder / "no-pixels.dcm")


def _too_many_pixels(folder: Path) -> Path:
    return write(synthetic_cr(size=128), folder / "big.dcm")  # max_pixels below


@pytest.mark.integration
@pytest.mark.parametrize(
    ("make", "status", "comment"),
    [
        (_missing_study, dimse_status.MISSING_ATTRIBUTE, "missing StudyInstanceUID"),
        (_no_pixels, dimse_status.DATASET_MISMATCH, "no pixel data"),
        (_too_many_pixels, dimse_status.DATASET_MISMATCH, "image of 128x128 exceeds 10000 pixels"),
    ],
)
def test_refusal_carries_an_error_comment_and_is_recorded(
    scp: Callable[..., Scp],
    tmp_path: Path,
    make: Callable[[Path], Path],
    status: int,
    comment: str,
) -> None:
    node = scp(max_pixels=10000)
    path = make(tmp_path)
    code, said = storescu(node.port, path)
    assert code == status
    assert said == comment and len(said) <= 64
    (refusal,) = node.ledger.recent_refusals()
    assert (refusal.status, refusal.calling_ae, refusal.reason) == (status, "MODALITY", comment)
    assert refusal.address == "127.0.0.1" and abs(refusal.at - time.time()) < 60
    assert node.ledger.counts() == {s: 0 for s in node.ledger.counts()}  # nothing stored


@pytest.mark.integration
def test_success_carries_no_error_comment(scp: Callable[..., Scp], tmp_path: Path) -> None:
    node = scp()
    code, said = storescu(node.port, write(synthetic_cr(size=64), tmp_path / "ok.dcm"))
    assert (code, said) == (dimse_status.SUCCESS, None)
    assert node.ledger.recent_refusals() == []


def test_error_comment_is_short_lo_text() -> None:
    long = (
        "SOP Class UID 1.2.840.10008.5.1.4.1.1.7 differs from the negotiated "
        "Computed Radiography Image Storage"
    )
    said = dimse_status.error_comment(long)
    assert len(said) <= 64 and said.endswith("...") and said.startswith("SOP Class UID 1.2.840")
    assert dimse_status.error_comment("a\\b\nc") == "a b c"  # no backslash, one line
    assert dimse_status.error_comment("no pixel data") == "no pixel data"


def test_refusals_are_bounded_newest_first(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    for i in range(12):
        ledger.add_refusal(Refusal(float(i), 0xA900, f"AE{i}", "10.0.0.1", "no pixel data"), keep=5)
    kept = ledger.recent_refusals(100)
    assert [r.calling_ae for r in kept] == ["AE11", "AE10", "AE9", "AE8", "AE7"]


def _view(refusals: list[Refusal]) -> StatusView:
    return StatusView(
        title="CXR node CXRNODE",
        counts=lambda: {"received": 0},
        recent=lambda: [],
        failures=lambda: [],
        bundle=lambda: {},
        installed=lambda: [],
        refusals=lambda: refusals,
    )


def test_status_page_lists_refusals() -> None:
    page = render_status(
        _view([Refusal(time.time(), 0x0120, "CR_ROOM1", "10.1.2.3", "missing StudyInstanceUID")])
    )
    section = page[page.index("Refused instances") :]
    assert "CR_ROOM1" in section and "10.1.2.3" in section
    assert "0x0120 (Failure: Missing Attribute)" in section
    assert "missing StudyInstanceUID" in section


def test_cxr_node_status_lists_refusals(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    ledger.add_refusal(
        Refusal(time.time(), 0xA700, "DX_PORTABLE2", "10.1.2.4", "node disk nearly full")
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
    env.update(CXR_DATA_DIR=str(tmp_path), COLUMNS="200")
    done = subprocess.run(
        [sys.executable, "-m", "dicom_node", "status"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "recently refused instances" in done.stdout
    assert "DX_PORTABLE2" in done.stdout and "0xA700" in done.stdout
    assert "node disk nearly full" in done.stdout
