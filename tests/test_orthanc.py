"""The node behind a real PACS: Orthanc forwards an X-ray to the node, and the SR, the summary
SC and the lung SEG come back into the X-ray's own study in Orthanc."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    JPEGBaseline8Bit,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)

from dicom_node.results.sr.codes import COMPREHENSIVE_SR
from tests.conftest import NodeProcess, require_tool, wait_for
from tests.orthanc import Orthanc
from tests.sr_reading import sr_summary

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CR = ComputedRadiographyImageStorage
SECONDARY_CAPTURE = SecondaryCaptureImageStorage
SEGMENTATION = SegmentationStorage


def test_results_land_in_the_source_study_in_orthanc(
    start_node: Callable[..., NodeProcess],
    orthanc: Orthanc,
    chest_cr: Path,
    tmp_path: Path,
) -> None:
    node = start_node(destinations=orthanc.address, produce_seg="true")
    orthanc.add_modality("cxrnode", "CXRNODE", "127.0.0.1", node.port)
    source = dcmread(chest_cr, stop_before_pixels=True)
    study_uid = str(source.StudyInstanceUID)

    # the X-ray arrives in the PACS, which forwards it to the node (a routing rule)
    instance = orthanc.upload(chest_cr)
    orthanc.send_to_modality("cxrnode", [instance])

    def classes() -> list[str]:
        return sorted(i["SOPClassUID"] for i in orthanc.study_instances(study_uid))

    wait_for(lambda: len(classes()) >= 4, 240, "SR, SC and SEG in the study in Orthanc")
    instances = orthanc.study_instances(study_uid)
    assert sorted(i["SOPClassUID"] for i in instances) == sorted(
        [CR, COMPREHENSIVE_SR, SECONDARY_CAPTURE, SEGMENTATION]
    )
    # one study (the source's), four series: the X-ray's and one per result object
    study = orthanc.study_id(study_uid)
    assert study is not None
    assert len(orthanc.get(f"/studies/{study}/series")) == 4
    assert len(orthanc.get("/studies")) == 1
    by_class = {i["SOPClassUID"]: i for i in instances}
    for sop_class in (COMPREHENSIVE_SR, SECONDARY_CAPTURE, SEGMENTATION):
        item = by_class[sop_class]
        assert item["StudyInstanceUID"] == study_uid
        assert item["PatientID"] == source.PatientID
        assert item["SeriesInstanceUID"] != source.SeriesInstanceUID

    # what the PACS holds is valid, and the SR is about the forwarded X-ray
    exe = require_tool("dciodvfy")
    for sop_class, name in (
        (COMPREHENSIVE_SR, "sr"),
        (SECONDARY_CAPTURE, "sc"),
        (SEGMENTATION, "seg"),
    ):
        path = orthanc.download(by_class[sop_class]["ID"], tmp_path / f"{name}.dcm")
        run = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
        errors = [
            line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")
        ]
        assert errors == [], f"{name}: {errors}"
    sr = dcmread(tmp_path / "sr.dcm")
    assert sr_summary(sr)["referenced_sop_instance_uids"] == [str(source.SOPInstanceUID)]
    sc = dcmread(tmp_path / "sc.dcm")
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert sc.file_meta.TransferSyntaxUID == JPEGBaseline8Bit  # Orthanc took it compressed
    assert sc.LossyImageCompression == "01"

    # the node logged the forwarded X-ray as received from Orthanc's AE title
    wait_for(lambda: "delivered to" in node.logs(), 30, "delivery logged")
    assert f"from {orthanc.aet}" in node.logs()
