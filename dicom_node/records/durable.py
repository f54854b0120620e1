"""Durable writes: an accepted instance is on disk before the sender hears "success"."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from worker.atomic import fsync_folder, write_atomic


def write_durably(path: Path, data: bytes | memoryview) -> None:
    """Write to a temporary name, fsync, rename into place, fsync the folder."""
    write_atomic(path, data, durable=True)


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def move_durably(src: Path, dst: Path) -> None:
    """Make the complete file `src` durable as `dst`: fsync it, rename it (a copy when `src`
    is on another file system), fsync the folder. No second copy of the data when renamed."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(src, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.replace(src, dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        write_durably(dst, src.read_bytes())
        src.unlink(missing_ok=True)
        return
    fsync_folder(dst.parent)
