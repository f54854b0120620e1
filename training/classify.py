"""Training one ensemble member: the paper's recipe, with the reference code's faults fixed.

Adam with exponential learning-rate decay and L2 (weight decay), class-balanced sampling,
augmentation on the fly, mixed precision and channels-last on CUDA. Every epoch is
checkpointed (`last.pt`, resumable); the kept checkpoint (`best.pt`) is chosen on validation
AUC - or on the validation AUC of the sources holding both classes - never on test. Seeds
for initialisation, sampling and augmentation derive from the experiment seed, per epoch, so a
resumed run continues as the uninterrupted one would have.

After training, the best model scores every cached image (`predictions.npz`: probability and
embedding); evaluation and export read those.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from training.adversary import SourceAdversary, contested_classes, source_codes
from training.augment import make_augmenter
from training.cache import Cache
from training.config import ExperimentConfig
from training.data import same_source_rows
from training.datasets import MemberDataset, loader, take, training_sampler
from training.frozen_head import (
    FeatureViews,
    centre_on_features,
    feature_key,
    feature_views,
    head_outputs,
    train_head_epoch,
)
from training.metrics import roc_auc
from training.models import Classifier, count_parameters
from training.pretrained import PretrainedWeights, load_state, resolve_weights
from training.progress import progress
from training.splits import Split, split_sha
from training.torchutil import (
    amp_context,
    array_sha256,
    derive_seed,
    eval_mode,
    fingerprint,
    load_checkpoint,
    needs_grad_scaler,
    prepare_stage,
    read_json,
    save_checkpoint,
    seed_everything,
    write_json,
)
from worker.classes import CxrClass
from worker.preprocess import PreprocessParams

log = logging.getLogger(__name__)

LungInput = Literal["unet", "zeros"]
ImageInput = Literal["preprocessed", "raw"]


@dataclass(frozen=True)
class MemberRun:
    """Everything that defines one member's training."""

    name: str
    architecture: str
    input_size: int
    head: tuple[int, int, int]
    epochs: int
    batch_size: int
    lr: float
    lr_decay: float
    weight_decay: float
    balanced_sampling: bool
    selection: str
    amp: bool
    channels_last: bool
    num_workers: int
    seed: int
    checkpoint: str | None = None
    lung: LungInput = "unet"
    images: ImageInput = "preprocessed"
    same_source_share: float = 0.0
    lung_crop: float | None = None
    lung_mask: float | None = None
    source_adversary: float = 0.0
    pretrained: dict[str, str] | None = None  # PretrainedConfig: package, file, sha256
    imagenet_input: tuple[float, float] | None = None  # preprocessing mean, std
    embedding: str = "relu"
    warmup_epochs: int = 0
    backbone_lr_factor: float = 1.0
    patience: int | None = None
    feature_views: int = 0


def member_run(
    cfg: ExperimentConfig,
    name: str,
    split: int,
    variant: str | None = None,
    checkpoint_base: Path | None = None,
) -> MemberRun:
    m = cfg.member(name)
    c = cfg.classifier
    checkpoint = m.checkpoint
    if checkpoint is not None and checkpoint_base is not None:
        from training.config import expand

        checkpoint = str(expand(checkpoint, checkpoint_base))
    return MemberRun(
        name=name if variant is None else f"{name}--{variant}",
        architecture=m.architecture,
        input_size=cfg.member_size(m),
        head=c.head,
        epochs=m.epochs or c.epochs,
        batch_size=m.batch_size or c.batch_size,
        lr=m.lr or c.lr,
        lr_decay=c.lr_decay,
        weight_decay=c.weight_decay,
        balanced_sampling=c.balanced_sampling,
        selection=c.selection,
        amp=c.amp,
        channels_last=c.channels_last,
        num_workers=c.num_workers,
        seed=derive_seed(cfg.seed, "member", name, split, variant),
        checkpoint=checkpoint,
        lung="zeros" if variant == "no-seg" else "unet",
        images="raw" if variant == "no-prep" else "preprocessed",
        same_source_share=c.same_source_share,
        lung_crop=None if variant == "no-seg" else c.lung_crop,
        lung_mask=None if variant == "no-seg" else c.lung_mask,
        source_adversary=c.source_adversary,
        pretrained=None if m.pretrained is None else m.pretrained.model_dump(),
        imagenet_input=None
        if m.pretrained is None
        else (cfg.preprocessing.mean, cfg.preprocessing.std),
        embedding=c.embedding,
        warmup_epochs=c.warmup_epochs,
        backbone_lr_factor=c.backbone_lr_factor,
        patience=c.patience,
        feature_views=c.feature_views,
    )


