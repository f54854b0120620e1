"""Static int8 ONNX variants (QDQ), calibrated on preprocessed images through the serving path.

ONNX Runtime's static quantisation with per-channel int8 weights and uint8 activations in
QDQ format: the CPU provider fuses it into integer convolutions, 2-4x faster than fp32 on
these networks (bench/inference.py, docs/BENCHMARKS.md). Activation ranges come from MinMax
calibration on a few dozen training images fed exactly as the worker feeds them: the U-Net
on the resized image, each member on [image, lung map of the fp32 U-Net, zeros]. Dynamic
quantisation is not used: on convolutions it is slower than fp32 (int8 weights, activations
quantised again at every call). The AUC change of the variant is measured by the export on
the test set; a variant is for serving only if it stays within the tolerance.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from worker.bundle import Bundle
from worker.inference import INPUT_NAME, Ensemble
from worker.model_input import member_input, resize_batch
from worker.preprocess import to_model_input


class _Reader:
    """onnxruntime CalibrationDataReader over single inputs."""

    def __init__(self, inputs: np.ndarray) -> None:
        self._items = iter([{INPUT_NAME: inputs[i : i + 1]} for i in range(len(inputs))])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._items, None)


def int8_static(src: Path, dst: Path, calibration: np.ndarray) -> None:
    """`src` ONNX -> `dst` with int8 QDQ weights/activations; `calibration` float32 inputs."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="quantize-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # ONNX's own shape inference is enough for these exports (static but for the batch);
        # the symbolic one took 16 s for a small U-Net.
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(dst),
            _Reader(np.ascontiguousarray(calibration, dtype=np.float32)),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )


def calibration_inputs(bundle: Bundle, images: np.ndarray) -> dict[str, np.ndarray]:
    """file name -> that network's inputs for the preprocessed uint8 `images` [N,S,S]."""
    manifest = bundle.manifest
    ensemble = Ensemble(bundle, providers=["CPUExecutionProvider"])
    x = to_model_input(images, manifest.preprocessing)
    seg = manifest.segmentation
    seg_in = resize_batch(x, seg.input_size)
    lungs = [
        ensemble.segmentation.run(None, {INPUT_NAME: seg_in[i : i + 8]})[0]
        for i in range(0, len(seg_in), 8)
    ]
    lung = np.concatenate(lungs).astype(np.float32)
    inputs = {seg.file: seg_in}
    for member in manifest.members:
        inputs[member.file] = member_input(
            x, lung, member.input_size, member.lung_crop, member.lung_mask
        )
    return inputs
