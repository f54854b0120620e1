"""training/: metrics, bootstrap coverage, splits, augmentation, data, cache.

Fast unit tests; torch is not needed except where marked.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.conftest import POOL_DIR, REPO
from training import metrics as m
from training.analysis import fit_logistic, knn_vote, replace_region
from training.cache import build_cache, load_cache, raw_path
from training.config import AugmentConfig, ExperimentConfig, load_config
from training.data import LabelMap, Record, read_dataset, read_display_image, subsample
from training.splits import LeakageError, Split, check_no_leakage, make_plan, make_split
from worker.classes import CxrClass
from worker.preprocess import PreprocessParams, preprocess, preprocess_mask

CONFIGS = REPO / "training" / "configs"


# --------------------------------------------------------------------------- metrics


def _cases(count: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    cases: list[tuple[np.ndarray, np.ndarray]] = []
    while len(cases) < count:
        n = int(rng.integers(4, 80))
        y = rng.integers(0, 2, n)
        if y.min() == y.max():
            continue
        # Rounded scores: many ties, the hard case for curve and AUC definitions.
        score = np.round(rng.random(n) * 0.5 + 0.4 * y, int(rng.integers(1, 3)))
        cases.append((y, score))
    return cases


def test_auc_counts_a_tie_as_one_half() -> None:
    # 4 positive-negative pairs: three ordered right, one tied.
    y = np.array([0, 0, 1, 1])
    assert m.roc_auc(y, np.array([0.1, 0.5, 0.5, 0.9])) == pytest.approx(3.5 / 4)
    assert m.average_precision(y, np.array([0.1, 0.2, 0.8, 0.9])) == pytest.approx(1.0)


def test_threshold_metrics_match_scikit_learn() -> None:
    sk = pytest.importorskip("sklearn.metrics")
    for y, score in _cases(100, seed=1):
        got = m.binary_metrics(y, score, 0.5)
        pred = score >= 0.5
        assert got["accuracy"] == pytest.approx(sk.accuracy_score(y, pred))
        assert got["sensitivity"] == pytest.approx(sk.recall_score(y, pred))
        assert got["specificity"] == pytest.approx(sk.recall_score(1 - y, ~pred))
        assert m.confusion(y, pred) == tuple(sk.confusion_matrix(y, pred).ravel())


def test_undefined_metrics_are_nan_not_errors() -> None:
    y = np.ones(5, dtype=int)
    s = np.linspace(0, 1, 5)
    assert np.isnan(m.roc_auc(y, s))
    assert np.isnan(m.binary_metrics(y, s, 0.5)["specificity"])
    assert np.isnan(m.average_precision(np.zeros(5, dtype=int), s))
    with pytest.raises(ValueError, match="0 or 1"):
        m.roc_auc(np.array([0, 2]), np.array([0.1, 0.2]))


def test_youden_threshold_separates_separable_scores() -> None:
    y = np.array([0, 0, 0, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.9])
    t = m.youden_threshold(y, s)
    assert 0.3 < t <= 0.6
    assert m.binary_metrics(y, s, t)["accuracy"] == 1.0
    # Tied (uninformative) scores: no threshold is better; the fallback, not 1.0 or +inf.
    assert m.youden_threshold(y, np.full(6, 0.3), fallback=0.5) == 0.5


def test_bootstrap_ci_covers_a_known_accuracy_about_95_percent_of_the_time() -> None:
    # Known case: each image is correct with probability 0.8; n = 150 images per study.
    rng = np.random.default_rng(0)
    true_accuracy, n, studies, hits = 0.8, 150, 300, 0
    for _ in range(studies):
        correct = rng.random(n) < true_accuracy
        values = np.array([correct[idx].mean() for idx in m.bootstrap_indices(n, None, 200, rng)])
        low, high = m.percentile_ci(values)
        hits += low <= true_accuracy <= high
    assert 0.90 <= hits / studies <= 0.99


def test_bootstrap_ci_covers_a_known_auc() -> None:
    # Binormal scores: negatives N(0,1), positives N(d,1), so AUC = Phi(d / sqrt(2)).
    from math import erf, sqrt

    d = 1.0
    true_auc = 0.5 * (1 + erf(d / sqrt(2) / sqrt(2)))
    rng = np.random.default_rng(1)
    studies, hits = 200, 0
    for _ in range(studies):
        y = np.r_[np.zeros(80, int), np.ones(80, int)]
        s = rng.standard_normal(160) + d * y
        est = m.estimates([m.SplitScores(y, s, np.arange(160).astype(str), 0.5)], 150, 7)
        hits += est["roc_auc"].low <= true_auc <= est["roc_auc"].high
    assert 0.88 <= hits / studies <= 0.99


def test_group_bootstrap_is_wider_than_row_bootstrap_on_clustered_data() -> None:
    # 30 patients x 10 identical images: resampling rows pretends there are 300 observations.
    rng = np.random.default_rng(2)
    per_patient = rng.random(30) < 0.7
    correct = np.repeat(per_patient, 10)
    groups = np.repeat(np.arange(30), 10).astype(str)

    def width(g: np.ndarray | None) -> float:
        idx = m.bootstrap_indices(len(correct), g, 400, np.random.default_rng(3))
        low, high = m.percentile_ci(np.array([correct[i].mean() for i in idx]))
        return high - low

    assert width(groups) > 2 * width(None)


def test_estimates_pool_splits() -> None:
    rng = np.random.default_rng(4)
    parts = []
    for _ in range(3):
        y = rng.integers(0, 2, 60)
        parts.append(m.SplitScores(y, rng.random(60) + 0.5 * y, np.arange(60).astype(str), 0.7))
    est = m.estimates(parts, 50, 0)
    assert est["roc_auc"].splits == 3
    expected = np.mean([m.roc_auc(p.y, p.score) for p in parts])
    assert est["roc_auc"].value == pytest.approx(expected)
    assert est["roc_auc"].low < est["roc_auc"].value < est["roc_auc"].high


@pytest.mark.train
def test_spearman_of_days_ranks_ties_by_their_average(tmp_path: Path) -> None:
    # Days are integers with many ties; scores tie too. Known case: rank correlation 0.0,
    # and the same rows under other ids (another order) give the same value.
    pytest.importorskip("torch")
    from training.scored import ScoredSet
    from training.sections import section_days

    days = [1, 1, 2, 2, 3, 3, 4, 4]
    score = [0.2, 0.8, 0.8, 0.2, 0.2, 0.8, 0.8, 0.2]
    values = []
    for order in ([0, 1, 2, 3, 4, 5, 6, 7], [7, 2, 5, 0, 3, 6, 1, 4], [1, 0, 3, 2, 5, 4, 7, 6]):
        records = [
            Record(
                id=f"img-{order[i]}",
                image=f"/x/{i}.png",
                patient_group=f"p{i}",
                label=CxrClass.COVID19,
                label_text="covid",
                days_offset=days[i],
            )
            for i in range(len(days))
        ]
        scored = ScoredSet(0, records, np.array(score), {}, np.zeros((len(days), 2)))
        values.append(section_days([scored], tmp_path, with_plots=False)["spearman_covid"])
    assert values == [pytest.approx(0.0, abs=1e-12)] * 3


# --------------------------------------------------------------------------- analysis


def test_knn_vote_on_a_hand_made_example() -> None:
    reference = np.array([[1, 0], [0.9, 0.1], [0.8, 0.2], [0, 1], [0.1, 0.9], [0.2, 0.8]])
    ref_labels = np.array([1, 1, 1, 0, 0, 0])
    query = np.array([[1.0, 0.05], [0.05, 1.0]])
    result = knn_vote(query, np.array([1, 0]), reference, ref_labels, k=3)
    np.testing.assert_array_equal(result.predicted, [1, 0])
    np.testing.assert_allclose(result.vote, [1.0, 0.0])
    assert result.neighbour_same.all()
    assert result.within < result.across


def test_logistic_probe_learns_a_separable_problem() -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((200, 5))
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(int)
    model = fit_logistic(x[:150], y[:150])
    assert m.roc_auc(y[150:], model.predict_proba(x[150:])[:, 1]) > 0.95


def test_replace_region_uses_each_images_mean_gray() -> None:
    images = np.stack([np.full((4, 4), 10, np.uint8), np.full((4, 4), 200, np.uint8)])
    images[0, 0, 0] = 250
    region = np.zeros((2, 4, 4), dtype=bool)
    region[:, 2:] = True
    out = replace_region(images, region)
    assert (out[0, 2:] == round(images[0].mean())).all()
    assert (out[1, 2:] == 200).all()
    np.testing.assert_array_equal(out[:, :2], images[:, :2])


# --------------------------------------------------------------------------- splits


def _records(seed: int = 0) -> list[Record]:
    rng = np.random.default_rng(seed)
    out = []
    for g in range(120):
        source = ["a", "b", "c"][g % 3]
        label = CxrClass.COVID19 if (g % 3 == 0 and g % 2 == 0) else CxrClass.NEGATIVE
        for i in range(int(rng.integers(1, 6))):  # follow-up series: several images each
            out.append(
                Record(
                    id=f"img-{g}-{i}",
                    image=f"/x/{g}-{i}.png",
                    patient_group=f"patient-{g}",
                    label=label,
                    label_text=label.label,
                    source=source,
                )
            )
    return out


def test_splits_never_put_one_patient_in_two_sets() -> None:
    records = _records()
    plan = make_plan(records, val=0.15, test=0.2, k=5, seed=0)
    group = {r.id: r.patient_group for r in records}
    for split in plan.splits:
        check_no_leakage(split, records)
        sets = [{group[i] for i in split.ids(w)} for w in ("train", "val", "test")]
        assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
        assert sorted(split.train + split.val + split.test) == sorted(group)


def test_splits_are_stratified_seeded_and_differ_between_seeds() -> None:
    records = _records()
    a, b = make_split(records, 0.15, 0.2, seed=3), make_split(records, 0.15, 0.2, seed=3)
    assert a == b
    assert make_split(records, 0.15, 0.2, seed=4) != a
    label = {r.id: r.label for r in records}
    for which, share in (("test", 0.2), ("val", 0.15)):
        ids = a.ids(which)
        assert abs(len(ids) / len(records) - share) < 0.06
        positives = sum(label[i] == CxrClass.COVID19 for i in ids) / len(ids)
        overall = sum(r.label == CxrClass.COVID19 for r in records) / len(records)
        assert abs(positives - overall) < 0.1


def test_leakage_check_catches_a_patient_in_two_sets() -> None:
    records = _records()
    split = make_split(records, 0.15, 0.2, seed=0)
    by_group: dict[str, list[str]] = {}
    for r in records:
        by_group.setdefault(r.patient_group, []).append(r.id)
    moved = next(ids[0] for ids in by_group.values() if len(ids) > 1 and ids[0] in split.train)
    leaky = Split(
        train=[i for i in split.train if i != moved], val=split.val, test=[*split.test, moved]
    )
    with pytest.raises(LeakageError, match="patient groups in two sets"):
        check_no_leakage(leaky, records)
    with pytest.raises(LeakageError, match="both"):
        check_no_leakage(
            Split(train=split.train, val=split.val, test=[*split.test, moved]), records
        )


@pytest.mark.pool
def test_pool_splits_do_not_leak_patient_groups() -> None:
    csv_path = POOL_DIR / "metadata.csv"
    if not csv_path.is_file():
        pytest.skip(f"public pool not found at {POOL_DIR} (set CXR_POOL_DIR)")
    records, summary = read_dataset(csv_path)
    assert summary.dropped["label 'unknown'"] > 0
    assert all(r.view.lower() != "l" for r in records)
    plan = make_plan(records, 0.15, 0.15, k=3, seed=0)
    for split in plan.splits:
        check_no_leakage(split, records)
        test_sources = {r.source for r in records if r.id in set(split.test)}
        assert {"ieee8023", "nih_cxr14"} <= test_sources


def test_subsample_keeps_whole_groups_and_every_stratum() -> None:
    records = _records()
    small = subsample(records, 40, seed=0)
    assert 30 <= len(small) <= 50
    kept_groups = {r.patient_group for r in small}
    assert sum(r.patient_group in kept_groups for r in records) == len(small)
    assert {(r.source, r.label) for r in small} == {(r.source, r.label) for r in records}


# --------------------------------------------------------------------------- data + cache


def _write_dataset(folder: Path) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for i, (label, view) in enumerate(
        [
            ("covid", "PA"),
            ("negative", "AP"),
            ("other_pneumonia", "PA"),
            ("unknown", "PA"),
            ("covid", "L"),
            ("COVID-19", "AP Supine"),
        ]
    ):
        image = np.zeros((120, 100), dtype=np.uint8)
        image[10:110, 5:95] = rng.integers(60, 220, (100, 90), dtype=np.uint8)
        cv2.imwrite(str(folder / f"img{i}.png"), image)
        mask = np.zeros_like(image)
        mask[30:90, 20:80] = 255
        mask[40:45, 40:45] = 127
        cv2.imwrite(str(folder / f"mask{i}.png"), mask)
        rows.append(
            {
                "image": f"img{i}.png",
                "patient_group": f"p{i // 2}",
                "label": label,
                "view": view,
                "sex": "f",
                "age": "?" if i == 0 else "51",
                "days_offset": "" if i else "3",
                "lung_mask": f"mask{i}.png",
                "source": "test",
            }
        )
    path = folder / "data.csv"
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_read_dataset_maps_labels_and_drops_unknown_and_lateral(tmp_path: Path) -> None:
    records, summary = read_dataset(_write_dataset(tmp_path))
    assert [r.label for r in records] == [
        CxrClass.COVID19,
        CxrClass.NEGATIVE,
        CxrClass.NEGATIVE,
        CxrClass.COVID19,
    ]
    assert summary.dropped == {"label 'unknown'": 1, "lateral view": 1}
    assert records[0].age is None and records[1].age == 51.0
    assert records[0].days_offset == 3.0 and records[1].days_offset is None
    assert records[0].sex == "F"
    assert Path(records[0].image).is_absolute()
    strict = LabelMap(positive=["covid"], negative=["negative"])
    assert len(read_dataset(tmp_path / "data.csv", strict)[0]) == 2


def test_read_dataset_refuses_a_csv_without_the_required_columns(tmp_path: Path) -> None:
    (tmp_path / "bad.csv").write_text("path,label\nx.png,covid\n")
    with pytest.raises(ValueError, match="needs columns"):
        read_dataset(tmp_path / "bad.csv")


def test_cache_round_trip_matches_the_shared_preprocessing(tmp_path: Path) -> None:
    records, _ = read_dataset(_write_dataset(tmp_path))
    params = PreprocessParams(size=64)
    path, skipped = build_cache(records, params, tmp_path / "c.npz", encoding="png", workers=1)
    assert not skipped
    assert raw_path(path).is_file()
    cache = load_cache(path)
    assert cache.ids == [r.id for r in records]
    for i, r in enumerate(records):
        display = read_display_image(r.image)
        np.testing.assert_array_equal(cache.images[i], preprocess(display, params))
        mask = cv2.imread(str(r.lung_mask), cv2.IMREAD_GRAYSCALE)
        assert mask is not None
        np.testing.assert_array_equal(cache.masks[i], preprocess_mask(mask, display, params))
    assert cache.raw is not None and cache.raw.shape == cache.images.shape
    lossy = load_cache(build_cache(records, params, tmp_path / "j.npz", quality=90, workers=1)[0])
    assert np.abs(lossy.images.astype(int) - cache.images.astype(int)).mean() < 6


@pytest.mark.pool
def test_dicom_inputs_are_decoded_by_the_node(pool_dicom_files: list[Path]) -> None:
    image = read_display_image(pool_dicom_files[0])
    assert image.dtype == np.uint8 and image.ndim == 2 and image.std() > 5


# --------------------------------------------------------------------------- augmentation


@pytest.mark.parametrize("kind", ["labels", "probability"])
def test_augmentation_keeps_size_dtype_and_value_range(kind: str) -> None:
    pytest.importorskip("albumentations")
    from training.augment import Augmenter

    everything = AugmentConfig(
        brightness=1,
        gamma=1,
        clahe=1,
        rotate=1,
        shear=1,
        scale=1,
        hflip=1,
        sharpen_or_blur=1,
        jpeg=1,
        rescale=1,
        borders=1,
        text=1,
    )
    rng = np.random.default_rng(0)
    for cfg in (AugmentConfig(), everything):
        aug = Augmenter(cfg, kind, seed=1)  # type: ignore[arg-type]
        for size in (64, 96):
            image = rng.integers(0, 256, (size, size), dtype=np.uint8)
            if kind == "labels":
                mask = np.zeros((size, size), np.uint8)
                mask[10:50, 10:40] = 255
                mask[20:25, 20:25] = 127
            else:
                mask = rng.random((size, size)).astype(np.float32)
            for _ in range(10):
                out, out_mask = aug(image, mask)
                assert out.shape == image.shape and out.dtype == np.uint8
                assert out_mask is not None and out_mask.shape == mask.shape
                if kind == "labels":
                    assert set(np.unique(out_mask).tolist()) <= {0, 127, 255}
                else:
                    assert out_mask.dtype == np.float32
                    assert out_mask.min() >= 0.0 and out_mask.max() <= 1.0


def test_augmentation_is_reproducible_with_a_seed() -> None:
    pytest.importorskip("albumentations")
    from training.augment import Augmenter

    aug = Augmenter(AugmentConfig(text=0.5, borders=0.5), "labels", seed=0)
    image = np.random.default_rng(1).integers(0, 256, (64, 64), dtype=np.uint8)
    aug.reseed(5)
    first = [aug(image)[0] for _ in range(5)]
    aug.reseed(5)
    again = [aug(image)[0] for _ in range(5)]
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(first[0], x) for x in first[1:])


def test_augmentations_fire_independently() -> None:
    # albumentations seeds every transform alike, which would make brighten (p 0.4) and rotate
    # (p 0.4) fire always together; each transform must draw from its own stream.
    pytest.importorskip("albumentations")
    from training.augment import Augmenter, _walk

    aug = Augmenter(AugmentConfig(), "labels", seed=3)
    transforms = _walk(aug._compose)
    fired = np.array(
        [[t.py_random.random() < 0.4 for t in transforms] for _ in range(2000)], dtype=float
    )
    assert np.allclose(fired.mean(axis=0), 0.4, atol=0.05)
    corr = np.corrcoef(fired.T)
    assert np.abs(corr[~np.eye(len(transforms), dtype=bool)]).max() < 0.1


# --------------------------------------------------------------------------- config, imports


def test_config_overrides_from_the_command_line() -> None:
    cfg, _ = load_config(
        CONFIGS / "smoke.toml",
        [
            "splits.k=3",
            "classifier.selection=val_same_source_auc",
            "augment.text=0.5",
            "classifier.head=[64, 64, 32]",
            "name=other",
        ],
    )
    assert cfg.splits.k == 3
    assert cfg.classifier.selection == "val_same_source_auc"
    assert cfg.augment.text == 0.5
    assert cfg.classifier.head == (64, 64, 32)
    assert cfg.name == "other"
    with pytest.raises(ValueError):
        load_config(CONFIGS / "smoke.toml", ["splits.k=0"])
    with pytest.raises(ValueError, match="key=value"):
        load_config(None, ["splits.k"])


def test_models_refuse_evaluation_on_another_split() -> None:
    from training.splits import check_trained_on, split_sha

    records = _records()
    a, b = make_split(records, 0.15, 0.2, seed=0), make_split(records, 0.15, 0.2, seed=1)
    check_trained_on({"split_sha": split_sha(a)}, a, "member")
    with pytest.raises(LeakageError, match="another split"):
        check_trained_on({"split_sha": split_sha(a)}, b, "member")


def test_shipped_configs_load() -> None:
    smoke, _ = load_config(CONFIGS / "smoke.toml")
    default, _ = load_config(CONFIGS / "default.toml")
    assert smoke.preprocessing.size <= 96 and smoke.classifier.epochs == 1
    assert not (smoke.augment.jpeg or smoke.augment.text)
    assert default.preprocessing.size == 384 and default.augment.text > 0
    assert default.classifier.head == (1024, 512, 256)
    with pytest.raises(ValueError, match="not a member"):
        ExperimentConfig.model_validate({"export": {"embedding_member": "nope"}})


@pytest.mark.train
def test_default_config_bundle_fits_the_size_limit() -> None:
    pytest.importorskip("torch")
    from training.export_run import estimate_bundle_mb
    from training.models import UNet, build_classifier, count_parameters

    cfg, _ = load_config(CONFIGS / "default.toml")
    params = count_parameters(UNet(cfg.segmentation.base_width, cfg.segmentation.depth))
    params += sum(
        count_parameters(build_classifier(mm.architecture, cfg.classifier.head))
        for mm in cfg.members
    )
    assert estimate_bundle_mb(params, 1100, cfg.classifier.head[-1]) < cfg.export.max_bundle_mb - 3


_BLOCKER = """
import sys
# None in sys.modules: `import x` raises ImportError and find_spec says absent, as on a host
# where the package is not installed.
for name in ("albumentations", "hnswlib", "celery", "pydantic_settings", "dicom_node",
             "onnxruntime", "onnx", "matplotlib"):
    sys.modules[name] = None
