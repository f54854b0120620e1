"""The SR built for a real chest CR (pydicom-data RG1_UNCI.dcm), written out and read back."""

from __future__ import annotations

import copy
import shutil
import subprocess
from datetime import datetime
from pathlib import Path
from typing import Any, TypedDict, Unpack

import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.uid import DigitalXRayImageStorageForPresentation

from dicom_node.records.ledger import OutputUids
from dicom_node.results.sr import builder
from dicom_node.results.sr.builder import ReportOptions, build_sr
from dicom_node.results.sr.codes import COMPREHENSIVE_SR, NOT_FOR_DIAGNOSTIC_USE, PLUMBING_WARNING
from tests.sr_reading import sr_summary
from worker.bundle import FileRef, IndexSpec, Manifest, MemberSpec, SegmentationSpec
from worker.classes import CLASS_MAP
from worker.contracts import InferResult, SimilarItem
from worker.preprocess import PreprocessParams

DEVICE_UID = "1.2.826.0.1.3680043.8.498.4242.1"
HOSPITAL_STUDY = "1.2.826.0.1.3680043.8.498.7001"
HOSPITAL_SERIES = "1.2.826.0.1.3680043.8.498.7001.1"
HOSPITAL_SOP = "1.2.826.0.1.3680043.8.498.7001.1.1"
SHA = "0" * 64


@pytest.fixture(scope="module")
def source(chest_cr: Path) -> Dataset:
    return pydicom.dcmread(chest_cr, stop_before_pixels=True)


@pytest.fixture(scope="module")
def manifest() -> Manifest:
    return make_manifest()


def make_manifest() -> Manifest:
    """A realistic (not plumbing) manifest; nothing is loaded from it."""
    members = [
        MemberSpec(
            file=f"{name}.onnx",
            sha256=SHA,
            name=name,
            architecture=name,
            input_size=224,
            embedding_dim=128,
        )
        for name in ("resnet34", "vgg16")
    ]
    return Manifest(
        schema_version=1,
        name="cxr-covid-ensemble",
        version="2024.06.1",
        created=datetime(2024, 6, 1, 12, 0, 0),
        device_uid=DEVICE_UID,
        class_map=list(CLASS_MAP),
        threshold=0.5,
        preprocessing=PreprocessParams(),
        members=members,
        segmentation=SegmentationSpec(file="segmentation.onnx", sha256=SHA, input_size=256),
        index=IndexSpec(
            index=FileRef(file="index.bin", sha256=SHA),
            items=FileRef(file="index.jsonl", sha256=SHA),
            dim=128,
            count=10,
        ),
        embedding_member="resnet34",
    )


def make_result(manifest: Manifest, probability: float) -> InferResult:
    return InferResult(
        job_id="job-1",
        bundle_name=manifest.name,
        bundle_version=manifest.version,
        device_uid=manifest.device_uid,
        probability=probability,
        member_probabilities={"resnet34": probability - 0.03, "vgg16": probability + 0.03},
        embedding=[0.0] * 8,
        lung_mask_png="",
        inference_ms=12.5,
    )


SIMILAR = [
    SimilarItem(
        kind="reference", item_id="covidx-00421", label="covid", source="covidx", distance=0.081
    ),
    SimilarItem(
        kind="hospital",
        item_id="job-0042",
        label="pcr-positive",
        distance=0.113,
        study_instance_uid=HOSPITAL_STUDY,
        series_instance_uid=HOSPITAL_SERIES,
        sop_instance_uid=HOSPITAL_SOP,
    ),
]
UIDS = OutputUids(
    series_instance_uid="1.2.826.0.1.3680043.8.498.9901",
    sop_instance_uid="1.2.826.0.1.3680043.8.498.9901.1",
)


def write_and_read(ds: Dataset, path: Path) -> Dataset:
    ds.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path)


class Included(TypedDict, total=False):
    """The ReportOptions switches a test turns off."""

    include_similar: bool
    include_similar_labels: bool
    include_member_probabilities: bool


