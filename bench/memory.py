"""Memory: RSS of the node's processes and of an inference worker with the bundle loaded.

Starts the node (`cxr-node serve`) with Redis (its own redis-server on a free port) and one
`cxr-node worker`, and 2 receiver processes - or with `--queue embedded`, the node as `make
run` starts it (its node, inference and delivery worker processes) - sends a few chest CRs,
waits for their SRs at a storescp destination, and reads VmRSS (now) and VmHWM (peak) of
every process of the node from /proc: after start-up (bundle loaded where it is used) and
after the images.

    python -m bench.memory [--bundle var/bench/bundle-cpu] [--images 5] [--queue embedded]
    python -m bench.memory --smoke
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench.common import DEFAULT_BUNDLE, header, pydicom_test_file, table
from bench.e2e import Destination, Node, copies, storescu, wait_srs
from bench.ingest import free_port


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def describe(pid: int) -> str:
    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    words = [w.decode() for w in cmd if w]
    if "dicom_node.receiving.processes" in words:
        return f"receiver process {words[-1]}"
    if "worker" in words:
        name = words[words.index("--name") + 1] if "--name" in words else "?"
        queues = words[words.index("--queues") + 1] if "--queues" in words else "infer"
        if name == "node":
            return f"node worker (queues {queues}: prepare, finalize, ...)"
        if name == "deliver":
            return "delivery worker (queue deliver)"
        return f"inference worker {name} (queue {queues}; the bundle's models)"
    if "serve" in words:
        return (
            "node (`cxr-node serve`: SCP unless in receiver processes, ledger, sweep, supervisor)"
        )
    return " ".join(words)[:60]


def snapshot(node: Node) -> dict[str, tuple[int, int]]:
    pids: list[int] = []
    for proc in node.procs:
        if "redis-server" in str(proc.args):
            continue
        pids.append(proc.pid)
        pids += children(proc.pid)
    return {describe(pid): (status_kb(pid, "VmRSS"), status_kb(pid, "VmHWM")) for pid in pids}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    parser.add_argument("--images", type=int, default=5)
    parser.add_argument("--queue", choices=["redis", "embedded"], default="redis")
    parser.add_argument("--smoke", action="store_true", help="1 image")
    args = parser.parse_args(argv)
    if args.smoke:
        args.images = 1
    source = pydicom_test_file("RG1_UNCI.dcm")
    header("Memory of the node's processes")
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        work = Path(tmp)
        destination = Destination(work / "pacs")
        env = {"CXR_HTTP_PORT": str(free_port())}
        if args.queue == "redis":
            env["CXR_RECEIVER_PROCESSES"] = "2"
        mode = "redis-1" if args.queue == "redis" else "embedded"
        node = Node(work, args.bundle.resolve(), destination, mode, env)
        try:
            time.sleep(5)  # the workers load the bundle at their first task, not at start
            started = snapshot(node)
            files = copies(source, work / "send", args.images)
            storescu(node.port, files).wait()
            wait_srs(destination, len(files), 600)
            time.sleep(1)
            after = snapshot(node)
        finally:
            node.stop()
            destination.stop()
    rows = [
        [name, started.get(name, (0, 0))[0] / 1024, rss / 1024, peak / 1024]
        for name, (rss, peak) in after.items()
    ]
    print(
        f"bundle {args.bundle}; {args.queue} queue; {args.images} x {source.name} (1955x1841) "
        "sent, SR + SC each\n"
    )
    table(
        ["process", "RSS after start MB", f"RSS after {args.images} images MB", "peak RSS MB"], rows
    )


if __name__ == "__main__":
    main()
