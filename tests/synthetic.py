"""Synthetic chest radiographs for volume and robustness tests (no patient: "Test^Patient").

A small frontal CR with a plausible grey-level layout (dark lungs, bright mediastinum and
borders), made with numpy and pydicom; every call gets new UIDs unless given some.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian, generate_uid

CR_STORAGE = ComputedRadiographyImageStorage


def chest_pixels(size: int = 256, bits: int = 12, seed: int = 0) -> np.ndarray:
    """A uint16 image: two dark ellipses (lungs) in a bright body, with noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    image = np.full((size, size), 0.8)
    for cx in (0.32, 0.68):
        lung = ((x - cx) / 0.16) ** 2 + ((y - 0.5) / 0.32) ** 2 < 1
        image[lung] = 0.25
    image += rng.normal(0, 0.03, image.shape)
    top = (1 << bits) - 1
    pixels: np.ndarray = np.clip(image * top, 0, top).astype(np.uint16)
    return pixels


def synthetic_cr(
    size: int = 256,
    seed: int = 0,
    study_uid: str | None = None,
    sop_uid: str | None = None,
) -> Dataset:
    """A frontal chest CR (12 bits stored in 16, MONOCHROME2, explicit VR little endian)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CR_STORAGE
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName, ds.PatientID = "Test^Patient", "TEST0001"
    ds.StudyDate, ds.StudyTime = "20240101", "120000"
    ds.AccessionNumber, ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "", "1", 1, 1
    ds.ReferringPhysicianName, ds.PatientBirthDate, ds.PatientSex = "", "", "O"
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = chest_pixels(size, 12, seed).tobytes()
    return ds


def write(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path
