from __future__ import annotations

import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest
from pydicom.uid import ComputedRadiographyImageStorage

from dicom_node.jobs.recovery import sweep
from dicom_node.records.ledger import DeliveryState, Job, JobState, Ledger, OutputKind, OutputUids


def make_job(job_id: str, sop: str, state: JobState = JobState.RECEIVED) -> Job:
    job = Job.received(
        job_id,
        sop_instance_uid=sop,
        sop_class_uid=ComputedRadiographyImageStorage,
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.4",
        calling_ae="MOD",
        spool_path=f"/spool/{job_id}.dcm",
    )
    return replace(job, state=state)


def test_same_sop_instance_is_recorded_once(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.db")
    assert ledger.add(make_job("a", "1.2.3.4.5"))
    assert not ledger.add(make_job("b", "1.2.3.4.5"))
    assert ledger.by_sop_instance("1.2.3.4.5").job_id == "a"  # type: ignore[union-attr]
    assert ledger.get("b") is None
    assert ledger.counts()["received"] == 1


def test_state_change_guarded_by_current_state(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.db")
    ledger.add(make_job("a", "1.1"))
    assert ledger.set_state("a", JobState.ANALYSED, only_from=(JobState.ANALYSING,)) is False
    assert ledger.set_state("a", JobState.ANALYSING, only_from=(JobState.RECEIVED,)) is True
    assert ledger.get("a").state is JobState.ANALYSING  # type: ignore[union-attr]


def test_deliveries_roll_up_to_job_state(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.db")
    ledger.add(make_job("a", "1.1", JobState.ANALYSED))
    ledger.add_deliveries("a", ["P1@h:1", "P2@h:2"])
    ledger.record_attempt("a", "P1@h:1", DeliveryState.DELIVERED)
    assert ledger.get("a").state is JobState.ANALYSED  # type: ignore[union-attr]
    ledger.record_attempt("a", "P2@h:2", DeliveryState.PENDING, "refused")
    ledger.record_attempt("a", "P2@h:2", DeliveryState.FAILED, "refused")
    job = ledger.get("a")
    assert job is not None and job.state is JobState.FAILED and "P2@h:2" in (job.reason or "")
    assert [d.attempts for d in ledger.deliveries("a") if d.destination == "P2@h:2"] == [2]
    # an operator retry puts it back in the queue, and success then completes it
    assert ledger.retry_failed("a") == ["P2@h:2"]
    assert ledger.get("a").state is JobState.ANALYSED  # type: ignore[union-attr]
    ledger.record_attempt("a", "P2@h:2", DeliveryState.DELIVERED)
    assert ledger.get("a").state is JobState.DELIVERED  # type: ignore[union-attr]


def test_sweep_requeues_unfinished_work_only(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.db")
    ledger.add(make_job("r", "1.1", JobState.RECEIVED))
    ledger.add(make_job("x", "1.2", JobState.ANALYSING))
    ledger.add(make_job("d", "1.3", JobState.DELIVERED))
    ledger.add(make_job("j", "1.4", JobState.REJECTED))
    ledger.add(make_job("a", "1.5", JobState.ANALYSED))
    ledger.add_deliveries("a", ["outbox"])
    prepared: list[str] = []
    delivered: list[tuple[str, str]] = []
    count = sweep(ledger, prepared.append, lambda j, d: delivered.append((j, d)), older_than_s=0)
    assert sorted(prepared) == ["r", "x"]
    assert delivered == [("a", "outbox")]
    assert count == 3
    # recent work is left alone by the periodic sweep
    assert sweep(ledger, prepared.append, lambda j, d: None, older_than_s=3600) == 0


def test_output_uids_fixed_at_receive_time(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.db")
    ledger.add(make_job("a", "1.1"))
    uids = ledger.output_uids("a")
    assert set(uids) == set(OutputKind)
    assert len({u.sop_instance_uid for u in uids.values()}) == 3
    assert len({u.series_instance_uid for u in uids.values()}) == 3  # a series per object
    assert Ledger(tmp_path / "l.db").output_uids("a") == uids  # the same on every call
    # a duplicate receive does not change them
    assert not ledger.add(make_job("b", "1.1"))
    assert ledger.output_uids("a") == uids


#: The jobs table of ledgers written before the output UIDs had one home: the SR's UIDs sat in
#: `jobs` and, from when the `outputs` table came, in it too.
OLD_JOBS = """
CREATE TABLE jobs (
    job_id TEXT PRIMARY KEY, sop_instance_uid TEXT NOT NULL UNIQUE,
    sop_class_uid TEXT NOT NULL, study_instance_uid TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL, calling_ae TEXT NOT NULL, spool_path TEXT,
    state TEXT NOT NULL, reason TEXT, sr_series_uid TEXT NOT NULL, sr_sop_uid TEXT NOT NULL,
    probability REAL, received_at REAL NOT NULL, updated_at REAL NOT NULL
);
"""


def test_an_old_ledger_keeps_its_sr_uids_and_they_live_in_one_place(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.executescript(OLD_JOBS)
        db.execute(
            "INSERT INTO jobs VALUES ('a', '1.1', '1.2.840.10008.5.1.4.1.1.1', '1.2', '1.3', "
            "'MOD', NULL, 'delivered', NULL, '1.2.9', '1.2.9.1', 0.4, 1.0, 2.0)"
        )
    db.close()
    ledger = Ledger(path)
    uids = ledger.output_uids("a")
    # the SR a PACS already holds keeps its UIDs: a redone job replaces it there
    assert uids[OutputKind.SR] == OutputUids("1.2.9", "1.2.9.1")
    assert set(uids) == set(OutputKind)
    assert len({u.sop_instance_uid for u in uids.values()}) == 3
    with sqlite3.connect(path) as db:
        columns = {r[1] for r in db.execute("PRAGMA table_info(jobs)")}
    db.close()
    assert not {"sr_series_uid", "sr_sop_uid"} & columns
    job = ledger.get("a")
    assert job is not None and job.state is JobState.DELIVERED and job.probability == 0.4
    assert Ledger(path).output_uids("a") == uids  # opened again: nothing changes
    assert ledger.add(make_job("b", "1.4"))  # and new jobs go in
    assert set(ledger.output_uids("b")) == set(OutputKind)


def test_reading_output_uids_of_an_unknown_job_fails(tmp_path: Path) -> None:
    with pytest.raises(KeyError):
        Ledger(tmp_path / "l.db").output_uids("nope")


def test_deliveries_are_per_object_and_destination(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.db")
    ledger.add(make_job("a", "1.1", JobState.ANALYSED))
    kinds = [OutputKind.SR, OutputKind.SC]
    ledger.add_deliveries("a", ["P1@h:1", "P2@h:2"], kinds)
    ledger.add_deliveries("a", ["P1@h:1", "P2@h:2"], kinds)  # a redone finalize adds nothing
    assert len(ledger.deliveries("a")) == 4
    # one row per (job, destination) for the recovery sweep, which delivers all objects
    assert sorted(d.destination for d in ledger.pending_deliveries()) == ["P1@h:1", "P2@h:2"]
    for destination in ("P1@h:1", "P2@h:2"):
        ledger.record_attempt("a", destination, DeliveryState.DELIVERED, kind=OutputKind.SR)
    assert ledger.get("a").state is JobState.ANALYSED  # type: ignore[union-attr]  # SCs pending
    ledger.record_attempt("a", "P1@h:1", DeliveryState.DELIVERED, kind=OutputKind.SC)
    ledger.record_attempt("a", "P2@h:2", DeliveryState.FAILED, "refused", OutputKind.SC)
    job = ledger.get("a")
    assert job is not None and job.state is JobState.FAILED
    assert "SC to P2@h:2" in (job.reason or "")
    # the SRs stay delivered: a failed SC does not undo them
    srs = [d for d in ledger.deliveries("a") if d.kind is OutputKind.SR]
    assert {d.state for d in srs} == {DeliveryState.DELIVERED}
    assert ledger.retry_failed("a") == ["P2@h:2"]
    ledger.record_attempt("a", "P2@h:2", DeliveryState.DELIVERED, kind=OutputKind.SC)
    assert ledger.get("a").state is JobState.DELIVERED  # type: ignore[union-attr]


def test_ledger_from_before_per_object_deliveries_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.executescript(
            "CREATE TABLE deliveries (job_id TEXT NOT NULL, destination TEXT NOT NULL, "
            "state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT, "
            "updated_at REAL NOT NULL, PRIMARY KEY (job_id, destination));"
            "INSERT INTO deliveries VALUES ('a', 'P@h:1', 'pending', 2, 'down', 0);"
        )
    ledger = Ledger(path)
    ledger.add(make_job("a", "1.1", JobState.ANALYSED))
    (old,) = ledger.deliveries("a")
    assert (old.kind, old.destination, old.attempts, old.last_error) == (
        OutputKind.SR,
        "P@h:1",
        2,
        "down",
    )
    ledger.add_deliveries("a", ["P@h:1"], [OutputKind.SR, OutputKind.SC])
    assert [d.kind for d in ledger.deliveries("a")] == [OutputKind.SR, OutputKind.SC]
    Ledger(path)  # opening again migrates nothing twice
    assert len(ledger.deliveries("a")) == 2


def test_a_rejected_job_keeps_its_reason_when_its_not_analysed_sr_is_delivered(
    tmp_path: Path,
) -> None:
    ledger = Ledger(tmp_path / "l.db")
    ledger.add(make_job("a", "1.1"))
    reason = "not analysed (input gate): two lung fields not found"
    assert ledger.set_state("a", JobState.REJECTED, reason)
    ledger.add_deliveries("a", ["P@h:1"], [OutputKind.SR])
    # a crash before sending: the recovery sweep finds the SR still to deliver
    assert [(d.job_id, d.destination) for d in ledger.pending_deliveries()] == [("a", "P@h:1")]
    ledger.record_attempt("a", "P@h:1", DeliveryState.DELIVERED, kind=OutputKind.SR)
    job = ledger.get("a")
    assert job is not None and job.state is JobState.REJECTED and job.reason == reason
    assert ledger.pending_deliveries() == []


def test_scores_keep_their_model_version_and_studies_their_accession_key(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.executescript(OLD_JOBS)
        db.execute(
            "INSERT INTO jobs VALUES ('a', '1.1', '1.2.840.10008.5.1.4.1.1.1', '1.2', '1.3', "
            "'MOD', NULL, 'delivered', NULL, '1.2.9', '1.2.9.1', 0.4, 1.0, 2.0)"
        )
    db.close()
    ledger = Ledger(path)  # an old ledger gains the columns; its scores have no version
    old = ledger.get("a")
    assert old is not None and old.device_uid is None and old.accession_key is None
    job = replace(make_job("b", "1.5"), accession_key="k1", study_instance_uid="7.7")
    assert ledger.add(job)
    ledger.set_state("b", JobState.ANALYSED, probability=0.8, device_uid="9.9")
    scored = {s.study_instance_uid: s for s in ledger.scored()}
    assert scored["7.7"].device_uid == "9.9" and scored["7.7"].probability == 0.8
    assert scored["1.2"].device_uid is None
    assert [s.study_instance_uid for s in ledger.scored(studies=["7.7", "nope"])] == ["7.7"]
    assert [s.study_instance_uid for s in ledger.scored(since=1.5)] == ["7.7"]
    assert ledger.studies_by_accession(["k1", "k2"]) == {"k1": {"7.7"}}
    assert ledger.known_studies(["7.7", "1.2", "8.8"]) == {"7.7", "1.2"}
    assert [j.job_id for j in ledger.jobs_of_studies(["1.2", "7.7"])] == ["a", "b"]
