"""dicom_node.results.pixels: real chest CRs (pydicom-data, public pool) and synthetic datasets."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.sequence import Sequence
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

from dicom_node.results.pixels import (
    DecodeFailure,
    PixelDecodeError,
    decode_display,
    describe_pixels,
)

# --- real chest CR: NEMA WG04 RG1 (1955 x 1841, MONOCHROME1, 15 bit) --------------------------


@pytest.fixture(scope="module")
def rg1_display(chest_cr: Path) -> np.ndarray:
    return decode_display(pydicom.dcmread(chest_cr))


@pytest.fixture(scope="module")
def rg1_j2k_display(chest_cr_j2k: Path) -> np.ndarray:
    return decode_display(pydicom.dcmread(chest_cr_j2k))


def test_chest_cr_decodes_to_uint8_image(rg1_display: np.ndarray) -> None:
    assert rg1_display.shape == (1955, 1841)
    assert rg1_display.dtype == np.uint8
    assert int(rg1_display.max()) - int(rg1_display.min()) > 150  # uses the display range


def test_jpeg2000_and_uncompressed_give_nearly_the_same_image(
    rg1_display: np.ndarray, rg1_j2k_display: np.ndarray
) -> None:
    # The two WG04 files are not bit-identical (stored minima 803 vs 874), so allow a little.
    diff = np.abs(rg1_display.astype(np.int16) - rg1_j2k_display.astype(np.int16))
    assert rg1_j2k_display.shape == rg1_display.shape
    assert diff.mean() < 1.0
    assert np.percentile(diff, 99.9) <= 2


def test_monochrome1_is_inverted_so_lungs_are_dark(rg1_display: np.ndarray) -> None:
    image = rg1_display.astype(np.float64)
    h, w = image.shape
    band = slice(int(0.25 * h), int(0.60 * h))  # lung fields, above the diaphragm
    mediastinum = image[band, int(0.45 * w) : int(0.55 * w)].mean()
    right_lung = image[band, int(0.15 * w) : int(0.35 * w)].mean()
    left_lung = image[band, int(0.65 * w) : int(0.85 * w)].mean()
    # Measured: mediastinum ~222, lungs ~161 and ~151; without the inversion it is reversed.
    assert mediastinum > right_lung + 30
    assert mediastinum > left_lung + 30


def test_truncated_jpeg2000_raises_naming_the_transfer_syntax(chest_cr_j2k: Path) -> None:
    ds = pydicom.dcmread(chest_cr_j2k)
    codestream = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([codestream[: len(codestream) // 2]])
    with pytest.raises(PixelDecodeError, match="JPEG 2000") as info:
        decode_display(ds)
    assert info.value.reason is DecodeFailure.DECODER_FAILURE


def test_describe_pixels_reports_image_attributes_only(chest_cr_j2k: Path) -> None:
    ds = pydicom.dcmread(chest_cr_j2k)
    ds.PatientName = "Test^Patient"
    ds.PatientID = "PID-4711"
    summary = describe_pixels(ds)
    assert summary["rows"] == 1955
    assert summary["cols"] == 1841
    assert summary["bits_stored"] == 15
    assert summary["photometric"] == "MONOCHROME1"
    assert summary["transfer_syntax"] == JPEG2000Lossless
    assert summary["transfer_syntax_name"] == "JPEG 2000 Image Compression (Lossless Only)"
    assert summary["voi"] == "window"
    assert "Test^Patient" not in repr(summary)
    assert "PID-4711" not in repr(summary)


# --- every transfer syntax, on pydicom's own documented test files (data/test_files/README) -----


def pydicom_file(name: str) -> Dataset:
    path = get_testdata_file(name)
    assert isinstance(path, str), f"{name} is not among pydicom's test files"
    return pydicom.dcmread(path)


@pytest.mark.parametrize(
    ("reference", "encoded", "tolerance"),
    [
        ("MR_small.dcm", "MR_small_RLE.dcm", 0),
        ("MR_small.dcm", "MR_small_jpeg_ls_lossless.dcm", 0),
        ("MR_small.dcm", "MR_small_jp2klossless.dcm", 0),
        ("MR_small.dcm", "MR_small_bigendian.dcm", 0),
        ("MR_small.dcm", "MR_small_implicit.dcm", 0),
        ("emri_small.dcm", "emri_small_jpeg_2k_lossless.dcm", 0),  # multi-frame
        ("SC_rgb.dcm", "SC_rgb_jpeg_gdcm.dcm", 0),  # JPEG lossless, RGB
        ("SC_rgb.dcm", "SC_rgb_rle.dcm", 0),
        ("US1_UNCR.dcm", "US1_J2KR.dcm", 0),  # JPEG 2000, YBR_RCT
        ("SC_rgb.dcm", "SC_rgb_jpeg_dcmtk.dcm", 2),  # JPEG baseline, YBR_FULL
        # JPEG baseline, YBR_FULL_422: the subsampled chroma blurs the colour-bar edges.
        ("SC_rgb.dcm", "SC_rgb_dcmtk_+eb+cy+np.dcm", 10),
    ],
)
def test_compressed_files_decode_like_their_uncompressed_originals(
    reference: str, encoded: str, tolerance: int
) -> None:
    expected = decode_display(pydicom_file(reference))
    got = decode_display(pydicom_file(encoded))
    assert got.shape == expected.shape
    assert np.abs(got.astype(np.int16) - expected).max() <= tolerance


def test_jpeg_extended_12_bit_decodes() -> None:
    image = decode_display(pydicom_file("JPGExtended.dcm"))
    assert image.shape == (1024, 256)
    assert int(image.max()) - int(image.min()) > 100


def test_malformed_real_jpeg_raises_naming_the_transfer_syntax() -> None:
    # pydicom's JPEG-lossy.dcm has a codestream no decoder accepts (JPGExtended.dcm is its fix).
    with pytest.raises(PixelDecodeError, match=r"JPEG Extended \(Process 2 and 4\)"):
        decode_display(pydicom_file("JPEG-lossy.dcm"))


# --- synthetic datasets ---------------------------------------------------------------------


def make_dataset(
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 16,
    signed: bool = False,
    **attributes: object,
) -> Dataset:
    """A minimal CR-like dataset holding `pixels` (uint16/int16 or uint8 RGB) uncompressed."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    colour = pixels.ndim == 3 and photometric not in ("MONOCHROME1", "MONOCHROME2")
    frames = pixels.shape[0] if pixels.ndim == 3 and not colour else 1
    ds.Rows, ds.Columns = pixels.shape[-3:-1] if colour else pixels.shape[-2:]
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.SamplesPerPixel = 3 if colour else 1
    if colour:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.PixelData = np.ascontiguousarray(pixels).astype(pixels.dtype.newbyteorder("<")).tobytes()
    return ds


