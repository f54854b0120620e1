"""Decode a chest X-ray dataset's pixel data into a uint8 display image (brighter = denser).

The grayscale pipeline of PS3.4 N.2, for the first frame only:

    stored values -> Modality LUT -> VOI LUT -> MONOCHROME1 inversion -> uint8 0..255

- Stored values: decoded by pydicom and the installed pylibjpeg plugins. pydicom masks the
  unused high bits (Bits Stored < Bits Allocated) and sign-extends signed data; we ask for it
  explicitly (`correct_unused_bits=True`) rather than rely on its default.
- Modality LUT: the Modality LUT Sequence if present, else Rescale Slope/Intercept.
- VOI: the VOI LUT Sequence if present, else Window Center/Width (first pair; VOI LUT Function
  LINEAR, LINEAR_EXACT or SIGMOID), else the 0.5..99.5 percentile range of the image. PS3.3
  C.11.2.1.2 makes the VOI LUT Sequence and the window alternatives when both are present and
  leaves the choice to the application: we take the LUT, which on CR/DX is the manufacturer's
  (often non-linear) display curve, as pydicom's `apply_voi_lut(prefer_lut=True)` does.
- Presentation: MONOCHROME1 is inverted. Presentation LUT Shape is not read: in the CR/DX
  image modules it only restates the photometric interpretation (INVERSE for MONOCHROME1).

The LUT lookups and the window are done here, into floats in 0..1, rather than with
`pydicom.pixels.apply_voi_lut`: its windowing outputs the stored-value range (which we would
have to undo), and `apply_voi` indexes with the LUT's output dtype, so an 8-bit VOI LUT with
more than 256 entries wraps (pydicom 3.0.2).

Reading is tolerant: a malformed VOI LUT or window falls back to the next VOI option, an
empty or non-numeric rescale is treated as absent, an unknown VOI LUT Function as LINEAR.
What cannot give a faithful image raises `PixelDecodeError` with a reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal, TypedDict

import numpy as np
from pydicom import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import pixel_array
from pydicom.uid import UID

from dicom_node.logs import describe_failure

DEFAULT_MAX_PIXELS = 100_000_000
"""Largest Rows x Columns accepted: a chest X-ray is at most ~4,300 x 4,300 (18 MP)."""

ROBUST_PERCENTILES = (0.5, 99.5)
"""Display range used when the dataset gives neither a VOI LUT nor a window."""

_MONOCHROME = frozenset({"MONOCHROME1", "MONOCHROME2"})
# Photometric interpretations that pydicom and its plugins decode to RGB.
_COLOUR = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"})
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# ITU-R BT.601 luma weights for R, G, B.
_LUMA = np.array([0.299, 0.587, 0.114])


class DecodeFailure(StrEnum):
    """Why a dataset could not be turned into a display image."""

    NO_PIXEL_DATA = "no_pixel_data"
    UNSUPPORTED_PHOTOMETRIC = "unsupported_photometric"
    BAD_ATTRIBUTES = "bad_attributes"
    TOO_LARGE = "too_large"
    DECODER_FAILURE = "decoder_failure"


class PixelDecodeError(ValueError):
    """The pixel data cannot be decoded into a display image; `reason` says why."""

    def __init__(self, reason: DecodeFailure, message: str) -> None:
        super().__init__(f"{reason.value}: {message}")
        self.reason = reason


class PixelSummary(TypedDict):
    """Image attributes for logs: no patient data."""

    rows: int | None
    cols: int | None
    frames: int | None
    samples_per_pixel: int | None
    bits_allocated: int | None
    bits_stored: int | None
    pixel_representation: int | None
    photometric: str | None
    transfer_syntax: str | None
    transfer_syntax_name: str | None
    voi: Literal["voi_lut", "window", "percentiles"]


@dataclass(frozen=True)
class _Lut:
    """A LUT: input values below `first_mapped` take the first entry, above the end the last."""

    first_mapped: int
    table: np.ndarray  # float64, one entry per input value from first_mapped on

    def apply(self, values: np.ndarray) -> np.ndarray:
        index = np.rint(values - self.first_mapped)
        np.clip(index, 0, self.table.size - 1, out=index)
        mapped: np.ndarray = self.table[index.astype(np.intp)]
        return mapped


@dataclass(frozen=True)
class _Window:
    center: float
    width: float
    function: str  # LINEAR, LINEAR_EXACT or SIGMOID

    def apply(self, values: np.ndarray) -> np.ndarray:
        """PS3.3 C.11.2.1.2 and C.11.2.1.3, with an output range of 0..1."""
        c, w = self.center, self.width
        if self.function == "SIGMOID":
            with np.errstate(over="ignore"):
                return 1.0 / (1.0 + np.exp(-4.0 * (values - c) / w))
        if self.function == "LINEAR_EXACT":
            return np.clip((values - c) / w + 0.5, 0.0, 1.0)
        if w == 1.0:  # LINEAR with the narrowest window is a threshold
            return (values > c - 0.5).astype(np.float64)
        return np.clip((values - (c - 0.5)) / (w - 1.0) + 0.5, 0.0, 1.0)


def decode_display(ds: Dataset, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The first frame of `ds` as a 2-D uint8 display image, brighter = denser.

    Pure: reads `ds`, never modifies it (no cached `pixel_array` is left on it).
    Raises `PixelDecodeError` for anything that prevents a faithful image.
    """
    try:
        return _decode_display(ds, max_pixels)
    except (PixelDecodeError, MemoryError):
        raise
    except Exception as exc:  # a malformed attribute we did not foresee: still a named reason
        # the exception's type and place, not its message: library messages can quote
        # attribute values, and this reason goes to the ledger and the log
        raise PixelDecodeError(
            DecodeFailure.BAD_ATTRIBUTES, f"unexpected {describe_failure(exc)}"
        ) from exc
    except BaseException as exc:
        # Decoders written in Rust (pylibjpeg-rle) turn a panic on a malformed stream into
        # pyo3's PanicException, a BaseException: found by tests/test_fuzz.py.
        if isinstance(exc, KeyboardInterrupt | SystemExit | GeneratorExit):
            raise
        raise PixelDecodeError(
            DecodeFailure.DECODER_FAILURE, f"the decoder failed ({type(exc).__name__})"
        ) from exc