def build(
    source: Dataset,
    manifest: Manifest,
    tmp_path: Path,
    probability: float = 0.83,
    similar: list[SimilarItem] | None = None,
    **options: Unpack[Included],
) -> Dataset:
    sr = build_sr(
        source,
        make_result(manifest, probability),
        manifest,
        SIMILAR if similar is None else similar,
        UIDS,
        ReportOptions(**options),
    )
    return write_and_read(sr, tmp_path / "sr.dcm")


def all_text(ds: Dataset) -> list[str]:
    found: list[str] = []

    def walk(items: pydicom.Sequence) -> None:
        for item in items:
            if item.ValueType == "TEXT":
                found.append(str(item.TextValue))
            walk(item.get("ContentSequence", []))

    walk(ds.ContentSequence)
    return found


def test_same_study_new_series(source: Dataset, manifest: Manifest, tmp_path: Path) -> None:
    sr = build(source, manifest, tmp_path)
    assert sr.SOPClassUID == COMPREHENSIVE_SR
    assert sr.Modality == "SR"
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.PatientID == source.PatientID
    assert sr.PatientName == source.PatientName
    assert sr.SeriesInstanceUID == UIDS.series_instance_uid != source.SeriesInstanceUID
    assert sr.SOPInstanceUID == UIDS.sop_instance_uid
    assert sr.VerificationFlag == "UNVERIFIED"
    assert sr.CompletionFlag == "COMPLETE"
    assert NOT_FOR_DIAGNOSTIC_USE in all_text(sr)


def test_source_image_is_referenced(source: Dataset, manifest: Manifest, tmp_path: Path) -> None:
    sr = build(source, manifest, tmp_path)
    assert sr_summary(sr)["referenced_sop_instance_uids"] == [source.SOPInstanceUID]
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == source.StudyInstanceUID
    assert evidence.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID


@pytest.mark.parametrize(("probability", "present"), [(0.83, True), (0.2, False), (0.5, True)])
def test_probability_and_finding(
    source: Dataset, manifest: Manifest, tmp_path: Path, probability: float, present: bool
) -> None:
    summary = sr_summary(build(source, manifest, tmp_path, probability=probability))
    assert summary["probability"] == pytest.approx(probability)
    assert summary["finding_present"] is present


def test_probabilities_are_percent(source: Dataset, manifest: Manifest, tmp_path: Path) -> None:
    sr = build(source, manifest, tmp_path, probability=0.5253)
    nums = [
        item
        for group in sr.ContentSequence
        for sub in group.get("ContentSequence", [])
        for item in sub.get("ContentSequence", [])
        if item.ValueType == "NUM" and item.ConceptNameCodeSequence[0].CodeValue == "122157"
    ]
    assert len(nums) == 3  # the ensemble and its two members
    for num in nums:
        measured = num.MeasuredValueSequence[0]
        unit = measured.MeasurementUnitsCodeSequence[0]
        assert (unit.CodeValue, unit.CodingSchemeDesignator) == ("%", "UCUM")
    assert float(nums[0].MeasuredValueSequence[0].NumericValue) == pytest.approx(52.53)
    assert sr_summary(sr)["probability"] == pytest.approx(0.5253)  # read back as 0..1


def test_member_probabilities_optional(source: Dataset, manifest: Manifest, tmp_path: Path) -> None:
    with_members = sr_summary(build(source, manifest, tmp_path))
    assert with_members["member_probabilities"] == pytest.approx({"resnet34": 0.80, "vgg16": 0.86})
    without = sr_summary(build(source, manifest, tmp_path, include_member_probabilities=False))
    assert without["member_probabilities"] == {}
    assert without["probability"] == pytest.approx(0.83)


def test_device_identity(source: Dataset, manifest: Manifest, tmp_path: Path) -> None:
    sr = build(source, manifest, tmp_path)
    assert sr_summary(sr)["device_uid"] == DEVICE_UID
    ours = [e for e in sr.ContributingEquipmentSequence if e.get("DeviceUID") == DEVICE_UID]
    assert len(ours) == 1
    assert ours[0].PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
    assert ours[0].SoftwareVersions == manifest.version
    assert ours[0].ManufacturerModelName == manifest.name
    assert sr.SoftwareVersions == manifest.version


