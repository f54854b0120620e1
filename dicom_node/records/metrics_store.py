"""Prometheus metrics of the node, correct across its processes.

The SCP runs in the `serve` process, the pipeline steps in its worker child (and, with the
embedded queue, inference too); the HTTP server that Prometheus scrapes is in `serve`. So
events are not counted in process memory: each step adds to counters and histogram buckets in
a small SQLite file (`data_dir/metrics.sqlite3`, one short transaction per event), and the
collector reads them at scrape time. The counts survive restarts of any process, which
Prometheus' own multiprocess mode (one mmap file per pid, lost on a restart of the node)
does not give; an event costs one SQLite write next to the several the ledger already makes.

Gauges (jobs per state, queue depth, free disk, the bundle in use) are read from their source
at scrape time. A metrics write never fails a job: errors are logged and dropped.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

#: Counters (`cxr_<name>_total`): what they count, and their label names.
COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "received": (
        "instances accepted and recorded in the ledger (including those not analysed)",
        (),
    ),
    "refused": ("instances refused with an error status, by status", ("status",)),
    "rejected": ("accepted instances that are not analysed (lateral view, undecodable, ...)", ()),
    "not_analysed": (
        "instances the bundle's input gate refused: no score, a 'not analysed' SR (also counted "
        "as rejected)",
        (),
    ),
    "analysed": ("instances analysed: result objects built", ()),
    "delivered": ("result objects delivered, by kind and destination", ("kind", "destination")),
    "failed": (
        "dead letters: analysis failures (stage=analysis) and result objects whose delivery "
        "gave up (stage=delivery)",
        ("stage",),
    ),
    "delivery_retries": (
        "failed delivery attempts that will be retried, by destination",
        ("destination",),
    ),
}

#: Latency histogram stages (`cxr_stage_seconds{stage=...}`).
STAGES = {
    "prepare": "received -> preprocessed and queued for inference (includes queue wait)",
    "queue_infer": "queued for inference -> result back on the node (queue wait + inference)",
    "infer": "model time on the worker",
    "finalize": "lung outline, similar studies, SR/SC/SEG built and stored",
    "deliver": "one delivery association (all pending objects to one destination)",
    "end_to_end": "received -> every object delivered",
}

BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS counters (
    name TEXT NOT NULL, labels TEXT NOT NULL, value REAL NOT NULL,
    PRIMARY KEY (name, labels)
);
CREATE TABLE IF NOT EXISTS buckets (
    stage TEXT NOT NULL, bucket INTEGER NOT NULL, count INTEGER NOT NULL,
    PRIMARY KEY (stage, bucket)
);
CREATE TABLE IF NOT EXISTS sums (
    stage TEXT PRIMARY KEY, sum REAL NOT NULL, count INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS once (key TEXT PRIMARY KEY, at REAL NOT NULL);
"""


def bucket_index(seconds: float) -> int:
    """Index of the first bucket whose upper bound holds `seconds` (len(BUCKETS): +Inf)."""
    for i, bound in enumerate(BUCKETS):
        if seconds <= bound:
            return i
    return len(BUCKETS)


