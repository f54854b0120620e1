"""The stages of an experiment, each reusing what an earlier run left when it still fits.

    data -> cache -> splits -> segmentation (+ lung maps) -> members (K splits) -> ablation
         -> evaluate -> export

`run_all` chains them (`cxr-train all`); each CLI command runs one. With `resume`, a finished
stage whose settings and inputs are unchanged is skipped and an interrupted one continues from
its last checkpoint.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from training.cache import Cache, build_cache, cache_key, load_cache, read_cache_meta
from training.config import ExperimentConfig, expand
from training.data import LabelMap, Record, read_dataset, subsample
from training.layout import NO_PREP, NO_SEG, RunPaths
from training.results import EvaluationReport, ExportResult, ExportSkipped, MemberResult
from training.splits import SplitPlan, check_no_leakage, make_plan
from training.torchutil import write_json
from worker.bundle import sha256_file

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class Context:
    cfg: ExperimentConfig
    base: Path  # folder the config's relative paths start from
    paths: RunPaths
    device_name: str = "auto"
    resume: bool = False
    timings: dict[str, float] = field(default_factory=dict)

    def device(self) -> Any:
        from training.torchutil import pick_device

        return pick_device(self.device_name if self.device_name != "auto" else self.cfg.device)

    def timed(self, name: str, fn: Callable[[], T]) -> T:
        start = time.perf_counter()
        try:
            return fn()
        finally:
            self.timings[name] = time.perf_counter() - start
            log.info("stage %s: %.1f s", name, self.timings[name])


def make_context(
    cfg: ExperimentConfig,
    base: Path,
    workdir: Path,
    cache: Path | None = None,
    device: str = "auto",
    resume: bool = False,
) -> Context:
    override = cache or (expand(cfg.cache.path, base) if cfg.cache.path else None)
    return Context(cfg, base, RunPaths(Path(workdir), override), device, resume)


# --------------------------------------------------------------------------- data


def data_csv(cfg: ExperimentConfig, base: Path, override: Path | None) -> Path:
    if override is not None:
        return Path(override)
    if cfg.data.csv is None:
        raise ValueError("no dataset: give DATA.csv / --data, or set [data] csv in the config")
    try:
        return expand(cfg.data.csv, base)
    except ValueError as exc:
        raise ValueError(f"{exc}; set it, or pass --data PATH") from exc


def licence_text(csv_path: Path) -> str:
    """The licences section of a README.md beside the CSV (the pool has one), verbatim."""
    readme = csv_path.resolve().parent / "README.md"
    if not readme.is_file():
        return ""
    text = readme.read_text(encoding="utf-8", errors="replace")
    match = re.search(r"^## [^\n]*[Ll]icen[cs][^\n]*\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    return match.group(1).strip() if match else ""


def load_records(cfg: ExperimentConfig, csv_path: Path) -> tuple[list[Record], str]:
    labels = LabelMap(cfg.data.positive_labels, cfg.data.negative_labels)
    records, summary = read_dataset(csv_path, labels, cfg.data.frontal_only, cfg.data.lateral_views)
    if cfg.data.limit is not None:
        records = subsample(records, cfg.data.limit, cfg.seed)
    text = summary.describe()
    if cfg.data.limit is not None:
        text += f"; subsample of {len(records)} (limit {cfg.data.limit}, seed {cfg.seed})"
    return records, text


def stage_cache(ctx: Context, csv_path: Path | None, rebuild: bool = False) -> Cache:
    """The cache for this config's records, built when absent or made for other data.

    Without a CSV (a machine that holds only the cache), the existing cache is used as is,
    provided it was preprocessed with this config's parameters.
    """
    cfg = ctx.cfg
    path = ctx.paths.cache
    if csv_path is None:
        if not path.is_file():
            raise ValueError(f"no dataset CSV and no cache at {path}")
        cache = load_cache(path)
        if cache.params != cfg.preprocessing:
            raise ValueError(
                f"{path} was preprocessed with {cache.params.model_dump()}, the config asks for"
                f" {cfg.preprocessing.model_dump()}"
            )
        log.info("using cache %s as is (no dataset CSV given)", path)
        return cache
    records, summary = load_records(cfg, csv_path)
    c = cfg.cache
    wanted = cache_key(records, cfg.preprocessing, c.encoding, c.quality, c.raw_variant)
    if not rebuild and path.is_file() and read_cache_meta(path).get("requested_key") == wanted:
        log.info("cache %s is up to date", path)
    else:
        _, skipped = build_cache(
            records,
            cfg.preprocessing,
            path,
            encoding=c.encoding,
            quality=c.quality,
            raw=c.raw_variant,
            workers=c.workers,
            extra_info={
                "csv": str(csv_path),
                "load_summary": summary,
                "limit": cfg.data.limit,
                "licence_text": licence_text(csv_path),
            },
        )
        if skipped:
            log.warning("images skipped: %s", dict(skipped))
    return load_cache(path)


def trained_splits(ctx: Context, cache: Cache) -> SplitPlan:
    """The splits the run's models were trained on (evaluation and export never re-split)."""
    path = ctx.paths.splits
    if not path.is_file():
        raise ValueError(f"no {path}: train the run first (`cxr-train all` or the stages)")
    plan = SplitPlan.load(path)
    for split in plan.splits:
        check_no_leakage(split, cache.records)
    return plan


