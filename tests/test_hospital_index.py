"""The hospital index: persistence, never the same patient, labels, no patient id in clear."""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import ComputedRadiographyImageStorage

from dicom_node.results.hospital_index import HospitalEntry, HospitalIndex, HospitalStore

DIM = 16
SPACE = "1.2.826.0.1.3680043.8.498.1"


def vector(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)


def entry(index: HospitalIndex, n: int, patient: str, study: int | None = None) -> HospitalEntry:
    study_n = n if study is None else study
    return HospitalEntry(
        sop_instance_uid=f"1.2.3.{n}.1.1",
        sop_class_uid=ComputedRadiographyImageStorage,
        study_instance_uid=f"1.2.3.{study_n}",
        series_instance_uid=f"1.2.3.{study_n}.1",
        study_date="20240101",
        probability=n / 100,
        patient_key=index.patient_key(patient),
    )


def open_index(
    folder: Path, space: str = SPACE, snapshot_interval_s: float = 60.0
) -> HospitalIndex:
    return HospitalIndex(folder, space=space, dim=DIM, snapshot_interval_s=snapshot_interval_s)


def test_add_query_and_persist_across_reopen(tmp_path: Path) -> None:
    index = open_index(tmp_path)
    for n in range(20):
        assert index.add(entry(index, n, f"P{n}"), vector(n))
    query_key = index.patient_key("someone else")
    before = index.query(vector(7), 3, query_key, "9.9.9")
    assert before[0].study_instance_uid == "1.2.3.7"  # its own vector is the nearest
    assert before[0].distance == pytest.approx(0.0, abs=1e-5)
    assert len(before) == 3 and before[0].kind == "hospital"
    assert before[0].probability == pytest.approx(0.07)
    assert before[0].study_date == "20240101"

    again = open_index(tmp_path)  # a restart
    assert len(again) == 20
    assert [i.sop_instance_uid for i in again.query(vector(7), 3, query_key, "9.9.9")] == [
        i.sop_instance_uid for i in before
    ]


def test_same_image_is_added_once(tmp_path: Path) -> None:
    index = open_index(tmp_path)
    assert index.add(entry(index, 1, "P1"), vector(1))
    assert not index.add(entry(index, 1, "P1"), vector(1))
    assert len(index) == 1 and index.store.count(SPACE) == 1


def test_never_the_same_patient_nor_the_same_study(tmp_path: Path) -> None:
    index = open_index(tmp_path)
    # patient A: studies 0..4, nearly identical images; patient B: study 5 in between
    for n in range(5):
        index.add(entry(index, n, "A"), vector(100) + 0.01 * vector(n))
    index.add(entry(index, 5, "B"), vector(100) + 0.5 * vector(5))
    index.add(entry(index, 6, "C", study=99), vector(100))  # C's study 99
    a = index.patient_key("A")
    found = index.query(vector(100), 4, a, "1.2.3.0")
    assert [i.study_instance_uid for i in found] == ["1.2.3.99", "1.2.3.5"]
    # the query's own study is excluded whoever the patient
    found = index.query(vector(100), 4, index.patient_key("D"), "1.2.3.99")
    assert "1.2.3.99" not in {i.study_instance_uid for i in found}


def test_issuer_is_part_of_the_patient(tmp_path: Path) -> None:
    index = open_index(tmp_path)
    assert index.patient_key("123", "HOSP_A") != index.patient_key("123", "HOSP_B")
    assert index.patient_key("123") == index.patient_key(" 123 ")
    assert index.patient_key("") is None and index.patient_key(None) is None


def test_unknown_patient_matches_nothing_and_is_matched_by_nothing(tmp_path: Path) -> None:
    index = open_index(tmp_path)
    index.add(entry(index, 1, ""), vector(1))  # no patient id
    index.add(entry(index, 2, "P2"), vector(2))
    assert index.query(vector(1), 4, None, "9.9") == []
    found = index.query(vector(1), 4, index.patient_key("P3"), "9.9")
    assert [i.study_instance_uid for i in found] == ["1.2.3.2"]


def test_one_image_per_study(tmp_path: Path) -> None:
    index = open_index(tmp_path)
    for n in range(3):  # three images of study 50
        index.add(entry(index, n, "P", study=50), vector(0) + 0.01 * vector(n))
    index.add(entry(index, 10, "Q"), vector(10))
    found = index.query(vector(0), 4, index.patient_key("R"), "9.9")
    assert [i.study_instance_uid for i in found] == ["1.2.3.50", "1.2.3.10"]


def test_filtering_fetches_deeper_when_the_nearest_are_excluded(tmp_path: Path) -> None:
    index = open_index(tmp_path)
    for n in range(60):  # the same patient's 60 studies, all near the query
        index.add(entry(index, n, "A"), vector(500) + 0.01 * vector(n))
    for n in range(60, 64):
        index.add(entry(index, n, f"P{n}"), vector(n))
    found = index.query(vector(500), 4, index.patient_key("A"), "9.9")
    assert sorted(str(i.study_instance_uid) for i in found) == [f"1.2.3.{n}" for n in range(60, 64)]


