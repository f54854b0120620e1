"""Pack a training run folder for the trip home from a GPU host: one tar.gz, cut into parts.

    python training/gpu/pack.py RUN OUT [--part-mb 15] [--max-parts 7] [--max-total-mb 62]

Writes OUT/run.tar.part00, part01, ... (concatenated they are one .tar.gz; `unpack.py` puts
them back together). What travels is what `cxr-train export` and the report need:

    config.json, splits.json, timings.json
    segmentation/best.pt (as trained, float32) and result.json
    split-0/<member>/best.pt (floating tensors stored as float16), result.json, predictions.npz
    result.json + predictions.npz of every other split and of the ablation members (no .pt)
    report/ (all of it)
    lungmaps*.npz only when small (`cxr-train segmentation --resume` remakes them from the
    U-Net, whose best.pt travels unchanged, so their U-Net sha256 still matches)

Never: last.pt, partial files, the cache, bundle/, variants/. `pack-manifest.json` (in the
tar) lists every packed file with its sha256 and, for the float16 checkpoints, the converted
keys (unpack.py converts them back to float32); what was left out and why; and what the run
lacks (a run cut short by a timeout).

When the parts would exceed the budget, the least important things go first: lung maps (can
be remade), report figures (remade by `cxr-train evaluate`), the U-Net in float16, the
ablation members' predictions, and last the predictions of splits > 0 (highest split first);
a member's result.json goes with its predictions, so that `cxr-train evaluate` still runs.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import shutil
import sys
import tempfile
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

PART_NAME = "run.tar.part"
MANIFEST = "pack-manifest.json"
PACK_FORMAT = 1
ROOT_FILES = ("config.json", "splits.json", "timings.json")


@dataclass
class Item:
    arcname: str
    source: Path
    #: None: always packed; else the reduction step that removes (or halves) it.
    drop_step: int | None = None
    why: str = ""
    half: bool = False  # store floating tensors as float16
    packed: Path | None = None  # the file that goes into the tar (a converted copy or source)
    info: dict[str, Any] = field(default_factory=dict)
    estimate: int = 0


# Reduction steps, applied in this order while the estimate exceeds the budget.
STEP_LUNGMAPS, STEP_FIGURES, STEP_UNET_HALF, STEP_ABLATION, STEP_SPLITS = range(5)
STEP_NOTES = {
    STEP_LUNGMAPS: "lung maps: `cxr-train segmentation --resume` remakes them",
    STEP_FIGURES: "report figures: `cxr-train evaluate` remakes them from the packed predictions",
    STEP_UNET_HALF: "U-Net checkpoint stored in float16 (its lung maps no longer match its sha)",
    STEP_ABLATION: "ablation members' predictions + result.json (numbers stay in report.json)",
    STEP_SPLITS: "predictions + result.json of splits > 0 (numbers stay in report.json)",
}


def sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def compressed_size(path: Path) -> int:
    """Bytes after gzip level 6 (estimates the file's share of the tar.gz)."""
    comp = zlib.compressobj(6)
    total = 0
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            total += len(comp.compress(block))
    return total + len(comp.flush()) + 1024  # + tar header and padding


def half_checkpoint(src: Path, dst: Path) -> dict[str, Any]:
    """Copy of a checkpoint whose float32 state-dict tensors are float16; which ones, in info."""
    import torch

    payload = torch.load(src, map_location="cpu", weights_only=True)
    state = payload["model"]
    converted: list[str] = []
    kept: list[str] = []
    out: OrderedDict[str, Any] = OrderedDict()
    for key, tensor in state.items():
        if isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32:
            half = tensor.half()
            if bool(torch.isfinite(half).all()) or not bool(torch.isfinite(tensor).all()):
                out[key] = half
                converted.append(key)
                continue
            kept.append(key)  # would overflow float16: stays float32
        out[key] = tensor
    payload["model"] = out
    torch.save(payload, dst)
    return {"fp16_keys": converted, "fp32_kept_keys": kept}


def _member_folders(run: Path) -> list[Path]:
    return sorted(p for p in run.glob("split-*/*") if p.is_dir())


def _split_index(folder: Path) -> int:
    return int(folder.parent.name.split("-", 1)[1])


def collect(run: Path, config: dict[str, Any], lungmaps_max: int) -> tuple[list[Item], list[Any]]:
    """What to pack (with its reduction step) and what is left out on purpose."""
    items: list[Item] = []
    left_out: list[dict[str, Any]] = []
    for name in ROOT_FILES:
        if (run / name).is_file():
            items.append(Item(name, run / name))
    seg = run / "segmentation"
    for name in ("best.pt", "result.json"):
        if (seg / name).is_file():
            items.append(
                Item(
                    f"segmentation/{name}",
                    seg / name,
                    STEP_UNET_HALF if name == "best.pt" else None,
                )
            )
    for path in sorted(run.glob("lungmaps*.npz")):
        size = path.stat().st_size
        if size <= lungmaps_max:
            items.append(Item(path.name, path, STEP_LUNGMAPS))
        else:
            left_out.append(
                {
                    "path": path.name,
                    "bytes": size,
                    "why": f"over {lungmaps_max} bytes; " + STEP_NOTES[STEP_LUNGMAPS],
                }
            )
    members = {m["name"] for m in config.get("members", [])}
    for folder in _member_folders(run):
        rel = folder.relative_to(run).as_posix()
        k = _split_index(folder)
        ablation = "--" in folder.name
        if not (folder / "result.json").is_file():
            left_out.append({"path": rel, "why": "incomplete: no result.json (cut short?)"})
            continue
        # A member without its predictions would break `cxr-train evaluate`: when the budget
        # drops the predictions, the result.json goes with them (the split or ablation then
        # reads as not trained).
        step = None if k == 0 and not ablation else STEP_ABLATION if ablation else STEP_SPLITS
        items.append(Item(f"{rel}/result.json", folder / "result.json", step))
        if (folder / "predictions.npz").is_file():
            items.append(Item(f"{rel}/predictions.npz", folder / "predictions.npz", step))
        if k == 0 and not ablation and folder.name in members and (folder / "best.pt").is_file():
            items.append(Item(f"{rel}/best.pt", folder / "best.pt", half=True))
    report = run / "report"
    if report.is_dir():
        for path in sorted(p for p in report.rglob("*") if p.is_file()):
            step = STEP_FIGURES if path.suffix.lower() in (".png", ".jpg", ".svg") else None
            items.append(Item(path.relative_to(run).as_posix(), path, step))
    packed = {i.arcname for i in items}
    noted = {o["path"] for o in left_out}
    for path in sorted(p for p in run.rglob("*") if p.is_file()):
        rel = path.relative_to(run).as_posix()
        if rel in packed or rel in noted or any(rel.startswith(n + "/") for n in noted):
            continue
        why = "not needed by export or report"
        if path.name == "last.pt":
            why = "resume checkpoint: not needed"
        elif path.name == "best.pt":
            why = "checkpoint of a split > 0 or an ablation: its predictions travel"
        left_out.append({"path": rel, "bytes": path.stat().st_size, "why": why})
    return items, left_out


def run_status(run: Path, config: dict[str, Any]) -> dict[str, Any]:
    """What a complete run would hold that this one lacks."""
    missing: list[str] = []
    names = [m["name"] for m in config.get("members", [])]
    k = int(config.get("splits", {}).get("k", 1))
    for path in ("splits.json", "segmentation/result.json", "report/report.json", "timings.json"):
        if not (run / path).is_file():
            missing.append(path)
    for split in range(k):
        for name in names:
            if not (run / f"split-{split}" / name / "result.json").is_file():
                missing.append(f"split-{split}/{name}")
    ab = config.get("ablation", {})
    if ab.get("enabled"):
        member = ab.get("member") or (names[0] if names else "?")
        for variant, key in (("no-seg", "no_segmentation"), ("no-prep", "no_preprocessing")):
            if (
                ab.get(key)
                and not (run / "split-0" / f"{member}--{variant}" / "result.json").is_file()
            ):
                missing.append(f"split-0/{member}--{variant}")
    report_path = run / "report" / "report.json"
    splits_missing = None
    if report_path.is_file():
        splits_missing = json.loads(report_path.read_text()).get("splits_missing")
    exportable = all(
        (run / p).is_file()
        for p in ("config.json", "splits.json", "segmentation/best.pt", "report/report.json")
    ) and all((run / "split-0" / n / "best.pt").is_file() for n in names)
    return {
        "missing": missing,
        "report_splits_missing": splits_missing,
        "exportable": exportable,
    }


class PartWriter:
    """A write-only file that spills into OUT/run.tar.part00, part01, ... of `part_bytes`."""

    def __init__(self, out: Path, part_bytes: int) -> None:
        self.out, self.part_bytes = out, part_bytes
        self.paths: list[Path] = []
        self._fh: BinaryIO | None = None
        self._left = 0
        self.total = 0

    def _next(self) -> None:
        if self._fh is not None:
            self._fh.close()
        path = self.out / f"{PART_NAME}{len(self.paths):02d}"
        self.paths.append(path)
        self._fh = path.open("wb")
        self._left = self.part_bytes

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        while len(view):
            if self._fh is None or self._left == 0:
                self._next()
            assert self._fh is not None
            n = min(self._left, len(view))
            self._fh.write(view[:n])
            self._left -= n
            self.total += n
            view = view[n:]
        return len(data)

    def flush(self) -> None:
        if self._fh is not None:
            self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def write_parts(
    items: list[Item], manifest: dict[str, Any], out: Path, part_bytes: int
) -> PartWriter:
    import tarfile

    for old in out.glob(f"{PART_NAME}*"):
        old.unlink()
    writer = PartWriter(out, part_bytes)
    with tempfile.TemporaryDirectory() as tmp:
        manifest_path = Path(tmp) / MANIFEST
        manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
        with (
            gzip.GzipFile(fileobj=writer, mode="wb", compresslevel=6, mtime=0) as gz,
            tarfile.open(fileobj=gz, mode="w|", format=tarfile.PAX_FORMAT) as tar,
        ):
            tar.add(manifest_path, arcname=MANIFEST)
            for item in items:
                assert item.packed is not None
                tar.add(item.packed, arcname=item.arcname)
    writer.close()
    return writer


def pack(
    run: Path,
    out: Path,
    part_bytes: int,
    max_parts: int,
    max_total: int,
    lungmaps_max: int,
    half_members: bool = True,
    training_rc: int | None = None,
) -> dict[str, Any]:
    start = time.perf_counter()
    run, out = Path(run), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    budget = min(max_total, part_bytes * max_parts)
    config = (
        json.loads((run / "config.json").read_text()) if (run / "config.json").is_file() else {}
    )
    if not config:
        print(f"WARNING: no {run}/config.json: the run never started", file=sys.stderr)
    items, left_out = collect(run, config, lungmaps_max)
    status = run_status(run, config)
    staging = Path(tempfile.mkdtemp(prefix="cxr-pack-"))
    try:

        def halve(item: Item) -> None:
            item.packed = staging / item.arcname.replace("/", "__")
            item.info.update(source_sha256=sha256(item.source))
            item.info.update(half_checkpoint(item.source, item.packed))
            item.half, item.drop_step = True, None
            item.estimate = compressed_size(item.packed)

        def drop(victims: list[Item], why: str) -> None:
            for item in victims:
                items.remove(item)
                left_out.append(
                    {"path": item.arcname, "bytes": item.source.stat().st_size, "why": why}
                )

        for item in items:
            item.info = {"source_bytes": item.source.stat().st_size}
            item.packed = item.source
            if item.half and half_members:
                halve(item)
                continue
            item.half = False
            item.estimate = compressed_size(item.packed)

        def estimate() -> int:
            return sum(i.estimate for i in items) + 64 * 1024  # + the manifest

        reductions: list[str] = []
        for step in (STEP_LUNGMAPS, STEP_FIGURES, STEP_UNET_HALF, STEP_ABLATION, STEP_SPLITS):
            while estimate() > budget * 0.98:
                hit = [i for i in items if i.drop_step == step]
                if not hit:
                    break
                if step == STEP_UNET_HALF:
                    for item in hit:
                        halve(item)
                    reductions.append(STEP_NOTES[step])
                elif step == STEP_SPLITS:  # one split at a time, the highest first
                    top = max(int(i.arcname.split("/")[0][len("split-") :]) for i in hit)
                    drop(
                        [i for i in hit if i.arcname.startswith(f"split-{top}/")],
                        "over the size budget: " + STEP_NOTES[step],
                    )
                    reductions.append(f"{STEP_NOTES[step]}: split {top}")
                else:
                    drop(hit, "over the size budget: " + STEP_NOTES[step])
                    reductions.append(STEP_NOTES[step])

        halves = [i.arcname for i in items if i.half]
        manifest: dict[str, Any] = {
            "format": PACK_FORMAT,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "run": str(run),
            "training_rc": training_rc,
            "status": status,
            "fp16": {
                "files": halves,
                "note": "floating tensors of these checkpoints' state dicts (payload['model'])"
                " were stored as float16 to halve the size; unpack.py converts them back to"
                " float32. The weights are therefore float16-rounded: the export's `torch_auc`"
                " (from predictions.npz, computed on the GPU with the original weights) is the"
                " reference for any AUC change.",
            },
            "reductions": reductions,
            "left_out": left_out,
            "files": {
                i.arcname: {
                    "bytes": i.packed.stat().st_size if i.packed else 0,
                    "sha256": sha256(i.packed) if i.packed else None,
                    **i.info,
                }
                for i in items
            },
            "budget": {"part_bytes": part_bytes, "max_parts": max_parts, "max_total": max_total},
        }
        writer = write_parts(items, manifest, out, part_bytes)
        while writer.total > budget:  # the estimate was short: drop more and write again
            drops = [i for i in items if i.drop_step is not None]
            if not drops:
                break
            victim = max(drops, key=lambda i: (i.drop_step or 0, i.arcname))
            items.remove(victim)
            left_out.append({"path": victim.arcname, "why": "over the size budget (second pass)"})
            manifest["files"].pop(victim.arcname, None)
            reductions.append(f"second pass: {victim.arcname}")
            writer = write_parts(items, manifest, out, part_bytes)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    summary = {
        "parts": [p.name for p in writer.paths],
        "total_bytes": writer.total,
        "budget_bytes": budget,
        "files": len(items) + 1,
        "fp16": halves,
        "reductions": reductions,
        "missing": status["missing"],
        "exportable": status["exportable"],
        "seconds": round(time.perf_counter() - start, 1),
    }
    packed = manifest["files"]
    for name in sorted(packed, key=lambda n: -int(packed[n]["bytes"]))[:30]:
        flag = "  (float16)" if name in halves else ""
        print(f"  {packed[name]['bytes'] / 1e6:8.2f} MB  {name}{flag}")
    for entry in left_out:
        size = f"{entry['bytes'] / 1e6:.2f} MB" if "bytes" in entry else ""
        print(f"  left out: {entry['path']} {size} ({entry['why']})")
    print(json.dumps(summary, indent=1))
    if writer.total > budget:
        print(f"ERROR: {writer.total} bytes is over the budget of {budget}", file=sys.stderr)
    if len(writer.paths) > max_parts:
        print(f"ERROR: {len(writer.paths)} parts, more than {max_parts}", file=sys.stderr)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="run folder (cxr-train --workdir)")
    parser.add_argument("out", type=Path, help="folder for run.tar.partNN")
    parser.add_argument("--part-mb", type=float, default=15.0, help="bytes per part / 1e6")
    parser.add_argument("--max-parts", type=int, default=7)
    parser.add_argument("--max-total-mb", type=float, default=62.0, help="all parts / 1e6")
    parser.add_argument("--lungmaps-max-mb", type=float, default=4.0)
    parser.add_argument("--keep-fp32", action="store_true", help="members' best.pt as trained")
    parser.add_argument("--training-rc", type=int, default=None, help="recorded in the manifest")
    args = parser.parse_args(argv)
    if not args.run.is_dir():
        print(f"no run folder {args.run}", file=sys.stderr)
        return 2
    summary = pack(
        args.run,
        args.out,
        int(args.part_mb * 1e6),
        args.max_parts,
        int(args.max_total_mb * 1e6),
        int(args.lungmaps_max_mb * 1e6),
        half_members=not args.keep_fp32,
        training_rc=args.training_rc,
    )
    over = summary["total_bytes"] > summary["budget_bytes"]
    return 3 if over or len(summary["parts"]) > args.max_parts else 0


if __name__ == "__main__":
    sys.exit(main())
