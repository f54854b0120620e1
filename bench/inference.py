"""ONNX Runtime vs PyTorch eager, per ensemble member and the U-Net; fp32, fp16, static int8.

Same weights (the bundle's ONNX files and, for PyTorch, `<bundle>.torch.pt` written by
`bench.make_bundle`; without it PyTorch gets random weights of the same shapes, which time
the same), same inputs, same thread count. Alternatives are timed round-robin so that load
spikes on a shared machine hit all of them alike; the table gives medians over repeats.

Variants (ONNX Runtime, CPU):
- fp32: the bundle's files as the node serves them;
- fp16w: the shipped fp16 variant (`training.export_run.fp16_weights`: fp16 storage, fp32 compute);
- fp16: whole-graph fp16 compute (`onnxruntime.transformers.float16`, fp32 inputs/outputs);
- int8: static QDQ quantisation, per-channel int8 weights, uint8 activations, calibrated
  (MinMax) on a few preprocessed images with `onnxruntime.quantization.quantize_static`.
fp16 and int8 change the scores: a variant is only usable once training has measured its AUC
change on the test set (target: within 0.005). The "max |dp|" column here is only a sanity
check against fp32 on the benchmark's inputs.

Then the node's own path (`worker.inference.Ensemble.predict`, the whole ensemble) with the
session options before and after tuning, in one run.

    python -m bench.inference [--bundle var/bench/bundle-cpu] [--repeats 15] [--big 1024]
    python -m bench.inference --smoke      # seconds: proves the script runs
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from bench.common import (
    DEFAULT_BUNDLE,
    header,
    interleaved,
    median,
    ms,
    table,
)
from worker.bundle import Bundle, load_bundle
from worker.inference import INPUT_NAME, Ensemble, session_options
from worker.model_input import member_input, resize_batch
from worker.preprocess import to_model_input


@dataclass
class Case:
    """One network of the bundle: its ONNX file, input shape and a PyTorch twin."""

    name: str
    onnx_path: Path
    channels: int
    size: int
    torch_module: Any  # torch.nn.Module (eval), outputs like the ONNX file
    inputs: np.ndarray  # float32 [8,C,size,size], realistic (preprocessed synthetic images)


def _torch_twin(bundle: Bundle, name: str, weights: dict[str, Any] | None) -> Any:
    from training.models import PAPER_HEAD, ClassifierExport, UNet, UNetExport, build_classifier

    manifest = bundle.manifest
    if name == "segmentation":
        arch = manifest.segmentation.architecture
        found = re.search(r"base_width=(\d+), depth=(\d+)", arch)
        width, depth = (int(found[1]), int(found[2])) if found else (16, 4)
        unet = UNet(base_width=width, depth=depth)
        if weights is not None:
            unet.load_state_dict(weights["segmentation"])
        return UNetExport(unet).eval()
    spec = bundle.member_by_name[name]
    experiment = manifest.config.get("experiment")
    head = manifest.config.get("head", PAPER_HEAD)  # plumbing bundles say it here
    if isinstance(experiment, dict):
        head = experiment.get("classifier", {}).get("head", head)
    model = build_classifier(spec.architecture, tuple(head))  # type: ignore[arg-type]
    if weights is not None:
        model.load_state_dict(weights[name])
    return ClassifierExport(model).eval()


def cases(bundle: Bundle, images: np.ndarray) -> list[Case]:
    import torch

    weights_path = bundle.root.with_name(bundle.root.name + ".torch.pt")
    weights = torch.load(weights_path, weights_only=True) if weights_path.is_file() else None
    manifest = bundle.manifest
    x = to_model_input(images, manifest.preprocessing)
    seg = manifest.segmentation
    seg_in = resize_batch(x, seg.input_size)
    session = ort.InferenceSession(str(bundle.path(seg)), providers=["CPUExecutionProvider"])
    (lung,) = session.run(None, {INPUT_NAME: seg_in})
    out = [
        Case(
            "segmentation",
            bundle.path(seg),
            1,
            seg.input_size,
            _torch_twin(bundle, "segmentation", weights),
            seg_in,
        )
    ]
    for spec in manifest.members:
        out.append(
            Case(
                spec.name,
                bundle.path(spec),
                3,
                spec.input_size,
                _torch_twin(bundle, spec.name, weights),
                member_input(x, lung, spec.input_size, spec.lung_crop, spec.lung_mask),
            )
        )
    return out


def sample_images(bundle: Bundle, n: int) -> np.ndarray:
    from training.synthetic import synthetic_batch

    return synthetic_batch(n, bundle.manifest.preprocessing, seed=7)


# --------------------------------------------------------------------------- variants


def fp16_weights_variant(src: Path, dst: Path) -> Path:
    from training.export_run import fp16_weights

    fp16_weights(src, dst)
    return dst


def fp16_compute_variant(src: Path, dst: Path) -> Path:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(model, str(dst))
    return dst


def int8_static_variant(src: Path, dst: Path, calibration: np.ndarray) -> Path:
    from training.quantize import int8_static

    int8_static(src, dst, calibration)
    return dst


# --------------------------------------------------------------------------- timing


def ort_session(path: Path, threads: int) -> ort.InferenceSession:
    return ort.InferenceSession(
        str(path), sess_options=session_options(threads), providers=["CPUExecutionProvider"]
    )


def _ort_fn(session: ort.InferenceSession, x: np.ndarray) -> Callable[[], object]:
    return lambda: session.run(None, {INPUT_NAME: x})


def _torch_fn(module: Any, x: np.ndarray) -> Callable[[], object]:
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(x))

    def run() -> object:
        with torch.inference_mode():
            return module(tensor)

    return run


def _first_output(result: Any) -> np.ndarray:
    if isinstance(result, list | tuple):
        result = result[0]
    if hasattr(result, "numpy"):
        result = result.numpy()
    return np.asarray(result, dtype=np.float64)


def compare(
    case: Case, variants: dict[str, Path], threads: int, batches: list[int], repeats: int
) -> list[list[object]]:
    sessions = {name: ort_session(path, threads) for name, path in variants.items()}
    rows: list[list[object]] = []
    for batch in batches:
        x = np.ascontiguousarray(case.inputs[:batch])
        fns: dict[str, Callable[[], object]] = {"torch": _torch_fn(case.torch_module, x)}
        fns.update({name: _ort_fn(s, x) for name, s in sessions.items()})
        reps = max(3, repeats if batch == 1 else repeats // 3)
        times = interleaved(fns, reps)
        reference = _first_output(sessions["fp32"].run(None, {INPUT_NAME: x}))
        torch_ms = ms(median(times["torch"]))
        row: list[object] = [case.name, f"{case.size}", batch, torch_ms]
        for name in sessions:
            t = ms(median(times[name]))
            diff = float(np.max(np.abs(_first_output(fns[name]()) - reference)))
            row += [t, torch_ms / t, diff]
        rows.append(row)
    return rows


def big_input_rows(case: Case, size: int, threads: int, repeats: int, work: Path) -> list[object]:
    """fp32 only, batch 1, at `size` px: the ONNX file re-exported from the PyTorch twin."""
    import torch

    from training.bundle_writer import _export
    from worker.inference import MEMBER_OUTPUTS, SEGMENTATION_OUTPUT

    outputs = (SEGMENTATION_OUTPUT,) if case.name == "segmentation" else MEMBER_OUTPUTS
    path = work / f"{case.name}-{size}.onnx"
    _export(case.torch_module, torch.zeros(1, case.channels, size, size), path, outputs)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, case.channels, size, size)).astype(np.float32)
    session = ort_session(path, threads)
    times = interleaved(
        {"torch": _torch_fn(case.torch_module, x), "ort": _ort_fn(session, x)}, repeats
    )
    t_torch, t_ort = ms(median(times["torch"])), ms(median(times["ort"]))
    return [case.name, size, 1, t_torch, t_ort, t_torch / t_ort]


def tuning_rows(
    bundle: Bundle, images: np.ndarray, threads: int, repeats: int
) -> list[list[object]]:
    """The whole ensemble as the node runs it, session options before vs after."""
    before = Ensemble(bundle, intra_op_threads=0, options=legacy_options(0))
    after = Ensemble(bundle, intra_op_threads=threads)
    rows: list[list[object]] = []
    for batch in (1, 8):
        x = images[:batch]
        times = interleaved(
            {"before": partial(before.predict, x), "after": partial(after.predict, x)},
            max(3, repeats if batch == 1 else repeats // 3),
        )
        t0, t1 = ms(median(times["before"])), ms(median(times["after"]))
        rows.append([batch, t0, t0 / batch, t1, t1 / batch, t0 / t1])
    return rows


def legacy_options(threads: int) -> ort.SessionOptions:
    """The node's session options before this benchmark (graph optimisation ALL, threads)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    return options