def ramp(rows: int = 16, cols: int = 64, top: int = 4095) -> np.ndarray:
    """uint16 image whose values rise left to right from 0 to `top`."""
    row = np.linspace(0, top, cols).round().astype(np.uint16)
    return np.tile(row, (rows, 1))


def row_of(values: list[int], dtype: type[np.integer] = np.uint16) -> np.ndarray:
    return np.array([values], dtype=dtype)


def test_monochrome1_maps_the_largest_stored_value_to_black() -> None:
    pixels = ramp()
    mono2 = decode_display(make_dataset(pixels, "MONOCHROME2", bits_stored=12))
    mono1 = decode_display(make_dataset(pixels, "MONOCHROME1", bits_stored=12))
    assert mono1[0, -1] == 0
    assert mono1[0, 0] == 255
    np.testing.assert_array_equal(mono1, 255 - mono2)


@pytest.mark.parametrize(
    ("function", "expected"),
    [
        # C = 1000, W = 200. LINEAR: x <= 900 -> 0, x > 1099 -> 255, else linear over 199.
        ("LINEAR", [0, 0, 1, 128, 254, 255, 255]),
        # LINEAR_EXACT: x <= 900 -> 0, x > 1100 -> 255, else linear over 200.
        ("LINEAR_EXACT", [0, 0, 1, 128, 252, 255, 255]),
        # SIGMOID: 255 / (1 + exp(-4 (x - C) / W)): no hard edges.
        ("SIGMOID", [0, 30, 31, 128, 224, 225, 255]),
    ],
)
def test_window_center_width_with_voi_lut_function(function: str, expected: list[int]) -> None:
    values = [0, 900, 901, 1000, 1098, 1101, 4000]
    ds = make_dataset(row_of(values), WindowCenter=1000, WindowWidth=200, VOILUTFunction=function)
    assert decode_display(ds)[0].tolist() == expected


