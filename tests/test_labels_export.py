"""`cxr-node export-dataset`: labelled instances as a dataset cxr-train reads, without
patient identifiers."""

from __future__ import annotations

import csv
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicom_node.learning.export import ExportError, age_years, export_dataset
from dicom_node.learning.training_copy import KEPT, training_copy
from dicom_node.records.ledger import Job, JobState, Ledger
from dicom_node.results.pixels import decode_display
from tests.synthetic import synthetic_cr, write
from training.data import read_dataset

PHI = {
    "PatientName": "Zyqoxwelt^Marguerite",
    "PatientID": "PHI4471982",
    "PatientBirthDate": "19310417",
    "AccessionNumber": "ACX900017",
    "OtherPatientIDs": "OPID83001",
    "InstitutionName": "St Quarvendil Hospital",
}
ADDED = {"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "PatientIdentityRemoved"}
ADDED |= {"DeidentificationMethod"}


def _same_pixels(original: Path, copy: Path) -> None:
    a, b = decode_display(dcmread(original)), decode_display(dcmread(copy))
    assert a.shape == b.shape and np.array_equal(a, b)


@pytest.mark.parametrize("name", ["RG1_UNCI.dcm", "RG1_J2KR.dcm"])
def test_training_copy_keeps_the_pixels_and_nothing_else(name: str, tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file

    path = Path(str(get_testdata_file(name)))
    source = dcmread(path)
    copy = training_copy(source)
    out = write(copy, tmp_path / "copy.dcm")
    _same_pixels(path, out)
    back = dcmread(out)
    assert {e.keyword for e in back} <= set(KEPT) | ADDED
    assert back.file_meta.TransferSyntaxUID == source.file_meta.TransferSyntaxUID
    for uid in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        assert back[uid].value != source[uid].value
    raw = out.read_bytes()
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber"):
        value = str(source.get(keyword) or "")
        assert not value or value.encode() not in raw, keyword


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian])
def test_training_copy_in_other_transfer_syntaxes(syntax: UID, tmp_path: Path) -> None:
    ds = synthetic_cr(size=64)
    ds.file_meta.TransferSyntaxUID = syntax
    original = write(ds, tmp_path / "in.dcm")
    _same_pixels(original, write(training_copy(dcmread(original)), tmp_path / "out.dcm"))


def test_ages_in_years_with_the_oldest_grouped() -> None:
    assert [age_years(a) for a in ("045Y", "006M", "095Y", "090Y", "", "abc")] == [
        "45",
        "0.5",
        "90",
        "90",
        "",
        "",
    ]


def _instance(tmp: Path, n: int, study: str, patient: str, **header: str) -> Path:
    ds = synthetic_cr(size=64, seed=n, study_uid=study)
    for keyword, value in {**PHI, "PatientID": patient, "PatientAge": "067Y", **header}.items():
        setattr(ds, keyword, value)
    return write(ds, tmp / f"{n}.dcm")


