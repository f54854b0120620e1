"""Decode a JPEG 2000 or JPEG baseline radiograph directly at a reduced size (issue 17).

The node never needs a radiograph at full resolution: the model input is a few hundred
pixels (the bundle's preprocessing) and the summary image `summary_width` (1024) wide. JPEG
2000 stores resolution levels (level r is the wavelet low-pass band, ceil(N / 2**r) a side)
and JPEG baseline can scale its inverse DCT by 1/2, 1/4, 1/8, so decoding at the size used
costs a fraction of a full decode (a 1955 x 1841 lossless JPEG 2000 CR: bench/decode_at_size.py).

Pillow decodes them (its wheel bundles OpenJPEG and libjpeg-turbo): JPEG 2000 with its
`reduce` level, JPEG with `draft`. Only what is safe to take this way: the first frame of a
MONOCHROME1/2 image, Samples per Pixel 1, unsigned, Bits Stored <= 16 (and equal to the
JPEG 2000 codestream's precision), JPEG 2000 (.90, .91) or JPEG baseline (.50). Everything
else, an image too small to reduce, and any failure or unexpected decoded shape or mode get
the full decode of `dicom_node.results.pixels.decode_display`, as before.

The level: the largest that keeps the display image at least `SUMMARY_FRACTION` of the
summary width wide (the summary scales it up by at most 1 / 0.85 = 1.18: the summary is an
overview, sent lossy by default) and its shorter side at least `MODEL_MARGIN` times the
largest model input (preprocessing crops borders before resizing to the input size: a
margin of 2 leaves the resize a downsampling). A 1841 px wide CR: level 1 (921 px).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from io import BytesIO
from typing import Literal

import numpy as np
from PIL import Image, Jpeg2KImagePlugin, JpegImagePlugin
from pydicom import Dataset
from pydicom.encaps import get_frame
from pydicom.pixels.utils import get_j2k_parameters
from pydicom.uid import JPEG2000, JPEG2000Lossless, JPEGBaseline8Bit

from dicom_node.logs import describe_failure
from dicom_node.results.display import Display, SourceGrid
from dicom_node.results.pixels import (
    DEFAULT_MAX_PIXELS,
    decode_display,
    display_from_frame,
    int_attribute,
    photometric_of,
    transfer_syntax_of,
)
from worker.bundle import Manifest

log = logging.getLogger(__name__)

#: The display image at least this fraction of the summary image's width.
SUMMARY_FRACTION = 0.85
#: The display image's shorter side at least this many times the largest model input.
MODEL_MARGIN = 2
#: libjpeg's DCT scaling: 1/2, 1/4, 1/8.
JPEG_MAX_LEVEL = 3
#: Levels tried on a JPEG 2000 codestream; one with fewer resolution levels than asked for
#: fails to decode and gets the full decode (level 3 already needs a 7,000 px wide image).
J2K_MAX_LEVEL = 5

Codec = Literal["jpeg2000", "jpeg"]
_CODECS: dict[str, Codec] = {
    JPEG2000Lossless: "jpeg2000",
    JPEG2000: "jpeg2000",
    JPEGBaseline8Bit: "jpeg",
}


class NotReduced(Exception):
    """This image is not decoded at a reduced size; the message says why (no patient data)."""


@dataclass(frozen=True)
class TargetSize:
    """The smallest display image the node's outputs need."""

    min_width: int
    min_side: int

    @classmethod
    def for_bundle(cls, manifest: Manifest, summary_width: int) -> TargetSize:
        return cls(
            min_width=math.ceil(SUMMARY_FRACTION * summary_width),
            min_side=MODEL_MARGIN * largest_input(manifest),
        )


def largest_input(manifest: Manifest) -> int:
    """The largest image side any of the bundle's networks takes."""
    sizes = [
        manifest.preprocessing.size,
        manifest.segmentation.input_size,
        *(member.input_size for member in manifest.members),
    ]
    if manifest.gate is not None:
        sizes.append(manifest.gate.ood.input_size)
    return max(sizes)


