"""Confirmed diagnoses in bulk: `cxr-node label --csv FILE`, e.g. a laboratory's export.

The file has a header row naming its columns (case, spaces and punctuation ignored):

- the study: `StudyInstanceUID` (also `study_uid`, `study`) or `AccessionNumber` (also
  `accession`, `accession_no`); a row with both is matched by the UID;
- `diagnosis` (also `result`, `label`): `covid` (also `positive`, `detected`, `covid-19`),
  `negative` (also `not detected`), or `none` to remove a recorded diagnosis.

Commas, semicolons or tabs separate the columns (found from the header line); a UTF-8 byte
order mark (spreadsheet exports) is ignored. Studies are found in the ledger: by UID, or by
the keyed hash of the accession number kept for every received instance (the number itself
is never stored). An unknown study is not recorded - load the file again once it has been
received - and every row that is not recorded is reported by its line number in the file,
with why; identifiers are never printed or logged. A study given two different diagnoses in
one file is not recorded either.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from dicom_node.records.keys import accession_hash

_STUDY_COLUMNS = {"studyinstanceuid", "studyuid", "study"}
_ACCESSION_COLUMNS = {"accessionnumber", "accession", "accessionno", "accno"}
_DIAGNOSIS_COLUMNS = {"diagnosis", "result", "label"}

#: A diagnosis as a laboratory may write it -> what the node records (None: remove).
DIAGNOSIS_WORDS: dict[str, str | None] = {
    "covid": "covid",
    "covid19": "covid",
    "positive": "covid",
    "pos": "covid",
    "detected": "covid",
    "negative": "negative",
    "neg": "negative",
    "notdetected": "negative",
    "none": None,
}


class LabelFileError(ValueError):
    """The file cannot be read as a label file; the message says why (no identifiers)."""


@dataclass(frozen=True)
class LabelRow:
    line: int  # in the file, the header being line 1
    study_uid: str
    accession_number: str
    diagnosis: str | None  # covid | negative | None: remove


@dataclass
class LabelReport:
    """What `label --csv` did, by line number: nothing in it identifies a patient."""

    rows: int = 0
    recorded: int = 0  # studies given a diagnosis
    removed: int = 0  # studies whose diagnosis was removed
    not_recorded: dict[str, list[int]] = field(default_factory=dict)  # why -> line numbers

    def skip(self, why: str, line: int) -> None:
        self.not_recorded.setdefault(why, []).append(line)

    @property
    def skipped(self) -> int:
        return sum(len(lines) for lines in self.not_recorded.values())

    def lines(self) -> list[str]:
        out = [
            f"{self.rows} rows: {self.recorded} studies labelled, {self.removed} labels removed, "
            f"{self.skipped} rows not recorded"
        ]
        for why, lines in sorted(self.not_recorded.items()):
            out.append(f"  {len(lines)} {why}: line{'s' if len(lines) > 1 else ''} {spans(lines)}")
        return out


def spans(numbers: Iterable[int]) -> str:
    """3, 4, 5, 9 -> '3-5, 9'."""
    ordered = sorted(set(numbers))
    parts: list[str] = []
    start = prev = None
    for n in [*ordered, None]:
        if start is not None and (n is None or prev is None or n != prev + 1):
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = None
        if n is not None and start is None:
            start = n
        prev = n
    return ", ".join(parts)


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _column(names: list[str], wanted: set[str]) -> int | None:
    found = [i for i, name in enumerate(names) if _key(name) in wanted]
    return found[0] if found else None


def read_rows(text: str, report: LabelReport) -> list[LabelRow]:
    """The file's rows with a study and a known diagnosis; the others go into `report`."""
    text = text.removeprefix("\ufeff")
    first = text.split("\n", 1)[0]
    try:
        dialect: type[csv.Dialect] | csv.Dialect = csv.Sniffer().sniff(first, delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel  # one column, or no separator in the header
    reader = csv.reader(io.StringIO(text), dialect)
    header = next(reader, None)
    if not header:
        raise LabelFileError("the file is empty")
    study_col = _column(header, _STUDY_COLUMNS)
    accession_col = _column(header, _ACCESSION_COLUMNS)
    diagnosis_col = _column(header, _DIAGNOSIS_COLUMNS)
    if diagnosis_col is None or (study_col is None and accession_col is None):
        raise LabelFileError(
            "the header must name a diagnosis column and a StudyInstanceUID or "
            f"AccessionNumber column; it has {len(header)} columns, none of them fitting"
        )
    rows: list[LabelRow] = []
    for values in reader:
        line = reader.line_num
        if not any(v.strip() for v in values):
            continue
        report.rows += 1

        def cell(col: int | None, values: list[str] = values) -> str:
            return values[col].strip() if col is not None and col < len(values) else ""

        word = _key(cell(diagnosis_col))
        if word not in DIAGNOSIS_WORDS:
            report.skip("with a diagnosis that is not covid, negative or none", line)
            continue
        study, accession = cell(study_col), cell(accession_col)
        if not study and not accession:
            report.skip("without a Study Instance UID or an accession number", line)
            continue
        rows.append(LabelRow(line, study, accession, DIAGNOSIS_WORDS[word]))
    return rows


def load_label_file(
    path: Path,
    accession_key: bytes,
    known_studies: Callable[[list[str]], set[str]],
    studies_by_accession: Callable[[list[str]], dict[str, set[str]]],
    record: Callable[[str, str | None], object],
    dry_run: bool = False,
) -> LabelReport:
    """Read the file, find each row's studies, and record their diagnoses (unless dry_run).

    `known_studies` and `studies_by_accession` answer from the ledger, `record` writes one
    study's diagnosis (None: removes it)."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise LabelFileError(f"the file is not UTF-8 text (byte {exc.start})") from exc
    report = LabelReport()
    rows = read_rows(text, report)
    hashes = {row.line: accession_hash(accession_key, row.accession_number) for row in rows}
    by_uid = known_studies([r.study_uid for r in rows if r.study_uid])
    by_accession = studies_by_accession(
        [h for r in rows if not r.study_uid for h in [hashes[r.line]] if h]
    )
    wanted: dict[str, dict[str | None, list[int]]] = {}  # study -> diagnosis -> lines
    for row in rows:
        if row.study_uid:
            studies = {row.study_uid} if row.study_uid in by_uid else set()
        else:
            studies = by_accession.get(hashes[row.line] or "", set())
        if not studies:
            report.skip("of a study the node has not received", row.line)
            continue
        for study in studies:
            wanted.setdefault(study, {}).setdefault(row.diagnosis, []).append(row.line)
    conflicting: set[int] = set()
    for study, choices in wanted.items():
        if len(choices) > 1:
            conflicting |= {line for lines in choices.values() for line in lines}
            continue
        ((diagnosis, _),) = choices.items()
        if not dry_run:
            record(study, diagnosis)
        if diagnosis is None:
            report.removed += 1
        else:
            report.recorded += 1
    for line in sorted(conflicting):
        report.skip("giving one study two different diagnoses", line)
    return report
