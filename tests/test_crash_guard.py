"""The crash guard: a step that ends its process is run again at most `limit` times.

The crashes are real: a forked child enters the guard and is killed by SIGKILL inside it, as
the kernel's OOM killer or a native fault would end a worker.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from pathlib import Path

import pytest

from worker.crash_guard import CrashGuard, StepKeptCrashing


def _die_inside(folder: Path, limit: int, step: str, job_id: str) -> None:
    with CrashGuard(folder, limit).running(step, job_id):
        os.kill(os.getpid(), signal.SIGKILL)


def crash_in_child(folder: Path, limit: int, step: str = "inference", job_id: str = "j1") -> int:
    child = multiprocessing.get_context("fork").Process(
        target=_die_inside, args=(folder, limit, step, job_id)
    )
    child.start()
    child.join(30)
    assert child.exitcode == -signal.SIGKILL
    return child.pid or 0


def test_runs_that_end_leave_no_marker(tmp_path: Path) -> None:
    guard = CrashGuard(tmp_path, limit=1)
    with guard.running("prepare", "j1"):
        (marker,) = guard.markers()
        assert (marker.step, marker.job_id, marker.runs, marker.pid) == (
            "prepare",
            "j1",
            1,
            os.getpid(),
        )
    with pytest.raises(RuntimeError), guard.running("prepare", "j1"):
        raise RuntimeError("a step that fails with an exception ended")
    assert guard.markers() == []
    assert guard.unended_runs("prepare", "j1") == 0


def test_a_killed_run_is_counted_and_the_limit_stops_the_next(tmp_path: Path) -> None:
    guard = CrashGuard(tmp_path, limit=2)
    pid = crash_in_child(tmp_path, 2)
    (marker,) = guard.markers()
    assert (marker.runs, marker.pid) == (1, pid)
    crash_in_child(tmp_path, 2)  # the second run starts, counts 2, dies too
    assert guard.unended_runs("inference", "j1") == 2
    # other steps and other jobs are not affected
    with guard.running("finalize", "j1"), guard.running("inference", "j2"):
        pass
    ran = False
    with (
        pytest.raises(StepKeptCrashing, match="ended the worker process 2 time"),
        guard.running("inference", "j1"),
    ):
        ran = True
    assert not ran
    # the marker is gone with the failure: a retry by an operator starts afresh
    assert guard.markers() == []
    with guard.running("inference", "j1"):
        ran = True
    assert ran


def test_a_run_after_a_crash_below_the_limit_goes_ahead(tmp_path: Path) -> None:
    crash_in_child(tmp_path, 3)
    guard = CrashGuard(tmp_path, limit=3)
    with guard.running("inference", "j1"):
        assert guard.unended_runs("inference", "j1") == 2  # the dead run and this one
    assert guard.markers() == []


def test_job_ids_cannot_leave_the_folder(tmp_path: Path) -> None:
    folder = tmp_path / "running"
    guard = CrashGuard(folder, limit=1)
    with guard.running("inference", "../../etc/x y"):
        (path,) = folder.iterdir()
        assert path.parent == folder
        (marker,) = guard.markers()
        assert marker.job_id == "../../etc/x y"


def test_limit_must_allow_one_run(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        CrashGuard(tmp_path, limit=0)
