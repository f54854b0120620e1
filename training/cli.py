"""`cxr-train`: the command line of the offline side.

    cxr-train all --config training/configs/smoke.toml      every stage, config in the bundle
    cxr-train cache DATA.csv                                decode + preprocess once
    cxr-train split DATA.csv                                patient-level splits
    cxr-train segmentation / classifier / evaluate / export one stage of a run
    cxr-train gate --bundle DIR                             fit the input gate into a bundle
    cxr-train multisplit -m MEMBER -k 5                     one member over N splits: CI
    cxr-train calibrate BUNDLE DATASET                      a threshold for a sensitivity

Every stage command works in a run folder (`--workdir`, default runs/<config name>) and reuses
what earlier stages left there. Torch is imported only by the commands that need it.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from training.results import ExportResult, ExportSkipped
from worker.bundle import MANIFEST_NAME

app = typer.Typer(help="Train, evaluate and export CXR model bundles.", no_args_is_help=True)
console = Console(stderr=True)

CONFIG_OPTION = typer.Option(None, "--config", "-c", help="experiment TOML (defaults without)")
WORKDIR_OPTION = typer.Option(None, "--workdir", "-w", help="run folder (default runs/<name>)")
DATA_OPTION = typer.Option(None, "--data", help="dataset CSV (overrides [data] csv)")
CACHE_OPTION = typer.Option(None, "--cache", help="cache file (default <workdir>/cache.npz)")
RESUME_OPTION = typer.Option(False, "--resume", help="reuse finished stages, continue checkpoints")
DEVICE_OPTION = typer.Option("auto", "--device", help="auto (CUDA when present), cpu, cuda:N")
SET_OPTION = typer.Option(
    None, "--set", help="override a config value, e.g. --set splits.k=2 (repeatable)"
)


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="debug logging")) -> None:
    """Offline tools; each writes or checks a model bundle."""
    # Our loggers at INFO; libraries (onnxruntime's quantiser logs every tensor) at WARNING.
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
        force=True,
    )
    logging.getLogger("training").setLevel(logging.DEBUG if verbose else logging.INFO)


def _context(
    config: Path | None,
    workdir: Path | None,
    cache: Path | None = None,
    device: str = "auto",
    resume: bool = False,
    overrides: list[str] | None = None,
) -> Any:
    from training.config import load_config
    from training.pipeline import make_context

    try:
        cfg, base = load_config(config, overrides or ())
    except ValueError as exc:
        raise _fail(exc) from exc
    return make_context(cfg, base, workdir or Path("runs") / cfg.name, cache, device, resume)


def _cache_and_plan(ctx: Any, data: Path | None) -> tuple[Any, Any]:
    """The run's cache (built from the CSV when given or missing) and its splits."""
    from training.cache import load_cache
    from training.pipeline import data_csv, stage_cache, stage_splits

    if data is not None or not ctx.paths.cache.is_file():
        cache = stage_cache(ctx, data_csv(ctx.cfg, ctx.base, data))
    else:
        cache = load_cache(ctx.paths.cache)
    return cache, stage_splits(ctx, cache)


def _lungs(ctx: Any, cache: Any, raw: bool = False) -> Any:
    from training.segment import read_lungmaps
    from worker.bundle import sha256_file

    best = ctx.paths.segmentation / "best.pt"
    path = ctx.paths.lungmaps_raw if raw else ctx.paths.lungmaps
    maps = read_lungmaps(path, cache.ids, sha256_file(best)) if best.is_file() else None
    if maps is None:
        raise typer.BadParameter(
            f"no current lung maps in {ctx.paths.root}: run `cxr-train segmentation` first"
        )
    return maps


def _fail(exc: Exception) -> typer.Exit:
    console.print(f"[red]error:[/red] {exc}")
    return typer.Exit(1)


