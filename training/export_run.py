"""The export stage (`cxr-train export`): a run's split-0 models -> the model bundle and its
variants, checked as the worker runs them, with export.json and the model card's last section.

The bundle is written by `training.bundle_writer.write_bundle` (ONNX + parity < 1e-4 in fp32,
hnswlib index of the training set's embeddings, manifest with checksums, model card). Then it
is loaded with `worker.bundle.load_bundle` and scored on the split-0 test set by
`worker.inference.Ensemble` - the serving path - and compared with the PyTorch scores.

Variants (optional, beside the bundle in `variants/<kind>/`, each a complete bundle with its
own device UID): "fp16" stores every float weight in float16 with a Cast back to float32 in
the graph (half the size; computed in fp32, so it measures the precision lost in the weights;
onnxconverter-common, which converts whole graphs to fp16 compute, is not installed here);
"int8" is static int8 quantisation (QDQ, per-channel weights, calibrated on training images:
`training.quantize`). Each one's AUC change is measured on test.
"""

from __future__ import annotations

import json
import logging
import shutil
from math import nan
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from pydicom.uid import generate_uid

from training.bundle_writer import (
    MODEL_CARD,
    ExportError,
    MemberExport,
    ReferenceItem,
    SegmentationExport,
    torch_embeddings,
    write_bundle,
)
from training.cache import Cache
from training.card import card_notes
from training.classify import load_member, read_predictions
from training.config import ExperimentConfig
from training.data import Record, same_source_rows
from training.invariance import invariance_lines
from training.layout import RunPaths
from training.metrics import roc_auc
from training.models import count_parameters
from training.report import EXPORT_JSON, write_report
from training.results import (
    EvaluationReport,
    ExportResult,
    InvarianceAudits,
    InvarianceNotMeasured,
    MemberResult,
    SegmentationResult,
    VariantResult,
)
from training.segment import load_unet
from training.splits import SplitPlan
from training.torchutil import read_json, write_json
from worker.bundle import MANIFEST_NAME, Manifest, ReferenceScores, load_bundle, sha256_file
from worker.inference import Ensemble

log = logging.getLogger(__name__)

#: Training images whose activations calibrate the int8 variant.
INT8_CALIBRATION_IMAGES = 64
#: hnswlib stores, per item, the vector, a label and about 2*M links of 4 bytes on level 0.
_INDEX_BYTES_PER_DIM = 4
_INDEX_OVERHEAD_PER_ITEM = 2 * 16 * 4 + 64


def estimate_bundle_mb(parameters: int, references: int, dim: int) -> float:
    weights = parameters * 4
    index = references * (dim * _INDEX_BYTES_PER_DIM + _INDEX_OVERHEAD_PER_ITEM)
    return (weights + index + references * 80) / 1e6


def fp16_weights(src: Path, dst: Path) -> None:
    """Copy of an ONNX file whose float32 weights are stored as float16 (Cast back to float32)."""
    model = onnx.load(str(src))
    graph = model.graph
    initializers, casts = [], []
    for init in graph.initializer:
        if init.data_type == TensorProto.FLOAT and int(np.prod(init.dims)) >= 16:
            half = numpy_helper.to_array(init).astype(np.float16)
            name = f"{init.name}__fp16"
            initializers.append(numpy_helper.from_array(half, name))
            casts.append(
                helper.make_node(
                    "Cast", [name], [init.name], to=TensorProto.FLOAT, name=f"{name}_cast"
                )
            )
        else:
            initializers.append(init)
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend([*casts, *nodes])
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))


VARIANT_KINDS = ("fp16", "int8")


