"""The SR that says an image was not analysed, and why: no finding, no probability.

When the bundle's input gate (worker.gate) finds that an image is not a frontal chest
radiograph the model is meant for, the node writes no score anywhere. It sends this document
into the study instead, so the reader of the study sees that the AI looked and declined,
rather than a silence that could be read as "nothing found"::

    CONTAINER Imaging Measurement Report (TID 1500)
      language, observer context (device: bundle name, version, device UID)
      procedure reported: SCT 399208008 "Plain chest X-ray"
      CONTAINER Imaging Measurements
        CONTAINER Measurement Group (TID 1501)
          tracking id/UID, finding COVID-19, algorithm id (the bundle's input gate)
          IMAGE source = the received image
          CODE COVID-19 = "Not analysed" (local code CXRN010: no finding is stated)
          TEXT Comment: each reason the gate gave
      TEXT Summary: "COVID-19: not analysed - <first reason>"
      TEXT Comment: not for diagnostic use

(TID 1500 requires one measurement group; this one carries no measurement, no probability.)
"""

from __future__ import annotations

from collections.abc import Sequence

from highdicom.sr import (
    AlgorithmIdentification,
    CodedConcept,
    MeasurementsAndQualitativeEvaluations,
    QualitativeEvaluation,
    SourceImageForMeasurementGroup,
    TrackingIdentifier,
)
from pydicom import Dataset
from pydicom.uid import generate_uid

from dicom_node.records.ledger import OutputUids
from dicom_node.results.equipment import evidence_header
from dicom_node.results.sr.builder import (
    ReportOptions,
    _text,
    comprehensive_sr,
    measurement_report,
)
from dicom_node.results.sr.codes import (
    COMMENT,
    FINDING_COVID19,
    LOCAL_SCHEME,
    NOT_FOR_DIAGNOSTIC_USE,
    SUMMARY,
)
from worker.bundle import Manifest

NOT_ANALYSED = "COVID-19: not analysed"
#: No standard code says "the algorithm declined to assess": a local one (scheme 99CXRN).
NOT_ANALYSED_CODE = CodedConcept("CXRN010", LOCAL_SCHEME, "Not analysed")


def not_analysed_headline(reasons: Sequence[str]) -> str:
    return f"{NOT_ANALYSED} - {reasons[0]}" if reasons else NOT_ANALYSED


def build_not_analysed_sr(
    source: Dataset,
    reasons: Sequence[str],
    manifest: Manifest,
    uids: OutputUids,
    options: ReportOptions,
) -> Dataset:
    """Comprehensive SR for `source` (header only is enough) saying it was not analysed."""
    header = evidence_header(source)
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=generate_uid(entropy_srcs=[uids.sop_instance_uid, "tracking"]),
            identifier="COVID-19 classification",
        ),
        finding_type=FINDING_COVID19,
        algorithm_id=AlgorithmIdentification(
            name=manifest.name,
            version=manifest.version,
            parameters=["input gate: not analysed"],
            manufacturer=options.manufacturer,
        ),
        source_images=[SourceImageForMeasurementGroup.from_source_image(header)],
        qualitative_evaluations=[
            QualitativeEvaluation(name=FINDING_COVID19, value=NOT_ANALYSED_CODE)
        ],
    )
    for reason in reasons:
        group[0].ContentSequence.append(_text(COMMENT, f"Not analysed: {reason}"))
    report = measurement_report(manifest, options, [group])
    root = report[0]
    root.ContentSequence.insert(0, _text(SUMMARY, not_analysed_headline(reasons)))
    root.ContentSequence.append(_text(COMMENT, NOT_FOR_DIAGNOSTIC_USE))
    return comprehensive_sr(
        [header],
        report,
        manifest,
        uids,
        options,
        "Input check of the chest X-ray (model bundle): not analysed",
        f"AI COVID-19 {manifest.name} {manifest.version} - not analysed"[:64],
    )