@app.command("cache")
def cache_cmd(
    data: Path = typer.Argument(..., help="dataset CSV (the pool's metadata.csv works as is)"),
    config: Path | None = CONFIG_OPTION,
    out: Path | None = typer.Option(None, "--out", "-o", help="cache file (default from config)"),
    workdir: Path | None = WORKDIR_OPTION,
    size: int | None = typer.Option(None, help="preprocessing size (overrides the config)"),
    encoding: str | None = typer.Option(None, help="jpeg or png (overrides the config)"),
    quality: int | None = typer.Option(None, help="JPEG quality (overrides the config)"),
    raw: bool | None = typer.Option(None, "--raw/--no-raw", help="cache the ablation variant"),
    limit: int | None = typer.Option(None, help="subsample: about this many images"),
    overrides: list[str] | None = SET_OPTION,
) -> None:
    """Decode and preprocess every image once into a compact cache file."""
    from training.pipeline import stage_cache

    ctx = _context(config, workdir, out, overrides=overrides)
    cfg = ctx.cfg
    if size is not None:
        cfg.preprocessing = cfg.preprocessing.model_copy(update={"size": size})
    updates = {"encoding": encoding, "quality": quality, "raw_variant": raw}
    cfg.cache = cfg.cache.model_copy(update={k: v for k, v in updates.items() if v is not None})
    if limit is not None:
        cfg.data.limit = limit
    start = time.perf_counter()
    try:
        cache = stage_cache(ctx, data, rebuild=False)
    except ValueError as exc:
        raise _fail(exc) from exc
    path = ctx.paths.cache
    console.print(
        f"{path}: {len(cache)} images at {cache.params.size} px, {len(cache.masks)} lung masks,"
        f" {path.stat().st_size / 1e6:.1f} MB ({time.perf_counter() - start:.0f} s)"
    )
    typer.echo(str(path))


@app.command("split")
def split_cmd(
    data: Path = typer.Argument(..., help="dataset CSV or cache .npz"),
    config: Path | None = CONFIG_OPTION,
    out: Path = typer.Option(Path("splits.json"), "--out", "-o", help="splits file to write"),
    k: int | None = typer.Option(None, help="number of random splits (overrides the config)"),
    seed: int | None = typer.Option(None, help="seed (overrides the config)"),
    val: float | None = typer.Option(None, help="validation fraction"),
    test: float | None = typer.Option(None, help="test fraction"),
) -> None:
    """Patient-level, stratified, seeded train/validation/test splits (+ K-1 more)."""
    from training.cache import load_cache
    from training.config import load_config
    from training.pipeline import load_records
    from training.splits import describe, make_plan

    cfg, _ = load_config(config)
    if data.suffix == ".npz":
        records = load_cache(data).records
    else:
        records, summary = load_records(cfg, data)
        console.print(summary)
    plan = make_plan(
        records,
        val if val is not None else cfg.splits.val,
        test if test is not None else cfg.splits.test,
        k if k is not None else cfg.splits.k,
        seed if seed is not None else cfg.seed,
    )
    plan.save(out)
    table = Table(title=f"split 0 of {len(plan.splits)} (seed {plan.seed})")
    table.add_column("set")
    table.add_column("images by source/label")
    for which, counts in describe(plan.splits[0], records).items():
        table.add_row(which, ", ".join(f"{key} {n}" for key, n in counts.items()))
    console.print(table)
    typer.echo(str(out))


