"""`cxr-node cleanup` keeps what `export-dataset` needs: the spooled images of analysed
instances whose study has a confirmed diagnosis (CXR_RETENTION_KEEP_LABELLED)."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from typer.testing import CliRunner

from dicom_node.operations.cli import app
from dicom_node.records.ledger import Job, JobState, Ledger
from dicom_node.results.hospital_index import HospitalStore


def _old_jobs(data: Path) -> dict[str, tuple[Path, Path]]:
    """Finished 40 days ago: labelled+analysed, labelled+rejected, unlabelled+analysed."""
    ledger = Ledger(data / "ledger.sqlite3")
    old = time.time() - 40 * 86400
    files = {}
    for name, study, state, p in (
        ("labelled", "1.1", JobState.DELIVERED, 0.7),
        ("lateral", "1.1", JobState.REJECTED, None),
        ("other", "1.2", JobState.DELIVERED, 0.2),
    ):
        spool, result = data / "spool" / f"{name}.dcm", data / "results" / f"{name}-sr.dcm"
        for path in (spool, result):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x" * 1000)
        files[name] = (spool, result)
        job = Job.received(
            name,
            sop_instance_uid=generate_uid(),
            sop_class_uid="1.2",
            study_instance_uid=study,
            series_instance_uid="1.4",
            calling_ae="CR1",
            spool_path=str(spool),
            at=old,
        )
        ledger.add(replace(job, state=state, probability=p))
    with ledger._connect() as db:
        db.execute("UPDATE jobs SET updated_at = ?", (old,))
    HospitalStore(data / "hospital").set_diagnosis("1.1", "covid")
    return files


@pytest.mark.parametrize("keep", [True, False])
def test_cleanup_keeps_labelled_analysed_images(
    keep: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = _old_jobs(tmp_path)
    monkeypatch.setenv("CXR_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CXR_RETENTION_KEEP_LABELLED", str(keep).lower())
    done = CliRunner().invoke(app, ["cleanup", "--days", "30"])
    assert done.exit_code == 0, done.output
    spool, result = files["labelled"]
    assert spool.exists() is keep and not result.exists()  # the SR can come from the PACS
    assert not any(p.exists() for p in files["lateral"])  # not exportable: no reason to keep
    assert not any(p.exists() for p in files["other"])
    assert ("kept 1 spooled images" in done.output) is keep
    assert f"deleted {5 if keep else 6} files" in done.output
