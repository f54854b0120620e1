"""Where the CPU goes in a burst: all the node's processes under load, not stage by stage.

One fresh `cxr-node serve` (the embedded queue unless `--redis-workers` says otherwise)
delivering to a DCMTK storescp, CPU read from /proc for every process of the node's tree:
- idle: CPU per second of the node with nothing to do (polling, sweeps);
- singles: CPU seconds per image, one image at a time (gross, and net of the idle rate);
- bursts: N images over one storescu association (or `--associations` at once):
  images/minute, the bound (cores x 60 s / CPU-s per image of the singles), the fraction of
  it reached, time from the first C-STORE response to the first SR, and how busy the node's
  processes kept the cores;
- with `--redis-workers N`: a Redis broker and N separate inference worker processes (as a
  site that scales out runs them), all counted with the node;
- with `--py-spy PATH`: one more burst while py-spy samples the node's Python threads; the
  share of each job step, the project functions that own the time (with the libraries they
  call), and the hottest leaf functions, per process. Threads py-spy does not see (ONNX
  Runtime's pool) are counted from /proc.

    python -m bench.burst_profile --bundle models/default --py-spy /work/pyspy-venv/bin/py-spy
    python -m bench.burst_profile --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import JPEG2000, JPEG2000Lossless, JPEGBaseline8Bit

from bench.common import REPO, header, median, percentile, pydicom_test_file, table
from bench.e2e import Destination, Node, copies
from bench.ingest import free_port

TICK = os.sysconf("SC_CLK_TCK")

#: storescu's option to propose a compressed file's own transfer syntax (by default it
#: proposes uncompressed only, and cannot convert a JPEG 2000 file to it).
STORESCU_SYNTAX = {JPEG2000Lossless: ["-xv"], JPEG2000: ["-xw"], JPEGBaseline8Bit: ["-xy"]}


def storescu_syntax(path: Path) -> list[str]:
    return STORESCU_SYNTAX.get(
        dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID, []
    )


def tree(root: int) -> list[int]:
    """`root` and all its live descendants."""
    parents: dict[int, list[int]] = defaultdict(list)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(stat.rsplit(")", 1)[1].split()[1])].append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += parents.get(pid, [])
    return out


def _cpu(stat_path: Path) -> float:
    """utime + stime in seconds from a /proc stat file (0 when it is gone)."""
    try:
        fields = stat_path.read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def threads_cpu(pids: list[int]) -> dict[tuple[int, int], float]:
    """CPU seconds of each (pid, thread id)."""
    out = {}
    for pid in pids:
        try:
            tids = [int(t.name) for t in Path(f"/proc/{pid}/task").iterdir()]
        except OSError:
            continue
        for tid in tids:
            out[(pid, tid)] = _cpu(Path(f"/proc/{pid}/task/{tid}/stat"))
    return out


def node_pids(node: Node) -> list[int]:
    """Every live process of the node: `serve` and its workers, and with Redis the broker and
    the separate worker processes too."""
    return [pid for proc in node.procs for pid in tree(proc.pid)]


def node_cpu(node: Node) -> float:
    return sum(_cpu(Path(f"/proc/{pid}/stat")) for pid in node_pids(node))


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far (/proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return (sum(values) - idle) / TICK, sum(values) / TICK


def settle(node: Node, quiet_cores: float = 0.05, limit_s: float = 15.0) -> None:
    """Wait until the node's processes use under `quiet_cores` over half a second."""
    deadline = time.monotonic() + limit_s
    before = node_cpu(node)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = node_cpu(node)
        if now - before < quiet_cores * 0.5:
            return
        before = now


def wait_objects(destination: Destination, srs: int, files: int, timeout: float) -> None:
    """Until `srs` SRs and `files` objects in all are at the destination."""
    deadline = time.monotonic() + timeout
    while destination.srs() < srs or sum(1 for _ in destination.folder.iterdir()) < files:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{destination.srs()} of {srs} SRs after {timeout:.0f} s")
        time.sleep(0.02)