def make_variant(
    bundle_dir: Path, out_dir: Path, kind: str, calibration: np.ndarray | None = None
) -> Path:
    """A copy of the bundle with converted ONNX files, re-checksummed, with a new device UID.

    int8 needs `calibration`: preprocessed uint8 images [N,S,S] (a few dozen training images).
    """
    if kind not in VARIANT_KINDS:
        raise ValueError(f"unknown variant {kind!r}: choose from {VARIANT_KINDS}")
    inputs: dict[str, np.ndarray] = {}
    if kind == "int8":
        from training.quantize import calibration_inputs

        if calibration is None or not len(calibration):
            raise ExportError("the int8 variant needs calibration images")
        inputs = calibration_inputs(load_bundle(bundle_dir), calibration)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    shutil.copytree(bundle_dir, out_dir)
    manifest = Manifest.model_validate_json((out_dir / MANIFEST_NAME).read_text())
    for ref in [*manifest.members, manifest.segmentation]:
        path = out_dir / ref.file
        if kind == "fp16":
            fp16_weights(bundle_dir / ref.file, path)
        else:
            from training.quantize import int8_static

            int8_static(bundle_dir / ref.file, path, inputs[ref.file])
        ref.sha256 = sha256_file(path)
    manifest.version = f"{manifest.version}+{kind}"
    manifest.device_uid = generate_uid()
    manifest.config = {**manifest.config, "variant": kind, "variant_of": manifest.name}
    (out_dir / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=2) + "\n")
    card = out_dir / MODEL_CARD
    card.write_text(
        f"> Variant **{kind}** of {manifest.name} (its own device UID): the models below with"
        f" {kind} weights. Its measured AUC change and invariance are at the end of this card."
        "\n\n" + card.read_text(encoding="utf-8"),
        encoding="utf-8",
    )
    load_bundle(out_dir)
    return out_dir


def _serve(bundle_dir: Path, images: np.ndarray, batch: int = 32) -> np.ndarray:
    ens = Ensemble(load_bundle(bundle_dir), providers=["CPUExecutionProvider"])
    out: list[float] = []
    for start in range(0, len(images), batch):
        out += [p.probability for p in ens.predict(images[start : start + batch])]
    return np.asarray(out)


def _size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) / 1e6