#: MemberRun fields added after bundle 1.1.0: left out of the stage fingerprint at their
#: defaults, so that runs made before them are still recognised as done.
_LATER_FIELDS: dict[str, Any] = {
    "pretrained": None,
    "imagenet_input": None,
    "embedding": "relu",
    "warmup_epochs": 0,
    "backbone_lr_factor": 1.0,
    "patience": None,
    "feature_views": 0,
}


def _fingerprinted(run: MemberRun) -> dict[str, Any]:
    return {k: v for k, v in asdict(run).items() if k not in _LATER_FIELDS or v != _LATER_FIELDS[k]}


def pretrained_weights(run: MemberRun) -> PretrainedWeights | None:
    """The member's ImageNet weights, located and sha256-checked; None from scratch."""
    if run.pretrained is None:
        return None
    p = run.pretrained
    return resolve_weights(p["package"], p["file"], p.get("sha256"))


def build_member(run: MemberRun) -> Classifier:
    """A fresh member, or one initialised from `run.checkpoint` (ours or torchvision's) or
    from `run.pretrained` (ImageNet weights in an installed package)."""
    weights = pretrained_weights(run)
    if weights is not None:
        return Classifier(
            run.architecture,
            run.head,
            backbone_state=load_state(weights),
            embedding="l2" if run.embedding == "l2" else "relu",
            imagenet_input=run.imagenet_input,
        )
    if run.checkpoint is None:
        return Classifier(
            run.architecture, run.head, embedding="l2" if run.embedding == "l2" else "relu"
        )
    payload = torch.load(run.checkpoint, map_location="cpu", weights_only=True)
    if isinstance(payload, dict) and "model" in payload and "architecture" in payload:
        if payload["architecture"] != run.architecture:
            raise ValueError(
                f"{run.checkpoint} holds a {payload['architecture']}, not a {run.architecture}"
            )
        model = Classifier.from_meta(payload)
        model.load_state_dict(payload["model"])
        if model.head_widths != run.head:
            raise ValueError(f"{run.checkpoint} has head {model.head_widths}, not {run.head}")
        return model
    state = payload.get("state_dict", payload) if isinstance(payload, dict) else payload
    return Classifier(run.architecture, run.head, backbone_state=state)


def load_member(folder: Path, which: str = "best.pt") -> Classifier:
    payload = load_checkpoint(folder / which)
    model = Classifier.from_meta(payload)
    model.load_state_dict(payload["model"])
    return model.eval()


def predict(
    model: Classifier,
    images: np.ndarray,
    lungs: np.ndarray | None,
    params: PreprocessParams,
    input_size: int,
    device: torch.device,
    batch_size: int = 32,
    lung_crop: float | None = None,
    lung_mask: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """P(COVID-19) [N] and embeddings [N,D], in fp32, from worker-identical inputs."""
    labels = np.zeros(len(images), dtype=np.int64)
    dataset = MemberDataset(
        images, lungs, labels, params, input_size, lung_crop=lung_crop, lung_mask=lung_mask
    )
    probs: list[np.ndarray] = []
    embeddings: list[np.ndarray] = []
    model = model.to(device)
    with eval_mode(model):
        for x, _, _ in loader(dataset, batch_size):
            logits, emb = model(x.to(device))
            probs.append(
                torch.softmax(logits.float(), dim=1)[:, int(CxrClass.COVID19)].cpu().numpy()
            )
            embeddings.append(emb.float().cpu().numpy())
    if not probs:
        return np.zeros(0), np.zeros((0, model.embedding_dim), dtype=np.float32)
    return np.concatenate(probs).astype(np.float64), np.concatenate(embeddings)


def _validation_metrics(
    prob: np.ndarray, labels: np.ndarray, same_source: np.ndarray
) -> dict[str, float]:
    eps = 1e-7
    p = np.clip(prob, eps, 1 - eps)
    loss = float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p))) if len(p) else 0.0
    return {
        "val_auc": roc_auc(labels, prob) if len(p) else float("nan"),
        "val_same_source_auc": roc_auc(labels[same_source], prob[same_source])
        if same_source.any()
        else float("nan"),
        "val_loss": loss,
        "val_accuracy": float(np.mean((prob >= 0.5) == labels)) if len(p) else float("nan"),
    }


def _brief(entry: dict[str, Any]) -> str:
    return ", ".join(
        f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
        for k, v in entry.items()
        if k != "epoch"
    )


