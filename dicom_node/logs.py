"""Logging for the node and its workers: stderr plus a file in the data folder.

Log lines carry job ids and UIDs only, never patient names, ids or birth dates.
"""

from __future__ import annotations

import logging
import sys
import traceback
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"


def setup_logging(level: str, log_file: Path | None) -> None:
    root = logging.getLogger()
    root.setLevel(level.upper())
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(handler)
    # pynetdicom at INFO narrates every association; its DEBUG level dumps data sets.
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, root.level))


def describe_failure(exc: BaseException) -> str:
    """What failed and where, without the exception's message: messages of DICOM libraries
    can quote attribute values, patient names among them."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return type(exc).__name__
    last = frames[-1]
    return f"{type(exc).__name__} in {last.name} ({Path(last.filename).name}:{last.lineno})"
