"""`cxr-node serve`: the node host process, and `cxr-node worker`: a Celery worker process.

serve = SCP + producer + recovery sweep + supervised worker children (`worker_children`): one
consumes "node" (prepare, finalize), one "deliver" and, with the embedded queue, one "infer"
(CXR_INFER_PROCESS=false: one child for all of them); with Redis `cxr-node worker` processes
(on any host) consume "infer".
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable

from dicom_node.jobs.model_store import BundleCache, ModelStore
from dicom_node.jobs.queue import (
    DELIVER_QUEUE,
    INFER_QUEUE,
    NODE_QUEUE,
    make_celery,
    queue_name,
    send_deliver,
    send_prepare,
)
from dicom_node.jobs.recovery import PeriodicSweep, sweep
from dicom_node.jobs.tasks import register_tasks
from dicom_node.logs import describe_failure, setup_logging
from dicom_node.operations.observe import node_app
from dicom_node.operations.web import start_http
from dicom_node.process_start import configure_libraries
from dicom_node.receiving.events import NodeStoreEvents, association_handlers
from dicom_node.receiving.processes import Receivers
from dicom_node.receiving.scp import start_scp
from dicom_node.receiving.security import check_exposure
from dicom_node.records.audit import AuditLog
from dicom_node.records.ledger import Ledger
from dicom_node.records.metrics_store import MetricsStore
from dicom_node.settings import Settings

log = logging.getLogger(__name__)

#: How long `serve` waits for its own stop signal after finding a worker process ended, before
#: restarting it (a worker that crashed is restarted that much later).
STOP_GRACE_S = 0.5


def run_worker(settings: Settings, roles: list[str], name: str) -> None:
    """Run a Celery worker for the queues of `roles` ("node", "infer", "deliver") until
    stopped (blocks)."""
    queues = [queue_name(settings, role) for role in roles]
    configure_libraries(decode_threads=settings.decode_threads)
    setup_logging(settings.log_level, settings.log_dir / f"worker-{name}.log", settings.log_format)
    app = make_celery(settings)
    register_tasks(app, settings)
    if settings.worker_http_port:
        from dicom_node.operations.observe import WorkerMetrics, worker_app

        metrics = WorkerMetrics()
        metrics.connect()
        bundles = BundleCache(lambda: settings.bundle_in_use, ModelStore(settings.models_dir))
        start_http(
            settings.http_bind, settings.worker_http_port, worker_app(settings, bundles, metrics)
        )
    argv = [
        "--quiet",  # no start-up banner: the node logs what it runs, one line each
        "worker",
        f"--queues={','.join(queues)}",
        "--pool=threads",
        f"--concurrency={worker_threads(settings, roles)}",
        f"--hostname={name}@{socket.gethostname()}",
        f"--loglevel={settings.log_level}",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    app.worker_main(argv)


def worker_threads(settings: Settings, roles: list[str]) -> int:
    """Task threads of a worker: the node host's (`node_threads`) when it builds results,
    a delivery worker's (`delivery_threads`), otherwise an inference worker's
    (`worker_concurrency`)."""
    if NODE_QUEUE in roles:
        return settings.node_threads
    if roles == [DELIVER_QUEUE]:
        return settings.delivery_threads
    return settings.worker_concurrency


def worker_children(settings: Settings) -> dict[str, list[str]]:
    """The worker processes `serve` runs and supervises: name -> queue roles. The node
    worker (prepare, finalize) and the deliveries each in a process of their own, and with
    the embedded queue inference in a third (with Redis `cxr-node worker` processes infer);
    `infer_process` false: one process for all the node host's queues."""
    here = (
        [NODE_QUEUE, INFER_QUEUE, DELIVER_QUEUE]
        if settings.embedded
        else [NODE_QUEUE, DELIVER_QUEUE]
    )
    if not settings.infer_process:
        return {"node": here}
    return {role: [role] for role in here}


def _release_claims(ledger: Ledger, why: str) -> None:
    """The node's deliveries all run in one worker process, its child (they read the node
    host's results folder): when that process starts, no delivery run is alive, and the
    claims a dead one held (a lease of `steps.CLAIM_LEASE_S`, 5 min) would only hold back
    its deliveries until they lapse."""
    held = ledger.release_all_claims()
    if held:
        log.warning("%d delivery claim(s) of an ended delivery run freed: %s", held, why)


def _die_with_parent_hook() -> Callable[[], object] | None:
    """A preexec hook for the worker child: be sent SIGTERM when the node process dies,
    however it dies, so that a killed node leaves no orphan consuming its queue (Linux).
    Resolved before the fork: between fork and exec only the ready-made call runs."""
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


def broker_identity(settings: Settings) -> str | None:
    """The Redis server's run id: a new one means the broker restarted, and whatever was
    queued may be gone. None with the embedded queue, or when Redis does not answer."""
    if settings.embedded or not str(settings.broker_url).startswith(("redis://", "rediss://")):
        return None
    import redis

    try:
        client = redis.Redis.from_url(str(settings.broker_url), socket_timeout=5)
        try:
            return str(client.info("server")["run_id"])
        finally:
            client.close()
    except (redis.RedisError, OSError, KeyError):
        return None