def test_similar_items(source: Dataset, manifest: Manifest, tmp_path: Path) -> None:
    sr = build(source, manifest, tmp_path)
    summary = sr_summary(sr)
    assert summary["similar_ids"] == ["covidx-00421", "job-0042"]
    assert summary["pertinent_study_uids"] == [HOSPITAL_STUDY]
    other = sr.PertinentOtherEvidenceSequence[0]
    assert other.ReferencedSeriesSequence[0].SeriesInstanceUID == HOSPITAL_SERIES
    sop = other.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert sop.ReferencedSOPInstanceUID == HOSPITAL_SOP
    texts = all_text(sr)
    assert "COVID-19" in texts and "pcr-positive" in texts and "covidx" in texts


def test_similar_labels_can_be_left_out(
    source: Dataset, manifest: Manifest, tmp_path: Path
) -> None:
    sr = build(source, manifest, tmp_path, include_similar_labels=False)
    texts = all_text(sr)
    assert "pcr-positive" not in texts and "covid" not in texts
    assert sr_summary(sr)["similar_ids"] == ["covidx-00421", "job-0042"]


def test_include_similar_false(source: Dataset, manifest: Manifest, tmp_path: Path) -> None:
    sr = build(source, manifest, tmp_path, include_similar=False)
    summary = sr_summary(sr)
    assert summary["similar_ids"] == []
    assert summary["pertinent_study_uids"] == []
    assert "PertinentOtherEvidenceSequence" not in sr


def test_source_itself_is_not_its_own_neighbour(
    source: Dataset, manifest: Manifest, tmp_path: Path
) -> None:
    itself = SimilarItem(
        kind="hospital",
        item_id="job-1",
        distance=0.0,
        study_instance_uid=source.StudyInstanceUID,
        series_instance_uid=source.SeriesInstanceUID,
        sop_instance_uid=source.SOPInstanceUID,
    )
    sr = build(source, manifest, tmp_path, similar=[itself, *SIMILAR])
    assert sr_summary(sr)["similar_ids"] == ["covidx-00421", "job-0042"]


def test_plumbing_bundle_is_flagged(source: Dataset, manifest: Manifest, tmp_path: Path) -> None:
    assert sr_summary(build(source, manifest, tmp_path))["plumbing_bundle"] is False
    plumbing = manifest.model_copy(update={"random_weights": True})
    sr = build(source, plumbing, tmp_path)
    assert PLUMBING_WARNING in all_text(sr)
    assert sr_summary(sr)["plumbing_bundle"] is True
    assert "PLUMBING" in sr.SeriesDescription


def test_redone_job_keeps_uids(source: Dataset, manifest: Manifest, tmp_path: Path) -> None:
    first = sr_summary(build(source, manifest, tmp_path))
    again = build(source, manifest, tmp_path)
    assert again.SOPInstanceUID == UIDS.sop_instance_uid
    assert sr_summary(again) == first


def test_missing_type2_attributes_tolerated(
    source: Dataset, manifest: Manifest, tmp_path: Path
) -> None:
    sparse = copy.deepcopy(source)
    for keyword in ("PatientBirthDate", "AccessionNumber", "ReferringPhysicianName", "StudyID"):
        del sparse[keyword]
    sr = build(sparse, manifest, tmp_path)
    assert sr.PatientBirthDate == "" and sr.AccessionNumber == ""
    assert "PatientBirthDate" in source  # the caller's dataset is untouched


def test_source_without_uids_is_refused(source: Dataset, manifest: Manifest) -> None:
    broken = copy.deepcopy(source)
    del broken.StudyInstanceUID
    with pytest.raises(ValueError, match="StudyInstanceUID"):
        build_sr(broken, make_result(manifest, 0.5), manifest, [], UIDS, ReportOptions())


