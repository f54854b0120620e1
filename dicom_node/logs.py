"""Logging for the node and its workers: stderr plus a file in the data folder.

Log lines carry job ids and UIDs only, never patient names, ids or birth dates. With
`CXR_LOG_FORMAT=json` each line is one JSON object (python-json-logger) with a fixed set of
fields - time, level, process, logger, message (and exc_info) - so that a log shipper can
parse it; extra attributes that libraries attach to records (Celery puts task arguments
there) are left out.
"""

from __future__ import annotations

import logging
import sys
import traceback
from pathlib import Path
from typing import Any

from pythonjsonlogger.json import JsonFormatter

FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"

#: The fields of a JSON log line, in order (renamed from the LogRecord attributes).
JSON_FIELDS = {
    "asctime": "time",
    "levelname": "level",
    "processName": "process",
    "name": "logger",
    "message": "message",
}


class _JsonFormatter(JsonFormatter):
    def process_log_record(self, log_data: dict[str, Any]) -> dict[str, Any]:
        keep = {*JSON_FIELDS.values(), "exc_info", "stack_info"}
        return {k: v for k, v in log_data.items() if k in keep}


def make_formatter(log_format: str = "text") -> logging.Formatter:
    if log_format == "json":
        return _JsonFormatter(
            list(JSON_FIELDS),
            datefmt="%Y-%m-%dT%H:%M:%S%z",
            rename_fields=JSON_FIELDS,
            json_ensure_ascii=False,
        )
    return logging.Formatter(FORMAT)


def setup_logging(level: str, log_file: Path | None, log_format: str = "text") -> None:
    root = logging.getLogger()
    root.setLevel(level.upper())
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(make_formatter(log_format))
        root.addHandler(handler)
    # pynetdicom at INFO narrates every association; its DEBUG level dumps data sets.
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, root.level))
    # Celery at INFO logs every task twice ("received", "succeeded in"): the node's own line
    # per step says what happened. Failures are still logged (ERROR).
    for name in ("celery.worker.strategy", "celery.app.trace"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    _set_filter(logging.getLogger("pydicom.pixels.decoders.base"), TracebackToDebug())
    # pynetdicom warns of a non-conformant UID in a message it decodes and again in the
    # response it encodes; the C-STORE handler refuses such an instance and says so once.
    _set_filter(logging.getLogger("pynetdicom.utils"), DropNonConformantUid())


def _set_filter(logger: logging.Logger, new: logging.Filter) -> None:
    """Add `new` to `logger` once (setup_logging may run again in one process)."""
    for old in [f for f in logger.filters if type(f) is type(new)]:
        logger.removeFilter(old)
    logger.addFilter(new)


class TracebackToDebug(logging.Filter):
    """pydicom logs each decoder plugin's failure as an ERROR with its traceback, before it
    raises; an undecodable image is an expected outcome (the job is rejected with one WARNING
    line giving the reason), so these records go out at DEBUG, or not at all."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or not record.exc_info:
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger().isEnabledFor(logging.DEBUG)


class DropNonConformantUid(logging.Filter):
    """pynetdicom's "Non-conformant 'Affected SOP Instance UID' value ..." warnings."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Non-conformant")


def describe_failure(exc: BaseException) -> str:
    """What failed and where, without the exception's message: messages of DICOM libraries
    can quote attribute values, patient names among them."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return type(exc).__name__
    last = frames[-1]
    return f"{type(exc).__name__} in {last.name} ({Path(last.filename).name}:{last.lineno})"
