"""Make the example pictures in docs/ from a real case, with the node's own code.

    PYTHONPATH=. .venv/bin/python docs/make_examples.py

What it does, all in one process and a temporary data folder (no network):

1. three earlier studies of other (synthetic, "Test^...") patients go through the node's
   steps (prepare -> ONNX inference with the plumbing bundle -> finalize), so the hospital
   index has something to find; one of them gets a confirmed diagnosis, as
   `cxr-node label` records it;
2. the real chest CR RG1_UNCI.dcm (NEMA WG04, from pydicom-data) goes through the same steps;
3. its Secondary Capture's pixel data is written to docs/example-summary.png, and its SR is
   rendered by DCMTK `dsr2html` and photographed by headless Chromium into
   docs/example-sr.png.

Honest about two things: the plumbing bundle has random weights, so the probability means
nothing (the pictures say so, in red), and its untrained U-Net finds no lungs; the lung map
used for RG1_UNCI is therefore hand-drawn on the preprocessed image (`HAND_DRAWN_LUNGS`),
standing in for a trained U-Net's output. Everything from the map on - undoing the
preprocessing geometry, the outline, the SCOORD, the picture - is the node's code path.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
from pydicom import dcmread
from pydicom.data import get_testdata_file

from dicom_node.jobs import steps
from dicom_node.records.ledger import OutputKind
from tests.test_pipeline import infer, make_node, receive
from tests.test_viewer import dsr2html, screenshot
from training.synthetic import synthetic_display_image
from worker.classes import CxrClass
from worker.contracts import encode_png

DOCS = Path(__file__).resolve().parent

#: Lungs of RG1_UNCI as (x, y) fractions of the preprocessed square image, drawn by eye.
HAND_DRAWN_LUNGS = [
    [(0.293, 0.088), (0.361, 0.107), (0.410, 0.176), (0.426, 0.293), (0.420, 0.430),
     (0.400, 0.547), (0.381, 0.645), (0.352, 0.693), (0.254, 0.713), (0.166, 0.742),
     (0.117, 0.703), (0.121, 0.586), (0.141, 0.430), (0.176, 0.273), (0.225, 0.156)],
    [(0.645, 0.088), (0.586, 0.117), (0.566, 0.195), (0.566, 0.332), (0.576, 0.449),
     (0.625, 0.566), (0.674, 0.664), (0.742, 0.703), (0.820, 0.752), (0.889, 0.742),
     (0.902, 0.625), (0.883, 0.449), (0.840, 0.273), (0.781, 0.156), (0.713, 0.098)],
]  # fmt: skip


def hand_drawn_map(size: int) -> str:
    lung = np.zeros((size, size), dtype=np.uint8)
    for polygon in HAND_DRAWN_LUNGS:
        points = np.rint(np.array(polygon) * size).astype(np.int32)
        cv2.fillPoly(lung, [points], 255)
    return encode_png(cv2.GaussianBlur(lung, (0, 0), size / 128))


def synthetic_study(folder: Path, n: int) -> Path:
    """An earlier study of another patient: a synthetic CXR wrapped as DX."""
    from tests.test_e2e import pool_png_as_dicom

    rng = np.random.default_rng(n)
    image = synthetic_display_image(rng, CxrClass.COVID19 if n % 2 else CxrClass.NEGATIVE)
    png = folder / f"earlier{n}.png"
    cv2.imwrite(str(png), image)
    return pool_png_as_dicom(png, folder / f"earlier{n}.dcm")


def main() -> int:
    source = Path(get_testdata_file("RG1_UNCI.dcm"))  # type: ignore[arg-type]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        node = make_node(work, hospital_k=3, similar_k=2)
        bundle = node.bundles.current()
        size = bundle.manifest.preprocessing.size
        for n in range(3):
            job = receive(node, synthetic_study(work, n), f"EARLIER{n}")
            steps.finalize(node, infer(node, job))  # elliptic stand-in lungs
        confirmed = node.ledger.get("job000")
        assert confirmed is not None
        node.hospital_index_for(bundle).store.set_diagnosis(confirmed.study_instance_uid, "covid")

        job = receive(node, source, "9RG1")
        result = infer(node, job, lungs=False)
        steps.finalize(node, result.model_copy(update={"lung_mask_png": hand_drawn_map(size)}))

        sc = dcmread(node.result_path(job, OutputKind.SC))
        summary = DOCS / "example-summary.png"
        pixels = cv2.cvtColor(sc.pixel_array, cv2.COLOR_RGB2BGR)
        cv2.imwrite(str(summary), pixels, [cv2.IMWRITE_PNG_COMPRESSION, 9])
        html = dsr2html(node.result_path(job, OutputKind.SR), work / "sr.html")
        png = screenshot(html, DOCS / "example-sr.png", work / "profile", size=(1000, 3800))
        print(f"wrote {summary.relative_to(DOCS.parent)} and {png.relative_to(DOCS.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