@pytest.mark.integration
@pytest.mark.skipif(
    shutil.which("dciodvfy") is None,
    reason="dciodvfy (dicom3tools) not installed: apt-get install dicom3tools",
)
def test_dciodvfy_reports_no_error(source: Dataset, manifest: Manifest, tmp_path: Path) -> None:
    build(source, manifest.model_copy(update={"random_weights": True}), tmp_path)
    run = subprocess.run(
        ["dciodvfy", str(tmp_path / "sr.dcm")], capture_output=True, text=True, timeout=60
    )
    output = run.stdout + run.stderr
    assert "ComprehensiveSR" in output  # it recognised the IOD
    assert [line for line in output.splitlines() if "Error" in line] == [], output


@pytest.mark.integration
@pytest.mark.skipif(
    shutil.which("dsrdump") is None or shutil.which("dsr2html") is None,
    reason="DCMTK dsrdump/dsr2html not installed: apt-get install dcmtk",
)
def test_dcmtk_reads_it(source: Dataset, manifest: Manifest, tmp_path: Path) -> None:
    build(source, manifest, tmp_path)
    path = str(tmp_path / "sr.dcm")
    dump = subprocess.run(["dsrdump", path], capture_output=True, text=True, timeout=60)
    assert dump.returncode == 0, dump.stderr
    assert "COVID" in dump.stdout and '"Probability")="83.0" (%,UCUM,"Percent")' in dump.stdout
    assert "Present" in dump.stdout
    html = subprocess.run(["dsr2html", path], capture_output=True, text=True, timeout=60)
    assert html.returncode == 0, html.stderr
    assert "COVID-19" in html.stdout


# ------------------------------------------------------------------- lung outlines (TID 1410)

OUTLINES = [
    np.array([[100.5, 100.5], [400.5, 120.5], [380.5, 900.5], [120.5, 880.5], [100.5, 100.5]]),
    np.array([[900.5, 100.5], [1300.5, 120.5], [1280.5, 900.5], [920.5, 880.5], [900.5, 100.5]]),
]


def build_with_outlines(source: Dataset, manifest: Manifest, tmp_path: Path) -> Dataset:
    sr = build_sr(
        source, make_result(manifest, 0.83), manifest, SIMILAR, UIDS, ReportOptions(), OUTLINES
    )
    return write_and_read(sr, tmp_path / "sr.dcm")


def scoords(ds: Dataset) -> list[Dataset]:
    found: list[Dataset] = []

    def walk(items: pydicom.Sequence) -> None:
        for item in items:
            if item.ValueType == "SCOORD":
                found.append(item)
            walk(item.get("ContentSequence", []))

    walk(ds.ContentSequence)
    return found


def test_lung_outlines_are_planar_regions_on_the_source(
    source: Dataset, manifest: Manifest, tmp_path: Path
) -> None:
    sr = build_with_outlines(source, manifest, tmp_path)
    regions = scoords(sr)
    assert len(regions) == 2
    for region, outline in zip(regions, OUTLINES, strict=True):
        assert region.GraphicType == "POLYLINE"
        np.testing.assert_allclose(np.reshape(region.GraphicData, (-1, 2)), outline)
        image = region.ContentSequence[0]
        assert image.RelationshipType == "SELECTED FROM"
        assert image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert sr_summary(sr)["lung_regions"] == 2
    # the tree is that of TID 1500: groups under Imaging Measurements, after the COVID group
    measurements = next(
        i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"
    )
    groups = measurements.ContentSequence
    assert len(groups) == 3
    texts = [c.TextValue for g in groups[1:] for c in g.ContentSequence if c.ValueType == "TEXT"]
    assert "Lung outline 1" in texts and "Lung outline 2" in texts
    # still the same probability and finding
    assert sr_summary(sr)["probability"] == pytest.approx(0.83)
    assert sr_summary(sr)["finding_present"] is True


