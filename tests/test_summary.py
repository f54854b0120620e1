"""The Secondary Capture summary: rendered from a real chest CR, read back as pixels and PNG."""

from __future__ import annotations

import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.uid import SecondaryCaptureImageStorage

from dicom_node.results.lungs import lung_outlines
from dicom_node.results.pixels import decode_display
from dicom_node.results.sc.builder import ScOptions, build_sc
from dicom_node.results.sc.render import (
    _ABSENT,
    _BAND,
    _OUTLINE,
    _PRESENT,
    Summary,
    SummaryFacts,
    render_summary,
)
from tests.test_lungs import two_lungs
from tests.test_report import make_manifest
from worker.bundle import Manifest

SC_UID = SecondaryCaptureImageStorage
SERIES = "1.2.826.0.1.3680043.8.498.9902"
SOP = "1.2.826.0.1.3680043.8.498.9902.1"


@pytest.fixture(scope="module")
def manifest() -> Manifest:
    return make_manifest()


@pytest.fixture(scope="module")
def source(chest_cr: Path) -> Dataset:
    return pydicom.dcmread(chest_cr)


@pytest.fixture(scope="module")
def display(source: Dataset) -> np.ndarray:
    return decode_display(source)


def facts(present: bool = True, probability: float = 0.83, plumbing: bool = False) -> SummaryFacts:
    return SummaryFacts(
        finding_present=present,
        probability=probability,
        threshold=0.5,
        model_name="cxr-covid-ensemble",
        model_version="2024.06.1",
        analysed_at=datetime(2024, 6, 1, 3, 12, tzinfo=UTC),
        image_date="20040826",
        plumbing=plumbing,
    )


def colour_mask(rgb: np.ndarray, colour: tuple[int, int, int], tolerance: int = 40) -> np.ndarray:
    return np.asarray(np.abs(rgb.astype(int) - np.array(colour)).max(axis=2) <= tolerance)


def render(display: np.ndarray, **kwargs: object) -> Summary:
    outlines = lung_outlines(two_lungs(display.shape))
    return render_summary(display, outlines, facts(**kwargs))  # type: ignore[arg-type]


def test_layout_text_bands_around_the_unchanged_xray(display: np.ndarray) -> None:
    summary = render(display)
    pixels = summary.pixels
    assert pixels.dtype == np.uint8 and pixels.shape[2] == 3
    assert pixels.shape[1] == 1024
    height = summary.image_bottom - summary.image_top
    assert height == round(display.shape[0] * 1024 / display.shape[1])
    # the X-ray is the source as displayed (scaled), gray wherever no outline is drawn
    xray = pixels[summary.image_top : summary.image_bottom]
    expected = cv2.resize(display, (1024, height), interpolation=cv2.INTER_AREA)
    gray = (xray[:, :, 0] == xray[:, :, 1]) & (xray[:, :, 1] == xray[:, :, 2])
    assert gray.mean() > 0.97
    assert np.abs(xray[:, :, 0].astype(int) - expected)[gray].max() == 0
    # text bands above and below hold text: many bright pixels on a dark or red ground
    header, footer = pixels[: summary.image_top], pixels[summary.image_bottom :]
    assert header.shape[0] >= 80 and footer.shape[0] >= 30
    assert (header.max(axis=2) > 150).mean() > 0.02
    assert colour_mask(footer, (150, 0, 0), 10).mean() > 0.5  # red "not for diagnostic use"
    assert (footer.min(axis=2) > 180).mean() > 0.02  # white letters on it


def test_lung_outline_is_drawn_on_the_lungs(display: np.ndarray) -> None:
    mask = two_lungs(display.shape)
    summary = render_summary(display, lung_outlines(mask), facts())
    xray = summary.pixels[summary.image_top : summary.image_bottom]
    outline = colour_mask(xray, _OUTLINE)
    assert outline.sum() > 2000
    # the outline runs along the mask's edge (scaled to the summary)
    small = cv2.resize(mask.astype(np.uint8), (xray.shape[1], xray.shape[0])) > 0
    edge = cv2.morphologyEx(small.astype(np.uint8), cv2.MORPH_GRADIENT, np.ones((7, 7))) > 0
    assert (outline & edge).sum() / outline.sum() > 0.9
    # and the legend shows its colour
    assert colour_mask(summary.pixels[: summary.image_top], _OUTLINE).sum() > 50

    bare = render_summary(display, [], facts())
    assert colour_mask(bare.pixels[bare.image_top : bare.image_bottom], _OUTLINE).sum() == 0


def test_finding_colour_and_text_follow_the_result(display: np.ndarray) -> None:
    present = render(display, present=True)
    absent = render(display, present=False, probability=0.12)
    assert colour_mask(present.pixels[: present.image_top], _PRESENT, 20).sum() > 300
    assert colour_mask(absent.pixels[: absent.image_top], _ABSENT, 20).sum() > 300
    assert colour_mask(absent.pixels[: absent.image_top], _PRESENT, 20).sum() == 0


def test_plumbing_warning_adds_a_red_line(display: np.ndarray) -> None:
    plain = render(display)
    plumbing = render(display, plumbing=True)
    assert plumbing.image_top > plain.image_top
    assert colour_mask(plumbing.pixels[: plumbing.image_top], (255, 90, 90), 30).sum() > 300


