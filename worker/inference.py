"""ONNX inference for a model bundle: segment -> classify with the ensemble -> embedding.

Loaded once per worker process (`get_ensemble`). Pure compute: a preprocessed uint8 image in,
probabilities, the retrieval embedding and the lung probability map out. No torch here; the
assembly of the classifier input (`member_input`, in `worker.model_input` so that it imports
without onnxruntime) is also what `training/` uses, so training and serving feed the members
the same channels.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from worker.bundle import Bundle, BundleError, load_bundle
from worker.contracts import GateRefusal, InferRequest, InferResult, decode_png, encode_png
from worker.gate import Gate, GateVerdict
from worker.model_input import MEMBER_CHANNELS, member_input, resize_batch
from worker.preprocess import to_model_input

__all__ = [
    "INPUT_NAME",
    "MEMBER_CHANNELS",
    "MEMBER_OUTPUTS",
    "SEGMENTATION_OUTPUT",
    "Ensemble",
    "Prediction",
    "get_ensemble",
    "member_input",
    "resize_batch",
    "run_infer",
]

INPUT_NAME = "image"
MEMBER_OUTPUTS: tuple[str, str] = ("probability", "embedding")
SEGMENTATION_OUTPUT = "lung"


def default_providers() -> list[str]:
    """CUDA first when this onnxruntime build has it, with CPU as the fallback."""
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


@dataclass(frozen=True)
class Segmented:
    """Preprocessed images as model input, with the U-Net's lung maps."""

    x: np.ndarray  # float32 [N,C,S,S], to_model_input
    lung: np.ndarray  # float32 [N,1,s,s] at the U-Net's size
    lung_maps: np.ndarray  # float32 [N,1,S,S] at the preprocessing size


@dataclass(frozen=True)
class Prediction:
    probability: float
    member_probabilities: dict[str, float]
    embedding: np.ndarray  # float32 [D], from the manifest's embedding member
    lung_probability: np.ndarray  # float32 [S,S] at the preprocessing size


def _check_io(
    session: ort.InferenceSession, what: str, outputs: tuple[str, ...], channels: int, size: int
) -> None:
    inputs = session.get_inputs()
    input_names = [i.name for i in inputs]
    if input_names != [INPUT_NAME]:
        raise BundleError(f"{what}: expected one input {INPUT_NAME!r}, got {input_names}")
    names = [o.name for o in session.get_outputs()]
    if names != list(outputs):
        raise BundleError(f"{what}: expected outputs {list(outputs)}, got {names}")
    shape = inputs[0].shape
    # The batch axis is symbolic; channels and size must be what the manifest declares.
    if len(shape) != 4 or list(shape[1:]) != [channels, size, size]:
        raise BundleError(f"{what}: input shape {shape} is not [N,{channels},{size},{size}]")


