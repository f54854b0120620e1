"""The audit log: one JSON object per line in `data_dir/logs/audit.jsonl`.

Every association (calling AE, address, accepted or rejected), every received instance (UIDs
only) and every delivery of a result object (UIDs, destination, status). Never a patient
name, id or birth date: callers pass UIDs, AE titles and addresses only, and `record`
refuses any other field name.

Several processes of the node host append to the same file: each line goes out in one
`write` on a file opened with O_APPEND, which the kernel keeps whole on a local file system.
The file is opened per line, so logrotate may rename it at any time (no copytruncate needed).
"""

from __future__ import annotations

import json
import logging
import os
from datetime import UTC, datetime
from pathlib import Path

log = logging.getLogger(__name__)

#: Field names an audit line may carry: identifiers and outcomes, nothing about the patient.
FIELDS = frozenset(
    {
        "calling_ae",
        "called_ae",
        "address",
        "port",
        "outcome",
        "reason",
        "job_id",
        "sop_class_uid",
        "sop_instance_uid",
        "study_instance_uid",
        "series_instance_uid",
        "source_sop_instance_uid",
        "kind",
        "destination",
        "status",
        "attempt",
    }
)

EVENTS = frozenset({"association", "received", "refused", "delivery"})


class AuditLog:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def record(self, event: str, **fields: object) -> None:
        """Append one audit line; an unwritable audit log is logged, never raised."""
        if event not in EVENTS:
            raise ValueError(f"unknown audit event {event!r}")
        unknown = set(fields) - FIELDS
        if unknown:
            raise ValueError(f"audit fields not allowed: {sorted(unknown)}")
        line: dict[str, object] = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "event": event,
        }
        line.update({k: v for k, v in fields.items() if v is not None})
        data = (json.dumps(line, separators=(",", ":"), default=str) + "\n").encode()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
        except OSError as exc:
            log.error("audit log %s not writable: %s", self.path, exc)
