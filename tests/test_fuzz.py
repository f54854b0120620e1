"""Fuzz: mutated DICOM files fed to the node's decoder path, and sent over the wire.

CI runs a few hundred cases; the long mode is `CXR_FUZZ_CASES=10000` (and
`CXR_FUZZ_WIRE_CASES` for the wire). `CXR_FUZZ_SEED` picks another campaign; a finding names
its case number, which `tests.fuzzing.mutate(make_seeds(), Random(f"{seed}:{case}"))`
rebuilds.
"""

from __future__ import annotations

import os
import random
import subprocess
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from pynetdicom import AE, _config

from dicom_node.jobs import steps
from dicom_node.jobs.steps import NodeRuntime
from dicom_node.receiving.scp import TRANSFER_SYNTAXES, VERIFICATION
from dicom_node.records.ledger import JobState
from tests.conftest import require_tool
from tests.fuzzing import MEMORY_LIMIT, make_seeds, mutate, run_campaign
from tests.peers import Scp
from tests.synthetic import CR_STORAGE

SEED = int(os.environ.get("CXR_FUZZ_SEED", "1"))
CASES = int(os.environ.get("CXR_FUZZ_CASES", "300"))
WIRE_CASES = int(os.environ.get("CXR_FUZZ_WIRE_CASES", "40"))


@pytest.mark.slow
@pytest.mark.timeout(max(600, CASES // 5))
def test_decoder_survives_mutated_files() -> None:
    report = run_campaign(SEED, CASES, case_timeout_s=30)
    print(
        f"\nfuzz seed {SEED}: {report.cases} cases in {report.seconds:.1f} s, "
        f"peak RSS {report.peak_rss_kb / 1024:.0f} MiB, outcomes {dict(report.outcomes)}"
    )
    assert report.findings == []
    assert report.cases == CASES
    assert report.peak_rss_kb * 1024 < MEMORY_LIMIT
    # the mutator reaches every stage: refusals, decoder failures and decoded images
    assert report.outcomes["analysable"] and report.outcomes["refused"]
    assert any(outcome.startswith("rejected:") for outcome in report.outcomes)


@pytest.mark.integration
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_node_answers_every_mutated_instance(scp: Callable[..., Scp], tmp_path: Path) -> None:
    """Mutated data sets (intact File Meta, so that they can be sent) over the wire, byte for
    byte: each gets a C-STORE status, and each accepted one is then prepared by the node's
    own step: analysable or rejected with a reason, never a failed job."""
    node = scp()
    runtime = NodeRuntime(node.settings)
    seeds = make_seeds()
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(VERIFICATION)
    for syntax in TRANSFER_SYNTAXES:  # one context each: the file's own syntax is sent
        ae.add_requested_context(CR_STORAGE, syntax)
    statuses: Counter[int] = Counter()
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # the file's bytes, unchanged
    try:
        assoc = ae.associate("127.0.0.1", node.port, ae_title="CXRNODE")
        for case in range(WIRE_CASES):
            path = tmp_path / f"case{case}.dcm"
            path.write_bytes(mutate(seeds, random.Random(f"wire{SEED}:{case}"), keep_meta=True))
            if not assoc.is_established:
                assoc = ae.associate("127.0.0.1", node.port, ae_title="CXRNODE")
            response = assoc.send_c_store(path)
            code = getattr(response, "Status", None)
            assert code is not None, f"case {case}: no C-STORE response"
            statuses[int(code)] += 1
        assert assoc.send_c_echo().Status == 0  # still serving
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
    print(f"\nwire fuzz: {WIRE_CASES} cases, statuses {dict(statuses)}")
    assert sum(statuses.values()) == WIRE_CASES

    for job_id in node.enqueued:
        steps.prepare_or_fail(runtime, job_id)
        job = node.ledger.get(job_id)
        assert job is not None
        assert job.state in (JobState.ANALYSING, JobState.REJECTED), (job_id, job.reason)
    echo = subprocess.run(
        [
            require_tool("echoscu"),
            "-aet",
            "MODALITY",
            "-aec",
            "CXRNODE",
            "127.0.0.1",
            str(node.port),
        ],
        capture_output=True,
        timeout=60,
    )
    assert echo.returncode == 0
