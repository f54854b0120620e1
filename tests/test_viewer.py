"""What a reader sees: DCMTK dsr2html renders the SR, headless Chromium (Debian's `chromium`,
no browser download) loads the page, and the finding, the probability and the similar
studies are in the rendered page's text."""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import cv2
import pydicom
import pytest
from pydicom import Dataset
from pydicom.data import get_testdata_file

from dicom_node.results.sr.builder import ReportOptions, build_sr
from tests.conftest import require_tool
from tests.test_report import (
    HOSPITAL_ITEM,
    HOSPITAL_STUDY,
    OUTLINES,
    SIMILAR,
    UIDS,
    make_manifest,
    make_result,
)

pytestmark = pytest.mark.integration

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
)


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    """Run headless Chromium with a fresh profile (no network, no first-run, no sandbox: CI
    runs as root)."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium is not installed (deploy/install-system-deps.sh installs it)")
    profile.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def rendered_dom(html: Path, profile: Path) -> str:
    run = chromium("--dump-dom", html.resolve().as_uri(), profile=profile)
    assert run.returncode == 0 and "<html" in run.stdout.lower(), run.stderr[-2000:]
    return run.stdout


def screenshot(html: Path, png: Path, profile: Path, size: tuple[int, int] = (1100, 2200)) -> Path:
    run = chromium(
        f"--screenshot={png.resolve()}",
        f"--window-size={size[0]},{size[1]}",
        html.resolve().as_uri(),
        profile=profile,
    )
    assert run.returncode == 0 and png.is_file(), run.stderr[-2000:]
    return png


class _Text(HTMLParser):
    """The text a reader sees: element text outside <head>, <style> and <script>."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._hidden = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("head", "style", "script"):
            self._hidden += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in ("head", "style", "script"):
            self._hidden -= 1

    def handle_data(self, data: str) -> None:
        if not self._hidden:
            self.parts.append(data)


def page_text(dom: str) -> str:
    parser = _Text()
    parser.feed(dom)
    return " ".join(" ".join(parser.parts).split())


def dsr2html(sr_path: Path, html: Path) -> Path:
    exe = require_tool("dsr2html")
    run = subprocess.run([exe, str(sr_path), str(html)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return html


def example_sr(path: Path) -> Path:
    """The SR the node writes for the real chest CR: outlines, a hospital and a reference match."""
    chest_cr = get_testdata_file("RG1_UNCI.dcm")
    assert isinstance(chest_cr, str), "pydicom-data is not installed"
    source = pydicom.dcmread(chest_cr, stop_before_pixels=True)
    manifest = make_manifest()
    sr: Dataset = build_sr(
        source,
        make_result(manifest, 0.83),
        manifest,
        [HOSPITAL_ITEM, *SIMILAR[:1]],
        UIDS,
        ReportOptions(),
        OUTLINES,
    )
    sr.save_as(path, enforce_file_format=True)
    return path


def test_sr_rendered_by_dsr2html_shows_the_result_in_chromium(tmp_path: Path) -> None:
    html = dsr2html(example_sr(tmp_path / "sr.dcm"), tmp_path / "sr.html")
    text = page_text(rendered_dom(html, tmp_path / "profile"))
    # the finding and the probability
    assert re.search(r"COVID-19: Present", text), text[:2000]
    assert re.search(r"Probability: 83.0 %", text), text[:2000]
    assert "Not for diagnostic use" in text
    # the similar studies: the earlier hospital study (openable by UID) and its label,
    # and the reference-set item by dataset id
    assert "Most similar studies" in text
    assert "Similar hospital study" in text and HOSPITAL_STUDY in text
    assert "COVID-19 (confirmed)" in text
    assert "Study Date: 2024-04-12" in text
    assert "AI probability at analysis: 91.0 %" in text
    assert "Similar reference-set image" in text and "covidx-00421" in text
    # the lung outlines are there for a viewer to draw
    assert text.count("Image Region") == 2


def test_screenshot_of_the_rendered_sr(tmp_path: Path) -> None:
    html = dsr2html(example_sr(tmp_path / "sr.dcm"), tmp_path / "sr.html")
    png = screenshot(html, tmp_path / "sr.png", tmp_path / "profile")
    image = cv2.imread(str(png), cv2.IMREAD_GRAYSCALE)
    assert image is not None and image.shape == (2200, 1100)
    assert (image < 128).mean() > 0.005  # text was drawn, not a blank page


#: What a reader of the dsr2html page meets first, in this order, after the document header
#: and the observer context (golden: a change of order is a change of what the reader sees).
GOLDEN_ORDER = (
    "Summary: COVID-19: present (probability 0.83, threshold 0.50)",
    "Comment: Not for diagnostic use. Research software; result not verified.",
    "Imaging Measurements",
    "Finding: COVID-19",
    "Probability: 83.0 %",
    "COVID-19: Present",
    'Tracking Identifier = "Lung outline 1"',
    "Image Region: Polyline",
    "Most similar studies",
    "Similar hospital study",
    "Similar reference-set image",
    "Label: COVID-19",
)


def test_golden_rendering_puts_the_finding_first(tmp_path: Path) -> None:
    html = dsr2html(example_sr(tmp_path / "sr.dcm"), tmp_path / "sr.html")
    text = page_text(html.read_text(encoding="utf-8", errors="replace"))
    body = text[text.index("Imaging Measurement Report") :]
    positions = [body.find(item) for item in GOLDEN_ORDER]
    assert -1 not in positions, [i for i, p in zip(GOLDEN_ORDER, positions, strict=True) if p < 0]
    assert positions == sorted(positions), body[:3000]
    # nothing of substance before the finding: only the template's context rows
    before = body[: positions[0]]
    assert "Probability" not in before and "Not for diagnostic use" not in before
