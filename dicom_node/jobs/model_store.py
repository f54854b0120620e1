"""Installed model bundles: `cxr-node models install | list | rollback`.

    data_dir/models/
        <version>-<fingerprint[:12]>/   one folder per installed bundle, never changed
        current  -> <folder>            the bundle in use (`Settings.bundle_in_use`)
        previous -> <folder>            what `rollback` returns to

A switch replaces the `current` symlink with os.replace, which is atomic: a process that
resolves the link sees the old bundle or the new one, never a half-copied folder. Processes
resolve it again before each job (`BundleCache`), so a switch takes effect on the next job
without a restart, while a job already preprocessed for the old bundle is finished with the
old one: the task carries the bundle's fingerprint and the result its device UID, and both
are looked up among the installed bundles.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from worker.bundle import MANIFEST_NAME, Bundle, BundleError, load_bundle

log = logging.getLogger(__name__)

CURRENT = "current"
PREVIOUS = "previous"


@dataclass(frozen=True)
class Installed:
    path: Path
    bundle: Bundle
    current: bool
    previous: bool


def compatible(new: Bundle, current: Bundle) -> list[str]:
    """Why `new` may not replace `current` (empty: it may)."""
    problems = []
    a, b = new.manifest, current.manifest
    if a.schema_version != b.schema_version:
        problems.append(f"schema version {a.schema_version} differs from {b.schema_version}")
    if a.class_map != b.class_map:
        problems.append(f"class map {a.class_map} differs from {b.class_map}")
    if a.device_uid == b.device_uid and new.fingerprint != current.fingerprint:
        problems.append(
            f"device UID {a.device_uid} is the current bundle's but the bundle differs: "
            "every model version needs its own device UID (it is in every SR)"
        )
    return problems


class ModelStore:
    def __init__(self, models_dir: Path) -> None:
        self.root = Path(models_dir)

    def _link(self, name: str) -> Path | None:
        link = self.root / name
        return link.resolve() if link.is_symlink() and link.exists() else None

    @property
    def current(self) -> Path | None:
        return self._link(CURRENT)

    @property
    def previous(self) -> Path | None:
        return self._link(PREVIOUS)

    def folders(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(
            p
            for p in self.root.iterdir()
            if p.is_dir() and not p.is_symlink() and (p / MANIFEST_NAME).is_file()
        )

    def installed(self) -> list[Installed]:
        current, previous = self.current, self.previous
        found = []
        for folder in self.folders():
            try:
                bundle = load_bundle(folder, verify_checksums=False)
            except BundleError as exc:
                log.warning("installed bundle %s is not usable: %s", folder.name, exc)
                continue
            found.append(
                Installed(folder, bundle, folder.resolve() == current, folder.resolve() == previous)
            )
        return found

    def _switch(self, name: str, target: Path) -> None:
        tmp = self.root / f".{name}.tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target.name)  # relative: the data folder can move
        os.replace(tmp, self.root / name)

    def install(
        self,
        source: Path,
        in_use: Path,
        smoke_test: Callable[[Bundle], object],
        activate: bool = True,
    ) -> Path:
        """Validate `source` (manifest, checksums, a smoke inference, compatibility with the
        bundle `in_use`), copy it into the store and make it current. Returns its folder."""
        new = load_bundle(source)  # manifest and every checksum
        current = load_bundle(in_use, verify_checksums=False)
        problems = compatible(new, current)
        if problems:
            raise BundleError("; ".join(problems))
        for other in self.installed():
            if (
                other.bundle.manifest.device_uid == new.manifest.device_uid
                and other.bundle.fingerprint != new.fingerprint
            ):
                raise BundleError(
                    f"device UID {new.manifest.device_uid} is already used by the installed "
                    f"bundle {other.path.name}"
                )
        smoke_test(new)
        self.root.mkdir(parents=True, exist_ok=True)
        if self.current is None and in_use.resolve() != source.resolve():
            # The first install also keeps the bundle in use until now, for rollback.
            self._switch(CURRENT, self._copy(current))
        target = self._copy(new)
        if activate and self.current != target.resolve():
            if self.current is not None:
                self._switch(PREVIOUS, self.current)
            self._switch(CURRENT, target)
        return target

    def _copy(self, bundle: Bundle) -> Path:
        manifest = bundle.manifest
        safe_version = "".join(c if c.isalnum() or c in "._-" else "_" for c in manifest.version)
        target = self.root / f"{safe_version}-{bundle.fingerprint[:12]}"
        if target.is_dir() and (target / MANIFEST_NAME).is_file():
            load_bundle(target)  # already there: check it is intact
            return target
        staging = self.root / f".{target.name}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(bundle.root, staging, symlinks=False)
        load_bundle(staging)  # the copy checks out before it is used
        os.replace(staging, target)
        return target

    def rollback(self) -> Path:
        """Make the previous bundle current again (and the current one previous)."""
        current, previous = self.current, self.previous
        if previous is None:
            raise BundleError("no previous bundle to roll back to")
        load_bundle(previous)
        self._switch(CURRENT, previous)
        if current is not None:
            self._switch(PREVIOUS, current)
        return previous

    def find(self, fingerprint: str | None = None, device_uid: str | None = None) -> Bundle | None:
        for folder in self.folders():
            try:
                bundle = load_bundle(folder, verify_checksums=False)
            except BundleError:
                continue
            if fingerprint is not None and bundle.fingerprint == fingerprint:
                return bundle
            if device_uid is not None and bundle.manifest.device_uid == device_uid:
                return bundle
        return None


class BundleCache:
    """The bundles one process uses: the one in use now (the link is resolved again on every
    call: a switch is seen on the next job) and older ones still finishing jobs."""

    def __init__(self, in_use: Callable[[], Path], store: ModelStore) -> None:
        self._in_use = in_use
        self._store = store
        self._loaded: dict[Path, Bundle] = {}
        self._lock = threading.Lock()

    def _load(self, folder: Path) -> Bundle:
        folder = folder.resolve()
        with self._lock:
            bundle = self._loaded.get(folder)
            if bundle is None:
                bundle = load_bundle(folder)
                self._loaded[folder] = bundle
                log.info(
                    "bundle %s %s loaded (device UID %s)%s",
                    bundle.manifest.name,
                    bundle.manifest.version,
                    bundle.manifest.device_uid,
                    " - RANDOM WEIGHTS, plumbing only" if bundle.manifest.random_weights else "",
                )
            return bundle

    def current(self) -> Bundle:
        return self._load(self._in_use())

    def by_fingerprint(self, fingerprint: str) -> Bundle:
        """The bundle a job was preprocessed for; the current one if it cannot be found."""
        current = self.current()
        if current.fingerprint == fingerprint:
            return current
        with self._lock:
            for bundle in self._loaded.values():
                if bundle.fingerprint == fingerprint:
                    return bundle
        found = self._store.find(fingerprint=fingerprint)
        return self._load(found.root) if found is not None else current

    def by_device_uid(self, device_uid: str) -> Bundle:
        """The bundle that produced a result; the current one if it cannot be found."""
        current = self.current()
        if current.manifest.device_uid == device_uid:
            return current
        with self._lock:
            for bundle in self._loaded.values():
                if bundle.manifest.device_uid == device_uid:
                    return bundle
        found = self._store.find(device_uid=device_uid)
        return self._load(found.root) if found is not None else current


def smoke_test(bundle: Bundle, onnx_threads: int = 0) -> dict[str, float]:
    """Run the bundle once, the way a worker and the node use it, on a synthetic chest-like
    image: preprocessing, segmentation, every member, and the reference index. Raises
    BundleError when an output is missing or out of range."""
    import numpy as np

    from dicom_node.results.reference_index import ReferenceIndex
    from worker.inference import Ensemble
    from worker.preprocess import preprocess

    size = 512
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    lungs = ((xx - 0.3) ** 2 / 0.02 + (yy - 0.5) ** 2 / 0.09 < 1) | (
        (xx - 0.7) ** 2 / 0.02 + (yy - 0.5) ** 2 / 0.09 < 1
    )
    image = np.where(lungs, 60, 190).astype(np.uint8)
    manifest = bundle.manifest
    try:
        prepared = preprocess(image, manifest.preprocessing)
        (prediction,) = Ensemble(bundle, intra_op_threads=onnx_threads).predict(prepared[None])
        similar = ReferenceIndex(bundle).query(prediction.embedding, manifest.index.k)
    except BundleError:
        raise
    except Exception as exc:
        raise BundleError(f"smoke inference failed: {type(exc).__name__}: {exc}") from exc
    problems = []
    if not 0.0 <= prediction.probability <= 1.0 or not np.isfinite(prediction.probability):
        problems.append(f"probability {prediction.probability} outside [0, 1]")
    if prediction.embedding.shape != (manifest.index.dim,):
        problems.append(f"embedding shape {prediction.embedding.shape} != ({manifest.index.dim},)")
    if not np.all(np.isfinite(prediction.embedding)):
        problems.append("embedding not finite")
    if prediction.lung_probability.shape != prepared.shape:
        problems.append(f"lung map shape {prediction.lung_probability.shape}")
    if manifest.index.count and not similar:
        problems.append("reference index returned nothing")
    if problems:
        raise BundleError("smoke inference: " + "; ".join(problems))
    return {"probability": prediction.probability, "similar": float(len(similar))}
