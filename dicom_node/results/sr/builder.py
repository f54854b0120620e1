"""Build the DICOM Structured Report that goes back to the PACS, and read one back.

`build_sr` is a pure function: header of the received X-ray + inference result + bundle
manifest + retrieval neighbours + caller-chosen UIDs -> a Comprehensive SR (TID 1500
Measurement Report) in the same study, new series. It touches no network, disk or clock
other than the content date/time highdicom stamps.

Content tree (order as written: what a reader needs first, then the TID 1500 details)::

    CONTAINER Imaging Measurement Report (TID 1500)
      language, observer context (device: bundle name, version, device UID)
      procedure reported: SCT 399208008 "Plain chest X-ray"
      TEXT Summary: "COVID-19: present (probability 0.53, threshold 0.46)"
      [TEXT Comment: "Uncertain: the ensemble members disagree strongly (...)"]
      [TEXT Comment: PLUMBING BUNDLE warning]
      TEXT Comment: not for diagnostic use
      CONTAINER Imaging Measurements
        CONTAINER Measurement Group (TID 1501)
          tracking id/UID, finding COVID-19, algorithm id (name, version, threshold)
          IMAGE source of measurement = the received X-ray
          NUM Probability in UCUM "%" (ensemble mean), [NUM Probability per member]
          CODE COVID-19 = Present | Absent       (probability >= threshold -> Present)
          TEXT Comment: decision threshold
        CONTAINER Measurement Group (TID 1410), one per lung outline found:
          tracking id/UID "Lung outline N", finding Lung, algorithm id (segmentation)
          SCOORD POLYLINE (closed) in the received X-ray's pixel coordinates
      CONTAINER Most similar studies (local code)            [include_similar]
        CONTAINER Similar hospital study:
                  identifier, [study date], [AI probability], [confirmed diagnosis],
                  [embedding distance], study/series UID, IMAGE reference
                  ([...]: ReportOptions.hospital_fields)
        CONTAINER Similar reference-set image:
                  identifier, embedding distance, [label], dataset

Flags: Completion COMPLETE (the algorithm's output is whole; a radiologist's review would be a
new document), Verification UNVERIFIED (no person has signed it), Preliminary PRELIMINARY (an
unverified research result is not the definitive means of communicating the finding).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
from highdicom import ContributingEquipment
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import (
    AlgorithmIdentification,
    CodedConcept,
    ComprehensiveSR,
    ContainerContentItem,
    ContentItem,
    ContentSequence,
    DateContentItem,
    DeviceObserverIdentifyingAttributes,
    GraphicTypeValues,
    ImageContentItem,
    ImageRegion,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    NumContentItem,
    ObservationContext,
    ObserverContext,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    QualitativeEvaluation,
    RelationshipTypeValues,
    SourceImageForMeasurementGroup,
    SourceImageForRegion,
    TextContentItem,
    TrackingIdentifier,
    UIDRefContentItem,
)
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from dicom_node.records.ledger import OutputUids
from dicom_node.results.equipment import OWN_MANUFACTURER, evidence_header, model_equipment
from dicom_node.results.labels import reference_label_text
from dicom_node.results.sr.codes import (
    ABSENT,
    AI_PROBABILITY_THEN,
    ANATOMICAL_STRUCTURE,
    COMMENT,
    CONFIRMED_DIAGNOSIS,
    DIAGNOSIS_TEXT,
    DISAGREEMENT_SPREAD,
    EMBEDDING_DISTANCE,
    FINDING_COVID19,
    IDENTIFIER,
    IMAGING_MEASUREMENTS,
    LOCAL_SCHEME,
    LUNG,
    NEIGHBOUR_DATASET,
    NEIGHBOUR_LABEL,
    NO_UNITS,
    NOT_FOR_DIAGNOSTIC_USE,
    PERCENT,
    PLAIN_CHEST_XRAY,
    PLUMBING_WARNING,
    PRESENT,
    PROBABILITY,
    SERIES_UID,
    SIMILAR_HOSPITAL,
    SIMILAR_IMAGE,
    SIMILAR_REFERENCE,
    SIMILAR_STUDIES,
    STUDY_DATE,
    STUDY_UID,
    SUMMARY,
)
from dicom_node.settings import HOSPITAL_FIELDS
from worker.bundle import Manifest
from worker.contracts import InferResult, SimilarItem

_CONTAINS = RelationshipTypeValues.CONTAINS


@dataclass(frozen=True)
class ReportOptions:
    manufacturer: str = OWN_MANUFACTURER
    institution: str | None = None
    include_similar: bool = True
    include_similar_labels: bool = True
    include_member_probabilities: bool = True
    #: Which attributes of a similar hospital study go out besides its UIDs.
    hospital_fields: frozenset[str] = field(default_factory=lambda: frozenset(HOSPITAL_FIELDS))
    series_number: int = 9901
    instance_number: int = 1


def is_present(probability: float, threshold: float) -> bool:
    """The decision rule written into the SR: present when probability >= threshold."""
    return probability >= threshold


def finding_text(probability: float, threshold: float) -> str:
    """The finding as the SR's summary says it: "COVID-19: present (probability 0.53,
    threshold 0.46)"."""
    verdict = "present" if is_present(probability, threshold) else "absent"
    return f"COVID-19: {verdict} (probability {probability:.2f}, threshold {threshold:.2f})"


