"""The model bundle contract (DESIGN.md): manifest schema, loading and validation.

A bundle is a folder written by `training/` export. Both the node host (preprocessing
parameters, reference index) and the workers (ONNX models) load it through `load_bundle`,
which refuses a bundle whose schema version, class map, preprocessing or checksums do not match.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

from worker.classes import CLASS_MAP
from worker.preprocess import PREPROCESS_VERSION, PreprocessParams

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"


class BundleError(Exception):
    """The bundle cannot be used; the message says why."""


class FileRef(BaseModel):
    file: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="a name in the bundle")
    sha256: str


class MemberSpec(FileRef):
    name: str
    architecture: str
    input_size: int = Field(description="H = W of the classifier input")
    lung_crop: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="None: the member sees the whole image; a margin: the square around the "
        "U-Net's lungs grown by this fraction per side (worker.model_input.member_input)",
    )
    lung_mask: float | None = Field(
        default=None,
        ge=0.0,
        le=0.5,
        description="None: nothing masked; a dilation: the image outside the U-Net's lungs "
        "grown by this fraction of the input side is set to the mean gray (applied after "
        "the crop; worker.model_input.member_input)",
    )
    embedding_dim: int
    validation_metrics: dict[str, float] = Field(default_factory=dict)
    pretrained: dict[str, str] | None = Field(
        default=None,
        description="provenance of the initial (ImageNet) weights: package, distribution, "
        "version, licence, file, sha256; None: trained from scratch or from a checkpoint",
    )


class SegmentationSpec(FileRef):
    architecture: str = "unet"
    input_size: int
    validation_metrics: dict[str, float] = Field(default_factory=dict)


class IndexSpec(BaseModel):
    index: FileRef
    items: FileRef = Field(description="JSON lines, one row per index label: id, label, source")
    dim: int
    space: str = "cosine"
    count: int
    k: int = 4
    ef_search: int = 128
    m: int = 16
    ef_construction: int = 200


class SanityThresholds(BaseModel):
    """Basic image sanity, on the decoded display image (worker.gate.sanity_signals)."""

    min_side: int = Field(default=128, ge=1, description="pixels: the shorter side at least")
    max_aspect: float = Field(default=3.0, ge=1.0, description="longer / shorter side at most")
    min_dynamic_range: float = Field(
        default=40.0, ge=0.0, description="gray levels between the 0.5th and 99.5th percentile"
    )
    min_std: float = Field(default=10.0, ge=0.0, description="gray levels: not (near-)constant")
    max_high_frequency: float = Field(
        default=0.35,
        ge=0.0,
        le=1.0,
        description="share of the variance above the finest scale of a 256 px copy: not noise",
    )


class LungThresholds(BaseModel):
    """Lung-field plausibility of the U-Net's map (worker.gate.lung_signals)."""

    min_field: float = Field(description="area fraction of the smaller of the two lung fields")
    min_total: float = Field(description="area fraction of both fields together, at least")
    max_total: float = Field(description="area fraction of both fields together, at most")
    min_sides: float = Field(
        description="each field's centroid this far (fraction of the width) on its own side "
        "of the midline"
    )
    min_symmetry: float = Field(description="smaller / larger field area")
    min_vertical_overlap: float = Field(
        description="shared rows of the two fields / rows of the shorter one"
    )
    min_apex: float = Field(
        description="the fields' width in their lowest quarter / in their highest quarter "
        "(apices up: above 1)"
    )


class OodSpec(BaseModel):
    """The one-class score of ImageNet-pretrained features against the training images."""

    features: FileRef = Field(
        description="ONNX: image [N,1,s,s] in [0,1] (the preprocessed image resized) -> "
        "features [N,D] (global average pool)"
    )
    stats: FileRef = Field(
        description=".npz: mean [D], precision [D,D] (float32); the probes' weights [D] and "
        "biases [] when their thresholds are set"
    )
    architecture: str
    input_size: int = Field(ge=32)
    dim: int = Field(ge=1)
    threshold: float = Field(gt=0.0, description="refused above this score")
    method: str = "mahalanobis(ledoit-wolf)"
    min_upright: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="linear probe on the same features (stats upright_w, upright_b): the "
        "probability that the film is upright and not rotated, at least; None: not checked",
    )
    min_whole: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="linear probe (stats whole_w, whole_b): the probability that the whole "
        "chest is in the image, not a heavy crop, at least; None: not checked",
    )
    min_frontal: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="linear probe (stats frontal_w, frontal_b): the probability that the film "
        "is a frontal view, not a lateral one, at least; None: not checked",
    )


class GateSpec(BaseModel):
    """The input gate (worker.gate): which images are analysed at all. Optional: a bundle
    without it analyses every image the header checks let through."""

    version: int = 1
    sanity: SanityThresholds = Field(default_factory=SanityThresholds)
    lungs: LungThresholds
    ood: OodSpec
    calibration: dict[str, object] = Field(
        default_factory=dict, description="what the thresholds were calibrated on"
    )


class ReferenceScores(BaseModel):
    """Ensemble scores of held-out images: what the node's drift check compares the scores
    of its recent instances with (`dicom_node.learning.drift`). Optional: a bundle without
    it gets no drift check ("no reference distribution")."""

    source: str = Field(description="which images, e.g. 'calibration set: 412 images'")
    scores: list[float] = Field(min_length=1, description="ensemble probabilities, ascending")


