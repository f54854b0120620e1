"""The 'not analysed' SR: valid, no probability, no finding, the reasons in it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydicom

from dicom_node.records.ledger import OutputUids
from dicom_node.results.sr.builder import ReportOptions
from dicom_node.results.sr.not_analysed import build_not_analysed_sr
from tests.sr_reading import sr_summary
from tests.test_e2e import dciodvfy_errors
from tests.test_report import make_manifest

REASONS = [
    "not a frontal chest radiograph: two lung fields not found (lung_field 0 < 0.005)",
    "not like the training images: out-of-distribution score (ood 3.8 > 2.2)",
]


def test_the_not_analysed_sr_says_why_and_scores_nothing(chest_cr: Path, tmp_path: Path) -> None:
    header = pydicom.dcmread(chest_cr, stop_before_pixels=True)
    uids = OutputUids.generate()
    sr = build_not_analysed_sr(header, REASONS, make_manifest(), uids, ReportOptions())
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    back = pydicom.dcmread(path)
    summary = sr_summary(back)
    assert summary["probability"] is None and summary["finding_present"] is None
    assert summary["referenced_sop_instance_uids"] == [str(header.SOPInstanceUID)]
    assert back.SOPInstanceUID == uids.sop_instance_uid
    assert back.StudyInstanceUID == header.StudyInstanceUID  # in the study it is about
    first = back.ContentSequence[0]
    assert first.TextValue.startswith("COVID-19: not analysed - not a frontal chest radiograph")
    texts = list(_texts(back))
    for reason in REASONS:
        assert f"Not analysed: {reason}" in texts
    assert dciodvfy_errors(path) == []


def _texts(node: pydicom.Dataset) -> Iterator[str]:
    for item in node.get("ContentSequence", []):
        if "TextValue" in item:
            yield str(item.TextValue)
        yield from _texts(item)
