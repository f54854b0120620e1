"""The static int8 variant: integer convolutions, valid bundle, scores close to fp32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx", reason="onnx is not installed: install the `train` extra")

import onnx

from tests.conftest import PLUMBING_BUNDLE
from training.export_run import make_variant
from training.synthetic import synthetic_batch
from worker.bundle import load_bundle
from worker.inference import Ensemble

pytestmark = pytest.mark.train


def test_int8_variant_is_a_quantised_bundle_that_scores_like_fp32(tmp_path: Path) -> None:
    bundle = load_bundle(PLUMBING_BUNDLE)
    params = bundle.manifest.preprocessing
    out = make_variant(
        PLUMBING_BUNDLE, tmp_path / "int8", "int8", synthetic_batch(16, params, seed=11)
    )
    variant = load_bundle(out)  # checksums, schema: what the worker checks
    assert variant.manifest.device_uid != bundle.manifest.device_uid
    assert variant.manifest.version.endswith("+int8")
    for ref in [*variant.manifest.members, variant.manifest.segmentation]:
        ops = {node.op_type for node in onnx.load(str(out / ref.file)).graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops, ref.file
    images = synthetic_batch(6, params, seed=12)
    fp32 = [p.probability for p in Ensemble(bundle).predict(images)]
    int8 = [p.probability for p in Ensemble(variant).predict(images)]
    assert np.max(np.abs(np.subtract(fp32, int8))) < 0.1


def test_int8_variant_refuses_to_guess_its_calibration(tmp_path: Path) -> None:
    from training.bundle_writer import ExportError

    with pytest.raises(ExportError, match="calibration"):
        make_variant(PLUMBING_BUNDLE, tmp_path / "int8", "int8")
