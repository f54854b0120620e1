"""The summary picture (`dicom_node.results.sc.render`) as a DICOM Secondary Capture Image
(highdicom), in the source's study, in a new series, referencing the source image.

The pixel data is written in the transfer syntax the setting `summary_syntax` names
(`SUMMARY_SYNTAXES`); a destination that accepts none but the uncompressed ones gets it
decompressed on the way (`dicom_node.results.delivery`). JPEG 2000 lossless, the default, is
7.7 times smaller than uncompressed RGB on a 1024 px summary (docs/BENCHMARKS.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import highdicom as hd
from pydicom import Dataset
from pydicom.encaps import generate_frames
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
)
from pydicom.valuerep import DS

from dicom_node.results.equipment import OWN_MANUFACTURER, evidence_header, model_equipment
from dicom_node.results.sc.render import Summary
from dicom_node.settings import SummarySyntaxName
from worker.bundle import Manifest


@dataclass(frozen=True)
class SummarySyntax:
    """How the RGB summary is encoded: the transfer syntax, the photometric interpretation
    its codec stores colour in, and for a lossy one its Lossy Image Compression Method."""

    uid: UID
    photometric: str
    lossy_method: str | None = None


#: The transfer syntaxes of setting `summary_syntax`. YBR_RCT: JPEG 2000's reversible
#: colour transform, lossless, and 40 % of the size of the same codec on the RGB planes; a
#: decoder gives RGB back. YBR_FULL_422: what a JPEG baseline colour stream holds.
SUMMARY_SYNTAXES: dict[SummarySyntaxName, SummarySyntax] = {
    "uncompressed": SummarySyntax(ExplicitVRLittleEndian, "RGB"),
    "rle": SummarySyntax(RLELossless, "RGB"),
    "jpeg2000-lossless": SummarySyntax(JPEG2000Lossless, "YBR_RCT"),
    "jpeg-baseline": SummarySyntax(JPEGBaseline8Bit, "YBR_FULL_422", "ISO_10918_1"),
}


@dataclass(frozen=True)
class ScOptions:
    manufacturer: str = OWN_MANUFACTURER
    institution: str | None = None
    series_number: int = 9902
    instance_number: int = 1
    syntax: SummarySyntaxName = "uncompressed"


def build_sc(
    source: Dataset,
    summary: Summary,
    manifest: Manifest,
    series_instance_uid: str,
    sop_instance_uid: str,
    options: ScOptions,
) -> Dataset:
    """Secondary Capture Image of the summary, same study as `source` (header only is enough)."""
    header = evidence_header(source)
    syntax = SUMMARY_SYNTAXES[options.syntax]
    equipment = model_equipment(
        manifest,
        options.manufacturer,
        options.institution,
        "COVID-19 classification summary image (model bundle)",
    )
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=header,
        pixel_array=summary.pixels,
        photometric_interpretation=syntax.photometric,
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series_instance_uid,
        series_number=options.series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=options.instance_number,
        manufacturer=options.manufacturer,
        patient_orientation=("L", "F"),  # placeholder for highdicom's check; set below
        transfer_syntax_uid=syntax.uid,
        contributing_equipment=[equipment],
        manufacturer_model_name=manifest.name,
        software_versions=manifest.version,
        institution_name=options.institution,
        series_description=_series_description(manifest),
    )
    # Rows and columns are the source's, only scaled: so is the orientation (type 2: empty
    # when the source did not say).
    sc.PatientOrientation = _orientation(header)
    sc.ConversionType = "WSD"  # made on a workstation, not digitised from film
    sc.BurnedInAnnotation = "YES"  # the result text, no patient identity, is in the pixels
    # The node analyses chest radiographs only; the standard term is written whatever the
    # modality sent (e.g. "THORAX", which is no defined term and makes Laterality required).
    sc.BodyPartExamined = "CHEST"
    sc.DerivationDescription = (
        "Source X-ray scaled to the summary width, AI lung outline and result text added"
    )
    sc.ImageComments = f"AI result, not for diagnostic use. {manifest.name} {manifest.version}"
    reference = Dataset()
    reference.ReferencedSOPClassUID = header.SOPClassUID
    reference.ReferencedSOPInstanceUID = header.SOPInstanceUID
    sc.SourceImageSequence = [reference]
    if syntax.lossy_method is not None:
        _mark_lossy(sc, summary, syntax.lossy_method)
    return sc


def _mark_lossy(sc: Dataset, summary: Summary, method: str) -> None:
    """Lossy Image Compression attributes (General Image module, C.7.6.1.1.5): highdicom
    writes the lossy stream but not these."""
    (frame,) = generate_frames(sc.PixelData, number_of_frames=1)
    sc.LossyImageCompression = "01"
    sc.LossyImageCompressionRatio = [DS(summary.pixels.nbytes / len(frame), auto_format=True)]
    sc.LossyImageCompressionMethod = [method]


def _orientation(header: Dataset) -> list[str]:
    value = header.get("PatientOrientation")
    if value is not None and not isinstance(value, str) and len(value) == 2:
        return [str(v) for v in value]
    return []


def _series_description(manifest: Manifest) -> str:
    prefix = "PLUMBING random weights - " if manifest.random_weights else ""
    return f"{prefix}AI COVID-19 summary {manifest.version} - not diagnostic"[:64]