@app.command("segmentation")
def segmentation_cmd(
    config: Path | None = CONFIG_OPTION,
    workdir: Path | None = WORKDIR_OPTION,
    data: Path | None = DATA_OPTION,
    cache: Path | None = CACHE_OPTION,
    resume: bool = RESUME_OPTION,
    device: str = DEVICE_OPTION,
    overrides: list[str] | None = SET_OPTION,
) -> None:
    """Train the lung U-Net on split 0, report held-out Dice/IoU, compute the lung maps."""
    from training.pipeline import stage_segmentation
    from training.results import SegmentationResult

    ctx = _context(config, workdir, cache, device, resume, overrides)
    cache_data, plan = _cache_and_plan(ctx, data)
    stage_segmentation(ctx, cache_data, plan)
    result = SegmentationResult.read(ctx.paths.segmentation)
    dice = result.test.dice
    mean = sum(dice) / len(dice) if dice else float("nan")
    console.print(
        f"U-Net {result.architecture}: best epoch {result.best_epoch + 1}, "
        f"val Dice {result.val_dice}, test Dice {mean:.3f} on {len(dice)} held-out masks"
    )


@app.command("classifier")
def classifier_cmd(
    member: str = typer.Option(..., "--member", "-m", help="member name from the config"),
    split: int = typer.Option(0, help="which split to train on (0 = the bundle's)"),
    variant: str | None = typer.Option(None, help="ablation: no-seg or no-prep"),
    config: Path | None = CONFIG_OPTION,
    workdir: Path | None = WORKDIR_OPTION,
    data: Path | None = DATA_OPTION,
    cache: Path | None = CACHE_OPTION,
    resume: bool = RESUME_OPTION,
    device: str = DEVICE_OPTION,
    overrides: list[str] | None = SET_OPTION,
) -> None:
    """Train one ensemble member (needs the segmentation stage's lung maps)."""
    from training.layout import NO_PREP, NO_SEG
    from training.pipeline import stage_member

    if variant not in (None, NO_SEG, NO_PREP):
        raise typer.BadParameter(f"variant must be {NO_SEG} or {NO_PREP}")
    ctx = _context(config, workdir, cache, device, resume, overrides)
    try:
        ctx.cfg.member(member)
    except KeyError as exc:
        raise _fail(exc) from exc
    cache_data, plan = _cache_and_plan(ctx, data)
    if not 0 <= split < len(plan.splits):
        raise typer.BadParameter(f"split must be in 0..{len(plan.splits) - 1}")
    lungs = None if variant == NO_SEG else _lungs(ctx, cache_data, raw=variant == NO_PREP)
    result = stage_member(ctx, cache_data, plan, lungs, member, split, variant)
    val = ", ".join(f"{k} {v:.3f}" for k, v in result.validation_metrics().items())
    console.print(
        f"{result.run.name} (split {split}): best epoch {result.best_epoch + 1},"
        f" selected on {result.selected_on}; {val}"
    )


@app.command("multisplit")
def multisplit_cmd(
    member: str | None = typer.Option(
        None, "--member", "-m", help="member name from the config (default: the first)"
    ),
    splits: int = typer.Option(5, "--splits", "-k", min=2, help="patient-level splits"),
    config: Path | None = CONFIG_OPTION,
    workdir: Path | None = WORKDIR_OPTION,
    data: Path | None = DATA_OPTION,
    cache: Path | None = CACHE_OPTION,
    resume: bool = RESUME_OPTION,
    device: str = DEVICE_OPTION,
    overrides: list[str] | None = SET_OPTION,
) -> None:
    """Train one member on each of N patient-level splits; its same-source test AUC per
    split, mean and CI over splits (report/multisplit-<member>.json)."""
    from training.multisplit import run_multisplit

    ctx = _context(config, workdir, cache, device, resume, overrides)
    name = member or ctx.cfg.members[0].name
    try:
        ctx.cfg.member(name)
    except KeyError as exc:
        raise _fail(exc) from exc
    cache_data, _ = _cache_and_plan(ctx, data)
    try:
        result = run_multisplit(ctx, cache_data, _lungs(ctx, cache_data), name, splits)
    except ValueError as exc:
        raise _fail(exc) from exc
    table = Table(title=f"{name}: {splits} patient-level splits")
    for col in ("split", "same-source n (pos)", "same-source AUC", "all test AUC"):
        table.add_column(col)
    for s in result["per_split"]:
        table.add_row(
            str(s["split"]),
            f"{s['same_source_images']} ({s['same_source_positives']})",
            f"{s['same_source_auc']:.3f}",
            f"{s['auc']:.3f}",
        )
    console.print(table)
    ss = result["same_source_auc"]
    console.print(
        f"same-source ROC AUC: mean {ss['mean']:.3f}, 95% CI {ss['ci'][0]:.3f}-{ss['ci'][1]:.3f}"
        f" over {ss['n']} splits"
    )


