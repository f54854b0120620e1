"""Lung U-Net: training on the pool's lung masks (127 = ignore), Dice/IoU on held-out masks,
and the lung probability maps that become channel 2 of every classifier input.

Trained on the masks of split 0's training images, selected on the validation images' masks,
evaluated on the test images' masks. Model-made ("weak") masks may be added to training
(`segmentation.use_weak_masks`), never to evaluation. The maps are computed exactly as the
worker does: `resize_batch(to_model_input(image), input_size)` -> sigmoid(U-Net).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from training.augment import make_augmenter
from training.cache import Cache
from training.config import ExperimentConfig
from training.datasets import IGNORE, LUNG, SegmentationDataset, loader
from training.models import UNet, UNetExport, count_parameters
from training.progress import progress
from training.splits import Split, split_sha
from training.torchutil import (
    derive_seed,
    eval_mode,
    fingerprint,
    load_checkpoint,
    prepare_stage,
    read_json,
    save_checkpoint,
    seed_everything,
    write_json,
)
from worker.atomic import atomic_file
from worker.model_input import resize_batch
from worker.preprocess import PreprocessParams, to_model_input

log = logging.getLogger(__name__)


def segmentation_loss(
    logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """BCE + soft Dice, both over the valid (not "ignore") pixels only."""
    bce = F.binary_cross_entropy_with_logits(logits, target, weight=valid, reduction="sum")
    bce = bce / valid.sum().clamp_min(1.0)
    prob = torch.sigmoid(logits) * valid
    t = target * valid
    inter = (prob * t).sum(dim=(1, 2, 3))
    denom = prob.sum(dim=(1, 2, 3)) + t.sum(dim=(1, 2, 3))
    dice = 1.0 - (2.0 * inter + 1.0) / (denom + 1.0)
    return bce + dice.mean()


def dice_iou(
    probability: np.ndarray, mask: np.ndarray, threshold: float = 0.5
) -> tuple[float, float]:
    """Dice and IoU of `probability >= threshold` against a 0/127/255 mask, ignoring 127."""
    valid = mask != IGNORE
    pred = (probability >= threshold) & valid
    truth = (mask == LUNG) & valid
    inter = float((pred & truth).sum())
    total = float(pred.sum() + truth.sum())
    union = float((pred | truth).sum())
    if total == 0:
        return 1.0, 1.0  # no lung, none predicted
    return 2.0 * inter / total, inter / union


def predict_lungs(
    unet: UNet,
    images: np.ndarray,
    params: PreprocessParams,
    input_size: int,
    device: torch.device,
    batch_size: int = 32,
) -> np.ndarray:
    """Lung probability maps float16 [N,1,s,s] of preprocessed uint8 images [N,S,S]."""
    export = UNetExport(unet).to(device)
    out = np.empty((len(images), 1, input_size, input_size), dtype=np.float16)
    with eval_mode(export):
        for start in range(0, len(images), batch_size):
            x = resize_batch(to_model_input(images[start : start + batch_size], params), input_size)
            out[start : start + len(x)] = export(torch.from_numpy(x).to(device)).float().cpu()
    return out


def evaluate_masks(
    unet: UNet,
    images: np.ndarray,
    masks: np.ndarray,
    params: PreprocessParams,
    input_size: int,
    device: torch.device,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-image Dice and IoU at the cache resolution (the map upsampled as the worker does)."""
    maps = predict_lungs(unet, images, params, input_size, device).astype(np.float32)
    full = resize_batch(maps, images.shape[1])[:, 0]
    scores = [dice_iou(p, m) for p, m in zip(full, masks, strict=True)]
    return np.array([d for d, _ in scores]), np.array([i for _, i in scores])


@dataclass
class _MaskSet:
    rows: np.ndarray
    images: np.ndarray
    masks: np.ndarray


def _mask_set(cache: Cache, ids: list[str], weak: bool = False) -> _MaskSet:
    rows = [r for r in cache.rows(ids).tolist() if r in cache.masks]
    masks = [cache.masks[r] for r in rows]
    if weak:
        extra = [
            r for r in cache.rows(ids).tolist() if r not in cache.masks and r in cache.weak_masks
        ]
        rows += extra
        masks += [cache.weak_masks[r] for r in extra]
    side = cache.params.size
    return _MaskSet(
        np.array(rows, dtype=np.int64),
        cache.images[rows] if rows else np.zeros((0, side, side), np.uint8),
        np.stack(masks) if masks else np.zeros((0, side, side), np.uint8),
    )


def load_unet(folder: Path, which: str = "best.pt") -> UNet:
    payload = load_checkpoint(folder / which)
    unet = UNet(base_width=payload["base_width"], depth=payload["depth"])
    unet.load_state_dict(payload["model"])
    return unet.eval()


