"""The job ledger: one row per received SOP Instance UID, the source of truth for every job.

SQLite in WAL mode, one short connection per operation, so the SCP threads and the node
worker process can share it. Queue messages are only hints: on start-up and periodically the
node re-enqueues whatever the ledger says is unfinished.

Each job produces several DICOM objects (`OutputKind`: the SR always, the Secondary Capture
and the SEG when enabled). Their UIDs are chosen when the instance is received (table
`outputs`), so a redone job writes the same objects again and the PACS replaces rather than
duplicates them. Deliveries are per object and destination: the SR is delivered, or
dead-lettered, on its own, whatever happens to the other objects.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, fields
from enum import StrEnum
from pathlib import Path

from pydicom.uid import generate_uid

from dicom_node.records.sqlite import connect as sqlite_connect


class JobState(StrEnum):
    RECEIVED = "received"  # spooled, waiting for analysis
    ANALYSING = "analysing"  # preprocessed, inference queued or running
    ANALYSED = "analysed"  # SR built and stored, delivery pending
    DELIVERED = "delivered"  # SR delivered to every destination (or the outbox)
    FAILED = "failed"  # dead letter: delivery gave up, or analysis failed; an operator can retry
    REJECTED = "rejected"  # accepted but not analysable (lateral view, wrong modality, ...)


class OutputKind(StrEnum):
    """A DICOM object a job produces, in the order they are sent."""

    SR = "sr"  # Comprehensive SR, always
    SC = "sc"  # Secondary Capture summary image
    SEG = "seg"  # lung segmentation


class DeliveryState(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


UNFINISHED = (JobState.RECEIVED, JobState.ANALYSING)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    sop_instance_uid TEXT NOT NULL UNIQUE,
    sop_class_uid TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    calling_ae TEXT NOT NULL,
    spool_path TEXT,
    state TEXT NOT NULL,
    reason TEXT,
    probability REAL,
    received_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, updated_at);
CREATE TABLE IF NOT EXISTS outputs (
    job_id TEXT NOT NULL REFERENCES jobs(job_id),
    kind TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL UNIQUE,
    PRIMARY KEY (job_id, kind)
);
"""

_REFUSALS = """
CREATE TABLE IF NOT EXISTS refusals (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    status INTEGER NOT NULL,
    calling_ae TEXT NOT NULL,
    address TEXT NOT NULL,
    reason TEXT NOT NULL
);
"""

#: The refusals table keeps this many, the newest (a sender refused in a loop cannot grow it).
REFUSALS_KEPT = 1000

_DELIVERIES = """
CREATE TABLE IF NOT EXISTS deliveries (
    job_id TEXT NOT NULL REFERENCES jobs(job_id),
    kind TEXT NOT NULL DEFAULT 'sr',
    destination TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    updated_at REAL NOT NULL,
    PRIMARY KEY (job_id, kind, destination)
);
"""


@dataclass(frozen=True)
class Job:
    job_id: str
    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    calling_ae: str
    spool_path: str | None
    state: JobState
    reason: str | None
    probability: float | None
    received_at: float
    updated_at: float
    #: The model version that gave `probability` (the bundle's device UID).
    device_uid: str | None = None
    #: Keyed hash of the study's Accession Number (`dicom_node.records.keys`); never in clear.
    accession_key: str | None = None

    @classmethod
    def received(
        cls,
        job_id: str,
        *,
        sop_instance_uid: str,
        sop_class_uid: str,
        study_instance_uid: str,
        series_instance_uid: str,
        calling_ae: str,
        spool_path: str | None,
        not_analysed_because: str | None = None,
        at: float | None = None,
        accession_key: str | None = None,
    ) -> Job:
        """A newly received instance: to be analysed, or (given the reason) kept and not
        analysed. The one way a job is made; the ledger fixes its output UIDs on `add`."""
        now = time.time() if at is None else at
        return cls(
            job_id=job_id,
            sop_instance_uid=sop_instance_uid,
            sop_class_uid=sop_class_uid,
            study_instance_uid=study_instance_uid,
            series_instance_uid=series_instance_uid,
            calling_ae=calling_ae,
            spool_path=spool_path,
            state=JobState.RECEIVED if not_analysed_because is None else JobState.REJECTED,
            reason=not_analysed_because,
            probability=None,
            received_at=now,
            updated_at=now,
            accession_key=accession_key,
        )


