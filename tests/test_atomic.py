"""worker.atomic: a file is replaced whole or not at all."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from worker import atomic
from worker.atomic import atomic_file, write_atomic


def test_write_replaces_the_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "result.json"
    write_atomic(path, "first")
    write_atomic(path, b"second")
    assert path.read_bytes() == b"second"
    assert [p.name for p in path.parent.iterdir()] == ["result.json"]


def test_a_failed_write_keeps_the_old_content(tmp_path: Path) -> None:
    path = tmp_path / "best.pt"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_file(path) as fh:
        fh.write(b"half of the new")
        raise RuntimeError("crash while writing")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]


@pytest.mark.parametrize(("durable", "expected"), [(True, 2), (False, 0)])
def test_durable_writes_fsync_the_file_and_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durable: bool, expected: int
) -> None:
    calls: list[int] = []
    real = os.fsync

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(atomic.os, "fsync", counting)
    write_atomic(tmp_path / "x", "data", durable=durable)
    assert len(calls) == expected