def export_run(
    cfg: ExperimentConfig,
    paths: RunPaths,
    cache: Cache,
    plan: SplitPlan,
    out_dir: Path | None = None,
    replace: bool = False,
) -> ExportResult:
    """Write the bundle (and variants); return export.json's content (also written).

    With `replace`, an existing bundle at `out_dir` is swapped for the new one only once the
    new one has passed every check (a folder that is not a bundle is never replaced).
    """
    final = Path(out_dir or paths.bundle)
    out_dir = final
    if final.exists() and any(final.iterdir()):
        if not replace:
            raise ExportError(f"{final} is not empty (replace it with --overwrite)")
        if not (final / MANIFEST_NAME).is_file():
            raise ExportError(f"{final} holds no {MANIFEST_NAME}: not replacing it")
        out_dir = final.with_name(f".{final.name}.new")
        shutil.rmtree(out_dir, ignore_errors=True)
    report_path = paths.report / "report.json"
    if not report_path.is_file():
        raise ExportError("no evaluation report: run `cxr-train evaluate` before exporting")
    report: EvaluationReport = read_json(report_path)
    split = plan.splits[0]
    unet = load_unet(paths.segmentation)
    seg_result = SegmentationResult.read(paths.segmentation)
    members: list[MemberExport] = []
    for m in cfg.members:
        folder = paths.member(0, m.name)
        trained = MemberResult.read(folder)
        run = trained.run  # the input it was trained on
        members.append(
            MemberExport(
                m.name,
                load_member(folder),
                run.input_size,
                trained.validation_metrics(),
                lung_crop=run.lung_crop,
                lung_mask=run.lung_mask,
                pretrained=trained.pretrained,
            )
        )
    params = cache.params
    ref_rows = cache.rows(split.train)
    emb_member = next(m for m in members if m.name == cfg.embedding_member)
    total_params = count_parameters(unet) + sum(count_parameters(m.model) for m in members)
    estimate = estimate_bundle_mb(total_params, len(ref_rows), emb_member.model.embedding_dim)
    if estimate > cfg.export.max_bundle_mb:
        raise ExportError(
            f"the bundle would be about {estimate:.0f} MB (limit {cfg.export.max_bundle_mb:.0f}"
            " MB): choose smaller members or a smaller U-Net"
        )
    seg_size = cfg.segmentation.input_size
    embeddings = torch_embeddings(
        unet,
        seg_size,
        emb_member.model,
        emb_member.input_size,
        cache.images[ref_rows],
        params,
        lung_crop=emb_member.lung_crop,
        lung_mask=emb_member.lung_mask,
    )
    items = [
        ReferenceItem(
            id=cache.records[r].id,
            label=cache.records[r].label.label,
            source=cache.records[r].source,
            finding=cache.records[r].label_text.strip().lower() or None,
        )
        for r in ref_rows
    ]
    seg_metrics = {
        k: float(v)
        for k, v in (("val_dice", seg_result.val_dice), ("val_iou", seg_result.val_iou))
        if v is not None
    }
    test_dice = report.get("segmentation", {}).get("dice")
    if test_dice and test_dice["value"] is not None:
        seg_metrics["test_dice"] = float(test_dice["value"])
    test_rows = cache.rows(split.test)
    threshold = float(report["threshold"]["value"])
    # The node's drift check compares its recent scores with these (dicom_node.learning.drift).
    val_scores = np.mean(
        [read_predictions(paths.member(0, m.name), split.val).probability for m in cfg.members],
        axis=0,
    )
    reference = (
        ReferenceScores(
            source=f"validation set of split 0: {len(val_scores)} images (PyTorch scores of "
            "the exported networks)",
            scores=sorted(float(v) for v in val_scores),
        )
        if len(split.val)
        else None
    )
    counts: dict[str, int] = {}
    for r in ref_rows:
        key = f"{cache.records[r].source}/{cache.records[r].label.label}"
        counts[key] = counts.get(key, 0) + 1
    export = write_bundle(
        out_dir,
        name=cfg.name,
        version=cfg.version,
        members=members,
        segmentation=SegmentationExport(unet, seg_size, seg_metrics),
        reference_embeddings=embeddings,
        reference_items=items,
        embedding_member=cfg.embedding_member,
        preprocessing=params,
        threshold=threshold,
        training_data={
            "csv": cache.info.get("csv"),
            "images": len(cache),
            "train_images": len(split.train),
            "val_images": len(split.val),
            "test_images": len(split.test),
            "train_strata": counts,
            "splits": len(plan.splits),
            "pretrained_weights": any(m.checkpoint or m.pretrained for m in cfg.members),
        },
        config={"experiment": cfg.model_dump(mode="json")},
        card_notes=card_notes(cfg, report),
        sample_images=cache.images[test_rows[:8]] if len(test_rows) else cache.images[:8],
        reference_scores=reference,
    )
    total_mb = export.total_bytes / 1e6
    if total_mb >= cfg.export.max_bundle_mb:
        shutil.rmtree(out_dir)
        raise ExportError(
            f"bundle is {total_mb:.1f} MB, over the {cfg.export.max_bundle_mb} MB limit"
        )

    # The serving path on the test set, against the PyTorch scores of the same models.
    test_images = cache.images[test_rows]
    y = cache.labels[test_rows]
    served = _serve(out_dir, test_images)
    same_source = same_source_rows(cache.records, test_rows)
    torch_scores = np.mean(
        [read_predictions(paths.member(0, m.name), split.test).probability for m in cfg.members],
        axis=0,
    )
    variants: dict[str, VariantResult] = {}
    result: ExportResult = {
        "bundle": str(out_dir),
        "device_uid": export.bundle.manifest.device_uid,
        "total_mb": total_mb,
        "max_bundle_mb": cfg.export.max_bundle_mb,
        "sizes_mb": {f: b / 1e6 for f, b in export.sizes.items()},
        "parity": export.parity,
        "test_images": len(test_rows),
        "onnx_auc": roc_auc(y, served),
        "onnx_same_source_auc": roc_auc(y[same_source], served[same_source]),
        "torch_auc": roc_auc(y, torch_scores),
        "onnx_vs_torch_max_score_diff": float(np.max(np.abs(served - torch_scores)))
        if len(served)
        else 0.0,
        "variants": variants,
    }
    for kind, wanted in (("fp16", cfg.export.fp16), ("int8", cfg.export.int8)):
        if not wanted:
            continue
        target = (
            paths.variants / kind
            if final == paths.bundle
            else final.with_name(f"{final.name}-{kind}")
        )
        try:
            calibration = cache.images[ref_rows[:INT8_CALIBRATION_IMAGES]]
            make_variant(out_dir, target, kind, calibration)
            scores = _serve(target, test_images)
        except Exception as exc:  # a converter that cannot handle a graph: say so, keep going
            log.warning("%s variant failed: %s", kind, exc)
            shutil.rmtree(target, ignore_errors=True)
            variants[kind] = {"note": f"skipped: {type(exc).__name__}: {exc}"[:300]}
            continue
        auc = roc_auc(y, scores)
        same_auc = roc_auc(y[same_source], scores[same_source])
        variants[kind] = {
            "path": str(target),
            "total_mb": _size_mb(target),
            "auc": auc,
            "auc_change": auc - result["onnx_auc"],
            "same_source_auc": same_auc,
            "same_source_auc_change": same_auc - result["onnx_same_source_auc"],
            "max_score_change": float(np.max(np.abs(scores - served))) if len(scores) else 0.0,
            "calls_changed": int(np.sum((scores >= threshold) != (served >= threshold))),
            "note": "fp16 weights, fp32 compute"
            if kind == "fp16"
            else f"static int8 (QDQ, per-channel), calibrated on {len(calibration)} training"
            " images",
        }
    if cfg.export.invariance:
        records = [cache.records[r] for r in test_rows]
        result["invariance"] = _invariance(out_dir, result, records, paths.report)
    _append_card(out_dir, result)
    for kind, v in variants.items():
        if "path" in v:
            _append_card(Path(v["path"]), result, variant=kind)
    if out_dir != final:
        shutil.rmtree(final)
        out_dir.rename(final)
    result["bundle"] = str(final)
    write_json(paths.report / EXPORT_JSON, result)
    write_report(paths.report)
    return result


