"""The copy of a received instance that goes into an exported dataset: the pixels and what it
takes to display them, nothing about the patient.

A keep-list, not a remove-list: every attribute not named here is left out (names, ids,
dates, institution, device serial numbers, private tags, free text, overlays, ...), so an
attribute nobody thought of cannot slip through. The UIDs are new. This is not a
certified de-identification: the pixels are copied as they are, and an image with burned-in
text is not exported at all (`BurnedInAnnotation` YES; export.py skips it) - but a film
whose burned-in text the modality did not declare would carry it. Review a dataset before it
leaves the hospital.
"""

from __future__ import annotations

from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import generate_uid

#: What `dicom_node.results.pixels.decode_display` reads, and what describes the image as
#: an X-ray (view, body part, spacing, compression history). Nothing names a person.
KEPT = (
    "SOPClassUID",
    "Modality",
    "BodyPartExamined",
    "ViewPosition",
    "PatientOrientation",
    "ImageLaterality",
    "PixelSpacing",
    "ImagerPixelSpacing",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "PlanarConfiguration",
    "NumberOfFrames",
    "PixelAspectRatio",
    "RescaleIntercept",
    "RescaleSlope",
    "RescaleType",
    "ModalityLUTSequence",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "VOILUTSequence",
    "PresentationLUTShape",
    "LossyImageCompression",
    "LossyImageCompressionRatio",
    "LossyImageCompressionMethod",
    "BurnedInAnnotation",
    "PixelData",
)


def training_copy(source: Dataset) -> Dataset:
    """A new data set holding only the `KEPT` attributes of `source`, new UIDs, and the
    source's transfer syntax (the pixel data is copied as encoded)."""
    ds = Dataset()
    for keyword in KEPT:
        if keyword in source:
            ds.add(source[keyword])
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "cxr-node export-dataset: keep-list of image attributes"
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = source.file_meta.TransferSyntaxUID
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta = meta
    return ds
