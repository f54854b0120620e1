#!/usr/bin/env python3
"""Run a benchmark by name: `bench/run.py inference --repeats 5` = `python -m bench.inference`.

Names: make_bundle, inference, pipeline, retrieval, ingest, e2e, burst_profile,
memory, gpu, rle_decoders, summary_syntax, decode_at_size.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

NAMES = (
    "make_bundle",
    "inference",
    "pipeline",
    "retrieval",
    "ingest",
    "e2e",
    "burst_profile",
    "memory",
    "gpu",
    "rle_decoders",
    "summary_syntax",
    "decode_at_size",
)


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in NAMES:
        sys.exit(f"usage: bench/run.py {{{','.join(NAMES)}}} [options]")
    repo = str(Path(__file__).resolve().parent.parent)
    if repo not in sys.path:
        sys.path.insert(0, repo)
    name = sys.argv.pop(1)
    sys.argv[0] = f"bench.{name}"
    runpy.run_module(f"bench.{name}", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
