"""Numpy analyses for the report: kNN retrieval, a logistic-regression probe, trivial image
features, lung masking for the shortcut audit, and a 2-D projection of embeddings."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import cv2
import numpy as np

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- retrieval


def cosine_distances(query: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """1 - cosine similarity, [Q,R] (the hnswlib "cosine" space of the bundle index)."""

    def unit(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    return 1.0 - unit(query) @ unit(reference).T


@dataclass(frozen=True)
class KnnResult:
    vote: np.ndarray  # [Q] fraction of positive neighbours
    predicted: np.ndarray  # [Q] 0/1: majority vote, ties broken by the nearest neighbour
    neighbour_distance: np.ndarray  # [Q,k]
    neighbour_same: np.ndarray  # [Q,k] bool: neighbour label == query label
    within: float  # mean distance between query and reference images of the same class
    across: float  # ... of different classes


def knn_vote(
    query: np.ndarray,
    query_labels: np.ndarray,
    reference: np.ndarray,
    ref_labels: np.ndarray,
    k: int,
) -> KnnResult:
    """k nearest reference images of each query (cosine), their label vote and distances."""
    k = min(k, len(reference))
    d = cosine_distances(query, reference)
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    nd = np.take_along_axis(d, order, axis=1)
    labels = np.asarray(ref_labels)[order]
    vote = labels.mean(axis=1)
    predicted = np.where(vote == 0.5, labels[:, 0], (vote > 0.5).astype(np.int64))
    same_pair = np.asarray(query_labels)[:, None] == np.asarray(ref_labels)[None, :]
    within = float(d[same_pair].mean()) if same_pair.any() else float("nan")
    across = float(d[~same_pair].mean()) if (~same_pair).any() else float("nan")
    return KnnResult(
        vote=vote,
        predicted=predicted.astype(np.int64),
        neighbour_distance=nd,
        neighbour_same=labels == np.asarray(query_labels)[:, None],
        within=within,
        across=across,
    )


# --------------------------------------------------------------------------- probes


def fit_logistic(
    x: np.ndarray, y: np.ndarray, l2: float = 1.0, iterations: int = 50
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """L2-regularised logistic regression by Newton's method on standardised features.

    Returns (weights incl. bias, feature mean, feature std) for `predict_logistic`.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-8
    z = np.hstack([(x - mean) / std, np.ones((len(x), 1))])
    w = np.zeros(z.shape[1])
    reg = np.full(z.shape[1], l2)
    reg[-1] = 0.0  # no penalty on the bias
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(z @ w, -30, 30)))
        grad = z.T @ (p - y) + reg * w
        hess = (z * (p * (1 - p))[:, None]).T @ z + np.diag(reg + 1e-9)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.max(np.abs(step)) < 1e-8:
            break
    return w, mean, std


def predict_logistic(model: tuple[np.ndarray, np.ndarray, np.ndarray], x: np.ndarray) -> np.ndarray:
    w, mean, std = model
    z = np.hstack([(np.asarray(x, dtype=np.float64) - mean) / std, np.ones((len(x), 1))])
    return np.asarray(1.0 / (1.0 + np.exp(-np.clip(z @ w, -30, 30))))


def trivial_features(images: np.ndarray, bins: int = 16) -> np.ndarray:
    """Features any model could exploit without anatomy: intensity histogram, brightness,
    contrast, dark-border fractions, sharpness. [N, bins + 7]."""
    out = []
    for img in images:
        f = img.astype(np.float32)
        hist = np.bincount((img // (256 // bins)).ravel(), minlength=bins)[:bins] / img.size
        edge = max(1, img.shape[0] // 16)
        borders = [
            (img[:edge] < 24).mean(),
            (img[-edge:] < 24).mean(),
            (img[:, :edge] < 24).mean(),
            (img[:, -edge:] < 24).mean(),
        ]
        sharp = float(cv2.Laplacian(f, cv2.CV_32F).var())
        out.append([*hist, f.mean() / 255, f.std() / 255, *borders, np.log1p(sharp)])
    return np.asarray(out, dtype=np.float64)


# --------------------------------------------------------------------------- shortcut audit


def replace_region(images: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Pixels where `region` is true set to each image's mean gray (uint8 [N,S,S])."""
    out = images.copy()
    for img, mask, src in zip(out, region, images, strict=True):
        img[mask] = np.uint8(round(float(src.mean())))
    return out


# --------------------------------------------------------------------------- projection


def project_2d(embeddings: np.ndarray, seed: int, use_tsne: bool = True) -> tuple[np.ndarray, str]:
    """t-SNE (scikit-learn) of the embeddings, or PCA when t-SNE is unavailable or unsuitable."""
    x = np.asarray(embeddings, dtype=np.float64)
    if use_tsne and len(x) >= 8:
        try:
            from sklearn.manifold import TSNE
        except ImportError:
            log.warning("scikit-learn is not installed: PCA instead of t-SNE")
        else:
            perplexity = float(min(30.0, (len(x) - 1) / 3.0))
            tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
            return np.asarray(tsne.fit_transform(x)), "t-SNE"
    centred = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    comps = vt[:2] if len(vt) >= 2 else np.vstack([vt, np.zeros_like(vt)])
    return centred @ comps.T, "PCA"
