"""Model definitions, ONNX export and the bundle writer (needs the `train` extra)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="torch is not installed: install the `train` extra to test training/"
)
pytest.importorskip("onnx", reason="onnx is not installed: install the `train` extra")

import hnswlib  # noqa: E402
import onnxruntime as ort  # noqa: E402
from pydantic import ValidationError  # noqa: E402
from pydicom.uid import UID  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from training.bundle_writer import (  # noqa: E402
    ExportError,
    MemberExport,
    ReferenceItem,
    SegmentationExport,
    check_parity,
    export_classifier,
    export_unet,
    onnx_parity,
    torch_embeddings,
    write_bundle,
)
from training.cli import app  # noqa: E402
from training.models import (  # noqa: E402
    PAPER_HEAD,
    ClassifierExport,
    UNet,
    UNetExport,
    build_classifier,
    calibrate_batchnorm,
)
from training.synthetic import synthetic_batch, synthetic_labels  # noqa: E402
from worker.bundle import SCHEMA_VERSION, load_bundle, sha256_file  # noqa: E402
from worker.classes import CLASS_MAP, CxrClass  # noqa: E402
from worker.inference import Ensemble, member_input, resize_batch  # noqa: E402
from worker.preprocess import PreprocessParams, to_model_input  # noqa: E402

pytestmark = pytest.mark.train

TINY_HEAD = (32, 32, 16)
SIZE = 64


@pytest.fixture(scope="module")
def params() -> PreprocessParams:
    return PreprocessParams(size=SIZE)


@pytest.fixture(scope="module")
def images(params: PreprocessParams) -> np.ndarray:
    return synthetic_batch(8, params, seed=7)


@pytest.fixture(scope="module")
def unet(images: np.ndarray, params: PreprocessParams) -> UNet:
    torch.manual_seed(0)
    model = UNet(base_width=4, depth=4)
    calibrate_batchnorm(model, torch.from_numpy(to_model_input(images, params)))
    return model


def _lung(unet: UNet, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        lung: np.ndarray = UNetExport(unet).eval()(torch.from_numpy(x)).numpy()
    return lung


@pytest.mark.parametrize(
    ("architecture", "features"),
    [
        ("resnet18", 512),
        ("resnet34", 512),
        ("resnet50", 2048),
        ("resnet152", 2048),
        ("vgg16", 512),
        ("densenet121", 1024),
        ("efficientnet_b0", 1280),
        ("mobilenet_v3_small", 576),
        ("shufflenet_v2_x0_5", 1024),
    ],
)
def test_classifier_head_and_outputs(architecture: str, features: int) -> None:
    model = build_classifier(architecture, TINY_HEAD).eval()
    assert model.feature_dim == features
    with torch.no_grad():
        logits, embedding = model(torch.zeros(2, 3, SIZE, SIZE))
    assert logits.shape == (2, len(CxrClass))
    assert embedding.shape == (2, TINY_HEAD[-1])
    assert (embedding >= 0).all()  # the embedding is the last hidden layer, after its ReLU


def test_paper_head_by_default() -> None:
    model = build_classifier("resnet18")
    widths = [m.out_features for m in model.head if isinstance(m, torch.nn.Linear)]
    assert tuple(widths) == PAPER_HEAD == (1024, 512, 256)
    assert model.embedding_dim == 256


def test_unknown_architecture_is_refused() -> None:
    with pytest.raises(ValueError, match="unsupported architecture"):
        build_classifier("alexnet")


def test_export_probability_is_softmax_of_the_covid_logit() -> None:
    model = build_classifier("shufflenet_v2_x0_5", TINY_HEAD).eval()
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        logits, _ = model(x)
        probability, _ = ClassifierExport(model)(x)
    expected = torch.softmax(logits, dim=1)[:, CxrClass.COVID19]
    torch.testing.assert_close(probability, expected)


def test_unet_shapes() -> None:
    model = UNet(base_width=4, depth=4).eval()
    with torch.no_grad():
        out = UNetExport(model)(torch.zeros(2, 1, SIZE, SIZE))
    assert out.shape == (2, 1, SIZE, SIZE)
    assert float(out.min()) >= 0.0
    assert float(out.max()) <= 1.0


def test_classifier_onnx_parity(
    tmp_path: Path, unet: UNet, images: np.ndarray, params: PreprocessParams
) -> None:
    torch.manual_seed(1)
    model = build_classifier("shufflenet_v2_x0_5", TINY_HEAD)
    x = to_model_input(images, params)
    inputs = member_input(x, _lung(unet, x), SIZE)
    calibrate_batchnorm(model, torch.from_numpy(inputs))
    path = export_classifier(model, tmp_path / "member.onnx", SIZE)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert [o.name for o in session.get_outputs()] == ["probability", "embedding"]
    # Exported with batch 2; 5 proves the batch axis is dynamic.
    diff = check_parity(ClassifierExport(model), path, inputs[:5])
    assert diff < 1e-4
    print(f"classifier parity {diff:.2e}")


def test_unet_onnx_parity(
    tmp_path: Path, unet: UNet, images: np.ndarray, params: PreprocessParams
) -> None:
    path = export_unet(unet, tmp_path / "segmentation.onnx", SIZE)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["lung"]
    diff = check_parity(UNetExport(unet), path, to_model_input(images[:3], params))
    assert diff < 1e-4
    print(f"U-Net parity {diff:.2e}")


def test_parity_check_catches_a_different_model(
    tmp_path: Path, images: np.ndarray, params: PreprocessParams
) -> None:
    torch.manual_seed(2)
    exported, other = UNet(base_width=4), UNet(base_width=4)
    path = export_unet(exported, tmp_path / "segmentation.onnx", SIZE)
    x = to_model_input(images[:2], params)
    assert onnx_parity(UNetExport(other), path, x) > 1e-3
    with pytest.raises(ExportError, match="differs from PyTorch"):
        check_parity(UNetExport(other), path, x)


def test_unet_export_refuses_a_size_it_cannot_halve(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="multiple of 16"):
        export_unet(UNet(base_width=4, depth=4), tmp_path / "s.onnx", 72)


def test_reference_items_carry_no_other_fields() -> None:
    with pytest.raises(ValidationError):
        ReferenceItem.model_validate(
            {"id": "1", "label": "covid", "source": "x", "patient_name": "Test^Patient"}
        )
    with pytest.raises(ValidationError, match="not one of"):
        ReferenceItem(id="1", label="COVID-19", source="x")


def _tiny_bundle(
    out_dir: Path,
    unet: UNet,
    images: np.ndarray,
    params: PreprocessParams,
    seg_size: int = 32,
    sizes: tuple[int, int] = (SIZE, 48),
    lung_crop: float | None = None,
    lung_mask: float | None = None,
) -> Path:
    torch.manual_seed(3)
    x = to_model_input(images, params)
    lung = _lung(unet, resize_batch(x, seg_size))
    members = []
    for arch, size in zip(("shufflenet_v2_x0_5", "mobilenet_v3_small"), sizes, strict=True):
        model = build_classifier(arch, TINY_HEAD)
        view = member_input(x, lung, size, lung_crop, lung_mask)
        calibrate_batchnorm(model, torch.from_numpy(view))
        members.append(
            MemberExport(arch.split("_")[0], model, size, lung_crop=lung_crop, lung_mask=lung_mask)
        )
    embeddings = torch_embeddings(
        unet,
        seg_size,
        members[0].model,
        sizes[0],
        images,
        params,
        lung_crop=lung_crop,
        lung_mask=lung_mask,
    )
    items = [
        ReferenceItem(id=f"ref-{i}", label=label.label, source="synthetic")
        for i, label in enumerate(synthetic_labels(len(images)))
    ]
    write_bundle(
        out_dir,
        name="tiny",
        version="0.0.1",
        members=members,
        segmentation=SegmentationExport(model=unet, input_size=seg_size),
        reference_embeddings=embeddings,
        reference_items=items,
        embedding_member=members[0].name,
        preprocessing=params,
        threshold=0.4,
        training_data={"note": "test"},
        random_weights=True,
        sample_images=images,
    )
    return out_dir


@pytest.mark.parametrize(("lung_crop", "lung_mask"), [(None, None), (0.1, None), (0.1, 0.03)])
def test_write_bundle_output_loads_and_serves(
    tmp_path: Path,
    unet: UNet,
    images: np.ndarray,
    params: PreprocessParams,
    lung_crop: float | None,
    lung_mask: float | None,
) -> None:
    # Segmentation at 32 and members at 64 and 48 px: every resize path of the worker runs.
    root = _tiny_bundle(
        tmp_path / "bundle", unet, images, params, lung_crop=lung_crop, lung_mask=lung_mask
    )
    bundle = load_bundle(root)
    manifest = bundle.manifest
    assert [m.lung_crop for m in manifest.members] == [lung_crop, lung_crop]
    assert [m.lung_mask for m in manifest.members] == [lung_mask, lung_mask]
    assert manifest.schema_version == SCHEMA_VERSION
    assert manifest.class_map == CLASS_MAP
    assert UID(manifest.device_uid).is_valid
    assert manifest.index.dim == 16
    assert manifest.index.count == len(images)
    for member in manifest.members:
        assert member.sha256 == sha256_file(root / member.file)
    assert "RANDOM WEIGHTS" in (root / "model_card.md").read_text(encoding="utf-8")
    assert not list(tmp_path.glob(".bundle.partial-*"))

    # What the worker computes from the files matches what training indexed.
    predictions = Ensemble(bundle).predict(images)
    index = hnswlib.Index(space="cosine", dim=manifest.index.dim)
    index.load_index(str(root / manifest.index.index.file))
    labels, distances = index.knn_query(np.stack([p.embedding for p in predictions]), k=1)
    np.testing.assert_array_equal(labels[:, 0], np.arange(len(images)))
    assert distances.max() < 1e-4


def test_each_bundle_gets_a_new_device_uid(
    tmp_path: Path, unet: UNet, images: np.ndarray, params: PreprocessParams
) -> None:
    a = load_bundle(_tiny_bundle(tmp_path / "a", unet, images[:4], params)).manifest
    b = load_bundle(_tiny_bundle(tmp_path / "b", unet, images[:4], params)).manifest
    assert a.device_uid != b.device_uid


def test_write_bundle_refuses_a_non_empty_folder(
    tmp_path: Path, unet: UNet, images: np.ndarray, params: PreprocessParams
) -> None:
    target = tmp_path / "bundle"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    with pytest.raises(ExportError, match="not an empty folder"):
        _tiny_bundle(target, unet, images[:4], params)


def test_failed_export_leaves_nothing_behind(
    tmp_path: Path, unet: UNet, images: np.ndarray, params: PreprocessParams
) -> None:
    model = build_classifier("shufflenet_v2_x0_5", TINY_HEAD)
    with pytest.raises(ExportError, match="8-d"):  # reference embeddings of the wrong width
        write_bundle(
            tmp_path / "bundle",
            name="bad",
            version="0",
            threshold=0.5,
            members=[MemberExport(name="m", model=model, input_size=SIZE)],
            segmentation=SegmentationExport(model=unet, input_size=SIZE),
            reference_embeddings=np.ones((4, 8), dtype=np.float32),
            reference_items=[ReferenceItem(id=str(i), label="covid", source="s") for i in range(4)],
            embedding_member="m",
            preprocessing=params,
            training_data={},
            sample_images=images[:4],
        )
    assert list(tmp_path.iterdir()) == []


def test_cli_export_random_refuses_to_overwrite_without_asking(tmp_path: Path) -> None:
    target = tmp_path / "bundle"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    result = CliRunner().invoke(app, ["export-random", str(target), "--size", "64"])
    assert result.exit_code != 0
    assert (target / "notes.txt").read_text() == "mine"
    result = CliRunner().invoke(app, ["export-random", str(target), "--size", "64", "--overwrite"])
    assert result.exit_code != 0  # not a bundle: never deleted
    assert (target / "notes.txt").read_text() == "mine"


def test_cli_export_random_writes_and_replaces_a_plumbing_bundle(tmp_path: Path) -> None:
    target = tmp_path / "bundle"
    result = CliRunner().invoke(app, ["export-random", str(target), "--size", "64"])
    assert result.exit_code == 0, result.output
    first = load_bundle(target).manifest
    assert first.random_weights
    assert first.preprocessing.size == 64
    result = CliRunner().invoke(app, ["export-random", str(target), "--size", "64", "--overwrite"])
    assert result.exit_code == 0, result.output
    assert load_bundle(target).manifest.device_uid != first.device_uid
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]
