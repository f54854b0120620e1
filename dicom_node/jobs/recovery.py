"""Re-enqueue what the ledger says is unfinished: at start-up, and periodically.

Queue messages can be lost (broker restart, embedded queue message taken by a process that
died); the spool and ledger cannot. Steps are idempotent, so a duplicate hint is harmless.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from dicom_node.records.ledger import UNFINISHED, Ledger

log = logging.getLogger(__name__)


def sweep(
    ledger: Ledger,
    enqueue_prepare: Callable[[str], None],
    enqueue_deliver: Callable[[str, str], None],
    older_than_s: float,
) -> int:
    """Enqueue unfinished jobs and pending deliveries not updated for older_than_s seconds."""
    cutoff = time.time() - older_than_s
    count = 0
    for job in ledger.jobs_in(UNFINISHED, older_than=cutoff):
        enqueue_prepare(job.job_id)
        count += 1
    for delivery in ledger.pending_deliveries(older_than=cutoff):
        enqueue_deliver(delivery.job_id, delivery.destination)
        count += 1
    if count:
        log.info("recovery: re-enqueued %d unfinished steps", count)
    return count


class PeriodicSweep(threading.Thread):
    def __init__(self, run: Callable[[], object], interval_s: float) -> None:
        super().__init__(name="recovery-sweep", daemon=True)
        self._run_sweep = run
        self._interval = interval_s
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self._interval):
            try:
                self._run_sweep()
            except Exception:
                log.exception("recovery sweep failed; will try again")

    def stop(self) -> None:
        self._stop_event.set()
