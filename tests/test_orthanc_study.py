"""A real PACS sends a whole study: Orthanc's REST API (/modalities/{id}/store with the
study) makes Orthanc C-STORE a frontal and a lateral chest CR to the node; the node's SR and
summary of the frontal one come back into the same study in Orthanc, and the lateral one is
stored but not analysed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import ComputedRadiographyImageStorage, SecondaryCaptureImageStorage, generate_uid

from dicom_node.records.ledger import JobState, Ledger
from dicom_node.results.sr.codes import COMPREHENSIVE_SR
from tests.conftest import NodeProcess, wait_for
from tests.orthanc import Orthanc

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CR = ComputedRadiographyImageStorage
SECONDARY_CAPTURE = SecondaryCaptureImageStorage


def test_study_sent_by_orthanc_gets_its_results_back(
    start_node: Callable[..., NodeProcess],
    orthanc: Orthanc,
    chest_cr: Path,
    tmp_path: Path,
) -> None:
    frontal = dcmread(chest_cr)
    study_uid = str(frontal.StudyInstanceUID)
    lateral = dcmread(chest_cr)
    lateral.ViewPosition = "LL"
    lateral.SeriesInstanceUID = generate_uid()
    lateral.SOPInstanceUID = generate_uid()
    lateral.file_meta.MediaStorageSOPInstanceUID = lateral.SOPInstanceUID
    lateral_path = tmp_path / "lateral.dcm"
    lateral.save_as(lateral_path)

    node = start_node(destinations=orthanc.address, allowed_calling_aes=orthanc.aet)
    orthanc.add_modality("cxrnode", "CXRNODE", "127.0.0.1", node.port)
    orthanc.upload(chest_cr)
    orthanc.upload(lateral_path)
    study = orthanc.study_id(study_uid)
    assert study is not None
    orthanc.post("/modalities/cxrnode/store", {"Resources": [study], "Synchronous": True})

    def classes() -> list[str]:
        return sorted(str(i["SOPClassUID"]) for i in orthanc.study_instances(study_uid))

    wait_for(lambda: len(classes()) >= 4, 240, "the SR and the summary in the study")
    assert classes() == sorted([CR, CR, COMPREHENSIVE_SR, SECONDARY_CAPTURE])
    assert orthanc.study_id(study_uid) == study and len(orthanc.get("/studies")) == 1
    (sr,) = [i for i in orthanc.study_instances(study_uid) if i["SOPClassUID"] == COMPREHENSIVE_SR]
    path = orthanc.download(sr["ID"], tmp_path / "sr.dcm")
    evidence = dcmread(path).CurrentRequestedProcedureEvidenceSequence[0]
    referenced = evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert referenced.ReferencedSOPInstanceUID == frontal.SOPInstanceUID

    ledger = Ledger(node.data_dir / "ledger.sqlite3")
    job = ledger.by_sop_instance(str(lateral.SOPInstanceUID))
    assert job is not None and job.state is JobState.REJECTED
    assert job.calling_ae == orthanc.aet
