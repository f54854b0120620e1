"""Write trained (or random) networks as a model bundle that `worker.bundle.load_bundle` accepts.

Steps: member and U-Net -> ONNX (checked against PyTorch), reference embeddings -> hnswlib
index + items file, then manifest.json and model_card.md. The bundle is written into a
temporary sibling folder and moved into place only after it loads cleanly. Used by the export
stage (`training.export_run`, a run's models) and for the random plumbing bundle
(`training.plumbing`).

The ONNX files come from the TorchScript-based exporter (`dynamo=False`): it needs no
onnxscript, and these convolutional networks have no control flow that would need the newer
one. The parity check below is what vouches for each file.
"""

from __future__ import annotations

import json
import shutil
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import hnswlib
import numpy as np
import onnx
import onnxruntime as ort
import torch
from pydantic import BaseModel, ConfigDict, field_validator
from pydicom.uid import generate_uid
from torch import nn

from training.models import Classifier, ClassifierExport, UNet, UNetExport, count_parameters
from training.pretrained import describe as describe_weights
from training.report import member_input_text
from worker.bundle import (
    MANIFEST_NAME,
    SCHEMA_VERSION,
    Bundle,
    FileRef,
    IndexSpec,
    Manifest,
    MemberSpec,
    ReferenceScores,
    SegmentationSpec,
    load_bundle,
    sha256_file,
)
from worker.classes import CLASS_MAP
from worker.inference import (
    INPUT_NAME,
    MEMBER_CHANNELS,
    MEMBER_OUTPUTS,
    SEGMENTATION_OUTPUT,
    member_input,
    resize_batch,
)
from worker.markdown import markdown_table
from worker.preprocess import PreprocessParams, to_model_input

OPSET = 17
PARITY_TOLERANCE = 1e-4
INDEX_FILE = "index.bin"
ITEMS_FILE = "index.jsonl"
SEGMENTATION_FILE = "segmentation.onnx"
MODEL_CARD = "model_card.md"


class ExportError(Exception):
    """An export step produced something the worker must not serve."""


# --------------------------------------------------------------------------- ONNX


def _export(module: nn.Module, example: torch.Tensor, path: Path, outputs: Sequence[str]) -> None:
    module.eval()
    dynamic = {name: {0: "batch"} for name in (INPUT_NAME, *outputs)}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy-exporter notice
        torch.onnx.export(
            module,
            (example,),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=[INPUT_NAME],
            output_names=list(outputs),
            dynamic_axes=dynamic,
            do_constant_folding=True,
        )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def export_classifier(model: Classifier, path: Path, input_size: int) -> Path:
    """Member -> ONNX: image [N,3,H,W] -> probability [N], embedding [N,D]."""
    example = torch.zeros(2, len(MEMBER_CHANNELS), input_size, input_size)
    _export(ClassifierExport(model), example, path, MEMBER_OUTPUTS)
    return path


def export_unet(model: UNet, path: Path, input_size: int) -> Path:
    """U-Net -> ONNX: image [N,1,S,S] -> lung probability [N,1,S,S]."""
    if input_size % model.size_multiple:
        raise ExportError(f"U-Net input {input_size} is not a multiple of {model.size_multiple}")
    example = torch.zeros(2, 1, input_size, input_size)
    _export(UNetExport(model), example, path, (SEGMENTATION_OUTPUT,))
    return path


def onnx_parity(module: nn.Module, path: Path, inputs: np.ndarray) -> float:
    """Max |ONNX Runtime - PyTorch| over all outputs for `inputs` (CPU, fp32)."""
    module.eval()
    with torch.no_grad():
        expected = module(torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32)))
    if isinstance(expected, torch.Tensor):
        expected = (expected,)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    actual = session.run(None, {INPUT_NAME: inputs.astype(np.float32)})
    if len(actual) != len(expected):
        raise ExportError(f"{path.name}: {len(actual)} ONNX outputs, {len(expected)} in PyTorch")
    diff = 0.0
    for a, e in zip(actual, expected, strict=True):
        e_np = e.numpy()
        if np.shape(a) != e_np.shape:
            raise ExportError(f"{path.name}: output shape {np.shape(a)} != {e_np.shape}")
        diff = max(diff, float(np.max(np.abs(np.asarray(a) - e_np))))
    return diff


