"""Synthetic chest-X-ray-like images for plumbing bundles and tests (numpy + OpenCV, no torch).

Not data: a bright thorax, two darker lung fields, a spine, smooth noise, and for "covid" rows
some hazy blobs in the lower lungs. They only give random models inputs with plausible
structure. Deterministic for a given seed.
"""

from __future__ import annotations

import cv2
import numpy as np

from worker.classes import CxrClass
from worker.preprocess import PreprocessParams, preprocess

_CANVAS = 256


def _smooth_noise(rng: np.random.Generator, side: int, sigma: float) -> np.ndarray:
    white = rng.standard_normal((side, side)).astype(np.float32)
    field = np.asarray(cv2.GaussianBlur(white, (0, 0), sigma), dtype=np.float32)
    scaled: np.ndarray = field / (np.abs(field).max() + 1e-6)
    return scaled


def synthetic_display_image(rng: np.random.Generator, label: CxrClass) -> np.ndarray:
    """One uint8 display image (brighter = denser), 256 x 256 with dark margins."""
    s = _CANVAS
    img = np.zeros((s, s), dtype=np.float32)
    cx, cy = s // 2 + int(rng.integers(-8, 9)), s // 2 + int(rng.integers(-6, 7))
    cv2.ellipse(img, (cx, cy), (int(s * 0.40), int(s * 0.45)), 0, 0, 360, 0.70, -1)
    lung_axes = (int(s * rng.uniform(0.13, 0.17)), int(s * rng.uniform(0.28, 0.33)))
    for side in (-1, 1):
        center = (cx + side * int(s * 0.19), cy - int(s * 0.03))
        cv2.ellipse(img, center, lung_axes, side * 8.0, 0, 360, 0.28, -1)
    cv2.rectangle(img, (cx - 9, cy - int(s * 0.42)), (cx + 9, cy + int(s * 0.42)), 0.85, -1)
    if label is CxrClass.COVID19:
        for _ in range(int(rng.integers(2, 5))):
            side = int(rng.choice([-1, 1]))
            center = (
                cx + side * int(s * rng.uniform(0.12, 0.26)),
                cy + int(s * rng.uniform(0.02, 0.20)),
            )
            cv2.circle(img, center, int(rng.integers(10, 22)), 0.55, -1)
    img = np.asarray(cv2.GaussianBlur(img, (0, 0), 3.0), dtype=np.float32)
    img += 0.08 * _smooth_noise(rng, s, 6.0) + 0.02 * rng.standard_normal((s, s)).astype(np.float32)
    margin = int(rng.integers(6, 20))
    img[:margin] = 0.0
    img[-margin:] = 0.0
    display: np.ndarray = np.clip(img * 255.0, 0, 255).astype(np.uint8)
    return display


def synthetic_labels(n: int) -> list[CxrClass]:
    """Alternating negative / covid."""
    return [CxrClass.NEGATIVE if i % 2 == 0 else CxrClass.COVID19 for i in range(n)]


def synthetic_batch(n: int, params: PreprocessParams, seed: int) -> np.ndarray:
    """n preprocessed images, uint8 [n, size, size], labelled as `synthetic_labels(n)`."""
    rng = np.random.default_rng(seed)
    images = [
        preprocess(synthetic_display_image(rng, label), params) for label in synthetic_labels(n)
    ]
    return np.stack(images)
