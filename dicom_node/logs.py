"""Logging for the node and its workers: stderr plus a file in the data folder.

Log lines carry job ids and UIDs only, never patient names, ids or birth dates.
"""

from __future__ import annotations

import logging
import sys
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
