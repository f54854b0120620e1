"""The lung map back on the received image: preprocessing geometry, back-projection, outlines."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from dicom_node.results.lungs import MAX_POINTS, lung_map_on_image, lung_mask, lung_outlines
from worker.preprocess import (
    PreprocessParams,
    crop_borders,
    pad_square,
    preprocess,
    preprocess_geometry,
)


def texture(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(90, 200, size=(rows, cols), dtype=np.uint8)


def two_lungs(shape: tuple[int, int]) -> np.ndarray:
    """Boolean mask with two lung-like ellipses."""
    rows, cols = shape
    canvas = np.zeros(shape, dtype=np.uint8)
    for cx in (0.3, 0.7):
        center = (round(cols * cx), round(rows * 0.5))
        cv2.ellipse(canvas, center, (round(cols * 0.12), round(rows * 0.3)), 0, 0, 360, 1, -1)
    return canvas.astype(bool)


def project_like_preprocess(mask: np.ndarray, image: np.ndarray, size: int) -> np.ndarray:
    """What the worker's map would be if the U-Net found `mask` exactly: the mask through the
    same crop / pad / resize as the image (uint8 0..255, size x size)."""
    r0, r1, c0, c1 = preprocess_geometry(image, PreprocessParams(size=size)).crop
    square = pad_square((mask[r0:r1, c0:c1] * 255).astype(np.uint8))
    return np.asarray(cv2.resize(square, (size, size), interpolation=cv2.INTER_AREA))


@pytest.mark.parametrize("shape", [(700, 500), (500, 700), (1955, 1841), (300, 300)])
def test_geometry_is_the_one_preprocess_applies(shape: tuple[int, int]) -> None:
    image = texture(*shape)
    image[: shape[0] // 10] = 0  # a dark band to crop
    image[:, -shape[1] // 12 :] = 0
    params = PreprocessParams(size=128)
    geometry = preprocess_geometry(image, params)
    r0, r1, c0, c1 = geometry.crop
    np.testing.assert_array_equal(image[r0:r1, c0:c1], crop_borders(image, params))
    assert geometry.side == max(r1 - r0, c1 - c0)
    assert geometry.input_shape == shape
    # padding + resize through the geometry gives the same square preprocess resizes
    square = pad_square(crop_borders(image, params))
    assert square.shape == (geometry.side, geometry.side)
    assert preprocess(image, params).shape == (128, 128)


@pytest.mark.parametrize("shape", [(700, 500), (500, 700), (1955, 1841)])
def test_lung_map_lands_where_the_lungs_are(shape: tuple[int, int]) -> None:
    image = texture(*shape)
    image[:60] = 0
    image[:, -40:] = 0
    truth = two_lungs(shape)
    params = PreprocessParams(size=128)
    lung_map = project_like_preprocess(truth, image, params.size)
    back = lung_mask(lung_map_on_image(lung_map, preprocess_geometry(image, params)))
    iou = (back & truth).sum() / (back | truth).sum()
    assert iou > 0.95


def test_lung_map_is_zero_outside_the_crop() -> None:
    image = texture(400, 300)
    image[:80] = 0
    geometry = preprocess_geometry(image, PreprocessParams(size=64))
    full = np.full((64, 64), 255, dtype=np.uint8)
    probability = lung_map_on_image(full, geometry)
    assert probability.shape == (400, 300)
    assert probability[:80].max() == 0.0
    assert probability[100:].min() > 0.99


def test_map_of_the_wrong_size_is_refused() -> None:
    geometry = preprocess_geometry(texture(100, 100), PreprocessParams(size=64))
    with pytest.raises(ValueError, match="preprocessing size"):
        lung_map_on_image(np.zeros((32, 32), dtype=np.uint8), geometry)


def test_outlines_are_closed_polylines_in_dicom_image_coordinates() -> None:
    mask = two_lungs((600, 500))
    outlines = lung_outlines(mask)
    assert len(outlines) == 2
    for outline in outlines:
        assert outline.shape[1] == 2
        assert 3 < len(outline) <= MAX_POINTS + 1
        np.testing.assert_array_equal(outline[0], outline[-1])  # closed
        # (column, row) with pixel centres at +0.5: every vertex lies on the mask
        for x, y in outline[:-1]:
            assert mask[int(y), int(x)]
    left, right = sorted(outlines, key=lambda o: o[:, 0].mean())
    assert left[:, 0].max() < 250 < right[:, 0].min()


def test_specks_are_not_lungs_and_at_most_two_regions_are_kept() -> None:
    mask = two_lungs((400, 400))
    mask[10:13, 10:13] = True  # a speck
    mask[350:390, 180:220] = True  # a third, smaller region
    outlines = lung_outlines(mask)
    assert len(outlines) == 2
    assert lung_outlines(np.zeros((100, 100), dtype=bool)) == []


def test_ragged_outline_is_simplified_to_the_point_cap() -> None:
    rng = np.random.default_rng(1)
    mask = two_lungs((2000, 2000))
    mask &= rng.random(mask.shape) > 0.02  # holes do not matter: external contour only
    edge = cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    ragged = edge | (rng.random(mask.shape) > 0.995) & cv2.dilate(
        mask.astype(np.uint8), np.ones((25, 25), np.uint8)
    ).astype(bool)
    assert all(len(o) <= MAX_POINTS + 1 for o in lung_outlines(ragged))
