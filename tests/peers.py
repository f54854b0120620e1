"""Real peers for the reliability tests: an in-process SCP of the node, a DCMTK storescp that
keeps every copy it receives (`+uf`: a duplicate send shows as a second file), storescu with
the C-STORE status read from its debug output, and a Redis server of the test's own.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from pydicom import dcmread
from pydicom.uid import ComprehensiveSRStorage

from dicom_node.receiving.scp import start_scp
from dicom_node.records.ledger import Ledger
from dicom_node.settings import Settings
from tests.conftest import PLUMBING_BUNDLE, _port_open, free_port, require_tool, wait_for

if TYPE_CHECKING:
    import redis

COMPREHENSIVE_SR = ComprehensiveSRStorage


# --- the node's SCP in the test's process -------------------------------------------------


@dataclass
class Scp:
    settings: Settings
    ledger: Ledger
    enqueued: list[str]

    @property
    def port(self) -> int:
        return self.settings.port


@pytest.fixture
def scp(tmp_path: Path) -> Iterator[Callable[..., Scp]]:
    """Start the node's SCP (no queue: enqueued job ids are collected) with settings."""
    servers = []

    def start(**overrides: object) -> Scp:
        settings = Settings(
            port=free_port(),
            bind="127.0.0.1",
            data_dir=tmp_path / "node",
            bundle=PLUMBING_BUNDLE,
            min_free_disk_mb=0,
            **overrides,  # type: ignore[arg-type]
        )
        ledger = Ledger(settings.ledger_path)
        enqueued: list[str] = []
        servers.append(start_scp(settings, ledger, enqueued.append))
        return Scp(settings, ledger, enqueued)

    yield start
    for server in servers:
        server.shutdown()


# --- DCMTK ----------------------------------------------------------------------------------

_STATUS_RE = re.compile(r"DIMSE Status\s*:\s*0x([0-9A-Fa-f]{4})")


def storescu_statuses(
    port: int, paths: list[Path], *args: str, calling: str = "MODALITY", timeout: float = 600
) -> list[int]:
    """Send files in one association; the C-STORE status of each, in order."""
    exe = require_tool("storescu")
    done = subprocess.run(
        [exe, "-d", "-aet", calling, "-aec", "CXRNODE", *args, "127.0.0.1", str(port), *paths],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    found = [int(code, 16) for code in _STATUS_RE.findall(done.stdout + done.stderr)]
    assert len(found) == len(paths), (done.stdout + done.stderr)[-3000:]
    return found


@dataclass
class Pacs:
    """A DCMTK storescp as the destination; `+uf` keeps every copy it receives."""

    port: int
    folder: Path
    process: subprocess.Popen[bytes]
    ae_title: str = "PACS"

    @property
    def address(self) -> str:
        return f"{self.ae_title}@127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)

    def sr_copies(self) -> Counter[str]:
        """How many copies of each SR (by SOP Instance UID) arrived."""
        found: Counter[str] = Counter()
        for path in self.folder.iterdir():
            if not path.is_file():
                continue
            try:
                ds = dcmread(path, stop_before_pixels=True)
            except Exception:  # a file storescp is still writing
                continue
            if ds.SOPClassUID == COMPREHENSIVE_SR:
                found[str(ds.SOPInstanceUID)] += 1
        return found


def start_pacs(folder: Path, port: int | None = None) -> Pacs:
    exe = require_tool("storescp")
    folder.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    process = subprocess.Popen(
        [exe, "+uf", "--aetitle", "PACS", "--output-directory", str(folder), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(lambda: _port_open(port), 30, "storescp to listen")
    return Pacs(port, folder, process)


@pytest.fixture
def pacs_factory(tmp_path: Path) -> Iterator[Callable[..., Pacs]]:
    started: list[Pacs] = []

    def start(port: int | None = None) -> Pacs:
        pacs = start_pacs(tmp_path / f"pacs{len(started)}", port)
        started.append(pacs)
        return pacs

    yield start
    for pacs in started:
        pacs.stop()


# --- Redis of the test's own ------------------------------------------------------------------


_NO_DISK = ("--appendonly", "no", "--protected-mode", "yes")


@dataclass
class RedisServer:
    """A redis-server on a free port, without persistence: a restart loses every queue."""

    port: int
    folder: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("redis-server is not installed (deploy/install-system-deps.sh)")
        log = (self.folder / "redis.log").open("ab")
        self.process = subprocess.Popen(
            [
                exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--dir",
                str(self.folder),
                *_NO_DISK,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        wait_for(lambda: _port_open(self.port), 30, "redis-server to listen")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def client(self) -> redis.Redis:
        import redis

        return redis.Redis(port=self.port, socket_timeout=10)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    folder = tmp_path / "redis"
    folder.mkdir()
    server = RedisServer(free_port(), folder)
    server.start()
    yield server
    server.kill()
