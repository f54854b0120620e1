"""The whole pipeline per image, in one process, on real DICOM files: per-stage breakdown.

Stages as the node runs them (prepare on the node host, infer on a worker, finalize on the
node host), without the queue and the network (bench/e2e.py measures those):

    prepare : read the spooled file, decode pixels, preprocess, PNG for the task payload
    infer   : segment (U-Net), ensemble (members), package the result
    finalize: read + decode the source again, lung outline, retrieve (hospital index +
              reference set), build the SR, build the summary SC, write both, hospital index

Each repeat is a new instance (new SOP/Study UIDs and patient, written to the spool before
the clock starts), so the ledger and the hospital index do real inserts. Totals are timed
through the real `steps.prepare`, `worker.inference.run_infer` and `steps.finalize`;
the breakdown calls the same functions step by step on the same instance.

Micro-batching: the infer step on a batch of N queued images vs N single calls.

    python -m bench.pipeline [--bundle var/bench/bundle-cpu] [--repeats 10] [--files a.dcm,...]
    python -m bench.pipeline --smoke
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.uid import generate_uid

from bench.common import DEFAULT_BUNDLE, header, interleaved, median, ms, percentile, table
from dicom_node.jobs import steps
from dicom_node.records.ledger import Job, OutputKind
from dicom_node.results.pixels import decode_display
from dicom_node.results.reduced_decode import decode_display_at
from dicom_node.settings import Settings
from worker.contracts import InferRequest, InferResult, decode_png, encode_png
from worker.inference import (
    INPUT_NAME,
    MEMBER_OUTPUTS,
    SEGMENTATION_OUTPUT,
    get_ensemble,
    run_infer,
)
from worker.model_input import member_input, resize_batch
from worker.preprocess import preprocess, to_model_input

POOL_DIR = Path(
    os.environ.get("CXR_POOL_DIR", Path(__file__).resolve().parents[2] / "shared" / "cxr-data")
)


def default_files() -> list[Path]:
    from pydicom.data import get_testdata_file

    files = [Path(p) for n in ("RG1_UNCI.dcm", "RG1_J2KR.dcm") if (p := get_testdata_file(n))]
    rsna = sorted((POOL_DIR / "dicom").glob("rsna__*.dcm"))
    return files + rsna[:1]


def new_instance(source: Path, spool: Path, node: steps.NodeRuntime) -> str:
    """A copy of `source` as a new instance of a new patient, in the spool and the ledger."""
    ds = dcmread(source)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = f"BENCH{uuid.uuid4().hex[:8]}"
    job_id = uuid.uuid4().hex[:16]
    path = spool / f"{job_id}.dcm"
    ds.save_as(path)
    node.ledger.add(
        Job.received(
            job_id,
            sop_instance_uid=str(ds.SOPInstanceUID),
            sop_class_uid=str(ds.SOPClassUID),
            study_instance_uid=str(ds.StudyInstanceUID),
            series_instance_uid=str(ds.SeriesInstanceUID),
            calling_ae="BENCH",
            spool_path=str(path),
        )
    )
    return job_id


class Clock:
    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self._last = time.perf_counter()

    def restart(self) -> None:
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.times[name] = self.times.get(name, 0.0) + now - self._last
        self._last = now


def breakdown(node: steps.NodeRuntime, job_id: str, threads: int) -> dict[str, float]:
    """The steps of prepare -> infer -> finalize one by one, as the pipeline calls them."""
    bundle, ensemble = get_ensemble(node.settings.bundle, threads)
    manifest = bundle.manifest
    job = node.ledger.get(job_id)
    assert job is not None and job.spool_path
    c = Clock()
    ds = dcmread(job.spool_path)
    c.lap("prepare: read")
    display = decode_display_at(
        ds, steps.display_target(node.settings, manifest), max_pixels=node.settings.max_pixels
    )
    c.lap("prepare: decode")
    image = preprocess(display.image, manifest.preprocessing)
    c.lap("prepare: preprocess")
    payload = encode_png(image)
    image = decode_png(payload)
    c.lap("task payload (PNG)")
    x = to_model_input(image[None], manifest.preprocessing)
    seg_in = resize_batch(x, manifest.segmentation.input_size)
    (lung,) = ensemble.segmentation.run([SEGMENTATION_OUTPUT], {INPUT_NAME: seg_in})
    c.lap("infer: segment")
    probabilities = []
    for spec in manifest.members:
        prob, _ = ensemble.members[spec.name].run(
            list(MEMBER_OUTPUTS),
            {INPUT_NAME: member_input(x, lung, spec.input_size, spec.lung_crop, spec.lung_mask)},
        )
        probabilities.append(prob)
    c.lap("infer: ensemble")
    request = InferRequest(job_id=job_id, bundle_fingerprint=bundle.fingerprint, image_png=payload)
    result = run_infer(request, ensemble, bundle)  # for the finalize steps below (not timed)
    assert isinstance(result, InferResult), f"the bundle's gate refused the image: {result}"
    times = c.times
    c = Clock()
    settings = node.settings
    steps.load_source(job.spool_path, None, settings.max_pixels)
    c.lap("finalize: source, read + decode again (before)")
    node.display_cache.put(job_id, display)
    c.restart()
    source = steps.load_source(job.spool_path, node.display_cache.take(job_id), settings.max_pixels)
    c.lap("finalize: source, header + image kept by prepare (after)")
    lungs = steps.locate_lungs(source, result, manifest.preprocessing)
    c.lap("finalize: lung outline")
    hospital = node.hospital_index_for(bundle)
    similar = steps.find_similar(
        source.header,
        result,
        node.reference_index_for(bundle),
        settings.similar_k,
        hospital,
        settings.hospital_k,
    )
    c.lap("finalize: retrieve")
    uids = node.ledger.output_uids(job_id)
    options = steps.report_options(settings, similar)
    sr = steps.build_report(
        source.header, result, manifest, uids[OutputKind.SR], similar, lungs, options
    )
    c.lap("finalize: build SR")
    sc = steps.build_summary(
        source,
        result,
        manifest,
        uids[OutputKind.SC],
        lungs,
        settings.summary_width,
        syntax=settings.summary_syntax,
    )
    c.lap("finalize: build SC")
    for kind, obj in ((OutputKind.SR, sr), (OutputKind.SC, sc)):
        if obj is not None:
            obj.save_as(node.result_path(job_id, kind), enforce_file_format=True)
    c.lap("finalize: write")
    steps.remember(hospital, source.header, result)
    c.lap("finalize: hospital index")
    return times | c.times


def end_to_end(node: steps.NodeRuntime, job_id: str, threads: int) -> dict[str, float]:
    """The real step functions, timed as whole steps."""
    bundle, ensemble = get_ensemble(node.settings.bundle, threads)
    t0 = time.perf_counter()
    request = steps.prepare(node, job_id)
    t1 = time.perf_counter()
    assert isinstance(request, InferRequest), f"prepare gave {request}"
    result = run_infer(request, ensemble, bundle)
    t2 = time.perf_counter()
    assert isinstance(result, InferResult), f"the bundle's gate refused the image: {result}"
    steps.finalize(node, result)
    t3 = time.perf_counter()
    return {"prepare": t1 - t0, "infer": t2 - t1, "finalize": t3 - t2, "total": t3 - t0}


def decode_rows(files: list[Path], repeats: int) -> list[list[object]]:
    """decode_display: the decoder alone, the per-pixel float mapping (before) and the
    table mapping (after), interleaved."""
    from pydicom.pixels import pixel_array

    from dicom_node.results.pixels import _to_display, photometric_of

    rows: list[list[object]] = []
    for path in files:
        ds = dcmread(path)
        frame = pixel_array(ds, index=0, correct_unused_bits=True)
        photometric = photometric_of(ds)
        before = _to_display(frame, ds, photometric)
        assert np.array_equal(before, decode_display(ds)), "table and per-pixel mapping differ"
        times = interleaved(
            {
                "decoder": partial(pixel_array, ds, index=0, correct_unused_bits=True),
                "before": partial(_to_display, frame, ds, photometric),
                "after": partial(decode_display, ds),
            },
            repeats,
        )
        t_dec, t_before = median(times["decoder"]), median(times["before"])
        t_after = median(times["after"])
        rows.append(
            [path.name, ms(t_dec), ms(t_dec + t_before), ms(t_after), (t_dec + t_before) / t_after]
        )
    return rows


def batching_rows(
    node: steps.NodeRuntime, threads: int, repeats: int, sizes: list[int]
) -> list[list[object]]:
    from training.synthetic import synthetic_batch

    bundle, ensemble = get_ensemble(node.settings.bundle, threads)
    images = synthetic_batch(max(sizes), bundle.manifest.preprocessing, seed=3)
    rows: list[list[object]] = []
    for n in sizes:
        batch = images[:n]

        def single(batch: np.ndarray = batch) -> None:
            for i in range(len(batch)):
                ensemble.predict(batch[i : i + 1])

        def batched(batch: np.ndarray = batch) -> None:
            ensemble.predict(batch)

        fns: dict[str, Callable[[], object]] = {"single": single, "batched": batched}
        times = interleaved(fns, repeats)
        t_single, t_batch = median(times["single"]) / n, median(times["batched"]) / n
        rows.append([n, ms(t_single), ms(t_batch), t_single / t_batch])
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    parser.add_argument("--files", default="", help="comma-separated DICOM files")
    parser.add_argument("--repeats", type=int, default=10, help="instances per file")
    parser.add_argument("--threads", type=int, default=0, help="ONNX threads; 0: node default")
    parser.add_argument("--batch-sizes", default="2,4,8")
    parser.add_argument("--batch-repeats", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="1 repeat, first file, batch 2")
    args = parser.parse_args(argv)
    files = [Path(f) for f in args.files.split(",") if f] or default_files()
    if args.smoke:
        args.repeats, args.batch_sizes, args.batch_repeats = 1, "2", 1
        files = files[:1]

    header("Pipeline per image (in process, no queue)")
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        settings = Settings(
            data_dir=Path(tmp),
            bundle=args.bundle,
            onnx_threads=args.threads,
            min_free_disk_mb=0,
        )
        settings.make_dirs()
        node = steps.NodeRuntime(settings)
        get_ensemble(settings.bundle, args.threads)  # loaded once per process, like a worker
        bundle = node.bundles.current()
        node.reference_index_for(bundle)  # loaded once, like the node
        print(
            f"bundle {bundle.manifest.name} {bundle.manifest.version}; "
            f"SR + SC on, SEG off; hospital index on\n"
        )
        stage_rows: list[list[object]] = []
        total_rows: list[list[object]] = []
        for path in files:
            ds = dcmread(path, stop_before_pixels=True)
            label = f"{path.name} ({ds.Rows}x{ds.Columns}, {ds.file_meta.TransferSyntaxUID.name})"
            # Warm-up: first calls load lazily (ledger, indexes, decoders).
            end_to_end(node, new_instance(path, settings.spool_dir, node), args.threads)
            stages: dict[str, list[float]] = {}
            totals: dict[str, list[float]] = {}
            for _ in range(args.repeats):
                for name, t in breakdown(
                    node, new_instance(path, settings.spool_dir, node), args.threads
                ).items():
                    stages.setdefault(name, []).append(t)
                for name, t in end_to_end(
                    node, new_instance(path, settings.spool_dir, node), args.threads
                ).items():
                    totals.setdefault(name, []).append(t)
            for name, ts in stages.items():
                stage_rows.append([label, name, ms(median(ts)), ms(percentile(ts, 95))])
            total_rows.append(
                [label, args.repeats]
                + [
                    v
                    for name in ("prepare", "infer", "finalize", "total")
                    for v in (ms(median(totals[name])), ms(percentile(totals[name], 95)))
                ]
            )
        print("### Per stage (breakdown)\n")
        table(["file", "stage", "p50 ms", "p95 ms"], stage_rows)
        print("### Per step and total (real step functions)\n")
        table(
            [
                "file",
                "n",
                "prepare p50",
                "prepare p95",
                "infer p50",
                "infer p95",
                "finalize p50",
                "finalize p95",
                "total p50 ms",
                "total p95 ms",
            ],
            total_rows,
        )
        print("### Decoding to a display image (decode_display)\n")
        print(
            "before: decoder + Modality/VOI/MONOCHROME1 in float64 per pixel; after: "
            "the same mapping tabulated once per stored value, then indexed\n"
        )
        table(
            ["file", "decoder ms", "before ms", "after ms", "speed-up"],
            decode_rows(files, max(3, args.repeats // 2)),
        )
        print("### Micro-batching the infer step (Ensemble.predict)\n")
        table(
            ["batch N", "single ms/image", "batched ms/image", "speed-up"],
            batching_rows(
                node,
                args.threads,
                args.batch_repeats,
                [int(v) for v in args.batch_sizes.split(",")],
            ),
        )


if __name__ == "__main__":
    main()
