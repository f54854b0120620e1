"""The lung mask as DICOM Segmentation (highdicom), on the received image's pixel grid.

Binary (lung / not lung at the probability threshold of `dicom_node.results.lungs`), one segment,
same study as the X-ray, new series. Off by default (`CXR_PRODUCE_SEG`): many PACS store a
SEG but cannot show it, and the SR's outline and the summary image carry the same contour.
"""

from __future__ import annotations

from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from dicom_node.results.equipment import OWN_MANUFACTURER, evidence_header, model_equipment
from worker.bundle import Manifest


@dataclass(frozen=True)
class SegOptions:
    manufacturer: str = OWN_MANUFACTURER
    institution: str | None = None
    series_number: int = 9903
    instance_number: int = 1


def build_seg(
    source: Dataset,
    mask: np.ndarray,
    manifest: Manifest,
    series_instance_uid: str,
    sop_instance_uid: str,
    options: SegOptions,
) -> Dataset:
    """Binary SEG of `mask` (bool, Rows x Columns of `source`; header only is enough)."""
    header = evidence_header(source)
    rows, cols = int(header.Rows), int(header.Columns)
    if mask.shape != (rows, cols):
        raise ValueError(f"mask shape {mask.shape} is not the source's {(rows, cols)}")
    # A zero or negative Pixel Spacing (seen on real CRs) would be copied into the SEG's
    # Pixel Measures; without it the SEG is valid and simply not calibrated.
    spacing = header.get("PixelSpacing")
    if spacing is not None and (len(spacing) != 2 or min(float(v) for v in spacing) <= 0):
        del header.PixelSpacing
    algorithm = hd.AlgorithmIdentificationSequence(
        name=f"{manifest.name} lung segmentation",
        version=manifest.version,
        family=codes.cid7162.ArtificialIntelligence,
    )
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="Lungs",
        segmented_property_category=codes.SCT.AnatomicalStructure,
        segmented_property_type=codes.SCT.Lung,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )
    equipment = model_equipment(
        manifest, options.manufacturer, options.institution, "lung segmentation (model bundle)"
    )
    seg = hd.seg.Segmentation(
        source_images=[header],
        pixel_array=mask.astype(bool)[None],
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=series_instance_uid,
        series_number=options.series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=options.instance_number,
        manufacturer=options.manufacturer,
        manufacturer_model_name=manifest.name,
        software_versions=manifest.version,
        device_serial_number=manifest.device_uid[-16:],
        content_label="LUNGS",
        content_description="AI lung segmentation, not for diagnostic use",
        transfer_syntax_uid=ExplicitVRLittleEndian,
        omit_empty_frames=False,  # an empty mask is still a (valid) answer
        contributing_equipment=[equipment],
        series_description=_series_description(manifest),
    )
    # Type 2C in the General Image module for images without patient coordinates: the
    # orientation of the source, whose grid the SEG shares (empty when unknown).
    orientation = header.get("PatientOrientation")
    seg.PatientOrientation = orientation if orientation else None
    return seg


def _series_description(manifest: Manifest) -> str:
    prefix = "PLUMBING random weights - " if manifest.random_weights else ""
    return f"{prefix}AI lung segmentation {manifest.version} - not diagnostic"[:64]
