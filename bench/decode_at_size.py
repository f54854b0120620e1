"""Decoding at a reduced size (issue 17, `CXR_DECODE_AT_SIZE`): prepare and finalize full vs
reduced, per file, interleaved, and what it does to the score.

    python bench/run.py decode_at_size [--repeats 20] [--bundle models/default]
    python bench/run.py decode_at_size --smoke

Files: RG1_J2KR (JPEG 2000 lossless) and RG1_J2KI (JPEG 2000 lossy) of pydicom-data, both
1955 x 1841 CRs, and a JPEG baseline copy of RG1_UNCI (windowed to 8 bits, Pillow q 95,
written here). Two node runtimes on the same bundle, `decode_at_size` off and on; each
repeat is a new instance per runtime, and the runtimes take turns: `steps.prepare` (read,
decode, gate sanity check, preprocess, PNG), `worker.inference.run_infer` (not timed),
`steps.finalize` (SR + SC + SEG, hospital index off). The score change is |p(full) -
p(reduced)| of the same file. Then the decode alone (`decode_display` vs `decode_display_at`).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from functools import partial
from io import BytesIO
from pathlib import Path

from PIL import Image
from pydicom import Dataset, dcmread
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit

from bench.common import header, interleaved, median, ms, percentile, pydicom_test_file, table
from bench.pipeline import new_instance
from dicom_node.jobs import steps
from dicom_node.process_start import configure_libraries
from dicom_node.results.pixels import decode_display
from dicom_node.results.reduced_decode import decode_display_at
from dicom_node.settings import REPO_ROOT, Settings
from worker.contracts import InferRequest, InferResult
from worker.inference import get_ensemble, run_infer

DEFAULT = REPO_ROOT / "models" / "default"


def jpeg_baseline_copy(source: Path) -> Dataset:
    """`source` (a 15-bit CR) windowed to 8 bits and stored as JPEG baseline (Pillow, q 95),
    as an 8-bit CR from a modality that compresses lossy would arrive."""
    ds = dcmread(source)
    display = decode_display(ds)  # MONOCHROME1 already inverted: stored as MONOCHROME2
    buffer = BytesIO()
    Image.fromarray(display).save(buffer, format="JPEG", quality=95)
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.LossyImageCompression = "01"
    for keyword in ("VOILUTSequence", "ModalityLUTSequence", "WindowCenter", "WindowWidth"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    ds.WindowCenter, ds.WindowWidth = 127.5, 256
    return ds


def runtime(folder: Path, bundle: Path, decode_at_size: bool) -> steps.NodeRuntime:
    settings = Settings(
        data_dir=folder,
        bundle=bundle,
        min_free_disk_mb=0,
        decode_at_size=decode_at_size,
        produce_seg=True,
        hospital_index=False,
    )
    settings.make_dirs()
    return steps.NodeRuntime(settings)


def one_job(node: steps.NodeRuntime, source: Path) -> tuple[float, float, float]:
    """prepare and finalize seconds of a new instance of `source`, and its probability."""
    job_id = new_instance(source, node.settings.spool_dir, node)
    t0 = time.perf_counter()
    request = steps.prepare(node, job_id)
    t1 = time.perf_counter()
    assert isinstance(request, InferRequest), f"prepare gave {request}"
    bundle, ensemble = get_ensemble(node.settings.bundle_in_use, node.settings.onnx_threads)
    result = run_infer(request, ensemble, bundle)
    assert isinstance(result, InferResult), f"the bundle's gate refused the image: {result}"
    t2 = time.perf_counter()
    steps.finalize(node, result)
    t3 = time.perf_counter()
    return t1 - t0, t3 - t2, result.probability


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=DEFAULT)
    parser.add_argument("--repeats", type=int, default=20, help="instances per file and mode")
    parser.add_argument(
        "--decode-threads",
        type=int,
        default=Settings.model_fields["decode_threads"].default,
        help="OpenJPEG's threads, as CXR_DECODE_THREADS sets them in the node's workers",
    )
    parser.add_argument("--smoke", action="store_true", help="1 repeat, first file")
    args = parser.parse_args(argv)
    if args.smoke:
        args.repeats = 1
    configure_libraries(decode_threads=args.decode_threads)

    header("Decoding at a reduced size (CXR_DECODE_AT_SIZE)")
    with tempfile.TemporaryDirectory(prefix="bench-decode-at-size-") as tmp:
        folder = Path(tmp)
        jpeg = folder / "RG1_UNCI-jpeg-baseline.dcm"
        jpeg_baseline_copy(pydicom_test_file("RG1_UNCI.dcm")).save_as(jpeg)
        files = [pydicom_test_file("RG1_J2KR.dcm"), pydicom_test_file("RG1_J2KI.dcm"), jpeg]
        if args.smoke:
            files = files[:1]
        nodes = {
            "full": runtime(folder / "full", args.bundle, False),
            "reduced": runtime(folder / "reduced", args.bundle, True),
        }
        bundle = nodes["full"].bundles.current()
        print(
            f"bundle {bundle.manifest.name} {bundle.manifest.version} (threshold "
            f"{bundle.manifest.threshold:.4f}); SR + SC + SEG; OpenJPEG threads "
            f"{args.decode_threads}\n"
        )
        step_rows: list[list[object]] = []
        score_rows: list[list[object]] = []
        decode_rows: list[list[object]] = []
        for path in files:
            ds = dcmread(path)
            label = f"{path.name} ({ds.file_meta.TransferSyntaxUID.name})"
            for node in nodes.values():  # warm-up: ledger, indexes, decoders
                one_job(node, path)
            runs: dict[str, list[tuple[float, float, float]]] = {m: [] for m in nodes}
            for _ in range(args.repeats):
                for mode, node in nodes.items():
                    runs[mode].append(one_job(node, path))
            for mode, values in runs.items():
                prepare = [v[0] for v in values]
                finalize = [v[1] for v in values]
                step_rows.append(
                    [
                        label,
                        mode,
                        len(values),
                        ms(median(prepare)),
                        ms(percentile(prepare, 95)),
                        ms(median(finalize)),
                        ms(percentile(finalize, 95)),
                    ]
                )
            p_full, p_reduced = runs["full"][0][2], runs["reduced"][0][2]
            display = decode_display_at(
                ds, steps.display_target(nodes["reduced"].settings, bundle.manifest)
            )
            score_rows.append(
                [
                    label,
                    "x".join(str(n) for n in display.image.shape),
                    display.grid.scale,
                    f"{p_full:.4f}",
                    f"{p_reduced:.4f}",
                    f"{abs(p_full - p_reduced):.4f}",
                ]
            )
            target = steps.display_target(nodes["reduced"].settings, bundle.manifest)
            times = interleaved(
                {
                    "full": partial(decode_display, ds),
                    "reduced": partial(decode_display_at, ds, target),
                },
                max(3, args.repeats),
            )
            decode_rows.append(
                [
                    label,
                    ms(median(times["full"])),
                    ms(median(times["reduced"])),
                    median(times["full"]) / median(times["reduced"]),
                ]
            )
        print("### prepare and finalize per file (steps.prepare, steps.finalize), interleaved\n")
        table(
            ["file", "decode", "n", "prepare p50", "prepare p95", "finalize p50", "finalize p95"],
            step_rows,
        )
        print("### Score: the same file decoded in full and reduced\n")
        table(["file", "display image", "scale", "p full", "p reduced", "|change|"], score_rows)
        print("### The decode alone (display image from the read dataset), interleaved\n")
        table(["file", "full ms", "reduced ms", "speed-up"], decode_rows)


if __name__ == "__main__":
    main()
