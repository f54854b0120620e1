"""Analyses for the report: kNN retrieval, a logistic-regression probe, trivial image
features, lung masking for the shortcut audit, and a 2-D projection of embeddings."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.manifold import TSNE
from sklearn.metrics.pairwise import cosine_distances
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

# --------------------------------------------------------------------------- retrieval


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
    # 1 - cosine similarity: the hnswlib "cosine" space of the bundle index
    d = cosine_distances(np.asarray(query, np.float64), np.asarray(reference, np.float64))
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


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1.0) -> Pipeline:
    """L2-regularised logistic regression on standardised features (bias not penalised):
    minimises sum(log loss) + l2 / 2 * |w|^2. `predict_proba(x)[:, 1]` scores new rows."""
    model = make_pipeline(
        StandardScaler(), LogisticRegression(C=1.0 / l2, tol=1e-10, max_iter=1000)
    )
    return model.fit(np.asarray(x, dtype=np.float64), np.asarray(y))


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
    """t-SNE of the embeddings, or PCA when t-SNE is switched off or there are under 8."""
    x = np.asarray(embeddings, dtype=np.float64)
    if use_tsne and len(x) >= 8:
        perplexity = float(min(30.0, (len(x) - 1) / 3.0))
        tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
        return np.asarray(tsne.fit_transform(x)), "t-SNE"
    components = min(2, *x.shape)
    points = PCA(n_components=components).fit_transform(x)
    if components < 2:  # one image or one feature: the second axis is flat
        points = np.hstack([points, np.zeros((len(x), 2 - components))])
    return np.asarray(points), "PCA"
