"""Health checks and gauges read at request time: broker, ledger, disk, bundle, queue depth.

A check returns (ok, detail); `/health` answers 200 when every check is ok, 503 otherwise,
with the details as JSON so that an operator (or a load balancer) sees which one failed.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field

from kombu.exceptions import ChannelError

from dicom_node.jobs.queue import QUEUE_ROLES, make_celery, queue_name
from dicom_node.records.durable import free_bytes
from dicom_node.records.ledger import Ledger
from dicom_node.settings import Settings

Check = Callable[[], tuple[bool, str]]

_REDIS_TIMEOUT_S = 2.0
_BROKER_TIMEOUT_S = 2.0


def _redis(url: str):  # type: ignore[no-untyped-def]
    import redis

    return redis.Redis.from_url(
        url, socket_timeout=_REDIS_TIMEOUT_S, socket_connect_timeout=_REDIS_TIMEOUT_S
    )


def check_broker(settings: Settings) -> tuple[bool, str]:
    if settings.embedded:
        folder = settings.queue_dir
        ok = folder.is_dir() and os.access(folder, os.W_OK)
        return ok, f"embedded queue in {folder}" + ("" if ok else ": not writable")
    try:
        _redis(settings.broker_url or "").ping()
    except Exception as exc:  # any failure to reach the broker is the answer
        return False, f"broker unreachable: {type(exc).__name__}: {exc}"
    return True, "broker answers"


def check_ledger(ledger: Ledger) -> tuple[bool, str]:
    try:
        ledger.check_writable()
    except (sqlite3.Error, OSError) as exc:
        return False, f"ledger not writable: {exc}"
    return True, "ledger writable"


def check_disk(settings: Settings) -> tuple[bool, str]:
    try:
        free = free_bytes(settings.data_dir)
    except OSError as exc:
        return False, f"data folder unavailable: {exc}"
    need = settings.min_free_disk_mb * 1024 * 1024
    mb = free // (1024 * 1024)
    if free < need:
        return False, f"{mb} MB free, below CXR_MIN_FREE_DISK_MB={settings.min_free_disk_mb}"
    return True, f"{mb} MB free"


def check_bundle(load: Callable[[], object]) -> tuple[bool, str]:
    try:
        bundle = load()
    except Exception as exc:
        return False, f"bundle not usable: {exc}"
    manifest = getattr(bundle, "manifest", None)
    return True, f"{getattr(manifest, 'name', '?')} {getattr(manifest, 'version', '?')}"


def queue_depths(settings: Settings) -> dict[str, int]:
    """Messages waiting per queue role (not counting those a worker holds), as the broker's
    transport counts them: a passive declare answers with the message count, on Redis (all
    its priority lists) and on the embedded queue alike. A queue that does not exist yet
    holds nothing."""
    names = {role: queue_name(settings, role) for role in QUEUE_ROLES}
    depths = {}
    with make_celery(settings).connection_for_read() as connection:
        connection.ensure_connection(max_retries=1, timeout=_BROKER_TIMEOUT_S)
        channel = connection.default_channel
        for role, name in names.items():
            try:
                depths[role] = int(channel.queue_declare(queue=name, passive=True).message_count)
            except ChannelError:  # never declared: nothing was ever queued there
                depths[role] = 0
    return depths


@dataclass
class Health:
    """Named checks; all must pass."""

    checks: dict[str, Check] = field(default_factory=dict)

    def run(self) -> tuple[bool, dict[str, object]]:
        results: dict[str, object] = {}
        healthy = True
        for name, check in self.checks.items():
            try:
                ok, detail = check()
            except Exception as exc:
                ok, detail = False, f"check failed: {type(exc).__name__}: {exc}"
            healthy &= ok
            results[name] = {"ok": ok, "detail": detail}
        return healthy, {"status": "ok" if healthy else "unhealthy", "checks": results}