def disagreement_text(members: dict[str, float]) -> str | None:
    """What the SR says when the ensemble members disagree strongly (their probabilities span
    DISAGREEMENT_SPREAD or more); None when they agree, or there are fewer than two."""
    if len(members) < 2:
        return None
    low, high = min(members.values()), max(members.values())
    if high - low < DISAGREEMENT_SPREAD - 1e-9:
        return None
    values = " / ".join(f"{p:.2f}" for p in members.values())
    return (
        f"Uncertain: the ensemble members disagree strongly (probabilities {values}; "
        f"spread {high - low:.2f}, flagged from {DISAGREEMENT_SPREAD:.2f})."
    )


def _position(items: Sequence[Dataset], concept: CodedConcept) -> int:
    """Index of the first item named `concept` (the end when there is none)."""
    for index, item in enumerate(items):
        names = item.get("ConceptNameCodeSequence") or []
        if names and (names[0].CodeValue, names[0].CodingSchemeDesignator) == (
            concept.value,
            concept.scheme_designator,
        ):
            return index
    return len(items)


def build_sr(
    source: Dataset,
    result: InferResult,
    manifest: Manifest,
    similar: list[SimilarItem],
    uids: OutputUids,
    options: ReportOptions,
    lung_outlines: Sequence[np.ndarray] = (),
) -> Dataset:
    """Comprehensive SR with the COVID-19 result for `source` (header only is enough).

    lung_outlines: closed (column, row) polylines on the source image (`dicom_node.results.lungs`),
    written as TID 1410 planar regions so that TID 1500 viewers draw them.
    """
    header = evidence_header(source)
    present = is_present(result.probability, manifest.threshold)

    group = _measurement_group(header, result, manifest, uids, options, present)
    regions = [
        _lung_region(header, outline, number, manifest, uids)
        for number, outline in enumerate(lung_outlines, start=1)
    ]
    report = measurement_report(manifest, options, [group, *regions])
    root = report[0]
    # What a reader needs first, before the measurement details: the finding in words, then
    # what it is worth. Viewers render the tree in order (dsr2html does).
    head = [_text(SUMMARY, finding_text(result.probability, manifest.threshold))]
    disagreement = disagreement_text(result.member_probabilities)
    if disagreement:
        head.append(_text(COMMENT, disagreement))
    if manifest.random_weights:
        head.append(_text(COMMENT, PLUMBING_WARNING))
    head.append(_text(COMMENT, NOT_FOR_DIAGNOSTIC_USE))
    at = _position(root.ContentSequence, IMAGING_MEASUREMENTS)
    for offset, item in enumerate(head):
        root.ContentSequence.insert(at + offset, item)

    evidence: list[Dataset] = [header]
    if options.include_similar:
        neighbours = [s for s in similar if s.sop_instance_uid != header.SOPInstanceUID]
        if neighbours:
            container = ContainerContentItem(
                name=SIMILAR_STUDIES, relationship_type=_CONTAINS, is_content_continuous=False
            )
            container.ContentSequence = ContentSequence(
                [_neighbour_item(item, header, options, evidence) for item in neighbours]
            )
            root.ContentSequence.append(container)

    return comprehensive_sr(
        evidence,
        report,
        manifest,
        uids,
        options,
        "COVID-19 classification of the chest X-ray (model bundle)",
        _series_description(manifest),
    )