@dataclass
class Burst:
    images: int
    responses: list[float] = field(default_factory=list)  # perf_counter of each C-STORE-RSP
    srs: list[float] = field(default_factory=list)  # perf_counter of each SR's arrival
    start: float = 0.0
    cpu_s: float = 0.0
    processes: dict[int, float] = field(default_factory=dict)  # CPU-s per pid
    threads: dict[tuple[int, int], float] = field(default_factory=dict)  # live ones only
    cores_busy: list[float] = field(default_factory=list)  # node tree, per 0.5 s
    machine_busy: float = 0.0  # cores busy over the burst, the whole machine

    @property
    def seconds(self) -> float:
        return self.srs[-1] - self.start

    @property
    def per_minute(self) -> float:
        return self.images / self.seconds * 60.0

    @property
    def first_sr_after_first_response(self) -> float:
        return self.srs[0] - self.responses[0]


def send_burst(
    node: Node,
    destination: Destination,
    files: list[Path],
    expected_srs: int,
    associations: int = 1,
) -> Burst:
    """All `files` over `associations` storescu associations at once (one process each, the
    files dealt out in turn); returns when every SR (and SC) is in."""
    burst = Burst(images=len(files))
    files_before = sum(1 for _ in destination.folder.iterdir())
    cpu_before, threads_before = node_cpu(node), threads_cpu(node_pids(node))
    pids_before = {pid: _cpu(Path(f"/proc/{pid}/stat")) for pid in node_pids(node)}
    busy_before = machine_busy()
    burst.start = time.perf_counter()
    senders = [
        subprocess.Popen(
            [
                *("storescu", "-v", *storescu_syntax(files[0]), "-aet", "BENCH", "-aec", "CXRNODE"),
                *("127.0.0.1", str(node.port)),
                *map(str, files[n::associations]),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for n in range(associations)
    ]
    lock = threading.Lock()

    def read_responses(sender: subprocess.Popen[str]) -> None:
        assert sender.stdout is not None
        for line in sender.stdout:
            if "Received Store Response" in line:
                with lock:
                    burst.responses.append(time.perf_counter())

    readers = [
        threading.Thread(target=read_responses, args=(sender,), daemon=True) for sender in senders
    ]
    for reader in readers:
        reader.start()
    seen, last_cpu, last_t = expected_srs - len(files), cpu_before, time.perf_counter()
    deadline = time.monotonic() + 60 + 10 * len(files)
    while seen < expected_srs:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{seen} of {expected_srs} SRs")
        time.sleep(0.02)
        count = destination.srs()
        burst.srs += [time.perf_counter()] * (count - seen)
        seen = count
        now = time.perf_counter()
        if now - last_t >= 0.5:
            cpu = node_cpu(node)
            burst.cores_busy.append((cpu - last_cpu) / (now - last_t))
            last_cpu, last_t = cpu, now
    for sender, reader in zip(senders, readers, strict=True):
        sender.wait()
        reader.join(timeout=10)
    burst.responses.sort()
    wait_objects(destination, expected_srs, files_before + 2 * len(files), 120)
    busy_after = machine_busy()
    burst.machine_busy = (busy_after[0] - busy_before[0]) / (time.perf_counter() - burst.start)
    settle(node)
    burst.cpu_s = node_cpu(node) - cpu_before
    after = threads_cpu(node_pids(node))
    burst.processes = {
        pid: _cpu(Path(f"/proc/{pid}/stat")) - pids_before.get(pid, 0.0) for pid in node_pids(node)
    }
    burst.threads = {k: v - threads_before.get(k, 0.0) for k, v in after.items()}
    return burst


# -- the profile -------------------------------------------------------------------------

#: Celery task functions, and what they are called in the tables.
TASKS = {
    "prepare": "prepare",
    "infer": "infer",
    "finalize": "finalize",
    "deliver": "deliver",
    "not_analysed": "not analysed",
    "analysis_failed": "analysis failed",
}
TASK_FILES = ("dicom_node/jobs/tasks.py", "worker/task.py")
#: Leaf functions where a thread blocks (C calls below them), sampled with py-spy --idle.
WAITS = {
    "_worker": "thread pool idle, no task",
    "Condition.wait": "lock or queue",
    "Event.wait": "event",
    "Thread.join": "thread join",
    "_PollLikeSelector.select": "socket select",
    "EpollSelector.select": "socket select",
    "Transport.drain_events": "kombu sleeping between polls",
    "AssociationSocket.recv": "socket receive",
}
PROJECT = ("/dicom_node/", "/worker/")


def step_of(stack: list[dict[str, object]]) -> str:
    """What a sample's stack (root first) is doing, in the tables' words."""
    files = [str(f.get("file", "")) for f in stack]
    names = [str(f.get("name", "")) for f in stack]
    if names and names[-1] in WAITS:  # only sampled with --idle
        return f"waiting: {WAITS[names[-1]]}"
    for name, file in zip(names, files, strict=True):
        if file.endswith(TASK_FILES):
            task = TASKS.get(name.rsplit(".", 1)[-1])
            if task is not None:
                return f"task: {task}"
    joined = " ".join(files)
    if "dicom_node/receiving" in joined:
        return "C-STORE handler (check, spool, ledger, enqueue)"
    if "pynetdicom" in joined:  # its own threads: receiving in serve, delivery in the worker
        return "DICOM network threads (pynetdicom)"
    if "dicom_node/jobs/recovery" in joined:
        return "recovery sweep"
    if "kombu" in joined:
        return "queue: kombu (polling, fetching, acks)"
    if "celery" in joined:
        return "queue: celery (consumer loop, task bookkeeping)"
    return "other: " + (names[-1] if names else "?")


def owner(stack: list[dict[str, object]]) -> str:
    """The innermost project function of a stack: the time is its own or its libraries'."""
    for frame in reversed(stack):
        file = str(frame.get("file", ""))
        if any(part in file for part in PROJECT) and not file.endswith(TASK_FILES):
            return f"{frame.get('name')} ({Path(file).parent.name}/{Path(file).name})"
    return "(none: queue loop, DICOM network threads)"


def leaf(stack: list[dict[str, object]]) -> str:
    if not stack:
        return "?"
    frame = stack[-1]
    return f"{frame.get('name')} ({Path(str(frame.get('file', ''))).name})"


@dataclass
class ProcessProfile:
    seconds: float = 0.0
    threads: Counter[int] = field(default_factory=Counter)
    thread_names: dict[int, str] = field(default_factory=dict)
    thread_steps: dict[int, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    steps: Counter[str] = field(default_factory=Counter)
    owners: Counter[str] = field(default_factory=Counter)
    leaves: Counter[str] = field(default_factory=Counter)


THREAD = re.compile(r"(?:Process (\d+) )?Thread (\d+)(?: \"([^\"]*)\")?")


def read_speedscope(path: Path, default_pid: int) -> dict[int, ProcessProfile]:
    """py-spy's speedscope file, per process: sampled seconds by step, owner and leaf."""
    data = json.loads(path.read_text())
    frames: list[dict[str, object]] = data["shared"]["frames"]
    out: dict[int, ProcessProfile] = defaultdict(ProcessProfile)
    for prof in data["profiles"]:
        match = THREAD.search(str(prof.get("name", "")))
        pid = int(match.group(1)) if match and match.group(1) else default_pid
        tid = int(match.group(2)) if match else 0
        profile = out[pid]
        profile.thread_names[tid] = (match.group(3) if match else None) or str(tid)
        for sample, weight in zip(prof["samples"], prof["weights"], strict=True):
            stack = [frames[i] for i in sample]
            profile.seconds += weight
            profile.threads[tid] += weight
            profile.steps[step_of(stack)] += weight
            profile.thread_steps[tid][step_of(stack)] += weight
            profile.owners[owner(stack)] += weight
            profile.leaves[leaf(stack)] += weight
    return dict(out)


#: py-spy's modes: what a sample is. active: threads not idle (about CPU); gil: only the
#: thread holding the GIL; idle: every thread at every tick (wall time, waits included).
SPY_MODES = {"active": [], "gil": ["--gil"], "idle": ["--idle"]}


def record(py_spy: Path, pid: int, out: Path, rate: int, mode: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [
            *(str(py_spy), "record", "--pid", str(pid), "--subprocesses", "--nonblocking"),
            *("--rate", str(rate), "--format", "speedscope", "--output", str(out)),
            *SPY_MODES[mode],
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)  # attached before the burst starts
    return proc


def role(pid: int) -> str:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return str(pid)
    words = [w.decode() for w in cmd]
    if "serve" in words:
        return f"node (serve, {pid})"
    if "worker" in words:
        name = words[words.index("--name") + 1] if "--name" in words[:-1] else "?"
        return f"{name} worker ({pid})"
    return f"{Path(words[0]).name} ({pid})"


def print_threads(prof: ProcessProfile, burst: Burst, pid: int) -> None:
    """Per thread: CPU (live threads, /proc), samples, and its three main steps."""
    rows: list[list[object]] = []
    for tid, secs in prof.threads.most_common():
        steps = prof.thread_steps[tid]
        main = "; ".join(f"{name} {v / secs * 100:.0f}%" for name, v in steps.most_common(3))
        cpu = burst.threads.get((pid, tid))
        rows.append([prof.thread_names.get(tid, tid), cpu if cpu is not None else "-", secs, main])
    table(["thread", "CPU-s", "sampled s", "its main steps (share of its samples)"], rows)


def print_profile(
    profiles: dict[int, ProcessProfile],
    burst: Burst,
    roles: dict[int, str],
    top: int,
    mode: str,
) -> None:
    per_pid = burst.processes
    for pid in sorted(per_pid, key=per_pid.__getitem__, reverse=True):
        cpu = per_pid[pid]
        prof = profiles.get(pid, ProcessProfile())
        # threads that lived through the burst and never held Python code: native pools
        native = sum(c for (p, t), c in burst.threads.items() if p == pid and t not in prof.threads)
        print(
            f"### {roles.get(pid, pid)}: {cpu:.1f} CPU-s in the burst "
            f"({cpu / burst.images:.3f} per image), of which threads py-spy never sampled "
            f"(native pools) {native:.1f} CPU-s; {prof.seconds:.1f} s of Python samples\n"
        )
        if not prof.seconds:
            continue
        if mode != "active":
            print_threads(prof, burst, pid)
            if mode == "idle":
                continue
        for title, counter in (
            ("step", prof.steps),
            ("project function (with the libraries it calls)", prof.owners),
            ("leaf function", prof.leaves),
        ):
            rows: list[list[object]] = [
                [name, secs, secs / prof.seconds * 100.0, secs / burst.images * 1000.0]
                for name, secs in counter.most_common(top)
            ]
            table([title, "sampled s", "% of samples", "ms per image"], rows)


def run(args: argparse.Namespace, work: Path) -> None:
    source: Path = args.file or pydicom_test_file("RG1_UNCI.dcm")
    destination = Destination(work / "pacs", tuple(args.storescp_options.split()))
    env = {"CXR_HTTP_PORT": str(free_port())}
    env.update(dict(item.split("=", 1) for item in args.env))
    queue = f"redis-{args.redis_workers}" if args.redis_workers else "embedded"
    node = Node(work, args.bundle.resolve(), destination, queue, env)
    try:
        root = node.procs[1 if args.redis_workers else 0].pid  # `serve` (after redis-server)
        syntax = storescu_syntax(source)
        expected = 0
        for path in copies(source, work / "warm", 2 + 2 * args.redis_workers):
            subprocess.run(
                ["storescu", *syntax, "-aec", "CXRNODE", "127.0.0.1", str(node.port), path]
            )
            expected += 1
        wait_objects(destination, expected, 2 * expected, 600)
        settle(node)
        roles = {pid: role(pid) for pid in node_pids(node)}

        start, cpu = time.perf_counter(), node_cpu(node)
        time.sleep(args.idle_s)
        idle_rate = (node_cpu(node) - cpu) / (time.perf_counter() - start)

        latencies = []
        start, cpu = time.perf_counter(), node_cpu(node)
        for path in copies(source, work / "single", args.singles):
            sent = time.perf_counter()
            subprocess.run(
                ["storescu", *syntax, "-aec", "CXRNODE", "127.0.0.1", str(node.port), path]
            )
            expected += 1
            wait_objects(destination, expected, 2 * expected, 120)
            latencies.append(time.perf_counter() - sent)
            settle(node)
        single_cpu = (node_cpu(node) - cpu) / args.singles
        single_net = single_cpu - idle_rate * (time.perf_counter() - start) / args.singles
        cores = os.cpu_count() or 1
        bound = cores * 60.0 / single_cpu
        print(
            f"- idle: {idle_rate:.4f} CPU-s per second; singles: {single_cpu:.3f} CPU-s per "
            f"image ({single_net:.3f} net of idle), latency p50 {median(latencies):.2f} s, "
            f"p95 {percentile(latencies, 95):.2f} s; "
            f"bound {cores} x 60 / {single_cpu:.3f} = {bound:.0f} images/min\n",
            flush=True,
        )

        bursts: list[tuple[str, Burst]] = []
        modes = args.py_spy_modes.split(",") if args.py_spy else []
        for i in range(args.bursts + len(modes)):
            mode = modes[i - args.bursts] if i >= args.bursts else None
            spy = None
            if mode is not None:
                path = args.out / f"burst-{mode}.speedscope.json"
                spy = record(args.py_spy, root, path, args.rate, mode)
            files = copies(source, work / f"burst{i}", args.burst)
            expected += len(files)
            burst = send_burst(node, destination, files, expected, args.associations)
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait(timeout=120)
            bursts.append((f"py-spy {mode}" if mode else f"burst {i + 1}", burst))
    finally:
        node.stop()
        destination.stop()

    rows: list[list[object]] = []
    for name, b in bursts:
        half = b.responses[len(b.responses) // 2] - b.start if b.responses else float("nan")
        rows.append(
            [
                name,
                b.images,
                b.responses[-1] - b.responses[0] if b.responses else float("nan"),
                b.first_sr_after_first_response,
                half,
                b.srs[len(b.srs) // 2] - b.start,
                b.seconds,
                b.per_minute,
                b.cpu_s / b.images,
                b.per_minute / bound,
                b.cpu_s / b.seconds,
                b.machine_busy,
            ]
        )
    table(
        [
            f"burst ({args.associations} association{'s' if args.associations > 1 else ''})",
            "images",
            "C-STORE RSPs first..last s",
            "first SR after first RSP s",
            "half received s",
            "half SRs s",
            "all SRs s",
            "images/min",
            "CPU-s per image",
            "of the bound",
            "node cores busy",
            "machine cores busy",
        ],
        rows,
    )
    for name, b in bursts:
        per_process = ", ".join(
            f"{roles.get(pid, str(pid))} {cpu / b.images * 1000:.0f}"
            for pid, cpu in sorted(b.processes.items(), key=lambda kv: -kv[1])
            if cpu > 0
        )
        print(f"- {name}: CPU ms per image by process: {per_process}")
        shape = " ".join(f"{c:.1f}" for c in b.cores_busy)
        print(f"- {name}: cores the node used, per 0.5 s: {shape}")
        arrivals = " ".join(f"{t - b.start:.1f}" for t in b.srs[::5])
        print(
            f"  SR 1, 6, 11, ... at s: {arrivals}; "
            f"last C-STORE-RSP at {b.responses[-1] - b.start:.1f}"
        )
    print()
    for name, b in bursts:
        if name.startswith("py-spy "):
            mode = name.split()[1]
            path = args.out / f"burst-{mode}.speedscope.json"
            print(f"## Profile, py-spy {mode} ({path})\n")
            print_profile(read_speedscope(path, root), b, roles, args.top, mode)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=REPO / "models" / "default")
    parser.add_argument("--file", type=Path, default=None, help="default: pydicom-data RG1_UNCI")
    parser.add_argument("--singles", type=int, default=8)
    parser.add_argument("--burst", type=int, default=50, help="images per burst")
    parser.add_argument(
        "--associations", type=int, default=1, help="storescu associations a burst is sent over"
    )
    parser.add_argument("--bursts", type=int, default=2, help="bursts without the profiler")
    parser.add_argument("--idle-s", type=float, default=10.0, help="idle CPU measured over")
    parser.add_argument("--py-spy", type=Path, default=None, help="py-spy: one more burst")
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    parser.add_argument(
        "--py-spy-modes", default="active", help=f"one burst each, of {','.join(SPY_MODES)}"
    )
    parser.add_argument("--top", type=int, default=12, help="rows per profile table")
    parser.add_argument("--out", type=Path, default=None, help="where the profile goes")
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the node")
    parser.add_argument(
        "--storescp-options",
        default="",
        help='the destination storescp\'s options, e.g. "+xa": accepts the JPEG summary as it '
        "is (by default uncompressed only: the node decompresses it for each delivery)",
    )
    parser.add_argument(
        "--redis-workers",
        type=int,
        default=0,
        help="Redis broker and this many separate inference workers (0: the embedded queue)",
    )
    parser.add_argument("--smoke", action="store_true", help="1 single, 1 burst of 2")
    args = parser.parse_args(argv)
    if args.smoke:
        args.singles, args.burst, args.bursts, args.idle_s = 1, 2, 1, 1.0
    header("Burst profile: CPU of all the node's processes, single sends and a burst")
    with tempfile.TemporaryDirectory(prefix="bench-burst-") as tmp:
        args.out = args.out or Path(tmp) / "out"
        args.out.mkdir(parents=True, exist_ok=True)
        work = Path(tmp) / "work"
        work.mkdir()
        run(args, work)


if __name__ == "__main__":
    main()
