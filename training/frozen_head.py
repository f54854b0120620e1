"""The warm-up without re-running the frozen backbone: its pooled features, computed once.

While the backbone is frozen (weights and BatchNorm statistics, `classify._set_trainable`),
only the head learns, and the backbone's output for an image depends on that image alone, not
on the split or the epoch. On 2 CPU cores the backbone's forward pass is nearly all of a
frozen epoch's cost (Lite0 at 224 px: about 0.1 s per image), so here it runs once per image
and augmented view, and every epoch of every split reads the stored features:

- `views` augmented copies of each cache row (the run's augmenter, seeded per view) plus the
  un-augmented one, pooled by the backbone in eval mode: exactly what the member computes
  for that input, since the frozen backbone is what the bundle serves;
- each epoch draws one stored view per training image (augmentation from a fixed set of
  `views` per image instead of a fresh one each epoch: the one difference from the
  image path);
- the features are kept in the run folder (`features/`), keyed by what they depend on, so the
  other splits (`cxr-train multisplit`) and a rerun reuse them.

What comes out is the same checkpoint as the image path's: the pretrained backbone and the
trained head; the predictions are the head's output on the un-augmented features, equal to the
whole member on the images (tested).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from training.augment import Augmenter
from training.datasets import MemberDataset, loader, training_sampler
from training.models import Classifier
from training.progress import progress
from training.torchutil import array_sha256, derive_seed, eval_mode, fingerprint
from worker.classes import CxrClass

log = logging.getLogger(__name__)

#: (features [N,C] float32 of the validation rows) -> selection metrics of that epoch
Validate = Callable[[np.ndarray], dict[str, float]]


@dataclass
class FeatureViews:
    """Pooled backbone features of every cache row: `plain` [N,C] un-augmented, `views`
    [V,N,C] augmented (V may be 0)."""

    plain: np.ndarray
    views: np.ndarray


def pooled_features(
    model: Classifier, dataset: MemberDataset, device: torch.device, batch_size: int = 32
) -> np.ndarray:
    """The frozen backbone's pooled features [N,C] of every item of `dataset`, in order."""
    out: list[np.ndarray] = []
    with eval_mode(model), torch.no_grad():
        for x, _, _ in loader(dataset, batch_size):
            out.append(model.pooled(x.to(device)).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.feature_dim), np.float32)


def feature_views(
    model: Classifier,
    dataset: MemberDataset,
    augment: Augmenter | None,
    views: int,
    seed: int,
    folder: Path,
    key: dict[str, Any],
    device: torch.device,
) -> FeatureViews:
    """The stored features for `key` (what they depend on), else computed and stored.

    `dataset` holds every cache row, its own augmenter unset; `augment` makes the views.
    """
    name = fingerprint({**key, "views": views, "seed": seed})[:16]
    path = folder / f"{name}.npz"
    if path.is_file():
        with np.load(path) as npz:
            return FeatureViews(npz["plain"], npz["views"])
    folder.mkdir(parents=True, exist_ok=True)
    dataset.augment = None
    plain = pooled_features(model, dataset, device)
    stack = []
    for v in progress(range(views if augment is not None else 0), "feature views"):
        augment_view = augment
        assert augment_view is not None
        augment_view.reseed(derive_seed(seed, "view", v))
        dataset.augment = augment_view
        stack.append(pooled_features(model, dataset, device))
    dataset.augment = None
    out = FeatureViews(plain, np.stack(stack) if stack else np.zeros((0, *plain.shape), np.float32))
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, plain=out.plain, views=out.views)
    tmp.replace(path)
    log.info("stored %d x %d pooled features in %s", 1 + len(stack), len(plain), path)
    return out


def feature_key(model: Classifier, dataset: MemberDataset, extra: dict[str, Any]) -> dict[str, Any]:
    """What pooled features depend on: the backbone's weights, the inputs and `extra`
    (augmentation settings, input options)."""
    state = model.state_dict()
    backbone = {k: v for k, v in state.items() if k.startswith(("features.", "adapter."))}
    return {
        "backbone": fingerprint({k: array_sha256(v.cpu().numpy()) for k, v in backbone.items()}),
        "images": array_sha256(dataset.images),
        "lungs": None if dataset.lungs is None else array_sha256(dataset.lungs),
        "input": [dataset.input_size, dataset.lung_crop, dataset.lung_mask],
        **extra,
    }


def head_outputs(
    model: Classifier, pooled: np.ndarray, device: torch.device, batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """P(COVID-19) [N] (float64) and retrieval embeddings [N,D] of pooled features, in eval
    mode: what the member gives for the images they came from."""
    probs: list[np.ndarray] = []
    embeddings: list[np.ndarray] = []
    with eval_mode(model), torch.no_grad():
        for start in range(0, len(pooled), batch_size):
            x = torch.from_numpy(pooled[start : start + batch_size]).to(device)
            logits, emb = model.from_pooled(x)
            probs.append(torch.softmax(logits.float(), 1)[:, int(CxrClass.COVID19)].cpu().numpy())
            embeddings.append(emb.float().cpu().numpy())
    if not probs:
        return np.zeros(0), np.zeros((0, model.embedding_dim), np.float32)
    return np.concatenate(probs).astype(np.float64), np.concatenate(embeddings)


def train_head_epoch(
    model: Classifier,
    optimizer: torch.optim.Optimizer,
    features: FeatureViews,
    rows: np.ndarray,
    labels: np.ndarray,
    sampler_args: tuple[bool, np.ndarray, float],
    batch_size: int,
    seed: int,
    device: torch.device,
) -> float:
    """One epoch of the head on stored features of `rows` (one random view per draw);
    returns the mean training loss."""
    balanced, sources, same_source_share = sampler_args
    generator = torch.Generator().manual_seed(seed)
    sampler = training_sampler(labels, balanced, generator, sources, same_source_share)
    order = np.fromiter(iter(sampler), dtype=np.int64)
    rng = np.random.default_rng(seed)
    n_views = len(features.views)
    view = rng.integers(0, n_views, len(order)) if n_views else None
    model.train()
    model.features.eval()
    total, count = 0.0, 0
    drop_last = len(order) > batch_size
    for start in range(0, len(order), batch_size):
        pick = order[start : start + batch_size]
        if drop_last and len(pick) < batch_size:
            break
        source = (
            features.plain[rows[pick]]
            if view is None
            else features.views[view[start : start + len(pick)], rows[pick]]
        )
        x = torch.from_numpy(np.ascontiguousarray(source)).to(device)
        y = torch.from_numpy(labels[pick]).to(device)
        logits, _ = model.from_pooled(x)
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * len(pick)
        count += len(pick)
    return total / max(count, 1)


def centre_on_features(model: Classifier, pooled: np.ndarray, device: torch.device) -> None:
    """`Classifier.centre_embedding` from pooled features of the un-augmented training
    images (eval mode, as served)."""
    if model.embedding_kind != "l2":
        return
    with eval_mode(model), torch.no_grad():
        z = model.head(torch.from_numpy(pooled).to(device))
        model.embedding_centre.copy_(z.mean(dim=0))
