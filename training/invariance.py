"""Invariance audit: does the served score move when nothing about the disease changes?

Each test image is read from its original file, altered in a way that says nothing about the
lungs (JPEG re-encoding, a 2x down- and up-scale, a black border), preprocessed by the shared
`worker.preprocess.preprocess` and scored by the exported bundle through
`worker.inference.Ensemble`, exactly as the node would. The report gives the distribution of
the absolute score change per alteration, and the test AUC before and after.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np

from training.data import Record, read_display_image
from training.metrics import roc_auc
from training.results import Alteration, ChangeSummary, InvarianceAudit
from worker.bundle import load_bundle
from worker.inference import Ensemble
from worker.markdown import markdown_table
from worker.preprocess import preprocess

log = logging.getLogger(__name__)


#: The score change the issue allows on average, and the per-image change counted as large.
MEAN_CHANGE_LIMIT = 0.05


def jpeg_q75(image: np.ndarray) -> np.ndarray:
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 75])
    if not ok:  # pragma: no cover - cv2 encodes any uint8 image
        raise ValueError("JPEG encoding failed")
    return np.asarray(cv2.imdecode(data, cv2.IMREAD_GRAYSCALE))


def downscale_2x(image: np.ndarray) -> np.ndarray:
    h, w = image.shape
    small = cv2.resize(image, (max(1, w // 2), max(1, h // 2)), interpolation=cv2.INTER_AREA)
    return np.asarray(cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR))


def black_border(image: np.ndarray, fraction: float = 0.1) -> np.ndarray:
    h, w = image.shape
    dy, dx = max(1, round(h * fraction)), max(1, round(w * fraction))
    return np.asarray(cv2.copyMakeBorder(image, dy, dy, dx, dx, cv2.BORDER_CONSTANT, value=0))


PERTURBATIONS: dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]] = {
    "jpeg_q75": ("re-encoded as JPEG, quality 75", jpeg_q75),
    "downscale_2x": ("downscaled 2x (area) and upscaled back (bilinear)", downscale_2x),
    "black_border": ("padded with a black border of 10% of each side", black_border),
}


def _scores(ensemble: Ensemble, images: Sequence[np.ndarray], batch: int) -> np.ndarray:
    out: list[float] = []
    for start in range(0, len(images), batch):
        chunk = np.stack(images[start : start + batch])
        out += [p.probability for p in ensemble.predict(chunk)]
    return np.asarray(out, dtype=np.float64)


def change_summary(base: np.ndarray, altered: np.ndarray) -> ChangeSummary:
    """Distribution of |altered - base|: the numbers the model card reports."""
    change = np.abs(altered - base)
    q = np.quantile(change, [0.5, 0.9, 0.95]) if len(change) else np.zeros(3)
    return {
        "n": len(change),
        "mean_abs_change": float(change.mean()) if len(change) else 0.0,
        "median": float(q[0]),
        "p90": float(q[1]),
        "p95": float(q[2]),
        "max": float(change.max()) if len(change) else 0.0,
        "fraction_over_0.05": float(np.mean(change > 0.05)) if len(change) else 0.0,
        "fraction_over_0.2": float(np.mean(change > 0.2)) if len(change) else 0.0,
        "mean_signed_change": float(np.mean(altered - base)) if len(change) else 0.0,
        "meets_target": bool(change.mean() < MEAN_CHANGE_LIMIT) if len(change) else False,
    }


def invariance_audit(
    bundle_dir: Path, records: Sequence[Record], batch: int = 16, figure: Path | None = None
) -> InvarianceAudit:
    """Score each record's image as is and under each alteration with the bundle at `bundle_dir`."""
    ensemble = Ensemble(load_bundle(bundle_dir), providers=["CPUExecutionProvider"])
    params = ensemble.params
    displays = [read_display_image(r.image) for r in records]
    y = np.array([int(r.label) for r in records])
    sources = np.array([r.source for r in records])
    base = _scores(ensemble, [preprocess(d, params) for d in displays], batch)
    out: InvarianceAudit = {
        "bundle": str(bundle_dir),
        "images": len(records),
        "auc_original": roc_auc(y, base) if len(set(y.tolist())) == 2 else None,
        "limit_mean_abs_change": MEAN_CHANGE_LIMIT,
        "alterations": {},
    }
    changes: dict[str, np.ndarray] = {}
    for key, (text, alter) in PERTURBATIONS.items():
        scores = _scores(ensemble, [preprocess(alter(d), params) for d in displays], batch)
        summary: Alteration = {
            **change_summary(base, scores),
            "description": text,
            "auc_altered": roc_auc(y, scores) if len(set(y.tolist())) == 2 else None,
            "per_source_mean_abs_change": {
                s: float(np.mean(np.abs(scores - base)[sources == s])) for s in sorted(set(sources))
            },
        }
        out["alterations"][key] = summary
        changes[key] = np.abs(scores - base)
        log.info("invariance %s: mean |change| %.4f", key, summary["mean_abs_change"])
    if figure is not None:
        out["figure"] = _figure(changes, figure)
    return out


def _figure(changes: dict[str, np.ndarray], path: Path) -> str | None:
    from training import plots

    if not plots.available():
        return None
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = [float(b) for b in np.linspace(0, 1, 41)]
    for key, values in changes.items():
        ax.hist(values, bins=bins, histtype="step", linewidth=1.5, label=key)
    ax.axvline(MEAN_CHANGE_LIMIT, color="gray", linestyle="--", linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("|score change|")
    ax.set_ylabel("test images")
    ax.set_title("Score change under alterations that say nothing about disease")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def invariance_lines(result: InvarianceAudit) -> list[str]:
    """The model card's section."""
    lines = [
        "## Invariance",
        "",
        f"{result['images']} test images read from their original files, altered, then"
        " preprocessed and scored through the served path (`worker.inference.Ensemble`)."
        f" Target: mean |score change| < {result['limit_mean_abs_change']}.",
        "",
    ]
    rows = [
        (
            f"{key}: {s['description']}",
            f"{s['mean_abs_change']:.4f}",
            f"{s['median']:.4f}",
            f"{s['p95']:.4f}",
            f"{s['max']:.4f}",
            f"{100 * s['fraction_over_0.05']:.1f}%",
            f"{100 * s['fraction_over_0.2']:.1f}%",
            "n/a" if s.get("auc_altered") is None else f"{s['auc_altered']:.3f}",
            "met" if s["meets_target"] else "NOT met",
        )
        for key, s in result["alterations"].items()
    ]
    header = ("alteration", "mean abs change", "median", "p95", "max", "> 0.05", "> 0.2")
    lines += markdown_table((*header, "AUC after", "target"), rows)
    if result.get("auc_original") is not None:
        lines += ["", f"AUC of the unaltered images on this path: {result['auc_original']:.3f}."]
    return lines