def measurement_report(
    manifest: Manifest,
    options: ReportOptions,
    imaging_measurements: Sequence[
        MeasurementsAndQualitativeEvaluations | PlanarROIMeasurementsAndQualitativeEvaluations
    ],
) -> MeasurementReport:
    """The TID 1500 report of a plain chest X-ray, observed by the bundle as a device."""
    observer = ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=manifest.device_uid,
            name=manifest.name,
            manufacturer_name=options.manufacturer,
            model_name=manifest.version,
        ),
    )
    return MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer),
        procedure_reported=PLAIN_CHEST_XRAY,
        imaging_measurements=list(imaging_measurements),
    )


def comprehensive_sr(
    evidence: list[Dataset],
    report: MeasurementReport,
    manifest: Manifest,
    uids: OutputUids,
    options: ReportOptions,
    contribution: str,
    series_description: str,
) -> Dataset:
    """The SR document around `report`: in the evidence's study, its own series, the bundle
    as contributing equipment, unverified and preliminary (see the module's flags)."""
    equipment = model_equipment(manifest, options.manufacturer, options.institution, contribution)
    # highdicom's document constructor deep-copies the content tree, parses the copy back into
    # content items and walks it three times, making a new content item per node each walk
    # (evidence references, no SCOORD3D): for our ~90 items most of `build_sr` and the
    # largest part of a finalize (docs/BENCHMARKS.md, "Throughput to the bound, after"). The
    # content is highdicom's already, built and checked item by item; the document needs from
    # it only its root attributes. So the document is built around the root with its first
    # child only, then given all of it back, after the two checks that the walks made, done
    # here once on the tree as it is (tests/test_report.py: the result equals highdicom's own).
    root = report[0]
    children = root.ContentSequence
    _check_content(children, evidence)
    root.ContentSequence = ContentSequence(children[:1])
    try:
        sr = _document(evidence, report, equipment, manifest, uids, options, series_description)
    finally:
        root.ContentSequence = children
    sr.ContentSequence = children
    _separate(sr)
    return sr


def _check_content(children: Sequence[Dataset], evidence: Sequence[Dataset]) -> None:
    """What highdicom's document constructor checks in a content tree: every referenced
    instance is in `evidence` (its evidence sequences list those), and no SCOORD3D item (not
    allowed in a Comprehensive SR). ValueError otherwise."""
    given = {str(ds.SOPInstanceUID) for ds in evidence}
    todo = list(children)
    while todo:
        item = todo.pop()
        if item.get("ValueType") == "SCOORD3D":
            raise ValueError("Comprehensive SR does not support SCOORD3D content items")
        if item.get("ValueType") in ("IMAGE", "COMPOSITE"):
            uid = str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
            if uid not in given:
                raise ValueError(f"no evidence given for the referenced instance {uid}")
        todo.extend(item.get("ContentSequence", []))


def _document(
    evidence: list[Dataset],
    report: MeasurementReport,
    equipment: ContributingEquipment,
    manifest: Manifest,
    uids: OutputUids,
    options: ReportOptions,
    series_description: str,
) -> Dataset:
    return ComprehensiveSR(
        evidence=evidence,
        content=report,
        series_instance_uid=uids.series_instance_uid,
        series_number=options.series_number,
        sop_instance_uid=uids.sop_instance_uid,
        instance_number=options.instance_number,
        manufacturer=options.manufacturer,
        institution_name=options.institution,
        is_complete=True,
        is_final=False,
        is_verified=False,
        contributing_equipment=[equipment],
        series_description=series_description,
        manufacturer_model_name=manifest.name,
        software_versions=manifest.version,
        coding_schemes=[
            CodingSchemeIdentificationItem(
                designator=LOCAL_SCHEME,
                name="CXR node local concepts",
                responsible_organization=options.manufacturer,
            )
        ],
    )


