"""Atomic file writes: a reader sees the old file or the new one, never half of one.

The data goes to a temporary name beside the target (one per writer: two runs of a redone step
may write the same file at once), then `os.replace` puts it in place. `durable` (the default)
adds the fsyncs that make the new file survive a power cut once the call returns: the file's
before the rename, the folder's after it.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


@contextlib.contextmanager
def atomic_file(path: Path, *, durable: bool = True) -> Iterator[BinaryIO]:
    """A binary file to write `path`'s new content to; in place when the block ends cleanly.

    On an exception the temporary file is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.part")
    try:
        with tmp.open("wb") as fh:
            yield fh
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_folder(path.parent)


def fsync_folder(folder: Path) -> None:
    """Make the names in `folder` durable (a rename or a new link into it)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes | memoryview | str, *, durable: bool = True) -> None:
    """`path` holds `data` (str as UTF-8), all of it or, after a crash, its old content."""
    with atomic_file(path, durable=durable) as fh:
        fh.write(data.encode("utf-8") if isinstance(data, str) else data)
