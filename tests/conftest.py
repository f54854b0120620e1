"""Shared fixtures: real DICOM files, free ports, DCMTK peers, Orthanc and node processes."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.orthanc import orthanc  # noqa: F401  (fixture: a real Orthanc PACS)

REPO = Path(__file__).resolve().parent.parent
PLUMBING_BUNDLE = REPO / "tests" / "data" / "plumbing-bundle"
POOL_DIR = Path(os.environ.get("CXR_POOL_DIR", REPO.parent / "shared" / "cxr-data"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.2
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(
            f"{name} is not installed (make test installs it: deploy/install-system-deps.sh)"
        )
    return path


@pytest.fixture(scope="session", autouse=True)
def node_process_libraries() -> None:
    """What every node process sets at its start, set for the in-process SCPs and steps of
    the tests too."""
    from dicom_node.process_start import configure_libraries

    configure_libraries()


@pytest.fixture(scope="session")
def chest_cr() -> Path:
    """Real chest CR (NEMA WG04 RG1, Philips, MONOCHROME1, 15 bit), from PyPI pydicom-data."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file("RG1_UNCI.dcm")
    assert path is not None, "pydicom-data is not installed"
    return Path(path)


@pytest.fixture(scope="session")
def chest_cr_j2k() -> Path:
    """The same chest CR in JPEG 2000 lossless (a different SOP Instance UID)."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file("RG1_J2KR.dcm")
    assert path is not None, "pydicom-data is not installed"
    return Path(path)


@pytest.fixture(scope="session")
def pool_dicom_files() -> list[Path]:
    folder = POOL_DIR / "dicom"
    if not folder.is_dir():
        pytest.skip(f"public pool not found at {POOL_DIR} (set CXR_POOL_DIR)")
    return sorted(folder.glob("*.dcm"))


@dataclass
class Peer:
    """A DCMTK storescp playing a PACS destination."""

    ae_title: str
    port: int
    folder: Path
    process: subprocess.Popen[bytes]

    @property
    def address(self) -> str:
        return f"{self.ae_title}@127.0.0.1:{self.port}"

    def received(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_file())


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[Peer]:
    exe = require_tool("storescp")
    folder = tmp_path / "pacs"
    folder.mkdir()
    port = free_port()
    proc = subprocess.Popen(
        [exe, "--aetitle", "PACS", "--output-directory", str(folder), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(lambda: _port_open(port), 10, "storescp to listen")
    yield Peer("PACS", port, folder, proc)
    proc.terminate()
    proc.wait(timeout=10)


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class NodeProcess:
    port: int
    data_dir: Path
    env: dict[str, str]
    process: subprocess.Popen[bytes]
    log_path: Path
    extra: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def logs(self) -> str:
        text = self.log_path.read_text(errors="replace")
        for path in (self.data_dir / "logs").glob("*.log"):
            text += path.read_text(errors="replace")
        return text

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "dicom_node", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )


def node_env(data_dir: Path, port: int, **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
    env.update(
        {
            "CXR_PORT": str(port),
            "CXR_BIND": "127.0.0.1",
            "CXR_DATA_DIR": str(data_dir),
            "CXR_BUNDLE": str(PLUMBING_BUNDLE),
            "CXR_DELIVERY_BACKOFF_S": "1",
            "CXR_LOG_LEVEL": "INFO",
            "CXR_MIN_FREE_DISK_MB": "0",
            "CXR_HTTP_PORT": "0",  # tests that want the HTTP port pass http_port=...
        }
    )
    env.update({f"CXR_{k.upper()}": v for k, v in overrides.items()})
    return env


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[Callable[..., NodeProcess]]:
    """Start `cxr-node serve` (and, with a broker, a separate `cxr-node worker`)."""
    started: list[NodeProcess] = []

    def start(worker: bool = False, **overrides: str) -> NodeProcess:
        port = free_port()
        data_dir = tmp_path / "node"
        env = node_env(data_dir, port, **overrides)
        log_path = tmp_path / f"node-{len(started)}.stderr"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "dicom_node", "serve"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                start_new_session=True,
            )
        node = NodeProcess(port, data_dir, env, proc, log_path)
        started.append(node)
        if worker:
            wlog = (tmp_path / "worker.stderr").open("wb")
            node.extra.append(
                subprocess.Popen(
                    [sys.executable, "-m", "dicom_node", "worker"],
                    env=env,
                    stdout=wlog,
                    stderr=subprocess.STDOUT,
                    cwd=REPO,
                    start_new_session=True,
                )
            )
        wait_for(lambda: proc.poll() is not None or _port_open(port), 60, "the node to listen")
        assert proc.poll() is None, f"node exited: {log_path.read_text()}"
        return node

    yield start
    for node in started:
        for proc in [node.process, *node.extra]:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in [node.process, *node.extra]:
            try:
                proc.wait(timeout=40)
            except subprocess.TimeoutExpired as exc:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise AssertionError("a node process did not stop within 40 s of SIGTERM") from exc
            # nothing the node started may outlive it
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                continue
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("a process of the node's group outlived it")


# Fixtures of the reliability tests (an in-process SCP, storescp keeping duplicates, a Redis of
# the test's own); imported last, as tests.peers uses the helpers above.
from tests.peers import own_redis, pacs_factory, scp  # noqa: E402, F401