"""


@pytest.mark.train
def test_training_imports_without_albumentations_hnswlib_celery_or_the_node() -> None:
    # The training path (cache, splits, U-Net, members, evaluation) needs torch, pydantic and
    # scikit-learn (training/gpu/README.md lists what the GPU host has), none of these; only
    # `export` needs onnx and hnswlib.
    pytest.importorskip("torch")
    code = (
        _BLOCKER
        + """
import training.cli, training.pipeline, training.classify, training.segment, training.evaluate
import training.datasets
from training.pipeline import missing_export_modules
assert missing_export_modules() == ["onnx", "onnxruntime", "hnswlib"], missing_export_modules()
from training.augment import AugmentUnavailable, make_augmenter
from training.config import AugmentConfig
assert make_augmenter(AugmentConfig(enabled=False), "labels", 0) is None
try:
    make_augmenter(AugmentConfig(), "labels", 0)
except AugmentUnavailable as exc:
    assert "enabled = false" in str(exc)
else:
    raise SystemExit("albumentations was not blocked")
print("ok")
"""
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def _synthetic_dataset(folder: Path, n: int = 40) -> Path:
    from training.synthetic import synthetic_display_image

    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        label = CxrClass.COVID19 if i % 2 else CxrClass.NEGATIVE
        image = synthetic_display_image(rng, label)
        cv2.imwrite(str(folder / f"s{i}.png"), image)
        mask = np.where((image > 40) & (image < 120), 255, 0).astype(np.uint8)
        cv2.imwrite(str(folder / f"m{i}.png"), mask)
        rows.append(
            {
                "image": f"s{i}.png",
                "patient_group": f"g{i // 2}",
                "label": label.label,
                "source": "a" if i % 4 < 3 else "b",
                "lung_mask": f"m{i}.png",
                "sex": "MF"[i % 2],
                "age": str(30 + i),
                "days_offset": str(i % 9),
            }
        )
    path = folder / "synthetic.csv"
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.mark.train
def test_training_runs_without_albumentations_onnx_matplotlib_or_the_node(tmp_path: Path) -> None:
    """cache -> U-Net -> members -> evaluation without albumentations, onnx, onnxruntime,
    hnswlib, matplotlib or the node; the export is skipped with a reason."""
    pytest.importorskip("torch")
    data = _synthetic_dataset(tmp_path)
    args = [
        "all",
        "--config",
        str(CONFIGS / "smoke.toml"),
        "--workdir",
        str(tmp_path / "run"),
        "--data",
        str(data),
        "--device",
        "cpu",
        "--set",
        "augment.enabled=false",
        "--set",
        "splits.k=1",
        "--set",
        "ablation.no_preprocessing=false",
    ]
    code = (
        _BLOCKER
        + f"""
