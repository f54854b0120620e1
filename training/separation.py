"""Does the retrieval embedding separate? Nearest-neighbour distances, chest vs non-chest.

The SR lists the reference studies nearest to a query by cosine distance. That list means
something only if distances vary: bundle 1.1.0's ReLU embeddings put every query, photographs
included, within 0.002 of its neighbours. This section reports the distribution of each
test image's cosine distance to its nearest training reference, and the same for images that
are no chest X-ray at all (photographs bundled with scikit-image when it is installed, and
synthetic patterns), through the same preprocessing, U-Net and member as the test images.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

from training.metrics import roc_auc
from training.results import DistanceSummary, Separation
from worker.preprocess import PreprocessParams, preprocess

QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)
#: scikit-image's bundled photographs (CC0 or public domain, per skimage.data).
SKIMAGE_PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "rocket", "horse", "moon")


def synthetic_non_chest(side: int = 256, seed: int = 0) -> list[np.ndarray]:
    """Gray uint8 patterns no chest X-ray looks like: noise, ramps, a grid, discs, text."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    noise = rng.integers(0, 256, (side, side), dtype=np.uint8)
    blurred = cv2.GaussianBlur(noise, (0, 0), 6)
    ramp = (255 * xx).astype(np.uint8)
    grid = (((xx * 8).astype(int) + (yy * 8).astype(int)) % 2 * 255).astype(np.uint8)
    discs = np.zeros((side, side), np.uint8)
    for _ in range(6):
        centre = tuple(int(c) for c in rng.integers(0, side, 2))
        cv2.circle(discs, centre, int(rng.integers(10, side // 4)), int(rng.integers(80, 256)), -1)
    text = np.full((side, side), 230, np.uint8)
    for row in range(1, 8):
        cv2.putText(text, "LOREM IPSUM", (5, row * side // 8), 0, side / 400, 20, 2)
    return [noise, cv2.normalize(blurred, None, 0, 255, cv2.NORM_MINMAX), ramp, grid, discs, text]


def photo_non_chest() -> list[np.ndarray]:
    """scikit-image's sample photographs in gray, or none when it is not installed."""
    try:
        import skimage.data
    except ImportError:
        return []
    out = []
    for name in SKIMAGE_PHOTOS:
        image = np.asarray(getattr(skimage.data, name)())
        if image.ndim == 3:
            image = cv2.cvtColor(image[..., :3], cv2.COLOR_RGB2GRAY)
        out.append(np.ascontiguousarray(image.astype(np.uint8)))
    return out


def non_chest_images(params: PreprocessParams) -> tuple[np.ndarray, list[str]]:
    """Preprocessed uint8 [N,S,S] non-chest images and what each is."""
    photos = photo_non_chest()
    raw = photos + synthetic_non_chest()
    kinds = ["photo"] * len(photos) + ["synthetic"] * (len(raw) - len(photos))
    return np.stack([preprocess(r, params) for r in raw]), kinds


def nearest_distances(reference: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Cosine distance from each query [N,D] to its nearest reference [M,D] row."""

    def unit(a: np.ndarray) -> np.ndarray:
        a = np.asarray(a, dtype=np.float64)
        rows: np.ndarray = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
        return rows

    if not len(queries):
        return np.zeros(0)
    similarity = unit(queries) @ unit(reference).T
    distance: np.ndarray = np.clip(1.0 - similarity.max(axis=1), 0.0, 2.0)
    return distance


def _summary(d: np.ndarray) -> DistanceSummary:
    return {
        "n": len(d),
        "quantiles": {f"p{round(q * 100)}": float(np.quantile(d, q)) for q in QUANTILES}
        if len(d)
        else {},
    }


def section_separation(
    reference: np.ndarray,
    test: np.ndarray,
    embed: Callable[[np.ndarray], np.ndarray],
    params: PreprocessParams,
) -> Separation:
    """Nearest-reference cosine distances of the test images and of non-chest images.

    `reference`, `test`: embeddings [M,D], [N,D] of the training references and the test
    images; `embed`: preprocessed uint8 images -> embeddings, the way the test ones were made.
    """
    images, kinds = non_chest_images(params)
    others = embed(images)
    d_test = nearest_distances(reference, test)
    d_other = nearest_distances(reference, others)
    y = np.r_[np.zeros(len(d_test)), np.ones(len(d_other))]
    threshold = float(np.quantile(d_test, 0.95)) if len(d_test) else float("nan")
    return {
        "metric": "cosine distance to the nearest training reference",
        "test": _summary(d_test),
        "non_chest": {
            **_summary(d_other),
            "kinds": {k: kinds.count(k) for k in sorted(set(kinds))},
            "distances": [round(float(v), 4) for v in d_other],
        },
        "auc_non_chest_farther": roc_auc(y, np.r_[d_test, d_other]) if len(d_other) else None,
        "non_chest_beyond_test_p95": float(np.mean(d_other > threshold)) if len(d_other) else None,
    }


def separation_lines(section: Separation | None) -> list[str]:
    """Markdown lines for report.md and the card."""
    if not section:
        return []
    lines = [
        "| nearest-reference cosine distance | n | min | p5 | median | p95 | max |",
        "|---|---|---|---|---|---|---|",
    ]
    for s, label in ((section["test"], "test images"), (section["non_chest"], "non-chest images")):
        q = s.get("quantiles", {})
        cells = " | ".join(f"{q[p]:.4f}" for p in ("p0", "p5", "p50", "p95", "p100") if p in q)
        lines.append(f"| {label} | {s['n']} | {cells} |")
    auc = section.get("auc_non_chest_farther")
    beyond = section.get("non_chest_beyond_test_p95")
    if auc is not None:
        lines.append("")
        lines.append(
            f"ROC AUC of the distance for non-chest vs test: {auc:.3f}; non-chest images"
            f" beyond the test images' 95th percentile: {beyond:.0%}."
        )
    return lines
