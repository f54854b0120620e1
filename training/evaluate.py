"""`cxr-train evaluate`: the evaluation report of a run, on its test splits or an external CSV.

Reads what training left in the working folder (member predictions, checkpoints, U-Net
result) and writes report.json, report.md and the figures into the report folder. The parts
that need the models themselves (the lung-masking shortcut audit, an external CSV) load the
split-0 checkpoints.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training import plots
from training.analysis import replace_region, trivial_features
from training.cache import Cache
from training.classify import load_member, predict
from training.config import ExperimentConfig
from training.data import mixed_sources
from training.layout import NO_PREP, NO_SEG, RunPaths
from training.report import write_report
from training.results import (
    RESULT_FILE,
    Ablation,
    AblationVariant,
    CommonSections,
    EstimateJson,
    EvaluationReport,
    LungMasking,
    MaskScores,
    MemberResult,
    SegmentationResult,
    SegmentationSection,
    Separation,
    ShortcutAudit,
    StageResult,
)
from training.scored import ScoredSet, run_sets
from training.sections import (
    auc_estimate,
    paired_auc_difference,
    probe_auc,
    section_cases,
    section_curves,
    section_data,
    section_days,
    section_embeddings,
    section_groups,
    section_headline,
    section_members,
    section_retrieval,
    section_same_source,
    section_segmentation,
    source_probes,
)
from training.segment import evaluate_masks, load_unet, predict_lungs
from training.splits import SplitPlan, check_trained_on
from training.torchutil import derive_seed, write_json
from worker.model_input import resize_batch

log = logging.getLogger(__name__)

REPORT_JSON = "report.json"


#: A trained member and the input it was trained on: (model, size, lung crop, lung mask).
LoadedMember = tuple[torch.nn.Module, int, float | None, float | None]


def _member_results(paths: RunPaths, names: Sequence[str]) -> dict[str, MemberResult]:
    out = {}
    for n in names:
        folder = paths.member(0, n)
        if (folder / RESULT_FILE).is_file():
            out[n] = MemberResult.read(folder)
    return out


def _ensemble_scores(
    models: dict[str, LoadedMember],
    images: np.ndarray,
    lungs: np.ndarray,
    cache_params: Any,
    device: torch.device,
) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
    member_scores: dict[str, np.ndarray] = {}
    embeddings: dict[str, np.ndarray] = {}
    for name, (model, size, crop, mask) in models.items():
        prob, emb = predict(
            model,  # type: ignore[arg-type]
            images,
            lungs,
            cache_params,
            size,
            device,
            lung_crop=crop,
            lung_mask=mask,
        )
        member_scores[name] = prob
        embeddings[name] = emb
    return np.mean(np.stack(list(member_scores.values())), axis=0), member_scores, embeddings


def _load_models(
    cfg: ExperimentConfig, paths: RunPaths, device: torch.device
) -> dict[str, LoadedMember]:
    """Split 0's members, each with the input it was trained on (size, lung crop, mask)."""
    out: dict[str, LoadedMember] = {}
    for m in cfg.members:
        folder = paths.member(0, m.name)
        run = MemberResult.read(folder).run
        out[m.name] = (load_member(folder).to(device), run.input_size, run.lung_crop, run.lung_mask)
    return out


def lung_audit(
    test: ScoredSet,
    images: np.ndarray,
    lungs: np.ndarray,
    models: dict[str, LoadedMember],
    params: Any,
    device: torch.device,
    samples: int,
    seed: int,
) -> LungMasking:
    """Ensemble AUC with the lungs replaced by mean gray, and with all but the lungs replaced.

    The lung region is the U-Net map >= 0.5 at the image size; the lung channel given to the
    members stays the original map, so only the image content changes.
    """
    region = resize_batch(lungs.astype(np.float32), images.shape[1])[:, 0] >= 0.5

    def auc(variant: np.ndarray) -> EstimateJson:
        score, _, _ = _ensemble_scores(models, variant, lungs, params, device)
        return auc_estimate(test.y, score, test.groups, samples, seed)

    return {
        "lung_fraction": float(region.mean()),
        "original": auc(images),
        "lungs_masked_out": auc(replace_region(images, region)),
        "lungs_only": auc(replace_region(images, ~region)),
    }


def shortcut_audit(
    lung_masking: LungMasking,
    train: ScoredSet,
    test: ScoredSet,
    cache: Cache,
    samples: int,
    seed: int,
) -> ShortcutAudit:
    """The lung masking, and what probes read from the embeddings and from trivial features."""
    groups = test.groups
    train_feat = trivial_features(cache.images[train.rows])
    test_feat = trivial_features(cache.images[test.rows])
    return {
        "lung_masking": lung_masking,
        "source_from_embeddings": source_probes(
            train.embedding, train.sources, test.embedding, test.sources, groups, samples, seed
        ),
        "source_from_trivial_features": source_probes(
            train_feat, train.sources, test_feat, test.sources, groups, samples, seed
        ),
        "label_from_trivial_features": probe_auc(
            train_feat, train.y, test_feat, test.y, groups, samples, seed
        ),
    }