def _separate(node: Dataset) -> None:
    """Every container SEPARATE: the items are discrete results, not running prose. (highdicom
    writes CONTINUOUS, which dsr2html and other renderers show as text without concept
    names: "0.83 1" instead of "Probability = 0.83".)"""
    if node.get("ValueType") == "CONTAINER":
        node.ContinuityOfContent = "SEPARATE"
    for child in node.get("ContentSequence", []):
        _separate(child)


def _measurement_group(
    header: Dataset,
    result: InferResult,
    manifest: Manifest,
    uids: OutputUids,
    options: ReportOptions,
    present: bool,
) -> MeasurementsAndQualitativeEvaluations:
    measurements = [
        Measurement(
            name=PROBABILITY,
            value=_percent(result.probability),
            unit=PERCENT,
            derivation=codes.SCT.Mean,  # the ensemble averages its members
        )
    ]
    if options.include_member_probabilities:
        for member, probability in result.member_probabilities.items():
            measurements.append(
                Measurement(
                    name=PROBABILITY,
                    value=_percent(probability),
                    unit=PERCENT,
                    algorithm_id=AlgorithmIdentification(
                        name=member,
                        version=manifest.version,
                        parameters=[f"ensemble member of {manifest.name}"],
                    ),
                )
            )
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            # Derived from the SR UID so that a redone job writes the same tree.
            uid=generate_uid(entropy_srcs=[uids.sop_instance_uid, "tracking"]),
            identifier="COVID-19 classification",
        ),
        finding_type=FINDING_COVID19,
        algorithm_id=AlgorithmIdentification(
            name=manifest.name,
            version=manifest.version,
            parameters=[f"decision threshold={manifest.threshold:g}"],
            manufacturer=options.manufacturer,
        ),
        source_images=[SourceImageForMeasurementGroup.from_source_image(header)],
        measurements=measurements,
        qualitative_evaluations=[
            QualitativeEvaluation(name=FINDING_COVID19, value=PRESENT if present else ABSENT)
        ],
    )
    item = group[0]
    item.ContentSequence.append(
        _text(
            COMMENT,
            f"Decision threshold {manifest.threshold:g}: COVID-19 reported present when the "
            f"ensemble probability is at or above it (probability {result.probability:.4f}).",
        )
    )
    return group


def _neighbour_item(
    item: SimilarItem, header: Dataset, options: ReportOptions, evidence: list[Dataset]
) -> ContainerContentItem:
    if item.kind == "hospital":
        return _hospital_item(item, header, options, evidence)
    container = ContainerContentItem(name=SIMILAR_REFERENCE, relationship_type=_CONTAINS)
    content: list[ContentItem] = [_text(IDENTIFIER, item.item_id)]
    if math.isfinite(item.distance):
        content.append(_distance(item.distance))
    if options.include_similar_labels and item.label:
        content.append(_text(NEIGHBOUR_LABEL, reference_label_text(item.label)))
    if item.source:
        content.append(_text(NEIGHBOUR_DATASET, item.source))
    container.ContentSequence = ContentSequence(content)
    return container


