"""Receiving in several processes (setting `receiver_processes` > 1).

One Python process receives at most one core's worth of C-STORE traffic: with 4 parallel
senders of 10 MB radiographs a single pynetdicom SCP reaches less than half of DCMTK
`storescp --fork` (bench/ingest.py). Here N receiver processes each listen on the DICOM port
with SO_REUSEPORT, and the kernel spreads incoming associations over them. Each process
checks, spools, records in the ledger and enqueues exactly as the single SCP does
(`dicom_node.receiving.scp.StoreHandler`), with two differences that remove copies of the
pixel data:

- pynetdicom writes the data set to a file as its fragments arrive
  (`_config.STORE_RECV_CHUNKED_DATASET`), in a folder beside the spool;
- the handler reads only the header from that file (large values are not loaded) and makes
  it durable by fsync and rename into the spool, instead of writing a second copy.

The ledger is SQLite in WAL mode with a busy timeout: writers in several processes wait for
each other rather than fail (tests/test_receiver.py). `cxr-node serve` starts and supervises
the receiver processes; they share nothing else.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from pynetdicom import _config
from pynetdicom.events import Event
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.jobs.queue import make_celery, send_prepare
from dicom_node.logs import setup_logging
from dicom_node.process_start import configure_libraries
from dicom_node.receiving.events import NodeStoreEvents, association_handlers
from dicom_node.receiving.scp import (
    Enqueue,
    GuardedServer,
    StoreEvents,
    StoreHandler,
    serve_guarded,
)
from dicom_node.records.audit import AuditLog
from dicom_node.records.durable import move_durably
from dicom_node.records.ledger import Ledger
from dicom_node.records.metrics_store import MetricsStore
from dicom_node.settings import Settings

log = logging.getLogger(__name__)

#: Values longer than this stay in the file when the handler reads the header.
HEADER_DEFER_BYTES = 4096


class FileStoreHandler(StoreHandler):
    """StoreHandler for pynetdicom's write-to-file receive mode."""

    def read(self, event: Event) -> Dataset:
        return dcmread(event.dataset_path, defer_size=HEADER_DEFER_BYTES)

    def spool(self, event: Event, path: Path) -> None:
        move_durably(Path(event.dataset_path), path)

    def received_bytes(self, event: Event) -> int:
        return Path(event.dataset_path).stat().st_size


class ReusePortServer(GuardedServer):
    """The guarded association server (address allow-list, TLS), its socket sharing the
    port with the other receivers."""

    def server_bind(self) -> None:
        assert self.socket is not None
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


def incoming_dir(settings: Settings) -> Path:
    """Where partial instances are written while they arrive: beside the spool (same file
    system, so that making one durable is a rename)."""
    return settings.spool_dir / ".incoming"


#: A partial file untouched this long was left by a receiver that died while receiving.
ABANDONED_AFTER_S = 3600.0


def remove_abandoned(folder: Path, older_than_s: float = ABANDONED_AFTER_S) -> int:
    """Delete partial instances no receiver is writing any more; how many were deleted."""
    cutoff = time.time() - older_than_s
    removed = 0
    for path in folder.iterdir():
        try:
            if path.is_file() and path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
        except FileNotFoundError:  # another receiver took it first
            continue
    if removed:
        log.warning("removed %d partial instance(s) left by an interrupted receive", removed)
    return removed


def start_receiver(
    settings: Settings,
    ledger: Ledger,
    enqueue: Enqueue,
    events: StoreEvents | None = None,
    extra_handlers: list[tuple[Any, Callable[[Event], None]]] | None = None,
) -> ThreadedAssociationServer:
    """Listen (SO_REUSEPORT) in this process, receiving to files; the caller shuts it down.
    The same guards as the single SCP (`dicom_node.receiving.scp.start_scp`); the association limit
    applies per receiver process."""
    settings.make_dirs()
    incoming = incoming_dir(settings)
    incoming.mkdir(parents=True, exist_ok=True)
    remove_abandoned(incoming)
    if not _config.STORE_RECV_CHUNKED_DATASET:
        raise RuntimeError("receiving to files: call configure_libraries(receive_into=...) first")
    handler = FileStoreHandler(settings, ledger, enqueue, events or StoreEvents())
    return serve_guarded(settings, handler, ReusePortServer, extra_handlers, "receiver")


def run_receiver(settings: Settings, name: str, stop: threading.Event | None = None) -> None:
    """One receiver process: listen until SIGTERM/SIGINT (or `stop`)."""
    configure_libraries(receive_into=incoming_dir(settings))
    setup_logging(
        settings.log_level, settings.log_dir / f"receiver-{name}.log", settings.log_format
    )
    ledger = Ledger(settings.ledger_path)
    audit = AuditLog(settings.audit_path)
    events = NodeStoreEvents(audit, MetricsStore(settings.metrics_path))
    app = make_celery(settings)

    def enqueue_prepare(job_id: str) -> None:
        send_prepare(app, job_id)

    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    server = start_receiver(
        settings, ledger, enqueue_prepare, events, association_handlers(audit, settings)
    )
    log.info(
        "receiver %s (pid %d) listening on %s:%d", name, os.getpid(), settings.bind, settings.port
    )
    stop.wait()
    server.shutdown()
    log.info("receiver %s stopped", name)


def spawn_receiver(settings: Settings, name: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env["CXR_DATA_DIR"] = str(settings.data_dir.resolve())
    env["CXR_BUNDLE"] = str(settings.bundle.resolve())
    return subprocess.Popen([sys.executable, "-m", "dicom_node.receiving.processes", name], env=env)


class Receivers:
    """`receiver_processes` receiver processes, restarted when one exits."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.processes = {
            str(i): spawn_receiver(settings, str(i)) for i in range(settings.receiver_processes)
        }

    def check(self) -> None:
        for name, proc in list(self.processes.items()):
            if proc.poll() is not None:
                log.error("receiver %s exited with %s; restarting it", name, proc.returncode)
                self.processes[name] = spawn_receiver(self.settings, name)

    def stop(self) -> None:
        for proc in self.processes.values():
            proc.terminate()
        for proc in self.processes.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "0"
    run_receiver(Settings(), name)


if __name__ == "__main__":
    main()
