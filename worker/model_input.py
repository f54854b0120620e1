"""The assembly of model inputs, shared by serving (`worker.inference`) and training.

numpy + OpenCV only (no onnxruntime, no torch), so that training imports exactly the code the
worker runs without needing the inference runtime.
"""

from __future__ import annotations

import cv2
import numpy as np

#: Channel order of every ensemble member's input. Part of the bundle contract.
MEMBER_CHANNELS: tuple[str, str, str] = ("image", "lung", "zeros")


def resize_batch(x: np.ndarray, size: int) -> np.ndarray:
    """float32 [N,C,H,W] -> [N,C,size,size] (area when shrinking, bilinear when enlarging)."""
    n, c, h, w = x.shape
    if (h, w) == (size, size):
        return x
    interpolation = cv2.INTER_AREA if size < min(h, w) else cv2.INTER_LINEAR
    out = np.empty((n, c, size, size), dtype=np.float32)
    for i in range(n):
        for j in range(c):
            out[i, j] = cv2.resize(x[i, j], (size, size), interpolation=interpolation)
    return out


#: A lung is where the segmentation's probability is at least this (the lung crop, and the
#: outlines of the SR, SC and SEG: `dicom_node.results.lungs`).
LUNG_THRESHOLD = 0.5
#: Below this share of lung pixels the U-Net found no lungs: the member sees the whole image.
MIN_LUNG_FRACTION = 0.02


def _lungs_found(lung: np.ndarray) -> np.ndarray | None:
    """The pixels >= LUNG_THRESHOLD of a [H,W] probability map, or None when they cover less
    than MIN_LUNG_FRACTION of it (the U-Net found no lungs)."""
    inside = lung >= LUNG_THRESHOLD
    return None if inside.mean() < MIN_LUNG_FRACTION else inside


def lung_box(lung: np.ndarray, margin: float) -> tuple[int, int, int, int] | None:
    """(row0, row1, col0, col1) of the square around the lungs of a [H,W] probability map.

    The box around the pixels >= LUNG_THRESHOLD is grown by `margin` of its size on each side,
    made square around its centre (the member sees the lungs undistorted) and moved inside the
    map; None when the lungs cover less than MIN_LUNG_FRACTION of the map.
    """
    h, w = lung.shape
    inside = _lungs_found(lung)
    if inside is None:
        return None
    rows = np.flatnonzero(inside.any(axis=1))
    cols = np.flatnonzero(inside.any(axis=0))
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    side = min(round(max(r1 - r0, c1 - c0) * (1.0 + 2.0 * margin)), h, w)
    top = min(max(round((r0 + r1 - side) / 2), 0), h - side)
    left = min(max(round((c0 + c1 - side) / 2), 0), w - side)
    return top, top + side, left, left + side


def _crop_to_lungs(
    image: np.ndarray, lung: np.ndarray, size: int, margin: float
) -> tuple[np.ndarray, np.ndarray]:
    """image [N,1,S,S], lung [N,1,S',S'] -> both cut to each image's lung box, [N,1,size,size]."""
    side = image.shape[2]
    lung = resize_batch(lung, side)
    out_image = np.empty((len(image), 1, size, size), dtype=np.float32)
    out_lung = np.empty_like(out_image)
    for i in range(len(image)):
        box = lung_box(lung[i, 0], margin)
        r0, r1, c0, c1 = (0, side, 0, side) if box is None else box
        pair = np.stack([image[i, 0, r0:r1, c0:c1], lung[i, 0, r0:r1, c0:c1]])[None]
        small = resize_batch(np.ascontiguousarray(pair), size)[0]
        out_image[i, 0], out_lung[i, 0] = small[0], small[1]
    return out_image, out_lung


def lung_weight(lung: np.ndarray, dilation: float) -> np.ndarray | None:
    """1 on the lungs of a [H,W] probability map grown by `dilation` of its side, 0 elsewhere;
    None when the lungs cover less than MIN_LUNG_FRACTION (nothing to keep)."""
    inside = _lungs_found(lung)
    if inside is None:
        return None
    radius = round(dilation * lung.shape[0])
    if radius < 1:
        return inside.astype(np.float32)
    disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    return cv2.dilate(inside.astype(np.uint8), disk).astype(np.float32)


def _mask_to_lungs(image: np.ndarray, lung: np.ndarray, dilation: float) -> np.ndarray:
    """image [N,1,s,s] with everything off the (grown) lungs set to 0, the normalised mean
    gray; an image whose lungs the U-Net did not find is left whole."""
    out = image.copy()
    for i in range(len(image)):
        weight = lung_weight(lung[i, 0], dilation)
        if weight is not None:
            out[i, 0] *= weight
    return out


def member_input(
    image: np.ndarray,
    lung: np.ndarray,
    size: int,
    lung_crop: float | None = None,
    lung_mask: float | None = None,
) -> np.ndarray:
    """Normalised image [N,1,S,S] + lung probability [N,1,S',S'] -> member input [N,3,size,size].

    `lung_crop`: None, the whole image; a margin (fraction of the lung box per side), the
    square around the lungs found by the U-Net (`lung_box`), so that the member does not see
    the borders, markers and burned-in text where the source of an image shows.
    `lung_mask`: None, nothing masked; a dilation (fraction of the input side), the image
    outside the U-Net's lungs grown by it is set to the mean gray (`lung_weight`): the member
    sees the lungs and their edges only.
    """
    image = image.astype(np.float32, copy=False)
    lung = lung.astype(np.float32, copy=False)
    if lung_crop is None:
        image, lung = resize_batch(image, size), resize_batch(lung, size)
    else:
        image, lung = _crop_to_lungs(image, lung, size, lung_crop)
    if lung_mask is not None:
        image = _mask_to_lungs(image, lung, lung_mask)
    zeros = np.zeros_like(image)
    return np.ascontiguousarray(np.concatenate([image, lung, zeros], axis=1))