def test_window_below_is_black_above_is_white() -> None:
    ds = make_dataset(ramp(), bits_stored=12, WindowCenter=2048, WindowWidth=1024)
    image = decode_display(ds)
    values = ramp()[0]
    assert (image[0][values < 1536] == 0).all()
    assert (image[0][values > 2560] == 255).all()
    assert 0 < image[0, 32] < 255


def test_multivalued_window_uses_the_first_pair() -> None:
    values = [0, 900, 1000, 1100, 4000]
    first = decode_display(make_dataset(row_of(values), WindowCenter=1000, WindowWidth=200))
    both = decode_display(
        make_dataset(row_of(values), WindowCenter=[1000, 3000], WindowWidth=[200, 2000])
    )
    np.testing.assert_array_equal(both, first)


def test_unusable_window_falls_back_to_percentiles() -> None:
    pixels = ramp()
    plain = decode_display(make_dataset(pixels, bits_stored=12))
    bad = decode_display(make_dataset(pixels, bits_stored=12, WindowCenter=100, WindowWidth=0))
    np.testing.assert_array_equal(bad, plain)


def voi_lut(table: list[int], first_mapped: int, bits: int) -> Sequence:
    item = Dataset()
    item.LUTDescriptor = [len(table), first_mapped, bits]
    item.LUTData = table
    item["LUTData"].VR = "US"
    return Sequence([item])


def test_voi_lut_sequence_takes_precedence_over_the_window() -> None:
    # A step LUT over 0..4095 that the window (which would make everything white) cannot mimic.
    table = [0] * 2048 + [4095] * 2048
    values = [0, 2047, 2048, 4095]
    ds = make_dataset(
        row_of(values),
        bits_stored=12,
        WindowCenter=10,
        WindowWidth=2,
        VOILUTSequence=voi_lut(table, 0, 12),
    )
    assert describe_pixels(ds)["voi"] == "voi_lut"
    assert decode_display(ds)[0].tolist() == [0, 0, 255, 255]