@app.command("evaluate")
def evaluate_cmd(
    config: Path | None = CONFIG_OPTION,
    workdir: Path | None = WORKDIR_OPTION,
    cache: Path | None = CACHE_OPTION,
    external: Path | None = typer.Option(
        None, "--data", help="evaluate on this external CSV instead of the test splits"
    ),
    out: Path | None = typer.Option(None, "--out", "-o", help="report folder"),
    device: str = DEVICE_OPTION,
    overrides: list[str] | None = SET_OPTION,
) -> None:
    """The evaluation report (Markdown + PNG + JSON): test splits, or an external CSV."""
    from training.cache import load_cache
    from training.evaluate import evaluate_external, evaluate_run
    from training.pipeline import stage_cache, trained_splits

    ctx = _context(config, workdir, cache, device, overrides=overrides)
    run_cache = load_cache(ctx.paths.cache)
    try:
        plan = trained_splits(ctx, run_cache)
    except ValueError as exc:
        raise _fail(exc) from exc
    if external is None:
        evaluate_run(ctx.cfg, ctx.paths, run_cache, plan, _lungs(ctx, run_cache), ctx.device(), out)
        folder = out or ctx.paths.report
    else:
        folder = out or ctx.paths.root / f"report-{external.stem}"
        ext_ctx = _context(
            config, workdir, ctx.paths.root / f"external-{external.stem}.npz", overrides=overrides
        )
        ext_ctx.cfg.data.limit = None
        ext_ctx.cfg.cache.raw_variant = False
        ext_cache = stage_cache(ext_ctx, external)
        evaluate_external(ctx.cfg, ctx.paths, run_cache, plan, ext_cache, ctx.device(), folder)
    typer.echo(str(folder / "report.md"))


@app.command("export")
def export_cmd(
    config: Path | None = CONFIG_OPTION,
    workdir: Path | None = WORKDIR_OPTION,
    cache: Path | None = CACHE_OPTION,
    out: Path | None = typer.Option(
        None, "--out", "-o", help="bundle folder (default <workdir>/bundle)"
    ),
    overwrite: bool = typer.Option(False, help="replace an existing bundle at OUT"),
    overrides: list[str] | None = SET_OPTION,
) -> None:
    """ONNX + index + manifest + model card = a bundle the node loads; fp16/int8 variants."""
    from training.bundle_writer import ExportError
    from training.cache import load_cache
    from training.pipeline import stage_export, trained_splits

    ctx = _context(config, workdir, cache, overrides=overrides)
    run_cache = load_cache(ctx.paths.cache)
    try:
        plan = trained_splits(ctx, run_cache)
        result = stage_export(ctx, run_cache, plan, out, replace=overwrite)
    except (ExportError, ValueError) as exc:
        raise _fail(exc) from exc
    _print_export(result)


def _print_export(result: ExportResult | ExportSkipped) -> None:
    if result["bundle"] is None:
        console.print(
            f"[yellow]no bundle:[/yellow] {result['skipped']}; copy the run folder to a"
            " machine with the `train` extra and run `cxr-train export --workdir <run>`"
        )
        return
    console.print(
        f"bundle {result['bundle']}: {result['total_mb']:.1f} MB; ONNX test AUC "
        f"{result['onnx_auc']:.3f} (PyTorch {result['torch_auc']:.3f})"
    )
    for name, v in result["variants"].items():
        change = f"AUC change {v['auc_change']:+.4f}" if "auc_change" in v else v.get("note")
        console.print(f"  variant {name}: {change}")