@dataclass(frozen=True)
class ScoredJob:
    """A job's score: which study, which model version, when it was received."""

    study_instance_uid: str
    device_uid: str | None
    probability: float
    received_at: float


@dataclass(frozen=True)
class Refusal:
    """An instance the SCP refused with a failure status: when, who, which status, why. No
    patient data: the reason is the node's own words (the Error Comment it answered)."""

    at: float
    status: int
    calling_ae: str
    address: str
    reason: str


@dataclass(frozen=True)
class Delivery:
    job_id: str
    destination: str
    state: DeliveryState
    attempts: int
    last_error: str | None
    updated_at: float
    kind: OutputKind = OutputKind.SR
    claimed_until: float | None = None  # a delivery run holds it until then (see claim)


@dataclass(frozen=True)
class OutputUids:
    """Series and SOP Instance UID of one produced object, fixed when the job is received."""

    series_instance_uid: str
    sop_instance_uid: str

    @classmethod
    def generate(cls) -> OutputUids:
        return cls(series_instance_uid=generate_uid(), sop_instance_uid=generate_uid())


_JOB_COLUMNS = tuple(f.name for f in fields(Job))


def _chunks(items: list[str], size: int = 500) -> Iterator[list[str]]:
    """Lists short enough for one `IN (...)` (SQLite limits the parameters of a statement)."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _job(row: sqlite3.Row) -> Job:
    data = dict(row)
    data["state"] = JobState(data["state"])
    return Job(**data)


def _delivery(row: sqlite3.Row) -> Delivery:
    data = dict(row)
    data["state"] = DeliveryState(data["state"])
    data["kind"] = OutputKind(data["kind"])
    return Delivery(**data)


def _migrate_deliveries(db: sqlite3.Connection) -> None:
    """Ledgers from before per-object deliveries keyed deliveries by (job, destination) only:
    rebuild the table with a `kind` column, their rows being the SR's."""
    db.execute("BEGIN IMMEDIATE")  # checked and changed in one transaction: processes race
    columns = [r[1] for r in db.execute("PRAGMA table_info(deliveries)")]
    if columns and "kind" not in columns:
        db.execute("ALTER TABLE deliveries RENAME TO deliveries_v1")
        db.execute(_DELIVERIES)
        db.execute(
            "INSERT INTO deliveries (job_id, kind, destination, state, attempts, last_error, "
            "updated_at) SELECT job_id, 'sr', destination, state, attempts, last_error, "
            "updated_at FROM deliveries_v1"
        )
        db.execute("DROP TABLE deliveries_v1")
    else:
        db.execute(_DELIVERIES)
    db.execute("COMMIT")


def _add_claims(db: sqlite3.Connection) -> None:
    """Ledgers from before delivery claims lack the column; add it (processes race)."""
    db.execute("BEGIN IMMEDIATE")
    columns = [r[1] for r in db.execute("PRAGMA table_info(deliveries)")]
    if "claimed_until" not in columns:
        db.execute("ALTER TABLE deliveries ADD COLUMN claimed_until REAL")
    db.execute("COMMIT")


def _add_scoring_columns(db: sqlite3.Connection) -> None:
    """The model version of a score and the accession key, added to the table of every
    ledger, new or from before they existed (processes race: one transaction)."""
    db.execute("BEGIN IMMEDIATE")
    columns = [r[1] for r in db.execute("PRAGMA table_info(jobs)")]
    for column in ("device_uid", "accession_key"):
        if column not in columns:
            db.execute(f"ALTER TABLE jobs ADD COLUMN {column} TEXT")
    db.execute("CREATE INDEX IF NOT EXISTS jobs_study ON jobs(study_instance_uid)")
    db.execute("CREATE INDEX IF NOT EXISTS jobs_accession ON jobs(accession_key)")
    db.execute("CREATE INDEX IF NOT EXISTS jobs_received ON jobs(received_at)")
    db.execute("COMMIT")


