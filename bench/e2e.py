"""End to end: storescu -> the node -> SR received by a storescp destination.

Latency: one study at a time (storescu of one chest CR; clock from the start of storescu
until the SR file is complete at the destination), p50/p95. Throughput: a burst of images
over 4 parallel associations, images per minute until the last SR arrives.

Queue modes, each a fresh node (`cxr-node serve`) with its own data folder and ports:
- embedded: no broker; the node's worker child runs every step (embedded-poll-1s: with
  kombu's default 1 s polling of the queue folder, as before this benchmark; embedded-spin:
  with CXR_ONNX_SPIN=true);
- redis-1, redis-2: Celery over a redis-server this script starts on a free port (the
  machine's shared Redis is not touched), with 1 or 2 `cxr-node worker` processes for
  inference; the node's own worker runs prepare/finalize/deliver.

    python -m bench.e2e [--bundle var/bench/bundle-cpu] [--singles 8] [--burst 40]
    python -m bench.e2e --burst 500              # the issue's burst: takes long on 2 cores
    python -m bench.e2e --smoke
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import ComprehensiveSRStorage, generate_uid

from bench.common import DEFAULT_BUNDLE, header, median, percentile, pydicom_test_file, table
from bench.ingest import free_port, wait_port

COMPREHENSIVE_SR = ComprehensiveSRStorage


class Destination:
    """storescp as the PACS; counts the SRs it has completely received."""

    def __init__(self, folder: Path, options: tuple[str, ...] = ()) -> None:
        """options: storescp's own, e.g. ("+xa",) to accept compressed transfer syntaxes
        (by default it accepts uncompressed only)."""
        self.folder = folder
        folder.mkdir(parents=True)
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                *("storescp", *options, "--aetitle", "PACS"),
                *("--output-directory", str(folder), str(self.port)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_port(self.port)
        self._seen: dict[str, bool] = {}

    def srs(self) -> int:
        for path in self.folder.iterdir():
            if path.name in self._seen or not path.is_file():
                continue
            try:
                ds = dcmread(path, stop_before_pixels=True)
            except Exception:  # still being written
                continue
            self._seen[path.name] = str(ds.SOPClassUID) == COMPREHENSIVE_SR
        return sum(self._seen.values())

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=30)


class Node:
    def __init__(
        self,
        work: Path,
        bundle: Path,
        destination: Destination,
        mode: str,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.port = free_port()
        self.procs: list[subprocess.Popen[bytes]] = []
        env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
        env.update(
            {
                "CXR_PORT": str(self.port),
                "CXR_BIND": "127.0.0.1",
                "CXR_DATA_DIR": str(work / "node"),
                "CXR_BUNDLE": str(bundle),
                "CXR_DESTINATIONS": f"PACS@127.0.0.1:{destination.port}",
                "CXR_MIN_FREE_DISK_MB": "0",
                "CXR_LOG_LEVEL": "WARNING",
            }
        )
        env.update(extra_env or {})
        workers = 0
        if mode == "embedded-poll-1s":  # the embedded queue's polling before tuning
            env["CXR_EMBEDDED_POLL_S"] = "1"
        if mode == "embedded-spin":  # ONNX Runtime threads spinning while idle
            env["CXR_ONNX_SPIN"] = "true"
        if mode.startswith("redis"):
            redis_port = free_port()
            self.procs.append(
                self._popen(
                    [
                        "redis-server",
                        "--port",
                        str(redis_port),
                        "--bind",
                        "127.0.0.1",
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                    ],
                    env,
                    work / "redis.log",
                )
            )
            wait_port(redis_port)
            env["CXR_BROKER_URL"] = f"redis://127.0.0.1:{redis_port}/0"
            workers = int(mode.split("-")[1])
        self.log = work / "node.log"
        self.procs.append(self._popen([sys.executable, "-m", "dicom_node", "serve"], env, self.log))
        for i in range(workers):
            self.procs.append(
                self._popen(
                    [
                        sys.executable,
                        "-m",
                        "dicom_node",
                        "worker",
                        "--name",
                        f"infer{i}",
                    ],
                    env,
                    work / f"worker{i}.log",
                )
            )
        wait_port(self.port, timeout=120)

    @staticmethod
    def _popen(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
        with log.open("wb") as fh:
            return subprocess.Popen(
                cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
            )

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def copies(source: Path, folder: Path, count: int) -> list[Path]:
    """New instances of new studies and patients."""
    folder.mkdir(parents=True, exist_ok=True)
    ds = dcmread(source)
    out = []
    for i in range(count):
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID = generate_uid()
        ds.SeriesInstanceUID = generate_uid()
        ds.PatientID = f"BENCH{i:05d}"
        path = folder / f"{i:05d}.dcm"
        ds.save_as(path)
        out.append(path)
    return out


def storescu(port: int, files: list[Path]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["storescu", "-aet", "BENCH", "-aec", "CXRNODE", "127.0.0.1", str(port), *map(str, files)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def wait_srs(destination: Destination, count: int, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while destination.srs() < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{destination.srs()} of {count} SRs after {timeout:.0f} s")
        time.sleep(0.02)
    return time.perf_counter()


def run_mode(
    mode: str, bundle: Path, source: Path, singles: int, burst: int, senders: int, work: Path
) -> list[object]:
    destination = Destination(work / "pacs")
    node = Node(work, bundle, destination, mode)
    try:
        # Warm-up: the first image loads the bundle in every process that needs it.
        warm = copies(source, work / "warm", 1 + (2 if mode == "redis-2" else 0))
        for path in warm:
            storescu(node.port, [path]).wait()
        wait_srs(destination, len(warm), 600)
        expected = len(warm)
        latencies = []
        for path in copies(source, work / "single", singles):
            start = time.perf_counter()
            storescu(node.port, [path]).wait()
            expected += 1
            latencies.append(wait_srs(destination, expected, 600) - start)
        files = copies(source, work / "burst", burst)
        start = time.perf_counter()
        procs = [storescu(node.port, files[i::senders]) for i in range(senders)]
        for proc in procs:
            proc.wait()
        sent = time.perf_counter() - start
        done = wait_srs(destination, expected + burst, 60 + 30 * burst) - start
    except BaseException:
        keep = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-e2e-failed-{mode}-{os.getpid()}"
        shutil.copytree(work, keep, ignore=shutil.ignore_patterns("*.dcm"), dirs_exist_ok=True)
        print(f"- {mode} failed; logs kept in {keep}", file=sys.stderr)
        raise
    finally:
        node.stop()
        destination.stop()
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
    return [
        mode,
        singles,
        median(latencies),
        percentile(latencies, 95),
        burst,
        senders,
        sent,
        done,
        burst / done * 60.0,
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    parser.add_argument("--modes", default="embedded-poll-1s,embedded,redis-1,redis-2")
    parser.add_argument("--singles", type=int, default=8, help="single-study repeats")
    parser.add_argument("--burst", type=int, default=40, help="images in the burst")
    parser.add_argument("--senders", type=int, default=4, help="associations in the burst")
    parser.add_argument("--file", type=Path, default=None, help="default: pydicom-data RG1_UNCI")
    parser.add_argument("--smoke", action="store_true", help="embedded, 1 single, burst 2")
    args = parser.parse_args(argv)
    if args.smoke:
        args.modes, args.singles, args.burst, args.senders = "embedded", 1, 2, 2
    if args.file is None:
        args.file = pydicom_test_file("RG1_UNCI.dcm")
    header("End to end: storescu -> node -> SR at a storescp destination")
    rows = []
    for mode in args.modes.split(","):
        with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
            rows.append(
                run_mode(
                    mode,
                    args.bundle.resolve(),
                    args.file,
                    args.singles,
                    args.burst,
                    args.senders,
                    Path(tmp),
                )
            )
        print(f"- {mode}: done", flush=True)
    print()
    ds = dcmread(args.file, stop_before_pixels=True)
    print(
        f"image: {args.file.name} ({ds.Rows}x{ds.Columns}, "
        f"{ds.file_meta.TransferSyntaxUID.name}); SR + SC per image\n"
    )
    table(
        [
            "queue",
            "singles",
            "latency p50 s",
            "latency p95 s",
            "burst",
            "associations",
            "all sent s",
            "all SRs s",
            "images/min",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