def session_options(intra_op_threads: int = 0, spin: bool = False) -> ort.SessionOptions:
    """The node's ONNX Runtime session options (bench/inference.py measures them).

    Threads: 0 means one per CPU the process may use. Sequential execution (the models are
    single chains of convolutions), all graph optimisations, memory arena and memory pattern on.
    Intra-op threads do not spin while waiting for work unless `spin`: on a machine shared
    with the node's own threads (SCP, decoding, reports) spinning burns the cores that would do
    that work; on an otherwise idle machine spinning answers a single image faster
    (docs/BENCHMARKS.md section 0).
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = intra_op_threads or _usable_cpus()
    options.inter_op_num_threads = 1
    options.enable_cpu_mem_arena = True
    options.enable_mem_pattern = True
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return options


def _usable_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


class Ensemble:
    """The bundle's segmentation model and ensemble members as ONNX Runtime sessions."""

    def __init__(
        self,
        bundle: Bundle,
        intra_op_threads: int = 0,
        providers: list[str] | None = None,
        spin: bool = False,
        options: ort.SessionOptions | None = None,
    ) -> None:
        self.bundle = bundle
        manifest = bundle.manifest
        self.params = manifest.preprocessing
        options = options or session_options(intra_op_threads, spin)
        self.providers = providers or default_providers()

        def session(file: str) -> ort.InferenceSession:
            return ort.InferenceSession(
                str(bundle.root / file), sess_options=options, providers=self.providers
            )

        seg = manifest.segmentation
        self.segmentation = session(seg.file)
        _check_io(self.segmentation, seg.file, (SEGMENTATION_OUTPUT,), 1, seg.input_size)
        self.members: dict[str, ort.InferenceSession] = {}
        for member in manifest.members:
            self.members[member.name] = session(member.file)
            _check_io(
                self.members[member.name],
                member.file,
                MEMBER_OUTPUTS,
                len(MEMBER_CHANNELS),
                member.input_size,
            )
        self.embedding_member = manifest.embedding_member
        #: The bundle's input gate (None: the bundle has none, every image is scored).
        self.gate = Gate.from_bundle(bundle, intra_op_threads)

    def predict(self, images: np.ndarray) -> list[Prediction]:
        """Preprocessed uint8 [N,S,S] (S = manifest preprocessing size) -> one Prediction each."""
        size = self.params.size
        if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (size, size):
            raise ValueError(f"expected uint8 [N,{size},{size}], got {images.dtype} {images.shape}")
        if images.shape[0] == 0:
            return []
        return self.classify(self.segment(images))

    def segment(self, images: np.ndarray) -> Segmented:
        """The U-Net's lung maps of preprocessed uint8 [N,S,S] images (what the gate and the
        members need)."""
        x = to_model_input(images, self.params)
        seg_in = resize_batch(x, self.bundle.manifest.segmentation.input_size)
        (lung,) = self.segmentation.run([SEGMENTATION_OUTPUT], {INPUT_NAME: seg_in})
        lung = np.asarray(lung, dtype=np.float32)
        # At the image's size: the SR's lung map, and what a lung crop cuts from.
        return Segmented(x=x, lung=lung, lung_maps=resize_batch(lung, self.params.size))

    def classify(self, segmented: Segmented) -> list[Prediction]:
        """The members' scores of segmented images."""
        manifest = self.bundle.manifest
        x, lung, lung_maps = segmented.x, segmented.lung, segmented.lung_maps
        inputs: dict[tuple[int, float | None, float | None], np.ndarray] = {}  # often shared
        probabilities: dict[str, np.ndarray] = {}
        embeddings: np.ndarray | None = None
        for spec in manifest.members:
            key = (spec.input_size, spec.lung_crop, spec.lung_mask)
            if key not in inputs:
                inputs[key] = member_input(x, lung if spec.lung_crop is None else lung_maps, *key)
            prob, emb = self.members[spec.name].run(list(MEMBER_OUTPUTS), {INPUT_NAME: inputs[key]})
            probabilities[spec.name] = np.clip(np.asarray(prob, dtype=np.float64), 0.0, 1.0)
            if spec.name == self.embedding_member:
                embeddings = np.asarray(emb, dtype=np.float32)
        assert embeddings is not None  # load_bundle checked that the member exists
        mean = np.mean(np.stack(list(probabilities.values())), axis=0)
        return [
            Prediction(
                probability=float(mean[i]),
                member_probabilities={name: float(p[i]) for name, p in probabilities.items()},
                embedding=embeddings[i].copy(),
                lung_probability=np.ascontiguousarray(lung_maps[i, 0]),
            )
            for i in range(x.shape[0])
        ]


def run_infer(
    request: InferRequest, ensemble: Ensemble, bundle: Bundle
) -> InferResult | GateRefusal:
    """The worker's task body: check the bundle, decode, segment, let the bundle's gate look
    at the lung map and the image's features, then score - or say why not."""
    if request.bundle_fingerprint != bundle.fingerprint:
        raise ValueError(
            f"job {request.job_id}: preprocessed for bundle {request.bundle_fingerprint[:12]}..., "
            f"this worker serves {bundle.fingerprint[:12]}... ({bundle.manifest.name} "
            f"{bundle.manifest.version})"
        )
    image = decode_png(request.image_png)
    if image.ndim != 2:
        raise ValueError(f"job {request.job_id}: expected a grayscale PNG, got shape {image.shape}")
    start = time.perf_counter()
    manifest = bundle.manifest
    segmented = ensemble.segment(image[None])
    if ensemble.gate is not None:
        verdict = GateVerdict.of(ensemble.gate.model_signals(image, segmented.lung_maps[0, 0]))
        if not verdict.analyse:
            return GateRefusal(
                job_id=request.job_id,
                bundle_name=manifest.name,
                bundle_version=manifest.version,
                device_uid=manifest.device_uid,
                reasons=list(verdict.reasons),
                scores=verdict.scores(),
            )
    (prediction,) = ensemble.classify(segmented)
    elapsed_ms = (time.perf_counter() - start) * 1000.0
    mask = np.clip(np.rint(prediction.lung_probability * 255.0), 0, 255).astype(np.uint8)
    return InferResult(
        job_id=request.job_id,
        bundle_name=manifest.name,
        bundle_version=manifest.version,
        device_uid=manifest.device_uid,
        probability=prediction.probability,
        member_probabilities=prediction.member_probabilities,
        embedding=prediction.embedding.astype(float).tolist(),
        lung_mask_png=encode_png(mask),
        inference_ms=elapsed_ms,
    )


# Two: the bundle in use and, just after a switch, the previous one finishing its jobs; an
# older one is dropped (and its GPU memory freed) when a third is loaded.
@functools.lru_cache(maxsize=2)
def _cached(root: Path, intra_op_threads: int, spin: bool) -> tuple[Bundle, Ensemble]:
    bundle = load_bundle(root)
    return bundle, Ensemble(bundle, intra_op_threads=intra_op_threads, spin=spin)


def get_ensemble(
    bundle_dir: Path, intra_op_threads: int = 0, spin: bool = False
) -> tuple[Bundle, Ensemble]:
    """The process's bundle and ensemble, loaded and checked on first use only."""
    return _cached(Path(bundle_dir).resolve(), intra_op_threads, spin)
