"""worker.preprocess: crop, pad, resize, CLAHE and the model input, on synthetic images."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from worker.preprocess import (
    PreprocessParams,
    crop_borders,
    pad_square,
    preprocess,
    to_model_input,
)

PARAMS = PreprocessParams()


def texture(rows: int, cols: int, seed: int = 0, low: int = 90, high: int = 200) -> np.ndarray:
    """Random mid-gray 'anatomy': every pixel is content (>= crop_dark_threshold)."""
    rng = np.random.default_rng(seed)
    return rng.integers(low, high, size=(rows, cols), dtype=np.uint8)


@pytest.mark.parametrize("shape", [(300, 500), (500, 300), (37, 1000), (256, 256), (2000, 1500)])
@pytest.mark.parametrize("size", [64, 256])
def test_output_is_square_uint8_of_the_requested_size(shape: tuple[int, int], size: int) -> None:
    out = preprocess(texture(*shape), PreprocessParams(size=size))
    assert out.shape == (size, size)
    assert out.dtype == np.uint8


def test_dark_frame_around_the_image_is_cropped() -> None:
    image = np.zeros((400, 400), dtype=np.uint8)
    image[80:320, 80:320] = texture(240, 240)
    np.testing.assert_array_equal(crop_borders(image, PARAMS), image[80:320, 80:320])
    out = preprocess(image, PARAMS)
    # The image region fills the output: no dark frame left on any side.
    for edge in (out[:4], out[-4:], out[:, :4], out[:, -4:]):
        assert (edge >= PARAMS.crop_dark_threshold).mean() > 0.95


def test_crop_never_removes_more_than_the_maximum_per_side() -> None:
    image = np.zeros((400, 400), dtype=np.uint8)
    image[140:260, 140:260] = texture(120, 120)
    cropped = crop_borders(image, PARAMS)
    assert cropped.shape == (200, 200)  # 25 % off each side, no more
    np.testing.assert_array_equal(cropped, image[100:300, 100:300])


def test_burned_in_text_in_a_dark_top_margin_is_cropped_away() -> None:
    image = texture(500, 400)
    image[:60] = 0
    cv2.putText(image, "L 2020-03-14 AP", (10, 40), cv2.FONT_HERSHEY_SIMPLEX, 0.8, 255, 2)
    assert (image[:60] == 255).sum() > 300  # the text is there
    cropped = crop_borders(image, PARAMS)
    assert cropped.shape == (440, 400)
    assert not (cropped == 255).any()


def test_aspect_is_preserved_by_padding_not_stretching() -> None:
    image = texture(200, 400, low=110, high=130)
    cv2.circle(image, (200, 100), 60, 250, -1)
    padded = pad_square(image)
    assert padded.shape == (400, 400)
    np.testing.assert_array_equal(padded[100:300], image)
    assert not padded[:100].any() and not padded[300:].any()

    out = preprocess(image, PARAMS)
    # Padding bands (top and bottom quarters) stay dark; CLAHE lifts zero only slightly.
    assert out[:56].mean() < 10 and out[-56:].mean() < 10
    assert out[80:176].mean() > 80
    # The circle (diameter 120 of a 400 px side -> ~77 px of 256) stays round.
    _, _, stats, _ = cv2.connectedComponentsWithStats((out > 200).astype(np.uint8))
    largest = stats[1 + np.argmax(stats[1:, cv2.CC_STAT_AREA])]
    width, height = largest[cv2.CC_STAT_WIDTH], largest[cv2.CC_STAT_HEIGHT]
    assert abs(width - height) <= 2
    assert abs(width - 120 * 256 / 400) <= 3


def test_preprocess_is_deterministic_and_leaves_its_input_alone() -> None:
    image = np.zeros((300, 420), dtype=np.uint8)
    image[20:280, 30:400] = texture(260, 370, seed=3)
    before = image.copy()
    first = preprocess(image, PARAMS)
    second = preprocess(image.copy(), PARAMS)
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(image, before)


def test_non_contiguous_views_give_the_same_result() -> None:
    image = texture(300, 500, seed=4)
    expected = preprocess(np.ascontiguousarray(image.T), PARAMS)
    np.testing.assert_array_equal(preprocess(image.T, PARAMS), expected)


def test_colour_input_is_converted_to_gray() -> None:
    gray = texture(200, 300, seed=5)
    bgr = np.repeat(gray[:, :, None], 3, axis=2)
    np.testing.assert_array_equal(preprocess(bgr, PARAMS), preprocess(gray, PARAMS))


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((10, 10), dtype=np.uint16),
        np.zeros((0, 10), dtype=np.uint8),
        np.zeros(10, np.uint8),
    ],
    ids=["uint16", "empty", "1-D"],
)
def test_invalid_input_is_rejected(image: np.ndarray) -> None:
    with pytest.raises(ValueError):
        preprocess(image, PARAMS)


def test_to_model_input_shape_dtype_and_normalisation() -> None:
    params = PreprocessParams(size=64, mean=0.5, std=0.25)
    images = np.stack([np.full((64, 64), value, dtype=np.uint8) for value in (0, 255, 102)])
    x = to_model_input(images, params)
    assert x.shape == (3, 1, 64, 64)
    assert x.dtype == np.float32
    assert x[0].mean() == pytest.approx(-2.0)
    assert x[1].mean() == pytest.approx(2.0)
    assert x[2].mean() == pytest.approx((102 / 255 - 0.5) / 0.25)


def test_to_model_input_mean_of_a_preprocessed_batch() -> None:
    params = PreprocessParams(size=64)
    batch = np.stack([preprocess(texture(120, 90, seed=s), params) for s in range(4)])
    x = to_model_input(batch, params)
    expected = (batch.astype(np.float64) / 255 - params.mean) / params.std
    assert x.mean() == pytest.approx(expected.mean(), abs=1e-5)
    np.testing.assert_allclose(x[:, 0], expected, atol=1e-5)


def test_mask_follows_the_image_through_crop_pad_and_resize() -> None:
    from worker.preprocess import crop_box, preprocess_mask

    image = np.zeros((300, 400), dtype=np.uint8)
    image[30:270, 60:360] = texture(240, 300)
    mask = np.zeros_like(image)
    mask[100:200, 100:180] = 255  # a "lung" inside the content
    mask[120:130, 120:130] = 127  # an ignore patch
    r0, r1, c0, c1 = crop_box(image, PARAMS)
    assert (r0, r1, c0, c1) == (30, 270, 60, 360)
    out = preprocess_mask(mask, image, PARAMS)
    assert out.shape == (PARAMS.size, PARAMS.size)
    assert set(np.unique(out).tolist()) <= {0, 127, 255}  # nearest: labels kept
    # The same geometry as the image: a bright marker moves where the mask's lung moved.
    marked = image.copy()
    marked[100:200, 100:180] = 250
    bright = preprocess(marked, PARAMS) >= 240
    lung = out == 255
    overlap = (bright & lung).sum() / lung.sum()
    assert overlap > 0.9
    with pytest.raises(ValueError, match="differs"):
        preprocess_mask(mask[:10], image, PARAMS)