def test_confirmed_diagnosis_shows_on_matches(tmp_path: Path) -> None:
    index = open_index(tmp_path)
    index.add(entry(index, 1, "P1"), vector(1))
    store = HospitalStore(tmp_path)  # what `cxr-node label` uses: no vectors, no secret
    assert store.set_diagnosis("1.2.3.1", "covid") == 1
    (match,) = index.query(vector(1), 1, index.patient_key("X"), "9.9")
    assert match.label == "covid"
    store.set_diagnosis("1.2.3.1", "negative")
    assert index.query(vector(1), 1, index.patient_key("X"), "9.9")[0].label == "negative"
    store.set_diagnosis("1.2.3.1", None)
    assert index.query(vector(1), 1, index.patient_key("X"), "9.9")[0].label is None
    assert store.set_diagnosis("7.7.7", "covid") == 0  # allowed before the study is analysed
    with pytest.raises(ValueError, match="diagnosis"):
        store.set_diagnosis("1.2.3.1", "positive")


def test_patient_id_is_never_stored_in_clear(tmp_path: Path) -> None:
    index = open_index(tmp_path)
    index.add(entry(index, 1, "PHI4471982"), vector(1))
    for path in tmp_path.iterdir():
        assert b"PHI4471982" not in path.read_bytes(), path
    key = tmp_path / "secret.key"
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert len(key.read_bytes()) == 32
    # another node (another key) cannot link its hashes to ours
    other = open_index(tmp_path / "other")
    assert other.patient_key("PHI4471982") != index.patient_key("PHI4471982")
    # the key survives a restart, so the same patient is still recognised
    assert open_index(tmp_path).patient_key("PHI4471982") == index.patient_key("PHI4471982")


def test_stale_or_damaged_snapshot_is_completed_from_the_store(tmp_path: Path) -> None:
    index = open_index(tmp_path, snapshot_interval_s=0)  # a snapshot after every insert
    for n in range(5):
        index.add(entry(index, n, f"P{n}"), vector(n))
    snapshot = index.snapshot_path.read_bytes()
    for n in range(5, 8):
        index.add(entry(index, n, f"P{n}"), vector(n))
    index.snapshot_path.write_bytes(snapshot)  # as if the last saves were lost in a crash
    again = open_index(tmp_path)
    assert len(again) == 8
    assert again.query(vector(6), 1, again.patient_key("X"), "9.9")[0].study_instance_uid == (
        "1.2.3.6"
    )
    index.snapshot_path.write_bytes(b"garbage")
    assert len(open_index(tmp_path)) == 8


def test_snapshot_is_rewritten_at_most_once_per_interval(tmp_path: Path) -> None:
    index = open_index(tmp_path, snapshot_interval_s=3600)
    index.add(entry(index, 0, "P0"), vector(0))
    first = index.snapshot_path.read_bytes()  # written at the first insert
    for n in range(1, 3):
        index.add(entry(index, n, f"P{n}"), vector(n))
    assert index.snapshot_path.read_bytes() == first  # the store has them; no rewrite yet
    assert len(open_index(tmp_path)) == 3  # and a restart completes the snapshot from it


def test_other_process_inserts_are_seen(tmp_path: Path) -> None:
    first = open_index(tmp_path)
    second = open_index(tmp_path)  # e.g. a second node worker process
    second.add(entry(second, 1, "P1"), vector(1))
    found = first.query(vector(1), 1, first.patient_key("X"), "9.9")
    assert [i.study_instance_uid for i in found] == ["1.2.3.1"]
    first.add(entry(first, 2, "P2"), vector(2))
    assert len(first) == 2
    assert second.store.count(SPACE) == 2


def test_a_new_model_version_is_a_new_space(tmp_path: Path) -> None:
    old = open_index(tmp_path)
    old.add(entry(old, 1, "P1"), vector(1))
    new = open_index(tmp_path, space="1.2.826.0.1.3680043.8.498.2")
    assert len(new) == 0
    assert new.query(vector(1), 4, new.patient_key("X"), "9.9") == []
    assert new.store.count() == 1  # the old row stays


def test_embedding_of_the_wrong_size_is_refused(tmp_path: Path) -> None:
    index = open_index(tmp_path)
    with pytest.raises(ValueError, match="values"):
        index.add(entry(index, 1, "P1"), np.zeros(DIM + 1))


def test_store_schema_holds_no_patient_columns(tmp_path: Path) -> None:
    open_index(tmp_path)
    with sqlite3.connect(tmp_path / "hospital.sqlite3") as db:
        columns = {r[1] for r in db.execute("PRAGMA table_info(items)")}
    assert "patient_key" in columns
    assert not {"patient_id", "patient_name", "accession_number"} & columns


def test_label_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from dicom_node.operations.cli import app

    monkeypatch.setenv("CXR_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("CXR_CONFIG", raising=False)
    runner = CliRunner()
    done = runner.invoke(app, ["label", "1.2.3.4", "COVID"])
    assert done.exit_code == 0, done.output
    assert "recorded as covid" in done.output and "no image of this study" in done.output
    store = HospitalStore(tmp_path / "hospital")
    assert store.diagnosis("1.2.3.4") == "covid"
    assert runner.invoke(app, ["label", "1.2.3.4", "none"]).exit_code == 0
    assert store.diagnosis("1.2.3.4") is None
    refused = runner.invoke(app, ["label", "1.2.3.4", "positive"])
    assert refused.exit_code == 2 and store.diagnosis("1.2.3.4") is None