def stage_splits(ctx: Context, cache: Cache) -> SplitPlan:
    """Splits of the cache's records; kept when they still cover exactly these records."""
    cfg = ctx.cfg
    path = ctx.paths.splits
    if path.is_file():
        plan = SplitPlan.load(path)
        same = (
            plan.seed == cfg.seed
            and plan.val == cfg.splits.val
            and plan.test == cfg.splits.test
            and len(plan.splits) == cfg.splits.k
        )
        if same:
            try:
                for split in plan.splits:
                    check_no_leakage(split, cache.records)
            except ValueError:
                same = False
        if same:
            return plan
    plan = make_plan(cache.records, cfg.splits.val, cfg.splits.test, cfg.splits.k, cfg.seed)
    plan.save(path)
    return plan


# --------------------------------------------------------------------------- models


def stage_segmentation(
    ctx: Context, cache: Cache, plan: SplitPlan
) -> tuple[np.ndarray, np.ndarray | None]:
    """Train the U-Net (split 0), then the lung maps of every cached image (and raw variant)."""
    from training.segment import (
        load_unet,
        predict_lungs,
        read_lungmaps,
        train_segmentation,
        write_lungmaps,
    )

    device = ctx.device()
    train_segmentation(ctx.cfg, cache, plan.splits[0], ctx.paths.segmentation, device, ctx.resume)
    unet_sha = sha256_file(ctx.paths.segmentation / "best.pt")
    size = ctx.cfg.segmentation.input_size
    maps: list[np.ndarray | None] = []
    for path, images in ((ctx.paths.lungmaps, cache.images), (ctx.paths.lungmaps_raw, cache.raw)):
        if images is None:
            maps.append(None)
            continue
        found = read_lungmaps(path, cache.ids, unet_sha)
        if found is None:
            unet = load_unet(ctx.paths.segmentation).to(device)
            found = predict_lungs(unet, images, cache.params, size, device)
            write_lungmaps(path, cache.ids, found, unet_sha)
        maps.append(found)
    assert maps[0] is not None
    return maps[0], maps[1]


def stage_member(
    ctx: Context,
    cache: Cache,
    plan: SplitPlan,
    lungs: np.ndarray | None,
    name: str,
    split: int = 0,
    variant: str | None = None,
) -> MemberResult:
    from training.classify import member_run, train_member

    run = member_run(ctx.cfg, name, split, variant, checkpoint_base=ctx.base)
    result = train_member(
        run,
        ctx.cfg,
        cache,
        lungs,
        plan.splits[split],
        ctx.paths.member(split, name, variant),
        ctx.device(),
        ctx.resume,
        features_dir=ctx.paths.features,
    )
    return MemberResult.model_validate(result)


def stage_members(
    ctx: Context, cache: Cache, plan: SplitPlan, lungs: np.ndarray, lungs_raw: np.ndarray | None
) -> None:
    cfg = ctx.cfg
    for k in range(len(plan.splits)):
        for m in cfg.members:
            stage_member(ctx, cache, plan, lungs, m.name, k)
    if cfg.ablation.enabled:
        name = cfg.ablation_member
        if cfg.ablation.no_segmentation:
            stage_member(ctx, cache, plan, None, name, 0, NO_SEG)
        if cfg.ablation.no_preprocessing:
            if cache.raw is None or lungs_raw is None:
                log.warning(
                    "no raw variant in the cache: the without-preprocessing ablation is skipped"
                )
            else:
                stage_member(ctx, cache, plan, lungs_raw, name, 0, NO_PREP)


def stage_evaluate(
    ctx: Context, cache: Cache, plan: SplitPlan, lungs: np.ndarray
) -> EvaluationReport:
    from training.evaluate import evaluate_run

    return evaluate_run(ctx.cfg, ctx.paths, cache, plan, lungs, ctx.device())


def stage_export(
    ctx: Context, cache: Cache, plan: SplitPlan, out_dir: Path | None = None, replace: bool = False
) -> ExportResult:
    from training.export_run import export_run

    return export_run(ctx.cfg, ctx.paths, cache, plan, out_dir, replace)


def run_all(ctx: Context, csv_path: Path | None) -> ExportResult | ExportSkipped:
    """Every stage in order; the config goes into the workdir and the bundle manifest."""
    ctx.paths.root.mkdir(parents=True, exist_ok=True)
    write_json(ctx.paths.config, ctx.cfg.model_dump(mode="json"))
    cache = ctx.timed("cache", lambda: stage_cache(ctx, csv_path))
    plan = ctx.timed("splits", lambda: stage_splits(ctx, cache))
    lungs, lungs_raw = ctx.timed("segmentation", lambda: stage_segmentation(ctx, cache, plan))
    ctx.timed("classifiers", lambda: stage_members(ctx, cache, plan, lungs, lungs_raw))
    ctx.timed("evaluate", lambda: stage_evaluate(ctx, cache, plan, lungs))
    missing = missing_export_modules()
    if missing:
        # A training-only host (e.g. a GPU machine without hnswlib): finish here; copy the run
        # folder to a machine with the `train` extra and run `cxr-train export -w <run>`.
        log.warning("export skipped: %s not installed", ", ".join(missing))
        export: ExportResult | ExportSkipped = {
            "bundle": None,
            "skipped": f"{', '.join(missing)} not installed",
        }
    else:
        export = ctx.timed("export", lambda: stage_export(ctx, cache, plan, replace=True))
    write_json(ctx.paths.root / "timings.json", ctx.timings)
    return export


def missing_export_modules() -> list[str]:
    """What the export stage needs beyond training: ONNX, its runtime and hnswlib."""
    import importlib.util

    return [m for m in ("onnx", "onnxruntime", "hnswlib") if importlib.util.find_spec(m) is None]