def test_no_outline_no_region(source: Dataset, manifest: Manifest, tmp_path: Path) -> None:
    sr = build(source, manifest, tmp_path)
    assert scoords(sr) == []
    assert sr_summary(sr)["lung_regions"] == 0


# ------------------------------------------------------------------- similar hospital studies

HOSPITAL_ITEM = SimilarItem(
    kind="hospital",
    item_id="H000042",
    label="covid",
    distance=0.113,
    study_instance_uid=HOSPITAL_STUDY,
    series_instance_uid=HOSPITAL_SERIES,
    sop_instance_uid=HOSPITAL_SOP + ".2",
    sop_class_uid=DigitalXRayImageStorageForPresentation,
    study_date="20240412",
    probability=0.91,
)


def hospital_content(sr: Dataset) -> dict[str, object]:
    container = next(
        c
        for top in sr.ContentSequence
        for c in top.get("ContentSequence", [])
        if c.ConceptNameCodeSequence[0].CodeMeaning == "Similar hospital study"
    )
    out: dict[str, object] = {}
    for item in container.ContentSequence:
        name = item.ConceptNameCodeSequence[0].CodeMeaning
        if item.ValueType == "TEXT":
            out[name] = item.TextValue
        elif item.ValueType == "NUM":
            out[name] = float(item.MeasuredValueSequence[0].NumericValue)
        elif item.ValueType == "DATE":
            out[name] = item.Date
        elif item.ValueType == "UIDREF":
            out[name] = item.UID
        elif item.ValueType == "IMAGE":
            out[name] = item.ReferencedSOPSequence[0].ReferencedSOPClassUID
    return out


def test_hospital_study_carries_date_score_label_distance_and_uids(
    source: Dataset, manifest: Manifest, tmp_path: Path
) -> None:
    sr = build(source, manifest, tmp_path, similar=[HOSPITAL_ITEM])
    content = hospital_content(sr)
    assert content == {
        "Identifier": "H000042",
        "Study Date": "20240412",
        "AI probability at analysis": pytest.approx(91.0),  # UCUM "%"
        "Confirmed diagnosis": "COVID-19 (confirmed)",
        "Embedding distance": pytest.approx(0.113),
        "Study Instance UID": HOSPITAL_STUDY,
        "Series Instance UID": HOSPITAL_SERIES,
        "Similar image": DigitalXRayImageStorageForPresentation,  # the item's own SOP class
    }
    assert sr_summary(sr)["pertinent_study_uids"] == [HOSPITAL_STUDY]
    assert sr_summary(sr)["similar"] == [
        {"kind": "hospital", "item_id": "H000042", "study_uid": HOSPITAL_STUDY, "label": "covid"}
    ]


def test_hospital_fields_choose_what_goes_out(
    source: Dataset, manifest: Manifest, tmp_path: Path
) -> None:
    sr = build_sr(
        source,
        make_result(manifest, 0.4),
        manifest,
        [HOSPITAL_ITEM],
        UIDS,
        ReportOptions(hospital_fields=frozenset()),
    )
    content = hospital_content(write_and_read(sr, tmp_path / "sr.dcm"))
    # UIDs only: the reader can open the study, and learns nothing else about it
    assert set(content) == {
        "Identifier",
        "Study Instance UID",
        "Series Instance UID",
        "Similar image",
    }
    sr = build_sr(
        source,
        make_result(manifest, 0.4),
        manifest,
        [HOSPITAL_ITEM.model_copy(update={"study_date": "2024-04-12"})],  # malformed DA
        UIDS,
        ReportOptions(hospital_fields=frozenset({"date", "label"})),
    )
    content = hospital_content(write_and_read(sr, tmp_path / "sr.dcm"))
    assert "Study Date" not in content and content["Confirmed diagnosis"]
    assert "Embedding distance" not in content and "AI probability at analysis" not in content


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy not installed")
def test_dciodvfy_with_outlines_and_hospital_items(
    source: Dataset, manifest: Manifest, tmp_path: Path
) -> None:
    sr = build_sr(
        source,
        make_result(manifest, 0.83),
        manifest,
        [HOSPITAL_ITEM, *SIMILAR],
        UIDS,
        ReportOptions(),
        OUTLINES,
    )
    write_and_read(sr, tmp_path / "sr.dcm")
    run = subprocess.run(["dciodvfy", str(tmp_path / "sr.dcm")], capture_output=True, text=True)
    output = run.stdout + run.stderr
    assert "ComprehensiveSR" in output
    assert [line for line in output.splitlines() if line.startswith("Error")] == [], output


