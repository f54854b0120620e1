"""The hospital's own index (DESIGN.md, "a second index"): every image the node analysed, so
that an SR can point the radiologist to the most similar earlier studies of this hospital.

Lives in `CXR_DATA_DIR/hospital/`, on the node host only (finalize writes it; workers never
see it):

- `hospital.sqlite3`: the source of truth. Table `items`: one row per analysed image, with
  its UIDs, study date, AI probability, a keyed hash of the patient, the embedding space and
  the embedding itself. Table `diagnoses`: confirmed diagnoses per study
  (`cxr-node label STUDY_UID covid|negative`), kept apart so a label can be recorded before,
  after or without the study being in the index.
- `index-<space>.hnsw`: an hnswlib snapshot of one embedding space, written at the first
  insert, then rewritten atomically at most once a minute (`SNAPSHOT_INTERVAL_S`). Rows it
  lacks (those since the last rewrite, another process's inserts) are added from SQLite when
  it is loaded and before every query, so the snapshot can never lose an image.
- `secret.key`: 32 random bytes made on first use, mode 0600. Patients are compared by
  HMAC-SHA256(secret, issuer + patient id): the patient id is never stored in clear, and the
  hash means nothing without this node's key.

An embedding space is one model version (the bundle's device UID): embeddings of different
models are not comparable, so a new bundle starts an empty space (the old rows and the
labels stay in SQLite).

Never the same patient: a match with the query's patient hash, or in the query's study, is
skipped; an image without a patient id matches nothing and is matched by nothing, because
"different patient" cannot be shown for it.
"""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import threading
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import hnswlib
import numpy as np

from dicom_node.records.keys import keyed_hash, load_or_create_key
from dicom_node.records.sqlite import connect as sqlite_connect
from worker.atomic import fsync_folder
from worker.contracts import SimilarItem

log = logging.getLogger(__name__)

DIAGNOSES = ("covid", "negative")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    space TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    study_date TEXT,
    probability REAL NOT NULL,
    patient_key TEXT,
    analysed_at REAL NOT NULL,
    embedding BLOB NOT NULL,
    UNIQUE (space, sop_instance_uid)
);
CREATE INDEX IF NOT EXISTS items_study ON items(study_instance_uid);
CREATE TABLE IF NOT EXISTS diagnoses (
    study_instance_uid TEXT PRIMARY KEY,
    diagnosis TEXT NOT NULL,
    recorded_at REAL NOT NULL
);
"""

# Defaults; the node passes the bundle's index parameters (chosen in docs/BENCHMARKS.md:
# recall@4 >= 0.99 under 1 ms per query at a million items).
_HNSW_M = 16
_HNSW_EF_CONSTRUCTION = 200
_HNSW_EF_SEARCH = 128
_INITIAL_CAPACITY = 1024
#: The snapshot is a cache of the SQLite record (completed from it when behind), rewritten at
#: most this often: rewriting the whole index after every image costs O(index size) per image
#: (bench/retrieval.py --hospital).
SNAPSHOT_INTERVAL_S = 60.0


@dataclass(frozen=True)
class HospitalEntry:
    """One analysed image, as the index keeps it."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    study_date: str | None
    probability: float
    patient_key: str | None