def check_parity(
    module: nn.Module, path: Path, inputs: np.ndarray, tolerance: float = PARITY_TOLERANCE
) -> float:
    """`onnx_parity`, raising ExportError when it reaches the tolerance."""
    diff = onnx_parity(module, path, inputs)
    if not diff < tolerance:
        raise ExportError(f"{path.name}: ONNX differs from PyTorch by {diff:.3g} >= {tolerance}")
    return diff


# --------------------------------------------------------------------------- reference index


class ReferenceItem(BaseModel):
    """One row of index.jsonl. Only these fields exist: never a patient name or id."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    label: str
    source: str
    #: The dataset's own label of the image (the pool's: "covid", "other_pneumonia",
    #: "negative" for no pneumonia), finer than the class: the SR names a similar image's
    #: label as it is (dicom_node.results.labels). Optional; old indexes lack it.
    finding: str | None = None

    @field_validator("label")
    @classmethod
    def _known_label(cls, value: str) -> str:
        if value not in CLASS_MAP:
            raise ValueError(f"label {value!r} is not one of {CLASS_MAP}")
        return value


def build_index(
    embeddings: np.ndarray,
    items: Sequence[ReferenceItem],
    out_dir: Path,
    *,
    m: int = 16,
    ef_construction: int = 200,
    ef_search: int = 128,
    k: int = 4,
) -> IndexSpec:
    """Write index.bin (hnswlib, cosine; label = row) and index.jsonl (one item per row).

    M, ef_construction and ef_search are recorded in the manifest and used by the node for
    this index and the hospital's; the defaults give recall@4 >= 0.99 at under 1 ms per
    query on a million clustered 256-d embeddings (docs/BENCHMARKS.md, bench/retrieval.py).
    """
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2 or embeddings.shape[0] != len(items) or not len(items):
        raise ExportError(f"{embeddings.shape} embeddings for {len(items)} items")
    if not np.isfinite(embeddings).all():
        raise ExportError("reference embeddings are not all finite")
    if (np.linalg.norm(embeddings, axis=1) == 0).any():
        raise ExportError("a reference embedding is all zeros: cosine distance is undefined")
    ids = [item.id for item in items]
    if len(set(ids)) != len(ids):
        raise ExportError("reference item ids are not unique")
    n, dim = embeddings.shape
    index = hnswlib.Index(space="cosine", dim=dim)
    index.init_index(max_elements=n, ef_construction=ef_construction, M=m, random_seed=100)
    index.set_num_threads(1)  # insertion order fixed: the same inputs give the same file
    index.add_items(embeddings, np.arange(n))
    index.set_ef(ef_search)
    index.save_index(str(out_dir / INDEX_FILE))
    with (out_dir / ITEMS_FILE).open("w", encoding="utf-8") as fh:
        for item in items:
            fh.write(json.dumps(item.model_dump(exclude_none=True), ensure_ascii=False) + "\n")
    return IndexSpec(
        index=FileRef(file=INDEX_FILE, sha256=sha256_file(out_dir / INDEX_FILE)),
        items=FileRef(file=ITEMS_FILE, sha256=sha256_file(out_dir / ITEMS_FILE)),
        dim=dim,
        space="cosine",
        count=n,
        k=k,
        ef_search=ef_search,
        m=m,
        ef_construction=ef_construction,
    )


# --------------------------------------------------------------------------- embeddings


def torch_embeddings(
    segmentation: UNet,
    seg_size: int,
    member: Classifier,
    member_size: int,
    images: np.ndarray,
    params: PreprocessParams,
    batch_size: int = 16,
    lung_crop: float | None = None,
    lung_mask: float | None = None,
) -> np.ndarray:
    """Embeddings of preprocessed uint8 [N,S,S] images, assembled exactly as the worker does."""
    seg = UNetExport(segmentation).eval()
    cls = ClassifierExport(member).eval()
    out: list[np.ndarray] = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = to_model_input(images[start : start + batch_size], params)
            lung = seg(torch.from_numpy(resize_batch(x, seg_size))).numpy()
            _, emb = cls(torch.from_numpy(member_input(x, lung, member_size, lung_crop, lung_mask)))
            out.append(emb.numpy())
    return np.concatenate(out).astype(np.float32)


# --------------------------------------------------------------------------- bundle


@dataclass
class MemberExport:
    name: str
    model: Classifier
    input_size: int
    validation_metrics: dict[str, float] = field(default_factory=dict)
    lung_crop: float | None = None
    lung_mask: float | None = None
    pretrained: dict[str, str] | None = None  # training.pretrained.PretrainedWeights.provenance


@dataclass
class SegmentationExport:
    model: UNet
    input_size: int
    validation_metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class ExportReport:
    bundle: Bundle
    parity: dict[str, float]  # file -> max |ONNX - PyTorch|
    sizes: dict[str, int]  # file -> bytes

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes.values())


def _model_card(
    manifest: Manifest, parity: dict[str, float], parameters: dict[str, int], notes: str
) -> str:
    lines = [f"# Model card: {manifest.name} {manifest.version}", ""]
    if manifest.random_weights:
        lines += [
            "> **RANDOM WEIGHTS. These models were never trained. Their scores, masks and",
            "> similar-image lists mean nothing.** This bundle exists to prove the plumbing",
            "> (export, loading, inference, reporting). Never use it for anything clinical.",
            "",
        ]
    lines += [
        "Intended use: research only; not for diagnostic use. A score supports, never replaces,"
        " a radiologist's reading.",
        "",
        f"- created: {manifest.created.isoformat()}",
        f"- device UID: {manifest.device_uid}",
        f"- class map: {manifest.class_map}; decision threshold {manifest.threshold}",
        f"- preprocessing: {manifest.preprocessing.model_dump()}",
        f"- member input channels: {', '.join(MEMBER_CHANNELS)}",
        "",
    ]

    def validation(metrics: dict[str, float]) -> str:
        return ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()) or "none"

    seg = manifest.segmentation
    rows: list[tuple[object, ...]] = [
        (
            m.name,
            m.architecture,
            member_input_text(m.model_dump()),
            f"{parameters[m.file]:,}",
            f"{parity[m.file]:.2e}",
            validation(m.validation_metrics),
        )
        for m in manifest.members
    ]
    rows.append(
        (
            "segmentation",
            seg.architecture,
            seg.input_size,
            f"{parameters[seg.file]:,}",
            f"{parity[seg.file]:.2e}",
            validation(seg.validation_metrics),
        )
    )
    lines += markdown_table(
        ("model", "architecture", "input", "parameters", "ONNX parity", "validation"), rows
    )
    if any(m.pretrained for m in manifest.members):
        lines += ["", "Initial weights:", ""]
        lines += [f"- {m.name}: {describe_weights(m.pretrained)}" for m in manifest.members]
    idx = manifest.index
    lines += [
        "",
        f"Retrieval: {idx.count} reference items, embeddings of `{manifest.embedding_member}`"
        f" ({idx.dim}-d, {idx.space}), k = {idx.k}.",
        "",
        f"Training data: {json.dumps(manifest.training_data)}",
    ]
    if notes:
        lines += ["", notes.strip()]
    return "\n".join(lines) + "\n"


def write_bundle(
    out_dir: Path,
    *,
    name: str,
    version: str,
    members: Sequence[MemberExport],
    segmentation: SegmentationExport,
    reference_embeddings: np.ndarray,
    reference_items: Sequence[ReferenceItem],
    embedding_member: str,
    preprocessing: PreprocessParams,
    threshold: float,
    training_data: dict[str, object],
    random_weights: bool = False,
    config: dict[str, object] | None = None,
    card_notes: str = "",
    sample_images: np.ndarray,
    reference_scores: ReferenceScores | None = None,
) -> ExportReport:
    """Export everything into `out_dir` (absent or empty), validate with load_bundle, report.

    `sample_images` (preprocessed uint8 [N,S,S], a few are enough) feed the ONNX parity checks
    through the same segmentation -> member path as the worker. Realistic inputs matter: on
    random-noise inputs a network's activations leave their usual range and fp32 differences
    between two correct runtimes grow with them.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ExportError(f"{out_dir} exists and is not an empty folder")
    names = [m.name for m in members]
    if len(set(names)) != len(names) or embedding_member not in names:
        raise ExportError(f"member names {names} must be unique and include {embedding_member!r}")
    size = preprocessing.size
    if sample_images.dtype != np.uint8 or sample_images.shape[1:] != (size, size):
        raise ExportError(f"sample images must be uint8 [N,{size},{size}]")
    # Batch 3 while the export traced batch 2: the parity check also proves a dynamic batch.
    x = to_model_input(sample_images[:3], preprocessing)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    parity: dict[str, float] = {}
    parameters: dict[str, int] = {}
    # Not tempfile.mkdtemp: its 0700 mode would stay on the published folder.
    work = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    work.mkdir()
    try:
        seg = segmentation
        seg_export = UNetExport(seg.model).eval()
        seg_in = resize_batch(x, seg.input_size)
        export_unet(seg.model, work / SEGMENTATION_FILE, seg.input_size)
        parity[SEGMENTATION_FILE] = check_parity(seg_export, work / SEGMENTATION_FILE, seg_in)
        parameters[SEGMENTATION_FILE] = count_parameters(seg.model)
        seg_spec = SegmentationSpec(
            file=SEGMENTATION_FILE,
            sha256=sha256_file(work / SEGMENTATION_FILE),
            architecture=f"unet(base_width={seg.model.base_width}, depth={seg.model.depth})",
            input_size=seg.input_size,
            validation_metrics=seg.validation_metrics,
        )
        with torch.no_grad():
            lung = seg_export(torch.from_numpy(seg_in)).numpy()

        member_specs: list[MemberSpec] = []
        for m in members:
            file = f"{m.name}.onnx"
            export_classifier(m.model, work / file, m.input_size)
            parity[file] = check_parity(
                ClassifierExport(m.model),
                work / file,
                member_input(x, lung, m.input_size, m.lung_crop, m.lung_mask),
            )
            parameters[file] = count_parameters(m.model)
            member_specs.append(
                MemberSpec(
                    file=file,
                    sha256=sha256_file(work / file),
                    name=m.name,
                    architecture=m.model.architecture,
                    input_size=m.input_size,
                    lung_crop=m.lung_crop,
                    lung_mask=m.lung_mask,
                    embedding_dim=m.model.embedding_dim,
                    validation_metrics=m.validation_metrics,
                    pretrained=m.pretrained,
                )
            )
        index_spec = build_index(reference_embeddings, reference_items, work)
        emb_dim = next(m.model.embedding_dim for m in members if m.name == embedding_member)
        if index_spec.dim != emb_dim:
            raise ExportError(
                f"reference embeddings are {index_spec.dim}-d, {embedding_member} gives {emb_dim}-d"
            )
        manifest = Manifest(
            schema_version=SCHEMA_VERSION,
            name=name,
            version=version,
            created=datetime.now(UTC),
            device_uid=generate_uid(),
            random_weights=random_weights,
            class_map=list(CLASS_MAP),
            threshold=threshold,
            preprocessing=preprocessing,
            members=member_specs,
            segmentation=seg_spec,
            index=index_spec,
            embedding_member=embedding_member,
            training_data=training_data,
            config={"member_channels": list(MEMBER_CHANNELS), "opset": OPSET, **(config or {})},
            reference_scores=reference_scores,
        )
        (work / MANIFEST_NAME).write_text(
            manifest.model_dump_json(indent=2) + "\n", encoding="utf-8"
        )
        (work / MODEL_CARD).write_text(
            _model_card(manifest, parity, parameters, card_notes), encoding="utf-8"
        )
        load_bundle(work)  # refuse to publish anything the worker would refuse
        if out_dir.exists():
            out_dir.rmdir()
        work.rename(out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    bundle = load_bundle(out_dir)
    sizes = {p.name: p.stat().st_size for p in sorted(out_dir.iterdir()) if p.is_file()}
    return ExportReport(bundle=bundle, parity=parity, sizes=sizes)
