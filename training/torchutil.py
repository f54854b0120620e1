"""Device, seeds, mixed precision and checkpoint files shared by the training loops."""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from worker.atomic import atomic_file, write_atomic


def pick_device(name: str = "auto") -> torch.device:
    """ "auto": CUDA when available, else CPU; otherwise the named device."""
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name
    )
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {name!r} requested but CUDA is not available")
        # Fixed input sizes: let cuDNN pick the fastest kernels (at the cost of bitwise
        # reproducibility between runs on GPU; CPU runs stay bitwise reproducible).
        torch.backends.cudnn.benchmark = True
    return device


def derive_seed(seed: int, *keys: object) -> int:
    """A stable 31-bit seed for (seed, keys): every stage and epoch gets its own stream."""
    text = json.dumps([seed, *[str(k) for k in keys]])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") & 0x7FFFFFFF


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def amp_context(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA where supported (no loss scaling needed), else fp16; none on CPU."""
    if not enabled or device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def needs_grad_scaler(device: torch.device, amp: bool) -> bool:
    return amp and device.type == "cuda" and not torch.cuda.is_bf16_supported()


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Atomic: written beside the target, then renamed, so a crash never leaves half a file."""
    with atomic_file(path) as fh:
        torch.save(payload, fh)


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    payload: dict[str, Any] = torch.load(path, map_location=device, weights_only=True)
    return payload


def write_json(path: Path, data: object) -> None:
    write_atomic(path, json.dumps(data, indent=1, default=_jsonable) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _jsonable(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def fingerprint(data: object) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=_jsonable).encode()).hexdigest()


def array_sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).data).hexdigest()


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was_training)


class StageMismatch(RuntimeError):
    """--resume found a stage trained with other settings or data."""


def prepare_stage(out_dir: Path, stage_fingerprint: str, resume: bool) -> str:
    """ "done" (finished with these settings), "resume" (last.pt to continue) or "fresh".

    Without `resume`, the stage folder (only ever written by this stage) starts empty.
    """
    result, last = out_dir / "result.json", out_dir / "last.pt"
    if resume and result.is_file():
        if read_json(result).get("fingerprint") == stage_fingerprint:
            return "done"
        raise StageMismatch(
            f"{out_dir} was trained with other settings or data; run without --resume to retrain it"
        )
    if resume and last.is_file():
        if load_checkpoint(last).get("fingerprint") != stage_fingerprint:
            raise StageMismatch(
                f"{last} belongs to other settings or data; run without --resume to restart"
            )
        return "resume"
    if out_dir.exists():
        for child in out_dir.iterdir():
            if child.is_file():
                child.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    return "fresh"
