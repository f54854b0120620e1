"""ONNX inference on the committed plumbing bundle (random weights: shapes and behaviour only)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import hnswlib
import numpy as np
import pytest

from training.synthetic import synthetic_batch
from worker import inference
from worker.bundle import MANIFEST_NAME, Bundle, BundleError, load_bundle
from worker.contracts import InferRequest, InferResult, decode_png, encode_png
from worker.inference import Ensemble, get_ensemble, run_infer

PLUMBING = Path(__file__).parent / "data" / "plumbing-bundle"


@pytest.fixture(scope="module")
def loaded() -> tuple[Bundle, Ensemble]:
    return get_ensemble(PLUMBING)


@pytest.fixture(scope="module")
def images(loaded: tuple[Bundle, Ensemble]) -> np.ndarray:
    return synthetic_batch(3, loaded[0].manifest.preprocessing, seed=123)


def test_predictions_have_the_declared_shapes_and_ranges(
    loaded: tuple[Bundle, Ensemble], images: np.ndarray
) -> None:
    bundle, ensemble = loaded
    manifest = bundle.manifest
    size = manifest.preprocessing.size
    predictions = ensemble.predict(images)
    assert len(predictions) == len(images)
    for p in predictions:
        assert 0.0 <= p.probability <= 1.0
        assert set(p.member_probabilities) == {m.name for m in manifest.members}
        assert all(0.0 <= v <= 1.0 for v in p.member_probabilities.values())
        # The ensemble is the mean of its members.
        assert p.probability == pytest.approx(np.mean(list(p.member_probabilities.values())))
        assert p.embedding.dtype == np.float32
        assert p.embedding.shape == (manifest.index.dim,)
        assert p.lung_probability.dtype == np.float32
        assert p.lung_probability.shape == (size, size)
        assert 0.0 <= p.lung_probability.min() <= p.lung_probability.max() <= 1.0


def test_outputs_depend_on_the_input(loaded: tuple[Bundle, Ensemble], images: np.ndarray) -> None:
    a, b = loaded[1].predict(images[:2])
    cosine = float(
        a.embedding @ b.embedding / (np.linalg.norm(a.embedding) * np.linalg.norm(b.embedding))
    )
    assert 1.0 - cosine > 1e-4
    assert not np.allclose(a.lung_probability, b.lung_probability)


def test_predict_is_deterministic(loaded: tuple[Bundle, Ensemble], images: np.ndarray) -> None:
    first, second = loaded[1].predict(images), loaded[1].predict(images)
    for p, q in zip(first, second, strict=True):
        assert p.probability == q.probability
        assert p.member_probabilities == q.member_probabilities
        np.testing.assert_array_equal(p.embedding, q.embedding)
        np.testing.assert_array_equal(p.lung_probability, q.lung_probability)


def test_a_batch_equals_single_images(loaded: tuple[Bundle, Ensemble], images: np.ndarray) -> None:
    ensemble = loaded[1]
    batch = ensemble.predict(images)
    for i, p in enumerate(batch):
        (single,) = ensemble.predict(images[i : i + 1])
        assert single.probability == pytest.approx(p.probability, abs=1e-5)
        for name, value in p.member_probabilities.items():
            assert single.member_probabilities[name] == pytest.approx(value, abs=1e-5)
        np.testing.assert_allclose(single.embedding, p.embedding, atol=1e-5)
        np.testing.assert_allclose(single.lung_probability, p.lung_probability, atol=1e-5)


def test_reference_images_find_themselves_in_the_index(loaded: tuple[Bundle, Ensemble]) -> None:
    """The index was built from PyTorch embeddings; serving computes them with ONNX Runtime
    through worker.inference. Both must assemble the member input the same way."""
    bundle, ensemble = loaded
    manifest = bundle.manifest
    seed = manifest.config["seed"]
    assert isinstance(seed, int)
    references = synthetic_batch(manifest.index.count, manifest.preprocessing, seed=seed)
    queries = np.stack([p.embedding for p in ensemble.predict(references[:8])])
    index = hnswlib.Index(space=manifest.index.space, dim=manifest.index.dim)
    index.load_index(str(bundle.path(manifest.index.index)))
    index.set_ef(manifest.index.ef_search)
    labels, distances = index.knn_query(queries, k=1)
    np.testing.assert_array_equal(labels[:, 0], np.arange(8))
    assert distances.max() < 1e-4


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [((1, 64, 64), np.uint8), ((1, 128, 128), np.float32), ((128, 128), np.uint8)],
)
def test_predict_refuses_images_not_preprocessed_for_the_bundle(
    loaded: tuple[Bundle, Ensemble], shape: tuple[int, ...], dtype: type
) -> None:
    with pytest.raises(ValueError, match="expected uint8"):
        loaded[1].predict(np.zeros(shape, dtype=dtype))


def test_predict_on_an_empty_batch(loaded: tuple[Bundle, Ensemble]) -> None:
    size = loaded[0].manifest.preprocessing.size
    assert loaded[1].predict(np.zeros((0, size, size), dtype=np.uint8)) == []


def _request(bundle: Bundle, image: np.ndarray, fingerprint: str | None = None) -> InferRequest:
    return InferRequest(
        job_id="job-1",
        bundle_fingerprint=fingerprint or bundle.fingerprint,
        image_png=encode_png(image),
    )


def test_run_infer_returns_the_result_of_the_ensemble(
    loaded: tuple[Bundle, Ensemble], images: np.ndarray
) -> None:
    bundle, ensemble = loaded
    result = run_infer(_request(bundle, images[0]), ensemble, bundle)
    (expected,) = ensemble.predict(images[:1])
    assert isinstance(result, InferResult)
    assert result.job_id == "job-1"
    assert (result.bundle_name, result.bundle_version) == ("plumbing", "0.0.0-random")
    assert result.device_uid == bundle.manifest.device_uid
    assert result.probability == pytest.approx(expected.probability, abs=1e-6)
    assert result.member_probabilities == pytest.approx(expected.member_probabilities, abs=1e-6)
    np.testing.assert_allclose(result.embedding, expected.embedding, atol=1e-6)
    mask = decode_png(result.lung_mask_png)
    assert mask.dtype == np.uint8
    assert mask.shape == images[0].shape
    np.testing.assert_allclose(mask / 255.0, expected.lung_probability, atol=0.5 / 255 + 1e-6)
    assert result.inference_ms > 0


def test_run_infer_refuses_another_bundles_fingerprint(
    loaded: tuple[Bundle, Ensemble], images: np.ndarray
) -> None:
    bundle, ensemble = loaded
    with pytest.raises(ValueError, match="preprocessed for bundle 000000000000"):
        run_infer(_request(bundle, images[0], fingerprint="0" * 64), ensemble, bundle)


def test_run_infer_refuses_a_colour_image(
    loaded: tuple[Bundle, Ensemble], images: np.ndarray
) -> None:
    bundle, ensemble = loaded
    colour = np.repeat(images[0][:, :, None], 3, axis=2)
    with pytest.raises(ValueError, match="grayscale"):
        run_infer(_request(bundle, colour), ensemble, bundle)


def test_get_ensemble_loads_once_per_bundle_folder(loaded: tuple[Bundle, Ensemble]) -> None:
    other_spelling = PLUMBING.parent / ".." / "data" / PLUMBING.name
    assert get_ensemble(other_spelling) is loaded
    assert get_ensemble(PLUMBING)[1] is loaded[1]


def test_cuda_comes_first_when_available(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        inference.ort,
        "get_available_providers",
        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    assert inference.default_providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(
        inference.ort,
        "get_available_providers",
        lambda: ["AzureExecutionProvider", "CPUExecutionProvider"],
    )
    assert inference.default_providers() == ["CPUExecutionProvider"]


def test_ensemble_refuses_a_manifest_that_misstates_input_sizes(tmp_path: Path) -> None:
    root = tmp_path / "bundle"
    shutil.copytree(PLUMBING, root)
    manifest = json.loads((root / MANIFEST_NAME).read_text(encoding="utf-8"))
    manifest["members"][0]["input_size"] = 96  # the ONNX file says 128
    (root / MANIFEST_NAME).write_text(json.dumps(manifest), encoding="utf-8")
    bundle = load_bundle(root)
    with pytest.raises(BundleError, match=r"input shape .* is not \[N,3,96,96\]"):
        Ensemble(bundle)


def test_onnx_threads_spin_only_when_asked() -> None:
    spin = "session.intra_op.allow_spinning"
    assert inference.session_options(2).get_session_config_entry(spin) == "0"
    assert inference.session_options(2, spin=True).get_session_config_entry(spin) == "1"