def _job(ledger: Ledger, n: int, path: Path, **changes: object) -> Job:
    ds = dcmread(path, stop_before_pixels=True)
    job = Job.received(
        f"job{n}",
        sop_instance_uid=str(ds.SOPInstanceUID),
        sop_class_uid=str(ds.SOPClassUID),
        study_instance_uid=str(ds.StudyInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        calling_ae="CR_ROOM1",
        spool_path=str(path),
    )
    job = replace(job, state=JobState.DELIVERED, probability=0.25 + n / 100, device_uid="9.9")
    job = replace(job, **changes)  # type: ignore[arg-type]
    ledger.add(job)
    return job


def test_export_writes_what_cxr_train_reads_and_says_what_it_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    # studies A (patient P1, 2 images), B (P2), C (P1 again), D (unlabelled), E (edge cases)
    jobs = [
        _job(ledger, 1, _instance(spool, 1, "7.1", "PHI4471982")),
        _job(ledger, 2, _instance(spool, 2, "7.1", "PHI4471982")),
        _job(ledger, 3, _instance(spool, 3, "7.2", "PHI4471983", PatientSex="F")),
        _job(ledger, 4, _instance(spool, 4, "7.3", "PHI4471982", PatientAge="093Y")),
        _job(ledger, 5, _instance(spool, 5, "7.4", "PHI4471984")),
        _job(
            ledger,
            6,
            _instance(spool, 6, "7.5", "PHI4471985"),
            state=JobState.REJECTED,
            probability=None,
            reason="view position LL: lateral views are not analysed",
        ),
        _job(
            ledger,
            7,
            _instance(spool, 7, "7.5", "PHI4471985"),
            state=JobState.REJECTED,
            probability=None,
            reason="not analysed (input gate): lung fields not found",
        ),
        _job(ledger, 8, _instance(spool, 8, "7.5", "PHI4471985"), probability=None),
        _job(ledger, 9, _instance(spool, 9, "7.5", "PHI4471985", BurnedInAnnotation="YES")),
        _job(ledger, 10, _instance(spool, 10, "7.5", "")),
        _job(ledger, 11, _instance(spool, 11, "7.5", "PHI4471985")),
    ]
    Path(str(jobs[-1].spool_path)).unlink()  # cleaned up since
    diagnoses = {"7.1": "covid", "7.2": "negative", "7.3": "negative", "7.5": "covid"}
    diagnoses["6.6"] = "covid"  # never received
    caplog.set_level(logging.DEBUG)
    out = tmp_path / "export"
    report = export_dataset(
        out, diagnoses, ledger.jobs_of_studies(diagnoses), b"k" * 32, {"9.9": "cxr 1.0"}
    )
    assert report.exported == 4 and report.patient_groups == 2
    assert report.labels == {"covid": 2, "negative": 2}
    assert report.studies_not_received == 1 and report.labelled_studies == 5
    assert report.skipped == {
        "not analysed: lateral view": 1,
        "not analysed: the bundle's input gate refused it": 1,
        "not analysed (yet, or its analysis failed)": 1,
        "burned-in annotation (text in the pixels may name the patient)": 1,
        "no Patient ID: no patient group can be formed": 1,
        "image no longer in the spool (cleaned up)": 1,
    }
    rows = list(csv.DictReader((out / "metadata.csv").open()))
    assert [r["label"] for r in rows] == ["covid", "covid", "negative", "negative"]
    groups = [r["patient_group"] for r in rows]
    assert groups[0] == groups[1] == groups[3] != groups[2]  # P1, P1, P2, P1
    assert rows[2]["sex"] == "F" and rows[3]["age"] == "90" and rows[0]["age"] == "67"
    assert rows[0]["study_month"] == "2024-01" and rows[0]["source"] == "CR_ROOM1"
    assert rows[0]["node_bundle"] == "cxr 1.0" and float(rows[0]["node_score"]) == 0.26
    records, _ = read_dataset(out / "metadata.csv")  # cxr-train's reader, as it is
    assert len(records) == 4 and {r.patient_group for r in records} == set(groups)
    for row, job in zip(rows, [jobs[0], jobs[1], jobs[2], jobs[3]], strict=True):
        _same_pixels(Path(str(job.spool_path)), out / row["image"])

    written = [p.read_bytes() for p in out.rglob("*") if p.is_file()]
    for value in [*PHI.values(), "PHI4471983", "7.1", "2024010"]:
        assert not any(value.encode() in blob for blob in written), value
        assert value not in caplog.text, value
    with pytest.raises(ExportError, match="not an empty folder"):
        export_dataset(out, diagnoses, [], b"k" * 32, {})


def test_the_same_patient_is_the_same_group_only_with_the_same_key(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    _job(ledger, 1, _instance(spool, 1, "7.1", "PHI4471982"))
    jobs = ledger.jobs_of_studies(["7.1"])

    def group(key: bytes, name: str) -> str:
        export_dataset(tmp_path / name, {"7.1": "covid"}, jobs, key, {})
        (row,) = csv.DictReader((tmp_path / name / "metadata.csv").open())
        return row["patient_group"]

    assert group(b"a" * 32, "one") == group(b"a" * 32, "two") != group(b"b" * 32, "three")
