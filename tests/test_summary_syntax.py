"""The summary SC in a compressed transfer syntax (issue 17): each syntax of the setting
builds a valid object from a real chest CR; a DCMTK storescp that accepts the syntax receives
it compressed, one that accepts uncompressed only receives it decompressed - same UIDs, same
pixels - in the same association as an uncompressed object."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import get_args

import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
    SecondaryCaptureImageStorage,
)

from dicom_node.results.delivery import UNCOMPRESSED, as_accepted, requested_contexts, send_files
from dicom_node.results.lungs import lung_outlines
from dicom_node.results.pixels import decode_display
from dicom_node.results.sc.builder import SUMMARY_SYNTAXES, ScOptions, build_sc
from dicom_node.results.sc.render import Summary, render_summary
from dicom_node.settings import Destination, Settings, SummarySyntaxName
from tests.conftest import Peer, _port_open, free_port, require_tool, wait_for
from tests.synthetic import synthetic_cr, write
from tests.test_lungs import two_lungs
from tests.test_report import make_manifest
from tests.test_summary import facts

SERIES = "1.2.826.0.1.3680043.8.498.9902"
SOP = "1.2.826.0.1.3680043.8.498.9902.1"
LOSSLESS: list[SummarySyntaxName] = ["uncompressed", "rle", "jpeg2000-lossless"]


@pytest.fixture(scope="module")
def source(chest_cr: Path) -> Dataset:
    return pydicom.dcmread(chest_cr)


@pytest.fixture(scope="module")
def summary(source: Dataset) -> Summary:
    display = decode_display(source)
    return render_summary(display, lung_outlines(two_lungs(display.shape)), facts())


def summary_file(
    source: Dataset, summary: Summary, syntax: SummarySyntaxName, folder: Path
) -> Path:
    sc = build_sc(source, summary, make_manifest(), SERIES, SOP, ScOptions(syntax=syntax))
    path = folder / f"sc-{syntax}.dcm"
    sc.save_as(path, enforce_file_format=True)
    return path


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(float) - b.astype(float)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def test_the_setting_names_the_builders_syntaxes() -> None:
    assert set(get_args(SummarySyntaxName)) == set(SUMMARY_SYNTAXES)
    assert Settings.model_fields["summary_syntax"].default == "jpeg-baseline"


@pytest.mark.parametrize("syntax", list(SUMMARY_SYNTAXES))
def test_each_syntax_builds_a_valid_summary(
    source: Dataset, summary: Summary, syntax: SummarySyntaxName, tmp_path: Path
) -> None:
    path = summary_file(source, summary, syntax, tmp_path)
    back = pydicom.dcmread(path)
    assert back.file_meta.TransferSyntaxUID == SUMMARY_SYNTAXES[syntax].uid
    assert back.SOPClassUID == SecondaryCaptureImageStorage
    pixels = back.pixel_array  # decoders give RGB whatever the stored colour space
    assert pixels.shape == summary.pixels.shape
    if syntax in LOSSLESS:
        assert np.array_equal(pixels, summary.pixels)
        assert "LossyImageCompression" not in back
    else:
        assert psnr(pixels, summary.pixels) > 30
        assert back.LossyImageCompression == "01"
        assert back.LossyImageCompressionMethod == "ISO_10918_1"
        assert float(back.LossyImageCompressionRatio) > 5
    exe = require_tool("dciodvfy")
    run = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    errors = [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]
    assert errors == []


def test_jpeg_2000_lossless_is_the_smallest_lossless_syntax(
    source: Dataset, summary: Summary, tmp_path: Path
) -> None:
    sizes = {s: summary_file(source, summary, s, tmp_path).stat().st_size for s in LOSSLESS}
    assert sizes["jpeg2000-lossless"] * 4 < sizes["uncompressed"]
    assert sizes["jpeg2000-lossless"] < sizes["rle"] < sizes["uncompressed"]


def test_a_compressed_file_also_brings_the_uncompressed_context(
    source: Dataset, summary: Summary, tmp_path: Path
) -> None:
    sc = pydicom.dcmread(summary_file(source, summary, "jpeg2000-lossless", tmp_path))
    assert requested_contexts([sc]) == [
        (SecondaryCaptureImageStorage, [JPEG2000Lossless]),
        (SecondaryCaptureImageStorage, list(UNCOMPRESSED)),
    ]


def test_decompressed_only_where_the_syntax_was_not_accepted(
    source: Dataset, summary: Summary, tmp_path: Path
) -> None:
    path = summary_file(source, summary, "jpeg2000-lossless", tmp_path)
    own = [(SecondaryCaptureImageStorage, JPEG2000Lossless)]
    kept = as_accepted(pydicom.dcmread(path), own)
    assert kept.file_meta.TransferSyntaxUID == JPEG2000Lossless
    plain = as_accepted(
        pydicom.dcmread(path), [(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)]
    )
    assert plain.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert plain.PhotometricInterpretation == "RGB"
    assert plain.SOPInstanceUID == SOP  # pydicom would make a new one by default
    assert np.array_equal(plain.pixel_array, summary.pixels)
    # a peer that takes neither: left as it is, for send_c_store to refuse
    other = as_accepted(pydicom.dcmread(path), [("1.2.840.10008.5.1.4.1.1.1", JPEG2000Lossless)])
    assert other.file_meta.TransferSyntaxUID == JPEG2000Lossless


@pytest.fixture
def storescp_with() -> Iterator[Callable[[list[str], Path], Peer]]:
    """DCMTK storescp with the given transfer syntax options (none: uncompressed only)."""
    started: list[Peer] = []

    def start(options: list[str], folder: Path) -> Peer:
        exe = require_tool("storescp")
        folder.mkdir()
        port = free_port()
        proc = subprocess.Popen(
            [exe, *options, "--aetitle", "PACS", "--output-directory", str(folder), str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        started.append(Peer("PACS", port, folder, proc))
        wait_for(lambda: _port_open(port), 10, "storescp to listen")
        return started[-1]

    yield start
    for peer in started:
        peer.process.terminate()
        peer.process.wait(timeout=10)


@pytest.mark.integration
@pytest.mark.parametrize(
    ("syntax", "options", "received_syntax"),
    [
        ("jpeg2000-lossless", ["+xa"], JPEG2000Lossless),  # accepts every syntax it knows
        ("jpeg2000-lossless", ["+xv"], JPEG2000Lossless),  # prefers JPEG 2000 lossless
        ("jpeg2000-lossless", [], ExplicitVRLittleEndian),  # default: uncompressed only
        ("jpeg2000-lossless", ["+xr"], ExplicitVRLittleEndian),  # RLE, not JPEG 2000
        ("rle", ["+xr"], RLELossless),
        ("rle", [], ExplicitVRLittleEndian),
        ("jpeg-baseline", ["+xa"], JPEGBaseline8Bit),
        ("jpeg-baseline", [], ExplicitVRLittleEndian),
    ],
)
def test_storescp_receives_the_summary_compressed_or_uncompressed(
    storescp_with: Callable[[list[str], Path], Peer],
    source: Dataset,
    summary: Summary,
    tmp_path: Path,
    syntax: SummarySyntaxName,
    options: list[str],
    received_syntax: str,
) -> None:
    peer = storescp_with(options, tmp_path / "pacs")
    sc_path = summary_file(source, summary, syntax, tmp_path)
    other = write(synthetic_cr(size=64), tmp_path / "cr.dcm")  # uncompressed, same association
    destination = Destination.parse(peer.address)
    assert send_files([other, sc_path], destination, "NODE") == [None, None]

    wait_for(lambda: len(peer.received()) == 2, 10, "both objects in storescp's folder")
    received = {str(ds.SOPClassUID): ds for ds in map(pydicom.dcmread, peer.received())}
    got = received[SecondaryCaptureImageStorage]
    sent = pydicom.dcmread(sc_path)
    assert got.file_meta.TransferSyntaxUID == received_syntax
    for keyword in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
        assert got[keyword].value == sent[keyword].value
    if syntax in LOSSLESS:
        assert np.array_equal(got.pixel_array, sent.pixel_array)
        assert np.array_equal(got.pixel_array, summary.pixels)
    else:
        # decoded by the sender (Pillow's libjpeg-turbo) or the receiver (pydicom's choice):
        # two JPEG decoders, which may differ by rounding
        difference = np.abs(got.pixel_array.astype(int) - sent.pixel_array.astype(int))
        assert difference.mean() < 0.5  # measured 0.06 (max 14, at the outline's red edge)
        quality = psnr(sent.pixel_array, summary.pixels)
        assert psnr(got.pixel_array, summary.pixels) > quality - 0.5  # 36.8 dB both
        assert got.LossyImageCompression == "01"  # decompressed, still marked lossy
