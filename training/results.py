"""Typed views of the training stages' result files, read back by later stages.

The files keep the JSON shape their writers give them. `result.json` of a member (written by
`training.classify`) and of the U-Net (`training.segment`) are read by pydantic models that
ignore the fields no consumer needs (history, fingerprints of the inputs), so that a consumer
reads `result.run.input_size` rather than `result["run"]["input_size"]`.

The evaluation report (`report.json`, `training.evaluate` with `training.sections`) and the
export summary (`export.json`, `training.export_run`) are built as dicts and written as they are:
their shapes are TypedDicts here, so the dicts stay the JSON (old runs read as before) and
every key a reader uses is checked. A float that is NaN while the report is built is null in
the file (`training.evaluate._clean`): such fields are `float | None`.
"""

from __future__ import annotations

from pathlib import Path
from typing import NotRequired, Self, TypedDict, final

from pydantic import BaseModel, ConfigDict

RESULT_FILE = "result.json"


class _Result(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class StageResult(_Result):
    """What every stage result says: the split it was trained on (`splits.split_sha`)."""

    split_sha: str | None = None

    @classmethod
    def read(cls, folder: Path) -> Self:
        """The stage folder's result.json."""
        return cls.model_validate_json((Path(folder) / RESULT_FILE).read_bytes())


class MemberInput(_Result):
    """The input a member was trained on: serving and evaluation must build the same."""

    name: str
    architecture: str
    input_size: int
    lung_crop: float | None = None
    lung_mask: float | None = None


class MemberResult(StageResult):
    """A trained ensemble member (`training.classify.train_member`)."""

    run: MemberInput
    parameters: int
    best_epoch: int
    selected_on: str
    validation: dict[str, float | None]
    pretrained: dict[str, str] | None = None  # training.pretrained provenance, if it started so

    def validation_metrics(self) -> dict[str, float]:
        """The validation metrics that are defined."""
        return {k: float(v) for k, v in self.validation.items() if v is not None}


class MaskScores(_Result):
    """Held-out test masks, one entry per image."""

    ids: list[str]
    groups: list[str]
    sources: list[str]
    dice: list[float]
    iou: list[float]


class SegmentationResult(StageResult):
    """The trained lung U-Net (`training.segment.train_segmentation`)."""

    architecture: str
    parameters: int
    input_size: int
    best_epoch: int
    train_masks: int
    val_masks: int
    val_dice: float | None = None
    val_iou: float | None = None
    test: MaskScores


# --------------------------------------------------------------------------- report.json


class EstimateJson(TypedDict):
    """`training.metrics.Estimate.as_dict`: a value with its 95% bootstrap interval."""

    value: float | None
    low: float | None
    high: float | None
    splits: int
    samples: int


#: Metric name (`training.metrics.METRICS`) -> its estimate.
Estimates = dict[str, EstimateJson]


class SplitCounts(TypedDict):
    """Images per stratum (source/label) and patient groups of one split's sets."""

    split: int
    train: dict[str, int]
    train_groups: int
    val: dict[str, int]
    val_groups: int
    test: dict[str, int]
    test_groups: int


class DataSection(TypedDict):
    """The data the report is about. `csv`, `load_summary`, `skipped`, `limit`: as the cache
    recorded them; the internal report adds the strata and splits, the external one a note."""

    images: int
    csv: object
    load_summary: object
    skipped: NotRequired[object]
    limit: NotRequired[object]
    patient_groups: NotRequired[int]
    strata: NotRequired[dict[str, int]]
    mixed_sources: NotRequired[list[str]]
    splits: NotRequired[list[SplitCounts]]
    train_licences: NotRequired[dict[str, int]]
    licence_terms: NotRequired[str]
    note: NotRequired[str]


class ThresholdSection(TypedDict):
    value: float
    method: str
    chosen_on: str


class Headline(TypedDict):
    estimates: Estimates
    split0: dict[str, float]  # training.metrics.binary_metrics at the threshold
    thresholds: list[float]
    splits_used: list[int]
    test_images_split0: int


class SameSource(TypedDict):
    """The contrast within the sources that hold both classes (none: a note)."""

    sources: list[str]
    note: NotRequired[str]
    estimates: NotRequired[Estimates]
    n: NotRequired[int]
    positives: NotRequired[int]
    splits_used: NotRequired[int]
    labels_split0: NotRequired[dict[str, int]]


class MemberSection(TypedDict):
    """One member alone on test; the rest from its result.json (None when it has none)."""

    test: Estimates
    validation: dict[str, float | None]
    selected_on: str | None
    best_epoch: int | None
    architecture: str | None
    input_size: int | None
    lung_crop: float | None
    lung_mask: float | None
    parameters: int | None


class Confusion(TypedDict):
    tn: int
    fp: int
    fn: int
    tp: int


class Curves(TypedDict):
    confusion: Confusion
    threshold: float
    figures: dict[str, str]  # roc, pr, confusion, histogram -> PNG name (with matplotlib)


class Embeddings(TypedDict):
    method: str
    points: int
    figures: dict[str, str]  # by_label, by_source -> PNG name
    sets: dict[str, int]


class Retrieval(TypedDict):
    """kNN vote on the embedding member: reference = split-0 training set, query = test."""

    k: int
    reference: int
    queries: int
    estimates: Estimates
    neighbours_same_label: float | None
    distance_within_class: float | None
    distance_across_classes: float | None
    neighbour_distance_same_label: float | None
    neighbour_distance_other_label: float | None
    space: str


class Breakdown(TypedDict):
    """The ensemble's metrics on one source or subgroup, pooled over the splits."""

    n: int
    positives: int
    splits_used: int
    estimates: Estimates


class GroupSections(TypedDict):
    per_source: dict[str, Breakdown]
    per_subgroup: dict[str, dict[str, Breakdown]]  # sex, age band, view -> value -> metrics


class DayBin(TypedDict):
    days: str
    n: int
    covid: int
    mean_score: float | None


class Days(TypedDict):
    """Out-of-sample score against days since admission (none recorded: a note)."""

    n: int
    note: NotRequired[str]
    bins: NotRequired[list[DayBin]]
    spearman_covid: NotRequired[float | None]
    figures: NotRequired[dict[str, str]]


class CommonSections(GroupSections):
    """The sections the internal and the external report share."""

    headline: Headline
    same_source: SameSource
    members: dict[str, MemberSection]
    curves: Curves
    embeddings: Embeddings
    retrieval: Retrieval
    days: Days


class MaskSource(TypedDict):
    n: int
    dice: float
    iou: float


class SegmentationSection(TypedDict, total=False):
    """The U-Net on held-out masks (none: only a note)."""

    note: str
    architecture: str | None
    parameters: int | None
    input_size: int | None
    train_masks: int | None
    val_masks: int | None
    val_dice: float | None
    test_masks: int
    dice: EstimateJson
    iou: EstimateJson
    per_source: dict[str, MaskSource]


class AblationVariant(TypedDict):
    description: str
    note: NotRequired[str]  # when the variant was not trained
    auc: NotRequired[EstimateJson]
    difference_vs_baseline: NotRequired[EstimateJson]


class Ablation(TypedDict, total=False):
    """The ablation member retrained without each choice (disabled: only a note)."""

    note: str
    member: str
    baseline: EstimateJson
    variants: dict[str, AblationVariant]  # layout.NO_SEG, layout.NO_PREP -> result
    figure: str


class LungMasking(TypedDict):
    lung_fraction: float
    original: EstimateJson
    lungs_masked_out: EstimateJson
    lungs_only: EstimateJson


class ShortcutAudit(TypedDict):
    lung_masking: LungMasking
    source_from_embeddings: NotRequired[dict[str, EstimateJson]]
    source_from_trivial_features: NotRequired[dict[str, EstimateJson]]
    label_from_trivial_features: NotRequired[EstimateJson | None]
    note: NotRequired[str]  # the external report: no source probes


class Case(TypedDict):
    id: str
    source: str
    score: float


class Cases(TypedDict):
    """Split-0 test images to look at (dataset ids only)."""

    threshold: float
    confident_positive: list[Case]
    confident_negative: list[Case]
    false_positive: list[Case]
    false_negative: list[Case]


class DistanceSummary(TypedDict):
    n: int
    quantiles: dict[str, float]  # p0, p5, p50, p95, p100


class NonChestDistances(DistanceSummary):
    kinds: dict[str, int]
    distances: list[float]


class Separation(TypedDict):
    """Nearest-reference distances of test vs non-chest images (training.separation)."""

    metric: str
    test: DistanceSummary
    non_chest: NonChestDistances
    auc_non_chest_farther: float | None
    non_chest_beyond_test_p95: float | None


class EvaluationReport(CommonSections):
    """report.json: `kind` "internal" (the run's test splits) or "external" (another CSV)."""

    kind: str
    name: str
    version: str
    data: DataSection
    threshold: ThresholdSection
    segmentation: SegmentationSection
    ablation: Ablation
    shortcut_audit: ShortcutAudit
    plots: bool
    # the internal report only
    splits_missing: NotRequired[list[int]]
    pretrained: NotRequired[dict[str, dict[str, str] | None]]
    cases: NotRequired[Cases]
    retrieval_separation: NotRequired[Separation]


# --------------------------------------------------------------------------- export.json

#: |altered - base| over the test images (`training.invariance.change_summary`).
ChangeSummary = TypedDict(
    "ChangeSummary",
    {
        "n": int,
        "mean_abs_change": float,
        "median": float,
        "p90": float,
        "p95": float,
        "max": float,
        "fraction_over_0.05": float,
        "fraction_over_0.2": float,
        "mean_signed_change": float,
        "meets_target": bool,
    },
)


class Alteration(ChangeSummary):
    """One alteration of the invariance audit: its change summary and what it did."""

    description: str
    auc_altered: float | None
    per_source_mean_abs_change: dict[str, float]


class InvarianceAudit(TypedDict):
    """One bundle's scores under alterations that say nothing about disease."""

    bundle: str
    images: int
    auc_original: float | None
    limit_mean_abs_change: float
    alterations: dict[str, Alteration]  # training.invariance.PERTURBATIONS keys
    figure: NotRequired[str | None]


@final
class InvarianceNotMeasured(TypedDict):
    note: str


#: The audit of the bundle ("bundle") and of each variant (by kind).
InvarianceAudits = dict[str, InvarianceAudit]


class VariantResult(TypedDict):
    """An fp16 or int8 variant of the bundle, scored on test (failed: only the note)."""

    path: NotRequired[str]
    total_mb: NotRequired[float]
    auc: NotRequired[float]
    auc_change: NotRequired[float]
    same_source_auc: NotRequired[float]
    same_source_auc_change: NotRequired[float]
    max_score_change: NotRequired[float]
    calls_changed: NotRequired[int]
    note: str


class ExportResult(TypedDict):
    """export.json: the bundle, its serving check on the split-0 test set, its variants."""

    bundle: str
    device_uid: str
    total_mb: float
    max_bundle_mb: float
    sizes_mb: dict[str, float]  # file -> MB
    parity: dict[str, float]  # file -> max |ONNX - PyTorch|
    test_images: int
    onnx_auc: float
    onnx_same_source_auc: float
    torch_auc: float
    onnx_vs_torch_max_score_diff: float
    variants: dict[str, VariantResult]  # "fp16", "int8"
    invariance: NotRequired[InvarianceAudits | InvarianceNotMeasured]


class ExportSkipped(TypedDict):
    """`cxr-train all` on a host without the export's modules: no bundle, and why."""

    bundle: None
    skipped: str
