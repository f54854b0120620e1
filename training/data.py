"""The training data: a CSV of images with patient groups and labels, read into typed records.

One schema for every input, the public pool's `metadata.csv` included (it is a superset):

    image          path of a DICOM, PNG or JPEG file, relative to the CSV's folder (required)
    patient_group  patients that must stay in one split (falls back to `patient_id`) (required)
    label          a source label, mapped to `CxrClass` by the configured label lists (required)
    view, sex, age, source, days_offset, lung_mask, lung_mask_weak, license, id   (optional)

Rows whose label is in neither list (e.g. the pool's `unknown`) and, by default, lateral views
are dropped, with counts. No torch here; DICOM support is imported only when a DICOM file is read.
"""

from __future__ import annotations

import csv
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict
from pydicom.misc import is_dicom

from worker.classes import CxrClass

DEFAULT_POSITIVE_LABELS: tuple[str, ...] = ("covid", "covid19", "covid-19", "positive")
DEFAULT_NEGATIVE_LABELS: tuple[str, ...] = (
    "negative",
    "other_pneumonia",
    "normal",
    "no finding",
    "pneumonia",
    "non-covid",
)
DEFAULT_LATERAL_VIEWS: tuple[str, ...] = ("l", "ll", "rl", "lateral", "lat")
UNKNOWN = "unknown"


class DataError(ValueError):
    """The dataset CSV cannot be used; the message says why."""


class Record(BaseModel):
    """One usable image of the dataset. `id` is unique and never a patient name."""

    model_config = ConfigDict(frozen=True)

    id: str
    image: str  # absolute path
    patient_group: str
    label: CxrClass
    label_text: str
    source: str = UNKNOWN
    view: str = ""
    sex: str = ""
    age: float | None = None
    days_offset: float | None = None
    lung_mask: str | None = None  # absolute path; 0 background, 255 lung, 127 ignore
    lung_mask_weak: str | None = None
    license: str = ""


@dataclass
class LabelMap:
    """Source label text -> class; texts in neither list are dropped."""

    positive: Sequence[str] = DEFAULT_POSITIVE_LABELS
    negative: Sequence[str] = DEFAULT_NEGATIVE_LABELS

    def __post_init__(self) -> None:
        pos = {s.strip().lower() for s in self.positive}
        neg = {s.strip().lower() for s in self.negative}
        if pos & neg:
            raise DataError(f"labels listed as both positive and negative: {sorted(pos & neg)}")
        self._pos, self._neg = pos, neg

    def __call__(self, text: str) -> CxrClass | None:
        key = text.strip().lower()
        if key in self._pos:
            return CxrClass.COVID19
        if key in self._neg:
            return CxrClass.NEGATIVE
        return None


@dataclass
class LoadSummary:
    """What `read_dataset` kept and dropped, for logs and the model card."""

    rows: int = 0
    kept: int = 0
    dropped: Counter[str] = field(default_factory=Counter)

    def describe(self) -> str:
        dropped = ", ".join(f"{n} {why}" for why, n in sorted(self.dropped.items())) or "none"
        return f"{self.kept} of {self.rows} rows kept; dropped: {dropped}"


def _float(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text.strip())
    except ValueError:
        return None  # blanks, '?', ...
    return value if math.isfinite(value) else None


def _path(base: Path, text: str | None) -> str | None:
    if not text or not text.strip():
        return None
    path = Path(text.strip())
    return str(path if path.is_absolute() else (base / path).resolve())


_ID_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _default_id(image: str) -> str:
    """A dataset id from the image path: the file stem, made filename-safe."""
    return _ID_SAFE.sub("_", Path(image).stem).strip("_") or "image"


def read_dataset(
    csv_path: Path,
    labels: LabelMap | None = None,
    frontal_only: bool = True,
    lateral_views: Iterable[str] = DEFAULT_LATERAL_VIEWS,
) -> tuple[list[Record], LoadSummary]:
    """Read a dataset CSV into records (paths made absolute against the CSV's folder)."""
    csv_path = Path(csv_path)
    labels = labels or LabelMap()
    lateral = {v.lower() for v in lateral_views}
    base = csv_path.resolve().parent
    summary = LoadSummary()
    records: list[Record] = []
    seen: Counter[str] = Counter()
    with csv_path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        columns = set(reader.fieldnames or ())
        missing = {"image", "label"} - columns
        if missing or not columns & {"patient_group", "patient_id"}:
            raise DataError(
                f"{csv_path}: needs columns image, label and patient_group (or patient_id); "
                f"missing {sorted(missing | ({'patient_group'} - columns))}"
            )
        for row in reader:
            summary.rows += 1
            label_text = (row.get("label") or "").strip()
            label = labels(label_text)
            if label is None:
                summary.dropped[f"label {label_text or '(blank)'!r}"] += 1
                continue
            view = (row.get("view") or "").strip()
            if frontal_only and view.lower() in lateral:
                summary.dropped["lateral view"] += 1
                continue
            image = _path(base, row.get("image"))
            group = (row.get("patient_group") or row.get("patient_id") or "").strip()
            if image is None or not group:
                summary.dropped["no image path or patient group"] += 1
                continue
            rid = (row.get("id") or "").strip() or _default_id(image)
            seen[rid] += 1
            if seen[rid] > 1:  # the same stem in two folders: keep ids unique and stable
                rid = f"{rid}-{seen[rid]}"
            records.append(
                Record(
                    id=rid,
                    image=image,
                    patient_group=group,
                    label=label,
                    label_text=label_text,
                    source=(row.get("source") or "").strip() or UNKNOWN,
                    view=view,
                    sex=(row.get("sex") or "").strip().upper(),
                    age=_float(row.get("age")),
                    days_offset=_float(row.get("days_offset")),
                    lung_mask=_path(base, row.get("lung_mask")),
                    lung_mask_weak=_path(base, row.get("lung_mask_weak")),
                    license=(row.get("license") or "").strip(),
                )
            )
    summary.kept = len(records)
    if not records:
        raise DataError(f"{csv_path}: no usable rows ({summary.describe()})")
    return records, summary


