"""Load: 8 concurrent storescu associations send N small synthetic chest CRs (256 x 256) to
the node (Celery over a redis-server of the test's own, one separate inference worker); every
instance ends with exactly one SR at the destination storescp: 0 lost, 0 duplicates, counted
in the ledger and in the files the destination received.

N is CXR_LOAD_INSTANCES (default 80, the CI size; docs/RELIABILITY.md has the figures of a
run with 2000). The figures this prints are for the record, not asserted.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread

from dicom_node.records.ledger import JobState, Ledger, OutputKind
from tests.conftest import REPO, NodeProcess, require_tool, wait_for
from tests.peers import Pacs, RedisServer
from tests.synthetic import synthetic_cr, write

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ASSOCIATIONS = 8


def instance_count() -> int:
    return int(os.environ.get("CXR_LOAD_INSTANCES", "80"))


@pytest.mark.timeout(max(600, instance_count() * 3))
def test_concurrent_senders_lose_nothing_and_duplicate_nothing(
    start_node: Callable[..., NodeProcess],
    own_redis: RedisServer,
    pacs_factory: Callable[..., Pacs],
    tmp_path: Path,
) -> None:
    count = instance_count()
    exe = require_tool("storescu")
    folder = tmp_path / "in"
    folder.mkdir()
    files = [write(synthetic_cr(256, seed=i), folder / f"cr{i:05d}.dcm") for i in range(count)]
    sent = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}
    assert len(sent) == count

    pacs = pacs_factory()
    node = start_node(
        broker_url=own_redis.url,
        destinations=pacs.address,
        produce_sc="false",
        recovery_interval_s="10",
    )
    worker_log = (tmp_path / "worker.log").open("wb")
    node.extra.append(
        subprocess.Popen(
            [sys.executable, "-m", "dicom_node", "worker"],
            env=node.env,
            stdout=worker_log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            start_new_session=True,
        )
    )

    started = time.monotonic()
    senders = [
        subprocess.Popen(
            [exe, "-aet", f"MOD{i}", "-aec", "CXRNODE", "127.0.0.1", str(node.port)]
            + [str(p) for p in files[i::ASSOCIATIONS]],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(ASSOCIATIONS)
    ]
    outputs = [sender.communicate(timeout=3600)[0] for sender in senders]
    sent_s = time.monotonic() - started
    for sender, output in zip(senders, outputs, strict=True):
        assert sender.returncode == 0, output[-2000:]
        assert "E:" not in output, output[-2000:]

    ledger = Ledger(node.data_dir / "ledger.sqlite3")
    assert {j.sop_instance_uid for j in ledger.jobs_in(tuple(JobState))} == sent  # all accepted
    wait_for(
        lambda: ledger.counts()["delivered"] == count,
        max(300.0, count * 2.0),
        f"{count} jobs delivered",
        interval=2.0,
    )
    done_s = time.monotonic() - started
    counts = ledger.counts()
    assert counts["delivered"] == count and sum(counts.values()) == count

    jobs = ledger.jobs_in((JobState.DELIVERED,))
    wanted = {ledger.output_uids(job.job_id)[OutputKind.SR].sop_instance_uid for job in jobs}
    wait_for(lambda: set(pacs.sr_copies()) >= wanted, 120, "every SR file at the destination")
    copies = pacs.sr_copies()
    lost = wanted - set(copies)
    duplicated = {uid: n for uid, n in copies.items() if n > 1}
    assert not lost and not duplicated and set(copies) == wanted
    for job in jobs:
        assert [d.attempts for d in ledger.deliveries(job.job_id)] == [1]

    print(
        f"\nload: {count} instances over {ASSOCIATIONS} associations; all accepted in "
        f"{sent_s:.1f} s ({count / sent_s:.1f}/s); all SRs delivered {done_s:.1f} s after the "
        f"first send ({count / done_s:.2f}/s); lost 0, duplicates 0"
    )


@pytest.mark.parametrize("broker", ["redis", "embedded"])
def test_results_go_out_before_new_work_is_prepared(
    broker: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """On the node queue, a finalize queued after a burst of preparations is taken first (the
    order a worker's BRPOP gets them from Redis, and the order of the embedded queue's file
    names); a delivery does not wait behind either: it is on a queue of its own."""
    from dicom_node.jobs.queue import DELIVER, PREPARE, make_celery
    from dicom_node.settings import Settings
    from worker.contracts import FINALIZE

    if broker == "redis":
        own_redis: RedisServer = request.getfixturevalue("own_redis")
        settings = Settings(data_dir=tmp_path / "node", broker_url=own_redis.url)
    else:
        settings = Settings(data_dir=tmp_path / "node")
        settings.make_dirs()
    app = make_celery(settings)
    for i in range(3):
        app.send_task(PREPARE, args=[f"p{i}"])
    app.send_task(FINALIZE, args=[{"job_id": "f"}])
    app.send_task(DELIVER, args=["d", "PACS@h:1"])

    def take(name: str, count: int) -> list[str]:
        with app.connection_for_read() as conn:
            queue = conn.SimpleQueue(name)
            taken = []
            for _ in range(count):
                message = queue.get(timeout=10)
                taken.append(message.headers["task"])
                message.ack()
            queue.close()
        return taken

    assert take("deliver", 1) == [DELIVER]
    assert take("node", 4) == [FINALIZE, PREPARE, PREPARE, PREPARE]