@app.command("all")
def all_cmd(
    config: Path = typer.Option(..., "--config", "-c", help="experiment TOML"),
    workdir: Path | None = WORKDIR_OPTION,
    data: Path | None = DATA_OPTION,
    cache: Path | None = CACHE_OPTION,
    resume: bool = RESUME_OPTION,
    device: str = DEVICE_OPTION,
    overrides: list[str] | None = SET_OPTION,
) -> None:
    """Every stage: cache, splits, U-Net, members (K splits), ablation, evaluate, export."""
    from training.pipeline import data_csv, run_all

    ctx = _context(config, workdir, cache, device, resume, overrides)
    start = time.perf_counter()
    try:
        csv_path = data_csv(ctx.cfg, ctx.base, data)
    except ValueError as exc:
        if not ctx.paths.cache.is_file():
            raise _fail(exc) from exc
        csv_path = None  # a machine with the cache only (e.g. carried to a GPU host)
    try:
        result = run_all(ctx, csv_path)
    except ValueError as exc:
        raise _fail(exc) from exc
    _print_export(result)
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in ctx.timings.items())
    console.print(f"done in {time.perf_counter() - start:.0f} s ({stages})")
    console.print(f"report: {ctx.paths.report / 'report.md'}")
    typer.echo(result["bundle"] or ctx.paths.root)


@app.command("gate")
def gate_cmd(
    bundle: Path = typer.Option(..., "--bundle", "-b", help="bundle folder to add the gate to"),
    data: Path | None = typer.Option(
        None, "--data", help="dataset CSV (default: the one recorded in the manifest)"
    ),
    workdir: Path | None = typer.Option(
        None, "--workdir", "-w", help="scratch folder (default runs/gate-<bundle folder>)"
    ),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="report folder (default <bundle>/report)"
    ),
    feature_size: int = typer.Option(224, help="input side of the feature model (pixels)"),
    ood_quantile: float = typer.Option(0.999, help="OOD threshold: this quantile of training"),
    lung_quantile: float = typer.Option(0.001, help="lung thresholds: this quantile"),
    probe_quantile: float = typer.Option(0.002, help="upright/whole probes: this quantile"),
) -> None:
    """Fit the input gate for BUNDLE on its training split, add it to the bundle, report."""
    from training.gate import GateError
    from training.gate_report import gate_stage

    if not (bundle / MANIFEST_NAME).is_file():
        raise typer.BadParameter(f"{bundle} holds no {MANIFEST_NAME}")
    try:
        result = gate_stage(
            bundle,
            workdir or Path("runs") / f"gate-{bundle.resolve().name}",
            out or bundle / "report",
            data,
            feature_size,
            ood_quantile,
            lung_quantile,
            probe_quantile,
        )
    except GateError as exc:
        raise _fail(exc) from exc
    for row in result.rows:
        j = row.as_json()
        console.print(f"  {j['set']}: {j['refused']} of {j['images']} refused ({j['expected']})")
    console.print(f"gate median {result.timing['gate_median_ms']:.1f} ms per image")
    typer.echo(str(result.report))


