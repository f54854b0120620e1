"""Torch datasets over the cache: model inputs built with the worker's own helpers.

The member input is
`worker.model_input.member_input(to_model_input(image), lung, size, crop, mask)`, the
segmentation input `resize_batch(to_model_input(image), seg_size)`: without augmentation a
sample is exactly what the worker computes for that image and lung map.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, WeightedRandomSampler

from training.augment import Augmenter
from worker.model_input import member_input, resize_batch
from worker.preprocess import PreprocessParams, to_model_input

IGNORE = 127
LUNG = 255


class MemberDataset(Dataset[tuple[torch.Tensor, int, int]]):
    """(member input [3,M,M] float32, label, group) per image.

    `lungs`: the U-Net probability maps [n,1,s,s] as the worker computes them, or None for
    the without-segmentation ablation (the lung channel is then zeros, and no lung crop).
    `lung_crop`, `lung_mask`: as the bundle's MemberSpec. `groups`: an integer per image passed
    through (the source, for the source adversary); -1 without.
    """

    def __init__(
        self,
        images: np.ndarray,
        lungs: np.ndarray | None,
        labels: np.ndarray,
        params: PreprocessParams,
        input_size: int,
        augment: Augmenter | None = None,
        lung_crop: float | None = None,
        groups: np.ndarray | None = None,
        lung_mask: float | None = None,
    ) -> None:
        if lungs is not None and len(lungs) != len(images):
            raise ValueError(f"{len(lungs)} lung maps for {len(images)} images")
        if len(labels) != len(images):
            raise ValueError(f"{len(labels)} labels for {len(images)} images")
        self.images, self.lungs, self.labels = images, lungs, np.asarray(labels)
        self.params, self.input_size, self.augment = params, input_size, augment
        self.lung_crop = None if lungs is None else lung_crop
        self.lung_mask = None if lungs is None else lung_mask
        self.groups = np.full(len(images), -1) if groups is None else np.asarray(groups)
        if len(self.groups) != len(images):
            raise ValueError(f"{len(self.groups)} groups for {len(images)} images")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        image = self.images[i]
        lung = None if self.lungs is None else self.lungs[i, 0].astype(np.float32)
        if self.augment is not None:
            if lung is not None:  # the same geometry for the lung map, at the image's size
                side = image.shape[0]
                lung = cv2.resize(lung, (side, side), interpolation=cv2.INTER_LINEAR)
            image, lung = self.augment(image, lung)
        x = to_model_input(image[None], self.params)
        lung_batch = np.zeros_like(x) if lung is None else lung[None, None]
        member = member_input(x, lung_batch, self.input_size, self.lung_crop, self.lung_mask)[0]
        return torch.from_numpy(member), int(self.labels[i]), int(self.groups[i])


class SegmentationDataset(Dataset[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """(U-Net input [1,s,s], lung target [1,s,s], valid [1,s,s]) from uint8 0/127/255 masks."""

    def __init__(
        self,
        images: np.ndarray,
        masks: np.ndarray,
        params: PreprocessParams,
        input_size: int,
        augment: Augmenter | None = None,
    ) -> None:
        if images.shape != masks.shape:
            raise ValueError(f"images {images.shape} and masks {masks.shape} differ")
        self.images, self.masks = images, masks
        self.params, self.input_size, self.augment = params, input_size, augment

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image, mask = self.images[i], self.masks[i]
        if self.augment is not None:
            image, augmented = self.augment(image, mask)
            assert augmented is not None
            mask = augmented
        x = resize_batch(to_model_input(image[None], self.params), self.input_size)[0]
        s = self.input_size
        small = cv2.resize(mask, (s, s), interpolation=cv2.INTER_NEAREST)
        target = (small == LUNG).astype(np.float32)[None]
        valid = (small != IGNORE).astype(np.float32)[None]
        return torch.from_numpy(x), torch.from_numpy(target), torch.from_numpy(valid)


def sampling_weights(
    labels: np.ndarray,
    sources: np.ndarray | None = None,
    same_source_share: float = 0.0,
) -> np.ndarray:
    """Per-image draw weights: each class drawn equally often; with `same_source_share` > 0,
    that share of each class's draws goes to the sources that hold both classes (the only
    contrast where the source says nothing about the label), spread evenly over their images,
    the rest to the other sources' images. On the pool every COVID-19 image is from ieee8023:
    raising the share of ieee8023 other pneumonia among the negatives weakens "looks like a
    case-report figure" as a cue for COVID-19."""
    labels = np.asarray(labels)
    weights = np.zeros(len(labels), dtype=np.float64)
    mixed = np.zeros(len(labels), dtype=bool)
    if sources is not None and same_source_share > 0:
        srcs = np.asarray(sources)
        both = [s for s in np.unique(srcs) if len(np.unique(labels[srcs == s])) > 1]
        mixed = np.isin(srcs, both)
    for label in np.unique(labels):
        in_class = labels == label
        groups = [(in_class & mixed, same_source_share), (in_class & ~mixed, 1 - same_source_share)]
        if not groups[0][0].any() or not groups[1][0].any():  # one group only: it takes all
            groups = [(in_class, 1.0)]
        for members, share in groups:
            weights[members] = share / members.sum()
    return weights


def training_sampler(
    labels: np.ndarray,
    balanced: bool,
    generator: torch.Generator,
    sources: np.ndarray | None = None,
    same_source_share: float = 0.0,
) -> Sampler[int]:
    """Class-balanced (each class drawn equally often, optionally weighting the same-source
    contrast: `sampling_weights`) or plain random order, one epoch long."""
    if not balanced:
        return RandomSampler(range(len(labels)), generator=generator)
    weights = sampling_weights(labels, sources, same_source_share)
    return WeightedRandomSampler(
        weights.tolist(), num_samples=len(labels), replacement=True, generator=generator
    )


def _reseed_worker(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    if info is None:  # pragma: no cover - only called in workers
        return
    seed = torch.initial_seed() % 2**31  # derived from the loader's (seeded) generator
    np.random.seed(seed)
    augment = getattr(info.dataset, "augment", None)
    if augment is not None:
        augment.reseed(seed)


def loader(
    dataset: Dataset[Any],
    batch_size: int,
    *,
    sampler: Sampler[int] | None = None,
    generator: torch.Generator | None = None,
    num_workers: int = 0,
    pin_memory: bool = False,
    drop_last: bool = False,
) -> DataLoader[Any]:
    # fork: workers share the parent's image arrays copy-on-write; spawn/forkserver (the
    # default from Python 3.14) would pickle them into every worker, every epoch.
    context = "fork" if num_workers and "fork" in mp.get_all_start_methods() else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        multiprocessing_context=context,
        sampler=sampler,
        shuffle=False,
        num_workers=num_workers,
        worker_init_fn=_reseed_worker if num_workers else None,
        generator=generator,
        pin_memory=pin_memory,
        drop_last=drop_last,
        persistent_workers=False,
    )


def take(array: np.ndarray, rows: Sequence[int] | np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array[np.asarray(rows, dtype=np.int64)])
