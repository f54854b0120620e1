"""The Celery application: Redis when CXR_BROKER_URL is set, otherwise an embedded queue.

The embedded queue is kombu's filesystem transport in the data folder: no external service,
the same tasks and the same worker code path as with Redis. Messages are only hints; the
ledger is the source of truth (see `dicom_node.jobs.recovery`).
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from typing import Any

from celery import Celery
from kombu.transport import TRANSPORT_ALIASES, filesystem
from kombu.utils.json import dumps
from pydantic import BaseModel

from dicom_node.settings import Settings
from worker.contracts import ANALYSIS_FAILED, FINALIZE, INFER, NOT_ANALYSED

#: kombu's JSON encoder (it knows the types a Celery message may hold), typed.
_kombu_dumps: Callable[[Any], str] = dumps


def _message_bytes(message: Any) -> bytes:
    return _kombu_dumps(message).encode("utf-8")


def message_file_name(queue: str, priority: int, monotonic_ns: int) -> str:
    """The embedded queue's file for one message: '<priority>_<ns, 20 digits>_<uuid>.<queue>.msg'
    (kombu takes the part after the first dot as the queue's name)."""
    return f"{priority:d}_{monotonic_ns:020d}_{uuid.uuid4()}.{queue}.msg"


class _AtomicChannel(filesystem.Channel):
    def _put(self, queue: Any, message: Any, **kwargs: Any) -> None:  # type: ignore[override]
        """Write the message under a name consumers skip, then rename it into place.

        kombu's filesystem transport creates the message file before writing into it; a
        consumer listing the folder in between takes the empty file, and its Celery worker
        stops on the JSON error, the message lost until the recovery sweep (seen in
        bench/e2e.py once the folder was polled every 0.1 s).

        Consumers take a queue's files in sorted name order; the name starts with the
        message's priority (0 first, as with Redis: `TASK_PRIORITIES`), then the time, so
        the embedded queue serves priorities too, and in order of arrival within each.
        """
        priority: int = self._get_message_priority(message)  # type: ignore[no-untyped-call]
        name = message_file_name(queue, priority, time.monotonic_ns())
        tmp = os.path.join(self.data_folder_out, f"partial-{uuid.uuid4().hex}.tmp")
        with open(tmp, "wb") as fh:
            fh.write(_message_bytes(message))
        os.replace(tmp, os.path.join(self.data_folder_out, name))


class AtomicFilesystemTransport(filesystem.Transport):
    """kombu's filesystem transport whose messages appear whole (the embedded queue)."""

    Channel = _AtomicChannel


TRANSPORT_ALIASES.setdefault("cxrfs", f"{__name__}:AtomicFilesystemTransport")

NODE_QUEUE = "node"
INFER_QUEUE = "infer"
#: Deliveries have a queue of their own: a delivery waits on the destination (and
#: pynetdicom's threads poll while an association is open), so with the embedded queue they
#: run in a worker process of their own, off the threads that build results.
DELIVER_QUEUE = "deliver"
QUEUE_ROLES = (NODE_QUEUE, INFER_QUEUE, DELIVER_QUEUE)

PREPARE = "cxr.prepare"
DELIVER = "cxr.deliver"

#: Which role's queue each task goes to.
TASK_ROLES = {
    PREPARE: NODE_QUEUE,
    INFER: INFER_QUEUE,
    FINALIZE: NODE_QUEUE,
    DELIVER: DELIVER_QUEUE,
    ANALYSIS_FAILED: NODE_QUEUE,
    NOT_ANALYSED: NODE_QUEUE,
}


#: Message priorities on the node queue (Redis: 0 is served first, then 3, 6, 9; a task not
#: named here gets 0). Under a burst, analyses finish before more instances are prepared:
#: without it the first SR of a burst waits behind the preparation of all of it
#: (docs/RELIABILITY.md, Load). Deliveries need none: they have a queue of their own. The
#: embedded queue orders its files by them (`message_file_name`).
TASK_PRIORITIES = {
    FINALIZE: 3,
    ANALYSIS_FAILED: 3,
    NOT_ANALYSED: 3,
    PREPARE: 6,
}


class PrepareRequest(BaseModel):
    """Receiving or recovery -> node (queue "node"): decode and preprocess a spooled job."""

    job_id: str


class DeliverRequest(BaseModel):
    """finalize, recovery or `cxr-node retry` -> node: send a job's pending objects to one
    destination."""

    job_id: str
    destination: str


def send_prepare(app: Celery, job_id: str) -> None:
    app.send_task(PREPARE, args=[PrepareRequest(job_id=job_id).model_dump()])


def send_deliver(app: Celery, job_id: str, destination: str) -> None:
    app.send_task(
        DELIVER, args=[DeliverRequest(job_id=job_id, destination=destination).model_dump()]
    )


def queue_name(settings: Settings, role: str) -> str:
    """The broker queue of a role ("node", "infer" or "deliver"), namespaced by
    CXR_QUEUE_PREFIX so that several nodes can share one Redis."""
    if role not in QUEUE_ROLES:
        raise ValueError(f"unknown queue role {role!r}: use one of {', '.join(QUEUE_ROLES)}")
    return f"{settings.queue_prefix}{role}"


def make_celery(settings: Settings) -> Celery:
    app = Celery("cxr_node")
    conf: dict[str, object] = {
        "task_routes": {
            task: {"queue": queue_name(settings, role), "priority": TASK_PRIORITIES.get(task, 0)}
            for task, role in TASK_ROLES.items()
        },
        "task_default_queue": queue_name(settings, NODE_QUEUE),
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        "result_backend": None,
        # A job is acknowledged only when done, and redelivered if its worker dies.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
    }
    if settings.embedded:
        folder = settings.queue_dir / "messages"
        folder.mkdir(parents=True, exist_ok=True)
        conf["broker_url"] = "cxrfs://localhost//"  # a host: kombu warns of a URL without
        conf["broker_transport_options"] = {
            "data_folder_in": str(folder),
            "data_folder_out": str(folder),
            "control_folder": str(settings.queue_dir / "control"),
            "store_processed": False,
            # kombu polls the folder when it finds no message: its default of 1 s adds up
            # to a second per hop (4 hops per image: bench/e2e.py).
            "polling_interval": settings.embedded_poll_s,
        }
        conf["worker_enable_remote_control"] = False
    else:
        conf["broker_url"] = settings.broker_url
        # Tasks take seconds; a task unacknowledged for this long is assumed lost and
        # redelivered (celery#5306). Tasks are idempotent, so a redelivery is harmless.
        conf["broker_transport_options"] = {
            "visibility_timeout": settings.visibility_timeout_s,
        }
    app.conf.update(conf)
    return app
