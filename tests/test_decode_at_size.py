"""Decoding JPEG 2000 and JPEG baseline CRs directly at a reduced size (issue 17):
the values, the fallback to the full decode, and the geometry mapped back to the source grid."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.encaps import encapsulate
from pydicom.pixels import pixel_array
from pydicom.uid import RLELossless

from bench.decode_at_size import jpeg_baseline_copy, runtime
from dicom_node.jobs import steps
from dicom_node.process_start import configure_libraries
from dicom_node.records.ledger import OutputKind
from dicom_node.results.display import Display, SourceGrid
from dicom_node.results.lungs import lung_map_on_image, lung_mask
from dicom_node.results.pixels import PixelDecodeError, decode_display
from dicom_node.results.reduced_decode import (
    NotReduced,
    TargetSize,
    _decode_jpeg2000,
    _first_frame,
    _pillow_j2k_level,
    decode_display_at,
    eligible_codec,
    reduction_level,
)
from dicom_node.settings import REPO_ROOT, Settings
from tests.test_pipeline import receive
from worker.contracts import InferRequest, InferResult
from worker.inference import get_ensemble, run_infer
from worker.preprocess import PreprocessParams, preprocess_geometry

DEFAULT_BUNDLE = REPO_ROOT / "models" / "default"
#: The default bundle (largest input 256) and summary width (1024).
TARGET = TargetSize(min_width=871, min_side=512)


def _testdata(name: str) -> Path:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} is not in pydicom-data")
    return Path(path)


# --------------------------------------------------------------------------- values


def test_level_zero_equals_pydicom_exactly(chest_cr_j2k: Path) -> None:
    """Pillow's OpenJPEG at full size gives pydicom's stored values, bit for bit (RG1 is 15
    bits stored: Pillow's I;16 scaling is undone)."""
    ds = dcmread(chest_cr_j2k)
    expected = pixel_array(ds, index=0, correct_unused_bits=True)
    got = _decode_jpeg2000(_first_frame(ds), 0, (ds.Rows, ds.Columns), ds.BitsStored)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


def _sample(image: np.ndarray, grid: SourceGrid, shape: tuple[int, int]) -> np.ndarray:
    """`image` (full size, blurred) sampled at the source positions of a display grid's
    pixel centres."""
    rows = np.arange(shape[0]) * grid.scale + grid.offset
    cols = np.arange(shape[1]) * grid.scale + grid.offset
    map_x, map_y = np.meshgrid(cols.astype(np.float32), rows.astype(np.float32))
    return cv2.remap(image, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


@pytest.mark.parametrize("name", ["RG1_J2KR.dcm", "RG1_J2KI.dcm", "jpeg-baseline"])
def test_reduced_image_is_the_full_one_downsampled(name: str, chest_cr: Path) -> None:
    ds = jpeg_baseline_copy(chest_cr) if name == "jpeg-baseline" else dcmread(_testdata(name))
    display = decode_display_at(ds, TARGET)
    grid = display.grid
    assert grid.scale == 2 and grid.source_shape == (ds.Rows, ds.Columns)
    assert display.image.shape == (-(-ds.Rows // 2), -(-ds.Columns // 2))
    full = decode_display(ds).astype(np.float32)
    blurred = cv2.GaussianBlur(full, (0, 0), sigmaX=1.0)
    difference = np.abs(display.image - _sample(blurred, grid, display.image.shape))
    # Bound: 1.5 gray levels of 255 on average (measured 0.5-0.9: the reduction's own
    # filter is not a Gaussian; JPEG adds its block error)
    assert float(difference.mean()) < 1.5
    # The pixel centres are where SourceGrid says: the other codec's offset fits worse.
    other = SourceGrid(grid.source_shape, grid.scale, 0.5 if grid.offset == 0.0 else 0.0)
    elsewhere = np.abs(display.image - _sample(blurred, other, display.image.shape))
    assert float(elsewhere.mean()) > float(difference.mean())


def test_jpeg_at_an_eighth_lies_on_the_block_centres(chest_cr: Path) -> None:
    """DCT scaling 1/8 (a small target): display pixel u is the mean of source block u, its
    centre at 8u + 3.5."""
    ds = jpeg_baseline_copy(chest_cr)
    display = decode_display_at(ds, TargetSize(min_width=200, min_side=200))
    grid = display.grid
    assert (grid.scale, grid.offset) == (8, 3.5) and display.image.shape == (245, 231)
    blurred = cv2.GaussianBlur(decode_display(ds).astype(np.float32), (0, 0), sigmaX=3.0)
    right = np.abs(display.image - _sample(blurred, grid, display.image.shape)).mean()
    wrong = SourceGrid(grid.source_shape, 8, 0.0)
    assert right < 2.0
    assert np.abs(display.image - _sample(blurred, wrong, display.image.shape)).mean() > right


def test_first_frame_of_a_multi_frame_image(chest_cr_j2k: Path) -> None:
    ds = dcmread(chest_cr_j2k)
    single = decode_display_at(ds, TARGET)
    frame = _first_frame(ds)
    ds.PixelData = encapsulate([frame, frame[: len(frame) // 2]])  # frame 2 broken: not read
    ds.NumberOfFrames = 2
    double = decode_display_at(ds, TARGET)
    assert double.grid == single.grid
    np.testing.assert_array_equal(double.image, single.image)


def test_jpeg2000_levels_where_pillow_rounds_the_size_differently() -> None:
    """Pillow sizes a reduced JPEG 2000 image rounded to nearest, OpenJPEG decodes it rounded
    up: where they differ (a side of 4k + 1 at level 2) Pillow fails, so a lower level."""
    assert _pillow_j2k_level(1955, 1841, 2) == 1  # 1841 = 4 * 460 + 1
    assert _pillow_j2k_level(4300, 4300, 2) == 2
    assert _pillow_j2k_level(4097, 4300, 3) == 1


# --------------------------------------------------------------------------- which level


def test_level_keeps_the_summary_width_and_twice_the_model_input() -> None:
    assert reduction_level(1955, 1841, TARGET, 5) == 1  # 921 px wide
    assert reduction_level(4300, 4300, TARGET, 5) == 2  # 1075
    assert reduction_level(4300, 4300, TARGET, 1) == 1  # the codec's limit
    assert reduction_level(1400, 1700, TARGET, 5) == 0  # 850 < 871: already small
    assert reduction_level(1000, 3000, TARGET, 5) == 0  # shorter side 500 < 512
    assert reduction_level(600, 500, TARGET, 5) == 0


def test_target_follows_the_bundle_and_the_summary_width() -> None:
    from worker.bundle import load_bundle

    manifest = load_bundle(DEFAULT_BUNDLE).manifest
    assert TargetSize.for_bundle(manifest, 1024) == TARGET
    assert TargetSize.for_bundle(manifest, 2048).min_width == 1741


# --------------------------------------------------------------------------- fallback


@pytest.fixture(scope="module")
def rle_copy(chest_cr: Path) -> Dataset:
    ds = dcmread(chest_cr)
    ds.compress(RLELossless)
    return ds


def test_other_images_are_decoded_in_full_unchanged(chest_cr: Path, rle_copy: Dataset) -> None:
    uncompressed = dcmread(chest_cr)
    signed = dcmread(_testdata("RG1_J2KR.dcm"))
    signed.PixelRepresentation = 1
    for ds in (uncompressed, rle_copy, signed):
        with pytest.raises(NotReduced):
            eligible_codec(ds, 10**8)
        display = decode_display_at(ds, TARGET)
        assert display.grid == SourceGrid((ds.Rows, ds.Columns))
        np.testing.assert_array_equal(display.image, decode_display(ds))


def test_turned_off_or_small_enough_it_is_the_full_decode(chest_cr_j2k: Path) -> None:
    ds = dcmread(chest_cr_j2k)
    full = decode_display(ds)
    large_summary = TargetSize(min_width=1741, min_side=512)  # CXR_SUMMARY_WIDTH 2048
    for target in (None, large_summary):
        display = decode_display_at(ds, target)
        assert not display.grid.reduced
        np.testing.assert_array_equal(display.image, full)


def test_a_broken_codestream_gets_the_full_decoders_error(chest_cr_j2k: Path) -> None:
    ds = dcmread(chest_cr_j2k)
    frame = _first_frame(ds)
    ds.PixelData = encapsulate([frame[: len(frame) // 3]])
    with pytest.raises(PixelDecodeError) as caught:
        decode_display_at(ds, TARGET)
    with pytest.raises(PixelDecodeError) as direct:
        decode_display(ds)
    assert str(caught.value) == str(direct.value)


# --------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("offset", [0.0, 1.5])
def test_grid_maps_points_and_crop_sides_both_ways(offset: float) -> None:
    grid = SourceGrid((1955, 1841), scale=4, offset=offset)
    # display pixel 0's centre (0.5, 0.5) is at source index `offset`, i.e. offset + 0.5
    np.testing.assert_allclose(grid.points_to_source(np.array([[0.5, 0.5]])), [[offset + 0.5] * 2])
    points = np.array([[10.25, 3.0], [460.0, 488.75]])
    np.testing.assert_allclose(grid.points_to_display(grid.points_to_source(points)), points)
    start, stop = grid.source_span(2, 5, axis=0)
    if offset == 1.5:  # DCT blocks: display pixels 2..4 are source rows 8..19
        assert (start, stop) == (8, 20)
    else:  # low-pass band: display pixel u covers source rows 4u-2 .. 4u+1
        assert (start, stop) == (6, 18)
    assert grid.source_span(0, 489, axis=0) == (0, 1955)  # clipped to the source


def test_lung_map_on_the_source_grid_matches_the_full_size_one() -> None:
    """The same film at full size and reduced by 2: the lung mask mapped back onto the
    source grid agrees with the full-size one."""
    rng = np.random.default_rng(0)
    full = np.full((1955, 1841), 20, np.uint8)  # dark borders that preprocessing crops
    full[150:1850, 120:1760] = 180 + rng.integers(0, 20, (1700, 1640), dtype=np.uint8)
    params = PreprocessParams(size=224)
    lung_map = np.zeros((224, 224), np.uint8)
    cv2.ellipse(lung_map, (70, 112), (30, 70), 0, 0, 360, 255, -1)
    cv2.ellipse(lung_map, (154, 112), (30, 70), 0, 0, 360, 255, -1)
    expected = lung_mask(lung_map_on_image(lung_map, preprocess_geometry(full, params)))
    for offset in (0.0, 0.5):
        grid = SourceGrid(full.shape, scale=2, offset=offset)
        reduced = cv2.resize(full, (921, 978), interpolation=cv2.INTER_AREA)
        got = lung_mask(lung_map_on_image(lung_map, preprocess_geometry(reduced, params), grid))
        assert got.shape == full.shape
        iou = (got & expected).sum() / (got | expected).sum()
        assert iou > 0.98


# --------------------------------------------------------------------------- pipeline


def _outlines(sr: Dataset) -> list[np.ndarray]:
    found: list[np.ndarray] = []

    def walk(items: list[Dataset]) -> None:
        for item in items:
            if item.get("ValueType") == "SCOORD":
                found.append(np.asarray(item.GraphicData, dtype=np.float64).reshape(-1, 2))
            walk(list(item.get("ContentSequence", [])))

    walk(list(sr.ContentSequence))
    return found


def _run(tmp_path: Path, source: Path, decode_at_size: bool) -> tuple[float, Dataset, Dataset]:
    node = runtime(tmp_path / str(decode_at_size), DEFAULT_BUNDLE, decode_at_size)
    job_id = receive(node, source, "PAT1")
    request = steps.prepare(node, job_id)
    assert isinstance(request, InferRequest), request
    bundle, ensemble = get_ensemble(DEFAULT_BUNDLE)
    result = run_infer(request, ensemble, bundle)
    assert isinstance(result, InferResult), result
    steps.finalize(node, result)
    sr = dcmread(node.result_path(job_id, OutputKind.SR))
    seg = dcmread(node.result_path(job_id, OutputKind.SEG))
    assert node.result_path(job_id, OutputKind.SC).exists()
    return result.probability, sr, seg


@pytest.fixture(scope="module")
def full_and_reduced(
    tmp_path_factory: pytest.TempPathFactory, chest_cr_j2k: Path
) -> Iterator[tuple[tuple[float, Dataset, Dataset], tuple[float, Dataset, Dataset]]]:
    tmp = tmp_path_factory.mktemp("decode-at-size")
    yield _run(tmp, chest_cr_j2k, False), _run(tmp, chest_cr_j2k, True)


def _distances(reference: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Distance of each of `points` to the closed polyline `reference` (source pixels)."""
    contour = reference.astype(np.float32).reshape(-1, 1, 2)
    return np.array(
        [abs(cv2.pointPolygonTest(contour, (float(x), float(y)), True)) for x, y in points]
    )


def test_pipeline_keeps_seg_and_outline_on_the_source_grid(
    full_and_reduced: tuple[tuple[float, Dataset, Dataset], tuple[float, Dataset, Dataset]],
    chest_cr_j2k: Path,
) -> None:
    """RG1_J2KR through prepare -> run_infer -> finalize with models/default, decoded in full
    and at half size. The model sees a slightly different input, so its lung map differs a
    little too (measured: mask IoU 0.996, outline points 1.4 px from the full run's at the
    median, 10 px at most; score change 0.010)."""
    (p_full, sr_full, seg_full), (p_reduced, sr_reduced, seg_reduced) = full_and_reduced
    source = dcmread(chest_cr_j2k, stop_before_pixels=True)
    assert (seg_reduced.Rows, seg_reduced.Columns) == (source.Rows, source.Columns)
    mask_full = seg_full.pixel_array.astype(bool)
    mask_reduced = seg_reduced.pixel_array.astype(bool)
    assert mask_reduced.shape == mask_full.shape == (source.Rows, source.Columns)
    assert (mask_full & mask_reduced).sum() / (mask_full | mask_reduced).sum() > 0.99

    full, reduced = _outlines(sr_full), _outlines(sr_reduced)
    assert len(reduced) == len(full) == 2
    for a, b in zip(full, reduced, strict=True):
        assert b[:, 0].min() >= 0 and b[:, 0].max() <= source.Columns
        assert b[:, 1].min() >= 0 and b[:, 1].max() <= source.Rows
        distances = _distances(a, b)
        assert np.median(distances) < 2.0 and distances.max() < 15.0
    assert abs(p_reduced - p_full) < 0.03


def test_the_same_lung_map_lands_on_the_same_source_pixels(chest_cr_j2k: Path) -> None:
    """The geometry alone: one lung map (the worker's, from the full-size image) placed via
    the full-size and via the half-size display image gives the same outline within the
    outline's simplification (about 2.7 px on this image)."""
    bundle, ensemble = get_ensemble(DEFAULT_BUNDLE)
    manifest = bundle.manifest
    ds = dcmread(chest_cr_j2k)
    full = Display.full(decode_display(ds))
    reduced = decode_display_at(ds, TargetSize.for_bundle(manifest, 1024))
    assert reduced.grid.scale == 2
    request = steps.infer_request("job", full.image, bundle)
    result = run_infer(request, ensemble, bundle)
    assert isinstance(result, InferResult), result
    header = dcmread(chest_cr_j2k, stop_before_pixels=True)
    a = steps.locate_lungs(steps.Source(header, full), result, manifest.preprocessing)
    b = steps.locate_lungs(steps.Source(header, reduced), result, manifest.preprocessing)
    assert a.mask is not None and b.mask is not None and b.mask.shape == a.mask.shape
    assert (a.mask & b.mask).sum() / (a.mask | b.mask).sum() > 0.99
    assert len(a.outlines) == len(b.outlines) == 2
    for outline_a, outline_b in zip(a.outlines, b.outlines, strict=True):
        distances = _distances(outline_a, outline_b)
        assert np.median(distances) < 1.5 and distances.max() < 6.0


def test_gate_judges_the_received_size_not_the_reduced_one(chest_cr_j2k: Path) -> None:
    from worker.bundle import SanityThresholds
    from worker.gate import sanity_signals

    display = decode_display_at(dcmread(chest_cr_j2k), TARGET)
    assert display.grid.reduced
    t = SanityThresholds(min_side=1000)  # the source's 1841 passes, the reduced 921 would not
    signals = {
        s.name: s for s in sanity_signals(display.image, t, source_shape=display.grid.source_shape)
    }
    assert signals["min_side"].score == 1841 and signals["min_side"].passed
    assert not {s.name: s for s in sanity_signals(display.image, t)}["min_side"].passed


def test_display_full_is_the_identity_grid() -> None:
    display = Display.full(np.zeros((30, 40), np.uint8))
    assert display.grid == SourceGrid((30, 40)) and not display.grid.reduced
    np.testing.assert_array_equal(display.grid.to_source(), [[1, 0, 0], [0, 1, 0]])


def test_the_worker_start_sets_openjpeg_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """CXR_DECODE_THREADS reaches OpenJPEG through OPJ_NUM_THREADS, set at the process start."""
    monkeypatch.setenv("OPJ_NUM_THREADS", "1")  # restored after the test
    configure_libraries(decode_threads=Settings(decode_threads=3).decode_threads)
    assert os.environ["OPJ_NUM_THREADS"] == "3"
