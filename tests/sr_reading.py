"""Read a produced Structured Report back with plain pydicom, tolerant of any writer: what the
tests check the node wrote (the node itself never reads its SRs back)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypedDict

from pydicom import Dataset

from dicom_node.results.sr.codes import (
    ABSENT,
    CONFIRMED_DIAGNOSIS,
    DIAGNOSIS_TEXT,
    IDENTIFIER,
    NEIGHBOUR_LABEL,
    PLUMBING_WARNING,
    PRESENT,
    SIMILAR_HOSPITAL,
    SIMILAR_REFERENCE,
    STUDY_UID,
)
from worker.classes import COVID19_SNOMED


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

    - probability: the ensemble Probability (the NUM without its own Algorithm Name), 0..1
      whether written in UCUM "%" or "1";
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
    """A NUM's value; a probability in UCUM "%" (the node's unit) comes back as 0..1."""
    seq = item.get("MeasuredValueSequence")
    if not seq:
        return None
    measured = seq[0]
    if "FloatingPointValue" in measured:
        value = float(measured.FloatingPointValue)
    elif measured.get("NumericValue") is not None:
        value = float(measured.NumericValue)
    else:
        return None
    units = measured.get("MeasurementUnitsCodeSequence") or [Dataset()]
    if str(units[0].get("CodeValue", "")) == "%":
        return value / 100.0
    return value


def _evidence_uids(ds: Dataset, keyword: str) -> list[str]:
    return [
        str(sop.ReferencedSOPInstanceUID)
        for study in ds.get(keyword, [])
        for series in study.get("ReferencedSeriesSequence", [])
        for sop in series.get("ReferencedSOPSequence", [])
    ]
