"""The node-host steps in one process (no queue): prepare -> real ONNX inference -> finalize
-> deliver, with the plumbing bundle and the real chest CR."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import SecondaryCaptureImageStorage, SegmentationStorage, generate_uid
from pynetdicom import AE, evt
from pynetdicom.events import Event

from dicom_node.jobs import steps
from dicom_node.jobs.steps import NodeRuntime
from dicom_node.records.ledger import DeliveryState, Job, JobState, OutputKind
from dicom_node.results.sr.codes import COMPREHENSIVE_SR
from dicom_node.settings import Settings
from tests.conftest import PLUMBING_BUNDLE, free_port
from tests.sr_reading import sr_summary
from worker.contracts import InferRequest, InferResult, encode_png
from worker.inference import get_ensemble, run_infer

SECONDARY_CAPTURE = SecondaryCaptureImageStorage
SEGMENTATION = SegmentationStorage


def make_node(tmp_path: Path, **overrides: object) -> NodeRuntime:
    settings = Settings(
        data_dir=tmp_path / "node",
        bundle=PLUMBING_BUNDLE,
        delivery_backoff_s=0.01,
        **overrides,  # type: ignore[arg-type]
    )
    settings.make_dirs()
    return NodeRuntime(settings)


def receive(node: NodeRuntime, source: Path, patient_id: str, study_uid: str | None = None) -> str:
    """What the SCP does on C-STORE: spool and record a job (a fresh SOP Instance UID)."""
    ds = dcmread(source)
    ds.PatientID = patient_id
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if study_uid:
        ds.StudyInstanceUID = study_uid
    job_id = f"job{len(node.ledger.jobs_in(tuple(JobState))):03d}"
    spool = node.settings.spool_dir / f"{job_id}.dcm"
    ds.save_as(spool)
    assert node.ledger.add(
        Job.received(
            job_id,
            sop_instance_uid=str(ds.SOPInstanceUID),
            sop_class_uid=str(ds.SOPClassUID),
            study_instance_uid=str(ds.StudyInstanceUID),
            series_instance_uid=str(ds.SeriesInstanceUID),
            calling_ae="TEST",
            spool_path=str(spool),
        )
    )
    return job_id


def ellipse_lungs(size: int) -> str:
    """A lung map as a trained U-Net would give it (the plumbing U-Net is random)."""
    lung = np.zeros((size, size), dtype=np.uint8)
    for cx in (0.3, 0.7):
        center = (round(size * cx), round(size * 0.5))
        cv2.ellipse(lung, center, (round(size * 0.13), round(size * 0.3)), 0, 0, 360, 255, -1)
    return encode_png(lung)


def infer(node: NodeRuntime, job_id: str, lungs: bool = True) -> InferResult:
    request = steps.prepare(node, job_id)
    assert isinstance(request, InferRequest)
    bundle, ensemble = get_ensemble(PLUMBING_BUNDLE)
    result = run_infer(request, ensemble, bundle)
    assert isinstance(result, InferResult)
    if lungs:
        size = bundle.manifest.preprocessing.size
        result = result.model_copy(update={"lung_mask_png": ellipse_lungs(size)})
    return result


def test_finalize_builds_sr_and_summary_and_delivers_both_to_the_outbox(
    tmp_path: Path, chest_cr: Path
) -> None:
    node = make_node(tmp_path)
    job_id = receive(node, chest_cr, "PAT1")
    assert steps.finalize(node, infer(node, job_id)) == ["outbox"]
    uids = node.ledger.output_uids(job_id)
    sr = dcmread(node.result_path(job_id, OutputKind.SR))
    sc = dcmread(node.result_path(job_id, OutputKind.SC))
    assert not node.result_path(job_id, OutputKind.SEG).exists()  # off by default
    assert sr.SOPInstanceUID == uids[OutputKind.SR].sop_instance_uid
    assert sc.SOPInstanceUID == uids[OutputKind.SC].sop_instance_uid
    assert sc.SeriesInstanceUID == uids[OutputKind.SC].series_instance_uid
    assert sr_summary(sr)["lung_regions"] == 2
    assert sr_summary(sr)["plumbing_bundle"] is True
    assert sc.StudyInstanceUID == sr.StudyInstanceUID
    assert sc.Rows > sc.Columns and sc.Columns == 1024

    outcome = steps.deliver(node, job_id, "outbox")
    assert outcome.delivered and outcome.retry_in is None
    names = sorted(p.name for p in node.settings.outbox_dir.iterdir())
    # named after the X-ray they are about
    source_uid = node.ledger.get(job_id).sop_instance_uid  # type: ignore[union-attr]
    assert names == [f"{source_uid}-sc.dcm", f"{source_uid}-sr.dcm"]
    assert dcmread(node.settings.outbox_dir / names[1]).SOPInstanceUID == sr.SOPInstanceUID
    assert node.ledger.get(job_id).state is JobState.DELIVERED  # type: ignore[union-attr]


def test_redone_finalize_writes_the_same_objects_and_indexes_once(
    tmp_path: Path, chest_cr: Path
) -> None:
    node = make_node(tmp_path, produce_seg=True)
    job_id = receive(node, chest_cr, "PAT1")
    result = infer(node, job_id)
    steps.finalize(node, result)
    first = {k: dcmread(node.result_path(job_id, k)).SOPInstanceUID for k in OutputKind}
    assert dcmread(node.result_path(job_id, OutputKind.SEG)).SOPClassUID == SEGMENTATION
    # the worker's message is redelivered after the objects were written but before the
    # state changed (a crash between the two)
    node.ledger.set_state(job_id, JobState.ANALYSING)
    steps.finalize(NodeRuntime(node.settings), result)
    again = {k: dcmread(node.result_path(job_id, k)).SOPInstanceUID for k in OutputKind}
    assert again == first
    assert node.hospital_index_for(node.bundles.current()).store.count() == 1
    assert len(node.ledger.deliveries(job_id)) == 3  # SR, SC, SEG to the outbox, once each


def test_summary_failure_costs_the_summary_only(
    tmp_path: Path, chest_cr: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = make_node(tmp_path)
    job_id = receive(node, chest_cr, "PAT1")

    def broken(*args: object) -> Dataset:
        raise RuntimeError("renderer broke")

    monkeypatch.setattr(steps, "build_summary", broken)
    assert steps.finalize(node, infer(node, job_id)) == ["outbox"]
    assert [d.kind for d in node.ledger.deliveries(job_id)] == [OutputKind.SR]
    assert steps.deliver(node, job_id, "outbox").delivered
    assert node.ledger.get(job_id).state is JobState.DELIVERED  # type: ignore[union-attr]


def test_random_lung_map_is_handled(tmp_path: Path, chest_cr: Path) -> None:
    """The plumbing U-Net's map is noise: whatever it gives, the objects are built."""
    node = make_node(tmp_path, produce_seg=True)
    job_id = receive(node, chest_cr, "PAT1")
    steps.finalize(node, infer(node, job_id, lungs=False))
    kinds = {d.kind for d in node.ledger.deliveries(job_id)}
    assert kinds == set(OutputKind)


