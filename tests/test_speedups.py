"""The speed-ups measured in bench/: each gives exactly what the slower way gave."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.pixels import pixel_array

from dicom_node.jobs import steps
from dicom_node.results.display import Display
from dicom_node.results.display_cache import DisplayCache
from dicom_node.results.pixels import _display_lut, _to_display, decode_display, photometric_of
from tests.test_pipeline import make_node, receive
from tests.test_pixels import make_dataset


def per_pixel(ds: Dataset) -> np.ndarray:
    frame = pixel_array(ds, index=0, correct_unused_bits=True)
    return _to_display(frame, ds, photometric_of(ds))


def test_table_decode_of_the_chest_cr_equals_the_per_pixel_mapping(chest_cr: Path) -> None:
    ds = dcmread(chest_cr)
    frame = pixel_array(ds, index=0, correct_unused_bits=True)
    assert _display_lut(frame, ds, photometric_of(ds)) is not None  # the table path is taken
    np.testing.assert_array_equal(decode_display(ds), per_pixel(ds))


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
def test_table_decode_equals_per_pixel_for_signed_rescaled_windowed_data(
    photometric: str, function: str
) -> None:
    rng = np.random.default_rng(1)
    pixels = rng.integers(-2048, 2047, size=(300, 200), dtype=np.int16)
    ds = make_dataset(
        pixels,
        photometric,
        bits_stored=12,
        signed=True,
        RescaleSlope=0.5,
        RescaleIntercept=-100,
        WindowCenter=-150,
        WindowWidth=700,
        VOILUTFunction=function,
    )
    frame = pixel_array(ds, index=0, correct_unused_bits=True)
    assert _display_lut(frame, ds, photometric) is not None
    np.testing.assert_array_equal(decode_display(ds), per_pixel(ds))


def test_percentile_voi_keeps_the_per_pixel_path() -> None:
    pixels = np.tile(np.arange(4096, dtype=np.uint16), (4, 1))
    ds = make_dataset(pixels, bits_stored=12)
    frame = pixel_array(ds, index=0, correct_unused_bits=True)
    assert _display_lut(frame, ds, "MONOCHROME2") is None


def test_display_cache_gives_each_image_once_and_respects_its_budget() -> None:
    cache = DisplayCache(max_bytes=250)
    a, b = Display.full(np.zeros((1, 100), np.uint8)), Display.full(np.ones((1, 100), np.uint8))
    assert cache.put("a", a) and cache.put("b", b)
    # full: the older ones stay
    assert not cache.put("c", Display.full(np.zeros((1, 100), np.uint8)))
    assert cache.take("a") is a
    assert cache.take("a") is None
    assert cache.put("c", Display.full(np.zeros((1, 100), np.uint8)))
    assert cache.nbytes == 200 and len(cache) == 2


def test_display_cache_drops_images_nobody_took_when_room_is_needed() -> None:
    cache = DisplayCache(max_bytes=150, ttl_s=0.0)
    assert cache.put("old", Display.full(np.zeros((1, 100), np.uint8)))
    assert cache.put("new", Display.full(np.zeros((1, 100), np.uint8)))  # "old" expired
    assert cache.take("old") is None


def test_finalize_uses_the_image_prepare_decoded(tmp_path: Path, chest_cr: Path) -> None:
    node = make_node(tmp_path)
    job_id = receive(node, chest_cr, "PAT1")
    assert steps.prepare(node, job_id) is not None
    kept = node.display_cache.take(job_id)
    assert kept is not None
    node.display_cache.put(job_id, kept)
    job = node.ledger.get(job_id)
    assert job is not None and job.spool_path
    source = steps.load_source(job.spool_path, node.display_cache.take(job_id), 10**8)
    assert source.display is kept
    assert "PixelData" not in source.header
    assert len(node.display_cache) == 0
    # Without the kept image (another process, a restart) it is decoded again, identically.
    again = steps.load_source(job.spool_path, node.display_cache.take(job_id), 10**8)
    assert again.display is not None
    np.testing.assert_array_equal(again.display.image, kept.image)


def test_display_cache_can_be_turned_off(tmp_path: Path, chest_cr: Path) -> None:
    node = make_node(tmp_path, display_cache_mb=0)
    job_id = receive(node, chest_cr, "PAT1")
    assert steps.prepare(node, job_id) is not None
    assert len(node.display_cache) == 0


def test_both_indexes_search_with_the_bundles_index_parameters(tmp_path: Path) -> None:
    node = make_node(tmp_path)
    bundle = node.bundles.current()
    spec = bundle.manifest.index
    assert node.reference_index_for(bundle).index.ef == max(spec.ef_search, spec.k)
    hospital = node.hospital_index_for(bundle)
    assert (hospital.m, hospital.ef_construction, hospital.ef_search) == (
        spec.m,
        spec.ef_construction,
        spec.ef_search,
    )
    assert hospital._index.ef == spec.ef_search
