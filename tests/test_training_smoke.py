"""The proof of training/: `cxr-train all` on a small subset of the public pool, on CPU.

One smoke run (module fixture, about a minute on 2 cores) produces a bundle that the worker's
own loader accepts and serves, and a report with every section. Numbers are meaningless at
this scale; the tests check that everything is there and consistent.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed: install the `train` extra")
pytest.importorskip("albumentations", reason="albumentations is not installed (`train` extra)")
pytest.importorskip("matplotlib", reason="matplotlib is not installed (`train` extra)")

from typer.testing import CliRunner  # noqa: E402

from tests.conftest import POOL_DIR, REPO  # noqa: E402
from training.bundle_writer import ReferenceItem  # noqa: E402
from training.cache import load_cache  # noqa: E402
from training.classify import load_member, member_run, train_member  # noqa: E402
from training.cli import app  # noqa: E402
from training.config import load_config  # noqa: E402
from training.layout import RunPaths  # noqa: E402
from training.report import SECTIONS  # noqa: E402
from training.segment import read_lungmaps  # noqa: E402
from training.splits import SplitPlan, check_no_leakage  # noqa: E402
from training.torchutil import read_json, seed_everything  # noqa: E402
from worker.bundle import load_bundle, sha256_file  # noqa: E402
from worker.inference import Ensemble  # noqa: E402

pytestmark = [pytest.mark.train, pytest.mark.pool, pytest.mark.slow]

SMOKE = REPO / "training" / "configs" / "smoke.toml"
POOL_CSV = POOL_DIR / "metadata.csv"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> RunPaths:
    if not POOL_CSV.is_file():
        pytest.skip(f"public pool not found at {POOL_DIR} (set CXR_POOL_DIR)")
    workdir = tmp_path_factory.mktemp("smoke") / "run"
    start = time.perf_counter()
    result = CliRunner().invoke(
        app,
        [
            "all",
            "--config",
            str(SMOKE),
            "--workdir",
            str(workdir),
            "--data",
            str(POOL_CSV),
            "--device",
            "cpu",
        ],
    )
    elapsed = time.perf_counter() - start
    assert result.exit_code == 0, result.output + repr(result.exception)
    print(f"smoke run: {elapsed:.0f} s")
    (workdir / "elapsed.txt").write_text(f"{elapsed:.1f}\n")
    return RunPaths(workdir)


def test_smoke_bundle_loads_and_serves_in_the_worker(run: RunPaths) -> None:
    bundle = load_bundle(run.bundle)  # the node's own validation: schema, class map, checksums
    manifest = bundle.manifest
    assert not manifest.random_weights
    assert manifest.name == "cxr-smoke"
    experiment = manifest.config["experiment"]  # the run's config, as JSON
    assert isinstance(experiment, dict)
    assert experiment["members"][0]["architecture"] == "mobilenet_v3_small"
    assert experiment["seed"] == 0
    assert {m.name for m in manifest.members} == {"mobilenet", "shufflenet"}
    assert {m.lung_crop for m in manifest.members} == {0.1}
    assert manifest.preprocessing.size == 64
    cache = load_cache(run.cache)
    plan = SplitPlan.load(run.splits)
    assert manifest.index.count == len(plan.splits[0].train)
    test_rows = cache.rows(plan.splits[0].test)
    predictions = Ensemble(bundle).predict(cache.images[test_rows])
    assert len(predictions) == len(test_rows)
    for p in predictions:
        assert 0.0 <= p.probability <= 1.0
        assert p.embedding.shape == (256,)
        assert p.lung_probability.shape == (64, 64)
    # The node's drift check has the validation set's scores to compare with.
    reference = manifest.reference_scores
    assert reference is not None and len(reference.scores) == len(plan.splits[0].val)
    assert reference.scores == sorted(reference.scores)
    # The served scores are the PyTorch scores the report was computed from.
    export = read_json(run.report / "export.json")
    assert export["onnx_vs_torch_max_score_diff"] < 1e-4
    assert all(v < 1e-4 for v in export["parity"].values())
    assert export["total_mb"] < 60


def test_reference_index_holds_ids_labels_and_sources_only(run: RunPaths) -> None:
    cache = load_cache(run.cache)
    patients = {r.patient_group for r in cache.records}
    lines = (run.bundle / "index.jsonl").read_text().splitlines()
    for line in lines:
        item = ReferenceItem.model_validate(json.loads(line))  # extra fields are refused
        assert item.id not in patients
    train = set(SplitPlan.load(run.splits).splits[0].train)
    assert {json.loads(line)["id"] for line in lines} == train


def test_smoke_report_has_every_section(run: RunPaths) -> None:
    text = (run.report / "report.md").read_text()
    for heading in SECTIONS:
        assert f"## {heading}" in text, heading
    for phrase in (
        "accuracy",
        "sensitivity",
        "specificity",
        "ROC AUC",
        "PR AUC",
        "Same-source ROC AUC",
        "vote accuracy",
        "within class",
        "lungs masked out",
        "embeddings -> source",
        "age band",
        "sex",
        "Dice",
        "IoU",
        "lung channel zeros",
        "no preprocessing",
        "fp16",
    ):
        assert phrase in text, phrase
    for figure in (
        "roc",
        "pr",
        "confusion",
        "score_histogram",
        "tsne_label",
        "tsne_source",
        "score_vs_days",
        "ablation",
    ):
        assert (run.report / f"{figure}.png").stat().st_size > 1000
        assert f"({figure}.png)" in text
    report = read_json(run.report / "report.json")
    for metric in ("accuracy", "sensitivity", "specificity", "roc_auc", "pr_auc"):
        est = report["headline"]["estimates"][metric]
        assert est["splits"] == 2 and est["samples"] == 100
    assert report["same_source"]["sources"] == ["ieee8023"]
    assert report["retrieval"]["k"] == 4
    assert set(report["ablation"]["variants"]) == {"no-seg", "no-prep"}
    assert all("auc" in v for v in report["ablation"]["variants"].values())
    assert report["segmentation"]["test_masks"] > 0
    cases = report["cases"]
    threshold = cases["threshold"]
    assert all(c["score"] >= threshold for c in cases["confident_positive"])
    assert all(c["score"] < threshold for c in cases["confident_negative"])
    positives = [c["score"] for c in cases["confident_positive"]]
    assert positives == sorted(positives, reverse=True)
    assert all(c["score"] >= threshold for c in cases["false_positive"])


def test_model_card_says_what_the_model_is_and_is_not(run: RunPaths) -> None:
    card = (run.bundle / "model_card.md").read_text()
    for phrase in (
        "not for diagnostic use",
        "No pretrained weights: trained from scratch",
        "CC BY",
        "Same-source contrast",
        "Per source",
        "Shortcut audit",
        "lungs masked out",
        "Known limits",
        "fp16 variant",
    ):
        assert phrase in card, phrase


def test_fp16_variant_is_a_loadable_half_size_bundle(run: RunPaths) -> None:
    variant = read_json(run.report / "export.json")["variants"]["fp16"]
    bundle = load_bundle(Path(variant["path"]))
    assert bundle.manifest.device_uid != load_bundle(run.bundle).manifest.device_uid
    assert variant["total_mb"] < 0.6 * read_json(run.report / "export.json")["total_mb"]
    assert variant["max_score_change"] < 1e-3
    assert isinstance(variant["auc_change"], float)
    assert 0 <= variant["calls_changed"] <= read_json(run.report / "export.json")["test_images"]
    assert "same-source ROC AUC" in (Path(variant["path"]) / "model_card.md").read_text()


def test_smoke_run_splits_do_not_leak(run: RunPaths) -> None:
    cache = load_cache(run.cache)
    plan = SplitPlan.load(run.splits)
    assert len(plan.splits) == 2
    for split in plan.splits:
        check_no_leakage(split, cache.records)


def test_smoke_run_is_fast_enough(run: RunPaths) -> None:
    elapsed = float((run.root / "elapsed.txt").read_text())
    limit = float(os.environ.get("CXR_SMOKE_LIMIT_S", "120"))
    assert elapsed < limit, f"smoke run took {elapsed:.0f} s (limit {limit:.0f} s)"


def test_resume_reuses_finished_stages(run: RunPaths) -> None:
    best = run.member(0, "shufflenet") / "best.pt"
    before = best.stat().st_mtime_ns
    for args in (["segmentation"], ["classifier", "--member", "shufflenet"]):
        result = CliRunner().invoke(
            app,
            [
                *args,
                "--config",
                str(SMOKE),
                "--workdir",
                str(run.root),
                "--resume",
                "--device",
                "cpu",
            ],
        )
        assert result.exit_code == 0, result.output + repr(result.exception)
    assert best.stat().st_mtime_ns == before


def test_interrupted_training_resumes_where_it_stopped(
    run: RunPaths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after epoch 1 of 2, resumed: the same weights as an uninterrupted run."""
    import training.classify as classify

    cfg, _ = load_config(SMOKE)
    cfg.classifier.epochs = 2
    cfg.augment.enabled = True
    cache = load_cache(run.cache)
    split = SplitPlan.load(run.splits).splits[0]
    lungs = read_lungmaps(run.lungmaps, cache.ids, sha256_file(run.segmentation / "best.pt"))
    assert lungs is not None
    device = torch.device("cpu")
    spec = member_run(cfg, "shufflenet", 0)

    train_member(spec, cfg, cache, lungs, split, tmp_path / "straight", device)

    calls = {"n": 0}
    real = classify.training_sampler

    def dies_on_second_epoch(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated crash")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(classify, "training_sampler", dies_on_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_member(spec, cfg, cache, lungs, split, tmp_path / "resumed", device)
    assert not (tmp_path / "resumed" / "result.json").exists()
    monkeypatch.setattr(classify, "training_sampler", real)
    result = train_member(spec, cfg, cache, lungs, split, tmp_path / "resumed", device, resume=True)
    assert [h["epoch"] for h in result["history"]] == [0, 1]
    assert cfg.classifier.source_adversary > 0  # smoke.toml: the adversary trains and resumes
    assert all(0 <= h["train_source_accuracy"] <= 1 for h in result["history"])

    a = load_member(tmp_path / "straight", "last.pt").state_dict()
    b = load_member(tmp_path / "resumed", "last.pt").state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_evaluate_on_an_external_csv(run: RunPaths, tmp_path: Path) -> None:
    import csv

    with POOL_CSV.open() as fh:
        rows = list(csv.DictReader(fh))
    picked = [r for r in rows if r["source"] == "ieee8023" and r["label"] != "unknown"][:6]
    picked += [r for r in rows if r["source"] == "nih_cxr14"][:4]
    external = tmp_path / "external.csv"
    with external.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        for r in picked:
            writer.writerow(
                {
                    **r,
                    "image": str(POOL_DIR / r["image"]),
                    "lung_mask": str(POOL_DIR / r["lung_mask"]) if r["lung_mask"] else "",
                    "lung_mask_weak": "",
                }
            )
    out = tmp_path / "report"
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            "--config",
            str(SMOKE),
            "--workdir",
            str(run.root),
            "--data",
            str(external),
            "--out",
            str(out),
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    report = read_json(out / "report.json")
    assert report["kind"] == "external"
    assert report["data"]["images"] == 10
    assert report["headline"]["estimates"]["roc_auc"]["splits"] == 1
    text = (out / "report.md").read_text()
    assert "## Headline metrics" in text and "## Lung segmentation" in text
    assert np.isfinite(report["shortcut_audit"]["lung_masking"]["lung_fraction"])


def test_int8_variant_is_static_and_loadable(run: RunPaths) -> None:
    variant = read_json(run.report / "export.json")["variants"]["int8"]
    assert "static int8" in variant["note"], variant
    bundle = load_bundle(Path(variant["path"]))
    assert bundle.manifest.version.endswith("+int8")
    assert isinstance(variant["auc_change"], float)


def test_warmup_on_stored_features_equals_the_member_on_images(
    run: RunPaths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A frozen warm-up read from stored features (training.frozen_head): the backbone is
    left as it was, the stored predictions equal the whole member run on the images, and a
    second split reads the stored features instead of running the backbone again."""
    import tomllib

    import training.frozen_head as frozen_head
    from training.classify import build_member, predict
    from training.config import MemberConfig

    cfg, _ = load_config(SMOKE)
    cfg.classifier.epochs = 2
    cfg.classifier.warmup_epochs = 2
    cfg.classifier.feature_views = 2
    cfg.classifier.source_adversary = 0.0
    cfg.classifier.embedding = "l2"
    # An ImageNet backbone: a random one in eval mode gives nearly one feature vector for
    # every image, and its centred embedding would be rounding noise.
    with (REPO / "training" / "configs" / "pretrained.toml").open("rb") as fh:
        lite0 = tomllib.load(fh)["members"][0]
    cfg.members = [MemberConfig.model_validate(lite0)]
    cache = load_cache(run.cache)
    plan = SplitPlan.load(run.splits)
    lungs = read_lungmaps(run.lungmaps, cache.ids, sha256_file(run.segmentation / "best.pt"))
    assert lungs is not None
    device = torch.device("cpu")
    passes = {"n": 0}
    real = frozen_head.pooled_features

    def counted(*args: object, **kwargs: object) -> object:
        passes["n"] += 1
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(frozen_head, "pooled_features", counted)
    features = tmp_path / "features"
    spec = member_run(cfg, "lite0", 0)
    result = train_member(
        spec, cfg, cache, lungs, plan.splits[0], tmp_path / "s0", device, features_dir=features
    )
    assert passes["n"] == 3  # the plain view + 2 augmented views of every image, once
    assert [h["backbone"] for h in result["history"]] == ["frozen", "frozen"]
    assert len(list(features.glob("*.npz"))) == 1

    trained = load_member(tmp_path / "s0")
    seed_everything(spec.seed)  # as train_member builds it
    initial = build_member(spec).features.state_dict()
    for key, value in trained.features.state_dict().items():
        torch.testing.assert_close(value, initial[key])  # weights and BatchNorm statistics

    prob, emb = predict(
        trained,
        cache.images,
        lungs,
        cache.params,
        spec.input_size,
        device,
        lung_crop=spec.lung_crop,
        lung_mask=spec.lung_mask,
    )
    with np.load(tmp_path / "s0" / "predictions.npz") as npz:
        np.testing.assert_allclose(npz["probability"], prob, atol=1e-5)
        np.testing.assert_allclose(npz["embedding"], emb, atol=1e-4)
    # the retrieval embedding is centred on the training images: not one narrow cone
    train_rows = cache.rows(plan.splits[0].train)
    assert abs(float(emb[train_rows].mean(axis=0) @ emb[train_rows].mean(axis=0))) < 0.1

    train_member(
        member_run(cfg, "lite0", 1),
        cfg,
        cache,
        lungs,
        plan.splits[1],
        tmp_path / "s1",
        device,
        features_dir=features,
    )
    assert passes["n"] == 3  # split 1 read the stored features
