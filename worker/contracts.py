"""Typed payloads that cross a process boundary (Celery tasks between node host and workers)."""

from __future__ import annotations

import base64
from typing import Any, TypeVar

import cv2
import numpy as np
from pydantic import BaseModel, Field

#: Celery task names that cross the node/worker boundary (the node's own tasks:
#: dicom_node.jobs.queue).
INFER = "cxr.infer"  # node -> worker: an InferRequest
FINALIZE = "cxr.finalize"  # worker -> node: an InferResult
ANALYSIS_FAILED = "cxr.analysis_failed"  # worker -> node: the job could not be analysed
NOT_ANALYSED = "cxr.not_analysed"  # worker -> node: the input gate refused the image


def encode_png(image: np.ndarray) -> str:
    """Lossless, compact transport of a uint8 image: PNG, base64 text (JSON-safe)."""
    ok, buf = cv2.imencode(".png", image)
    if not ok:  # pragma: no cover - cv2 only fails on unsupported dtypes
        raise ValueError("PNG encoding failed")
    return base64.b64encode(buf.tobytes()).decode("ascii")


def decode_png(text: str) -> np.ndarray:
    raw = np.frombuffer(base64.b64decode(text), dtype=np.uint8)
    image = cv2.imdecode(raw, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ValueError("payload image is not a PNG")
    return image


class AnalysisFailed(BaseModel):
    """Worker or node step -> node (queue "node"): the job could not be analysed, and why."""

    job_id: str
    error: str


Payload = TypeVar("Payload", bound=BaseModel)


def from_message(model: type[Payload], payload: Any, *positional: Any) -> Payload:
    """A task's payload model. Messages queued before payloads were typed (by the node
    version before an upgrade) carry the model's fields as positional arguments instead of
    one dict: they are read in field order, so none already queued is lost."""
    if isinstance(payload, dict) and not positional:
        return model.model_validate(payload)
    values = (payload, *positional)
    if len(values) > len(model.model_fields):
        raise ValueError(
            f"{model.__name__}: {len(values)} arguments for {len(model.model_fields)} fields"
        )
    return model.model_validate(dict(zip(model.model_fields, values, strict=False)))


class InferRequest(BaseModel):
    """Node host -> worker (queue "infer"): the preprocessed image, never the DICOM dataset."""

    job_id: str
    bundle_fingerprint: str = Field(description="sha256 of the manifest the node preprocessed for")
    image_png: str = Field(description="base64 PNG of the preprocessed uint8 image, S x S")


class SimilarItem(BaseModel):
    """One neighbour found by retrieval."""

    kind: str = Field(description="'reference' (bundle reference set) or 'hospital'")
    item_id: str
    label: str | None = None
    source: str | None = None
    distance: float
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    sop_instance_uid: str | None = None
    sop_class_uid: str | None = None
    study_date: str | None = Field(default=None, description="hospital items: DICOM DA")
    probability: float | None = Field(
        default=None, description="hospital items: the AI probability when it was analysed"
    )


class GateRefusal(BaseModel):
    """Worker (or the node's own pixel checks) -> node (queue "node"): the input gate found
    that the image is not one the model is meant for. No score exists for it."""

    job_id: str
    bundle_name: str
    bundle_version: str
    device_uid: str
    reasons: list[str] = Field(min_length=1, description="one per failed signal, for the SR")
    scores: dict[str, float] = Field(default_factory=dict, description="each signal's score")


class InferResult(BaseModel):
    """Worker -> node host (queue "node")."""

    job_id: str
    bundle_name: str
    bundle_version: str
    device_uid: str
    probability: float = Field(ge=0.0, le=1.0, description="ensemble probability of COVID-19")
    member_probabilities: dict[str, float]
    embedding: list[float]
    lung_mask_png: str = Field(description="base64 PNG of the lung probability map (uint8)")
    inference_ms: float