class Recovery:
    """Re-enqueue from the ledger: everything unfinished on the first run (start-up), after a
    broker restart (its queues may have been lost) and after an enqueue failed (the broker
    was away); otherwise work untouched for the visibility time-out."""

    def __init__(
        self,
        settings: Settings,
        ledger: Ledger,
        enqueue_prepare: Callable[[str], None],
        enqueue_deliver: Callable[[str, str], None],
    ) -> None:
        self.settings = settings
        self.ledger = ledger
        self.enqueue_prepare = enqueue_prepare
        self.enqueue_deliver = enqueue_deliver
        self.broker: str | None = None
        self._everything = True

    def request_full_sweep(self) -> None:
        self._everything = True

    def __call__(self) -> int:
        broker = broker_identity(self.settings)
        if broker is not None:
            if self.broker is not None and broker != self.broker:
                log.warning("recovery: the broker restarted; re-enqueueing all unfinished work")
                self._everything = True
            self.broker = broker
        everything = self._everything
        older_than = 0.0 if everything else float(self.settings.visibility_timeout_s)
        count = sweep(self.ledger, self.enqueue_prepare, self.enqueue_deliver, older_than)
        if everything:
            self._everything = False
        return count


def _spawn_worker(settings: Settings, name: str, roles: list[str]) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env["CXR_DATA_DIR"] = str(settings.data_dir.resolve())
    # absolute, not resolved: a bundle reached through a link is looked up again per job
    env["CXR_BUNDLE"] = str(settings.bundle.absolute())
    env["CXR_WORKER_HTTP_PORT"] = "0"  # the node's own HTTP port reports on its child
    cmd = [
        sys.executable,
        "-m",
        "dicom_node",
        "worker",
        "--queues",
        ",".join(roles),
        "--name",
        name,
    ]
    return subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent_hook())


def serve(settings: Settings, stop: threading.Event | None = None) -> None:
    """Run the node host until SIGTERM/SIGINT (or `stop` is set)."""
    settings.make_dirs()
    configure_libraries()
    setup_logging(settings.log_level, settings.log_dir / "node.log", settings.log_format)
    check_exposure(settings)  # before anything starts: no half-started node
    bundles = BundleCache(lambda: settings.bundle_in_use, ModelStore(settings.models_dir))
    bundle = bundles.current()  # fail fast, with the reason, on a bad bundle
    log.info(
        "bundle %s %s (%d members)%s",
        bundle.manifest.name,
        bundle.manifest.version,
        len(bundle.manifest.members),
        " - RANDOM WEIGHTS, plumbing only" if bundle.manifest.random_weights else "",
    )
    ledger = Ledger(settings.ledger_path)
    audit = AuditLog(settings.audit_path)
    events = NodeStoreEvents(audit, MetricsStore(settings.metrics_path))
    app = make_celery(settings)

    def enqueue_prepare(job_id: str) -> None:
        try:
            send_prepare(app, job_id)
        except Exception:  # the broker is away: the next sweep re-enqueues everything
            recovery.request_full_sweep()
            raise

    def enqueue_deliver(job_id: str, destination: str) -> None:
        send_deliver(app, job_id, destination)

    recovery = Recovery(settings, ledger, enqueue_prepare, enqueue_deliver)

    roles = worker_children(settings)
    log.info("queue: %s", "embedded" if settings.embedded else "broker (Celery over Redis)")
    stop = stop or threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        if threading.current_thread() is threading.main_thread():
            signal.signal(sig, lambda *_: stop.set())

    _release_claims(ledger, "the node starts")
    try:
        recovery()  # start-up: everything unfinished
    except Exception as exc:  # the node serves all the same: the spool is the source of truth
        recovery.request_full_sweep()
        log.warning(
            "start-up re-enqueue failed (%s); retried every %.0f s",
            describe_failure(exc),
            settings.recovery_interval_s,
        )
    children = {name: _spawn_worker(settings, name, queues) for name, queues in roles.items()}
    http = None
    if settings.http_port:
        http = start_http(
            settings.http_bind,
            settings.http_port,
            node_app(
                settings, ledger, bundles, lambda: all(c.poll() is None for c in children.values())
            ),
        )
    receivers = Receivers(settings) if settings.receiver_processes > 1 else None
    server = (
        start_scp(settings, ledger, enqueue_prepare, events, association_handlers(audit, settings))
        if receivers is None
        else None
    )
    periodic = PeriodicSweep(recovery, settings.recovery_interval_s)
    periodic.start()
    try:
        while not stop.wait(1.0):
            ended = [name for name, child in children.items() if child.poll() is not None]
            # A stop sent to every process of the node at once (a service manager's
            # control-group kill, Ctrl-C) ends workers before `serve` has run its handler:
            # give the signal a moment before taking their end for a crash.
            if ended and stop.wait(STOP_GRACE_S):
                break
            for name in ended:
                log.error(
                    "%s worker process exited with %s; restarting it",
                    name,
                    children[name].returncode,
                )
                if DELIVER_QUEUE in roles[name]:
                    _release_claims(ledger, f"the {name} worker restarts")
                children[name] = _spawn_worker(settings, name, roles[name])
            if receivers is not None:
                receivers.check()
    finally:
        log.info("shutting down")
        periodic.stop()
        if server is not None:
            server.shutdown()
        if receivers is not None:
            receivers.stop()
        if http is not None:
            http.stop()
        for child in children.values():
            child.terminate()
        for child in children.values():
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        log.info("stopped")