class MetricsStore:
    """Counters and histograms in SQLite, shared by every process of the node host."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._local = threading.local()

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """This thread's connection, kept open: closing the last connection to a WAL database
        checkpoints and fsyncs it, which would cost ~10 ms per event."""
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None)
            db.execute("PRAGMA busy_timeout=10000")
            db.execute("PRAGMA journal_mode=WAL")
            # no fsync per event: a power cut may lose the last few counts, never the jobs
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            self._local.db = db
        try:
            yield db
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def _safely(self, what: str, write: Callable[[sqlite3.Connection], None]) -> None:
        try:
            with self._connect() as db:
                db.execute("BEGIN IMMEDIATE")
                write(db)
                db.execute("COMMIT")
        except sqlite3.Error as exc:  # metrics are worth less than the job
            log.warning("metrics: %s not recorded: %s", what, exc)

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        if name not in COUNTERS or tuple(sorted(labels)) != tuple(sorted(COUNTERS[name][1])):
            raise ValueError(f"unknown counter {name!r} or labels {sorted(labels)}")
        key = json.dumps(labels, sort_keys=True)

        def write(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO counters VALUES (?, ?, ?) "
                "ON CONFLICT (name, labels) DO UPDATE SET value = value + excluded.value",
                (name, key, amount),
            )

        self._safely(name, write)

    def observe(self, stage: str, seconds: float, once: str | None = None) -> None:
        """Add a latency to a stage's histogram; with `once`, only the first time that key is
        seen (a job's end-to-end latency, however many deliveries finish it)."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}")
        seconds = max(0.0, float(seconds))
        if not math.isfinite(seconds):
            return

        def write(db: sqlite3.Connection) -> None:
            if once is not None:
                cur = db.execute(
                    "INSERT OR IGNORE INTO once VALUES (?, ?)", (f"{stage}:{once}", time.time())
                )
                if cur.rowcount == 0:
                    return
            db.execute(
                "INSERT INTO buckets VALUES (?, ?, 1) "
                "ON CONFLICT (stage, bucket) DO UPDATE SET count = count + 1",
                (stage, bucket_index(seconds)),
            )
            db.execute(
                "INSERT INTO sums VALUES (?, ?, 1) ON CONFLICT (stage) "
                "DO UPDATE SET sum = sum + excluded.sum, count = count + 1",
                (stage, seconds),
            )

        self._safely(f"{stage} latency", write)

    def forget_once_keys(self, older_than: float) -> int:
        """Drop the dedup keys of old jobs (`cxr-node cleanup`)."""
        with self._connect() as db:
            return db.execute("DELETE FROM once WHERE at < ?", (older_than,)).rowcount

    # --- reading ----------------------------------------------------------------------------

    def counters(self) -> list[tuple[str, dict[str, str], float]]:
        if not self.path.exists():
            return []
        with self._connect() as db:
            rows = db.execute("SELECT name, labels, value FROM counters ORDER BY name, labels")
            return [(r[0], json.loads(r[1]), float(r[2])) for r in rows]

    def histograms(self) -> dict[str, tuple[list[int], float]]:
        """Per stage: cumulative counts per bucket (the last is +Inf) and the sum."""
        result: dict[str, tuple[list[int], float]] = {}
        if not self.path.exists():
            return result
        with self._connect() as db:
            counts: dict[str, list[int]] = {}
            for stage, bucket, count in db.execute("SELECT stage, bucket, count FROM buckets"):
                counts.setdefault(stage, [0] * (len(BUCKETS) + 1))[int(bucket)] += int(count)
            sums = {r[0]: float(r[1]) for r in db.execute("SELECT stage, sum FROM sums")}
        for stage, per_bucket in counts.items():
            cumulative, total = [], 0
            for count in per_bucket:
                total += count
                cumulative.append(total)
            result[stage] = (cumulative, sums.get(stage, 0.0))
        return result


#: A gauge read at scrape time: name, help, label names, and (label values, value) pairs.
GaugeSource = Callable[[], Iterable[tuple[str, str, list[str], list[tuple[list[str], float]]]]]


class NodeCollector(Collector):
    """What /metrics shows: the stored counters and histograms, and gauges read now."""

    def __init__(
        self, store: MetricsStore, gauges: GaugeSource, info: Callable[[], dict[str, str]]
    ) -> None:
        self.store = store
        self.gauges = gauges
        self.info = info

    def collect(self) -> Iterator[Metric]:
        families = {
            name: CounterMetricFamily(f"cxr_{name}", doc, labels=list(names))
            for name, (doc, names) in COUNTERS.items()
        }
        seen: set[str] = set()
        for name, labels, value in self.store.counters():
            if name in families and set(labels) == set(COUNTERS[name][1]):
                families[name].add_metric([labels[k] for k in COUNTERS[name][1]], value)
                seen.add(name)
        for name, (_, names) in COUNTERS.items():
            if not names and name not in seen:  # an unlabelled counter starts at 0
                families[name].add_metric([], 0.0)
        yield from families.values()

        stages = self.store.histograms()
        histogram = HistogramMetricFamily(
            "cxr_stage_seconds", "latency of each stage of a job, in seconds", labels=["stage"]
        )
        bounds = [*(str(b) for b in BUCKETS), "+Inf"]
        for stage in STAGES:
            cumulative, total = stages.get(stage, ([0] * len(bounds), 0.0))
            histogram.add_metric([stage], list(zip(bounds, cumulative, strict=True)), total)
        yield histogram

        for name, doc, label_names, samples in self.gauges():
            gauge = GaugeMetricFamily(name, doc, labels=label_names)
            for values, value in samples:
                gauge.add_metric(values, value)
            yield gauge

        info = self.info()
        if info:
            family = InfoMetricFamily("cxr_bundle", "the model bundle in use")
            family.add_metric([], info)
            yield family