# ------------------------------------------------------------------- what a reader sees first


def root_items(sr: Dataset) -> list[tuple[str, str]]:
    """(concept meaning, text or '') of the root's CONTAINS items, in order."""
    return [
        (str(i.ConceptNameCodeSequence[0].CodeMeaning), str(i.get("TextValue", "")))
        for i in sr.ContentSequence
        if i.RelationshipType == "CONTAINS"
    ]


@pytest.mark.parametrize(
    ("probability", "text"),
    [
        (0.53, "COVID-19: present (probability 0.53, threshold 0.50)"),
        (0.2, "COVID-19: absent (probability 0.20, threshold 0.50)"),
    ],
)
def test_finding_first_then_disclaimer_then_details(
    source: Dataset, manifest: Manifest, tmp_path: Path, probability: float, text: str
) -> None:
    sr = build(source, manifest, tmp_path, probability=probability)
    items = root_items(sr)
    assert items[0] == ("Summary", text)
    assert items[1] == ("Comment", NOT_FOR_DIAGNOSTIC_USE)
    assert [name for name, _ in items[2:]] == ["Imaging Measurements", "Most similar studies"]


def test_plumbing_warning_comes_with_the_finding(
    source: Dataset, manifest: Manifest, tmp_path: Path
) -> None:
    sr = build(source, manifest.model_copy(update={"random_weights": True}), tmp_path)
    items = root_items(sr)
    assert items[0][0] == "Summary"
    assert items[1] == ("Comment", PLUMBING_WARNING)
    assert items[2] == ("Comment", NOT_FOR_DIAGNOSTIC_USE)
    assert all_text(sr).count(PLUMBING_WARNING) == 1


def test_strong_disagreement_of_the_members_is_said(
    source: Dataset, manifest: Manifest, tmp_path: Path
) -> None:
    result = make_result(manifest, 0.53).model_copy(
        update={"member_probabilities": {"resnet34": 0.39, "vgg16": 0.69, "densenet": 0.50}}
    )
    sr = write_and_read(
        build_sr(source, result, manifest, SIMILAR, UIDS, ReportOptions()), tmp_path / "sr.dcm"
    )
    items = root_items(sr)
    assert items[0][0] == "Summary"
    assert items[1] == (
        "Comment",
        "Uncertain: the ensemble members disagree strongly (probabilities 0.39 / 0.69 / 0.50; "
        "spread 0.30, flagged from 0.25).",
    )
    assert items[2] == ("Comment", NOT_FOR_DIAGNOSTIC_USE)


@pytest.mark.parametrize(
    ("members", "flagged"),
    [({"a": 0.40, "b": 0.65}, True), ({"a": 0.40, "b": 0.64}, False), ({"a": 0.9}, False)],
)
def test_disagreement_threshold(members: dict[str, float], flagged: bool) -> None:
    from dicom_node.results.sr.builder import disagreement_text

    assert (disagreement_text(members) is not None) is flagged


def test_agreeing_members_are_not_flagged(
    source: Dataset, manifest: Manifest, tmp_path: Path
) -> None:
    sr = build(source, manifest, tmp_path)  # members 0.80 / 0.86
    assert not any("Uncertain" in text for text in all_text(sr))