def _invariance(
    bundle_dir: Path, result: ExportResult, records: list[Record], report_dir: Path
) -> InvarianceAudits | InvarianceNotMeasured:
    """The invariance audit of the bundle and of each variant (each is served as it is)."""
    from training.invariance import invariance_audit

    missing = [r.id for r in records if not Path(r.image).is_file()]
    if missing or not records:
        return {"note": f"skipped: {len(missing)} of {len(records)} test images not found"}
    out: InvarianceAudits = {
        "bundle": invariance_audit(bundle_dir, records, figure=report_dir / "invariance.png")
    }
    for kind, v in result["variants"].items():
        if "path" in v:
            out[kind] = invariance_audit(Path(v["path"]), records)
    return out


def _append_card(bundle_dir: Path, result: ExportResult, variant: str | None = None) -> None:
    """The serving check and variant results, measured after the bundle was written.

    model_card.md is not among the manifest's checksummed files: adding to it leaves the
    bundle valid.
    """
    lines = [
        "",
        "## Serving check and variants",
        "",
        f"Split-0 test set through `worker.inference.Ensemble`: ROC AUC {result['onnx_auc']:.4f}"
        f" (PyTorch {result['torch_auc']:.4f}; max score difference"
        f" {result['onnx_vs_torch_max_score_diff']:.2e}).",
    ]
    for kind, v in result["variants"].items():
        if "auc" in v:
            lines.append(
                f"- {kind} variant ({v['note']}): {v['total_mb']:.1f} MB, ROC AUC {v['auc']:.4f}"
                f" (change {v['auc_change']:+.4f}); same-source ROC AUC"
                f" {v.get('same_source_auc', nan):.4f} (change"
                f" {v.get('same_source_auc_change', nan):+.4f});"
                f" max score change {v['max_score_change']:.2e}; calls changed at the threshold"
                f" {v.get('calls_changed', 'n/a')} of {result.get('test_images', 'n/a')}."
            )
        else:
            lines.append(f"- {kind} variant: {v['note']}")
    inv = result.get("invariance", {})
    if "note" in inv:
        lines += ["", "## Invariance", "", f"Not measured: {inv['note']}."]
    elif mine := inv.get(variant or "bundle"):
        lines += ["", *invariance_lines(mine)]
        if mine.get("figure"):
            lines += ["", "The distribution: `invariance.png` in the run's report folder."]
    card = bundle_dir / MODEL_CARD
    card.write_text(card.read_text(encoding="utf-8") + "\n".join(lines) + "\n", encoding="utf-8")


def bundle_summary(bundle_dir: Path) -> str:
    manifest = json.loads((bundle_dir / MANIFEST_NAME).read_text())
    return f"{manifest['name']} {manifest['version']} ({_size_mb(bundle_dir):.1f} MB)"