def _decode_display(ds: Dataset, max_pixels: int) -> np.ndarray:
    if not any(ds.get(keyword) for keyword in _PIXEL_KEYWORDS):
        raise PixelDecodeError(DecodeFailure.NO_PIXEL_DATA, "the dataset has no pixel data")
    photometric = photometric_of(ds)
    if photometric not in _MONOCHROME | _COLOUR:
        raise PixelDecodeError(
            DecodeFailure.UNSUPPORTED_PHOTOMETRIC,
            f"photometric interpretation {photometric or '(missing)'!r} is not supported",
        )
    rows, cols = int_attribute(ds, "Rows"), int_attribute(ds, "Columns")
    if rows is None or cols is None or rows <= 0 or cols <= 0:
        raise PixelDecodeError(
            DecodeFailure.BAD_ATTRIBUTES, f"invalid image size: Rows {rows}, Columns {cols}"
        )
    if rows * cols > max_pixels:
        raise PixelDecodeError(
            DecodeFailure.TOO_LARGE,
            f"{rows} x {cols} = {rows * cols / 1e6:.1f} megapixels exceeds the limit of "
            f"{max_pixels / 1e6:g}",
        )

    return display_from_frame(_decode_first_frame(ds), ds)


def display_from_frame(frame: np.ndarray, ds: Dataset) -> np.ndarray:
    """Stored values of a decoded frame of `ds` (whole or reduced in size) -> uint8 display
    image, with `ds`'s Modality LUT, VOI and photometric interpretation."""
    photometric = photometric_of(ds)
    if frame.ndim == 2:
        lut = _display_lut(frame, ds, photometric)
        if lut is not None:
            table, low = lut
            mapped: np.ndarray = table[np.subtract(frame, low, dtype=np.int64)]
            return mapped
    return _to_display(frame, ds, photometric)


def _to_display(frame: np.ndarray, ds: Dataset, photometric: str) -> np.ndarray:
    """Stored values -> uint8 display values, pixel by pixel (any frame)."""
    if frame.ndim == 3:  # colour, or a monochrome dataset with Samples per Pixel > 1
        unit = _colour_to_unit_gray(frame, ds)
    elif frame.ndim == 2:
        unit = _apply_voi(_apply_modality_lut(frame, ds), ds)
    else:
        raise PixelDecodeError(
            DecodeFailure.BAD_ATTRIBUTES, f"decoded frame has unexpected shape {frame.shape}"
        )
    if photometric == "MONOCHROME1":
        unit = 1.0 - unit
    return np.rint(unit * 255.0).astype(np.uint8)


