"""The preprocessed-image cache: decode and preprocess every image once, store it compactly.

One `.npz` file (no pickles): each image is the output of `worker.preprocess.preprocess` at the
configured size, stored as JPEG or PNG bytes; lung masks go through the same crop, pad and
resize (`preprocess_mask`, nearest, 127 = ignore kept) and are stored as PNG; the records and
the preprocessing parameters are stored as JSON. Optionally a "raw" variant (pad to square and
resize only: no crop, no CLAHE) for the without-preprocessing ablation goes into a sibling file
`<name>-raw.npz`, so that the main file can travel alone.

The files are self-contained: training on another machine needs the cache, not the images.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from training.data import DataError, Record, read_display_image, read_mask
from training.progress import progress
from worker.atomic import atomic_file
from worker.preprocess import PreprocessParams, pad_square, preprocess, preprocess_mask

CACHE_FORMAT = 1


@dataclass
class Cache:
    """Everything training needs, in memory: uint8 images [N,S,S] and aligned lung masks."""

    records: list[Record]
    params: PreprocessParams
    images: np.ndarray  # uint8 [N,S,S], preprocessed
    masks: dict[int, np.ndarray]  # row -> uint8 [S,S] in {0,127,255}
    weak_masks: dict[int, np.ndarray]
    raw: np.ndarray | None = None  # uint8 [N,S,S], pad + resize only
    info: dict[str, object] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def ids(self) -> list[str]:
        return [r.id for r in self.records]

    def rows(self, ids: Sequence[str]) -> np.ndarray:
        where = {rid: i for i, rid in enumerate(self.ids)}
        missing = [rid for rid in ids if rid not in where]
        if missing:
            raise KeyError(f"{len(missing)} ids not in the cache, e.g. {missing[:3]}")
        return np.array([where[rid] for rid in ids], dtype=np.int64)

    @property
    def labels(self) -> np.ndarray:
        return np.array([int(r.label) for r in self.records], dtype=np.int64)


def cache_key(
    records: Sequence[Record], params: PreprocessParams, encoding: str, quality: int, raw: bool
) -> str:
    """Identifies what a cache holds: a cache with another key must be rebuilt."""
    payload = json.dumps(
        {
            "format": CACHE_FORMAT,
            "records": [r.model_dump(mode="json") for r in records],
            "params": params.model_dump(mode="json"),
            "encoding": encoding,
            "quality": quality if encoding == "jpeg" else None,
            "raw": raw,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def raw_path(path: Path) -> Path:
    """The sibling file of the un-preprocessed ablation variant."""
    path = Path(path)
    return path.with_name(f"{path.stem}-raw.npz")


def raw_square(image: np.ndarray, size: int) -> np.ndarray:
    """The ablation's "no preprocessing" input: pad to square and resize; no crop, no CLAHE."""
    square = pad_square(image)
    interpolation = cv2.INTER_AREA if square.shape[0] > size else cv2.INTER_LINEAR
    return cv2.resize(square, (size, size), interpolation=interpolation)


def _encode(image: np.ndarray, encoding: str, quality: int) -> bytes:
    if encoding == "jpeg":
        ok, buf = cv2.imencode(
            ".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality, cv2.IMWRITE_JPEG_OPTIMIZE, 1]
        )
    else:
        ok, buf = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    if not ok:  # pragma: no cover - cv2 fails only on unsupported dtypes
        raise ValueError(f"{encoding} encoding failed")
    return buf.tobytes()


def _decode(data: bytes) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise DataError("corrupt image in the cache")
    return image


@dataclass
class _Encoded:
    image: bytes
    raw: bytes | None
    mask: bytes | None
    weak: bytes | None


def _prepare(
    record: Record, params: PreprocessParams, encoding: str, quality: int, raw: bool
) -> _Encoded | str:
    """One record -> encoded cache entries, or the reason it cannot be used."""
    try:
        display = read_display_image(record.image)
        image = preprocess(display, params)
        masks: list[bytes | None] = []
        for path in (record.lung_mask, record.lung_mask_weak):
            if path is None:
                masks.append(None)
                continue
            mask = preprocess_mask(read_mask(path, display.shape), display, params)
            masks.append(_encode(mask, "png", 0))
        raw_bytes = _encode(raw_square(display, params.size), encoding, quality) if raw else None
        return _Encoded(_encode(image, encoding, quality), raw_bytes, masks[0], masks[1])
    except (DataError, ValueError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"


def _prepare_star(args: tuple[Record, PreprocessParams, str, int, bool]) -> _Encoded | str:
    return _prepare(*args)


def _pack(blobs: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(b) for b in blobs])
    data = np.frombuffer(b"".join(blobs), dtype=np.uint8) if blobs else np.zeros(0, np.uint8)
    return data, offsets