def _selection_value(metrics: dict[str, float], selection: str) -> tuple[float, str]:
    """The checkpoint criterion; falls back when the chosen AUC is undefined on this split."""
    for name in (selection, "val_auc"):
        if np.isfinite(metrics[name]):
            return metrics[name], name
    return -metrics["val_loss"], "-val_loss"


def _centre_on_training_images(
    model: Classifier, run: MemberRun, dataset: MemberDataset, device: torch.device, out_dir: Path
) -> None:
    """The kept model's retrieval embedding centred on its un-augmented training images
    (served-like inputs: `Classifier.centre_embedding`), written back into best.pt."""
    augment, dataset.augment = dataset.augment, None
    try:
        batches = (x.to(device) for x, _, _ in loader(dataset, run.batch_size))
        model.centre_embedding(batches)
    finally:
        dataset.augment = augment
    _store_centre(model, out_dir, "training images, no augmentation, eval mode")


def _store_centre(model: Classifier, out_dir: Path, centred_on: str) -> None:
    """Write the centred model back into best.pt."""
    payload = load_checkpoint(out_dir / "best.pt")
    payload["model"] = model.state_dict()
    payload["centred_on"] = centred_on
    save_checkpoint(out_dir / "best.pt", payload)


def _stored_features(
    run: MemberRun,
    cfg: ExperimentConfig,
    model: Classifier,
    images: np.ndarray,
    lungs: np.ndarray | None,
    cache: Cache,
    folder: Path,
    device: torch.device,
) -> FeatureViews | None:
    """The warm-up's stored features of every cache row (`run.feature_views`), or None when
    the warm-up runs the backbone (no warm-up, no views, or a source adversary, which needs
    the image path)."""
    if run.feature_views <= 0 or run.warmup_epochs <= 0 or run.source_adversary > 0:
        return None
    every = MemberDataset(
        images,
        lungs,
        cache.labels,
        cache.params,
        run.input_size,
        lung_crop=run.lung_crop,
        lung_mask=run.lung_mask,
    )
    # Seeded by the experiment and the member, not the split: every split reads the same views.
    seed = derive_seed(cfg.seed, "views", run.name)
    key = feature_key(model, every, {"augment": cfg.augment.model_dump(mode="json")})
    augment = make_augmenter(cfg.augment, "probability", seed)
    return feature_views(model, every, augment, run.feature_views, seed, folder, key, device)


def _set_trainable(model: Classifier, frozen_backbone: bool) -> None:
    """Train mode; with a frozen backbone its weights get no gradient (Adam leaves them as
    they are) and its BatchNorm statistics and drop-connect stay in eval mode."""
    model.train()
    for p in model.backbone_parameters():
        p.requires_grad_(not frozen_backbone)
    if frozen_backbone:
        model.features.eval()


def _stopped_early(history: list[dict[str, Any]], best_epoch: int, run: MemberRun) -> bool:
    """True once `run.patience` epochs after the warm-up brought no better checkpoint."""
    if run.patience is None or not history:
        return False
    last = len(history) - 1
    return last >= run.warmup_epochs and last - max(best_epoch, run.warmup_epochs - 1) >= (
        run.patience
    )


