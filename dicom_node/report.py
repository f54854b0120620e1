"""Build the DICOM Structured Report that goes back to the PACS, and read one back.

`build_sr` is a pure function: header of the received X-ray + inference result + bundle
manifest + retrieval neighbours + caller-chosen UIDs -> a Comprehensive SR (TID 1500
Measurement Report) in the same study, new series. It touches no network, disk or clock
other than the content date/time highdicom stamps.

Content tree (order as written; TID 1500 rows first, then this node's extensions)::

    CONTAINER Imaging Measurement Report (TID 1500)
      language, observer context (device: bundle name, version, device UID)
      procedure reported: SCT 399208008 "Plain chest X-ray"
      CONTAINER Imaging Measurements
        CONTAINER Measurement Group (TID 1501)
          tracking id/UID, finding COVID-19, algorithm id (name, version, threshold)
          IMAGE source of measurement = the received X-ray
          NUM Probability (ensemble mean), [NUM Probability per member]
          CODE COVID-19 = Present | Absent       (probability >= threshold -> Present)
          TEXT Comment: decision threshold [, PLUMBING BUNDLE warning]
        CONTAINER Measurement Group (TID 1410), one per lung outline found:
          tracking id/UID "Lung outline N", finding Lung, algorithm id (segmentation)
          SCOORD POLYLINE (closed) in the received X-ray's pixel coordinates
      TEXT Comment: not for diagnostic use
      CONTAINER Most similar studies (local code)            [include_similar]
        CONTAINER Similar hospital study:
                  identifier, [study date], [AI probability], [confirmed diagnosis],
                  [embedding distance], study/series UID, IMAGE reference
                  ([...]: ReportOptions.hospital_fields)
        CONTAINER Similar reference-set image:
                  identifier, embedding distance, [label], dataset

Code choices (all from DICOM PS3.16 / SNOMED CT, as carried by pydicom's code dictionary,
except the local 99CXRN codes for concepts the standard has no code for):

- Procedure reported: SNOMED CT 399208008 "Plain chest X-ray" (a procedure concept that
  does not claim a view count; LOINC 36643-5 is "XR Chest 2 Views", which a single portable
  frontal film is not). CID 100 is extensible, so an SCT procedure code is allowed.
- Present / Absent: SCT 52101004 / SCT 272519000, the values of DICOM CID 241 "Present
  Absent Only" (the DICOM value set uses 272519000, not 2667000, for "Absent").
- Probability: DCM 122157 "Probability", unit UCUM "1" (no units), value 0..1.
- Contributing equipment purpose: DCM 109102 "Processing Equipment" (CID 7005). There is no
  "Processing Algorithm" code; 109103 is "Modifying Equipment" (changes an instance in place),
  which is not what an algorithm creating a new instance does.
- Finding COVID-19: SCT 840539006 with meaning "COVID-19" (an accepted SNOMED CT synonym);
  the fully specified name is 65 characters, longer than the 64 a Code Meaning (LO) allows.

Flags: Completion COMPLETE (the algorithm's output is whole; a radiologist's review would be a
new document), Verification UNVERIFIED (no person has signed it), Preliminary PRELIMINARY (an
unverified research result is not the definitive means of communicating the finding).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TypedDict

import highdicom as hd
import numpy as np
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
from pydicom import Dataset, config
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from pydicom.valuerep import validate_value

from dicom_node.checks import OWN_MANUFACTURER
from dicom_node.settings import HOSPITAL_FIELDS
from worker.bundle import Manifest
from worker.classes import COVID19_SNOMED
from worker.contracts import InferResult, SimilarItem

COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"

# highdicom warns about single-component person names and quotes the name in the warning:
# a patient's or physician's name would reach the logs. Names are copied as the modality
# sent them (tolerant reading), so the warning has nothing to tell us. Process-wide, since
# `warnings.catch_warnings` is not thread-safe and finalize runs in threads.
warnings.filterwarnings(
    "ignore", message=r"The string .* is unlikely to represent the intended person name"
)

# Local coding scheme for concepts DICOM has no code for; "99" marks a private scheme
# (PS3.3 8.2) and the SR documents it in the Coding Scheme Identification Sequence.
LOCAL_SCHEME = "99CXRN"

FINDING_COVID19 = CodedConcept(*COVID19_SNOMED)
PRESENT = CodedConcept("52101004", "SCT", "Present")
ABSENT = CodedConcept("272519000", "SCT", "Absent")
PLAIN_CHEST_XRAY = CodedConcept("399208008", "SCT", "Plain chest X-ray")
PROBABILITY = CodedConcept("122157", "DCM", "Probability")
NO_UNITS = CodedConcept("1", "UCUM", "no units")
COMMENT = CodedConcept("121106", "DCM", "Comment")
IDENTIFIER = CodedConcept("125010", "DCM", "Identifier")
STUDY_UID = CodedConcept("110180", "DCM", "Study Instance UID")
SERIES_UID = CodedConcept("112002", "DCM", "Series Instance UID")
SIMILAR_STUDIES = CodedConcept("CXRN001", LOCAL_SCHEME, "Most similar studies")
SIMILAR_HOSPITAL = CodedConcept("CXRN002", LOCAL_SCHEME, "Similar hospital study")
SIMILAR_REFERENCE = CodedConcept("CXRN005", LOCAL_SCHEME, "Similar reference-set image")
NEIGHBOUR_LABEL = CodedConcept("CXRN003", LOCAL_SCHEME, "Label")
NEIGHBOUR_DATASET = CodedConcept("CXRN004", LOCAL_SCHEME, "Dataset")
SIMILAR_IMAGE = CodedConcept("CXRN006", LOCAL_SCHEME, "Similar image")
EMBEDDING_DISTANCE = CodedConcept("CXRN007", LOCAL_SCHEME, "Embedding distance")
AI_PROBABILITY_THEN = CodedConcept("CXRN008", LOCAL_SCHEME, "AI probability at analysis")
CONFIRMED_DIAGNOSIS = CodedConcept("CXRN009", LOCAL_SCHEME, "Confirmed diagnosis")
STUDY_DATE = CodedConcept("111060", "DCM", "Study Date")
LUNG = CodedConcept("39607008", "SCT", "Lung")
ANATOMICAL_STRUCTURE = CodedConcept("91723000", "SCT", "Anatomical Structure")

#: How a confirmed diagnosis recorded with `cxr-node label` reads in the SR.
DIAGNOSIS_TEXT = {"covid": "COVID-19 (confirmed)", "negative": "COVID-19 negative (confirmed)"}

NOT_FOR_DIAGNOSTIC_USE = "Not for diagnostic use. Research software; result not verified."
PLUMBING_WARNING = "PLUMBING BUNDLE: random weights, score meaningless"

_CONTAINS = RelationshipTypeValues.CONTAINS
_TYPE2_EVIDENCE = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


@dataclass(frozen=True)
class ReportUids:
    """UIDs of the SR, chosen by the caller and kept in the ledger so a redone job
    produces the same SOP Instance UID (the PACS then replaces instead of duplicating)."""

    series_instance_uid: str
    sop_instance_uid: str

    @classmethod
    def generate(cls) -> ReportUids:
        return cls(series_instance_uid=hd.UID(), sop_instance_uid=hd.UID())


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


def build_sr(
    source: Dataset,
    result: InferResult,
    manifest: Manifest,
    similar: list[SimilarItem],
    uids: ReportUids,
    options: ReportOptions,
    lung_outlines: Sequence[np.ndarray] = (),
) -> Dataset:
    """Comprehensive SR with the COVID-19 result for `source` (header only is enough).

    lung_outlines: closed (column, row) polylines on the source image (`dicom_node.lungs`),
    written as TID 1410 planar regions so that TID 1500 viewers draw them.
    """
    header = evidence_header(source)
    present = is_present(result.probability, manifest.threshold)

    group = _measurement_group(header, result, manifest, uids, options, present)
    regions = [
        _lung_region(header, outline, number, manifest, uids)
        for number, outline in enumerate(lung_outlines, start=1)
    ]
    observer = ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=manifest.device_uid,
            name=manifest.name,
            manufacturer_name=options.manufacturer,
            model_name=manifest.version,
        ),
    )
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer),
        procedure_reported=PLAIN_CHEST_XRAY,
        imaging_measurements=[group, *regions],
    )
    root = report[0]
    root.ContentSequence.append(_text(COMMENT, NOT_FOR_DIAGNOSTIC_USE))

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

    equipment = model_equipment(
        manifest,
        options.manufacturer,
        options.institution,
        "COVID-19 classification of the chest X-ray (model bundle)",
    )

    sr = ComprehensiveSR(
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
        series_description=_series_description(manifest),
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
    _separate(sr)
    return sr


def _separate(node: Dataset) -> None:
    """Every container SEPARATE: the items are discrete results, not running prose. (highdicom
    writes CONTINUOUS, which dsr2html and other renderers show as text without concept
    names: "0.83 1" instead of "Probability = 0.83".)"""
    if node.get("ValueType") == "CONTAINER":
        node.ContinuityOfContent = "SEPARATE"
    for child in node.get("ContentSequence", []):
        _separate(child)


def model_equipment(
    manifest: Manifest, manufacturer: str, institution: str | None, contribution: str
) -> hd.ContributingEquipment:
    """Contributing Equipment naming the model bundle (its device UID changes with every
    version), shared by the SR, the summary SC and the SEG."""
    equipment = hd.ContributingEquipment(
        manufacturer=manufacturer,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=manifest.name,
        software_versions=manifest.version,
        institution_name=institution,
        contribution_description=contribution,
    )
    equipment.DeviceUID = manifest.device_uid
    return equipment


def evidence_header(source: Dataset) -> Dataset:
    """A copy of the source header that highdicom can take as evidence.

    Tolerant reading: type 2 patient/study attributes a modality left out are added empty,
    so the SR carries them empty (valid) rather than failing.
    """
    missing = [
        k
        for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
        if not source.get(k)
    ]
    if missing:
        raise ValueError(f"source header lacks {', '.join(missing)}")
    header = copy.deepcopy(source)
    _drop_invalid_values(header)
    for keyword in _TYPE2_EVIDENCE:
        if keyword not in header:
            setattr(header, keyword, None)
    return header


def _drop_invalid_values(header: Dataset) -> None:
    """Strict writing: a value the source got wrong (e.g. Patient's Age "68" instead of
    "068Y") is not copied into the SR; UIDs are kept as sent, since they identify the source."""
    for element in list(header):
        if element.VR in ("SQ", "UI", "OB", "OW", "UN") or element.value in (None, ""):
            continue
        values = element.value if element.VM > 1 else [element.value]
        try:
            for value in values:
                validate_value(element.VR, value, config.RAISE)
        except (ValueError, TypeError):
            del header[element.tag]


def _measurement_group(
    header: Dataset,
    result: InferResult,
    manifest: Manifest,
    uids: ReportUids,
    options: ReportOptions,
    present: bool,
) -> MeasurementsAndQualitativeEvaluations:
    measurements = [
        Measurement(
            name=PROBABILITY,
            value=_shown(result.probability),
            unit=NO_UNITS,
            derivation=codes.SCT.Mean,  # the ensemble averages its members
        )
    ]
    if options.include_member_probabilities:
        for member, probability in result.member_probabilities.items():
            measurements.append(
                Measurement(
                    name=PROBABILITY,
                    value=_shown(probability),
                    unit=NO_UNITS,
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
    if manifest.random_weights:
        item.ContentSequence.append(_text(COMMENT, PLUMBING_WARNING))
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
        content.append(_text(NEIGHBOUR_LABEL, item.label))
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
                value=_shown(item.probability),
                unit=NO_UNITS,
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
    header: Dataset, outline: np.ndarray, number: int, manifest: Manifest, uids: ReportUids
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


# ---------------------------------------------------------------------------- reading back


class SimilarSummary(TypedDict):
    kind: str  # "hospital" or "reference"
    item_id: str
    study_uid: str | None
    label: str | None  # hospital: the confirmed diagnosis as recorded ("covid", "negative")


class SrSummary(TypedDict):
    probability: float | None
    finding_present: bool | None
    referenced_sop_instance_uids: list[str]
    member_probabilities: dict[str, float]
    device_uid: str | None
    similar_ids: list[str]
    similar: list[SimilarSummary]
    pertinent_study_uids: list[str]
    lung_regions: int
    plumbing_bundle: bool


def sr_summary(ds: Dataset) -> SrSummary:
    """What a produced SR says, read with plain pydicom (tolerant of any writer).

    - probability: the ensemble Probability (the NUM without its own Algorithm Name);
    - finding_present: the COVID-19 CODE item, True / False, None when absent or unknown;
    - referenced_sop_instance_uids: CurrentRequestedProcedureEvidenceSequence instances;
    - similar: each similar item's kind, identifier, study UID and label;
    - lung_regions: how many SCOORD regions (lung outlines) the report holds.
    """
    probability: float | None = None
    members: dict[str, float] = {}
    present: bool | None = None
    device_uid: str | None = None
    similar_ids: list[str] = []
    similar = [_similar_summary(item) for item in _neighbour_containers(ds)]
    regions = 0
    plumbing = False
    for item, parents in _walk(ds.get("ContentSequence", [])):
        concept = _concept(item)
        value_type = item.get("ValueType")
        if value_type == "NUM" and concept == ("122157", "DCM"):
            value = _num_value(item)
            algorithm = next(
                (
                    c.get("TextValue")
                    for c, _ in _walk(item.get("ContentSequence", []))
                    if _concept(c) == ("111001", "DCM")
                ),
                None,
            )
            if algorithm is None:
                probability = value if probability is None else probability
            elif value is not None:
                members[str(algorithm)] = value
        elif value_type == "CODE" and concept == (COVID19_SNOMED[0], COVID19_SNOMED[1]):
            values = item.get("ConceptCodeSequence") or [Dataset()]
            present = _PRESENCE.get(str(values[0].get("CodeValue", "")))
        elif value_type == "UIDREF" and concept == ("121012", "DCM"):
            device_uid = str(item.UID)
        elif value_type == "SCOORD":
            regions += 1
        elif value_type == "TEXT":
            text = str(item.get("TextValue", ""))
            if concept == ("125010", "DCM") and parents and parents[-1] in _NEIGHBOUR_CONCEPTS:
                similar_ids.append(text)
            if PLUMBING_WARNING.split(":")[0] in text:
                plumbing = True
    return SrSummary(
        probability=probability,
        finding_present=present,
        referenced_sop_instance_uids=_evidence_uids(
            ds, "CurrentRequestedProcedureEvidenceSequence"
        ),
        member_probabilities=members,
        device_uid=device_uid,
        similar_ids=similar_ids,
        similar=similar,
        pertinent_study_uids=[
            str(s.StudyInstanceUID) for s in ds.get("PertinentOtherEvidenceSequence", [])
        ],
        lung_regions=regions,
        plumbing_bundle=plumbing,
    )


def _neighbour_containers(ds: Dataset) -> list[Dataset]:
    return [
        item
        for item, _ in _walk(ds.get("ContentSequence", []))
        if item.get("ValueType") == "CONTAINER" and _concept(item) in _NEIGHBOUR_CONCEPTS
    ]


def _similar_summary(container: Dataset) -> SimilarSummary:
    hospital = _concept(container) == (SIMILAR_HOSPITAL.value, SIMILAR_HOSPITAL.scheme_designator)
    item_id, study_uid, label = "", None, None
    for child in container.get("ContentSequence", []):
        concept = _concept(child)
        if concept == (IDENTIFIER.value, IDENTIFIER.scheme_designator):
            item_id = str(child.get("TextValue", ""))
        elif concept == (STUDY_UID.value, STUDY_UID.scheme_designator):
            study_uid = str(child.UID)
        elif concept in _LABEL_CONCEPTS:
            label = _DIAGNOSIS_BY_TEXT.get(str(child.TextValue), str(child.TextValue))
    return SimilarSummary(
        kind="hospital" if hospital else "reference",
        item_id=item_id,
        study_uid=study_uid,
        label=label,
    )


_NEIGHBOUR_CONCEPTS = {
    (c.value, c.scheme_designator) for c in (SIMILAR_HOSPITAL, SIMILAR_REFERENCE)
}
_LABEL_CONCEPTS = {(c.value, c.scheme_designator) for c in (NEIGHBOUR_LABEL, CONFIRMED_DIAGNOSIS)}
_DIAGNOSIS_BY_TEXT = {text: label for label, text in DIAGNOSIS_TEXT.items()}
# Tolerant reading: SNOMED "Absent" 2667000 is accepted too (other writers use it).
_PRESENCE = {PRESENT.value: True, ABSENT.value: False, "2667000": False}


def _walk(
    items: Sequence[Dataset], parents: tuple[tuple[str, str] | None, ...] = ()
) -> Iterator[tuple[Dataset, tuple[tuple[str, str] | None, ...]]]:
    for item in items:
        yield item, parents
        yield from _walk(item.get("ContentSequence", []), (*parents, _concept(item)))


def _concept(item: Dataset) -> tuple[str, str] | None:
    seq = item.get("ConceptNameCodeSequence")
    if not seq:
        return None
    return str(seq[0].get("CodeValue", "")), str(seq[0].get("CodingSchemeDesignator", ""))


def _num_value(item: Dataset) -> float | None:
    seq = item.get("MeasuredValueSequence")
    if not seq:
        return None
    measured = seq[0]
    if "FloatingPointValue" in measured:
        return float(measured.FloatingPointValue)
    if measured.get("NumericValue") is not None:
        return float(measured.NumericValue)
    return None


def _evidence_uids(ds: Dataset, keyword: str) -> list[str]:
    return [
        str(sop.ReferencedSOPInstanceUID)
        for study in ds.get(keyword, [])
        for series in study.get("ReferencedSeriesSequence", [])
        for sop in series.get("ReferencedSOPSequence", [])
    ]
