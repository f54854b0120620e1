"""A display image and where its pixels lie on the received image's pixel grid.

`dicom_node.results.reduced_decode` may decode a JPEG 2000 or JPEG baseline image at a
fraction of its size (1/2, 1/4, ...): the display image then has fewer pixels than the
source's Rows x Columns, and whatever refers to the source's grid (the SR's outline
coordinates, the SEG mask, the input gate's size check) is mapped back with `SourceGrid`.

Display pixel u (0-based) has its centre at source pixel index ``u * scale + offset``:

- JPEG DCT scaling averages each ``scale x scale`` block: its centre, ``offset = (scale - 1) / 2``.
- A JPEG 2000 resolution level is the wavelet low-pass band, whose sample u sits on the
  even source sample ``u * scale``: ``offset = 0``.

In DICOM image coordinates ((0, 0) is the top left corner of the top left pixel, a pixel's
centre at +0.5: `dicom_node.results.lungs`), ``x_source = x_display * scale + shift`` with
``shift = offset + 0.5 - scale / 2`` (0 for DCT scaling). Pure: arrays in, arrays out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SourceGrid:
    """How a display image's pixels map onto the source's pixel grid (the same both axes)."""

    source_shape: tuple[int, int]  # Rows, Columns of the received image
    scale: int = 1  # source pixels per display pixel, per axis
    offset: float = 0.0  # source pixel index of display pixel 0's centre

    @property
    def reduced(self) -> bool:
        return self.scale != 1 or self.offset != 0.0

    @property
    def shift(self) -> float:
        """x_source = x_display * scale + shift, in DICOM image coordinates."""
        return self.offset + 0.5 - self.scale / 2

    def to_source(self) -> np.ndarray:
        """2 x 3 affine matrix from display to source pixel indices (OpenCV's convention)."""
        s, c = float(self.scale), self.offset
        return np.array([[s, 0.0, c], [0.0, s, c]])

    def points_to_source(self, points: np.ndarray) -> np.ndarray:
        """(column, row) DICOM image coordinates on the display image -> on the source."""
        return np.asarray(points, dtype=np.float64) * self.scale + self.shift

    def points_to_display(self, points: np.ndarray) -> np.ndarray:
        """(column, row) DICOM image coordinates on the source -> on the display image."""
        return (np.asarray(points, dtype=np.float64) - self.shift) / self.scale

    def source_span(self, start: int, stop: int, axis: int) -> tuple[int, int]:
        """The source indices whose centres fall in display pixels start..stop-1 (a crop box
        side on the display image), along `axis` (0: rows, 1: columns)."""
        n = self.source_shape[axis]
        side = -(-n // self.scale)  # the display image's side

        def edge(u: int) -> int:  # first source pixel whose centre is past display edge u
            if u >= side:  # the far edge: the source pixels past the last display pixel too
                return n
            return min(max(math.ceil((u - 0.5) * self.scale + self.offset), 0), n)

        return edge(start), edge(stop)


@dataclass(frozen=True)
class Display:
    """The uint8 display image (brighter = denser) and its place on the source's grid."""

    image: np.ndarray
    grid: SourceGrid

    @classmethod
    def full(cls, image: np.ndarray) -> Display:
        """A display image decoded at the source's own size."""
        rows, cols = image.shape[:2]
        return cls(image, SourceGrid((int(rows), int(cols))))

    @property
    def nbytes(self) -> int:
        return int(self.image.nbytes)