def section_ablation(
    cfg: ExperimentConfig, paths: RunPaths, cache: Cache, plan: SplitPlan, samples: int, seed: int
) -> Ablation:
    from training.classify import read_predictions

    name = cfg.ablation_member
    ids = plan.splits[0].test
    rows = cache.rows(ids)
    y = cache.labels[rows]
    groups = np.array([cache.records[r].patient_group for r in rows])
    base = read_predictions(paths.member(0, name), ids).probability
    variants: dict[str, AblationVariant] = {}
    out: Ablation = {
        "member": name,
        "baseline": auc_estimate(y, base, groups, samples, seed),
        "variants": variants,
    }
    described = {
        NO_SEG: "lung channel zeros (no segmentation, hence no lung crop)",
        NO_PREP: "no preprocessing (pad + resize; no crop, no CLAHE)",
    }
    for variant, text in described.items():
        folder = paths.member(0, name, variant)
        if not (folder / "result.json").is_file():
            variants[variant] = {"description": text, "note": "not trained"}
            continue
        check_trained_on(StageResult.read(folder), plan.splits[0], f"{name}--{variant}")
        score = read_predictions(folder, ids).probability
        variants[variant] = {
            "description": text,
            "auc": auc_estimate(y, score, groups, samples, seed),
            "difference_vs_baseline": paired_auc_difference(y, score, base, groups, samples, seed),
        }
    return out


def _common_sections(
    cfg: ExperimentConfig,
    tests: list[ScoredSet],
    train0: ScoredSet,
    member_results: dict[str, MemberResult],
    out_dir: Path,
    with_plots: bool,
) -> CommonSections:
    ev = cfg.evaluation
    b, seed = ev.bootstrap, cfg.seed
    mixed = mixed_sources([r for t in tests for r in t.records])
    return {
        "headline": section_headline(tests, b, seed),
        "same_source": section_same_source(tests, mixed, b, seed),
        "members": section_members(tests, member_results, b, seed),
        "curves": section_curves(tests[0], out_dir, with_plots),
        "embeddings": section_embeddings(
            train0, tests[0], out_dir, seed, ev.tsne, ev.max_tsne_points, with_plots
        ),
        "retrieval": section_retrieval(train0, tests[0], ev.knn_k, b, seed),
        **section_groups(tests, ev.age_bands, b, seed),
        "days": section_days(tests, out_dir, with_plots),
    }


def _ablation_figure(ablation: Ablation, audit: LungMasking, out_dir: Path) -> str:
    member = ablation["member"]

    def bar(e: EstimateJson) -> tuple[float | None, float | None, float | None]:
        return (e["value"], e["low"], e["high"])

    values = {f"{member}\nbaseline": bar(ablation["baseline"])}
    for variant, v in ablation["variants"].items():
        if "auc" in v:
            values[f"{member}\n{variant}"] = bar(v["auc"])
    for key in ("original", "lungs_masked_out", "lungs_only"):
        values[f"ensemble\n{key.replace('_', ' ')}"] = bar(audit[key])
    return plots.bars(
        values, "Ablation and shortcut audit (test AUC, split 0)", out_dir / "ablation.png"
    ).name


def evaluate_run(
    cfg: ExperimentConfig,
    paths: RunPaths,
    cache: Cache,
    plan: SplitPlan,
    lungs: np.ndarray,
    device: torch.device,
    out_dir: Path | None = None,
) -> EvaluationReport:
    """The internal report: test splits of the run; writes report.json, report.md, PNGs."""
    out_dir = out_dir or paths.report
    out_dir.mkdir(parents=True, exist_ok=True)
    with_plots = plots.available()
    sets = run_sets(cfg, paths, cache, plan)
    names = [m.name for m in cfg.members]
    member_results = _member_results(paths, names)
    b, seed = cfg.evaluation.bootstrap, derive_seed(cfg.seed, "evaluation")
    data = section_data(
        cache.records, plan.splits, cache.info, str(cache.info.get("licence_text") or "")
    )
    common = _common_sections(cfg, sets.tests, sets.train0, member_results, out_dir, with_plots)
    seg_result = (
        SegmentationResult.read(paths.segmentation)
        if (paths.segmentation / RESULT_FILE).is_file()
        else None
    )
    if seg_result is not None:
        check_trained_on(seg_result, plan.splits[0], "the U-Net")
    segmentation = section_segmentation(
        seg_result.test if seg_result else None, seg_result, b, seed
    )
    ablation: Ablation = (
        section_ablation(cfg, paths, cache, plan, b, seed)
        if cfg.ablation.enabled
        else {"note": "ablation disabled in the config"}
    )
    test0 = sets.tests[0]
    cases = section_cases(test0)
    models = _load_models(cfg, paths, device)
    lung_masking = lung_audit(
        test0, cache.images[test0.rows], lungs[test0.rows], models, cache.params, device, b, seed
    )
    audit = shortcut_audit(lung_masking, sets.train0, test0, cache, b, seed)
    separation = retrieval_separation(
        cfg, paths, models, sets.train0.embedding, test0.embedding, cache.params, device
    )
    if with_plots and cfg.ablation.enabled:
        ablation["figure"] = _ablation_figure(ablation, lung_masking, out_dir)
    report: EvaluationReport = {
        "kind": "internal",
        "name": cfg.name,
        "version": cfg.version,
        "data": data,
        "splits_missing": sets.missing_splits,
        "threshold": {
            "value": sets.tests[0].threshold,
            "method": cfg.evaluation.threshold,
            "chosen_on": "validation set of each split (never test)",
        },
        **common,
        "pretrained": {n: r.pretrained for n, r in member_results.items()},
        "segmentation": segmentation,
        "ablation": ablation,
        "cases": cases,
        "shortcut_audit": audit,
        "retrieval_separation": separation,
        "plots": with_plots,
    }
    write_json(out_dir / REPORT_JSON, _clean(report))
    write_report(out_dir)
    return report