#: Largest span of stored values that `_display_lut` tabulates (a 16-bit image has 65,536).
_LUT_MAX_SPAN = 1 << 17


def _display_lut(frame: np.ndarray, ds: Dataset, photometric: str) -> tuple[np.ndarray, int] | None:
    """The display mapping as a table over the frame's stored values, or None.

    Modality LUT, VOI LUT or window and MONOCHROME1 inversion act on each value alone, so
    running them once per possible stored value (at most 65,536 for 16 bits) and indexing
    gives exactly the per-pixel result, for a fraction of the float work on a 10-megapixel
    radiograph (bench/pipeline.py). The percentile VOI depends on the whole image: no table.
    """
    if frame.dtype.kind not in "iu" or _select_voi(ds) is None:
        return None
    low, high = int(frame.min()), int(frame.max())
    if high - low >= _LUT_MAX_SPAN or high - low + 1 >= frame.size:
        return None
    domain = np.arange(low, high + 1, dtype=np.int64)[None, :]
    return _to_display(domain, ds, photometric)[0], low


def describe_pixels(ds: Dataset) -> PixelSummary:
    """Image pixel attributes and the VOI that `decode_display` would use, for logging."""
    tsyntax = transfer_syntax_of(ds)
    return PixelSummary(
        rows=int_attribute(ds, "Rows"),
        cols=int_attribute(ds, "Columns"),
        frames=int_attribute(ds, "NumberOfFrames"),
        samples_per_pixel=int_attribute(ds, "SamplesPerPixel"),
        bits_allocated=int_attribute(ds, "BitsAllocated"),
        bits_stored=int_attribute(ds, "BitsStored"),
        pixel_representation=int_attribute(ds, "PixelRepresentation"),
        photometric=photometric_of(ds) or None,
        transfer_syntax=str(tsyntax) if tsyntax else None,
        transfer_syntax_name=tsyntax.name if tsyntax else None,
        voi=_voi_source(ds),
    )


def _decode_first_frame(ds: Dataset) -> np.ndarray:
    tsyntax = transfer_syntax_of(ds)
    if tsyntax is None:
        raise PixelDecodeError(
            DecodeFailure.BAD_ATTRIBUTES, "the file meta has no Transfer Syntax UID"
        )
    try:
        # The functional form leaves no cached array on `ds`, unlike `ds.pixel_array`.
        return pixel_array(ds, index=0, correct_unused_bits=True)
    except Exception as exc:  # decoders raise anything from ValueError to RuntimeError
        detail = " ".join(str(exc).split())  # one line: plugin errors come one per line
        raise PixelDecodeError(
            DecodeFailure.DECODER_FAILURE,
            f"cannot decode {tsyntax.name} ({tsyntax}) pixel data: {type(exc).__name__}: {detail}",
        ) from exc


def _apply_modality_lut(frame: np.ndarray, ds: Dataset) -> np.ndarray:
    values = frame.astype(np.float64)
    sequence = ds.get("ModalityLUTSequence")
    if sequence:
        try:
            lut = _parse_lut(
                sequence[0], ds, signed_input=int_attribute(ds, "PixelRepresentation") == 1
            )
        except (TypeError, ValueError) as exc:
            raise PixelDecodeError(
                DecodeFailure.BAD_ATTRIBUTES, f"invalid Modality LUT Sequence: {exc}"
            ) from exc
        return lut.apply(values)
    slope = _first_float(ds, "RescaleSlope")
    intercept = _first_float(ds, "RescaleIntercept")
    if slope is not None and slope != 0.0:
        values *= slope
    if intercept is not None:
        values += intercept
    return values


def _apply_voi(values: np.ndarray, ds: Dataset) -> np.ndarray:
    voi = _select_voi(ds)
    if isinstance(voi, _Lut):
        table = voi.table
        low, high = float(table.min()), float(table.max())
        if high == low:
            return np.zeros_like(values)
        # Scaled by the table's own range, not 2**bits - 1 from the descriptor, which some
        # writers get wrong (a 12-bit curve declared as 16 bits would display nearly black).
        return (voi.apply(values) - low) / (high - low)
    if isinstance(voi, _Window):
        return voi.apply(values)
    low, high = (float(v) for v in np.percentile(values, ROBUST_PERCENTILES))
    if high <= low:
        low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros_like(values)
    return np.clip((values - low) / (high - low), 0.0, 1.0)


