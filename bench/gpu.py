"""GPU: the inference and pipeline benchmarks with ONNX Runtime's CUDA provider.

Needs an NVIDIA GPU and `onnxruntime-gpu` in place of `onnxruntime`
(`pip uninstall -y onnxruntime && pip install '.[gpu]'`); exits with a message saying what
is missing otherwise. Meant to finish in a few minutes on one GPU:

1. per network (U-Net, each member): batch 1, 2, 4, ..., 64; fp32 and fp16 (whole graph in
   fp16, fp32 inputs and outputs); plain `session.run` with numpy arrays vs IO binding (input
   copied to the GPU once, outputs left there); latency and images per second;
2. the node's ensemble (`Ensemble.predict` with the CUDA provider) at batch 1, 8 and 32 per
   image, then `bench.pipeline` (whole pipeline per image; CPU stages stay on the CPU).

    python -m bench.gpu [--bundle var/bench/bundle-cpu] [--max-batch 64] [--repeats 10]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from functools import partial
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bench.common import DEFAULT_BUNDLE, header, median, ms, table, time_calls
from worker.bundle import load_bundle
from worker.inference import INPUT_NAME, Ensemble

CUDA = "CUDAExecutionProvider"


def require_cuda() -> None:
    if CUDA not in ort.get_available_providers():
        sys.exit(
            "bench.gpu: ONNX Runtime has no CUDAExecutionProvider here "
            f"(available: {', '.join(ort.get_available_providers())}). It needs an NVIDIA GPU "
            "and onnxruntime-gpu: pip uninstall -y onnxruntime && pip install '.[gpu]'."
        )


def cuda_session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), sess_options=options, providers=[CUDA])
    if session.get_providers()[0] != CUDA:
        sys.exit(f"bench.gpu: {path.name} did not get the CUDA provider: {session.get_providers()}")
    return session


def network_rows(
    name: str, path: Path, channels: int, size: int, batches: list[int], repeats: int, work: Path
) -> list[list[object]]:
    from bench.inference import fp16_compute_variant

    variants = {"fp32": path, "fp16": fp16_compute_variant(path, work / f"{name}-fp16.onnx")}
    rows: list[list[object]] = []
    rng = np.random.default_rng(0)
    for precision, file in variants.items():
        session = cuda_session(file)
        outputs = [o.name for o in session.get_outputs()]
        for batch in batches:
            x = rng.standard_normal((batch, channels, size, size)).astype(np.float32)
            plain = time_calls(partial(session.run, None, {INPUT_NAME: x}), repeats, 3)
            binding = session.io_binding()
            binding.bind_ortvalue_input(INPUT_NAME, ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
            for output in outputs:
                binding.bind_output(output, "cuda")

            def bound(
                binding: ort.IOBinding = binding, session: ort.InferenceSession = session
            ) -> None:
                session.run_with_iobinding(binding)
                binding.synchronize_outputs()

            io = time_calls(bound, repeats, 3)
            t_plain, t_io = median(plain), median(io)
            rows.append(
                [name, size, precision, batch, ms(t_plain), batch / t_plain, ms(t_io), batch / t_io]
            )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-pipeline", action="store_true")
    args = parser.parse_args(argv)
    require_cuda()
    bundle = load_bundle(args.bundle)
    header(f"GPU: ONNX Runtime CUDA provider ({bundle.manifest.name})")
    print(f"onnxruntime {ort.__version__}; providers {ort.get_available_providers()}\n")
    batches = [b for b in (1, 2, 4, 8, 16, 32, 64) if b <= args.max_batch]
    manifest = bundle.manifest
    nets = [
        ("segmentation", bundle.path(manifest.segmentation), 1, manifest.segmentation.input_size)
    ]
    nets += [(m.name, bundle.path(m), 3, m.input_size) for m in manifest.members]
    rows: list[list[object]] = []
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        for name, path, channels, size in nets:
            rows += network_rows(name, path, channels, size, batches, args.repeats, Path(tmp))
            print(f"- {name}: done", flush=True)
    print()
    table(
        [
            "network",
            "input",
            "precision",
            "batch",
            "run ms",
            "run img/s",
            "IO binding ms",
            "IO binding img/s",
        ],
        rows,
    )

    print("### The node's ensemble with the CUDA provider (fp32)\n")
    from training.synthetic import synthetic_batch

    ensemble = Ensemble(bundle, providers=[CUDA, "CPUExecutionProvider"])
    images = synthetic_batch(32, manifest.preprocessing, seed=5)
    ens_rows = []
    for batch in (1, 8, 32):
        t = median(time_calls(partial(ensemble.predict, images[:batch]), args.repeats, 2))
        ens_rows.append([batch, ms(t), ms(t / batch), batch / t])
    table(["batch", "ms", "ms/image", "images/s"], ens_rows)

    if not args.no_pipeline:
        from bench import pipeline

        pipeline.main(["--bundle", str(args.bundle), "--repeats", "5"])


if __name__ == "__main__":
    main()