def retrieval_separation(
    cfg: ExperimentConfig,
    paths: RunPaths,
    models: dict[str, LoadedMember],
    reference: np.ndarray,
    test: np.ndarray,
    params: Any,
    device: torch.device,
) -> Separation:
    """Nearest-reference distances of test vs non-chest images (training.separation)."""
    from training.separation import section_separation

    model, size, crop, mask = models[cfg.embedding_member]
    unet = load_unet(paths.segmentation).to(device)

    def embed(images: np.ndarray) -> np.ndarray:
        lungs = predict_lungs(unet, images, params, cfg.segmentation.input_size, device)
        _, emb = predict(
            model,  # type: ignore[arg-type]
            images,
            lungs,
            params,
            size,
            device,
            lung_crop=crop,
            lung_mask=mask,
        )
        return emb

    return section_separation(reference, test, embed, params)


def evaluate_external(
    cfg: ExperimentConfig,
    paths: RunPaths,
    cache: Cache,
    plan: SplitPlan,
    external: Cache,
    device: torch.device,
    out_dir: Path,
) -> EvaluationReport:
    """An external CSV scored by split 0's models; threshold and reference set from the run."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if external.params != cache.params:
        raise ValueError("the external cache was preprocessed with other parameters than the run")
    with_plots = plots.available()
    sets = run_sets(cfg, paths, cache, plan)
    unet = load_unet(paths.segmentation).to(device)
    lungs = predict_lungs(
        unet, external.images, external.params, cfg.segmentation.input_size, device
    )
    models = _load_models(cfg, paths, device)
    score, members, embeddings = _ensemble_scores(
        models, external.images, lungs, external.params, device
    )
    test = ScoredSet(
        split=0,
        records=list(external.records),
        score=score,
        members=members,
        embedding=embeddings[cfg.embedding_member],
        threshold=sets.tests[0].threshold,
        rows=np.arange(len(external)),
    )
    b, seed = cfg.evaluation.bootstrap, derive_seed(cfg.seed, "evaluation")
    common = _common_sections(
        cfg, [test], sets.train0, _member_results(paths, list(members)), out_dir, with_plots
    )
    segmentation: SegmentationSection
    rows = sorted(external.masks)
    if rows:
        dice, iou = evaluate_masks(
            unet,
            external.images[rows],
            np.stack([external.masks[r] for r in rows]),
            external.params,
            cfg.segmentation.input_size,
            device,
        )
        recs = [external.records[r] for r in rows]
        masks = MaskScores(
            ids=[r.id for r in recs],
            groups=[r.patient_group for r in recs],
            sources=[r.source for r in recs],
            dice=dice.tolist(),
            iou=iou.tolist(),
        )
        segmentation = section_segmentation(masks, None, b, seed)
    else:
        segmentation = {"note": "the external CSV has no lung masks"}
    lung_masking = lung_audit(
        test, external.images, lungs, models, external.params, device, b, seed
    )
    report: EvaluationReport = {
        "kind": "external",
        "name": cfg.name,
        "version": cfg.version,
        "data": {
            "images": len(external),
            "csv": external.info.get("csv"),
            "load_summary": external.info.get("load_summary"),
            "note": "every image of the external CSV is a test image; CIs from bootstrap only",
        },
        "threshold": {
            "value": test.threshold,
            "method": cfg.evaluation.threshold,
            "chosen_on": "the run's split-0 validation set",
        },
        **common,
        "segmentation": segmentation,
        "ablation": {"note": "ablation members are evaluated in the run's internal report"},
        "shortcut_audit": {
            "lung_masking": lung_masking,
            "note": "source probes need the run's sources: see the internal report",
        },
        "plots": with_plots,
    }
    write_json(out_dir / REPORT_JSON, _clean(report))
    write_report(out_dir)
    return report


def _clean(value: Any) -> Any:
    """NaN and infinities -> None (strict JSON); numpy scalars -> Python."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
