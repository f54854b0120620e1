"""Durable writes: an accepted instance is on disk before the sender hears "success"."""

from __future__ import annotations

import errno
import os
import shutil
import threading
from pathlib import Path


def write_durably(path: Path, data: bytes | memoryview) -> None:
    """Write to a temporary name, fsync, rename into place, fsync the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # a name of its own per writer: two runs of a redone step may write the same file at once
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.part")
    try:
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


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
    dir_fd = os.open(dst.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
