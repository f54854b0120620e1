"""Out-of-distribution images for the input gate, generated on the fly (never stored as a data
set): what a PACS may route to a chest X-ray node by mistake.

Families: scikit-image's sample photographs (`photo`), pydicom's and pydicom-data's test
files of other modalities and body parts (`dicom:CT`, `dicom:MR`, ...), rendered text pages
(`document`), synthetic blank / noise / gradient / checkerboard / tiny images (`synthetic`),
and, from the pool, chest films rotated by 90/180/270 degrees (`rotated`) or heavily cropped
(`cropped`) and the lateral views (`lateral`).

Every image is a 2-D uint8 display image, as the node has it after decoding. Each item is
assigned once to the calibration half or the report half (`OodItem.half`), alternating within
its family in a fixed order, so that the report is measured on images no design choice saw.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

log = logging.getLogger(__name__)

Half = Literal["calibration", "report"]


@dataclass(frozen=True)
class OodItem:
    family: str
    name: str
    image: np.ndarray  # uint8 [H,W]
    half: Half


def _gray(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.ndim == 3:
        image = image[..., :3]
        image = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)
    if image.dtype != np.uint8:
        lo, hi = float(image.min()), float(image.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        image = np.clip((image.astype(np.float64) - lo) * scale, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(image)


def photos() -> Iterator[tuple[str, np.ndarray]]:
    """scikit-image's bundled sample images (the package is BSD-3-Clause; each sample's source
    is named in its `skimage.data` docstring), gray, each also as its mirror image. Used in
    memory only, never stored."""
    from skimage import data

    names = [
        "astronaut", "brick", "camera", "cat", "cell", "checkerboard", "clock", "coffee",
        "coins", "colorwheel", "grass", "gravel", "horse", "hubble_deep_field",
        "immunohistochemistry", "logo", "microaneurysms", "moon", "page", "retina", "rocket",
        "text", "shepp_logan_phantom",
    ]  # fmt: skip
    for name in names:
        try:
            image = _gray(getattr(data, name)())
        except Exception as exc:  # a sample this skimage version lacks or cannot load
            log.info("skimage sample %s skipped: %s", name, exc)
            continue
        yield name, image
        yield f"{name}-mirrored", np.ascontiguousarray(image[:, ::-1])
    try:
        faces = data.lfw_subset()
    except Exception as exc:
        log.info("skimage lfw_subset skipped: %s", exc)
        return
    for i in range(0, min(len(faces), 40), 4):
        face = _gray(faces[i])
        yield f"lfw-face-{i}", cv2.resize(face, (200, 200), interpolation=cv2.INTER_CUBIC)


def _dicom_files() -> list[Path]:
    files: list[Path] = []
    try:
        import pydicom.data

        files += sorted(Path(pydicom.data.__file__).parent.glob("test_files/**/*.dcm"))
    except ImportError:  # pragma: no cover - pydicom is a node dependency
        pass
    try:
        import data_store  # pydicom-data

        files += sorted((Path(data_store.__file__).parent / "data").glob("*.dcm"))
    except ImportError:
        log.info("pydicom-data is not installed: its test files are not used")
    return files


#: Not images of anything (segmentations, dose grids), or chest radiographs.
_SKIP_MODALITIES = {"SEG", "RTDOSE", "RTPLAN", "RTSTRUCT", "SR", "ECG"}


def _is_chest(ds: object) -> bool:
    body = str(getattr(ds, "BodyPartExamined", "") or "").upper()
    return body in {"CHEST", "THORAX"}


def dicom_images() -> Iterator[tuple[str, str, np.ndarray]]:
    """(modality, file name, display image) of the installed DICOM test files that are not
    chest radiographs, decoded as the node decodes; the same picture in several transfer
    syntaxes counts once."""
    import pydicom

    from dicom_node.results.pixels import decode_display

    seen: list[np.ndarray] = []
    pydicom_log = logging.getLogger("pydicom")
    level = pydicom_log.level
    for path in _dicom_files():
        try:
            # test files that are broken on purpose: their decoder errors are not news
            pydicom_log.setLevel(logging.CRITICAL)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path, force=True)
                modality = str(ds.get("Modality", "") or "OT")
                if modality in _SKIP_MODALITIES or _is_chest(ds) or "PixelData" not in ds:
                    continue
                image = decode_display(ds)
        except Exception as exc:
            log.debug("%s: not decoded (%s)", path.name, type(exc).__name__)
            continue
        finally:
            pydicom_log.setLevel(level)
        thumb = _thumbnail(image)
        if any(float(thumb @ other) > 0.98 for other in seen):
            continue  # the same picture in another transfer syntax or lossy copy
        seen.append(thumb)
        yield modality, path.name, image


def _thumbnail(image: np.ndarray) -> np.ndarray:
    """32 x 32, zero mean, unit norm: two decodings of one picture correlate near 1."""
    small = cv2.resize(image, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float64).ravel()
    small -= small.mean()
    return small / max(float(np.linalg.norm(small)), 1e-9)


_WORDS = (
    "patient",
    "report",
    "findings",
    "impression",
    "the",
    "of",
    "and",
    "with",
    "no",
    "acute",
    "cardiopulmonary",
    "process",
    "history",
    "comparison",
    "technique",
    "invoice",
    "total",
    "page",
    "date",
    "signature",
    "dear",
    "sir",
    "please",
    "find",
    "attached",
    "lorem",
    "ipsum",
    "dolor",
    "sit",
    "amet",
    "table",
    "figure",
    "results",
    "method",
    "discussion",
)


def document(rng: np.random.Generator, index: int) -> np.ndarray:
    """A rendered text page: lines of words, sometimes a table, dark on light or inverted."""
    h = int(rng.integers(700, 1400))
    w = int(h * rng.uniform(0.65, 0.8)) if index % 3 else int(h * rng.uniform(1.2, 1.5))
    page = np.full((h, w), int(rng.integers(215, 256)), dtype=np.uint8)
    font = [cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_COMPLEX, cv2.FONT_HERSHEY_DUPLEX][index % 3]
    scale = float(rng.uniform(0.5, 1.2))
    step = int(36 * scale) + 8
    y = int(rng.integers(40, 90))
    margin = int(rng.integers(30, 80))
    while y < h - 40:
        x = margin
        if rng.random() < 0.08:
            y += step  # paragraph break
        while x < w - margin - 60:
            word = str(rng.choice(_WORDS))
            cv2.putText(page, word, (x, y), font, scale, int(rng.integers(0, 60)), 1, cv2.LINE_AA)
            x += int(len(word) * 19 * scale) + 14
        y += step
    if index % 4 == 1:  # a table
        top, left = h // 3, margin
        for r in range(7):
            cv2.line(page, (left, top + r * 40), (w - margin, top + r * 40), 40, 2)
        for c in range(5):
            x = left + c * (w - 2 * margin) // 4
            cv2.line(page, (x, top), (x, top + 240), 40, 2)
    if index % 5 == 2:
        page = 255 - page
    return page


def synthetic(rng: np.random.Generator) -> Iterator[tuple[str, np.ndarray]]:
    """Blank, noise, gradients, checkerboards, stripes and tiny images."""
    side = 512
    for level in (0, 1, 128, 254, 255):
        yield f"blank-{level}", np.full((side, side), level, np.uint8)
    yield "blank-with-dot", _dot(side)
    yield "noise-uniform", rng.integers(0, 256, (side, side), dtype=np.uint8)
    yield "noise-gaussian", np.clip(rng.normal(128, 40, (side, side)), 0, 255).astype(np.uint8)
    yield "noise-low-contrast", np.clip(rng.normal(128, 6, (side, side)), 0, 255).astype(np.uint8)
    salt = np.full((side, side), 128, np.uint8)
    salt[rng.random((side, side)) < 0.05] = 255
    salt[rng.random((side, side)) < 0.05] = 0
    yield "noise-salt-pepper", salt
    yield "noise-binary", (rng.random((side, 640)) < 0.5).astype(np.uint8) * 255
    blurred = cv2.GaussianBlur(rng.normal(128, 60, (side, side)).astype(np.float32), (0, 0), 8)
    yield "noise-smooth", _stretch(blurred)
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    yield "gradient-horizontal", np.tile(ramp, (side, 1)).astype(np.uint8)
    yield "gradient-vertical", np.tile(ramp[:, None], (1, side)).astype(np.uint8)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    radial = np.hypot(yy - side / 2, xx - side / 2)
    yield "gradient-radial", _stretch(-radial)
    yield "gradient-diagonal", _stretch(xx + yy)
    for cell in (8, 32, 128):
        board = ((yy // cell + xx // cell) % 2 * 255).astype(np.uint8)
        yield f"checkerboard-{cell}", board
    yield "stripes-vertical", ((xx // 16) % 2 * 255).astype(np.uint8)
    yield "stripes-sine", _stretch(np.sin(xx / 9.0) + np.sin(yy / 23.0))
    yield "circles", _stretch(np.sin(radial / 6.0))
    for n in (1, 2, 8, 16, 32, 64):
        yield f"tiny-{n}", rng.integers(0, 256, (n, n), dtype=np.uint8)
    yield "tiny-1-black", np.zeros((1, 1), np.uint8)
    yield "strip-1x512", rng.integers(0, 256, (1, 512), dtype=np.uint8)
    yield "strip-600x40", rng.integers(0, 256, (600, 40), dtype=np.uint8)


def _dot(side: int) -> np.ndarray:
    image = np.zeros((side, side), np.uint8)
    cv2.circle(image, (side // 2, side // 2), 6, 255, -1)
    return image


def _stretch(values: np.ndarray) -> np.ndarray:
    v = values.astype(np.float64)
    v = (v - v.min()) / max(float(v.max() - v.min()), 1e-9)
    stretched: np.ndarray = (v * 255).astype(np.uint8)
    return stretched


def rotations(image: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
    yield "rot90", np.ascontiguousarray(np.rot90(image, 1))
    yield "rot180", np.ascontiguousarray(np.rot90(image, 2))
    yield "rot270", np.ascontiguousarray(np.rot90(image, 3))


def crops(image: np.ndarray, rng: np.random.Generator) -> Iterator[tuple[str, np.ndarray]]:
    """Heavy crops: a quadrant, one lung's half, the centre, a random 30-40 % window."""
    h, w = image.shape
    yield "crop-quadrant", image[: h // 2, : w // 2]
    yield "crop-half", image[:, w // 2 :]
    yield "crop-centre", image[h // 3 : 2 * h // 3, w // 3 : 2 * w // 3]
    fh, fw = rng.uniform(0.3, 0.4, 2)
    ch, cw = max(1, int(h * fh)), max(1, int(w * fw))
    r, c = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    yield "crop-random", image[r : r + ch, c : c + cw]


def _assign(items: list[tuple[str, str, np.ndarray]]) -> list[OodItem]:
    """Alternate calibration / report within each family (in generation order)."""
    counts: dict[str, int] = {}
    out = []
    for family, name, image in items:
        i = counts.get(family, 0)
        counts[family] = i + 1
        half: Half = "calibration" if i % 2 == 0 else "report"
        out.append(OodItem(family, name, np.ascontiguousarray(image), half))
    return out


def generated_set(seed: int = 0, documents: int = 24) -> list[OodItem]:
    """Every family that needs no pool: photographs, DICOM test files, documents, synthetic."""
    rng = np.random.default_rng(seed)
    items: list[tuple[str, str, np.ndarray]] = []
    items += [("photo", name, image) for name, image in photos()]
    items += [(f"dicom:{mod}", name, image) for mod, name, image in dicom_images()]
    items += [("document", f"page-{i}", document(rng, i)) for i in range(documents)]
    items += [("synthetic", name, image) for name, image in synthetic(rng)]
    return _assign(items)


def chest_variants(
    calibration: Sequence[tuple[str, np.ndarray]],
    report: Sequence[tuple[str, np.ndarray]],
    seed: int = 0,
) -> list[OodItem]:
    """Rotated and cropped chest films: from `calibration` films (e.g. the pool's validation
    split) for the calibration half, from `report` films (the test split) for the report."""
    rng = np.random.default_rng(seed + 1)
    out: list[OodItem] = []
    halves: tuple[tuple[Sequence[tuple[str, np.ndarray]], Half], ...] = (
        (calibration, "calibration"),
        (report, "report"),
    )
    for films, half in halves:
        for film_id, image in films:
            for name, variant in rotations(image):
                out.append(OodItem("rotated", f"{film_id}:{name}", variant, half))
            for name, variant in crops(image, rng):
                out.append(OodItem("cropped", f"{film_id}:{name}", variant, half))
    return out
