"""The worker's lung probability map, brought back onto the received image.

The worker segments the preprocessed S x S image; the radiologist looks at the image as
received. `lung_map_on_image` undoes the preprocessing geometry (crop, square pad, resize:
`worker.preprocess.preprocess_geometry`), and the display image's place on the source grid
when it was decoded at a reduced size (`dicom_node.results.display.SourceGrid`), so the map
lies on the source pixel grid; `lung_outlines` turns the thresholded map into closed
polylines in DICOM image coordinates (column, row; (0, 0) is the top left corner of the top
left pixel, so a pixel's centre is at +0.5), which the SR's SCOORD items and the SEG use
(the summary image maps them onto its display image).

Pure functions: arrays in, arrays out.
"""

from __future__ import annotations

import cv2
import numpy as np

from dicom_node.results.display import SourceGrid
from worker.model_input import LUNG_THRESHOLD
from worker.preprocess import Geometry

#: Regions smaller than this fraction of the image are specks, not lungs.
MIN_REGION_FRACTION = 0.005
#: Two lungs; a segmentation that merges them gives one region.
MAX_REGIONS = 2
#: Cap on the points of one outline (SR size, viewer speed); simplification keeps the shape.
MAX_POINTS = 200


def lung_map_on_image(
    lung_map: np.ndarray, geometry: Geometry, grid: SourceGrid | None = None
) -> np.ndarray:
    """The S x S lung map (uint8 0..255 or float 0..1) as float32 0..1 on the source grid:
    preprocessing's input grid, or the source's `grid.source_shape` when preprocessing's input
    was a display image decoded at a reduced size (one warp, no second resampling).

    Outside the region preprocessing kept (cropped borders, padding) the map is 0.
    """
    if lung_map.ndim != 2 or lung_map.shape != (geometry.size, geometry.size):
        raise ValueError(
            f"lung map of shape {lung_map.shape} does not match the preprocessing size "
            f"{geometry.size}"
        )
    values = lung_map.astype(np.float32)
    if lung_map.dtype == np.uint8:
        values /= 255.0
    to_input = geometry.output_to_input()
    r0, r1, c0, c1 = geometry.crop
    if grid is None:
        rows, cols = geometry.input_shape
        matrix = to_input
    else:  # output -> display -> source
        rows, cols = grid.source_shape
        to_source = grid.to_source()
        matrix = to_source[:, :2] @ to_input
        matrix[:, 2] += to_source[:, 2]
        r0, r1 = grid.source_span(r0, r1, axis=0)
        c0, c1 = grid.source_span(c0, c1, axis=1)
    warped = cv2.warpAffine(
        values,
        matrix,
        (cols, rows),
        flags=cv2.INTER_LINEAR,
        # Input pixels beyond the map's outermost pixel centres take the edge value; what
        # lies outside the region preprocessing kept is cleared next.
        borderMode=cv2.BORDER_REPLICATE,
    )
    outside = np.ones((rows, cols), dtype=bool)
    outside[r0:r1, c0:c1] = False
    warped[outside] = 0.0
    return np.asarray(warped, dtype=np.float32)


def lung_mask(probability: np.ndarray, threshold: float = LUNG_THRESHOLD) -> np.ndarray:
    """Boolean lung mask from a probability map."""
    return np.asarray(probability >= threshold)


def lung_outlines(mask: np.ndarray) -> list[np.ndarray]:
    """Closed outlines of the (at most two) largest lung regions, largest first.

    Each outline is float [N, 2] of (column, row) DICOM image coordinates with the first
    point repeated at the end (a closed POLYLINE, as TID 1410 requires).
    """
    binary = np.ascontiguousarray(mask, dtype=np.uint8)
    contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    min_area = MIN_REGION_FRACTION * mask.shape[0] * mask.shape[1]
    regions = sorted(
        (c for c in contours if cv2.contourArea(c) >= min_area),
        key=cv2.contourArea,
        reverse=True,
    )[:MAX_REGIONS]
    outlines = []
    for contour in regions:
        points = _simplify(contour, mask.shape)
        if len(points) < 3:
            continue
        xy = points.reshape(-1, 2).astype(np.float64) + 0.5  # pixel index -> pixel centre
        outlines.append(np.vstack([xy, xy[:1]]))
    return outlines


def _simplify(contour: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Fewer points, at most MAX_POINTS, deviating by about 0.1 % of the image diagonal."""
    epsilon = 0.001 * float(np.hypot(shape[0], shape[1]))
    points = cv2.approxPolyDP(contour, epsilon, True)
    while len(points) > MAX_POINTS:
        epsilon *= 1.5
        points = cv2.approxPolyDP(contour, epsilon, True)
    return np.asarray(points)