def test_hospital_studies_of_other_patients_are_listed(tmp_path: Path, chest_cr: Path) -> None:
    node = make_node(tmp_path, similar_k=0)
    earlier = receive(node, chest_cr, "PAT1")
    steps.finalize(node, infer(node, earlier))
    same_patient = receive(node, chest_cr, "PAT1", study_uid=generate_uid())
    steps.finalize(node, infer(node, same_patient))
    other = receive(node, chest_cr, "PAT2", study_uid=generate_uid())
    steps.finalize(node, infer(node, other))

    def hospital_studies(job_id: str) -> list[str | None]:
        sr = dcmread(node.result_path(job_id, OutputKind.SR))
        return [s["study_uid"] for s in sr_summary(sr)["similar"] if s["kind"] == "hospital"]

    first_study = node.ledger.get(earlier).study_instance_uid  # type: ignore[union-attr]
    assert hospital_studies(earlier) == []  # nothing earlier
    assert hospital_studies(same_patient) == []  # only the same patient's study is earlier
    assert hospital_studies(other)[0] == first_study  # same image, other patient: nearest
    assert len(hospital_studies(other)) == 2


def test_hospital_index_can_be_turned_off(tmp_path: Path, chest_cr: Path) -> None:
    node = make_node(tmp_path, hospital_index=False)
    for patient in ("PAT1", "PAT2"):
        job_id = receive(node, chest_cr, patient, study_uid=generate_uid())
        steps.finalize(node, infer(node, job_id))
        sr = dcmread(node.result_path(job_id, OutputKind.SR))
        assert [s for s in sr_summary(sr)["similar"] if s["kind"] == "hospital"] == []
    assert not (node.settings.hospital_dir / "hospital.sqlite3").exists()


@pytest.fixture
def sr_only_pacs() -> Iterator[tuple[int, list[Dataset]]]:
    """A DICOM peer that stores Comprehensive SR and nothing else (as some PACS do)."""
    received: list[Dataset] = []

    def store(event: Event) -> int:
        received.append(event.dataset)
        return 0x0000

    ae = AE(ae_title="SRONLY")
    ae.add_supported_context(COMPREHENSIVE_SR)
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, store)]
    )
    assert server is not None
    yield port, received
    server.shutdown()


def test_sr_is_delivered_even_where_the_summary_is_refused(
    tmp_path: Path, chest_cr: Path, sr_only_pacs: tuple[int, list[Dataset]]
) -> None:
    port, received = sr_only_pacs
    destination = f"SRONLY@127.0.0.1:{port}"
    node = make_node(tmp_path, destinations=destination, delivery_attempts=2)
    job_id = receive(node, chest_cr, "PAT1")
    assert steps.finalize(node, infer(node, job_id)) == [destination]

    first = steps.deliver(node, job_id, destination)
    assert not first.delivered and first.retry_in is not None  # the SC will be tried again
    assert [ds.SOPClassUID for ds in received] == [COMPREHENSIVE_SR]
    states = {d.kind: d.state for d in node.ledger.deliveries(job_id)}
    assert states == {OutputKind.SR: DeliveryState.DELIVERED, OutputKind.SC: DeliveryState.PENDING}

    second = steps.deliver(node, job_id, destination)  # only the SC is sent again
    assert not second.delivered and second.retry_in is None  # attempts used up
    assert len(received) == 1  # the SR was not sent twice
    deliveries = {d.kind: d for d in node.ledger.deliveries(job_id)}
    assert deliveries[OutputKind.SR].state is DeliveryState.DELIVERED
    assert deliveries[OutputKind.SC].state is DeliveryState.FAILED
    # the peer accepted no context at all when only the SC was offered
    assert "Secondary Capture" in (deliveries[OutputKind.SC].last_error or "")
    job = node.ledger.get(job_id)
    assert job is not None and job.state is JobState.FAILED and "SC" in (job.reason or "")
    assert steps.deliver(node, job_id, destination) == steps.DeliveryOutcome(False)
