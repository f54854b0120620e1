"""Helpers shared by the benchmarks: timing, percentiles, machine description, tables."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from worker.markdown import markdown_table

REPO = Path(__file__).resolve().parent.parent
#: Git-ignored (var/): where the benchmarks keep their bundle and scratch files.
SCRATCH = REPO / "var" / "bench"
DEFAULT_BUNDLE = SCRATCH / "bundle-cpu"


def pydicom_test_file(name: str) -> Path:
    """A file of pydicom's test data (the pydicom-data package), e.g. the chest CR RG1_UNCI."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    if not isinstance(path, str):
        raise SystemExit(f"{name} is not among pydicom's test files: install pydicom-data")
    return Path(path)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of a non-empty sequence."""
    return float(np.percentile(values, q))


def time_calls(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Seconds per call of `fn`, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Time several alternatives round-robin, so that a load spike on a shared machine hits
    them all alike: the ratio of their medians is what one run can vouch for."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def load_average() -> str:
    try:
        one, five, _ = os.getloadavg()
    except OSError:  # pragma: no cover
        return "?"
    return f"{one:.1f}/{five:.1f}"


def machine() -> str:
    """One line: date, CPU, cores, load: the context every figure needs."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:  # pragma: no cover
        pass
    return (
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {cpu}, {os.cpu_count()} cores, "
        f"load average {load_average()} (1/5 min), Python {platform.python_version()}"
    )


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):  # pragma: no cover
        return "?"


def header(title: str) -> None:
    print(f"## {title}\n")
    print(f"- machine: {machine()}")
    print(f"- commit: {git_commit()}")
    print(f"- command: `{' '.join(['python', '-m', *_module_argv()])}`\n")


def _module_argv() -> list[str]:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    name = spec.name if spec is not None else Path(sys.argv[0]).stem
    return [name, *sys.argv[1:]]


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    print("\n".join(markdown_table(headers, [[_fmt(v) for v in row] for row in rows])))
    print(flush=True)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}" if abs(value) >= 0.1 else f"{value:.3g}"
    return str(value)


def ms(seconds: float) -> float:
    return seconds * 1000.0
