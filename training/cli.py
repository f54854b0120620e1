"""`cxr-train`: the command line of the offline side."""

from __future__ import annotations

import shutil
from pathlib import Path

import typer

from worker.bundle import MANIFEST_NAME

app = typer.Typer(help="Train, evaluate and export CXR model bundles.", no_args_is_help=True)


@app.callback()
def main() -> None:
    """Offline tools; each writes or checks a model bundle."""


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
