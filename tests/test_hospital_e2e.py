"""The hospital index across two node restarts, with 50 studies of 11 synthetic patients.

Each patient's studies are near-duplicate images, so without the same-patient rule a
patient's own earlier studies would be the nearest "similar" ones: the test can fail.
Phase 1 sends 20 studies; the node is stopped and started again (phase 2: 15 studies, with
labels recorded by `cxr-node label` in between), then again (phase 3: 15 studies).
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import cv2
import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

from dicom_node.results.hospital_index import HospitalStore
from tests.conftest import NodeProcess, wait_for
from tests.sr_reading import sr_summary
from tests.test_e2e import storescu
from training.synthetic import synthetic_display_image
from worker.classes import CxrClass

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PATIENTS = [f"SYN{n:02d}" for n in range(10)]


@dataclass(frozen=True)
class Study:
    path: Path
    patient: str
    study_uid: str
    phase: int


def synthetic_cxr(
    target: Path, base: np.ndarray, patient: str, day: int, seed: int
) -> tuple[Path, str]:
    """A DX of `base` with a little noise and shift: the same patient, another day."""
    rng = np.random.default_rng(seed)
    shift = np.array([[1, 0, rng.integers(-3, 4)], [0, 1, rng.integers(-3, 4)]], np.float32)
    image = cv2.warpAffine(base, shift, base.shape[::-1], borderMode=cv2.BORDER_REPLICATE)
    noisy = image.astype(np.int16) + rng.integers(-4, 5, image.shape)
    pixels = np.clip(noisy, 0, 255).astype(np.uint8)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID = f"Test^{patient}", patient
    ds.StudyDate = (date(2024, 1, 1) + timedelta(days=day)).strftime("%Y%m%d")
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "DX", "CHEST", "AP"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.tobytes()
    ds.save_as(target, enforce_file_format=True)
    return target, str(ds.StudyInstanceUID)


def srs_in(outbox: Path) -> dict[str, Dataset]:
    """SRs in the outbox by the SOP Instance UID of the X-ray they report on."""
    found: dict[str, Dataset] = {}
    for path in outbox.glob("*-sr.dcm"):
        sr = dcmread(path)
        found[sr_summary(sr)["referenced_sop_instance_uids"][0]] = sr
    return found


def stop(node: NodeProcess) -> None:
    node.process.send_signal(signal.SIGTERM)
    node.process.wait(timeout=60)


def test_index_persists_across_restarts_and_never_matches_the_same_patient(
    start_node: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    rng = np.random.default_rng(2024)
    bases = {
        p: synthetic_display_image(rng, CxrClass.COVID19 if i % 2 else CxrClass.NEGATIVE)
        for i, p in enumerate(PATIENTS)
    }
    folder = tmp_path / "studies"
    folder.mkdir()
    studies: list[Study] = []

    def make(patient: str, phase: int, base: np.ndarray | None = None) -> Study:
        n = len(studies)
        path, uid = synthetic_cxr(
            folder / f"s{n:02d}.dcm", bases[patient] if base is None else base, patient, n, n
        )
        study = Study(path, patient, uid, phase)
        studies.append(study)
        return study

    def sop(study: Study) -> str:
        return str(dcmread(study.path, stop_before_pixels=True).SOPInstanceUID)

    # more worker threads: the embedded queue polls once a second per consumer
    env = {"hospital_k": "4", "similar_k": "2", "produce_sc": "false", "worker_concurrency": "8"}
    outbox = tmp_path / "node" / "outbox"

    # --- phase 1: 20 studies, two per patient
    node = start_node(**env)
    phase1 = [make(p, 1) for _ in range(2) for p in PATIENTS]
    assert storescu(node, [s.path for s in phase1]) == 0
    wait_for(lambda: len(srs_in(outbox)) == 20, 240, "20 SRs")
    stop(node)
    store = HospitalStore(tmp_path / "node" / "hospital")
    assert store.count() == 20
    assert list((tmp_path / "node" / "hospital").glob("index-*.hnsw"))

    # --- phase 2, after a restart: the first SR can only list phase-1 studies
    node = start_node(**env)
    first = make(PATIENTS[0], 2)
    assert storescu(node, [first.path]) == 0
    wait_for(lambda: sop(first) in srs_in(outbox), 120, "the first SR after the restart")
    listed = [
        s for s in sr_summary(srs_in(outbox)[sop(first)])["similar"] if s["kind"] == "hospital"
    ]
    phase1_uids = {s.study_uid for s in phase1}
    assert len(listed) == 4 and {s["study_uid"] for s in listed} <= phase1_uids
    assert all(s["label"] is None for s in listed)  # nothing confirmed yet

    # confirmed diagnoses recorded later (e.g. PCR results), with the CLI
    diagnoses = {}
    for i, item in enumerate(listed):
        diagnosis = "covid" if i % 2 == 0 else "negative"
        done = node.cli("label", str(item["study_uid"]), diagnosis)
        assert done.returncode == 0, done.stderr
        diagnoses[item["study_uid"]] = diagnosis
    # the same image again for a new patient: its neighbours are `first` and the labelled ones
    twin = make("SYNNEW", 2, base=bases[PATIENTS[0]])
    twin = Study(first.path.with_name("twin.dcm"), "SYNNEW", twin.study_uid, 2)
    studies[-1] = twin
    ds = dcmread(first.path)
    ds.PatientID, ds.PatientName = "SYNNEW", "Test^SYNNEW"
    ds.StudyInstanceUID, ds.SOPInstanceUID = twin.study_uid, generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(twin.path, enforce_file_format=True)
    rest2 = [make(PATIENTS[i % 10], 2) for i in range(1, 14)]
    assert storescu(node, [twin.path, *(s.path for s in rest2)]) == 0
    wait_for(lambda: len(srs_in(outbox)) == 35, 240, "35 SRs")
    stop(node)
    assert store.count() == 35

    twin_listed = [
        s for s in sr_summary(srs_in(outbox)[sop(twin)])["similar"] if s["kind"] == "hospital"
    ]
    assert twin_listed[0]["study_uid"] == first.study_uid  # the same pixels, another patient
    shown = {s["study_uid"]: s["label"] for s in twin_listed if s["study_uid"] in diagnoses}
    assert shown and all(shown[uid] == diagnoses[uid] for uid in shown)

    # --- phase 3, after a second restart
    node = start_node(**env)
    phase3 = [make(PATIENTS[(i * 3) % 10], 3) for i in range(15)]
    assert storescu(node, [s.path for s in phase3]) == 0
    wait_for(lambda: len(srs_in(outbox)) == 50, 240, "50 SRs")
    stop(node)
    assert len(studies) == 50
    assert store.count() == 50

    # --- never the same patient, never the study itself, only studies sent before
    by_uid = {s.study_uid: s for s in studies}
    srs = srs_in(outbox)
    listed_total = 0
    for study in studies:
        items = [s for s in sr_summary(srs[sop(study)])["similar"] if s["kind"] == "hospital"]
        for item in items:
            match = by_uid[str(item["study_uid"])]
            assert match.patient != study.patient, (study, match)
            assert match.study_uid != study.study_uid
            assert match.phase <= study.phase
        listed_total += len(items)
        if study.phase > 1:
            assert len(items) == 4  # the index had plenty of other patients' studies
        # the reference set is still listed next to the hospital's studies
        assert any(s["kind"] == "reference" for s in sr_summary(srs[sop(study)])["similar"])
    assert listed_total > 150
    # the patient id is nowhere in the hospital index's files
    for path in (tmp_path / "node" / "hospital").iterdir():
        assert b"SYN0" not in path.read_bytes(), path
