"""Stop re-running a job step that ends the worker process.

A step that crashes its process (a native decoder or runtime fault, the kernel's OOM killer)
raises no exception the pipeline could turn into a failed job: the queue gives the message
back (Redis, after the visibility time-out) or the recovery sweep sends the job again
(embedded queue), and the step kills the worker again, every time, with every job that was
in flight beside it. So each run of a step leaves a marker on disk while it runs; a marker
still there when the same step of the same job starts again says that an earlier run never
ended. After `limit` such runs the step is not run again and the job fails, visibly, with the
reason (an operator can retry it from the dead-letter list).

The markers are per host (the worker's data folder), so with several worker hosts a job may
be tried up to `limit` times on each.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from worker.atomic import write_atomic

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


class StepKeptCrashing(Exception):
    """The step ended its process `crashes` times; it is not run again."""

    def __init__(self, step: str, crashes: int) -> None:
        self.step = step
        self.crashes = crashes
        super().__init__(
            f"{step} ended the worker process {crashes} time(s) (crashed or killed, e.g. out "
            "of memory) and is not run again"
        )


@dataclass(frozen=True)
class Marker:
    step: str
    job_id: str
    runs: int  # runs started and not ended, this one included
    pid: int  # the process running it


class CrashGuard:
    """Markers of running steps in `folder`; `limit` unended runs fail the job."""

    def __init__(self, folder: Path, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.folder = folder
        self.limit = limit
        self._lock = threading.Lock()  # the worker runs steps in threads

    def _path(self, step: str, job_id: str) -> Path:
        return self.folder / f"{_UNSAFE.sub('_', step)}--{_UNSAFE.sub('_', job_id)}.running"

    def unended_runs(self, step: str, job_id: str) -> int:
        """Earlier runs of this step for this job that never ended (0 if none)."""
        marker = read_marker(self._path(step, job_id))
        return marker.runs if marker is not None else 0

    @contextmanager
    def running(self, step: str, job_id: str) -> Iterator[None]:
        """Run the body as one run of `step` for `job_id`.

        Raises StepKeptCrashing (before the body) when `limit` earlier runs never ended; the
        marker is then removed, so that a retry by an operator starts afresh.
        """
        path = self._path(step, job_id)
        with self._lock:
            crashed = self.unended_runs(step, job_id)
            if crashed >= self.limit:
                path.unlink(missing_ok=True)
                raise StepKeptCrashing(step, crashed)
            self.folder.mkdir(parents=True, exist_ok=True)
            _write_marker(path, Marker(step, job_id, crashed + 1, os.getpid()))
        try:
            yield
        finally:
            # ended, well or with an exception: only a dead process leaves its marker
            with self._lock:
                path.unlink(missing_ok=True)

    def markers(self) -> list[Marker]:
        """The steps running now, or left by a process that died running them."""
        found = (read_marker(p) for p in sorted(self.folder.glob("*.running")))
        return [m for m in found if m is not None]


def _write_marker(path: Path, marker: Marker) -> None:
    # Written before the step and read only after the process died: a process that dies
    # leaves the page cache to the kernel, so no fsync is needed for that.
    text = f"{marker.step}\n{marker.job_id}\n{marker.runs}\n{marker.pid}\n"
    write_atomic(path, text, durable=False)


def read_marker(path: Path) -> Marker | None:
    try:
        step, job_id, runs, pid = path.read_text().split("\n")[:4]
        return Marker(step, job_id, int(runs), int(pid))
    except (OSError, ValueError):
        return None
