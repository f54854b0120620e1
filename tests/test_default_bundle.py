"""The shipped bundle, models/default: valid, small enough, and it separates clear cases.

The clear cases are images of the pool's held-out test split (never trained on): the two
COVID-19 images and the two negatives the bundle's own evaluation scored most confidently, as
listed in its report (`report/report.json`, "cases"; section "Test cases to look at" of
`report/report.md`, written by `cxr-train evaluate`). They go through the worker's task body
(`run_infer`) from the original files after the node's preprocessing, as in production, so the
test guards the serving path (decoding, preprocessing, lung crop, fp16 weights, channel order,
threshold) against regressions; the model's accuracy is measured by `cxr-train evaluate` and
stated in the model card.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from dicom_node.results.pixels import decode_display
from dicom_node.settings import REPO_ROOT
from tests.conftest import POOL_DIR
from training.data import read_display_image
from worker.bundle import MANIFEST_NAME, load_bundle
from worker.contracts import GateRefusal, InferRequest, InferResult, decode_png, encode_png
from worker.inference import get_ensemble, run_infer
from worker.preprocess import preprocess

DEFAULT = REPO_ROOT / "models" / "default"
MAX_BUNDLE_MB = 60.0

_CASES = json.loads((DEFAULT / "report" / "report.json").read_text(encoding="utf-8"))["cases"]
#: Held-out test-split images of the pool (file names under images/); never trained on.
CLEAR_COVID = [f"{c['id']}.png" for c in _CASES["confident_positive"][:2]]
#: The pool holds this NIH film upside down. The networks (1.1.0) scored it the most
#: confidently negative image of the test split; the input gate (1.2.0) declines it.
UPSIDE_DOWN = "nih__00003490_011.png"
CLEAR_NEGATIVE = [
    f"{c['id']}.png" for c in _CASES["confident_negative"] if f"{c['id']}.png" != UPSIDE_DOWN
][:2]


def _infer(image: np.ndarray) -> InferResult | GateRefusal:
    bundle, ensemble = get_ensemble(DEFAULT)
    pre = preprocess(image, bundle.manifest.preprocessing)
    request = InferRequest(
        job_id="test", bundle_fingerprint=bundle.fingerprint, image_png=encode_png(pre)
    )
    return run_infer(request, ensemble, bundle)


def _score(image: np.ndarray) -> tuple[float, np.ndarray]:
    result = _infer(image)
    assert isinstance(result, InferResult), f"the gate declined it: {result.reasons}"
    return result.probability, decode_png(result.lung_mask_png)


def test_manifest_and_checksums_are_valid() -> None:
    bundle = load_bundle(DEFAULT)  # raises on a bad checksum, class map or schema
    manifest = json.loads((DEFAULT / MANIFEST_NAME).read_text())
    assert "plumbing" not in json.dumps(manifest).lower(), "the default bundle must be trained"
    assert len(bundle.manifest.members) >= 3
    assert 0.0 < bundle.manifest.threshold < 1.0
    assert (DEFAULT / "model_card.md").is_file()


def test_bundle_size_is_under_the_budget() -> None:
    total = sum(p.stat().st_size for p in DEFAULT.rglob("*") if p.is_file()) / 1e6
    assert total < MAX_BUNDLE_MB, f"models/default is {total:.1f} MB"


def test_model_card_states_what_a_hospital_must_know() -> None:
    card = (DEFAULT / "model_card.md").read_text(encoding="utf-8")
    for needed in (
        "not for diagnostic use",
        "No pretrained weights",
        "95% CI",
        "Per source",
        "Shortcut audit",
        "Known limits",
        "## Invariance",
        "## Targets",
        "## Read this first",
    ):
        assert needed in card, needed


def test_real_chest_cr_finds_lungs(chest_cr: Path) -> None:
    """The pydicom-data chest CR (MONOCHROME1, 15-bit): a plausible lung map and a score."""
    ds = dcmread(chest_cr)
    probability, lung = _score(decode_display(ds))
    assert 0.0 <= probability <= 1.0
    fraction = float(np.mean(lung >= 128))
    assert 0.08 < fraction < 0.6, f"lung fraction {fraction:.2f}"
    # Two lungs: the left and right halves both hold lung pixels.
    half = lung.shape[1] // 2
    assert (lung[:, :half] >= 128).mean() > 0.03 and (lung[:, half:] >= 128).mean() > 0.03


def _pool_image(name: str) -> Path:
    path = POOL_DIR / "images" / name
    if not path.is_file():
        pytest.skip(f"public pool not found at {POOL_DIR} (set CXR_POOL_DIR)")
    return path


@pytest.mark.parametrize("name", CLEAR_COVID)
def test_clear_covid_case_is_above_threshold(name: str) -> None:
    probability, _ = _score(read_display_image(_pool_image(name)))
    threshold = load_bundle(DEFAULT).manifest.threshold
    assert probability > threshold, f"{name}: {probability:.3f} <= {threshold:.3f}"


@pytest.mark.parametrize("name", CLEAR_NEGATIVE)
def test_clear_negative_is_below_threshold(name: str) -> None:
    probability, _ = _score(read_display_image(_pool_image(name)))
    threshold = load_bundle(DEFAULT).manifest.threshold
    assert probability < threshold, f"{name}: {probability:.3f} >= {threshold:.3f}"


def test_the_gate_declines_an_upside_down_film_and_scores_it_turned_upright() -> None:
    image = read_display_image(_pool_image(UPSIDE_DOWN))
    refused = _infer(image)
    assert isinstance(refused, GateRefusal)
    assert any("upside down" in reason for reason in refused.reasons), refused.reasons
    upright = _infer(np.ascontiguousarray(image[::-1, ::-1]))
    assert isinstance(upright, InferResult)
    assert upright.probability < load_bundle(DEFAULT).manifest.threshold


def test_reference_items_say_which_negative_they_are() -> None:
    from dicom_node.results.labels import reference_label_text
    from dicom_node.results.reference_index import ReferenceIndex

    index = ReferenceIndex(load_bundle(DEFAULT))
    findings = {item.get("finding") for item in index.items}
    assert findings == {"covid", "other_pneumonia", "negative"}
    vector = np.ones(index.index.dim, dtype=np.float32)
    texts = {reference_label_text(s.label or "") for s in index.query(vector, 50)}
    assert "no COVID-19 (no finding or other pneumonia)" not in texts
    assert texts <= {"COVID-19", "no COVID-19: other pneumonia", "no finding"}
