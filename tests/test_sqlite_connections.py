"""The kept SQLite connections: one per thread and file, never left inside a transaction."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from dicom_node.records.sqlite import KEPT_PER_THREAD, close_thread_connections, connect


@pytest.fixture(autouse=True)
def _fresh() -> None:
    close_thread_connections()


def test_a_thread_reuses_its_connection(tmp_path: Path) -> None:
    with connect(tmp_path / "a.sqlite3") as first:
        pass
    with connect(tmp_path / "a.sqlite3") as second:
        assert second is first
        assert second.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_threads_do_not_share_a_connection(tmp_path: Path) -> None:
    with connect(tmp_path / "a.sqlite3") as mine:
        pass
    theirs: list[sqlite3.Connection] = []

    def use() -> None:
        with connect(tmp_path / "a.sqlite3") as db:
            theirs.append(db)

    thread = threading.Thread(target=use)
    thread.start()
    thread.join()
    assert theirs and theirs[0] is not mine


def test_an_operation_that_raises_leaves_no_open_transaction(tmp_path: Path) -> None:
    path = tmp_path / "a.sqlite3"
    with connect(path) as db:
        db.execute("CREATE TABLE t (x INTEGER)")
    with pytest.raises(RuntimeError), connect(path) as failing:
        failing.execute("BEGIN IMMEDIATE")
        failing.execute("INSERT INTO t VALUES (1)")
        raise RuntimeError("between BEGIN and COMMIT")
    with connect(path) as db:
        assert db is not failing  # closed, not reused
        assert not db.in_transaction
        assert db.execute("SELECT COUNT(*) FROM t").fetchone()[0] == 0
    # another connection can write at once: no lock was left behind
    other = sqlite3.connect(path, timeout=0.1, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO t VALUES (2)")
    other.execute("COMMIT")
    other.close()


def test_an_operation_that_returns_inside_a_transaction_is_rolled_back(tmp_path: Path) -> None:
    path = tmp_path / "a.sqlite3"
    with connect(path) as db:
        db.execute("CREATE TABLE t (x INTEGER)")
    with connect(path) as db:
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO t VALUES (1)")
    with connect(path) as db:
        assert not db.in_transaction
        assert db.execute("SELECT COUNT(*) FROM t").fetchone()[0] == 0


def test_only_a_few_files_stay_open_per_thread(tmp_path: Path) -> None:
    opened = []
    for n in range(KEPT_PER_THREAD + 3):
        with connect(tmp_path / f"{n}.sqlite3") as db:
            opened.append(db)
    closed = 0
    for db in opened:
        try:
            db.execute("SELECT 1")
        except sqlite3.ProgrammingError:  # "Cannot operate on a closed database."
            closed += 1
    assert closed == 3
