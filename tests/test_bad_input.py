"""Bad input gets a clear answer: a corpus of malformed and unwanted instances, each with its
expected outcome, sent over the wire to one running node (`cxr-node serve`), which must
answer each and keep serving (C-ECHO after every case).

Outcomes:
- `Status(code)`: the C-STORE is answered with that status and nothing is recorded;
- `NoContext()`: the association offers no accepted presentation context (SOP classes the
  node does not store), so nothing is sent;
- `Rejected(reason)`: success, stored, ledger state `rejected` with the reason, and the reason
  in the log;
- `Analysed()`: success, analysed (the result lands in the outbox).

Senders: DCMTK storescu, except where it will not send the file as made (each case says
why): those go with pynetdicom, which with `STORE_SEND_CHUNKED_DATASET` sends a file's bytes
unchanged.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.dataelem import DataElement
from pydicom.encaps import encapsulate
from pydicom.uid import UID, BasicTextSRStorage, generate_uid
from pynetdicom import AE, _config

from dicom_node import dimse_status
from dicom_node.records.ledger import JobState, Ledger
from tests.conftest import (
    REPO,
    NodeProcess,
    _port_open,
    free_port,
    node_env,
    require_tool,
    wait_for,
)
from tests.synthetic import synthetic_cr, write

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@dataclass(frozen=True)
class Status:
    code: int


@dataclass(frozen=True)
class NoContext:
    pass


@dataclass(frozen=True)
class Rejected:
    reason: str


@dataclass(frozen=True)
class Analysed:
    pass


Outcome = Status | NoContext | Rejected | Analysed


# --- the corpus: each builder writes one file into a folder and returns its path -----------


def _cr(folder: Path, name: str, **changes: object) -> Path:
    ds = synthetic_cr(size=128)
    for key, value in changes.items():
        setattr(ds, key, value)
    return write(ds, folder / f"{name}.dcm")


def truncated(folder: Path) -> Path:
    path = _cr(folder, "full")
    data = path.read_bytes()
    target = folder / "truncated.dcm"
    target.write_bytes(data[: len(data) - 128 * 128])  # half the pixel data is missing
    return target


def missing_pixel_data(folder: Path) -> Path:
    ds = synthetic_cr(size=128)
    del ds.PixelData
    return write(ds, folder / "nopixels.dcm")


def empty_pixel_data(folder: Path) -> Path:
    return _cr(folder, "emptypixels", PixelData=b"")


def rows_as_text(folder: Path) -> Path:
    """Wrong VR: Rows (US) written as LO 'abc' in explicit VR."""
    ds = synthetic_cr(size=128)
    ds[0x00280010] = DataElement(0x00280010, "LO", "abc")
    return write(ds, folder / "rows-lo.dcm")


def window_as_text(folder: Path) -> Path:
    """Wrong VR: Window Center/Width (DS) written as LO with words; the reader falls back."""
    ds = synthetic_cr(size=128)
    ds[0x00281050] = DataElement(0x00281050, "LO", "centre")
    ds[0x00281051] = DataElement(0x00281051, "LO", "wide")
    return write(ds, folder / "window-lo.dcm")


def broken_jpeg2000(folder: Path, chest_cr_j2k: Path) -> Path:
    """A real JPEG 2000 CR whose code stream is garbage after its first bytes."""
    ds = dcmread(chest_cr_j2k)
    rng = np.random.default_rng(7)
    frame = b"\xff\x4f\xff\x51" + rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
    ds.PixelData = encapsulate([frame])
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return write(ds, folder / "broken-j2k.dcm")


def absurd_dimensions(folder: Path) -> Path:
    return _cr(folder, "absurd", Rows=60000, Columns=60000)


def structured_report(folder: Path) -> Path:
    ds = synthetic_cr(size=8)
    ds.SOPClassUID = BasicTextSRStorage  # Basic Text SR
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.Modality = "SR"
    for keyword in ("Rows", "Columns", "PixelData", "BitsAllocated", "BitsStored", "HighBit"):
        delattr(ds, keyword)
    return write(ds, folder / "sr.dcm")


def copy_of_testdata(folder: Path, name: str) -> Path:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    assert path is not None
    ds = dcmread(path)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return write(ds, folder / name)


def ct_in_a_cr_object(folder: Path) -> Path:
    return _cr(folder, "modality-ct", Modality="CT")


def lateral(folder: Path) -> Path:
    return _cr(folder, "lateral", ViewPosition="LL")


def sixteen_bit_voi_lut(folder: Path) -> Path:
    """16 bits stored with a non-linear VOI LUT (as CR vendors send their display curve)."""
    ds = synthetic_cr(size=128)
    ds.BitsStored, ds.HighBit = 16, 15
    ds.PixelData = (np.frombuffer(ds.PixelData, np.uint16) * np.uint16(16)).tobytes()
    lut = Dataset()
    lut[0x00283002] = DataElement(0x00283002, "US", [4096, 0, 16])  # LUT Descriptor
    curve = (np.sqrt(np.linspace(0, 1, 4096)) * 65535).astype(np.uint16).tolist()
    lut[0x00283006] = DataElement(0x00283006, "US", curve)  # LUT Data
    lut.LUTExplanation = "test curve"
    ds.VOILUTSequence = [lut]
    return write(ds, folder / "voi-lut.dcm")


def no_file_meta(folder: Path) -> Path:
    ds = synthetic_cr(size=128)
    del ds.file_meta
    path = folder / "no-meta.dcm"
    ds.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=False)
    assert b"DICM" not in path.read_bytes()[:200]
    return path


def crafted_uid(folder: Path) -> Path:
    ds = synthetic_cr(size=128)
    ds.SOPInstanceUID = UID("../../x")
    ds.file_meta.MediaStorageSOPInstanceUID = UID("1.2.3")
    return write(ds, folder / "crafted-uid.dcm")


def missing_study_uid(folder: Path) -> Path:
    ds = synthetic_cr(size=128)
    del ds.StudyInstanceUID
    return write(ds, folder / "no-study.dcm")


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Path, Path], Path]  # (folder, the JPEG 2000 CR) -> file
    expected: Outcome
    sender: str = "storescu"  # or "pynetdicom" (bytes as written), with the reason in `why`
    why: str = ""


CORPUS = [
    Case(
        "truncated file",
        lambda f, _: truncated(f),
        Status(dimse_status.DATASET_MISMATCH),
        "pynetdicom",
        "storescu stops at the premature end of the file and sends nothing",
    ),
    Case("missing pixel data", lambda f, _: missing_pixel_data(f), Status(0xA900)),
    Case("empty pixel data", lambda f, _: empty_pixel_data(f), Status(0xA900)),
    Case("wrong VR: Rows as LO text", lambda f, _: rows_as_text(f), Status(0xA900)),
    Case("wrong VR: window as LO text", lambda f, _: window_as_text(f), Analysed()),
    Case(
        "JPEG 2000 that will not decode",
        broken_jpeg2000,
        Rejected("pixel data not analysable"),
        "pynetdicom",
        "storescu -xv fails on this stream itself (DIMSE Failed to send message)",
    ),
    Case("absurd dimensions 60000x60000", lambda f, _: absurd_dimensions(f), Status(0xA900)),
    Case("non-image SOP class (SR)", lambda f, _: structured_report(f), NoContext()),
    Case("CT image", lambda f, _: copy_of_testdata(f, "CT_small.dcm"), NoContext()),
    Case("MR image", lambda f, _: copy_of_testdata(f, "MR_small.dcm"), NoContext()),
    Case("CT modality in a CR object", lambda f, _: ct_in_a_cr_object(f), Rejected("modality CT")),
    Case("lateral view", lambda f, _: lateral(f), Rejected("lateral views are not analysed")),
    Case("16-bit with VOI LUT", lambda f, _: sixteen_bit_voi_lut(f), Analysed()),
    Case("no File Meta", lambda f, _: no_file_meta(f), Analysed()),
    Case(
        "SOP Instance UID ../../x",
        lambda f, _: crafted_uid(f),
        Status(dimse_status.INVALID_UID),
    ),
    Case("missing Study Instance UID", lambda f, _: missing_study_uid(f), Status(0x0120)),
]


# --- one node for the whole corpus ---------------------------------------------------------


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    folder = tmp_path_factory.mktemp("bad-input")
    port = free_port()
    data_dir = folder / "node"
    env = node_env(data_dir, port)
    log_path = folder / "node.stderr"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dicom_node", "serve"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            start_new_session=True,
        )
    node = NodeProcess(port, data_dir, env, proc, log_path)
    wait_for(lambda: proc.poll() is not None or _port_open(port), 60, "the node to listen")
    assert proc.poll() is None, log_path.read_text()
    yield node
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)


_STATUS_RE = re.compile(r"DIMSE Status\s*:\s*0x([0-9A-Fa-f]{4})")
_COMMENT_RE = re.compile(r"\(0000,0902\) LO \[(.*?)\]")

#: The Error Comment of the last C-STORE response, as the sender saw it (None: there was none).
last_comment: list[str | None] = [None]


def send_storescu(node: NodeProcess, path: Path) -> int | NoContext:
    exe = require_tool("storescu")
    flags = ["-xv"] if "j2k" in path.name else ["-x="]
    peer = ["-aet", "MODALITY", "-aec", "CXRNODE", "127.0.0.1", str(node.port)]
    done = subprocess.run(
        [exe, "-d", *flags, *peer, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = done.stdout + done.stderr
    if "No presentation context" in out or "no acceptable presentation context" in out.lower():
        return NoContext()
    found = _STATUS_RE.findall(out)
    assert found, f"no C-STORE status from storescu:\n{out[-3000:]}"
    comments = _COMMENT_RE.findall(out)
    last_comment[0] = comments[-1] if comments else None
    return int(found[-1], 16)


def send_pynetdicom(node: NodeProcess, path: Path) -> int | NoContext:
    meta = dcmread(path, stop_before_pixels=True).file_meta
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="CXRNODE")
    assert assoc.is_established
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # the file's bytes, unchanged
    try:
        response = assoc.send_c_store(path)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
        assoc.release()
    last_comment[0] = str(response.ErrorComment) if "ErrorComment" in response else None
    return int(response.Status)


def echo_ok(node: NodeProcess) -> bool:
    exe = require_tool("echoscu")
    done = subprocess.run(
        [exe, "-aet", "MODALITY", "-aec", "CXRNODE", "127.0.0.1", str(node.port)],
        capture_output=True,
        timeout=60,
    )
    return done.returncode == 0


def _sop_uid(path: Path) -> str:
    ds = dcmread(path, stop_before_pixels=True, force=True)
    return str(ds.get("SOPInstanceUID", ""))


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", CORPUS, ids=[c.name for c in CORPUS])
def test_bad_input_gets_a_clear_answer(
    case: Case, node: NodeProcess, chest_cr_j2k: Path, tmp_path: Path
) -> None:
    path = case.build(tmp_path, chest_cr_j2k)
    sop_uid = _sop_uid(path)
    ledger = Ledger(node.data_dir / "ledger.sqlite3")
    rows_before = sum(ledger.counts().values())

    answer = (
        send_pynetdicom(node, path) if case.sender == "pynetdicom" else send_storescu(node, path)
    )

    expected = case.expected
    if isinstance(expected, Status):
        assert answer == expected.code, f"0x{answer:04X}" if isinstance(answer, int) else answer
        # every failure status says why (Error Comment, LO: at most 64 characters)
        comment = last_comment[0]
        assert comment and len(comment) <= 64, comment
        assert sum(ledger.counts().values()) == rows_before  # nothing recorded
    elif isinstance(expected, NoContext):
        assert isinstance(answer, NoContext)
        assert sum(ledger.counts().values()) == rows_before
    else:
        assert answer == dimse_status.SUCCESS
        job = ledger.by_sop_instance(sop_uid)
        assert job is not None
        if isinstance(expected, Rejected):
            wait_for(
                lambda: ledger.get(job.job_id).state is JobState.REJECTED,  # type: ignore[union-attr]
                120,
                "the job to be rejected",
            )
            reason = ledger.get(job.job_id).reason or ""  # type: ignore[union-attr]
            assert expected.reason in reason
            wait_for(lambda: reason in node.logs(), 30, "the ledger's reason in the log")
        else:
            done = (JobState.ANALYSED, JobState.DELIVERED)
            wait_for(
                lambda: ledger.get(job.job_id).state in done,  # type: ignore[union-attr]
                240,
                f"job {job.job_id} analysed",
            )
    assert echo_ok(node), "the node stopped answering"
    assert node.process.poll() is None
