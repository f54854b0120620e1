"""Typed views of the training stages' result files, read back by later stages.

The files keep the JSON shape their writers give them (`result.json` of a member, written by
`training.classify`, and of the U-Net, written by `training.segment`): these models read them,
ignoring the fields no consumer needs (history, fingerprints of the inputs), so that a
consumer reads `result.run.input_size` rather than `result["run"]["input_size"]`.

`Json` is the one alias for what stays an untyped JSON object: the evaluation report's sections
and the export summary, written as they are built and rendered by `training.report`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Self

from pydantic import BaseModel, ConfigDict

Json = dict[str, Any]

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