def _hospital_item(
    item: SimilarItem, header: Dataset, options: ReportOptions, evidence: list[Dataset]
) -> ContainerContentItem:
    """An earlier study of this hospital: what `hospital_fields` allows, and its UIDs so the
    viewer can open it (and PertinentOtherEvidenceSequence lists it)."""
    fields = options.hospital_fields
    container = ContainerContentItem(name=SIMILAR_HOSPITAL, relationship_type=_CONTAINS)
    content: list[ContentItem] = [_text(IDENTIFIER, item.item_id)]
    if "date" in fields and item.study_date and _is_date(item.study_date):
        content.append(
            DateContentItem(name=STUDY_DATE, value=item.study_date, relationship_type=_CONTAINS)
        )
    if "score" in fields and item.probability is not None:
        content.append(
            NumContentItem(
                name=AI_PROBABILITY_THEN,
                value=_percent(item.probability),
                unit=PERCENT,
                relationship_type=_CONTAINS,
            )
        )
    if "label" in fields and options.include_similar_labels and item.label:
        content.append(_text(CONFIRMED_DIAGNOSIS, DIAGNOSIS_TEXT.get(item.label, item.label)))
    if "distance" in fields and math.isfinite(item.distance):
        content.append(_distance(item.distance))
    if item.study_instance_uid:
        content.append(
            UIDRefContentItem(
                name=STUDY_UID, value=item.study_instance_uid, relationship_type=_CONTAINS
            )
        )
        if item.series_instance_uid and item.sop_instance_uid:
            content.append(
                UIDRefContentItem(
                    name=SERIES_UID, value=item.series_instance_uid, relationship_type=_CONTAINS
                )
            )
            sop_class = _neighbour_sop_class(item, header)
            content.append(
                ImageContentItem(
                    name=SIMILAR_IMAGE,
                    referenced_sop_class_uid=sop_class,
                    referenced_sop_instance_uid=item.sop_instance_uid,
                    relationship_type=_CONTAINS,
                )
            )
            # highdicom files other-study evidence under PertinentOtherEvidenceSequence.
            stub = Dataset()
            stub.SOPClassUID = sop_class
            stub.SOPInstanceUID = item.sop_instance_uid
            stub.StudyInstanceUID = item.study_instance_uid
            stub.SeriesInstanceUID = item.series_instance_uid
            evidence.append(stub)
    container.ContentSequence = ContentSequence(content)
    return container


def _shown(value: float) -> float:
    """Four decimals: what a reader can use (0.8 - 0.03 is not 0.77000000000000001)."""
    return round(float(value), 4)


def _percent(probability: float) -> float:
    """A probability 0..1 as the SR's UCUM "%" value: 0..100, two decimals."""
    return round(100.0 * float(probability), 2)


def _is_date(value: str) -> bool:
    """A valid DICOM DA (YYYYMMDD); a malformed stored study date is left out."""
    try:
        datetime.strptime(value, "%Y%m%d")
    except ValueError:
        return False
    return len(value) == 8


def _distance(value: float) -> NumContentItem:
    return NumContentItem(
        name=EMBEDDING_DISTANCE, value=_shown(value), unit=NO_UNITS, relationship_type=_CONTAINS
    )


def _lung_region(
    header: Dataset, outline: np.ndarray, number: int, manifest: Manifest, uids: OutputUids
) -> PlanarROIMeasurementsAndQualitativeEvaluations:
    """TID 1410 group holding one lung outline as a closed POLYLINE on the source image."""
    return PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=generate_uid(entropy_srcs=[uids.sop_instance_uid, "lung", str(number)]),
            identifier=f"Lung outline {number}",
        ),
        referenced_region=ImageRegion(
            graphic_type=GraphicTypeValues.POLYLINE,
            graphic_data=np.asarray(outline, dtype=np.float64),
            source_image=SourceImageForRegion.from_source_image(header),
        ),
        finding_type=LUNG,
        finding_category=ANATOMICAL_STRUCTURE,
        algorithm_id=AlgorithmIdentification(
            name=f"{manifest.name} lung segmentation", version=manifest.version
        ),
    )


def _neighbour_sop_class(item: SimilarItem, header: Dataset) -> str:
    # The hospital index records each image's SOP class. An item without one (older
    # callers) is an image the node analysed itself (CR, DX or SC): the source's class is
    # the best available guess.
    return str(item.sop_class_uid) if item.sop_class_uid else str(header.SOPClassUID)


def _text(name: CodedConcept, value: str) -> TextContentItem:
    return TextContentItem(name=name, value=value, relationship_type=_CONTAINS)


def _series_description(manifest: Manifest) -> str:
    prefix = "PLUMBING random weights - " if manifest.random_weights else ""
    text = f"{prefix}AI COVID-19 {manifest.name} {manifest.version} - not diagnostic"
    return text[:64]