def reduced_side(n: int, level: int) -> int:
    """A side of resolution level `level` (JPEG 2000) or DCT scale 1 / 2**level (JPEG)."""
    return -(-n // (1 << level))


def reduction_level(rows: int, cols: int, target: TargetSize, max_level: int) -> int:
    """The largest level <= max_level whose image still meets `target`; 0: decode in full."""
    level = 0
    while level < max_level:
        h, w = reduced_side(rows, level + 1), reduced_side(cols, level + 1)
        if w < target.min_width or min(h, w) < target.min_side:
            break
        level += 1
    return level


def decode_display_at(
    ds: Dataset, target: TargetSize | None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Display:
    """The first frame of `ds` as a display image, at a reduced size when `target` allows
    it and the image is one `decode_reduced` takes; else `decode_display`'s full decode
    (which raises `PixelDecodeError` for what cannot be shown). Never modifies `ds`."""
    if target is not None:
        try:
            return decode_reduced(ds, target, max_pixels)
        except NotReduced as exc:
            log.debug("full-size decode: %s", exc)
        except Exception as exc:  # anything Pillow or pydicom raise: the full decode decides
            log.debug("full-size decode: reduced decode failed: %s", describe_failure(exc))
    return Display.full(decode_display(ds, max_pixels))


def decode_reduced(ds: Dataset, target: TargetSize, max_pixels: int) -> Display:
    """`ds`'s first frame decoded at the reduction level `target` allows; `NotReduced` for
    an image that is not taken this way or needs no reduction."""
    codec = eligible_codec(ds, max_pixels)
    rows, cols = int(ds.Rows), int(ds.Columns)
    max_level = J2K_MAX_LEVEL if codec == "jpeg2000" else JPEG_MAX_LEVEL
    level = reduction_level(rows, cols, target, max_level)
    if codec == "jpeg2000":
        level = _pillow_j2k_level(rows, cols, level)
    if level == 0:
        raise NotReduced(f"{rows} x {cols} is not larger than needed")
    data = _first_frame(ds)
    bits_stored = int_attribute(ds, "BitsStored") or 0
    if codec == "jpeg2000":
        frame = _decode_jpeg2000(data, level, (rows, cols), bits_stored)
        offset = 0.0  # the low-pass band sits on the even samples
    else:
        frame = _decode_jpeg(data, level, (rows, cols))
        offset = (2**level - 1) / 2  # the DCT scales each block to its mean
    expected = (reduced_side(rows, level), reduced_side(cols, level))
    if frame.shape != expected:
        raise NotReduced(f"decoded shape {frame.shape}, expected {expected}")
    image = display_from_frame(frame, ds)
    return Display(image, SourceGrid((rows, cols), scale=2**level, offset=offset))


def eligible_codec(ds: Dataset, max_pixels: int) -> Codec:
    """The codec of a dataset that can be decoded at a reduced size; `NotReduced` if none."""
    tsyntax = transfer_syntax_of(ds)
    codec = _CODECS.get(str(tsyntax)) if tsyntax is not None else None
    if codec is None:
        raise NotReduced(f"transfer syntax {tsyntax} is not JPEG 2000 or JPEG baseline")
    if "PixelData" not in ds:
        raise NotReduced("no Pixel Data")
    photometric = photometric_of(ds)
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise NotReduced(f"photometric interpretation {photometric or '(missing)'}")
    samples, representation = (
        int_attribute(ds, "SamplesPerPixel"),
        int_attribute(ds, "PixelRepresentation"),
    )
    if samples != 1 or representation != 0:
        raise NotReduced(f"samples per pixel {samples}, pixel representation {representation}")
    allocated, stored = int_attribute(ds, "BitsAllocated"), int_attribute(ds, "BitsStored")
    wanted = (8,) if codec == "jpeg" else (8, 16)
    if (
        allocated is None
        or allocated not in wanted
        or stored is None
        or not 1 <= stored <= allocated
    ):
        raise NotReduced(f"bits allocated {allocated}, bits stored {stored}")
    if codec == "jpeg" and stored != 8:
        raise NotReduced(f"JPEG baseline with bits stored {stored}")
    rows, cols = int_attribute(ds, "Rows"), int_attribute(ds, "Columns")
    if rows is None or cols is None or rows <= 0 or cols <= 0 or rows * cols > max_pixels:
        raise NotReduced("image size out of range")  # decode_display says why
    return codec


def _pillow_j2k_level(rows: int, cols: int, level: int) -> int:
    """The level lowered until Pillow's size of the reduced image (rounded to nearest)
    is OpenJPEG's (rounded up); level 1 always agrees."""
    while level > 1 and any(
        (n + 2 ** (level - 1)) // 2**level != reduced_side(n, level) for n in (rows, cols)
    ):
        level -= 1
    return level


def _first_frame(ds: Dataset) -> bytes:
    frames = int_attribute(ds, "NumberOfFrames") or 1
    extended = None
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        extended = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    return get_frame(ds.PixelData, 0, number_of_frames=frames, extended_offsets=extended)


def _decode_jpeg2000(
    codestream: bytes, level: int, shape: tuple[int, int], bits_stored: int
) -> np.ndarray:
    params = get_j2k_parameters(codestream)
    precision = params.get("precision")
    if params.get("is_signed") or precision != bits_stored:
        raise NotReduced(f"JPEG 2000 precision {precision} is not bits stored {bits_stored}")
    with Image.open(BytesIO(codestream), formats=["JPEG2000"]) as im:
        if not isinstance(im, Jpeg2KImagePlugin.Jpeg2KImageFile):
            raise NotReduced("not a JPEG 2000 codestream")
        if im.mode not in ("L", "I;16") or im.size != (shape[1], shape[0]):
            raise NotReduced(f"JPEG 2000 codestream of mode {im.mode}, size {im.size}")
        im.reduce = level
        im.load()
        mode = im.mode
        array = np.asarray(im)
    # Pillow scales a precision below the mode's bits up to them (a 12-bit sample << 4 in
    # I;16): undo it, and take nothing that was not scaled as expected.
    shift = (8 if mode == "L" else 16) - int(precision)
    if shift > 0:
        if np.any(array & ((1 << shift) - 1)):
            raise NotReduced("Pillow's JPEG 2000 samples are not scaled as expected")
        array = array >> shift
    return array


def _decode_jpeg(data: bytes, level: int, shape: tuple[int, int]) -> np.ndarray:
    with Image.open(BytesIO(data), formats=["JPEG"]) as im:
        if not isinstance(im, JpegImagePlugin.JpegImageFile):
            raise NotReduced("not a JPEG stream")
        if im.mode != "L" or im.size != (shape[1], shape[0]):
            raise NotReduced(f"JPEG stream of mode {im.mode}, size {im.size}")
        scale = 2**level
        im.draft("L", (shape[1] // scale, shape[0] // scale))
        im.load()
        return np.asarray(im)
