"""`cxr-node export-dataset OUT/`: the labelled, analysed instances the spool still holds,
as a dataset `cxr-train` reads as it is (training/data.py).

    OUT/metadata.csv      one row per image (columns below)
    OUT/images/<id>.dcm   the image: pixels and display attributes only (training_copy.py)
    OUT/export.json       what was exported and skipped, and why (counts only)

Columns: `image`, `id`, `patient_group`, `label` (covid | negative), `view`, `sex`, `age`
(years; 90 for 90 and older), `study_month` (YYYY-MM: a day would help re-identify a visit,
a month is enough to split by time), `modality`, `source` (the calling AE title that sent
it), `node_score`, `node_bundle` (what the node said, and which version said it).

No patient identifier is written: no name, patient ID, accession number, birth date or UID
of the hospital's. `patient_group` and `id` are keyed hashes (HMAC-SHA256, cut to 20 hex
digits) of the Patient ID (with its issuer) and of the SOP Instance UID, with the export key
(`CXR_EXPORT_SALT`, or `CXR_DATA_DIR/keys/export.key`), which is never exported: the same
patient is one group in every export of this node (or of nodes sharing the salt), and
nobody without the key can tell who it is. Instances without a Patient ID are skipped: with
no group their patient could sit on both sides of a split.
"""

from __future__ import annotations

import csv
import json
import logging
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import Dataset, dcmread

from dicom_node.learning.training_copy import training_copy
from dicom_node.records.keys import keyed_hash
from dicom_node.records.ledger import Job, JobState

log = logging.getLogger(__name__)

COLUMNS = (
    "image",
    "id",
    "patient_group",
    "label",
    "view",
    "sex",
    "age",
    "study_month",
    "modality",
    "source",
    "node_score",
    "node_bundle",
)
IMAGES = "images"
METADATA = "metadata.csv"
SUMMARY = "export.json"
_HASH_DIGITS = 20


class ExportError(Exception):
    """The export cannot be made; the message says why."""


@dataclass
class ExportReport:
    """Counts only: nothing in it identifies a patient."""

    exported: int = 0
    patient_groups: int = 0
    labels: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)  # why -> instances
    labelled_studies: int = 0
    studies_not_received: int = 0

    def lines(self) -> list[str]:
        counts = ", ".join(f"{n} {label}" for label, n in sorted(self.labels.items()))
        out = [
            f"{self.exported} images of {self.patient_groups} patient groups exported"
            + (f" ({counts})" if counts else ""),
            f"{self.labelled_studies} labelled studies; {self.studies_not_received} of them "
            "never received by this node",
        ]
        out += [f"  skipped {n}: {why}" for why, n in sorted(self.skipped.items())]
        return out

    def as_json(self) -> dict[str, object]:
        return {
            "exported": self.exported,
            "patient_groups": self.patient_groups,
            "labels": dict(self.labels),
            "skipped": dict(self.skipped),
            "labelled_studies": self.labelled_studies,
            "studies_not_received": self.studies_not_received,
        }


def why_not_analysed(job: Job) -> str | None:
    """Why an instance of a labelled study cannot be a training image; None: it can."""
    if job.state is JobState.REJECTED:
        reason = (job.reason or "").lower()
        if reason.startswith("not analysed (input gate)"):
            return "not analysed: the bundle's input gate refused it"
        if "lateral" in reason:
            return "not analysed: lateral view"
        if reason.startswith("pixel data"):
            return "not analysed: pixel data not decodable"
        return "not analysed: not a frontal chest radiograph (header checks)"
    if job.probability is None:
        return "not analysed (yet, or its analysis failed)"
    if not job.spool_path or not Path(job.spool_path).is_file():
        return "image no longer in the spool (cleaned up)"
    return None


def age_years(text: str) -> str:
    """DICOM Age String (045Y, 006M, 003W, 010D) -> years, 90 for 90 and older; '' if none."""
    match = re.fullmatch(r"(\d{1,3})([DWMY])", text.strip().upper())
    if not match:
        return ""
    per_year = {"D": 365.25, "W": 52.1775, "M": 12.0, "Y": 1.0}[match[2]]
    years = int(match[1]) / per_year
    return "90" if years >= 90 else f"{years:.4g}"


def _text(ds: Dataset, keyword: str) -> str:
    try:
        return str(ds.get(keyword) or "").strip()
    except Exception:  # a malformed value: left blank
        return ""


def export_dataset(
    out: Path,
    diagnoses: dict[str, str],
    jobs: Iterable[Job],
    key: bytes,
    bundle_names: dict[str, str],
    progress: Callable[[Iterable[Job]], Iterable[Job]] = lambda jobs: jobs,
) -> ExportReport:
    """Write the dataset of the analysed instances of the labelled studies (`diagnoses`:
    Study Instance UID -> covid | negative) among `jobs`. `bundle_names`: device UID ->
    "name version" for the node_bundle column."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} exists and is not an empty folder")
    jobs = list(jobs)
    report = ExportReport(labelled_studies=len(diagnoses))
    report.studies_not_received = len(set(diagnoses) - {j.study_instance_uid for j in jobs})
    (out / IMAGES).mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, str]] = []
    groups: set[str] = set()
    for job in progress(jobs):
        diagnosis = diagnoses.get(job.study_instance_uid)
        if diagnosis is None:
            continue
        why = why_not_analysed(job)
        if why is not None:
            report.skipped[why] += 1
            continue
        assert job.spool_path is not None
        ds = dcmread(job.spool_path)
        if _text(ds, "BurnedInAnnotation").upper() == "YES":
            report.skipped["burned-in annotation (text in the pixels may name the patient)"] += 1
            continue
        patient_id = _text(ds, "PatientID")
        if not patient_id:
            report.skipped["no Patient ID: no patient group can be formed"] += 1
            continue
        group = "p" + keyed_hash(key, "patient", _text(ds, "IssuerOfPatientID"), patient_id)
        image_id = "i" + keyed_hash(key, "instance", job.sop_instance_uid)
        group, image_id = group[: _HASH_DIGITS + 1], image_id[: _HASH_DIGITS + 1]
        image = f"{IMAGES}/{image_id}.dcm"
        training_copy(ds).save_as(out / image, enforce_file_format=True)
        study_date = _text(ds, "StudyDate")
        rows.append(
            {
                "image": image,
                "id": image_id,
                "patient_group": group,
                "label": diagnosis,
                "view": _text(ds, "ViewPosition"),
                "sex": _text(ds, "PatientSex").upper()[:1],
                "age": age_years(_text(ds, "PatientAge")),
                "study_month": f"{study_date[:4]}-{study_date[4:6]}"
                if len(study_date) >= 6
                else "",
                "modality": _text(ds, "Modality"),
                "source": job.calling_ae,
                "node_score": f"{job.probability:.6f}",
                "node_bundle": bundle_names.get(job.device_uid or "", job.device_uid or ""),
            }
        )
        groups.add(group)
        report.labels[diagnosis] += 1
    with (out / METADATA).open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    report.exported = len(rows)
    report.patient_groups = len(groups)
    summary = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **report.as_json()}
    (out / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    log.info(
        "export-dataset: %d images of %d patient groups, %d skipped",
        report.exported,
        report.patient_groups,
        sum(report.skipped.values()),
    )
    return report