def test_8_bit_voi_lut_with_more_than_256_entries() -> None:
    # pydicom 3.0.2's apply_voi indexes with the LUT's uint8 dtype and wraps index 256 to 0.
    table = [i // 16 for i in range(4096)]
    values = [0, 255, 256, 1000, 4095]
    ds = make_dataset(row_of(values), bits_stored=12, VOILUTSequence=voi_lut(table, 0, 8))
    assert decode_display(ds)[0].tolist() == [0, 15, 16, 62, 255]


def test_voi_lut_clamps_inputs_outside_its_range() -> None:
    # First mapped value 100: inputs below take the first entry, beyond the end the last.
    table = list(range(0, 1000, 10))  # 100 entries, 0..990
    ds = make_dataset(row_of([0, 100, 150, 199, 3000]), VOILUTSequence=voi_lut(table, 100, 16))
    assert decode_display(ds)[0].tolist() == [0, 0, 129, 255, 255]


def test_voi_lut_for_signed_data_with_first_mapped_read_as_unsigned() -> None:
    # The descriptor's 2nd value is SS for signed input; read as US, -2048 arrives as 63488.
    values = row_of([-2048, -1, 0, 2047], dtype=np.int16)
    lut = voi_lut(list(range(4096)), 2**16 - 2048, 12)
    ds = make_dataset(values, bits_stored=12, signed=True, VOILUTSequence=lut)
    assert decode_display(ds)[0].tolist() == [0, 127, 128, 255]


def test_malformed_voi_lut_falls_back_to_the_window() -> None:
    lut = voi_lut([0, 4095], 0, 12)
    del lut[0].LUTData
    ds = make_dataset(
        row_of([0, 2048, 4095]),
        bits_stored=12,
        VOILUTSequence=lut,
        WindowCenter=2048,
        WindowWidth=4096,
        VOILUTFunction="LINEAR_EXACT",
    )
    assert describe_pixels(ds)["voi"] == "window"
    assert decode_display(ds)[0].tolist() == [0, 128, 255]


def test_rescale_is_applied_before_the_window() -> None:
    # Stored 50 -> 2 * 50 - 100 = 0, the window centre; without the rescale 50 would be white.
    ds = make_dataset(
        row_of([0, 50, 100]),
        RescaleSlope=2,
        RescaleIntercept=-100,
        WindowCenter=0,
        WindowWidth=10,
        VOILUTFunction="LINEAR_EXACT",
    )
    assert decode_display(ds)[0].tolist() == [0, 128, 255]


def test_modality_lut_sequence_is_applied_before_the_window() -> None:
    item = Dataset()
    item.LUTDescriptor = [4, 0, 16]
    item.LUTData = [1000, 0, 500, 2000]  # deliberately not monotonic
    item["LUTData"].VR = "US"
    item.ModalityLUTType = "US"
    ds = make_dataset(
        row_of([0, 1, 2, 3]),
        ModalityLUTSequence=Sequence([item]),
        WindowCenter=1000,
        WindowWidth=1000,
        VOILUTFunction="LINEAR_EXACT",
    )
    assert decode_display(ds)[0].tolist() == [128, 0, 0, 255]


def test_garbage_in_the_unused_high_bits_is_masked() -> None:
    rng = np.random.default_rng(0)
    clean = rng.integers(0, 4096, size=(32, 32), dtype=np.uint16)
    garbage = rng.integers(0, 16, size=clean.shape, dtype=np.uint16) << 12
    dirty = clean | garbage
    assert (dirty != clean).mean() > 0.5
    windows: list[dict[str, Any]] = [{}, {"WindowCenter": 2048, "WindowWidth": 4096}]
    for window in windows:
        expected = decode_display(make_dataset(clean, bits_stored=12, **window))
        got = decode_display(make_dataset(dirty, bits_stored=12, **window))
        np.testing.assert_array_equal(got, expected)


def test_signed_12_bit_values_are_sign_extended() -> None:
    values = np.array([[-2048, -1, 0, 2047]], dtype=np.int16)
    unextended = (values.view(np.uint16) & 0x0FFF).view(np.int16)  # high bits left at zero
    window: dict[str, Any] = {
        "WindowCenter": 0,
        "WindowWidth": 4096,
        "VOILUTFunction": "LINEAR_EXACT",
    }
    expected = decode_display(make_dataset(values, bits_stored=12, signed=True, **window))
    got = decode_display(make_dataset(unextended, bits_stored=12, signed=True, **window))
    assert expected[0].tolist() == [0, 127, 128, 255]
    np.testing.assert_array_equal(got, expected)


def test_rle_lossless_decodes_like_the_uncompressed_image() -> None:
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 4096, size=(48, 40), dtype=np.uint16)
    attributes: dict[str, Any] = {"WindowCenter": 2000, "WindowWidth": 3000}
    expected = decode_display(make_dataset(pixels, bits_stored=12, **attributes))
    ds = make_dataset(pixels, bits_stored=12, **attributes)
    ds.compress(RLELossless)
    assert ds.file_meta.TransferSyntaxUID == RLELossless
    np.testing.assert_array_equal(decode_display(ds), expected)


def test_multiframe_uses_the_first_frame() -> None:
    frames = np.stack([ramp(), ramp()[:, ::-1]])
    image = decode_display(make_dataset(frames, bits_stored=12))
    np.testing.assert_array_equal(image, decode_display(make_dataset(ramp(), bits_stored=12)))


def test_rgb_is_converted_to_gray() -> None:
    pixels = np.zeros((2, 3, 3), dtype=np.uint8)
    pixels[0, 0] = (255, 255, 255)
    pixels[0, 1] = (255, 0, 0)
    pixels[0, 2] = (0, 255, 0)
    pixels[1, 0] = (0, 0, 255)
    pixels[1, 1] = (100, 100, 100)
    image = decode_display(make_dataset(pixels, "RGB", bits_stored=8))
    assert image.shape == (2, 3)
    assert image.tolist() == [[255, 76, 150], [29, 100, 0]]


