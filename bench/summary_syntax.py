"""The summary Secondary Capture in each transfer syntax (issue 17): bytes, encode, decode,
the finalize step and the delivery, on a real chest CR through the node's own functions.

    python bench/run.py summary_syntax [--repeats 25] [--bundle models/default]
    python bench/run.py summary_syntax --smoke

1. One job of RG1_UNCI (pydicom-data, 1955 x 1841 CR) through `steps.prepare`,
   `worker.inference.run_infer` and the finalize pieces (`load_source`, `locate_lungs`); then
   `steps.build_summary` (render + highdicom build + encode) in each syntax of the setting
   `summary_syntax`, interleaved: file bytes, build time, and at a receiver the decode
   (read + pixel_array) and the fallback (read + `delivery.as_accepted`: decompressed for a
   peer that takes uncompressed only). Two references that are not settings: pydicom's
   `Dataset.compress` of the uncompressed SC to RLE (pylibjpeg-rle) and to JPEG 2000
   lossless on the RGB planes.
2. `steps.finalize` itself, timed per new instance, `summary_syntax` uncompressed against
   jpeg2000-lossless (two node runtimes, interleaved): p50/p95, SC and SR bytes per study.
3. `delivery.send_files` of one job's SR + SC (one association), per syntax, to a DCMTK
   storescp that accepts every syntax (`+xa`) and to one that takes uncompressed only.
"""

from __future__ import annotations

import argparse
import copy
import io
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import get_args

from pydicom import Dataset, dcmread
from pydicom.uid import JPEG2000Lossless, RLELossless, SecondaryCaptureImageStorage

from bench.common import header, interleaved, median, ms, percentile, pydicom_test_file, table
from bench.ingest import free_port, wait_port
from bench.pipeline import new_instance
from dicom_node.jobs import steps
from dicom_node.records.ledger import OutputKind
from dicom_node.results.delivery import as_accepted, send_files
from dicom_node.results.sc.builder import SUMMARY_SYNTAXES
from dicom_node.settings import Destination, Settings, SummarySyntaxName
from worker.contracts import InferRequest, InferResult
from worker.inference import get_ensemble, run_infer

SYNTAXES: tuple[SummarySyntaxName, ...] = get_args(SummarySyntaxName)
UNCOMPRESSED_ONLY = [(str(SecondaryCaptureImageStorage), "1.2.840.10008.1.2.1")]


def to_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def analysed(node: steps.NodeRuntime, source: Path) -> tuple[str, InferResult]:
    """A new instance of `source`, prepared and inferred: ready for finalize."""
    job_id = new_instance(source, node.settings.spool_dir, node)
    request = steps.prepare(node, job_id)
    assert isinstance(request, InferRequest), f"prepare gave {request}"
    bundle, ensemble = get_ensemble(node.settings.bundle_in_use, node.settings.onnx_threads)
    result = run_infer(request, ensemble, bundle)
    assert isinstance(result, InferResult), f"the bundle's gate refused the image: {result}"
    return job_id, result


def runtime(
    folder: Path, bundle: Path, syntax: SummarySyntaxName = "uncompressed"
) -> steps.NodeRuntime:
    settings = Settings(data_dir=folder, bundle=bundle, min_free_disk_mb=0, summary_syntax=syntax)
    settings.make_dirs()
    return steps.NodeRuntime(settings)


def read_pixels(raw: bytes) -> object:
    return dcmread(io.BytesIO(raw)).pixel_array


def fallback_pixels(raw: bytes) -> object:
    return as_accepted(dcmread(io.BytesIO(raw)), UNCOMPRESSED_ONLY).pixel_array


def compressed(plain: Dataset, uid: str, plugin: str = "") -> Dataset:
    ds = copy.deepcopy(plain)
    ds.compress(uid, encoding_plugin=plugin)
    return ds


def syntax_rows(node: steps.NodeRuntime, source: Path, repeats: int) -> list[list[object]]:
    job_id, result = analysed(node, source)
    job = node.ledger.get(job_id)
    assert job is not None and job.spool_path
    bundle = node.bundles.by_device_uid(result.device_uid)
    manifest = bundle.manifest
    loaded = steps.load_source(job.spool_path, None, node.settings.max_pixels)
    lungs = steps.locate_lungs(loaded, result, manifest.preprocessing)
    uids = node.ledger.output_uids(job_id)[OutputKind.SC]
    width = node.settings.summary_width

    def build(syntax: SummarySyntaxName) -> Dataset:
        sc = steps.build_summary(loaded, result, manifest, uids, lungs, width, syntax=syntax)
        assert sc is not None
        return sc

    def build_and_write(syntax: SummarySyntaxName) -> bytes:
        return to_bytes(build(syntax))

    encoded = {syntax: build_and_write(syntax) for syntax in SYNTAXES}
    built = interleaved({s: partial(build_and_write, s) for s in SYNTAXES}, repeats)
    decoded = interleaved({s: partial(read_pixels, b) for s, b in encoded.items()}, repeats)
    fallback = interleaved({s: partial(fallback_pixels, b) for s, b in encoded.items()}, repeats)
    plain = build("uncompressed")
    references: dict[str, Callable[[], object]] = {
        "RLE, pydicom compress (pylibjpeg-rle)": partial(
            compressed, plain, RLELossless, "pylibjpeg"
        ),
        "JPEG 2000 lossless on RGB planes, pydicom compress": partial(
            compressed, plain, JPEG2000Lossless
        ),
    }
    reference_times = interleaved(references, repeats)
    base = median(built["uncompressed"])
    rows: list[list[object]] = []
    for s in SYNTAXES:
        rows.append(
            [
                f"{s} ({SUMMARY_SYNTAXES[s].uid.name})",
                len(encoded[s]),
                len(encoded["uncompressed"]) / len(encoded[s]),
                ms(median(built[s])),
                ms(median(built[s]) - base),
                ms(median(decoded[s])),
                ms(median(fallback[s])),
            ]
        )
    for name in references:
        kind = RLELossless if name.startswith("RLE") else JPEG2000Lossless
        size = len(to_bytes(compressed(plain, kind)))
        rows.append(
            [
                name,
                size,
                len(encoded["uncompressed"]) / size,
                "",
                ms(median(reference_times[name])),
                "",
                "",
            ]
        )
    return rows


