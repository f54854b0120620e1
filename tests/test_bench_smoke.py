"""The benchmarks still run (`--smoke`: one tiny repeat each). Not a measurement: timings
are never asserted; each run must finish and print its table."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PLUMBING_BUNDLE, REPO, require_tool

pytestmark = pytest.mark.slow


def run_bench(*args: str, timeout: float = 300) -> str:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), *args, "--smoke"],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=env,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "| " in done.stdout and "|---" in done.stdout, done.stdout[-2000:]
    return done.stdout


@pytest.mark.train
def test_inference_bench_runs() -> None:
    pytest.importorskip("torch")
    out = run_bench("inference", "--bundle", str(PLUMBING_BUNDLE), "--variants", "int8")
    assert "ORT int8 ms" in out and "before ms" in out


def test_pipeline_bench_runs() -> None:
    out = run_bench("pipeline", "--bundle", str(PLUMBING_BUNDLE))
    assert "finalize: build SR" in out and "speed-up" in out


def test_decode_at_size_bench_runs() -> None:
    out = run_bench("decode_at_size")
    assert "| reduced |" in out and "p reduced" in out


def test_retrieval_bench_runs() -> None:
    assert "recall@4" in run_bench("retrieval")


@pytest.mark.integration
def test_ingest_bench_runs() -> None:
    require_tool("storescp")
    require_tool("storescu")
    assert "node-recv-2" in run_bench("ingest")


@pytest.mark.integration
def test_e2e_bench_runs() -> None:
    require_tool("storescp")
    require_tool("storescu")
    assert "images/min" in run_bench("e2e", "--bundle", str(PLUMBING_BUNDLE))


@pytest.mark.integration
def test_burst_profile_bench_runs() -> None:
    require_tool("storescp")
    require_tool("storescu")
    out = run_bench("burst_profile", "--bundle", str(PLUMBING_BUNDLE))
    assert "CPU-s per image" in out and "of the bound" in out


@pytest.mark.integration
def test_memory_bench_runs() -> None:
    require_tool("storescp")
    require_tool("redis-server")
    assert "inference worker" in run_bench("memory", "--bundle", str(PLUMBING_BUNDLE))


def test_rle_decoders_bench_runs() -> None:
    out = run_bench("rle_decoders")
    assert "| pylibjpeg |" in out and "| pydicom |" in out


@pytest.mark.integration
def test_summary_syntax_bench_runs() -> None:
    require_tool("storescp")
    out = run_bench("summary_syntax", "--bundle", str(PLUMBING_BUNDLE))
    assert "jpeg2000-lossless" in out and "SC sent as" in out


def test_gpu_bench_says_clearly_when_there_is_no_cuda() -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("a CUDA provider is present: bench/gpu.py would run for minutes")
    done = subprocess.run(
        [sys.executable, "-m", "bench.gpu", "--bundle", str(PLUMBING_BUNDLE)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode != 0
    assert "CUDAExecutionProvider" in done.stderr and "onnxruntime-gpu" in done.stderr


def test_bench_run_lists_the_benchmarks() -> None:
    done = subprocess.run(
        [sys.executable, str(Path(REPO) / "bench" / "run.py")], capture_output=True, text=True
    )
    assert done.returncode != 0 and "inference" in done.stderr and "ingest" in done.stderr