@app.command("calibrate")
def calibrate_cmd(
    bundle: Path = typer.Argument(..., help="the bundle to calibrate (a folder)"),
    dataset: Path = typer.Argument(
        ..., help="dataset CSV, or a folder holding metadata.csv (cxr-node export-dataset)"
    ),
    sensitivity: float = typer.Option(0.9, help="the sensitivity the threshold must reach"),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="the new bundle's folder (default: BUNDLE-calibrated)"
    ),
    version: str | None = typer.Option(
        None, help="the new version (default: BUNDLE's + 'cal' and the date)"
    ),
    bootstrap: int = typer.Option(1000, help="bootstrap resamples (whole patient groups)"),
    seed: int = typer.Option(0, help="bootstrap seed"),
    scores: Path | None = typer.Option(
        None, help="also write each scored image's id, label and score to this CSV"
    ),
) -> None:
    """A threshold for a stated sensitivity on a hospital's labelled images, with its CI, as a
    new bundle version (same networks; onnxruntime only, no torch) that `cxr-node models
    install` accepts."""
    import csv

    from rich.progress import track

    from training.calibrate import CalibrationError, calibrate

    target = out or bundle.with_name(f"{bundle.resolve().name}-calibrated")
    try:
        new, scored, choice = calibrate(
            bundle,
            dataset,
            target,
            sensitivity,
            resamples=bootstrap,
            seed=seed,
            version=version,
            progress=lambda records: track(records, description="scoring", console=console),
        )
    except CalibrationError as exc:
        raise _fail(exc) from exc
    if scores is not None:
        with scores.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["id", "label", "score"])
            for rid, y, s in zip(scored.ids, scored.y, scored.score, strict=True):
                writer.writerow([rid, int(y), f"{s:.6f}"])
    m, c = new.manifest, new.manifest.calibration
    assert c is not None
    console.print(
        f"{c.images} images scored ({c.positives} positive, {c.negatives} negative; "
        f"{c.not_scored} refused by the input gate)"
    )
    for label, rates, at in (
        ("new", choice.at_threshold, choice.threshold.value),
        ("previous", choice.at_previous, c.previous_threshold),
    ):
        sens, spec = rates.sensitivity, rates.specificity
        console.print(
            f"  {label} threshold {at:.4f}: sensitivity {sens.value:.3f} "
            f"({sens.low:.3f}-{sens.high:.3f}), specificity {spec.value:.3f} "
            f"({spec.low:.3f}-{spec.high:.3f})"
        )
    t = choice.threshold
    console.print(f"threshold {t.value:.4f} (95 % CI {t.low:.4f}-{t.high:.4f})")
    typer.echo(f"wrote {target}: {m.name} {m.version}, device UID {m.device_uid}")


@app.command("export-random")
def export_random(
    out_dir: Path = typer.Argument(..., help="bundle folder to create"),
    size: int = typer.Option(128, help="preprocessing and model input size (pixels)"),
    seed: int = typer.Option(0, help="seed of the random weights and synthetic references"),
    overwrite: bool = typer.Option(False, help="replace an existing bundle at OUT_DIR"),
) -> None:
    """Write a PLUMBING bundle: random weights, valid format, scores that mean nothing."""
    from training.plumbing import build_plumbing_bundle  # torch: only when asked for

    replace = out_dir.exists() and any(out_dir.iterdir())
    if replace:
        if not overwrite:
            raise typer.BadParameter(f"{out_dir} is not empty (use --overwrite)")
        if not (out_dir / MANIFEST_NAME).is_file():
            raise typer.BadParameter(f"{out_dir} holds no {MANIFEST_NAME}: not replacing it")
    # Build beside the target, so a failed export leaves the old bundle in place.
    target = out_dir.with_name(f".{out_dir.name}.new") if replace else out_dir
    if replace:
        shutil.rmtree(target, ignore_errors=True)  # leftover of an interrupted run
    report = build_plumbing_bundle(target, size=size, seed=seed)
    if replace:
        shutil.rmtree(out_dir)
        target.rename(out_dir)
    manifest = report.bundle.manifest
    typer.echo(
        f"wrote {out_dir}: {manifest.name} {manifest.version}, "
        f"{report.total_bytes / 1e6:.2f} MB, device UID {manifest.device_uid}"
    )
    for file, size_bytes in report.sizes.items():
        parity = report.parity.get(file)
        extra = f"  ONNX parity {parity:.2e}" if parity is not None else ""
        typer.echo(f"  {file:32s} {size_bytes / 1e6:7.2f} MB{extra}")


if __name__ == "__main__":  # pragma: no cover
    app()