class Interval(BaseModel):
    """A value with its 95 % bootstrap interval."""

    value: float
    low: float
    high: float


class Calibration(BaseModel):
    """How `cxr-train calibrate` chose this bundle's threshold on a hospital's own labelled
    images (training.calibrate); the model card says the same in words."""

    dataset: str = Field(description="the dataset CSV's file name and sha256")
    images: int = Field(description="images scored")
    patient_groups: int
    positives: int
    negatives: int
    not_scored: int = Field(description="images the bundle's input gate refused")
    target_sensitivity: float = Field(gt=0.0, le=1.0)
    threshold: Interval
    sensitivity: Interval
    specificity: Interval
    bootstrap: int = Field(description="resamples of whole patient groups")
    seed: int
    previous_version: str
    previous_device_uid: str
    previous_threshold: float
    previous_sensitivity: Interval = Field(description="at the previous threshold, same images")
    previous_specificity: Interval
    calibrated_at: datetime


class Manifest(BaseModel):
    schema_version: int
    name: str
    version: str
    created: datetime
    device_uid: str = Field(description="DICOM UID of this model version (new per version)")
    random_weights: bool = Field(
        default=False, description="True for plumbing bundles: untrained, scores mean nothing"
    )
    class_map: list[str]
    threshold: float = Field(ge=0.0, le=1.0)
    preprocessing: PreprocessParams
    members: list[MemberSpec] = Field(min_length=1)
    segmentation: SegmentationSpec
    index: IndexSpec
    embedding_member: str
    gate: GateSpec | None = Field(
        default=None, description="the input gate; None: every image is analysed (as before)"
    )
    training_data: dict[str, object] = Field(default_factory=dict)
    config: dict[str, object] = Field(default_factory=dict)
    reference_scores: ReferenceScores | None = Field(
        default=None, description="held-out scores for the node's drift check; None: no check"
    )
    embedding_space: str | None = Field(
        default=None,
        description="device UID of the bundle whose networks (and so embeddings) these are: "
        "a recalibrated bundle names its source's, so it shares that bundle's hospital index; "
        "None: its own device UID",
    )
    calibration: Calibration | None = Field(
        default=None, description="the threshold was chosen on a hospital's data: how"
    )

    @property
    def hospital_space(self) -> str:
        """The hospital-index space of this bundle's embeddings."""
        return self.embedding_space or self.device_uid


def sha256_file(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


class Bundle:
    """A validated bundle on disk: its manifest, folder and fingerprint."""

    def __init__(self, root: Path, manifest: Manifest, fingerprint: str) -> None:
        self.root = root
        self.manifest = manifest
        self.fingerprint = fingerprint

    def path(self, ref: FileRef) -> Path:
        return self.root / ref.file

    @property
    def member_by_name(self) -> dict[str, MemberSpec]:
        return {m.name: m for m in self.manifest.members}


def load_bundle(root: Path, verify_checksums: bool = True) -> Bundle:
    """Read and check a bundle; raise BundleError with the reason when it must not be used."""
    root = Path(root)
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        raise BundleError(f"no {MANIFEST_NAME} in {root}")
    raw = manifest_path.read_bytes()
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise BundleError(f"{manifest_path} is not JSON: {exc}") from exc
    if data.get("schema_version") != SCHEMA_VERSION:
        raise BundleError(
            f"bundle schema version {data.get('schema_version')!r} is not the supported "
            f"{SCHEMA_VERSION}"
        )
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        raise BundleError(f"invalid manifest: {exc}") from exc
    if manifest.class_map != CLASS_MAP:
        raise BundleError(f"class map {manifest.class_map} does not match the expected {CLASS_MAP}")
    names = [m.name for m in manifest.members]
    if len(set(names)) != len(names):
        raise BundleError(f"duplicate member names: {names}")
    if manifest.embedding_member not in names:
        raise BundleError(f"embedding member {manifest.embedding_member!r} is not a member")
    embedding_dim = {m.name: m.embedding_dim for m in manifest.members}[manifest.embedding_member]
    if manifest.index.dim != embedding_dim:
        raise BundleError(
            f"index dim {manifest.index.dim} differs from the embedding member's {embedding_dim}"
        )
    if manifest.preprocessing.version != PREPROCESS_VERSION:
        raise BundleError(
            f"bundle preprocessing version {manifest.preprocessing.version} is not "
            f"this code's {PREPROCESS_VERSION}"
        )
    if verify_checksums:
        refs: list[FileRef] = [*manifest.members, manifest.segmentation]
        refs += [manifest.index.index, manifest.index.items]
        if manifest.gate is not None:
            refs += [manifest.gate.ood.features, manifest.gate.ood.stats]
        for ref in refs:
            path = root / ref.file
            if not path.is_file():
                raise BundleError(f"missing bundle file {ref.file}")
            actual = sha256_file(path)
            if actual != ref.sha256:
                raise BundleError(
                    f"checksum mismatch for {ref.file}: manifest "
                    f"{ref.sha256[:12]}..., file {actual[:12]}..."
                )
    fingerprint = hashlib.sha256(raw).hexdigest()
    return Bundle(root, manifest, fingerprint)
