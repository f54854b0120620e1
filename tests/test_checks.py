from __future__ import annotations

import pytest
from pydicom import Dataset
from pydicom.uid import ComputedRadiographyImageStorage, SecondaryCaptureImageStorage

from dicom_node import dimse_status
from dicom_node.receiving.checks import Verdict, check_instance

CR = ComputedRadiographyImageStorage


def header(**extra: object) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CR
    ds.SOPInstanceUID = "1.2.3.4"
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = "1.2.3.5"
    ds.Modality = "CR"
    ds.Rows, ds.Columns = 100, 80
    ds.PixelData = b"\0" * 16000
    for key, value in extra.items():
        setattr(ds, key, value)
    return ds


def test_frontal_chest_is_analysed() -> None:
    assert (
        check_instance(header(BodyPartExamined="CHEST", ViewPosition="PA"), CR, 10**8).verdict
        is Verdict.ANALYSE
    )


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({"ViewPosition": "LL"}, "lateral"),
        ({"BodyPartExamined": "KNEE"}, "body part KNEE"),
        ({"Modality": "CT"}, "modality CT"),
    ],
)
def test_not_analysable_is_accepted_with_reason(extra: dict[str, object], reason: str) -> None:
    check = check_instance(header(**extra), CR, 10**8)
    assert check.verdict is Verdict.NOT_ANALYSABLE
    assert reason in check.reason
    assert check.status == dimse_status.SUCCESS


def test_missing_pixel_data_is_refused() -> None:
    ds = header()
    del ds.PixelData
    check = check_instance(ds, CR, 10**8)
    assert (check.verdict, check.status) == (Verdict.REFUSE, dimse_status.DATASET_MISMATCH)


def test_absurd_dimensions_are_refused() -> None:
    check = check_instance(header(Rows=60000, Columns=60000), CR, 10**8)
    assert check.verdict is Verdict.REFUSE and "60000x60000" in check.reason


def test_sop_class_must_match_the_negotiated_one() -> None:
    check = check_instance(header(), SecondaryCaptureImageStorage, 10**8)
    assert check.verdict is Verdict.REFUSE and check.status == dimse_status.DATASET_MISMATCH


def test_missing_uid_is_refused() -> None:
    ds = header()
    del ds.StudyInstanceUID
    check = check_instance(ds, CR, 10**8)
    assert check.status == dimse_status.MISSING_ATTRIBUTE and "StudyInstanceUID" in check.reason


def test_a_summary_image_of_a_node_is_not_analysed_again() -> None:
    """A PACS routing the study back sends the node its own summary SC: no loop."""
    sc = SecondaryCaptureImageStorage
    own = header(SOPClassUID=sc, Modality="OT", BodyPartExamined="CHEST", Manufacturer="cxr-node")
    check = check_instance(own, sc, 10**8)
    assert check.verdict is Verdict.NOT_ANALYSABLE and "CXR node" in check.reason
    equipment = Dataset()
    equipment.Manufacturer = "cxr-node"
    forwarded = header(
        SOPClassUID=sc, Modality="OT", Manufacturer="Other PACS", BodyPartExamined="CHEST"
    )
    forwarded.ContributingEquipmentSequence = [equipment]
    assert check_instance(forwarded, sc, 10**8).verdict is Verdict.NOT_ANALYSABLE
    other = header(SOPClassUID=sc, Modality="OT", Manufacturer="Scanner Inc", BodyPartExamined="")
    assert check_instance(other, sc, 10**8).verdict is Verdict.ANALYSE


def colour_header(photometric: str, length: int) -> Dataset:
    ds = header(Modality="DX", SamplesPerPixel=3, BitsAllocated=8)
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = 4, 6
    ds.PixelData = b"\0" * length
    return ds


def test_subsampled_colour_pixel_data_of_the_right_length_is_accepted() -> None:
    # YBR_FULL_422 keeps 2 of every 3 samples: 4 x 6 pixels take 48 bytes, not 72
    check = check_instance(colour_header("YBR_FULL_422", 48), CR, 10**7)
    assert check.verdict is not Verdict.REFUSE, check.reason


@pytest.mark.parametrize(("photometric", "length"), [("YBR_FULL_422", 47), ("RGB", 48)])
def test_colour_pixel_data_shorter_than_declared_is_refused(photometric: str, length: int) -> None:
    check = check_instance(colour_header(photometric, length), CR, 10**7)
    assert check.verdict is Verdict.REFUSE
    assert check.status == dimse_status.DATASET_MISMATCH
    assert f"holds {length} bytes" in check.reason
