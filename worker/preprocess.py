"""The one preprocessing function shared by training and serving.

Input: a 2-D display image (uint8, brighter = denser, as decoded by
`dicom_node.results.pixels` or read from a PNG/JPEG). Output: a square uint8 image of
`params.size` pixels. The model input (float normalisation) is `to_model_input`. Its
parameters are stored in the bundle manifest, and the node preprocesses with the parameters
of the bundle it serves.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from pydantic import BaseModel, Field

#: Bumped whenever `preprocess` changes its output; a bundle made for another version is refused.
PREPROCESS_VERSION = 1


class PreprocessParams(BaseModel):
    version: int = PREPROCESS_VERSION
    size: int = Field(default=256, ge=32, le=2048, description="side of the square output")
    crop_dark_threshold: int = Field(default=24, description="a pixel below this is background")
    crop_content_fraction: float = Field(
        default=0.5,
        description="a border row/column is cropped while fewer of its pixels are content",
    )
    crop_max_fraction: float = Field(default=0.25, description="never crop more per side")
    clahe_clip: float = 2.0
    clahe_tile: int = 8
    mean: float = 0.5
    std: float = 0.25


def _content_span(profile: np.ndarray, min_fraction: float, max_crop: int) -> tuple[int, int]:
    """First and last index whose content fraction reaches min_fraction, within max_crop."""
    n = profile.shape[0]
    start = 0
    while start < max_crop and profile[start] < min_fraction:
        start += 1
    stop = n
    while n - stop < max_crop and profile[stop - 1] < min_fraction:
        stop -= 1
    return start, stop


def crop_box(image: np.ndarray, params: PreprocessParams) -> tuple[int, int, int, int]:
    """(row0, row1, col0, col1) of the region `crop_borders` keeps."""
    content = image >= params.crop_dark_threshold
    h, w = image.shape
    r0, r1 = _content_span(
        content.mean(axis=1), params.crop_content_fraction, int(h * params.crop_max_fraction)
    )
    c0, c1 = _content_span(
        content.mean(axis=0), params.crop_content_fraction, int(w * params.crop_max_fraction)
    )
    return r0, r1, c0, c1


def crop_borders(image: np.ndarray, params: PreprocessParams) -> np.ndarray:
    """Remove dark borders and margins that hold only burned-in text or markers."""
    r0, r1, c0, c1 = crop_box(image, params)
    return image[r0:r1, c0:c1]


def _pad_offsets(h: int, w: int) -> tuple[int, int, int]:
    side = max(h, w)
    return side, (side - h) // 2, (side - w) // 2


def pad_square(image: np.ndarray) -> np.ndarray:
    h, w = image.shape
    side, top, left = _pad_offsets(h, w)
    return cv2.copyMakeBorder(
        image, top, side - h - top, left, side - w - left, cv2.BORDER_CONSTANT, value=0
    )


@dataclass(frozen=True)
class Geometry:
    """Where `preprocess` took its output from: crop box and square padding in the input.

    A pixel (column u, row v) of the S x S output has its centre at
    x = c0 - left + (u + 0.5) * side / S - 0.5 (and likewise for rows) in the input image.
    """

    input_shape: tuple[int, int]
    crop: tuple[int, int, int, int]  # row0, row1, col0, col1
    side: int  # of the padded square, in input pixels
    top: int  # padding above the crop
    left: int  # padding left of the crop
    size: int  # output side S

    def output_to_input(self) -> np.ndarray:
        """2 x 3 affine matrix taking output (x, y) to input (x, y), pixel centres at +0.5."""
        scale = self.side / self.size
        r0, _, c0, _ = self.crop
        return np.array(
            [
                [scale, 0.0, c0 - self.left + 0.5 * scale - 0.5],
                [0.0, scale, r0 - self.top + 0.5 * scale - 0.5],
            ]
        )


def preprocess_geometry(image: np.ndarray, params: PreprocessParams) -> Geometry:
    """The crop and pad `preprocess` applies to this display image (gray uint8, 2-D)."""
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale image, got shape {image.shape}")
    r0, r1, c0, c1 = crop_box(image, params)
    side, top, left = _pad_offsets(r1 - r0, c1 - c0)
    return Geometry(
        input_shape=(int(image.shape[0]), int(image.shape[1])),
        crop=(r0, r1, c0, c1),
        side=side,
        top=top,
        left=left,
        size=params.size,
    )


def _gray(image: np.ndarray) -> np.ndarray:
    if image.ndim == 3:
        code = cv2.COLOR_BGR2GRAY if image.shape[2] == 3 else cv2.COLOR_BGRA2GRAY
        image = cv2.cvtColor(image, code)
    if image.ndim != 2 or image.size == 0:
        raise ValueError(f"expected a 2-D grayscale image, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected uint8 display pixels, got {image.dtype}")
    return image


def preprocess(image: np.ndarray, params: PreprocessParams) -> np.ndarray:
    """Display image -> square, resized, contrast-equalised uint8 image of params.size."""
    image = _gray(image)
    square = pad_square(crop_borders(image, params))
    interpolation = cv2.INTER_AREA if square.shape[0] > params.size else cv2.INTER_LINEAR
    resized = cv2.resize(square, (params.size, params.size), interpolation=interpolation)
    clahe = cv2.createCLAHE(
        clipLimit=params.clahe_clip, tileGridSize=(params.clahe_tile, params.clahe_tile)
    )
    return clahe.apply(resized)


def preprocess_mask(mask: np.ndarray, image: np.ndarray, params: PreprocessParams) -> np.ndarray:
    """A label mask of `image` (same rows and columns) through the same crop, pad and resize.

    For training: lung masks aligned with `preprocess(image, params)`. Nearest-neighbour
    resizing keeps the label values; padding is 0 (background); no CLAHE.
    """
    image = _gray(image)
    if mask.shape != image.shape:
        raise ValueError(f"mask shape {mask.shape} differs from the image's {image.shape}")
    r0, r1, c0, c1 = crop_box(image, params)
    square = pad_square(np.ascontiguousarray(mask[r0:r1, c0:c1]))
    return cv2.resize(square, (params.size, params.size), interpolation=cv2.INTER_NEAREST)


def to_model_input(images: np.ndarray, params: PreprocessParams) -> np.ndarray:
    """uint8 [N,H,W] -> normalised float32 [N,1,H,W]."""
    x = images.astype(np.float32) / 255.0
    return ((x - params.mean) / params.std)[:, None, :, :]