def test_percentiles_ignore_a_few_outliers() -> None:
    pixels = ramp(top=1000)
    pixels[0, :3] = 4095  # a few hot pixels must not compress the rest of the range
    image = decode_display(make_dataset(pixels, bits_stored=12))
    assert image[1:, -1].min() == 255
    assert image[1:, 0].max() == 0


def test_decode_leaves_the_dataset_unchanged() -> None:
    ds = make_dataset(ramp(), bits_stored=12, WindowCenter=2048, WindowWidth=4096)
    before = ds.to_json_dict()
    decode_display(ds)
    assert ds.to_json_dict() == before
    assert getattr(ds, "_pixel_array", None) is None


# --- errors ---------------------------------------------------------------------------------


def test_missing_pixel_data_raises() -> None:
    ds = make_dataset(ramp())
    del ds.PixelData
    with pytest.raises(PixelDecodeError, match="no pixel data") as info:
        decode_display(ds)
    assert info.value.reason is DecodeFailure.NO_PIXEL_DATA
    assert isinstance(info.value, ValueError)


def test_unsupported_photometric_raises() -> None:
    ds = make_dataset(ramp(), "PALETTE COLOR")
    with pytest.raises(PixelDecodeError, match="PALETTE COLOR") as info:
        decode_display(ds)
    assert info.value.reason is DecodeFailure.UNSUPPORTED_PHOTOMETRIC


def test_absurd_size_raises_before_decoding() -> None:
    ds = make_dataset(ramp())
    ds.Rows, ds.Columns = 60000, 60000  # the pixel data does not even match: never decoded
    with pytest.raises(PixelDecodeError, match="megapixels") as info:
        decode_display(ds)
    assert info.value.reason is DecodeFailure.TOO_LARGE
    with pytest.raises(PixelDecodeError, match="megapixels"):
        decode_display(make_dataset(ramp(16, 64)), max_pixels=1000)


def test_short_uncompressed_pixel_data_raises_a_decoder_failure() -> None:
    ds = make_dataset(ramp())
    ds.PixelData = ds.PixelData[:100]
    with pytest.raises(PixelDecodeError, match="Explicit VR Little Endian") as info:
        decode_display(ds)
    assert info.value.reason is DecodeFailure.DECODER_FAILURE


def test_malformed_modality_lut_raises() -> None:
    # Unlike a VOI LUT, a Modality LUT cannot be skipped: the values would mean something else.
    item = Dataset()
    item.LUTDescriptor = [4, 0]
    item.LUTData = [0, 1, 2, 3]
    ds = make_dataset(row_of([0, 1, 2, 3]), ModalityLUTSequence=Sequence([item]))
    with pytest.raises(PixelDecodeError, match="Modality LUT") as info:
        decode_display(ds)
    assert info.value.reason is DecodeFailure.BAD_ATTRIBUTES


def test_missing_transfer_syntax_raises() -> None:
    ds = make_dataset(ramp())
    del ds.file_meta.TransferSyntaxUID
    with pytest.raises(PixelDecodeError, match="Transfer Syntax") as info:
        decode_display(ds)
    assert info.value.reason is DecodeFailure.BAD_ATTRIBUTES


# --- public chest X-ray pool (../shared/cxr-data, or CXR_POOL_DIR) ------------------------------

POOL_FILES = [
    "pydicomdata__RG1_UNCI.dcm",
    "pydicomdata__RG1_J2KR.dcm",
    "rsna__c64d5667-a776-4f95-9e21-bfabafb07740.dcm",
    "highdicom__dx_image.dcm",
]


@pytest.mark.pool
@pytest.mark.parametrize("name", POOL_FILES)
def test_pool_dicom_files_decode(name: str, pool_dicom_files: list[Path]) -> None:
    paths = {path.name: path for path in pool_dicom_files}
    if name not in paths:
        pytest.skip(f"{name} is not in the pool's dicom/ folder")
    path = paths[name]
    with (path.parent / "index.csv").open(newline="") as f:
        row = next(r for r in csv.DictReader(f) if r["file"] == f"dicom/{name}")
    image = decode_display(pydicom.dcmread(path))
    assert image.dtype == np.uint8
    assert image.shape == (int(row["rows"]), int(row["cols"]))
    assert int(image.max()) - int(image.min()) > 100
