"""C-STORE receive rate: the node vs DCMTK storescp writing the same files, 1 and 4 senders.

Receivers (each on its own free port, all on this machine):
- `storescp +xa` (one process; associations one after another) and `storescp +xa --fork`
  (a process per association): the practical upper bound;
- node-scp: the node's SCP as `cxr-node serve` runs it by default (one process, data set
  decoded in memory, `dicom_node.receiving.scp.StoreHandler`); "(before)": as it was before this
  benchmark (maximum PDU offered "unlimited");
- node-recv-N: N receiver processes (`dicom_node.receiving.processes`, CXR_RECEIVER_PROCESSES=N):
  SO_REUSEPORT, pynetdicom's write-to-file receive, rename into the spool.
The node's receivers do what the node does on every instance: check, spool with fsync,
ledger row (SQLite, synchronous FULL), enqueue on the embedded queue (no worker consumes it
here). storescp writes without fsync: the comparison favours it.

Senders: DCMTK `storescu`, one association each, started together; the time is from their
start until the last one exits (every C-STORE answered). Each node run gets fresh SOP
Instance UIDs (the node does not store a duplicate twice). Runs alternate between receivers
so that load on a shared machine hits them alike; medians over repeats.

Files: a large uncompressed CR (~10 MB: the pydicom-data chest CR RG1_UNCI upscaled to
2300 x 2300) and the same CR in JPEG 2000 lossless (RG1_J2KR, 4.3 MB).

    python -m bench.ingest [--count 12] [--repeats 3] [--senders 1,4]
    python -m bench.ingest --smoke
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from pydicom import Dataset, dcmread
from pydicom.uid import JPEG2000Lossless, generate_uid

from bench.common import header, median, pydicom_test_file, table

STORESCU_FLAG: dict[str, str] = {JPEG2000Lossless: "-xv"}  # JPEG 2000 lossless


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port}")


def large_cr(side: int = 2300) -> Dataset:
    ds = dcmread(pydicom_test_file("RG1_UNCI.dcm"))
    pixels = cv2.resize(ds.pixel_array, (side, side), interpolation=cv2.INTER_LINEAR)
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint16).tobytes()
    return ds


def compressed_cr() -> Dataset:
    return dcmread(pydicom_test_file("RG1_J2KR.dcm"))


def write_copies(template: Dataset, folder: Path, count: int) -> list[Path]:
    """`count` copies of `template`, each a new instance (fresh UIDs)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        ds = template  # reused: only the UIDs change
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = folder / f"{i:04d}.dcm"
        ds.save_as(path)
        paths.append(path)
    return paths


