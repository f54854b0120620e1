"""The lung mask as DICOM SEG, built for a real chest CR and read back."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.uid import SegmentationStorage

from dicom_node.results.seg.builder import SegOptions, build_seg
from tests.test_lungs import two_lungs
from tests.test_report import make_manifest
from worker.bundle import Manifest

SERIES = "1.2.826.0.1.3680043.8.498.9903"
SOP = "1.2.826.0.1.3680043.8.498.9903.1"


@pytest.fixture(scope="module")
def manifest() -> Manifest:
    return make_manifest()


@pytest.fixture(scope="module")
def source(chest_cr: Path) -> Dataset:
    return pydicom.dcmread(chest_cr, stop_before_pixels=True)


def build(source: Dataset, manifest: Manifest, tmp_path: Path, mask: np.ndarray) -> Path:
    seg = build_seg(source, mask, manifest, SERIES, SOP, SegOptions())
    path = tmp_path / "seg.dcm"
    seg.save_as(path, enforce_file_format=True)
    return path


def test_seg_round_trip(
    source: Dataset,
    manifest: Manifest,
    tmp_path: Path,
) -> None:
    mask = two_lungs((source.Rows, source.Columns))
    path = build(source, manifest, tmp_path, mask)
    seg = hd.seg.segread(path)
    assert seg.SOPClassUID == SegmentationStorage
    assert seg.Modality == "SEG"
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert (seg.SeriesInstanceUID, seg.SOPInstanceUID) == (SERIES, SOP)
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "39607008"
    assert seg.SegmentSequence[0].SegmentAlgorithmType == "AUTOMATIC"
    assert list(seg.PatientOrientation) == list(source.PatientOrientation)
    # the source's zero Pixel Spacing is not carried into the SEG
    shared = seg.SharedFunctionalGroupsSequence[0]
    assert "PixelMeasuresSequence" not in shared
    # one frame, one bit per pixel: the mask as given
    np.testing.assert_array_equal(seg.pixel_array.reshape(mask.shape).astype(bool), mask)


def test_wrong_mask_shape_is_refused(
    source: Dataset,
    manifest: Manifest,
) -> None:
    with pytest.raises(ValueError, match="mask shape"):
        build_seg(source, np.zeros((10, 10), bool), manifest, SERIES, SOP, SegOptions())


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy not installed")
@pytest.mark.parametrize("empty", [False, True])
def test_seg_dciodvfy_reports_no_error(
    source: Dataset,
    manifest: Manifest,
    tmp_path: Path,
    empty: bool,
) -> None:
    shape = (source.Rows, source.Columns)
    mask = np.zeros(shape, bool) if empty else two_lungs(shape)
    path = build(source, manifest, tmp_path, mask)
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    output = run.stdout + run.stderr
    assert "Segmentation" in output
    assert [line for line in output.splitlines() if line.startswith("Error")] == [], output