def _new_outputs(job_id: str) -> list[tuple[str, str, str, str]]:
    rows = []
    for kind in OutputKind:
        uids = OutputUids.generate()
        rows.append((job_id, str(kind), uids.series_instance_uid, uids.sop_instance_uid))
    return rows


def _outputs_in_one_place(db: sqlite3.Connection) -> None:
    """The output UIDs live in table `outputs` only. Ledgers from before kept the SR's in two
    columns of `jobs` too, and jobs from before the table got the others on first use: move
    the SR's into `outputs`, drop the columns, and give every job the UIDs of every kind, so
    that reading them never writes (processes race: one transaction)."""
    db.create_function("new_uid", 0, generate_uid)
    db.execute("BEGIN IMMEDIATE")
    columns = [r[1] for r in db.execute("PRAGMA table_info(jobs)")]
    if "sr_series_uid" in columns:
        db.execute(
            "INSERT OR IGNORE INTO outputs SELECT job_id, 'sr', sr_series_uid, sr_sop_uid FROM jobs"
        )
        db.execute("ALTER TABLE jobs DROP COLUMN sr_series_uid")
        db.execute("ALTER TABLE jobs DROP COLUMN sr_sop_uid")
    for kind in OutputKind:
        db.execute(
            "INSERT INTO outputs SELECT job_id, ?, new_uid(), new_uid() FROM jobs "
            "WHERE job_id NOT IN (SELECT job_id FROM outputs WHERE kind = ?)",
            (str(kind), str(kind)),
        )
    db.execute("COMMIT")


