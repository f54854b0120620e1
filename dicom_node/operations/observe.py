"""The HTTP applications of the node (`serve`) and of a `cxr-node worker`: status page, health,
Prometheus metrics. (What the SCP tells the audit log and the metrics: receiving.events.)"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

from dicom_node.jobs.model_store import BundleCache, ModelStore
from dicom_node.learning.gauges import figure_gauges
from dicom_node.learning.live import BundleFigures, figures_source
from dicom_node.operations.health import (
    Health,
    check_broker,
    check_bundle,
    check_disk,
    check_ledger,
    queue_depths,
)
from dicom_node.operations.web import StatusView, WsgiApp, make_app
from dicom_node.records.durable import free_bytes
from dicom_node.records.ledger import JobState, Ledger
from dicom_node.records.metrics_store import GaugeSource, MetricsStore, NodeCollector
from dicom_node.settings import Settings

log = logging.getLogger(__name__)


def _info(bundles: BundleCache) -> dict[str, str]:
    try:
        m = bundles.current().manifest
    except Exception:
        return {}
    return {
        "name": m.name,
        "version": m.version,
        "device_uid": m.device_uid,
        "random_weights": str(m.random_weights).lower(),
    }


def node_gauges(
    settings: Settings,
    ledger: Ledger,
    figures: Callable[[], list[BundleFigures]] | None = None,
) -> GaugeSource:
    def read() -> list[tuple[str, str, list[str], list[tuple[list[str], float]]]]:
        gauges: list[tuple[str, str, list[str], list[tuple[list[str], float]]]] = []
        if figures is not None:
            try:
                gauges += figure_gauges(figures())
            except Exception as exc:  # the other gauges still go out
                log.warning("agreement figures not available: %s", exc)
        counts = ledger.counts()
        gauges.append(
            (
                "cxr_jobs",
                "jobs in the ledger by state now",
                ["state"],
                [([s], float(n)) for s, n in counts.items()],
            )
        )
        try:
            depths = queue_depths(settings)
            gauges.append(
                (
                    "cxr_queue_depth",
                    "messages waiting in each queue (node: prepare/finalize/deliver; infer)",
                    ["queue"],
                    [([q], float(n)) for q, n in depths.items()],
                )
            )
        except Exception as exc:  # the broker is down: /health says so; no gauge then
            log.warning("queue depth not available: %s", exc)
        with contextlib.suppress(OSError):
            gauges.append(
                (
                    "cxr_disk_free_bytes",
                    "free space on the data folder's file system",
                    [],
                    [([], float(free_bytes(settings.data_dir)))],
                )
            )
        return gauges

    return read


def node_app(
    settings: Settings, ledger: Ledger, bundles: BundleCache, worker_alive: Callable[[], bool]
) -> WsgiApp:
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    figures = figures_source(settings, ledger)
    registry.register(
        NodeCollector(
            MetricsStore(settings.metrics_path),
            node_gauges(settings, ledger, figures),
            lambda: _info(bundles),
        )
    )
    health = Health(
        {
            "broker": lambda: check_broker(settings),
            "ledger": lambda: check_ledger(ledger),
            "disk": lambda: check_disk(settings),
            "bundle": lambda: check_bundle(bundles.current),
            "worker": lambda: (
                (True, "node worker process running")
                if worker_alive()
                else (False, "node worker process not running (restarting)")
            ),
        }
    )
    store = ModelStore(settings.models_dir)

    def installed() -> list[dict[str, str]]:
        return [
            {
                "version": i.bundle.manifest.version,
                "device_uid": i.bundle.manifest.device_uid,
                "folder": i.path.name,
                "role": "current" if i.current else "previous" if i.previous else "",
            }
            for i in store.installed()
        ]

    def bundle_facts() -> dict[str, str]:
        try:
            bundle = bundles.current()
        except Exception as exc:
            return {"error": str(exc)}
        m = bundle.manifest
        facts = {
            "name": m.name,
            "version": m.version,
            "device UID": m.device_uid,
            "created": m.created.isoformat(),
            "threshold": f"{m.threshold:.4f}",
            "members": ", ".join(member.name for member in m.members),
            "folder": str(bundle.root),
        }
        if m.random_weights:
            facts["note"] = "RANDOM WEIGHTS: plumbing only, scores mean nothing"
        return facts

    view = StatusView(
        title=f"CXR node {settings.ae_title}",
        counts=ledger.counts,
        recent=lambda: ledger.recent(50),
        failures=lambda: [j for j in ledger.last_errors(50) if j.state is JobState.FAILED],
        bundle=bundle_facts,
        installed=installed,
        refusals=lambda: ledger.recent_refusals(20),
        figures=figures,
        drift_days=settings.drift_days,
    )
    return make_app(registry, health, view)


class WorkerMetrics:
    """In-process metrics of one `cxr-node worker` (its tasks run in its threads)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.tasks = Counter(
            "cxr_worker_tasks",
            "tasks this worker finished, by task and Celery state",
            ["task", "state"],
            registry=self.registry,
        )
        self.seconds = Histogram(
            "cxr_worker_task_seconds",
            "time this worker spent on a task",
            ["task"],
            registry=self.registry,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
        )
        self.started: dict[str, float] = {}

    def connect(self) -> None:
        """Count tasks through Celery's signals (no change to the tasks themselves)."""
        from celery import signals

        def prerun(task_id: str | None = None, **_: object) -> None:
            if task_id:
                self.started[task_id] = time.perf_counter()

        def postrun(
            task_id: str | None = None, task: Any = None, state: str | None = None, **_: object
        ) -> None:
            name = getattr(task, "name", "?")
            began = self.started.pop(task_id or "", None)
            self.tasks.labels(name, state or "?").inc()
            if began is not None:
                self.seconds.labels(name).observe(time.perf_counter() - began)

        signals.task_prerun.connect(prerun, weak=False)
        signals.task_postrun.connect(postrun, weak=False)


def worker_app(settings: Settings, bundles: BundleCache, metrics: WorkerMetrics) -> WsgiApp:
    health = Health(
        {
            "broker": lambda: check_broker(settings),
            "bundle": lambda: check_bundle(bundles.current),
        }
    )
    return make_app(metrics.registry, health)