def train_member(
    run: MemberRun,
    cfg: ExperimentConfig,
    cache: Cache,
    lungs: np.ndarray | None,
    split: Split,
    out_dir: Path,
    device: torch.device,
    resume: bool = False,
    features_dir: Path | None = None,
) -> dict[str, Any]:
    """Train (or resume, or reuse) one member on `split`; return result.json's content.

    `lungs`: the U-Net maps of every cache row (for `run.images`); ignored when run.lung is
    "zeros". `features_dir`: where the warm-up's stored features live (`run.feature_views`;
    shared by the splits), default `out_dir/features`.
    """
    images_all = cache.raw if run.images == "raw" else cache.images
    if images_all is None:
        raise ValueError("the cache has no raw variant: rebuild it with [cache] raw_variant")
    if run.lung == "unet" and lungs is None:
        raise ValueError(f"{run.name}: no lung maps (train the segmentation first)")
    lungs_all = lungs if run.lung == "unet" else None
    labels_all = cache.labels
    train_rows, val_rows = cache.rows(split.train), cache.rows(split.val)
    if len(np.unique(labels_all[train_rows])) < 2:
        raise ValueError(f"{run.name}: the training set holds one class only")
    same_source = same_source_rows(cache.records, val_rows)
    stage_fp = fingerprint(
        {
            "run": _fingerprinted(run),
            "cache": cache.info.get("key"),
            "split": split.model_dump(),
            "augment": cfg.augment.model_dump(mode="json"),
            "lungs": None if lungs_all is None else array_sha256(lungs_all),
        }
    )
    state = prepare_stage(out_dir, stage_fp, resume)
    if state == "done":
        log.info("%s: already trained with these settings", run.name)
        result: dict[str, Any] = read_json(out_dir / "result.json")
        return result

    seed_everything(run.seed)
    model = build_member(run).to(device)
    memory_format = (
        torch.channels_last
        if run.channels_last and device.type == "cuda"
        else torch.contiguous_format
    )
    model = model.to(memory_format=memory_format)
    train_labels = labels_all[train_rows]
    train_sources = np.array([cache.records[r].source for r in train_rows])
    source_code, source_names = source_codes(list(train_sources))
    adversary = None
    if run.source_adversary > 0:
        contested = contested_classes(train_labels, source_code)
        adversary = SourceAdversary(
            model.embedding_dim, len(source_names), contested, run.source_adversary
        ).to(device)
        log.info(
            "%s: source adversary (weight %g) within classes %s over %s",
            run.name,
            run.source_adversary,
            contested,
            source_names,
        )
    head_parameters = model.head_parameters()
    if adversary is not None:
        head_parameters += list(adversary.parameters())
    # The backbone learns at lr x backbone_lr_factor (frozen in the warm-up); at factor 1,
    # one group in the order runs before these options had (their last.pt still resumes).
    backbone = model.backbone_parameters()
    groups: list[dict[str, Any]] = (
        [{"params": backbone + head_parameters}]
        if run.backbone_lr_factor == 1.0
        else [
            {"params": backbone, "lr": run.lr * run.backbone_lr_factor},
            {"params": head_parameters},
        ]
    )
    optimizer = torch.optim.Adam(groups, lr=run.lr, weight_decay=run.weight_decay)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=run.lr_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=needs_grad_scaler(device, run.amp))
    start_epoch, best, best_epoch = 0, -np.inf, -1
    history: list[dict[str, Any]] = []
    if state == "resume":
        last = load_checkpoint(out_dir / "last.pt", device)
        model.load_state_dict(last["model"])
        if adversary is not None:
            adversary.load_state_dict(last["adversary"])
        optimizer.load_state_dict(last["optimizer"])
        scheduler.load_state_dict(last["scheduler"])
        scaler.load_state_dict(last["scaler"])
        start_epoch, best, best_epoch = last["epoch"] + 1, last["best"], last["best_epoch"]
        history = last["history"]
        log.info("%s: resuming at epoch %d", run.name, start_epoch + 1)

    augment = make_augmenter(cfg.augment, "probability", run.seed)
    dataset = MemberDataset(
        take(images_all, train_rows),
        None if lungs_all is None else take(lungs_all, train_rows),
        train_labels,
        cache.params,
        run.input_size,
        augment,
        lung_crop=run.lung_crop,
        lung_mask=run.lung_mask,
        groups=source_code,
    )
    val_images = take(images_all, val_rows)
    val_lungs = None if lungs_all is None else take(lungs_all, val_rows)
    val_labels = labels_all[val_rows]
    meta = {**model.meta(), "name": run.name}
    stored = _stored_features(
        run, cfg, model, images_all, lungs_all, cache, features_dir or out_dir / "features", device
    )
    for epoch in range(start_epoch, run.epochs):
        if _stopped_early(history, best_epoch, run):
            log.info("%s: early stop after epoch %d", run.name, epoch)
            break
        frozen = epoch < run.warmup_epochs
        if frozen and stored is not None:  # the head on the frozen backbone's stored features
            _set_trainable(model, frozen_backbone=True)
            total = train_head_epoch(
                model,
                optimizer,
                stored,
                train_rows,
                train_labels,
                (run.balanced_sampling, train_sources, run.same_source_share),
                run.batch_size,
                derive_seed(run.seed, "epoch", epoch),
                device,
            )
            count, source_loss, source_rows, source_correct = 1, 0.0, 0, 0
            scheduler.step()
            prob, _ = head_outputs(model, stored.plain[val_rows], device)
        else:
            generator = torch.Generator().manual_seed(derive_seed(run.seed, "epoch", epoch))
            if augment is not None:
                augment.reseed(derive_seed(run.seed, "augment", epoch))
            batches = loader(
                dataset,
                run.batch_size,
                sampler=training_sampler(
                    train_labels,
                    run.balanced_sampling,
                    generator,
                    train_sources,
                    run.same_source_share,
                ),
                generator=generator,
                num_workers=run.num_workers,
                pin_memory=device.type == "cuda",
                drop_last=len(dataset) > run.batch_size,
            )
            _set_trainable(model, frozen)
            total, count = 0.0, 0
            source_loss, source_rows, source_correct = 0.0, 0, 0
            for x, y, g in progress(
                batches, f"{run.name} epoch {epoch + 1}/{run.epochs}", transient=True
            ):
                x = x.to(device, non_blocking=True, memory_format=memory_format)
                y = y.to(device, non_blocking=True)
                with amp_context(device, run.amp):
                    logits, embedding = model(x)
                    class_loss = F.cross_entropy(logits.float(), y)
                    loss = class_loss
                    if adversary is not None:
                        adv_loss, rows, correct = adversary.loss(
                            embedding.float(), y, g.to(device, non_blocking=True)
                        )
                        loss = loss + adv_loss
                        source_loss += float(adv_loss.detach()) * rows
                        source_rows += rows
                        source_correct += correct
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                total += float(class_loss.detach()) * len(x)
                count += len(x)
            scheduler.step()
            prob, _ = predict(
                model,
                val_images,
                val_lungs,
                cache.params,
                run.input_size,
                device,
                lung_crop=run.lung_crop,
                lung_mask=run.lung_mask,
            )
        metrics = _validation_metrics(prob, val_labels, same_source)
        value, used = _selection_value(metrics, run.selection)
        entry = {
            "epoch": epoch,
            "backbone": "frozen" if frozen else "trained",
            "train_loss": total / max(count, 1),
            **(
                {
                    "train_source_loss": source_loss / max(source_rows, 1),
                    "train_source_accuracy": source_correct / max(source_rows, 1),
                }
                if adversary is not None
                else {}
            ),
            **metrics,
            "selected_on": used,
        }
        history.append(entry)
        if value > best:
            best, best_epoch = value, epoch
            save_checkpoint(
                out_dir / "best.pt",
                {"model": model.state_dict(), "epoch": epoch, "fingerprint": stage_fp, **meta},
            )
        save_checkpoint(
            out_dir / "last.pt",
            {
                "model": model.state_dict(),
                **({"adversary": adversary.state_dict()} if adversary is not None else {}),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "epoch": epoch,
                "best": best,
                "best_epoch": best_epoch,
                "history": history,
                "fingerprint": stage_fp,
                **meta,
            },
        )
        log.info("%s epoch %d/%d: %s", run.name, epoch + 1, run.epochs, _brief(entry))

    best_model = load_member(out_dir).to(device)
    if stored is not None and history[best_epoch]["backbone"] == "frozen":
        # the pretrained backbone as it was: its stored features give the member's outputs
        if best_model.embedding_kind == "l2":
            centre_on_features(best_model, stored.plain[train_rows], device)
            _store_centre(best_model, out_dir, "training images, no augmentation, eval mode")
        prob, emb = head_outputs(best_model, stored.plain, device)
    else:
        if best_model.embedding_kind == "l2":
            _centre_on_training_images(best_model, run, dataset, device, out_dir)
        prob, emb = predict(
            best_model,
            images_all,
            lungs_all,
            cache.params,
            run.input_size,
            device,
            lung_crop=run.lung_crop,
            lung_mask=run.lung_mask,
        )
    np.savez_compressed(
        out_dir / "predictions.npz", ids=np.array(cache.ids), probability=prob, embedding=emb
    )
    chosen = history[best_epoch]
    weights = pretrained_weights(run)
    result = {
        "fingerprint": stage_fp,
        "split_sha": split_sha(split),
        "run": asdict(run),
        "parameters": count_parameters(best_model),
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "pretrained": None if weights is None else weights.provenance(),
        "selected_on": chosen["selected_on"],
        "validation": {k: v for k, v in chosen.items() if k.startswith("val_")},
        "history": history,
    }
    write_json(out_dir / "result.json", result)
    return result


@dataclass
class MemberPredictions:
    ids: list[str]
    probability: np.ndarray
    embedding: np.ndarray


def read_predictions(folder: Path, ids: list[str]) -> MemberPredictions:
    """A trained member's scores for `ids` (in that order)."""
    with np.load(folder / "predictions.npz") as npz:
        stored = npz["ids"].tolist()
        where = {rid: i for i, rid in enumerate(stored)}
        rows = np.array([where[rid] for rid in ids], dtype=np.int64)
        return MemberPredictions(ids, npz["probability"][rows], npz["embedding"][rows])
