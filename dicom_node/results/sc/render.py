"""The Secondary Capture summary image: what every PACS can show, even one that cannot read SR.

`render_summary` is a pure function: the received X-ray as a display image (windowed by
`dicom_node.results.pixels.decode_display`), the lung outlines on its pixel grid, and the result ->
an RGB picture::

    +--------------------------------------------------------------+
    | AI: COVID-19 PRESENT   probability 0.83 (threshold 0.50)     |  header: finding first,
    | [UNCERTAIN: the ensemble members disagree (0.39 / 0.69)]     |
    | model <name> <version> | analysed <date time> | image <date> |  then who and when,
    | [similar cases: 2 COVID-19, 1 no COVID-19: other pneumonia]  |  what looked alike,
    | [PLUMBING BUNDLE warning]                                    |
    | ---- lung outline (AI segmentation)                          |  and the legend
    +--------------------------------------------------------------+
    |                                                              |
    |        the X-ray, scaled to the summary width,               |
    |        with the lung outline drawn over it                   |
    |                                                              |
    +--------------------------------------------------------------+
    | NOT FOR DIAGNOSTIC USE - research software, not verified     |  footer
    +--------------------------------------------------------------+

Text sits in bands above and below the image, never over the anatomy. Its size is a fixed
fraction of the width (capital letters about 2 % of it: 20 px on the default 1024 px wide
image), so it is legible at 1:1 whatever the summary width.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import cv2
import numpy as np

# Colours are RGB.
_BAND = (24, 24, 24)
_WHITE = (240, 240, 240)
_GRAY = (190, 190, 190)
_PRESENT = (255, 170, 40)  # amber: look at this
_ABSENT = (150, 220, 150)
_OUTLINE = (255, 230, 0)  # yellow lung outline
_WARNING_BAND = (150, 0, 0)
_WARNING = (255, 90, 90)

_FONT = cv2.FONT_HERSHEY_SIMPLEX
_REFERENCE_WIDTH = 1024.0  # text sizes below are for this width and scale with it

NOT_FOR_DIAGNOSTIC_USE = "NOT FOR DIAGNOSTIC USE - research software, not verified by a person"
PLUMBING_TEXT = "PLUMBING BUNDLE: random weights, the score means nothing"


@dataclass(frozen=True)
class SummaryFacts:
    """What the summary says besides the picture."""

    finding_present: bool
    probability: float
    threshold: float
    model_name: str
    model_version: str
    analysed_at: datetime
    image_date: str | None = None  # DICOM DA of the source (content or study date)
    plumbing: bool = False
    #: The members' probabilities when they disagree strongly (`sr.builder.disagreement_text`);
    #: empty when they agree.
    disagreeing_members: tuple[float, ...] = ()
    #: The labels of the similar cases (`dicom_node.results.labels.similar_cases_line`).
    similar_cases: str | None = None


@dataclass(frozen=True)
class Summary:
    """The rendered summary and where its parts are (rows), for callers and tests."""

    pixels: np.ndarray  # uint8 RGB [H, W, 3]
    image_top: int  # first row of the X-ray
    image_bottom: int  # one past its last row
    scale: float  # summary pixels per source pixel


def headline(facts: SummaryFacts) -> str:
    verdict = "PRESENT" if facts.finding_present else "ABSENT"
    return (
        f"AI: COVID-19 {verdict}   probability {facts.probability:.2f} "
        f"(threshold {facts.threshold:.2f})"
    )


def render_summary(
    display: np.ndarray,
    outlines: Sequence[np.ndarray],
    facts: SummaryFacts,
    width: int = 1024,
) -> Summary:
    """Render the summary picture (pure).

    display: 2-D uint8 display image as received (brighter = denser);
    outlines: closed (column, row) polylines in `display`'s DICOM image coordinates.
    """
    if display.ndim != 2 or display.dtype != np.uint8 or display.size == 0:
        raise ValueError(f"expected a 2-D uint8 display image, got {display.dtype} {display.shape}")
    unit = width / _REFERENCE_WIDTH
    scale = width / display.shape[1]
    height = max(1, round(display.shape[0] * scale))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    xray = cv2.resize(display, (width, height), interpolation=interpolation)
    image = np.ascontiguousarray(np.repeat(xray[:, :, None], 3, axis=2))
    thickness = max(2, round(2 * unit))
    for outline in outlines:
        # Outline coordinates are pixel-corner based; cv2 draws at pixel centres.
        points = np.rint(np.asarray(outline) * scale - 0.5).astype(np.int32)
        cv2.polylines(image, [points.reshape(-1, 1, 2)], True, _OUTLINE, thickness, cv2.LINE_AA)

    header = _header(facts, bool(outlines), width, unit)
    footer = _band([_Line(NOT_FOR_DIAGNOSTIC_USE, _WHITE, 0.75)], width, unit, _WARNING_BAND)
    pixels = np.concatenate([header, image, footer], axis=0)
    return Summary(
        pixels=pixels,
        image_top=header.shape[0],
        image_bottom=header.shape[0] + height,
        scale=scale,
    )


def header_lines(facts: SummaryFacts) -> list[str]:
    """The text of the header band, top to bottom (without the outline legend)."""
    return [line.text for line in _header_lines(facts)]


def _header_lines(facts: SummaryFacts) -> list[_Line]:
    colour = _PRESENT if facts.finding_present else _ABSENT
    lines = [_Line(headline(facts), colour, 1.0)]
    if facts.disagreeing_members:
        values = " / ".join(f"{p:.2f}" for p in facts.disagreeing_members)
        lines.append(_Line(f"UNCERTAIN: the ensemble members disagree ({values})", _PRESENT, 0.75))
    when = facts.analysed_at.strftime("%Y-%m-%d %H:%M %Z").strip()
    details = f"model {facts.model_name} {facts.model_version} | analysed {when}"
    if facts.image_date and len(facts.image_date) == 8 and facts.image_date.isdigit():
        d = facts.image_date
        details += f" | image {d[:4]}-{d[4:6]}-{d[6:]}"
    lines.append(_Line(details, _GRAY, 0.7))
    if facts.similar_cases:
        lines.append(_Line(facts.similar_cases, _GRAY, 0.7))
    if facts.plumbing:
        lines.append(_Line(PLUMBING_TEXT, _WARNING, 0.75))
    return lines


def _header(facts: SummaryFacts, has_outline: bool, width: int, unit: float) -> np.ndarray:
    lines = _header_lines(facts)
    sample = round(44 * unit)  # a stroke of the outline colour in front of the legend
    if has_outline:
        lines.append(_Line("lung outline (AI segmentation)", _GRAY, 0.7, indent=sample + 12))
    else:
        lines.append(_Line("lung outline: none found by the segmentation", _GRAY, 0.7))
    band = _band(lines, width, unit, _BAND)
    if has_outline:
        text_h = cv2.getTextSize("A", _FONT, 0.7 * unit, max(1, round(2 * unit)))[0][1]
        y = band.shape[0] - _padding(unit) - text_h // 2
        x0 = _padding(unit)
        cv2.line(band, (x0, y), (x0 + sample, y), _OUTLINE, max(2, round(3 * unit)))
    return band


@dataclass(frozen=True)
class _Line:
    text: str
    colour: tuple[int, int, int]
    size: float  # font scale at the reference width
    indent: int = 0  # pixels


def _padding(unit: float) -> int:
    return max(4, round(14 * unit))


def _band(
    lines: Sequence[_Line], width: int, unit: float, background: tuple[int, int, int]
) -> np.ndarray:
    """A band of `width` holding the lines, each shrunk if needed to fit the width."""
    pad = _padding(unit)
    thickness = max(1, round(2 * unit))
    placed = []
    y = pad
    gap = 0
    for line in lines:
        room = width - 2 * pad - line.indent
        scale = line.size * unit
        (w, h), baseline = cv2.getTextSize(line.text, _FONT, scale, thickness)
        if w > room:
            scale *= room / w
            (w, h), baseline = cv2.getTextSize(line.text, _FONT, scale, thickness)
        y += h
        placed.append((line, scale, y))
        gap = round(0.5 * h)
        y += baseline + gap
    band = np.zeros((y - gap + pad, width, 3), dtype=np.uint8)
    band[:] = background
    for line, scale, baseline_y in placed:
        origin = (pad + line.indent, baseline_y)
        cv2.putText(band, line.text, origin, _FONT, scale, line.colour, thickness, cv2.LINE_AA)
    return band