class Ledger:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)
            db.executescript(_REFUSALS)
            _add_scoring_columns(db)
            _migrate_deliveries(db)
            _add_claims(db)
            _outputs_in_one_place(db)

    def _connect(self) -> AbstractContextManager[sqlite3.Connection]:
        return sqlite_connect(self.path)

    def add(self, job: Job) -> bool:
        """Record a new instance and fix the UIDs of the objects it will produce;
        False when its SOP Instance UID is already in the ledger."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            cur = db.execute(
                f"INSERT OR IGNORE INTO jobs ({', '.join(_JOB_COLUMNS)}) "
                f"VALUES ({', '.join(':' + c for c in _JOB_COLUMNS)})",
                {**job.__dict__, "state": str(job.state)},
            )
            added = cur.rowcount == 1
            if added:
                db.executemany("INSERT INTO outputs VALUES (?, ?, ?, ?)", _new_outputs(job.job_id))
            db.execute("COMMIT")
            return added

    def output_uids(self, job_id: str) -> dict[OutputKind, OutputUids]:
        """The UIDs of every object the job produces (the same on every call)."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT kind, series_instance_uid, sop_instance_uid FROM outputs WHERE job_id = ?",
                (job_id,),
            ).fetchall()
        if not rows:
            raise KeyError(f"no job {job_id}")
        return {OutputKind(r[0]): OutputUids(r[1], r[2]) for r in rows}

    def get(self, job_id: str) -> Job | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def by_sop_instance(self, sop_instance_uid: str) -> Job | None:
        with self._connect() as db:
            row = db.execute(
                "SELECT * FROM jobs WHERE sop_instance_uid = ?", (sop_instance_uid,)
            ).fetchone()
        return _job(row) if row else None

    def set_state(
        self,
        job_id: str,
        state: JobState,
        reason: str | None = None,
        probability: float | None = None,
        only_from: tuple[JobState, ...] | None = None,
        device_uid: str | None = None,
    ) -> bool:
        """Move a job to `state`; with only_from, only if it is in one of those states. A
        probability is recorded with the device UID of the model that gave it."""
        sql = "UPDATE jobs SET state = ?, reason = ?, updated_at = ?"
        args: list[object] = [str(state), reason, time.time()]
        if probability is not None:
            sql += ", probability = ?, device_uid = ?"
            args += [probability, device_uid]
        sql += " WHERE job_id = ?"
        args.append(job_id)
        if only_from:
            sql += f" AND state IN ({','.join('?' * len(only_from))})"
            args.extend(str(s) for s in only_from)
        with self._connect() as db:
            return db.execute(sql, args).rowcount == 1

    def jobs_in(self, states: tuple[JobState, ...], older_than: float | None = None) -> list[Job]:
        sql = f"SELECT * FROM jobs WHERE state IN ({','.join('?' * len(states))})"
        args: list[object] = [str(s) for s in states]
        if older_than is not None:
            sql += " AND updated_at <= ?"
            args.append(older_than)
        with self._connect() as db:
            return [_job(r) for r in db.execute(sql + " ORDER BY received_at", args)]

    # --- deliveries -------------------------------------------------------------------------

    def add_deliveries(
        self,
        job_id: str,
        destinations: list[str],
        kinds: tuple[OutputKind, ...] | list[OutputKind] = (OutputKind.SR,),
    ) -> None:
        """One pending delivery per object and destination (existing rows are kept)."""
        now = time.time()
        with self._connect() as db:
            db.executemany(
                "INSERT OR IGNORE INTO deliveries (job_id, kind, destination, state, updated_at) "
                "VALUES (?, ?, ?, ?, ?)",
                [
                    (job_id, str(k), d, str(DeliveryState.PENDING), now)
                    for d in destinations
                    for k in kinds
                ],
            )

    def deliveries(self, job_id: str) -> list[Delivery]:
        with self._connect() as db:
            rows = db.execute("SELECT * FROM deliveries WHERE job_id = ?", (job_id,))
            return sorted(
                (_delivery(r) for r in rows),
                key=lambda d: (d.destination, list(OutputKind).index(d.kind)),
            )

    def pending_deliveries(self, older_than: float | None = None) -> list[Delivery]:
        """Pending deliveries of analysed jobs (and of rejected ones: the input gate's "not
        analysed" SR), one row per (job, destination): a delivery step sends every pending
        object of the job to that destination."""
        sql = (
            "SELECT d.* FROM deliveries d JOIN jobs j USING (job_id) "
            "WHERE d.state = ? AND j.state IN (?, ?)"
        )
        args: list[object] = [
            str(DeliveryState.PENDING),
            str(JobState.ANALYSED),
            str(JobState.REJECTED),
        ]
        if older_than is not None:
            sql += " AND d.updated_at <= ?"
            args.append(older_than)
        sql += " GROUP BY d.job_id, d.destination"
        with self._connect() as db:
            return [_delivery(r) for r in db.execute(sql, args)]

    def record_attempt(
        self,
        job_id: str,
        destination: str,
        state: DeliveryState,
        error: str | None = None,
        kind: OutputKind = OutputKind.SR,
    ) -> Delivery:
        """Count one delivery attempt of one object and roll the job's state up from all its
        deliveries: delivered when every object reached every destination, failed when one
        was dead-lettered."""
        now = time.time()
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            db.execute(
                "UPDATE deliveries SET state = ?, attempts = attempts + 1, last_error = ?, "
                "updated_at = ? WHERE job_id = ? AND destination = ? AND kind = ?",
                (str(state), error, now, job_id, destination, str(kind)),
            )
            states = {
                r[0] for r in db.execute("SELECT state FROM deliveries WHERE job_id = ?", (job_id,))
            }
            if states == {str(DeliveryState.DELIVERED)}:
                # a rejected job (the input gate's "not analysed" SR) keeps its state and
                # its reason: what was delivered says it was not analysed
                db.execute(
                    "UPDATE jobs SET state = ?, reason = NULL, updated_at = ? "
                    "WHERE job_id = ? AND state != ?",
                    (str(JobState.DELIVERED), now, job_id, str(JobState.REJECTED)),
                )
            elif str(DeliveryState.FAILED) in states and state is DeliveryState.FAILED:
                # the reason names the object that was dead-lettered now; a later success
                # of another object leaves it as it is
                db.execute(
                    "UPDATE jobs SET state = ?, reason = ?, updated_at = ? WHERE job_id = ?",
                    (
                        str(JobState.FAILED),
                        f"delivery of the {kind.upper()} to {destination} failed: {error}",
                        now,
                        job_id,
                    ),
                )
            row = db.execute(
                "SELECT * FROM deliveries WHERE job_id = ? AND destination = ? AND kind = ?",
                (job_id, destination, str(kind)),
            ).fetchone()
            db.execute("COMMIT")
        return _delivery(row)

    def retry_failed(self, job_id: str) -> list[str]:
        """Operator retry of a dead-lettered job: its failed deliveries become pending again.
        Returns the destinations concerned, each once."""
        now = time.time()
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            dests = [
                r[0]
                for r in db.execute(
                    "SELECT DISTINCT destination FROM deliveries WHERE job_id = ? AND state = ? "
                    "ORDER BY destination",
                    (job_id, str(DeliveryState.FAILED)),
                )
            ]
            db.execute(
                "UPDATE deliveries SET state = ?, attempts = 0, updated_at = ? "
                "WHERE job_id = ? AND state = ?",
                (str(DeliveryState.PENDING), now, job_id, str(DeliveryState.FAILED)),
            )
            if dests:
                db.execute(
                    "UPDATE jobs SET state = ?, reason = NULL, updated_at = ? WHERE job_id = ?",
                    (str(JobState.ANALYSED), now, job_id),
                )
            db.execute("COMMIT")
        return dests

    def claim(self, job_id: str, destination: str, lease_s: float) -> bool:
        """Take the pending deliveries of a job to one destination for one delivery run.

        Queue messages can come twice (a redelivered message, a recovery sweep, a redone
        finalize); only the run holding the claim sends, so an object is not sent twice by
        two runs at once. The claim lapses after lease_s, so a run that died frees it."""
        now = time.time()
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            cur = db.execute(
                "UPDATE deliveries SET claimed_until = ? WHERE job_id = ? AND destination = ? "
                "AND state = ? AND (claimed_until IS NULL OR claimed_until < ?)",
                (now + lease_s, job_id, destination, str(DeliveryState.PENDING), now),
            )
            db.execute("COMMIT")
            return cur.rowcount > 0

    def release_all_claims(self) -> int:
        """Free every delivery claim: for when no delivery run can be alive (the node's
        delivery worker is starting, its predecessor ended). Returns how many were held."""
        with self._connect() as db:
            cur = db.execute(
                "UPDATE deliveries SET claimed_until = NULL WHERE claimed_until IS NOT NULL"
            )
            return int(cur.rowcount)

    def release(self, job_id: str, destination: str) -> None:
        with self._connect() as db:
            db.execute(
                "UPDATE deliveries SET claimed_until = NULL WHERE job_id = ? AND destination = ?",
                (job_id, destination),
            )

    def retry_analysis(self, job_id: str) -> bool:
        """Operator retry of a job whose analysis failed (it has no failed deliveries): back to
        received, to be prepared again. False when the job is not such a job."""
        now = time.time()
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            failed_deliveries = db.execute(
                "SELECT COUNT(*) FROM deliveries WHERE job_id = ? AND state = ?",
                (job_id, str(DeliveryState.FAILED)),
            ).fetchone()[0]
            cur = db.execute(
                "UPDATE jobs SET state = ?, reason = NULL, updated_at = ? "
                "WHERE job_id = ? AND state = ? AND ? = 0",
                (str(JobState.RECEIVED), now, job_id, str(JobState.FAILED), failed_deliveries),
            )
            db.execute("COMMIT")
            return cur.rowcount == 1

    # --- refusals -----------------------------------------------------------------------------

    def add_refusal(self, refusal: Refusal, keep: int = REFUSALS_KEPT) -> None:
        """Record a refused instance; only the newest `keep` are kept."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            cur = db.execute(
                "INSERT INTO refusals (at, status, calling_ae, address, reason) "
                "VALUES (?, ?, ?, ?, ?)",
                (refusal.at, refusal.status, refusal.calling_ae, refusal.address, refusal.reason),
            )
            db.execute("DELETE FROM refusals WHERE id <= ?", (int(cur.lastrowid or 0) - keep,))
            db.execute("COMMIT")

    def recent_refusals(self, limit: int = 20) -> list[Refusal]:
        """The most recent refusals, newest first."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT at, status, calling_ae, address, reason FROM refusals "
                "ORDER BY id DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [Refusal(*tuple(r)) for r in rows]

    # --- reporting --------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        with self._connect() as db:
            rows = db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        found = {r[0]: r[1] for r in rows}
        return {str(s): found.get(str(s), 0) for s in JobState}

    def last_errors(self, limit: int = 10) -> list[Job]:
        with self._connect() as db:
            rows = db.execute(
                "SELECT * FROM jobs WHERE state IN (?, ?) ORDER BY updated_at DESC LIMIT ?",
                (str(JobState.FAILED), str(JobState.REJECTED), limit),
            )
            return [_job(r) for r in rows]

    def recent(self, limit: int = 50) -> list[Job]:
        """The most recently received jobs, newest first (the status page)."""
        with self._connect() as db:
            rows = db.execute("SELECT * FROM jobs ORDER BY received_at DESC LIMIT ?", (limit,))
            return [_job(r) for r in rows]

    def check_writable(self) -> None:
        """Take the write lock and let it go (health check); raises sqlite3.Error if the
        ledger cannot be written."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            db.execute("ROLLBACK")

    # --- confirmed diagnoses: scores, studies -------------------------------------------------

    def scored(
        self, studies: Iterable[str] | None = None, since: float | None = None
    ) -> list[ScoredJob]:
        """The scores of analysed jobs: of the given studies only, or received since `since`."""
        sql = (
            "SELECT study_instance_uid, device_uid, probability, received_at FROM jobs "
            "WHERE probability IS NOT NULL"
        )
        args: list[object] = []
        if since is not None:
            sql += " AND received_at >= ?"
            args.append(since)
        with self._connect() as db:
            if studies is None:
                return [ScoredJob(*tuple(r)) for r in db.execute(sql, args)]
            out: list[ScoredJob] = []
            for chunk in _chunks(list(dict.fromkeys(studies))):
                marks = ",".join("?" * len(chunk))
                rows = db.execute(f"{sql} AND study_instance_uid IN ({marks})", [*args, *chunk])
                out += [ScoredJob(*tuple(r)) for r in rows]
            return out

    def known_studies(self, studies: Iterable[str]) -> set[str]:
        """Which of these Study Instance UIDs the node has received an instance of."""
        found: set[str] = set()
        with self._connect() as db:
            for chunk in _chunks(list(dict.fromkeys(studies))):
                marks = ",".join("?" * len(chunk))
                found |= {
                    str(r[0])
                    for r in db.execute(
                        "SELECT DISTINCT study_instance_uid FROM jobs "
                        f"WHERE study_instance_uid IN ({marks})",
                        chunk,
                    )
                }
        return found

    def studies_by_accession(self, keys: Iterable[str]) -> dict[str, set[str]]:
        """Accession key -> the Study Instance UIDs received under it (usually one)."""
        found: dict[str, set[str]] = {}
        with self._connect() as db:
            for chunk in _chunks(list(dict.fromkeys(keys))):
                marks = ",".join("?" * len(chunk))
                for key, study in db.execute(
                    "SELECT DISTINCT accession_key, study_instance_uid FROM jobs "
                    f"WHERE accession_key IN ({marks})",
                    chunk,
                ):
                    found.setdefault(str(key), set()).add(str(study))
        return found

    def jobs_of_studies(self, studies: Iterable[str]) -> list[Job]:
        """Every job of these studies, in the order received."""
        jobs: list[Job] = []
        with self._connect() as db:
            for chunk in _chunks(list(dict.fromkeys(studies))):
                marks = ",".join("?" * len(chunk))
                jobs += [
                    _job(r)
                    for r in db.execute(
                        f"SELECT * FROM jobs WHERE study_instance_uid IN ({marks})", chunk
                    )
                ]
        return sorted(jobs, key=lambda j: j.received_at)

    def finished_before(self, before: float) -> list[Job]:
        """Jobs that need nothing more (delivered, rejected) last changed before `before`."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT * FROM jobs WHERE state IN (?, ?) AND updated_at < ? ORDER BY updated_at",
                (str(JobState.DELIVERED), str(JobState.REJECTED), before),
            )
            return [_job(r) for r in rows]
