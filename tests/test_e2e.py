"""End to end with real peers: DCMTK storescu -> the node -> DCMTK storescp receives the SR
(and the Secondary Capture summary, on by default)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    JPEG2000,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from dicom_node.records.ledger import JobState, Ledger
from dicom_node.results.sr.codes import COMPREHENSIVE_SR
from tests.conftest import POOL_DIR, NodeProcess, Peer, require_tool, wait_for
from tests.sr_reading import sr_summary

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Distinctive patient identity: none of it may reach a log line.
PHI_NAME = "Zyqoxwelt^Marguerite"
PHI_ID = "PHI4471982"
# A single-component name: libraries that warn about such names quote them.
PHI_SOLO_NAME = "Quarvendilsky"
PHI_SOLO_ID = "PHI4471983"


# storescu proposes uncompressed transfer syntaxes unless told which compressed one to offer.
STORESCU_TS_FLAG: dict[str, str] = {
    JPEG2000Lossless: "-xv",  # JPEG 2000 lossless
    JPEG2000: "-xw",  # JPEG 2000
    JPEGBaseline8Bit: "-xy",  # JPEG baseline
    JPEGExtended12Bit: "-xx",  # JPEG extended
    JPEGLosslessSV1: "-xs",  # JPEG lossless SV1
    JPEGLSLossless: "-xt",  # JPEG-LS lossless
    RLELossless: "-xr",  # RLE
}


def storescu(node: NodeProcess, files: list[Path], calling: str = "MODALITY") -> int:
    """Send with DCMTK storescu, one association per transfer syntax; the worst return code."""
    exe = require_tool("storescu")
    groups: dict[str, list[Path]] = {}
    for path in files:
        ts = str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        groups.setdefault(STORESCU_TS_FLAG.get(ts, "-x="), []).append(path)
    worst = 0
    for flag, group in groups.items():
        done = subprocess.run(
            [
                exe,
                flag,
                "-aet",
                calling,
                "-aec",
                "CXRNODE",
                "127.0.0.1",
                str(node.port),
                *map(str, group),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0 or not done.stderr.startswith("F:"), done.stderr
        if done.returncode:
            print(done.stdout, done.stderr)
        worst = max(worst, done.returncode)
    return worst


def with_identity(source: Path, target: Path, name: str, pid: str) -> Path:
    ds = dcmread(source)
    ds.PatientName = name
    ds.PatientID = pid
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(target)
    return target


def pool_png_as_dicom(png: Path, target: Path) -> Path:
    """A real pool image wrapped as a DX for presentation (synthetic header, Test^Patient)."""
    import cv2
    from pydicom.dataset import FileMetaDataset

    pixels = cv2.imread(str(png), cv2.IMREAD_GRAYSCALE)
    assert pixels is not None, f"{png} does not read as an image"
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID = "Test^Patient", png.stem[:16]
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "DX", "CHEST", "PA"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.tobytes()
    ds.save_as(target, enforce_file_format=True)
    return target


SECONDARY_CAPTURE = SecondaryCaptureImageStorage


def of_class(paths: list[Path], sop_class_uid: str) -> list[Path]:
    """The files of one SOP class (a destination receives SRs and summary images). A file
    that does not read yet is one storescp is still writing: not received yet."""
    found = []
    for p in paths:
        try:
            uid = dcmread(p, stop_before_pixels=True).SOPClassUID
        except (InvalidDicomError, EOFError, OSError, AttributeError):
            continue
        if uid == sop_class_uid:
            found.append(p)
    return found


def assert_delivered(node: NodeProcess, pacs: Peer, sent_uids: set[str]) -> list[Dataset]:
    wait_for(
        lambda: len(of_class(pacs.received(), COMPREHENSIVE_SR)) >= len(sent_uids),
        240,
        f"{len(sent_uids)} SRs at the destination",
    )
    srs: list[Dataset] = [dcmread(p) for p in of_class(pacs.received(), COMPREHENSIVE_SR)]
    referenced = [sr_summary(sr)["referenced_sop_instance_uids"] for sr in srs]
    assert sorted(uid for refs in referenced for uid in refs) == sorted(sent_uids)
    for sr in srs:
        probability = sr_summary(sr)["probability"]
        assert probability is not None and 0.0 <= probability <= 1.0
        assert sr.Modality == "SR"
    ledger = Ledger(node.data_dir / "ledger.sqlite3")
    wait_for(lambda: ledger.counts()["delivered"] == len(sent_uids), 30, "ledger: delivered")
    return srs


def dciodvfy_errors(path: Path) -> list[str]:
    exe = require_tool("dciodvfy")
    out = subprocess.run([exe, str(path)], capture_output=True, text=True)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def test_storescu_to_sr_embedded_queue(
    start_node: Callable[..., NodeProcess],
    storescp: Peer,
    chest_cr: Path,
    chest_cr_j2k: Path,
    tmp_path: Path,
) -> None:
    phi_file = with_identity(chest_cr, tmp_path / "phi.dcm", PHI_NAME, PHI_ID)
    solo_file = with_identity(chest_cr, tmp_path / "solo.dcm", PHI_SOLO_NAME, PHI_SOLO_ID)
    files = [chest_cr, chest_cr_j2k, phi_file, solo_file]
    if (POOL_DIR / "dicom").is_dir():
        files += sorted((POOL_DIR / "dicom").glob("*.dcm"))  # includes copies of the RG1 pair
        pngs = sorted((POOL_DIR / "images").glob("*.png"))[:3]
        files += [pool_png_as_dicom(p, tmp_path / f"pool{i}.dcm") for i, p in enumerate(pngs)]
    sent = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}

    node = start_node(destinations=storescp.address)
    assert storescu(node, files) == 0

    srs = assert_delivered(node, storescp, sent)
    by_ref = {sr_summary(sr)["referenced_sop_instance_uids"][0]: sr for sr in srs}
    source = dcmread(chest_cr, stop_before_pixels=True)
    sr = by_ref[str(source.SOPInstanceUID)]
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    # one summary image per SR, in the same study, in a series of its own
    wait_for(
        lambda: len(of_class(storescp.received(), SECONDARY_CAPTURE)) == len(sent),
        60,
        "a summary image per SR",
    )
    scs = [dcmread(p) for p in of_class(storescp.received(), SECONDARY_CAPTURE)]
    by_source = {sc.SourceImageSequence[0].ReferencedSOPInstanceUID: sc for sc in scs}
    assert set(by_source) == sent
    sc = by_source[str(source.SOPInstanceUID)]
    assert sc.StudyInstanceUID == source.StudyInstanceUID
    assert sc.SeriesInstanceUID not in (source.SeriesInstanceUID, sr.SeriesInstanceUID)
    # stored as JPEG 2000 lossless; this storescp takes uncompressed only: sent decompressed
    assert {str(s.file_meta.TransferSyntaxUID) for s in scs} == {ExplicitVRLittleEndian}
    for path in storescp.received():
        assert dciodvfy_errors(path) == [], path

    # duplicates were not analysed twice: one ledger row per SOP Instance UID
    assert sum(Ledger(node.data_dir / "ledger.sqlite3").counts().values()) == len(sent)

    status = node.cli("status")
    assert status.returncode == 0 and "delivered" in status.stdout

    logs = node.logs()
    assert "job " in logs  # the logs are there, and say something
    secrets = (PHI_NAME, PHI_NAME.replace("^", " "), PHI_ID, PHI_SOLO_NAME, PHI_SOLO_ID)
    for secret in (*secrets, "CompressedSamples"):
        assert secret not in logs, f"patient data in the logs: {secret}"


def test_no_destination_goes_to_outbox(
    start_node: Callable[..., NodeProcess],
    chest_cr: Path,
) -> None:
    node = start_node()
    assert storescu(node, [chest_cr]) == 0
    outbox = node.data_dir / "outbox"
    wait_for(lambda: len(list(outbox.glob("*.dcm"))) == 2, 240, "the SR and SC in the outbox")
    (sr_path,) = of_class(sorted(outbox.glob("*.dcm")), COMPREHENSIVE_SR)
    assert len(of_class(sorted(outbox.glob("*.dcm")), SECONDARY_CAPTURE)) == 1
    summary = sr_summary(dcmread(sr_path))
    assert summary["referenced_sop_instance_uids"] == [
        str(dcmread(chest_cr, stop_before_pixels=True).SOPInstanceUID)
    ]


def test_lateral_view_is_stored_not_analysed(
    start_node: Callable[..., NodeProcess],
    storescp: Peer,
    chest_cr: Path,
    tmp_path: Path,
) -> None:
    ds = dcmread(chest_cr)
    ds.ViewPosition = "LL"
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    lateral = tmp_path / "lateral.dcm"
    ds.save_as(lateral)
    node = start_node(destinations=storescp.address)
    assert storescu(node, [lateral]) == 0  # accepted: success status
    ledger = Ledger(node.data_dir / "ledger.sqlite3")
    job = ledger.by_sop_instance(str(ds.SOPInstanceUID))
    assert job is not None and job.state is JobState.REJECTED
    assert "lateral" in (job.reason or "")
    assert "lateral views are not analysed" in node.logs()
    assert storescp.received() == []


def test_storescu_to_sr_with_redis_and_separate_worker(
    start_node: Callable[..., NodeProcess],
    storescp: Peer,
    chest_cr: Path,
    chest_cr_j2k: Path,
) -> None:
    import redis

    url = os.environ.get("CXR_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")
    try:
        redis.Redis.from_url(url).ping()
    except redis.RedisError as exc:
        pytest.skip(f"no Redis at {url}: {exc}")
    node = start_node(worker=True, broker_url=url, destinations=storescp.address)
    files = [chest_cr, chest_cr_j2k]
    assert storescu(node, files) == 0
    sent = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    assert_delivered(node, storescp, sent)
    worker_log = (node.log_path.parent / "worker.stderr").read_text()
    # inference ran in the separate worker process: it loads the bundle at its first task
    # (Celery's per-task lines, which said "cxr.infer", are off: logs without noise), and the
    # node with a broker consumes only its own queue
    assert "bundle plumbing 0.0.0-random loaded" in worker_log
