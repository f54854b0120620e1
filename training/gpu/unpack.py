"""Unpack what `pack.py` wrote on a GPU host into a run folder that `cxr-train export` accepts.

    python training/gpu/unpack.py PARTS_DIR RUN [--force]

Joins PARTS_DIR/run.tar.part00, part01, ..., extracts them into RUN, checks every file
against the sha256 in pack-manifest.json, converts the float16 checkpoints back to float32
(state dicts only; the other payload entries, such as the training fingerprint, are kept),
and writes RUN/config.toml: the run's own config.json as TOML, so that `cxr-train export -c
RUN/config.toml -w RUN` sees exactly the configuration that was trained (checked by reading
it back). Prints what the run lacks, if anything, and the export command.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import re
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PART_NAME = "run.tar.part"
MANIFEST = "pack-manifest.json"
REPO = Path(__file__).resolve().parents[2]


class JoinedParts(io.RawIOBase):
    """The parts, read one after the other as one stream."""

    def __init__(self, parts: list[Path]) -> None:
        self._parts: Iterator[Path] = iter(parts)
        self._fh: io.BufferedReader | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while True:
            if self._fh is None:
                part = next(self._parts, None)
                if part is None:
                    return 0
                self._fh = part.open("rb")
            n = self._fh.readinto(buffer)
            if n:
                return n
            self._fh.close()
            self._fh = None


def find_parts(folder: Path) -> list[Path]:
    parts = sorted(folder.glob(f"{PART_NAME}[0-9]*"))
    if not parts:
        raise SystemExit(f"no {PART_NAME}NN files in {folder}")
    numbers = [int(p.name[len(PART_NAME) :]) for p in parts]
    if numbers != list(range(len(parts))):
        raise SystemExit(f"parts missing or out of order in {folder}: {[p.name for p in parts]}")
    return parts


def sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def restore_fp32(path: Path, keys: list[str]) -> None:
    """Convert the listed float16 state-dict tensors of a checkpoint back to float32."""
    import torch

    payload = torch.load(path, map_location="cpu", weights_only=True)
    state = payload["model"]
    wanted = set(keys)
    missing = wanted - set(state)
    if missing:
        raise SystemExit(f"{path}: {len(missing)} converted keys not in the checkpoint")
    for key in wanted:
        if state[key].dtype != torch.float16:
            raise SystemExit(f"{path}: {key} is {state[key].dtype}, expected float16")
        state[key] = state[key].float()
    payload["model"] = state
    partial = path.with_name(path.name + ".partial")
    torch.save(payload, partial)
    partial.replace(path)


# --------------------------------------------------------------------------- config as TOML

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(name: str) -> str:
    return name if _BARE_KEY.match(name) else json.dumps(name, ensure_ascii=False)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no TOML for {type(value).__name__}")


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def to_toml(data: dict[str, Any], prefix: str = "") -> str:
    """TOML for a JSON-like dict (None values are left out: the config's defaults are None)."""
    lines: list[str] = []
    for key, value in data.items():
        if value is None or isinstance(value, dict) or _is_table_array(value):
            continue
        lines.append(f"{_key(key)} = {_value(value)}")
    for key, value in data.items():
        name = f"{prefix}{_key(key)}"
        if isinstance(value, dict):
            lines += ["", f"[{name}]", to_toml(value, f"{name}.").rstrip("\n")]
        elif _is_table_array(value):
            for entry in value:
                body = {k: v for k, v in entry.items() if not isinstance(v, dict)}
                lines += ["", f"[[{name}]]", to_toml(body).rstrip("\n")]
    return "\n".join(line for line in lines) + "\n"


def write_config_toml(run: Path) -> Path:
    """RUN/config.toml from RUN/config.json, checked by loading it back with the training code."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from training.config import load_config

    recorded = json.loads((run / "config.json").read_text())
    path = run / "config.toml"
    path.write_text(
        "# Written by training/gpu/unpack.py from config.json (the config this run was trained"
        " with).\n" + to_toml(recorded),
        encoding="utf-8",
    )
    cfg, _ = load_config(path)
    if cfg.model_dump(mode="json") != recorded:
        raise SystemExit(f"{path} does not read back as config.json: not using it")
    return path


# --------------------------------------------------------------------------- main


def unpack(parts_dir: Path, run: Path, force: bool = False) -> dict[str, Any]:
    parts = find_parts(parts_dir)
    if run.exists() and any(run.iterdir()) and not force:
        raise SystemExit(f"{run} is not empty (use --force to unpack over it)")
    run.mkdir(parents=True, exist_ok=True)
    names: list[str] = []
    with tarfile.open(fileobj=io.BufferedReader(JoinedParts(parts)), mode="r|gz") as tar:
        for member in tar:
            if not member.isfile():
                continue
            tar.extract(member, run, filter="data")
            names.append(member.name)
    manifest = json.loads((run / MANIFEST).read_text())
    files: dict[str, Any] = manifest["files"]
    problems = [n for n in files if n not in names]
    for name, entry in files.items():
        if name in names and sha256(run / name) != entry["sha256"]:
            problems.append(f"{name} (sha256)")
    if problems:
        raise SystemExit(f"damaged or incomplete pack: {problems}")
    restored = []
    for name in manifest.get("fp16", {}).get("files", []):
        restore_fp32(run / name, files[name]["fp16_keys"])
        restored.append(name)
    toml = write_config_toml(run) if (run / "config.json").is_file() else None
    return {"files": len(names), "restored_fp32": restored, "config": toml, "manifest": manifest}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("parts_dir", type=Path, help="folder with run.tar.part00 ...")
    parser.add_argument("run", type=Path, help="run folder to create")
    parser.add_argument("--force", action="store_true", help="unpack into a non-empty folder")
    args = parser.parse_args(argv)
    result = unpack(args.parts_dir, args.run, args.force)
    manifest = result["manifest"]
    status = manifest.get("status", {})
    print(f"{args.run}: {result['files']} files; float32 restored: {len(result['restored_fp32'])}")
    if manifest.get("training_rc") not in (0, None):
        print(f"training on the GPU host ended with rc {manifest['training_rc']} (124: timeout)")
    for item in status.get("missing", []):
        print(f"  missing from the run: {item}")
    for entry in manifest.get("left_out", []):
        if "budget" in entry["why"]:
            print(f"  left out for size: {entry['path']} ({entry['why']})")
    for note in manifest.get("reductions", []):
        print(f"  reduction: {note}")
    if not status.get("exportable", False):
        print("NOT exportable as is: see the missing items (README: recovering a cut-short run)")
        return 1
    if not (args.run / "report" / "report.json").is_file():
        print("no report/report.json: run `cxr-train evaluate` first (see the README)")
        return 1
    print(f"export: cxr-train export -c {result['config']} -w {args.run} --cache CACHE")
    return 0


if __name__ == "__main__":
    sys.exit(main())