def finalize_rows(
    folder: Path, source: Path, bundle: Path, repeats: int
) -> tuple[list[list[object]], dict[SummarySyntaxName, list[Path]]]:
    variants: tuple[SummarySyntaxName, ...] = ("uncompressed", "jpeg2000-lossless")
    nodes = {s: runtime(folder / s, bundle, s) for s in variants}
    for node in nodes.values():  # warm-up: ledger, indexes, decoders, encoders
        steps.finalize(node, analysed(node, source)[1])
    times: dict[SummarySyntaxName, list[float]] = {s: [] for s in variants}
    files: dict[SummarySyntaxName, list[Path]] = {s: [] for s in variants}
    for _ in range(repeats):
        for s, node in nodes.items():
            job_id, result = analysed(node, source)
            started = time.perf_counter()
            steps.finalize(node, result)
            times[s].append(time.perf_counter() - started)
            files[s] = [node.result_path(job_id, k) for k in (OutputKind.SR, OutputKind.SC)]
    rows: list[list[object]] = [
        [
            s,
            len(times[s]),
            ms(median(times[s])),
            ms(percentile(times[s], 95)),
            files[s][1].stat().st_size,
            files[s][0].stat().st_size,
        ]
        for s in variants
    ]
    return rows, files


@contextmanager
def storescp(folder: Path, options: list[str]) -> Iterator[Destination]:
    folder.mkdir(parents=True)
    port = free_port()
    proc = subprocess.Popen(
        ["storescp", *options, "--aetitle", "PACS", "--output-directory", str(folder), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        yield Destination(ae_title="PACS", host="127.0.0.1", port=port)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def delivery_rows(
    folder: Path, files: dict[SummarySyntaxName, list[Path]], repeats: int
) -> list[list[object]]:
    rows: list[list[object]] = []
    peers = {"storescp +xa (all syntaxes)": ["+xa"], "storescp default": []}
    for i, (peer, options) in enumerate(peers.items()):
        with storescp(folder / str(i), options) as destination:

            def send(paths: list[Path], to: Destination = destination) -> None:
                assert send_files(paths, to, "BENCH") == [None, None]

            times = interleaved({s: partial(send, p) for s, p in files.items()}, repeats)
            received = {
                str(ds.SOPInstanceUID): ds.file_meta.TransferSyntaxUID.name
                for ds in (dcmread(p, stop_before_pixels=True) for p in (folder / str(i)).iterdir())
            }
            for s, paths in files.items():
                ts = times[s]
                sc_uid = str(dcmread(paths[1], stop_before_pixels=True).SOPInstanceUID)
                rows.append([peer, s, received[sc_uid], ms(median(ts))])
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=None, help="default: the node's")
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--smoke", action="store_true", help="1 repeat: check that it runs")
    args = parser.parse_args(argv)
    # RG1_UNCI's one-component Referring Physician's Name, copied into every summary
    warnings.filterwarnings("ignore", "The string .* is unlikely to represent", UserWarning)
    repeats = 1 if args.smoke else args.repeats
    source = pydicom_test_file("RG1_UNCI.dcm")
    bundle = args.bundle or Settings().bundle

    header("Summary Secondary Capture per transfer syntax")
    with tempfile.TemporaryDirectory(prefix="bench-sc-") as tmp:
        folder = Path(tmp)
        node = runtime(folder / "syntaxes", bundle)
        print(f"bundle {bundle}; RG1_UNCI; summary width {node.settings.summary_width}\n")
        print("### Bytes, build, decode (build: render + highdicom + encode, per call)\n")
        table(
            [
                "syntax",
                "file bytes",
                "x smaller",
                "build p50 ms",
                "encode cost ms",
                "decode p50 ms",
                "fallback p50 ms",
            ],
            syntax_rows(node, source, repeats),
        )
        rows, files = finalize_rows(folder / "finalize", source, bundle, max(repeats, 1))
        print("### steps.finalize (SR + SC, new instance each)\n")
        table(["summary_syntax", "n", "p50 ms", "p95 ms", "SC bytes", "SR bytes"], rows)
        print("### send_files: SR + SC in one association (storescp writes each file)\n")
        table(
            ["peer", "summary_syntax", "SC sent as", "p50 ms"],
            delivery_rows(folder / "peers", files, repeats),
        )


if __name__ == "__main__":
    main()
