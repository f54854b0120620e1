"""The lung crop and lung mask of the member input (worker.model_input): the box, the mask,
their fallbacks, their output, and that the worker applies what its manifest says."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from tests.test_inference import PLUMBING
from tests.test_lungs import two_lungs
from training.synthetic import synthetic_batch
from worker.bundle import MANIFEST_NAME, load_bundle
from worker.inference import Ensemble
from worker.model_input import lung_box, lung_weight, member_input
from worker.preprocess import to_model_input


def lung_map(shape: tuple[int, int], rows: slice, cols: slice) -> np.ndarray:
    lung = np.zeros(shape, dtype=np.float32)
    lung[rows, cols] = 0.9
    return lung


def test_box_is_the_lungs_grown_by_the_margin_and_square() -> None:
    lung = lung_map((200, 200), slice(60, 140), slice(40, 160))  # 80 rows x 120 cols
    box = lung_box(lung, margin=0.1)
    assert box is not None
    r0, r1, c0, c1 = box
    assert r1 - r0 == c1 - c0 == 144  # the longer side 120, grown 10% per side
    assert (r0 + r1) / 2 == 100 and (c0 + c1) / 2 == 100  # centred on the lungs
    assert lung_box(lung, margin=0.0) == (40, 160, 40, 160)


def test_box_is_moved_inside_the_map_and_never_larger() -> None:
    near_edge = lung_map((200, 200), slice(0, 100), slice(150, 200))
    box = lung_box(near_edge, margin=0.2)
    assert box is not None
    r0, r1, c0, c1 = box
    assert r0 >= 0 and r1 <= 200 and c0 >= 0 and c1 <= 200
    assert r1 - r0 == c1 - c0 == 140
    whole = lung_map((100, 100), slice(5, 95), slice(5, 95))
    assert lung_box(whole, margin=0.5) == (0, 100, 0, 100)


def test_no_lungs_found_means_no_box() -> None:
    assert lung_box(np.zeros((100, 100), np.float32), 0.1) is None
    below_threshold = np.full((100, 100), 0.49, np.float32)
    assert lung_box(below_threshold, 0.1) is None
    speck = lung_map((100, 100), slice(10, 12), slice(10, 12))  # 0.04% of the image
    assert lung_box(speck, 0.1) is None


def test_cropped_input_shows_the_lungs_only() -> None:
    size, out = 128, 64
    mask = two_lungs((size, size))
    image = np.where(mask, 1.0, -1.0).astype(np.float32)
    image[:10, :] = 5.0  # burned-in text band far from the lungs
    lung = mask.astype(np.float32)
    x = member_input(image[None, None], lung[None, None], out, lung_crop=0.05)
    assert x.shape == (1, 3, out, out) and x.dtype == np.float32
    assert x[0, 0].max() < 1.01  # the text band (5.0) is outside the box
    assert x[0, 1].mean() > lung.mean()  # the lungs fill more of the input than of the image
    whole = member_input(image[None, None], lung[None, None], out)
    assert whole[0, 0].max() == 5.0
    np.testing.assert_array_equal(x[0, 2], 0.0)


def test_crop_falls_back_to_the_whole_image_per_sample() -> None:
    size = 96
    image = np.random.default_rng(0).normal(size=(2, 1, size, size)).astype(np.float32)
    lung = np.zeros((2, 1, 48, 48), np.float32)  # the U-Net's map at its own size
    lung[1, 0, 10:40, 8:40] = 1.0
    cropped = member_input(image, lung, 64, lung_crop=0.1)
    whole = member_input(image, lung, 64)
    np.testing.assert_allclose(cropped[0], whole[0])  # no lungs: same as without the crop
    assert not np.allclose(cropped[1, 0], whole[1, 0])


def test_mask_keeps_the_lungs_and_a_rim_and_sets_the_rest_to_mean_gray() -> None:
    size = 100
    lung = lung_map((size, size), slice(20, 80), slice(30, 70))
    weight = lung_weight(lung, dilation=0.05)  # 5 px at this size
    assert weight is not None
    assert weight[20:80, 30:70].min() == 1.0  # the lungs
    assert weight[50, 25] == 1.0 and weight[50, 74] == 1.0  # 5 px of rim kept
    assert weight[50, 24] == 0.0 and weight[50, 76] == 0.0 and weight[5, 5] == 0.0
    bare = lung_weight(lung, dilation=0.0)
    assert bare is not None and bare.sum() == 60 * 40
    assert lung_weight(np.zeros((size, size), np.float32), 0.05) is None  # no lungs found

    image = np.full((1, 1, size, size), 3.0, np.float32)
    x = member_input(image, lung[None, None], size, lung_mask=0.05)
    np.testing.assert_array_equal(x[0, 0], 3.0 * weight)  # 0 = the normalised mean gray
    np.testing.assert_array_equal(x[0, 1], lung)  # the lung channel itself is not masked


def test_mask_follows_the_crop_and_falls_back_per_sample() -> None:
    size = 96
    image = np.random.default_rng(1).normal(size=(2, 1, size, size)).astype(np.float32)
    lung = np.zeros((2, 1, 48, 48), np.float32)
    lung[1, 0, 10:40, 8:40] = 1.0
    masked = member_input(image, lung, 64, lung_crop=0.1, lung_mask=0.02)
    cropped = member_input(image, lung, 64, lung_crop=0.1)
    np.testing.assert_allclose(masked[0], cropped[0])  # no lungs: nothing masked
    weight = lung_weight(cropped[1, 1], 0.02)
    assert weight is not None and 0.3 < weight.mean() < 1.0
    np.testing.assert_allclose(masked[1, 0], cropped[1, 0] * weight)


class FixedLungs:
    """Stands in for the segmentation session: lungs in the upper left of every image."""

    def __init__(self, size: int) -> None:
        self.map = np.zeros((1, 1, size, size), np.float32)
        self.map[..., size // 8 : size // 2, size // 8 : size // 2] = 0.9

    def run(self, outputs: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        (x,) = feeds.values()
        return [np.repeat(self.map, len(x), axis=0)]


def test_the_worker_crops_and_masks_as_its_manifest_says(tmp_path: Path) -> None:
    root = tmp_path / "bundle"
    shutil.copytree(PLUMBING, root)
    manifest = json.loads((root / MANIFEST_NAME).read_text(encoding="utf-8"))
    for member in manifest["members"]:
        member["lung_crop"] = 0.1
        member["lung_mask"] = 0.03
    (root / MANIFEST_NAME).write_text(json.dumps(manifest), encoding="utf-8")
    bundle = load_bundle(root)
    ensemble = Ensemble(bundle)
    seg_size = bundle.manifest.segmentation.input_size
    ensemble.segmentation = FixedLungs(seg_size)
    params = bundle.manifest.preprocessing
    images = synthetic_batch(2, params, seed=5)

    predictions = ensemble.predict(images)

    x = to_model_input(images, params)
    lung = FixedLungs(seg_size).map.repeat(2, axis=0)
    for spec in bundle.manifest.members:
        session = ensemble.members[spec.name]
        masked, cropped, whole = (
            session.run(["probability"], {"image": member_input(x, lung, spec.input_size, *v)})[0]
            for v in ((0.1, 0.03), (0.1, None), (None, None))
        )
        got = [p.member_probabilities[spec.name] for p in predictions]
        np.testing.assert_allclose(got, masked, rtol=1e-5)
        assert not np.allclose(got, cropped, rtol=1e-5)
        assert not np.allclose(got, whole, rtol=1e-5)
