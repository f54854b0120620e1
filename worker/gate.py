"""The input gate: is this image a frontal chest radiograph the bundle's model is meant for?

Run between decoding and classification, on the pixels (the header checks come first, in the
node). Three groups of signals, each a score against a threshold from the bundle's `gate`
section (worker.bundle.GateSpec):

- sanity, on the decoded display image: size, aspect ratio, dynamic range, not (near-)constant,
  not noise;
- lung plausibility, on the U-Net's lung map: two lung fields, their area, one on each side of
  the midline, at the same height, of similar size, apices up;
- out-of-distribution: the Mahalanobis distance of ImageNet-pretrained features (an ONNX
  file of the bundle) from those of the training images.

An image is analysed only when every signal passes. numpy, OpenCV and onnxruntime only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import cv2
import numpy as np
import onnxruntime as ort

from worker.bundle import Bundle, BundleError, GateSpec, LungThresholds, SanityThresholds
from worker.model_input import LUNG_THRESHOLD
from worker.preprocess import PreprocessParams, preprocess

FEATURE_INPUT = "image"
FEATURE_OUTPUT = "features"
#: The side of the copy the sanity signals other than size and aspect are computed on.
SANITY_SIDE = 256

Group = Literal["sanity", "lungs", "view", "ood"]


@dataclass(frozen=True)
class Signal:
    """One signal: its score, the threshold it must reach (`at_least`) or not pass."""

    name: str
    group: Group
    score: float
    threshold: float
    at_least: bool  # True: passes when score >= threshold; False: when score <= threshold
    what: str  # the reason, when it fails: "lung fields not found"

    @property
    def passed(self) -> bool:
        if not math.isfinite(self.score):
            return False
        return self.score >= self.threshold if self.at_least else self.score <= self.threshold

    def reason(self) -> str:
        op = "<" if self.at_least else ">"
        return f"{self.what} ({self.name} {_fmt(self.score)} {op} {_fmt(self.threshold)})"


def _fmt(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


_PREFIX: dict[Group, str] = {
    "sanity": "not a usable image",
    "lungs": "not a frontal chest radiograph",
    "view": "not a frontal chest radiograph",
    "ood": "not like the training images",
}


@dataclass(frozen=True)
class GateVerdict:
    """Whether to analyse, and why not: each failed signal gives one reason."""

    analyse: bool
    signals: tuple[Signal, ...]
    reasons: tuple[str, ...] = field(default=())

    @classmethod
    def of(cls, signals: list[Signal]) -> GateVerdict:
        failed = [s for s in signals if not s.passed]
        reasons = tuple(f"{_PREFIX[s.group]}: {s.reason()}" for s in failed)
        return cls(analyse=not failed, signals=tuple(signals), reasons=reasons)

    def summary(self) -> str:
        """One line for an SR, a ledger row or a log: "analysed" or the reasons."""
        return "analysed" if self.analyse else "; ".join(self.reasons)

    def scores(self) -> dict[str, float]:
        return {s.name: s.score for s in self.signals}


# --------------------------------------------------------------------------- sanity


def _small_copy(image: np.ndarray) -> np.ndarray:
    """float32 copy of at most SANITY_SIDE per side (strided, then area-averaged: cheap on a
    3000 x 3000 radiograph)."""
    h, w = image.shape
    step = max(1, max(h, w) // (4 * SANITY_SIDE))
    small = image[::step, ::step]
    h, w = small.shape
    scale = SANITY_SIDE / max(h, w)
    if scale < 1.0:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        small = cv2.resize(small, size, interpolation=cv2.INTER_AREA)
    return small.astype(np.float32)


def high_frequency_share(small: np.ndarray) -> float:
    """Share of the variance left after a small Gaussian blur: ~0.8 for white noise, a few
    percent for a radiograph (smooth at this scale)."""
    total = float(small.var())
    if total <= 0.0:
        return 0.0
    blurred = cv2.GaussianBlur(small, (0, 0), sigmaX=1.0, borderType=cv2.BORDER_REFLECT)
    return float((small - blurred).var()) / total


def sanity_signals(
    image: np.ndarray, t: SanityThresholds, source_shape: tuple[int, int] | None = None
) -> list[Signal]:
    """The sanity signals of a display image (uint8, 2-D). Size and aspect are those of
    `source_shape` (rows, columns) when given: the received image's, for a display image
    decoded at a reduced size (`dicom_node.results.reduced_decode`)."""
    if image.ndim != 2 or image.dtype != np.uint8 or image.size == 0:
        raise ValueError(f"expected a 2-D uint8 display image, got {image.dtype} {image.shape}")
    h, w = source_shape or image.shape
    small = _small_copy(image)
    counts = np.bincount(np.rint(small).astype(np.uint8).ravel(), minlength=256)
    cdf = np.cumsum(counts) / counts.sum()
    lo = float(np.searchsorted(cdf, 0.005))
    hi = float(np.searchsorted(cdf, 0.995))
    return [
        Signal("min_side", "sanity", float(min(h, w)), t.min_side, True, "image too small"),
        Signal(
            "aspect", "sanity", max(h, w) / min(h, w), t.max_aspect, False, "image too elongated"
        ),
        Signal(
            "dynamic_range", "sanity", hi - lo, t.min_dynamic_range, True, "too little contrast"
        ),
        Signal("std", "sanity", float(small.std()), t.min_std, True, "(near-)constant image"),
        Signal(
            "high_frequency",
            "sanity",
            high_frequency_share(small),
            t.max_high_frequency,
            False,
            "image looks like noise",
        ),
    ]


# --------------------------------------------------------------------------- lungs


@dataclass(frozen=True)
class LungFields:
    """The two largest connected lung regions of a map, in fractions of its size."""

    areas: tuple[float, ...]  # of all components, largest first
    first: np.ndarray | None  # bool masks of the two largest
    second: np.ndarray | None


def lung_fields(lung: np.ndarray) -> LungFields:
    inside = (np.asarray(lung, dtype=np.float32) >= LUNG_THRESHOLD).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(inside, connectivity=8)
    order = sorted(range(1, n), key=lambda i: -int(stats[i, cv2.CC_STAT_AREA]))
    areas = tuple(float(stats[i, cv2.CC_STAT_AREA]) / inside.size for i in order)
    first = labels == order[0] if len(order) > 0 else None
    second = labels == order[1] if len(order) > 1 else None
    return LungFields(areas, first, second)


def _centroid_x(mask: np.ndarray) -> float:
    cols = np.flatnonzero(mask.any(axis=0))
    weights = mask.sum(axis=0)[cols]
    return float(np.average(cols + 0.5, weights=weights)) / int(mask.shape[1])


def _rows(mask: np.ndarray) -> tuple[int, int]:
    rows = np.flatnonzero(mask.any(axis=1))
    return int(rows[0]), int(rows[-1]) + 1


def _apex_ratio(mask: np.ndarray) -> float:
    """Mean width of a field in the lowest quarter of its rows / in the highest quarter."""
    r0, r1 = _rows(mask)
    widths = mask[r0:r1].sum(axis=1).astype(np.float64)
    quarter = max(1, len(widths) // 4)
    top = float(widths[:quarter].mean())
    bottom = float(widths[-quarter:].mean())
    return bottom / max(top, 1.0)


def lung_signals(lung: np.ndarray, t: LungThresholds) -> list[Signal]:
    """The lung signals of a U-Net probability map [H,W] (any size, the preprocessed image's
    frame). Without two fields only the first two signals exist: the rest measure a pair."""
    fields = lung_fields(lung)
    total = sum(fields.areas[:2])
    second = fields.areas[1] if len(fields.areas) > 1 else 0.0
    out = [
        Signal("lung_field", "lungs", second, t.min_field, True, "two lung fields not found"),
        Signal("lung_area", "lungs", total, t.min_total, True, "lung fields too small"),
    ]
    if fields.first is None or fields.second is None:
        return out
    a, b = fields.first, fields.second
    left, right = sorted((_centroid_x(a), _centroid_x(b)))
    sides = min(0.5 - left, right - 0.5)
    (a0, a1), (b0, b1) = _rows(a), _rows(b)
    overlap = max(0, min(a1, b1) - max(a0, b0)) / max(1, min(a1 - a0, b1 - b0))
    apex = min(_apex_ratio(a), _apex_ratio(b))
    out += [
        Signal("lung_area_max", "lungs", total, t.max_total, False, "lung fields too large"),
        Signal("lung_sides", "lungs", sides, t.min_sides, True, "no lung field on each side"),
        Signal(
            "lung_symmetry",
            "lungs",
            second / fields.areas[0],
            t.min_symmetry,
            True,
            "lung fields of unequal size",
        ),
        Signal(
            "lung_overlap",
            "lungs",
            overlap,
            t.min_vertical_overlap,
            True,
            "lung fields not side by side",
        ),
        Signal("lung_apex", "lungs", apex, t.min_apex, True, "lung apices not up"),
    ]
    return out


# --------------------------------------------------------------------------- OOD


def feature_input(preprocessed: np.ndarray, size: int) -> np.ndarray:
    """Preprocessed uint8 [N,S,S] -> the feature model's input float32 [N,1,size,size] in [0,1]
    (the 3 channels and ImageNet normalisation are inside the ONNX file)."""
    n, h, w = preprocessed.shape
    out = np.empty((n, 1, size, size), dtype=np.float32)
    interpolation = cv2.INTER_AREA if size < min(h, w) else cv2.INTER_LINEAR
    for i in range(n):
        out[i, 0] = cv2.resize(preprocessed[i], (size, size), interpolation=interpolation)
    out *= 1.0 / 255.0
    return out


def mahalanobis(features: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """sqrt((f - mean)' P (f - mean) / D) per row of [N,D]: about 1 inside the distribution."""
    # float32 and einsum, not BLAS: a multi-threaded BLAS matrix-vector product costs ~8 ms
    # on a busy 2-core machine (its threads wait on each other), this ~1 ms on any
    d = np.asarray(features, dtype=np.float32) - np.asarray(mean, dtype=np.float32)
    sq = np.einsum("nd,de,ne->n", d, np.asarray(precision, dtype=np.float32), d).astype(np.float64)
    distance: np.ndarray = np.sqrt(np.maximum(sq, 0.0) / features.shape[1])
    return distance


def transform_features(features: np.ndarray) -> np.ndarray:
    """The features as the statistics see them: square root of the pooled activations (closer
    to Gaussian than the raw, skewed, non-negative values; signed values keep their sign)."""
    f = np.asarray(features, dtype=np.float32)
    return np.sign(f) * np.sqrt(np.abs(f))


def ood_signal(score: float, threshold: float) -> Signal:
    return Signal("ood", "ood", score, threshold, False, "out-of-distribution score")


def probe(features: np.ndarray, weights: np.ndarray, bias: float) -> np.ndarray:
    """A linear probe's probability per row of [N,D] features."""
    f = np.asarray(features, dtype=np.float64)
    z = np.einsum("nd,d->n", f, np.asarray(weights, dtype=np.float64)) + float(bias)
    probability: np.ndarray = 1.0 / (1.0 + np.exp(-np.clip(z, -60.0, 60.0)))
    return probability


#: probe name -> (stats prefix, reason when it fails)
PROBES: dict[str, tuple[str, str]] = {
    "upright": ("upright", "film rotated or upside down"),
    "whole_film": ("whole", "not the whole chest (a crop)"),
    "frontal": ("frontal", "a lateral view"),
}


def view_signals(
    features: np.ndarray, stats: dict[str, np.ndarray], thresholds: dict[str, float | None]
) -> list[Signal]:
    """The probes' signals for one image's features [D] (those with a threshold)."""
    out = []
    for name, (prefix, what) in PROBES.items():
        threshold = thresholds.get(name)
        if threshold is None:
            continue
        p = probe(features[None], stats[f"{prefix}_w"], float(stats[f"{prefix}_b"]))[0]
        out.append(Signal(name, "view", float(p), threshold, True, what))
    return out


class Gate:
    """The bundle's gate, loaded once: the feature model as an ONNX Runtime session and its
    statistics. `check` is pure apart from running that session."""

    def __init__(
        self,
        spec: GateSpec,
        params: PreprocessParams,
        session: ort.InferenceSession,
        stats: dict[str, np.ndarray],
    ) -> None:
        self.spec = spec
        self.params = params
        self._session = session
        self.mean = stats["mean"].astype(np.float32)
        self.precision = stats["precision"].astype(np.float32)
        self.stats = stats
        self.probe_thresholds = {
            "upright": spec.ood.min_upright,
            "whole_film": spec.ood.min_whole,
            "frontal": spec.ood.min_frontal,
        }
        dim = spec.ood.dim
        if self.mean.shape != (dim,) or self.precision.shape != (dim, dim):
            raise BundleError(
                f"gate statistics {self.mean.shape}, {self.precision.shape} are not for {dim}-d"
                " features"
            )
        for name, (prefix, _) in PROBES.items():
            if self.probe_thresholds[name] is None:
                continue
            w, b = stats.get(f"{prefix}_w"), stats.get(f"{prefix}_b")
            if w is None or b is None or w.shape != (dim,) or b.shape != ():
                raise BundleError(f"gate statistics hold no {dim}-d {name} probe")

    @classmethod
    def from_bundle(cls, bundle: Bundle, intra_op_threads: int = 0) -> Gate | None:
        """The bundle's gate, or None when its manifest has no gate section."""
        spec = bundle.manifest.gate
        if spec is None:
            return None
        from worker.inference import session_options

        session = ort.InferenceSession(
            str(bundle.path(spec.ood.features)),
            sess_options=session_options(intra_op_threads),
            providers=["CPUExecutionProvider"],
        )
        names_in = [i.name for i in session.get_inputs()]
        names_out = [o.name for o in session.get_outputs()]
        if names_in != [FEATURE_INPUT] or names_out != [FEATURE_OUTPUT]:
            raise BundleError(
                f"{spec.ood.features.file}: expected {FEATURE_INPUT!r} -> {FEATURE_OUTPUT!r},"
                f" got {names_in} -> {names_out}"
            )
        with np.load(bundle.path(spec.ood.stats), allow_pickle=False) as npz:
            stats = {k: npz[k] for k in npz.files}
        if "mean" not in stats or "precision" not in stats:
            raise BundleError(f"{spec.ood.stats.file} holds no mean and precision")
        return cls(spec, bundle.manifest.preprocessing, session, stats)

    def features(self, preprocessed: np.ndarray) -> np.ndarray:
        """Preprocessed uint8 [N,S,S] -> transformed features [N,D]."""
        x = feature_input(preprocessed, self.spec.ood.input_size)
        (f,) = self._session.run([FEATURE_OUTPUT], {FEATURE_INPUT: x})
        return transform_features(np.asarray(f))

    def ood_scores(self, preprocessed: np.ndarray) -> np.ndarray:
        return mahalanobis(self.features(preprocessed), self.mean, self.precision)

    def model_signals(self, preprocessed: np.ndarray, lung: np.ndarray) -> list[Signal]:
        """The signals that need the models: the lung map's, the probes' and the OOD score,
        from the preprocessed image (uint8 [S,S]) and the U-Net's map of it. What a worker,
        which holds both and not the display image, can compute."""
        signals = lung_signals(lung, self.spec.lungs)
        features = self.features(preprocessed[None])
        signals += view_signals(features[0], self.stats, self.probe_thresholds)
        score = float(mahalanobis(features, self.mean, self.precision)[0])
        signals.append(ood_signal(score, self.spec.ood.threshold))
        return signals

    def check(
        self,
        image: np.ndarray,
        lung: np.ndarray,
        preprocessed: np.ndarray | None = None,
    ) -> GateVerdict:
        """The verdict on a display image (uint8 2-D, as decoded) and the U-Net's lung map of
        its preprocessed image. `preprocessed` (preprocess(image, bundle params)) may be
        passed when already at hand. The same as GateVerdict.of(sanity_signals(image, ...)
        + model_signals(preprocessed, lung)), for a caller that has the parts in two places."""
        if preprocessed is None:
            preprocessed = preprocess(image, self.params)
        signals = sanity_signals(image, self.spec.sanity)
        return GateVerdict.of(signals + self.model_signals(preprocessed, lung))
