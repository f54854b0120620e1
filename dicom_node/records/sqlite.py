"""The node's SQLite connections: autocommit, durable, patient with other processes.

A connection is opened once per thread and database file and then reused: opening one, with
its PRAGMAs, cost about 15 ms of a job's worker time, for a dozen ledger calls per image
(docs/BENCHMARKS.md, Burst profile). No transaction outlives its operation: a connection
whose operation raised is closed, one left inside a transaction is rolled back.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: Databases one thread keeps open (the ledger, the hospital index, a few more in tests);
#: the one used longest ago is closed beyond that.
KEPT_PER_THREAD = 8

_kept = threading.local()


def _open(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=30.0, isolation_level=None)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA busy_timeout=30000")
    return db


def _thread_connections() -> OrderedDict[tuple[int, str], sqlite3.Connection]:
    connections: OrderedDict[tuple[int, str], sqlite3.Connection] | None = getattr(
        _kept, "connections", None
    )
    if connections is None:
        connections = _kept.connections = OrderedDict()
    return connections


@contextmanager
def connect(path: Path) -> Iterator[sqlite3.Connection]:
    """This thread's connection to `path` for one operation (the ledger, the hospital
    index): rows by name, synchronous=FULL, waits up to 30 s for other writers. A
    connection whose operation raised is closed (which rolls back what it left open) and not
    reused."""
    connections = _thread_connections()
    # per process too: a connection must not cross a fork
    key = (os.getpid(), os.path.abspath(path))
    db = connections.pop(key, None)
    if db is None:
        db = _open(path)
    try:
        yield db
    except BaseException:
        db.close()  # rolls back what the operation left open; the next call opens afresh
        raise
    else:
        if db.in_transaction:  # an operation that returned inside its transaction
            db.rollback()
    # reached only when the connection is sound: keep it as the most recently used
    nested = connections.pop(key, None)  # a call inside this one opened its own
    if nested is not None:
        nested.close()
    connections[key] = db
    while len(connections) > KEPT_PER_THREAD:
        _, oldest = connections.popitem(last=False)
        oldest.close()


def close_thread_connections() -> None:
    """Close the connections this thread keeps (tests; a thread about to end)."""
    connections = _thread_connections()
    while connections:
        _, db = connections.popitem()
        db.close()