class HospitalStore:
    """The SQLite side: items and confirmed diagnoses. Enough for `cxr-node label`."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        # Owner only: it links studies of different patients (by keyed hash, but still).
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = self.folder / "hospital.sqlite3"
        with self.connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)

    def connect(self) -> AbstractContextManager[sqlite3.Connection]:
        return sqlite_connect(self.path)

    def set_diagnosis(self, study_instance_uid: str, diagnosis: str | None) -> int:
        """Record (or, with None, remove) the confirmed diagnosis of a study.

        Returns how many analysed images of that study the index holds (0 is allowed: the
        study may be analysed later, or was analysed with the index turned off)."""
        if diagnosis is not None and diagnosis not in DIAGNOSES:
            raise ValueError(f"diagnosis must be one of {', '.join(DIAGNOSES)}, not {diagnosis!r}")
        with self.connect() as db:
            if diagnosis is None:
                db.execute(
                    "DELETE FROM diagnoses WHERE study_instance_uid = ?", (study_instance_uid,)
                )
            else:
                db.execute(
                    "INSERT INTO diagnoses VALUES (?, ?, ?) ON CONFLICT(study_instance_uid) "
                    "DO UPDATE SET diagnosis = excluded.diagnosis, "
                    "recorded_at = excluded.recorded_at",
                    (study_instance_uid, diagnosis, time.time()),
                )
            row = db.execute(
                "SELECT COUNT(*) FROM items WHERE study_instance_uid = ?", (study_instance_uid,)
            ).fetchone()
        return int(row[0])

    def diagnosis(self, study_instance_uid: str) -> str | None:
        with self.connect() as db:
            row = db.execute(
                "SELECT diagnosis FROM diagnoses WHERE study_instance_uid = ?",
                (study_instance_uid,),
            ).fetchone()
        return str(row[0]) if row else None

    def diagnoses(self) -> dict[str, str]:
        """Every confirmed diagnosis: Study Instance UID -> covid | negative."""
        with self.connect() as db:
            rows = db.execute("SELECT study_instance_uid, diagnosis FROM diagnoses").fetchall()
        return {str(r[0]): str(r[1]) for r in rows}

    def count(self, space: str | None = None) -> int:
        sql, args = "SELECT COUNT(*) FROM items", tuple[str, ...]()
        if space is not None:
            sql, args = sql + " WHERE space = ?", (space,)
        with self.connect() as db:
            return int(db.execute(sql, args).fetchone()[0])


class HospitalIndex:
    """Persistent nearest-neighbour index of one embedding space. Thread-safe."""

    def __init__(
        self,
        folder: Path,
        space: str,
        dim: int,
        metric: str = "cosine",
        m: int = _HNSW_M,
        ef_construction: int = _HNSW_EF_CONSTRUCTION,
        ef_search: int = _HNSW_EF_SEARCH,
        snapshot_interval_s: float = SNAPSHOT_INTERVAL_S,
    ) -> None:
        self.m, self.ef_construction, self.ef_search = m, ef_construction, ef_search
        self.snapshot_interval_s = snapshot_interval_s
        self._snapshot_at = time.monotonic()
        self.store = HospitalStore(folder)
        self.space = space
        self.dim = dim
        self.metric = metric
        self._secret = load_or_create_key(self.store.folder / "secret.key")
        safe = re.sub(r"[^0-9A-Za-z.-]", "_", space)[:120]
        self.snapshot_path = self.store.folder / f"index-{safe}.hnsw"
        self._lock = threading.Lock()
        self._index = self._load_snapshot()
        self._seen_max_id = 0
        with self.store.connect() as db:
            present = set(self._index.get_ids_list())
            rows = db.execute(
                "SELECT id, embedding FROM items WHERE space = ? ORDER BY id", (space,)
            ).fetchall()
        missing = [r for r in rows if r["id"] not in present]
        self._add_rows(missing)
        self._seen_max_id = max((int(r["id"]) for r in rows), default=0)
        if missing:
            log.info("hospital index: %d images added from the store to the snapshot", len(missing))
            self._save_snapshot()

    # --- patients -----------------------------------------------------------------------

    def patient_key(self, patient_id: str | None, issuer: str | None = None) -> str | None:
        """Keyed hash of the patient (None when the id is empty: unknown patient)."""
        pid = (patient_id or "").strip()
        if not pid:
            return None
        return keyed_hash(self._secret, issuer or "", pid)

    # --- writing ------------------------------------------------------------------------

    def add(self, entry: HospitalEntry, embedding: list[float] | np.ndarray) -> bool:
        """Add an analysed image; False (nothing written) when it is already there."""
        vector = self._vector(embedding)
        with self._lock, self.store.connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                # Inside the write transaction, so no other process's row can slip between
                # what we have seen and the id we are given.
                self._sync(db)
                if db.execute(
                    "SELECT 1 FROM items WHERE space = ? AND sop_instance_uid = ?",
                    (self.space, entry.sop_instance_uid),
                ).fetchone():
                    db.execute("ROLLBACK")
                    return False
                cur = db.execute(
                    "INSERT INTO items (space, sop_instance_uid, sop_class_uid, "
                    "study_instance_uid, series_instance_uid, study_date, probability, "
                    "patient_key, analysed_at, embedding) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        self.space,
                        entry.sop_instance_uid,
                        entry.sop_class_uid,
                        entry.study_instance_uid,
                        entry.series_instance_uid,
                        entry.study_date,
                        float(entry.probability),
                        entry.patient_key,
                        time.time(),
                        vector.tobytes(),
                    ),
                )
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            row_id = int(cur.lastrowid or 0)
            self._add_vectors(np.array([row_id]), vector[None])
            self._seen_max_id = max(self._seen_max_id, row_id)
            due = time.monotonic() - self._snapshot_at >= self.snapshot_interval_s
            if due or not self.snapshot_path.exists():
                self._save_snapshot()
        return True

    # --- reading ------------------------------------------------------------------------

    def __len__(self) -> int:
        with self._lock:
            return int(self._index.get_current_count())

    def query(
        self,
        embedding: list[float] | np.ndarray,
        k: int,
        patient_key: str | None,
        study_instance_uid: str,
    ) -> list[SimilarItem]:
        """The k most similar earlier studies of other patients, best first, one image each."""
        if k <= 0 or patient_key is None:
            return []
        vector = self._vector(embedding)
        with self._lock, self.store.connect() as db:
            self._sync(db)
            count = int(self._index.get_current_count())
            fetch = min(count, 4 * k + 8)
            chosen: dict[str, SimilarItem] = {}
            while fetch > 0:
                self._index.set_ef(max(self.ef_search, fetch))
                labels, distances = self._index.knn_query(vector[None], k=fetch)
                chosen = self._pick(db, labels[0], distances[0], k, patient_key, study_instance_uid)
                if len(chosen) >= k or fetch >= count:
                    break
                fetch = min(count, fetch * 4)
        return list(chosen.values())

    def _pick(
        self,
        db: sqlite3.Connection,
        labels: np.ndarray,
        distances: np.ndarray,
        k: int,
        patient_key: str,
        study_instance_uid: str,
    ) -> dict[str, SimilarItem]:
        ids = [int(i) for i in labels]
        marks = ",".join("?" * len(ids))
        rows = {
            int(r["id"]): r
            for r in db.execute(
                "SELECT i.*, d.diagnosis FROM items i LEFT JOIN diagnoses d "
                f"USING (study_instance_uid) WHERE i.id IN ({marks})",
                ids,
            )
        }
        chosen: dict[str, SimilarItem] = {}
        for row_id, distance in zip(ids, distances, strict=True):
            row = rows.get(row_id)
            if row is None or row["patient_key"] is None:
                continue
            study = str(row["study_instance_uid"])
            if row["patient_key"] == patient_key or study == study_instance_uid:
                continue
            if study in chosen:  # closest image of each study only
                continue
            chosen[study] = SimilarItem(
                kind="hospital",
                item_id=f"H{row_id:06d}",
                label=row["diagnosis"],
                distance=float(distance),
                study_instance_uid=study,
                series_instance_uid=str(row["series_instance_uid"]),
                sop_instance_uid=str(row["sop_instance_uid"]),
                sop_class_uid=str(row["sop_class_uid"]),
                study_date=row["study_date"],
                probability=float(row["probability"]),
            )
            if len(chosen) == k:
                break
        return chosen

    # --- internals ----------------------------------------------------------------------

    def _vector(self, embedding: list[float] | np.ndarray) -> np.ndarray:
        vector = np.asarray(embedding, dtype=np.float32).reshape(-1)
        if vector.shape[0] != self.dim:
            raise ValueError(f"embedding has {vector.shape[0]} values, the index {self.dim}")
        if not np.all(np.isfinite(vector)):
            raise ValueError("embedding has non-finite values")
        return vector

    def _new_index(self, capacity: int) -> hnswlib.Index:
        index = hnswlib.Index(space=self.metric, dim=self.dim)
        index.init_index(
            max_elements=capacity, ef_construction=self.ef_construction, M=self.m, random_seed=0
        )
        index.set_ef(self.ef_search)
        return index

    def _load_snapshot(self) -> hnswlib.Index:
        capacity = max(_INITIAL_CAPACITY, 2 * self.store.count(self.space))
        if self.snapshot_path.is_file():
            index = hnswlib.Index(space=self.metric, dim=self.dim)
            try:
                index.load_index(str(self.snapshot_path), max_elements=capacity)
                index.set_ef(self.ef_search)
                return index
            except Exception as exc:  # a damaged snapshot is rebuilt from the store
                log.warning("hospital index: snapshot unreadable (%s), rebuilding it", exc)
        return self._new_index(capacity)

    def _sync(self, db: sqlite3.Connection) -> None:
        """Add rows other processes committed since we last looked."""
        # "+space": search by rowid range, not the (space, SOP UID) index, which made every
        # query and insert scan the whole space (24 ms at 50,000 images: bench/retrieval.py).
        rows = db.execute(
            "SELECT id, embedding FROM items WHERE +space = ? AND id > ? ORDER BY id",
            (self.space, self._seen_max_id),
        ).fetchall()
        if rows:
            present = set(self._index.get_ids_list())
            self._add_rows([r for r in rows if int(r["id"]) not in present])
            self._seen_max_id = int(rows[-1]["id"])

    def _add_rows(self, rows: list[sqlite3.Row]) -> None:
        if not rows:
            return
        ids = np.array([int(r["id"]) for r in rows])
        vectors = np.stack([np.frombuffer(r["embedding"], dtype=np.float32) for r in rows])
        self._add_vectors(ids, vectors)

    def _add_vectors(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        needed = self._index.get_current_count() + len(ids)
        if needed > self._index.get_max_elements():
            self._index.resize_index(max(needed, 2 * self._index.get_max_elements()))
        self._index.add_items(vectors, ids)

    def _save_snapshot(self) -> None:
        tmp = self.snapshot_path.with_name(f".{self.snapshot_path.name}.{os.getpid()}.part")
        try:
            self._index.save_index(str(tmp))
            with tmp.open("rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, self.snapshot_path)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_folder(self.snapshot_path.parent)
        self._snapshot_at = time.monotonic()