@pytest.mark.parametrize(
    ("label", "shown"),
    [
        ("covid", "COVID-19"),
        ("other_pneumonia", "no COVID-19: other pneumonia"),
        ("no_finding", "no finding"),
        ("negative", "no COVID-19 (no finding or other pneumonia)"),
        ("something-else", "something-else"),
    ],
)
def test_reference_labels_are_named_as_they_are(
    source: Dataset, manifest: Manifest, tmp_path: Path, label: str, shown: str
) -> None:
    item = SimilarItem(kind="reference", item_id="r1", label=label, source="pool", distance=0.1)
    sr = build(source, manifest, tmp_path, similar=[item])
    assert shown in all_text(sr)
    assert "negative" not in all_text(sr)  # never the bare class name


@pytest.mark.parametrize(
    ("label", "finding", "expected"),
    [
        ("negative", "other_pneumonia", "other_pneumonia"),
        ("negative", "negative", "no_finding"),  # the pool's "negative": no pneumonia
        ("covid", "covid", "covid"),
        ("negative", None, "negative"),  # a bundle without findings: the class label
        ("negative", "todo", "negative"),
    ],
)
def test_reference_label_takes_the_finding_when_the_index_has_one(
    label: str, finding: str | None, expected: str
) -> None:
    from dicom_node.results.labels import reference_label

    assert reference_label(label, finding) == expected


def test_similar_cases_line_counts_labels_as_shown() -> None:
    from dicom_node.results.labels import similar_cases_line

    items = [
        SimilarItem(kind="reference", item_id="a", label="covid", distance=0.1),
        SimilarItem(kind="reference", item_id="b", label="other_pneumonia", distance=0.2),
        SimilarItem(kind="reference", item_id="c", label="covid", distance=0.3),
        HOSPITAL_ITEM,  # confirmed covid
    ]
    assert similar_cases_line(items, show_reference=True, show_hospital=True) == (
        "similar cases: 2 COVID-19, 1 no COVID-19: other pneumonia, 1 COVID-19 (confirmed)"
    )
    assert similar_cases_line(items, True, False) == (
        "similar cases: 2 COVID-19, 1 no COVID-19: other pneumonia"
    )
    assert similar_cases_line(items, False, False) is None


def _without_times(ds: Dataset) -> Dataset:
    """`ds` without its date and time values at any depth (highdicom stamps the creation,
    content and contribution times from the clock)."""
    for element in list(ds):
        if element.VR in ("DA", "TM", "DT"):
            del ds[element.tag]
        elif element.VR == "SQ":
            for item in element.value:
                _without_times(item)
    return ds


def test_document_equals_what_highdicom_builds_around_the_whole_tree(
    source: Dataset, manifest: Manifest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`comprehensive_sr` hands highdicom's document constructor the root alone and gives the
    tree back after: the SR must be the one highdicom makes from the whole tree."""

    def whole_tree(evidence, report, manifest, uids, options, contribution, description):  # type: ignore[no-untyped-def]
        equipment = builder.model_equipment(
            manifest, options.manufacturer, options.institution, contribution
        )
        sr = builder._document(evidence, report, equipment, manifest, uids, options, description)
        builder._separate(sr)
        return sr

    fast = build_with_outlines(source, manifest, tmp_path)
    monkeypatch.setattr(builder, "comprehensive_sr", whole_tree)
    reference = build_with_outlines(source, manifest, tmp_path)
    assert len(scoords(fast)) == 2 and fast.CurrentRequestedProcedureEvidenceSequence
    assert _without_times(fast) == _without_times(reference)


def test_a_reference_without_evidence_is_refused(
    source: Dataset, manifest: Manifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check highdicom's walk made, kept: an instance referenced in the tree must be in
    the evidence (its evidence sequences list it)."""
    document = builder.comprehensive_sr
    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr(builder, "comprehensive_sr", lambda *args: calls.append(args))
    build_sr(source, make_result(manifest, 0.83), manifest, [], UIDS, ReportOptions())
    evidence, *rest = calls[0]
    stranger = copy.deepcopy(source)
    stranger.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.4242.99"  # not the one referenced
    with pytest.raises(ValueError, match="no evidence given"):
        document([stranger], *rest)
    assert document(evidence, *rest).SOPInstanceUID == UIDS.sop_instance_uid
