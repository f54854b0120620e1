"""`cxr-node serve`: the node host process, and `cxr-node worker`: a Celery worker process.

serve = SCP + producer + recovery sweep + a supervised worker child. With the embedded queue
the child consumes both queues ("node" and "infer"); with Redis it consumes "node" only, and
`cxr-node worker` processes (on any host) consume "infer".
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading

from dicom_node.ledger import Ledger
from dicom_node.logs import setup_logging
from dicom_node.queue import DELIVER, INFER_QUEUE, NODE_QUEUE, PREPARE, make_celery, queue_name
from dicom_node.receiver import Receivers
from dicom_node.recovery import PeriodicSweep, sweep
from dicom_node.scp import start_scp
from dicom_node.settings import Settings
from dicom_node.tasks import register_tasks
from worker.bundle import load_bundle

log = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 60.0


def run_worker(settings: Settings, roles: list[str], name: str) -> None:
    """Run a Celery worker for the queues of `roles` ("node", "infer") until stopped (blocks)."""
    queues = [queue_name(settings, role) for role in roles]
    setup_logging(settings.log_level, settings.log_dir / f"worker-{name}.log")
    app = make_celery(settings)
    register_tasks(app, settings)
    argv = [
        "worker",
        f"--queues={','.join(queues)}",
        "--pool=threads",
        f"--concurrency={settings.worker_concurrency}",
        f"--hostname={name}@{socket.gethostname()}",
        f"--loglevel={settings.log_level}",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    app.worker_main(argv)


def _spawn_worker(settings: Settings, queues: list[str]) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env["CXR_DATA_DIR"] = str(settings.data_dir.resolve())
    env["CXR_BUNDLE"] = str(settings.bundle.resolve())
    cmd = [
        sys.executable,
        "-m",
        "dicom_node.cli",
        "worker",
        "--queues",
        ",".join(queues),
        "--name",
        "node",
    ]
    return subprocess.Popen(cmd, env=env)


def serve(settings: Settings, stop: threading.Event | None = None) -> None:
    """Run the node host until SIGTERM/SIGINT (or `stop` is set)."""
    settings.make_dirs()
    setup_logging(settings.log_level, settings.log_dir / "node.log")
    bundle = load_bundle(settings.bundle)  # fail fast, with the reason, on a bad bundle
    log.info(
        "bundle %s %s (%d members)%s",
        bundle.manifest.name,
        bundle.manifest.version,
        len(bundle.manifest.members),
        " - RANDOM WEIGHTS, plumbing only" if bundle.manifest.random_weights else "",
    )
    ledger = Ledger(settings.ledger_path)
    app = make_celery(settings)

    def enqueue_prepare(job_id: str) -> None:
        app.send_task(PREPARE, args=[job_id])

    def enqueue_deliver(job_id: str, destination: str) -> None:
        app.send_task(DELIVER, args=[job_id, destination])

    queues = [NODE_QUEUE, INFER_QUEUE] if settings.embedded else [NODE_QUEUE]
    log.info("queue: %s", "embedded" if settings.embedded else "broker (Celery over Redis)")
    stop = stop or threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        if threading.current_thread() is threading.main_thread():
            signal.signal(sig, lambda *_: stop.set())

    sweep(ledger, enqueue_prepare, enqueue_deliver, older_than_s=0)
    child = _spawn_worker(settings, queues)
    receivers = Receivers(settings) if settings.receiver_processes > 1 else None
    server = start_scp(settings, ledger, enqueue_prepare) if receivers is None else None
    periodic = PeriodicSweep(
        lambda: sweep(ledger, enqueue_prepare, enqueue_deliver, settings.visibility_timeout_s),
        SWEEP_INTERVAL_S,
    )
    periodic.start()
    try:
        while not stop.wait(1.0):
            if child.poll() is not None:
                log.error("worker process exited with %s; restarting it", child.returncode)
                child = _spawn_worker(settings, queues)
            if receivers is not None:
                receivers.check()
    finally:
        log.info("shutting down")
        periodic.stop()
        if server is not None:
            server.shutdown()
        if receivers is not None:
            receivers.stop()
        child.terminate()
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        log.info("stopped")