class Receiver:
    """A receiving process group on a free port."""

    def __init__(
        self, name: str, start: Callable[[int, Path], list[subprocess.Popen[bytes]]], work: Path
    ) -> None:
        self.name = name
        self.port = free_port()
        self.folder = work / name
        self.folder.mkdir(parents=True, exist_ok=True)
        self.procs = start(self.port, self.folder)
        wait_port(self.port)

    def clear(self) -> None:
        for path in self.folder.rglob("*.dcm"):
            path.unlink(missing_ok=True)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _popen(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def storescp(fork: bool) -> Callable[[int, Path], list[subprocess.Popen[bytes]]]:
    def start(port: int, folder: Path) -> list[subprocess.Popen[bytes]]:
        cmd = ["storescp", "+xa", "--output-directory", str(folder), str(port)]
        if fork:
            cmd.insert(1, "--fork")
        return [_popen(cmd)]

    return start


def node_env(port: int, folder: Path, processes: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
    env.update(
        {
            "CXR_PORT": str(port),
            "CXR_BIND": "127.0.0.1",
            "CXR_DATA_DIR": str(folder),
            "CXR_MIN_FREE_DISK_MB": "0",
            "CXR_LOG_LEVEL": "WARNING",
            "CXR_RECEIVER_PROCESSES": str(processes),
        }
    )
    return env


def node_scp(before: bool) -> Callable[[int, Path], list[subprocess.Popen[bytes]]]:
    def start(port: int, folder: Path) -> list[subprocess.Popen[bytes]]:
        env = node_env(port, folder, 1)
        cmd = [sys.executable, "-m", "bench.ingest", "--serve-scp"]
        return [_popen([*cmd, "--before"] if before else cmd, env)]

    return start


def node_receivers(n: int) -> Callable[[int, Path], list[subprocess.Popen[bytes]]]:
    def start(port: int, folder: Path) -> list[subprocess.Popen[bytes]]:
        env = node_env(port, folder, n)
        return [
            _popen([sys.executable, "-m", "dicom_node.receiving.processes", str(i)], env)
            for i in range(n)
        ]

    return start


def serve_scp(before: bool) -> None:
    """The node's default SCP alone (what `cxr-node serve` runs), until SIGTERM.

    before: as it was before this benchmark (maximum PDU offered "unlimited")."""
    import threading

    from dicom_node.jobs.queue import PREPARE, make_celery
    from dicom_node.receiving import scp
    from dicom_node.records.ledger import Ledger
    from dicom_node.settings import Settings

    settings = Settings()
    if before:
        settings.max_pdu_size = 0
    app = make_celery(settings)
    server = scp.start_scp(
        settings,
        Ledger(settings.ledger_path),
        lambda job_id: app.send_task(PREPARE, args=[job_id]),
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    server.shutdown()


def send(port: int, files: list[Path], senders: int) -> float:
    """Seconds until `senders` parallel storescu associations have sent all `files`."""
    ts = str(dcmread(files[0], stop_before_pixels=True).file_meta.TransferSyntaxUID)
    flag = STORESCU_FLAG.get(ts, "-x=")
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            [
                "storescu",
                flag,
                "-aet",
                "BENCH",
                "-aec",
                "CXRNODE",
                "127.0.0.1",
                str(port),
                *map(str, files[i::senders]),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for i in range(senders)
    ]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    elapsed = time.perf_counter() - start
    for proc, err in zip(procs, errors, strict=True):
        if proc.returncode != 0:
            raise RuntimeError(f"storescu failed ({proc.returncode}): {err.decode()[-500:]}")
    return elapsed


def scenario(
    kind: str,
    template: Dataset,
    senders: int,
    names: list[str],
    count: int,
    repeats: int,
    work: Path,
) -> list[list[object]]:
    starts: dict[str, Callable[[int, Path], list[subprocess.Popen[bytes]]]] = {
        "storescp": storescp(False),
        "storescp --fork": storescp(True),
        "node-scp": node_scp(False),
        "node-scp (before)": node_scp(True),
    }
    for name in names:
        if name.startswith("node-recv-"):
            starts[name] = node_receivers(int(name.rsplit("-", 1)[1]))
    receivers = {name: Receiver(name.replace(" ", ""), starts[name], work) for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}
    size = 0
    try:
        for _ in range(repeats):
            for name, receiver in receivers.items():
                files = write_copies(template, work / "send", count)
                size = sum(p.stat().st_size for p in files)
                times[name].append(send(receiver.port, files, senders))
                receiver.clear()
                shutil.rmtree(work / "send")
    finally:
        for receiver in receivers.values():
            receiver.stop()
    best = names[0]
    rows = []
    for name in names:
        t = median(times[name])
        rows.append(
            [
                kind,
                senders,
                name,
                count,
                size / count / 1e6,
                t,
                size / t / 1e6,
                median(times[best]) / t,
            ]
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=12, help="instances per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--senders", default="1,4")
    parser.add_argument("--kinds", default="uncompressed,jpeg2000")
    parser.add_argument("--processes", default="2,4", help="node receiver processes (4 senders)")
    parser.add_argument("--smoke", action="store_true", help="2 small runs")
    parser.add_argument("--serve-scp", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--before", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_scp:
        serve_scp(args.before)
        return
    if args.smoke:
        args.count, args.repeats, args.senders, args.kinds = 2, 1, "2", "jpeg2000"
        args.processes = "2"
    for tool in ("storescp", "storescu"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} (DCMTK) is not installed: deploy/install-system-deps.sh")
    header("Ingest: C-STORE receive rate, node vs DCMTK storescp")
    templates = {"uncompressed": large_cr, "jpeg2000": compressed_cr}
    rows: list[list[object]] = []
    with tempfile.TemporaryDirectory(prefix="bench-ingest-", dir=os.environ.get("TMPDIR")) as tmp:
        work = Path(tmp)
        for kind in args.kinds.split(","):
            template = templates[kind]()
            for senders in (int(s) for s in args.senders.split(",")):
                if senders == 1:
                    names = ["storescp", "node-scp (before)", "node-scp", "node-recv-1"]
                else:
                    names = ["storescp --fork", "node-scp (before)", "node-scp"]
                    names += [f"node-recv-{n}" for n in args.processes.split(",")]
                rows += scenario(kind, template, senders, names, args.count, args.repeats, work)
                print(f"- {kind}, {senders} sender(s): done", flush=True)
    print()
    table(
        [
            "files",
            "senders",
            "receiver",
            "instances",
            "MB each",
            "median s",
            "MB/s",
            "x first (storescp)",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
