"""Only frontal chest radiographs get a score: the shipped bundle's input gate through the node,
with DCMTK storescu in and storescp out.

Each non-chest image carries a header that lets it through the header checks (CR, CHEST, PA),
as misrouted studies do; each must come back as an SR that says "not analysed" and why, with
no probability and no summary image, while a real chest CR sent with them gets its score.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import (
    ComprehensiveSRStorage,
    ComputedRadiographyImageStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from dicom_node.records.ledger import JobState, Ledger
from dicom_node.settings import REPO_ROOT
from tests.conftest import NodeProcess, Peer, wait_for
from tests.sr_reading import sr_summary
from tests.synthetic import synthetic_cr, write
from tests.test_e2e import of_class, storescu

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DEFAULT = REPO_ROOT / "models" / "default"


def as_chest_cr(ds: Dataset, pixels: np.ndarray | None = None) -> Dataset:
    """`ds` relabelled as a frontal chest CR (new UIDs), optionally with new 16-bit pixels."""
    cr = synthetic_cr(size=8)
    for keyword in ("Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit"):
        if keyword in ds:
            setattr(cr, keyword, getattr(ds, keyword))
    cr.PixelRepresentation = int(ds.get("PixelRepresentation", 0))
    cr.PixelData = ds.PixelData
    if pixels is not None:
        cr.Rows, cr.Columns = pixels.shape
        cr.BitsAllocated, cr.BitsStored, cr.HighBit, cr.PixelRepresentation = 16, 16, 15, 0
        cr.PixelData = pixels.astype(np.uint16).tobytes()
    cr.SOPClassUID = ComputedRadiographyImageStorage
    return cr


def photo() -> np.ndarray:
    from skimage import data  # the train extra; its sample photos ship with it

    camera: np.ndarray = data.camera().astype(np.uint16) * 256  # a photographer, 512 x 512
    return camera


def ct_slice() -> Dataset:
    path = get_testdata_file("CT_small.dcm")
    assert path is not None
    return dcmread(path)


def test_only_the_chest_radiograph_is_scored(
    start_node: Callable[..., NodeProcess], storescp: Peer, chest_cr: Path, tmp_path: Path
) -> None:
    refused = {
        "photo": write(as_chest_cr(synthetic_cr(), photo()), tmp_path / "photo.dcm"),
        "ct": write(as_chest_cr(ct_slice()), tmp_path / "ct.dcm"),
        "1x1": write(synthetic_cr(size=1), tmp_path / "tiny.dcm"),
        "uniform": write(
            as_chest_cr(synthetic_cr(), np.full((256, 256), 2000)), tmp_path / "uniform.dcm"
        ),
    }
    real = dcmread(chest_cr)
    real.SOPInstanceUID = generate_uid()
    real.file_meta.MediaStorageSOPInstanceUID = real.SOPInstanceUID
    real_path = write(real, tmp_path / "chest.dcm")
    uids = {name: str(dcmread(p).SOPInstanceUID) for name, p in refused.items()}

    node = start_node(destinations=storescp.address, bundle=str(DEFAULT))
    assert storescu(node, [*refused.values(), real_path]) == 0
    wait_for(
        lambda: len(of_class(storescp.received(), ComprehensiveSRStorage)) >= 5,
        300,
        "5 SRs at the destination",
    )
    by_source: dict[str, dict[str, object]] = {}
    texts: dict[str, str] = {}
    for path in of_class(storescp.received(), ComprehensiveSRStorage):
        sr = dcmread(path)
        summary = sr_summary(sr)
        (source,) = summary["referenced_sop_instance_uids"]
        by_source[source] = dict(summary)
        texts[source] = " ".join(
            str(item.get("TextValue", "")) for item in sr.ContentSequence if "TextValue" in item
        )

    for name, uid in uids.items():
        assert by_source[uid]["probability"] is None, name
        assert by_source[uid]["finding_present"] is None, name
        assert "COVID-19: not analysed" in texts[uid], (name, texts[uid])
    scored = by_source[str(real.SOPInstanceUID)]
    assert isinstance(scored["probability"], float) and 0.0 <= scored["probability"] <= 1.0

    # a summary image only for the scored one: no picture of a finding on the others
    wait_for(
        lambda: bool(of_class(storescp.received(), SecondaryCaptureImageStorage)), 60, "the SC"
    )
    (sc,) = [dcmread(p) for p in of_class(storescp.received(), SecondaryCaptureImageStorage)]
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == real.SOPInstanceUID

    ledger = Ledger(node.data_dir / "ledger.sqlite3")
    for name, uid in uids.items():
        job = ledger.by_sop_instance(uid)
        assert job is not None and job.state is JobState.REJECTED, name
        assert job.probability is None
        assert (job.reason or "").startswith("not analysed (input gate): "), job.reason
    status = node.cli("status")
    assert status.returncode == 0 and "not analysed (input" in status.stdout, status.stdout
    assert node.process.poll() is None  # the node keeps serving
