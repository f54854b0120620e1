"""`cxr-node label --csv`: a laboratory's export of confirmed diagnoses, in bulk."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from dicom_node.learning.label_csv import (
    LabelFileError,
    LabelReport,
    load_label_file,
    read_rows,
    spans,
)
from dicom_node.operations.cli import app
from dicom_node.records.keys import ACCESSION_KEY_FILE, accession_hash, load_or_create_key
from dicom_node.records.ledger import Job, Ledger
from dicom_node.results.hospital_index import HospitalStore


def test_spans_of_line_numbers() -> None:
    assert spans([9, 3, 4, 5, 12, 13]) == "3-5, 9, 12-13"
    assert spans([7]) == "7" and spans([]) == ""


def test_rows_with_semicolons_a_byte_order_mark_and_lab_words() -> None:
    report = LabelReport()
    text = (
        "\ufeffAccession No;Study UID;Result\nA1;;Detected\n;1.2.3;not detected\n\n;;covid\nA2;;x\n"
    )
    rows = read_rows(text, report)
    assert [(r.line, r.accession_number, r.study_uid, r.diagnosis) for r in rows] == [
        (2, "A1", "", "covid"),
        (3, "", "1.2.3", "negative"),
    ]
    assert report.rows == 4  # the blank line is not a row
    assert report.not_recorded == {
        "without a Study Instance UID or an accession number": [5],
        "with a diagnosis that is not covid, negative or none": [6],
    }


def test_a_file_without_the_columns_is_refused_without_quoting_it() -> None:
    with pytest.raises(LabelFileError, match="diagnosis column") as raised:
        read_rows("patient,PHI4471982\nx,y\n", LabelReport())
    assert "PHI4471982" not in str(raised.value)
    with pytest.raises(LabelFileError, match="empty"):
        read_rows("", LabelReport())


def _received(ledger: Ledger, n: int, study: str, accession_key: str | None) -> None:
    ledger.add(
        Job.received(
            f"job{n}",
            sop_instance_uid=f"1.2.3.{n}",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
            study_instance_uid=study,
            series_instance_uid=f"1.2.4.{n}",
            calling_ae="MOD",
            spool_path=None,
            accession_key=accession_key,
        )
    )


def test_studies_found_by_uid_or_accession_unknown_and_conflicting_reported(
    tmp_path: Path,
) -> None:
    key = load_or_create_key(tmp_path / "keys" / ACCESSION_KEY_FILE)
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    store = HospitalStore(tmp_path / "hospital")
    _received(ledger, 1, "9.1", accession_hash(key, "ACC-1"))
    _received(ledger, 2, "9.2", accession_hash(key, "ACC-2"))
    _received(ledger, 3, "9.3", None)
    _received(ledger, 4, "9.4", accession_hash(key, "ACC-4"))
    store.set_diagnosis("9.4", "covid")
    csv = tmp_path / "lab.csv"
    csv.write_text(
        "AccessionNumber,StudyInstanceUID,diagnosis\n"
        "ACC-1,,positive\n"  # 2: by accession
        ",9.3,negative\n"  # 3: by UID
        "ACC-2,,covid\n"  # 4: conflicts with line 5
        ",9.2,negative\n"  # 5
        "ACC-9,,covid\n"  # 6: unknown accession
        ",8.8,covid\n"  # 7: unknown UID
        "ACC-4,,none\n"  # 8: removes
    )
    calls: list[tuple[str, str | None]] = []

    def record(study: str, diagnosis: str | None) -> None:
        calls.append((study, diagnosis))
        store.set_diagnosis(study, diagnosis)

    def load(dry_run: bool) -> LabelReport:
        return load_label_file(
            csv,
            key,
            ledger.known_studies,
            ledger.studies_by_accession,
            record,
            dry_run=dry_run,
        )

    dry = load(dry_run=True)
    assert calls == [] and dry.recorded == 2
    report = load(dry_run=False)
    assert (report.rows, report.recorded, report.removed) == (7, 2, 1)
    assert report.not_recorded == {
        "of a study the node has not received": [6, 7],
        "giving one study two different diagnoses": [4, 5],
    }
    assert store.diagnoses() == {"9.1": "covid", "9.3": "negative"}
    assert sorted(calls) == [("9.1", "covid"), ("9.3", "negative"), ("9.4", None)]
    assert "ACC-" not in "\n".join(report.lines()) and "9.1" not in "\n".join(report.lines())


def test_cli_label_csv_and_its_arguments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXR_DATA_DIR", str(tmp_path))
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    key = load_or_create_key(tmp_path / "keys" / ACCESSION_KEY_FILE)
    _received(ledger, 1, "9.1", accession_hash(key, "PHIACC77"))
    csv = tmp_path / "lab.csv"
    csv.write_text("accession,diagnosis\nPHIACC77,covid\nPHIACC78,negative\n")
    runner = CliRunner()
    both = runner.invoke(app, ["label", "9.1", "covid", "--csv", str(csv)])
    assert both.exit_code == 2 and "not both" in both.output
    neither = runner.invoke(app, ["label"])
    assert neither.exit_code == 2
    done = runner.invoke(app, ["label", "--csv", str(csv)])
    assert done.exit_code == 0, done.output
    assert "2 rows: 1 studies labelled" in done.output
    assert "1 of a study the node has not received: line 3" in done.output
    assert "PHIACC7" not in done.output
    assert HospitalStore(tmp_path / "hospital").diagnosis("9.1") == "covid"