def stratum(record: Record) -> str:
    """Source and source label (e.g. ieee8023/other_pneumonia): what splits stratify by."""
    return f"{record.source}/{record.label_text.lower()}"


def subsample(records: Sequence[Record], limit: int, seed: int) -> list[Record]:
    """About `limit` records: whole patient groups, spread evenly over (source, label) strata.

    For smoke runs. Each stratum gets an equal share (what a small stratum cannot fill goes to
    the others); groups are drawn at random (seeded) and never split.
    """
    if limit >= len(records):
        return list(records)
    rng = np.random.default_rng(seed)
    groups: dict[str, list[Record]] = {}
    for r in records:
        groups.setdefault(r.patient_group, []).append(r)
    by_stratum: dict[str, list[str]] = {}
    for g, rows in groups.items():
        key = Counter(stratum(r) for r in rows).most_common(1)[0][0]
        by_stratum.setdefault(key, []).append(g)
    keys = sorted(by_stratum)
    for key in keys:
        order = rng.permutation(len(by_stratum[key]))
        by_stratum[key] = [sorted(by_stratum[key])[i] for i in order]
    chosen: list[str] = []
    taken = 0
    remaining = list(keys)
    while remaining and taken < limit:
        share = max(1, (limit - taken) // len(remaining))
        for key in list(remaining):
            count = 0
            while by_stratum[key] and count < share and taken < limit:
                g = by_stratum[key].pop()
                chosen.append(g)
                count += len(groups[g])
                taken += len(groups[g])
            if not by_stratum[key]:
                remaining.remove(key)
        if share == 1 and all(not by_stratum[k] for k in remaining):
            break
    keep = set(chosen)
    return [r for r in records if r.patient_group in keep]


# --------------------------------------------------------------------------- pixels


def _is_dicom(path: Path) -> bool:
    return path.suffix.lower() in {".dcm", ".dicom"} or is_dicom(path)


def read_display_image(path: str | Path) -> np.ndarray:
    """A 2-D uint8 display image (brighter = denser) from a DICOM, PNG or JPEG file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image not found: {path}")
    if _is_dicom(path):
        # DICOM only when one is read: the training path stays importable without the node.
        import pydicom

        from dicom_node.results.pixels import decode_display

        return decode_display(pydicom.dcmread(path))
    raw = np.fromfile(path, dtype=np.uint8)
    image = cv2.imdecode(raw, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise DataError(f"cannot decode image {path}")
    if image.ndim == 3:
        code = cv2.COLOR_BGR2GRAY if image.shape[2] == 3 else cv2.COLOR_BGRA2GRAY
        image = cv2.cvtColor(image, code)
    if image.dtype == np.uint16:  # 16-bit PNG: stretch the used range to 8 bits
        lo, hi = float(image.min()), float(image.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        image = np.clip((image.astype(np.float32) - lo) * scale, 0, 255).astype(np.uint8)
    if image.dtype != np.uint8 or image.ndim != 2:
        raise DataError(f"{path}: unsupported pixel format {image.dtype} {image.shape}")
    return image


def read_mask(path: str | Path, shape: tuple[int, int]) -> np.ndarray:
    """A lung mask as uint8 {0, 127, 255}, resized (nearest) to the image's shape if needed."""
    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise DataError(f"cannot read lung mask {path}")
    if mask.shape != shape:
        mask = cv2.resize(mask, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
    out = np.full(mask.shape, 127, dtype=np.uint8)
    out[mask < 64] = 0
    out[mask >= 192] = 255
    return out


def mixed_sources(records: Sequence[Record]) -> list[str]:
    """Sources holding both classes: the only same-source contrast (pool: ieee8023)."""
    classes: dict[str, set[CxrClass]] = {}
    for r in records:
        classes.setdefault(r.source, set()).add(r.label)
    return sorted(s for s, c in classes.items() if len(c) == len(CxrClass))


def same_source_rows(records: Sequence[Record], rows: Sequence[int] | np.ndarray) -> np.ndarray:
    """For each of `rows`, whether its record comes from a source holding both classes."""
    mixed = set(mixed_sources(records))
    return np.array([records[r].source in mixed for r in rows], dtype=bool)