def load_time_rows(bundle: Bundle, threads: int) -> list[list[object]]:
    start = time.perf_counter()
    Ensemble(bundle, intra_op_threads=threads)
    cold = time.perf_counter() - start
    return [["Ensemble(bundle) (4 sessions)", ms(cold)]]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=15, help="batch-1 repeats (batch 8: /3)")
    parser.add_argument("--big", type=int, default=1024, help="large input side; 0: skip")
    parser.add_argument("--big-repeats", type=int, default=3)
    parser.add_argument("--variants", default="fp16w,fp16,int8", help="besides fp32")
    parser.add_argument("--only", default="", help="comma-separated networks (default: all)")
    parser.add_argument("--no-tuning", action="store_true", help="skip the Ensemble before/after")
    parser.add_argument("--smoke", action="store_true", help="1 repeat, batch 1, no 1024 px")
    args = parser.parse_args(argv)
    if args.smoke:
        args.repeats, args.big, args.big_repeats = 1, 0, 1
    import torch

    torch.set_num_threads(args.threads)
    bundle = load_bundle(args.bundle)
    header(f"Inference: ONNX Runtime vs PyTorch eager ({bundle.manifest.name})")
    print(
        f"threads: {args.threads} (torch.set_num_threads and ORT intra_op_num_threads); "
        f"onnxruntime {ort.__version__}, torch {torch.__version__}\n"
    )
    images = sample_images(bundle, 8)
    all_cases = cases(bundle, images)
    if args.only:
        wanted = set(args.only.split(","))
        all_cases = [c for c in all_cases if c.name in wanted]
    kinds = [v for v in args.variants.split(",") if v]
    batches = [1] if args.smoke else [1, 8]
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp:
        work = Path(tmp)
        rows: list[list[object]] = []
        for case in all_cases:
            variants: dict[str, Path] = {"fp32": case.onnx_path}
            for kind in kinds:
                dst = work / f"{case.name}-{kind}.onnx"
                try:
                    if kind == "fp16w":
                        variants[kind] = fp16_weights_variant(case.onnx_path, dst)
                    elif kind == "fp16":
                        variants[kind] = fp16_compute_variant(case.onnx_path, dst)
                    elif kind == "int8":
                        variants[kind] = int8_static_variant(case.onnx_path, dst, case.inputs)
                except Exception as exc:  # a converter that cannot handle a graph: say so
                    print(f"- {case.name}: {kind} conversion failed: {type(exc).__name__}: {exc}")
            rows += compare(case, variants, args.threads, batches, args.repeats)
        names = ["fp32", *kinds]
        headers = ["network", "input", "batch", "torch ms"]
        for name in names:
            headers += [f"ORT {name} ms", f"x torch ({name})", f"max abs diff vs fp32 ({name})"]
        print("### Per network, median latency per batch\n")
        table(headers, rows)

        if args.big:
            print(f"### At {args.big} px (fp32, batch 1, {args.big_repeats} repeats)\n")
            big = [
                big_input_rows(c, args.big, args.threads, args.big_repeats, work) for c in all_cases
            ]
            table(["network", "input", "batch", "torch ms", "ORT fp32 ms", "x torch"], big)

    if not args.no_tuning:
        print("### The node's ensemble (`Ensemble.predict`: U-Net + all members), fp32\n")
        print(
            "before: graph optimisation ALL, intra-op threads 0 (ORT default); after: "
            "`worker.inference.session_options`\n"
        )
        table(
            ["batch", "before ms", "before ms/image", "after ms", "after ms/image", "speed-up"],
            tuning_rows(bundle, images, args.threads, args.repeats),
        )
        table(["load", "ms"], load_time_rows(bundle, args.threads))


if __name__ == "__main__":
    main()