@pytest.mark.parametrize("width", [1024, 2048, 640])
def test_text_is_legible_at_one_to_one(display: np.ndarray, width: int) -> None:
    """Headline letters at least 2 % of the width tall: 20 px on a 1024 px image."""
    summary = render_summary(display, [], facts(), width=width)
    header = summary.pixels[: summary.image_top]
    rows = np.flatnonzero(colour_mask(header, _PRESENT, 20).any(axis=1))
    assert rows.size
    # the headline is one line: its rows are contiguous and as tall as a capital letter
    cap_height = rows.max() - rows.min() + 1
    assert cap_height >= 0.02 * width
    assert summary.pixels.shape[1] == width


def build(source: Dataset, display: np.ndarray, manifest: Manifest, tmp_path: Path) -> Dataset:
    summary = render(display)
    sc = build_sc(source, summary, manifest, SERIES, SOP, ScOptions())
    path = tmp_path / "sc.dcm"
    sc.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path)


def test_sc_same_study_new_series_source_referenced(
    source: Dataset,
    display: np.ndarray,
    manifest: Manifest,
    tmp_path: Path,
) -> None:
    sc = build(source, display, manifest, tmp_path)
    assert sc.SOPClassUID == SC_UID
    assert sc.StudyInstanceUID == source.StudyInstanceUID
    assert (sc.SeriesInstanceUID, sc.SOPInstanceUID) == (SERIES, SOP)
    assert sc.PatientID == source.PatientID and sc.PatientName == source.PatientName
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert sc.BurnedInAnnotation == "YES"
    assert sc.ConversionType == "WSD"
    assert list(sc.PatientOrientation) == list(source.PatientOrientation)
    assert "not diagnostic" in sc.SeriesDescription
    assert sc.SoftwareVersions == manifest.version
    assert sc.PhotometricInterpretation == "RGB"
    np.testing.assert_array_equal(sc.pixel_array, render(display).pixels)


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy not installed")
def test_sc_dciodvfy_reports_no_error(
    source: Dataset,
    display: np.ndarray,
    manifest: Manifest,
    tmp_path: Path,
) -> None:
    build(source, display, manifest, tmp_path)
    run = subprocess.run(["dciodvfy", str(tmp_path / "sc.dcm")], capture_output=True, text=True)
    output = run.stdout + run.stderr
    assert "SCImage" in output
    assert [line for line in output.splitlines() if line.startswith("Error")] == [], output


def test_sc_pixel_data_as_png_shows_overlay_and_text(
    source: Dataset,
    display: np.ndarray,
    manifest: Manifest,
    tmp_path: Path,
) -> None:
    """What a PACS displays: the SC's own pixel data, written out as a PNG and read back."""
    sc = build(source, display, manifest, tmp_path)
    path = tmp_path / "summary.png"
    assert cv2.imwrite(str(path), cv2.cvtColor(sc.pixel_array, cv2.COLOR_RGB2BGR))
    written = cv2.imread(str(path))
    assert written is not None
    png = cv2.cvtColor(written, cv2.COLOR_BGR2RGB)
    assert png.shape == (sc.Rows, sc.Columns, 3)
    # find the parts from the picture alone: the X-ray rows have no band colour in them
    in_bands = colour_mask(png, _BAND, 0) | colour_mask(png, (150, 0, 0), 0)
    xray_rows = np.flatnonzero(in_bands.mean(axis=1) < 0.05)
    top, bottom = int(xray_rows[0]), int(xray_rows[-1]) + 1
    assert bottom - top == xray_rows.size  # one block
    header, xray, footer = png[:top], png[top:bottom], png[bottom:]
    assert header.shape[0] > 80 and footer.shape[0] > 30
    assert colour_mask(header, _PRESENT, 20).sum() > 300  # the finding line
    assert (header.max(axis=2) > 150).mean() > 0.02  # more lines of text
    assert colour_mask(footer, (150, 0, 0), 10).mean() > 0.5  # red warning band
    assert (footer.min(axis=2) > 180).mean() > 0.02  # with white text
    # the overlay: the lung outline drawn in yellow over the X-ray
    assert colour_mask(xray, _OUTLINE).sum() > 2000


def test_disagreeing_members_are_said_under_the_finding(display: np.ndarray) -> None:
    from dataclasses import replace

    from dicom_node.results.sc.render import header_lines

    agreeing = header_lines(facts())
    assert not any("UNCERTAIN" in line for line in agreeing)
    uncertain = replace(facts(probability=0.53), disagreeing_members=(0.39, 0.69, 0.50))
    lines = header_lines(uncertain)
    assert lines[0].startswith("AI: COVID-19 PRESENT")
    assert lines[1] == "UNCERTAIN: the ensemble members disagree (0.39 / 0.69 / 0.50)"
    # one more line of text: the header band grows, the X-ray is not covered
    taller = render_summary(display, [], uncertain)
    assert taller.image_top > render_summary(display, [], facts(probability=0.53)).image_top


def test_similar_cases_line_under_the_details(display: np.ndarray) -> None:
    from dataclasses import replace

    from dicom_node.results.sc.render import header_lines

    line = "similar cases: 2 COVID-19, 1 no COVID-19: other pneumonia, 1 no finding"
    lines = header_lines(replace(facts(), similar_cases=line))
    assert lines[0].startswith("AI: COVID-19 PRESENT") and lines[2] == line
    assert not any("similar" in text for text in header_lines(facts()))
