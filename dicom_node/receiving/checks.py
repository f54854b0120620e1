"""Which received instances the node analyses: a pure function of the dataset header.

Three outcomes: analyse; store but do not analyse (a valid instance the model is not for,
e.g. a lateral view), with the reason recorded; or refuse with a DICOM failure status
(the instance is malformed for its SOP class).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from pydicom import Dataset
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import UID

from dicom_node import dimse_status
from dicom_node.receiving.security import is_valid_uid
from dicom_node.results.equipment import OWN_MANUFACTURER


class Verdict(Enum):
    ANALYSE = "analyse"
    NOT_ANALYSABLE = "not analysable"
    REFUSE = "refuse"


@dataclass(frozen=True)
class Check:
    verdict: Verdict
    reason: str = ""
    status: int = dimse_status.SUCCESS


ANALYSED_MODALITIES = {"CR", "DX", "OT", "XC", ""}
CHEST_BODY_PARTS = {"CHEST", "THORAX", "LUNG", "LUNGS", "TORSO", ""}
LATERAL_VIEWS = {"LL", "RL", "LAT", "LATERAL", "LLD", "RLD"}
REQUIRED_UIDS = ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID")


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return str(value).strip().upper() if value is not None else ""


def check_instance(ds: Dataset, negotiated_sop_class: str, max_pixels: int) -> Check:
    """Decide what to do with one received instance (header only; pixels are decoded later)."""
    for keyword in REQUIRED_UIDS:
        value = str(ds.get(keyword, "")).strip()
        if not value:
            return Check(Verdict.REFUSE, f"missing {keyword}", dimse_status.MISSING_ATTRIBUTE)
        if not is_valid_uid(value):  # never let a crafted UID near a file name or a query
            return Check(Verdict.REFUSE, f"{keyword} is not a valid UID", dimse_status.INVALID_UID)
    if str(ds.SOPClassUID) != negotiated_sop_class:
        return Check(
            Verdict.REFUSE,
            f"SOP Class UID {ds.SOPClassUID} differs from the negotiated "
            f"{UID(negotiated_sop_class).name}",
            dimse_status.DATASET_MISMATCH,
        )
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        return Check(Verdict.REFUSE, "no pixel data", dimse_status.DATASET_MISMATCH)
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError):
        return Check(
            Verdict.REFUSE, "Rows/Columns missing or invalid", dimse_status.DATASET_MISMATCH
        )
    if rows <= 0 or cols <= 0:
        return Check(Verdict.REFUSE, f"empty image {rows}x{cols}", dimse_status.DATASET_MISMATCH)
    if rows * cols > max_pixels:
        return Check(
            Verdict.REFUSE,
            f"image of {rows}x{cols} exceeds {max_pixels} pixels",
            dimse_status.DATASET_MISMATCH,
        )
    short = _pixel_data_short(ds)
    if short:
        return Check(Verdict.REFUSE, short, dimse_status.DATASET_MISMATCH)

    if _made_by_a_node(ds):
        return Check(Verdict.NOT_ANALYSABLE, "a result image of a CXR node: not analysed again")
    modality = _text(ds, "Modality")
    if modality not in ANALYSED_MODALITIES:
        return Check(Verdict.NOT_ANALYSABLE, f"modality {modality} is not a radiograph")
    body_part = _text(ds, "BodyPartExamined")
    if body_part not in CHEST_BODY_PARTS:
        return Check(Verdict.NOT_ANALYSABLE, f"body part {body_part} is not the chest")
    view = _text(ds, "ViewPosition")
    if view in LATERAL_VIEWS:
        return Check(
            Verdict.NOT_ANALYSABLE, f"view position {view}: lateral views are not analysed"
        )
    return Check(Verdict.ANALYSE)


def _pixel_data_short(ds: Dataset) -> str:
    """Why the pixel data cannot hold the image its header declares ("" when it can).

    Native pixel data has a known size; an encapsulated stream must at least not be empty
    (whether it decodes is found out later, off the network thread)."""
    if "PixelData" not in ds:
        return ""
    value = ds.PixelData
    length = len(value) if value is not None else 0
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is not None and UID(str(syntax)).is_encapsulated:
        return "" if length else "empty pixel data"
    if "BitsAllocated" not in ds:
        return ""  # the decoder will say what is missing
    try:
        samples = int(ds.get("SamplesPerPixel") or 1)
        bits = int(ds.BitsAllocated)
        frames = int(ds.get("NumberOfFrames") or 1)
    except (AttributeError, TypeError, ValueError):
        return "Bits Allocated, Samples per Pixel or Number of Frames invalid"
    if bits <= 0 or samples <= 0 or frames <= 0:
        return f"invalid image attributes: {bits} bits, {samples} samples, {frames} frames"
    if "PhotometricInterpretation" not in ds:
        return ""  # the decoder will say what is missing
    # pydicom's own rule: it knows the subsampled colour spaces (YBR_FULL_422 holds two
    # thirds of what 3 full samples would) and the bit-packed 1-bit images
    expected = get_expected_length(ds, unit="bytes")
    if length < expected:
        return f"pixel data holds {length} bytes, the header declares {expected}"
    return ""


def _made_by_a_node(ds: Dataset) -> bool:
    makers = [ds.get("Manufacturer")]
    makers += [item.get("Manufacturer") for item in ds.get("ContributingEquipmentSequence", [])]
    return any(str(m or "").strip().lower() == OWN_MANUFACTURER for m in makers)
