"""Sending compressed files: `cxr-node send` proposes each file's own transfer syntax, so a
JPEG 2000 and a JPEG baseline file reach a real DCMTK storescp as they are; and the DCMTK
storescu options the README gives for compressed files work against the node."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    generate_uid,
)

from dicom_node.results.delivery import UNCOMPRESSED, requested_contexts
from tests.conftest import Peer, _port_open, free_port, require_tool, wait_for
from tests.peers import Scp, storescu_statuses
from tests.synthetic import synthetic_cr, write

pytestmark = pytest.mark.integration


def jpeg_baseline_cr(folder: Path) -> Path:
    """An 8-bit chest CR whose pixel data is a JPEG baseline stream (OpenCV's encoder)."""
    ds = synthetic_cr(size=256)
    pixels = (ds.pixel_array.astype(np.float32) / 4095 * 255).astype(np.uint8)
    ok, encoded = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = encapsulate([encoded.tobytes()])
    ds["PixelData"].VR = "OB"
    ds.LossyImageCompression = "01"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return write(ds, folder / "jpeg-baseline.dcm")


@pytest.fixture
def storescp_all(tmp_path: Path) -> Iterator[Peer]:
    """DCMTK storescp accepting every transfer syntax it knows (`+xa`)."""
    exe = require_tool("storescp")
    folder = tmp_path / "pacs-all"
    folder.mkdir()
    port = free_port()
    proc = subprocess.Popen(
        [exe, "+xa", "--aetitle", "PACS", "--output-directory", str(folder), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(lambda: _port_open(port), 10, "storescp to listen")
    yield Peer("PACS", port, folder, proc)
    proc.terminate()
    proc.wait(timeout=10)


def test_send_keeps_each_files_transfer_syntax(
    storescp_all: Peer, chest_cr_j2k: Path, chest_cr: Path, tmp_path: Path
) -> None:
    files = [chest_cr_j2k, jpeg_baseline_cr(tmp_path), chest_cr]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
    env["CXR_DATA_DIR"] = str(tmp_path / "node")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "dicom_node",
            "send",
            *map(str, files),
            "--host",
            "127.0.0.1",
            "--port",
            str(storescp_all.port),
            "--aec",
            "PACS",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("stored") == 3
    received = {
        str(ds.SOPInstanceUID): str(ds.file_meta.TransferSyntaxUID)
        for ds in (dcmread(p, stop_before_pixels=True) for p in storescp_all.received())
    }
    sent = {
        str(ds.SOPInstanceUID): str(ds.file_meta.TransferSyntaxUID)
        for ds in (dcmread(p, stop_before_pixels=True) for p in files)
    }
    assert received == sent
    assert set(sent.values()) >= {JPEG2000Lossless, JPEGBaseline8Bit}


def test_compressed_files_get_contexts_of_their_own(chest_cr_j2k: Path, chest_cr: Path) -> None:
    contexts = requested_contexts([dcmread(chest_cr_j2k), dcmread(chest_cr), dcmread(chest_cr)])
    sop_class = str(dcmread(chest_cr, stop_before_pixels=True).SOPClassUID)
    assert contexts == [(sop_class, [JPEG2000Lossless]), (sop_class, list(UNCOMPRESSED))]


@pytest.mark.parametrize(
    ("option", "make"),
    [
        ("-xv", lambda tmp, j2k: j2k),  # JPEG 2000 lossless
        ("-xy", lambda tmp, j2k: jpeg_baseline_cr(tmp)),  # JPEG baseline
    ],
)
def test_readme_storescu_options_send_compressed_files_to_the_node(
    scp: Callable[..., Scp],
    chest_cr_j2k: Path,
    tmp_path: Path,
    option: str,
    make: Callable[[Path, Path], Path],
) -> None:
    node = scp()
    path = make(tmp_path, chest_cr_j2k)
    assert storescu_statuses(node.port, [path], option) == [0x0000]
    (job,) = node.ledger.jobs_in(("received",))  # type: ignore[arg-type]
    stored = dcmread(job.spool_path, stop_before_pixels=True)  # type: ignore[arg-type]
    assert stored.file_meta.TransferSyntaxUID == dcmread(path).file_meta.TransferSyntaxUID


def test_storescu_without_an_option_cannot_send_jpeg_2000(
    scp: Callable[..., Scp], chest_cr_j2k: Path
) -> None:
    """Why the README names the option: by default storescu proposes uncompressed syntaxes
    only, and it cannot decompress JPEG 2000 itself."""
    node = scp()
    exe = require_tool("storescu")
    done = subprocess.run(
        [exe, "-aec", "CXRNODE", "127.0.0.1", str(node.port), str(chest_cr_j2k)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0 or "No presentation context" in done.stdout + done.stderr
    assert node.ledger.counts()["received"] == 0