def train_segmentation(
    cfg: ExperimentConfig,
    cache: Cache,
    split: Split,
    out_dir: Path,
    device: torch.device,
    resume: bool = False,
) -> dict[str, Any]:
    """Train (or resume, or reuse) the U-Net; return result.json's content."""
    seg = cfg.segmentation
    train = _mask_set(cache, split.train, weak=seg.use_weak_masks)
    val = _mask_set(cache, split.val)
    test = _mask_set(cache, split.test)
    if not len(train.rows):
        raise ValueError("no training image has a lung mask: the U-Net cannot be trained")
    stage_fp = fingerprint(
        {
            "cache": cache.info.get("key"),
            "train": train.rows.tolist(),
            "val": val.rows.tolist(),
            "segmentation": seg.model_dump(mode="json"),
            "augment": cfg.augment.model_dump(mode="json"),
            "seed": cfg.seed,
        }
    )
    state = prepare_stage(out_dir, stage_fp, resume)
    if state == "done":
        log.info("segmentation: already trained with these settings (%s)", out_dir)
        result: dict[str, Any] = read_json(out_dir / "result.json")
        return result

    seed = derive_seed(cfg.seed, "segmentation")
    seed_everything(seed)
    unet = UNet(base_width=seg.base_width, depth=seg.depth).to(device)
    optimizer = torch.optim.Adam(unet.parameters(), lr=seg.lr, weight_decay=seg.weight_decay)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=seg.lr_decay)
    start_epoch, best_dice, best_epoch = 0, -1.0, -1
    history: list[dict[str, float]] = []
    if state == "resume":
        last = load_checkpoint(out_dir / "last.pt", device)
        unet.load_state_dict(last["model"])
        optimizer.load_state_dict(last["optimizer"])
        scheduler.load_state_dict(last["scheduler"])
        start_epoch, best_dice, best_epoch = last["epoch"] + 1, last["best"], last["best_epoch"]
        history = last["history"]
        log.info("segmentation: resuming at epoch %d", start_epoch)

    augment = make_augmenter(cfg.augment_for_segmentation(), "labels", seed)
    dataset = SegmentationDataset(train.images, train.masks, cache.params, seg.input_size, augment)
    meta = {"base_width": seg.base_width, "depth": seg.depth, "input_size": seg.input_size}
    for epoch in range(start_epoch, seg.epochs):
        generator = torch.Generator().manual_seed(derive_seed(seed, "epoch", epoch))
        if augment is not None:
            augment.reseed(derive_seed(seed, "augment", epoch))
        batches = loader(
            dataset,
            seg.batch_size,
            sampler=torch.utils.data.RandomSampler(range(len(dataset)), generator=generator),
            generator=generator,
            num_workers=seg.num_workers,
            pin_memory=device.type == "cuda",
            drop_last=len(dataset) > seg.batch_size,
        )
        unet.train()
        total, count = 0.0, 0
        for x, target, valid in progress(
            batches, f"U-Net epoch {epoch + 1}/{seg.epochs}", transient=True
        ):
            x, target, valid = (t.to(device, non_blocking=True) for t in (x, target, valid))
            loss = segmentation_loss(unet(x), target, valid)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(x)
            count += len(x)
        scheduler.step()
        entry = {"epoch": epoch, "train_loss": total / max(count, 1)}
        if len(val.rows):
            dice, iou = evaluate_masks(
                unet, val.images, val.masks, cache.params, seg.input_size, device
            )
            entry.update(val_dice=float(dice.mean()), val_iou=float(iou.mean()))
            metric = float(dice.mean())
        else:  # no validation masks (tiny runs): the last epoch is kept
            metric = float(epoch)
        history.append(entry)
        if metric > best_dice:
            best_dice, best_epoch = metric, epoch
            save_checkpoint(
                out_dir / "best.pt",
                {"model": unet.state_dict(), "epoch": epoch, "fingerprint": stage_fp, **meta},
            )
        save_checkpoint(
            out_dir / "last.pt",
            {
                "model": unet.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch,
                "best": best_dice,
                "best_epoch": best_epoch,
                "history": history,
                "fingerprint": stage_fp,
                **meta,
            },
        )
        log.info(
            "U-Net epoch %d/%d: %s",
            epoch + 1,
            seg.epochs,
            ", ".join(f"{k} {v:.3f}" for k, v in entry.items() if k != "epoch"),
        )

    best = load_unet(out_dir).to(device)
    test_dice, test_iou = evaluate_masks(
        best, test.images, test.masks, cache.params, seg.input_size, device
    )
    records = [cache.records[r] for r in test.rows]
    result = {
        "fingerprint": stage_fp,
        "split_sha": split_sha(split),
        "architecture": f"unet(base_width={seg.base_width}, depth={seg.depth})",
        "parameters": count_parameters(best),
        "input_size": seg.input_size,
        "best_epoch": best_epoch,
        "train_masks": len(train.rows),
        "val_masks": len(val.rows),
        "val_dice": history[best_epoch]["val_dice"] if len(val.rows) else None,
        "val_iou": history[best_epoch]["val_iou"] if len(val.rows) else None,
        "test": {
            "ids": [r.id for r in records],
            "groups": [r.patient_group for r in records],
            "sources": [r.source for r in records],
            "dice": test_dice.tolist(),
            "iou": test_iou.tolist(),
        },
        "history": history,
    }
    write_json(out_dir / "result.json", result)
    return result


def write_lungmaps(path: Path, ids: list[str], maps: np.ndarray, unet_sha: str) -> None:
    with atomic_file(path) as fh:
        np.savez_compressed(fh, maps=maps, ids=np.array(ids), unet=np.array(unet_sha))


def read_lungmaps(path: Path, ids: list[str], unet_sha: str | None = None) -> np.ndarray | None:
    """The maps for `ids` in that order, or None when absent or made by another U-Net."""
    if not path.is_file():
        return None
    with np.load(path) as npz:
        if unet_sha is not None and str(npz["unet"]) != unet_sha:
            return None
        stored = npz["ids"].tolist()
        if stored != ids:
            return None
        maps: np.ndarray = npz["maps"]
    return maps