def _select_voi(ds: Dataset) -> _Lut | _Window | None:
    """The first usable of: VOI LUT Sequence item 1, first window pair; None = percentiles."""
    sequence = ds.get("VOILUTSequence")
    if sequence:
        # The Modality LUT output, the VOI LUT's input, is signed if it can be negative.
        intercept = _first_float(ds, "RescaleIntercept") or 0.0
        signed = int_attribute(ds, "PixelRepresentation") == 1 or intercept < 0
        try:
            return _parse_lut(sequence[0], ds, signed_input=signed)
        except (TypeError, ValueError):
            pass  # tolerant reading: fall back to the window
    center = _first_float(ds, "WindowCenter")
    width = _first_float(ds, "WindowWidth")
    if center is None or width is None:
        return None
    function = str(ds.get("VOILUTFunction") or "LINEAR").strip().upper()
    if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        function = "LINEAR"
    min_width_ok = width >= 1.0 if function == "LINEAR" else width > 0.0
    if not min_width_ok:  # the standard's lower bound on the width: unusable window
        return None
    return _Window(center, width, function)


def _voi_source(ds: Dataset) -> Literal["voi_lut", "window", "percentiles"]:
    voi = _select_voi(ds)
    if isinstance(voi, _Lut):
        return "voi_lut"
    return "window" if isinstance(voi, _Window) else "percentiles"


def _parse_lut(item: Dataset, ds: Dataset, signed_input: bool) -> _Lut:
    """A Modality or VOI LUT item (PS3.3 C.11.1.1); ValueError or TypeError if unusable."""
    descriptor = item.get("LUTDescriptor")
    if not isinstance(descriptor, MultiValue | list) or len(descriptor) != 3:
        raise ValueError(f"LUT Descriptor must have 3 values, got {descriptor!r}")
    entries, first_mapped, bits = (int(v) for v in descriptor)
    entries = entries or 65536  # 0 means 2**16
    if signed_input and first_mapped >= 2**15:  # US/SS ambiguity: read as unsigned
        first_mapped -= 2**16
    data = item.get("LUTData")
    if data is None:
        raise ValueError("LUT Data is missing")
    if isinstance(data, bytes):  # OW: 16-bit words in the dataset's byte order
        tsyntax = transfer_syntax_of(ds)
        big_endian = tsyntax is not None and tsyntax.is_little_endian is False
        words = np.frombuffer(data[: len(data) // 2 * 2], dtype=">u2" if big_endian else "<u2")
        if bits == 8 and words.size * 2 == entries:  # 8-bit entries packed two per word
            words = words.astype("<u2").view(np.uint8)
        table = words.astype(np.float64)
    else:
        table = np.atleast_1d(np.asarray(data, dtype=np.float64))
    if table.size == 0:
        raise ValueError("LUT Data is empty")
    # Tolerant: use the entries there are when LUT Data is shorter than the descriptor says.
    return _Lut(first_mapped, table[:entries])


def _colour_to_unit_gray(frame: np.ndarray, ds: Dataset) -> np.ndarray:
    channels = frame.shape[2]
    if channels == 3:
        gray = frame.astype(np.float64) @ _LUMA
    elif channels == 1:
        gray = frame[:, :, 0].astype(np.float64)
    else:
        raise PixelDecodeError(
            DecodeFailure.BAD_ATTRIBUTES, f"cannot make gray from {channels} samples per pixel"
        )
    bits = int_attribute(ds, "BitsStored") or 8 * frame.dtype.itemsize
    unit: np.ndarray = np.clip(gray / (2**bits - 1), 0.0, 1.0)
    return unit


def photometric_of(ds: Dataset) -> str:
    return str(ds.get("PhotometricInterpretation") or "").strip().upper()


def transfer_syntax_of(ds: Dataset) -> UID | None:
    file_meta = getattr(ds, "file_meta", None)
    value = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    return UID(str(value)) if value else None


def int_attribute(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    if isinstance(value, MultiValue | list):
        value = value[0] if value else None
    try:
        return int(value) if value is not None and value != "" else None
    except (TypeError, ValueError):
        return None


def _first_float(ds: Dataset, keyword: str) -> float | None:
    """First value of a possibly multi-valued numeric attribute; None if absent or unusable."""
    value = ds.get(keyword)
    if isinstance(value, MultiValue | list):
        value = value[0] if value else None
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