from training.cli import app
app(args={args!r}, standalone_mode=False)
"""
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no bundle" in done.stderr and "hnswlib" in done.stderr
    report = (tmp_path / "run" / "report" / "report.md").read_text()
    assert "t-SNE of" in report
    assert "figures skipped" in report  # no matplotlib
    assert "## Shortcut audit" in report
    assert not (tmp_path / "run" / "bundle").exists()


@pytest.mark.train
def test_members_start_from_a_checkpoint_given_by_path(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    import torchvision

    from training.classify import MemberRun, build_member
    from training.models import Classifier

    def run(checkpoint: Path, architecture: str = "shufflenet_v2_x0_5") -> MemberRun:
        return MemberRun(
            name="m",
            architecture=architecture,
            input_size=64,
            head=(32, 32, 16),
            epochs=1,
            batch_size=2,
            lr=1e-3,
            lr_decay=1.0,
            weight_decay=0.0,
            balanced_sampling=True,
            selection="val_auc",
            amp=False,
            channels_last=False,
            num_workers=0,
            seed=0,
            checkpoint=str(checkpoint),
        )

    # torchvision layout (e.g. weights copied in by hand): the backbone is loaded, head fresh.
    torch.manual_seed(0)
    tv = torchvision.models.get_model("shufflenet_v2_x0_5", weights=None)
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    model = build_member(run(tmp_path / "tv.pth"))
    first_conv = model.features.get_submodule("0.0")  # torchvision's conv1.0
    torch.testing.assert_close(first_conv.weight, tv.state_dict()["conv1.0.weight"])

    # A cxr-train checkpoint: everything, head included.
    ours = Classifier("shufflenet_v2_x0_5", (32, 32, 16))
    torch.save(
        {"model": ours.state_dict(), "architecture": "shufflenet_v2_x0_5", "head": [32, 32, 16]},
        tmp_path / "ours.pt",
    )
    loaded = build_member(run(tmp_path / "ours.pt"))
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)

    with pytest.raises(ValueError, match="does not fit"):
        build_member(run(tmp_path / "tv.pth", architecture="mobilenet_v3_small"))
    with pytest.raises(ValueError, match="holds a"):
        build_member(run(tmp_path / "ours.pt", architecture="mobilenet_v3_small"))


def test_sampling_weights_balance_classes_and_the_same_source_contrast() -> None:
    from training.datasets import sampling_weights

    labels = np.array([1, 1, 1, 0, 0, 0, 0, 0])
    sources = np.array(["a", "a", "a", "a", "b", "b", "b", "b"])
    plain = sampling_weights(labels)
    assert plain[labels == 1].sum() == pytest.approx(0.5 * plain.sum())
    w = sampling_weights(labels, sources, same_source_share=0.7)
    assert w[labels == 1].sum() == pytest.approx(w[labels == 0].sum())  # classes equal
    negatives = w[labels == 0].sum()
    assert w[(labels == 0) & (sources == "a")].sum() == pytest.approx(0.7 * negatives)
    # a source with one class only takes the whole class: positives are all from "a"
    assert w[(labels == 1) & (sources == "a")].sum() == pytest.approx(w[labels == 1].sum())