def _unpack(data: np.ndarray, offsets: np.ndarray) -> Iterator[bytes]:
    buf = data.tobytes()
    for i in range(len(offsets) - 1):
        yield buf[offsets[i] : offsets[i + 1]]


def build_cache(
    records: Sequence[Record],
    params: PreprocessParams,
    out: Path,
    *,
    encoding: str = "jpeg",
    quality: int = 90,
    raw: bool = True,
    workers: int = 0,
    extra_info: dict[str, object] | None = None,
) -> tuple[Path, Counter[str]]:
    """Preprocess `records` into the cache file `out`; return it and the reasons for skips."""
    import os

    workers = workers or os.cpu_count() or 1
    jobs = [(r, params, encoding, quality, raw) for r in records]
    results: list[_Encoded | str]
    if workers == 1 or len(jobs) < 32:
        results = [_prepare_star(job) for job in progress(jobs, "cache")]
    else:
        with ProcessPoolExecutor(workers) as pool:
            done = pool.map(_prepare_star, jobs, chunksize=8)
            results = list(progress(done, "cache", total=len(jobs)))
    kept: list[Record] = []
    encoded: list[_Encoded] = []
    skipped: Counter[str] = Counter()
    for record, result in zip(records, results, strict=True):
        if isinstance(result, str):
            skipped[result.split(":")[0]] += 1
            continue
        kept.append(record)
        encoded.append(result)
    if not kept:
        raise DataError(f"no image could be cached ({dict(skipped)})")
    arrays: dict[str, np.ndarray] = {}
    arrays["images_data"], arrays["images_offsets"] = _pack([e.image for e in encoded])
    for name, attr in (("masks", "mask"), ("weak", "weak")):
        rows = [i for i, e in enumerate(encoded) if getattr(e, attr) is not None]
        arrays[f"{name}_rows"] = np.array(rows, dtype=np.int64)
        arrays[f"{name}_data"], arrays[f"{name}_offsets"] = _pack(
            [getattr(encoded[i], attr) for i in rows]
        )
    meta = {
        "format": CACHE_FORMAT,
        "key": cache_key(kept, params, encoding, quality, raw),
        "requested_key": cache_key(records, params, encoding, quality, raw),
        "params": params.model_dump(mode="json"),
        "encoding": encoding,
        "quality": quality,
        "records": [r.model_dump(mode="json") for r in kept],
        "skipped": dict(skipped),
        **(extra_info or {}),
    }
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    raw_file = raw_path(out)
    raw_file.unlink(missing_ok=True)
    if raw:
        raw_data, raw_offsets = _pack([e.raw or b"" for e in encoded])
        key = np.frombuffer(str(meta["key"]).encode(), dtype=np.uint8)
        _save(raw_file, {"raw_data": raw_data, "raw_offsets": raw_offsets, "key": key})
    _save(out, arrays)
    return out, skipped


def _save(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with atomic_file(path) as fh:
        np.savez(fh, allow_pickle=False, **arrays)  # the payload is already compressed


def read_cache_meta(path: Path) -> dict[str, object]:
    with np.load(path) as npz:
        meta: dict[str, object] = json.loads(npz["meta"].tobytes())
    return meta


def load_cache(path: Path) -> Cache:
    """Read and decode a cache file into memory."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no cache at {path} (run `cxr-train cache`)")
    with np.load(path) as npz:
        meta = json.loads(npz["meta"].tobytes())
        if meta.get("format") != CACHE_FORMAT:
            raise DataError(f"{path}: cache format {meta.get('format')} is not {CACHE_FORMAT}")
        params = PreprocessParams.model_validate(meta["params"])
        images = np.stack([_decode(b) for b in _unpack(npz["images_data"], npz["images_offsets"])])
        masks: list[dict[int, np.ndarray]] = []
        for name in ("masks", "weak"):
            rows = npz[f"{name}_rows"].tolist()
            blobs = _unpack(npz[f"{name}_data"], npz[f"{name}_offsets"])
            masks.append({int(r): _decode(b) for r, b in zip(rows, blobs, strict=True)})
    raw = None
    if raw_path(path).is_file():
        with np.load(raw_path(path)) as npz:
            if npz["key"].tobytes().decode() != meta["key"]:
                raise DataError(f"{raw_path(path)} belongs to another cache than {path}")
            raw = np.stack([_decode(b) for b in _unpack(npz["raw_data"], npz["raw_offsets"])])
    records = [Record.model_validate(r) for r in meta.pop("records")]
    if images.shape[1:] != (params.size, params.size) or len(images) != len(records):
        raise DataError(f"{path}: images {images.shape} do not match {len(records)} records")
    return Cache(records, params, images, masks[0], masks[1], raw, meta)
