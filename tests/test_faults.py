"""Nothing accepted is lost: each fault of docs/RELIABILITY.md, caused for real.

Real parts throughout: `cxr-node serve` and `cxr-node worker` processes, a redis-server of the
test's own (never the machine's shared one), DCMTK storescu sending and storescp (`+uf`, so a
duplicate send shows as a second file) receiving. Results are counted at the destination and
in the ledger. The summary SC is off to spare CPU: deliveries are per object, the SR stands
for all of them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from dicom_node import dimse_status
from dicom_node.jobs import steps
from dicom_node.jobs.queue import INFER_QUEUE
from dicom_node.records.ledger import DeliveryState, JobState, Ledger, OutputKind
from tests.conftest import REPO, NodeProcess, free_port, wait_for
from tests.peers import Pacs, RedisServer, Scp, storescu_statuses
from tests.synthetic import synthetic_cr, write
from tests.test_pipeline import infer, make_node, receive

# --- units: claims, analysis failures -------------------------------------------------------


def test_a_second_delivery_run_finds_the_claim_taken(tmp_path: Path, chest_cr: Path) -> None:
    node = make_node(tmp_path)
    job_id = receive(node, chest_cr, "PAT1")
    node.ledger.add_deliveries(job_id, ["PACS@h:1"])
    ledger = node.ledger
    assert ledger.claim(job_id, "PACS@h:1", lease_s=300)
    assert not ledger.claim(job_id, "PACS@h:1", lease_s=300)  # a concurrent run
    ledger.release(job_id, "PACS@h:1")
    assert ledger.claim(job_id, "PACS@h:1", lease_s=0.0)
    time.sleep(0.01)
    assert ledger.claim(job_id, "PACS@h:1", lease_s=300)  # the lease of a dead run lapsed
    ledger.release(job_id, "PACS@h:1")
    ledger.record_attempt(job_id, "PACS@h:1", DeliveryState.DELIVERED)
    assert not ledger.claim(job_id, "PACS@h:1", lease_s=300)  # nothing pending


def test_claims_of_a_dead_delivery_run_are_freed_when_the_delivery_worker_starts(
    tmp_path: Path, chest_cr: Path
) -> None:
    node = make_node(tmp_path)
    job_id = receive(node, chest_cr, "PAT1")
    node.ledger.add_deliveries(job_id, ["PACS@h:1", "PACS@h:2"])
    assert node.ledger.claim(job_id, "PACS@h:1", lease_s=300)  # then its run died
    assert node.ledger.release_all_claims() == 1
    assert node.ledger.claim(job_id, "PACS@h:1", lease_s=300)  # at once, not in 5 min
    assert node.ledger.release_all_claims() == 1
    assert node.ledger.release_all_claims() == 0


def test_results_that_cannot_be_built_end_in_a_visible_failure(
    tmp_path: Path, chest_cr: Path
) -> None:
    node = make_node(tmp_path)
    job_id = receive(node, chest_cr, "PAT1")
    result = infer(node, job_id)
    spool = Path(node.ledger.get(job_id).spool_path or "")  # type: ignore[union-attr]
    kept = spool.read_bytes()
    spool.unlink()  # the source is gone when the SR is to be built
    assert steps.finalize_or_fail(node, result) == []
    job = node.ledger.get(job_id)
    assert job is not None and job.state is JobState.FAILED
    assert "results not built: FileNotFoundError" in (job.reason or "")
    assert "PAT1" not in (job.reason or "")
    # the operator retry: back to received, and then it goes through
    spool.write_bytes(kept)
    assert node.ledger.retry_analysis(job_id)
    assert not node.ledger.retry_analysis(job_id)  # only failed jobs
    assert steps.finalize_or_fail(node, infer(node, job_id)) == ["outbox"]
    assert steps.deliver(node, job_id, "outbox").delivered


# --- helpers for the process tests ------------------------------------------------------------


def make_instances(folder: Path, count: int, size: int = 128) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [write(synthetic_cr(size, seed=i), folder / f"cr{i:04d}.dcm") for i in range(count)]


def ledger_of(node: NodeProcess) -> Ledger:
    return Ledger(node.data_dir / "ledger.sqlite3")


def expected_srs(node: NodeProcess) -> set[str]:
    ledger = ledger_of(node)
    jobs = ledger.jobs_in((JobState.DELIVERED,))
    return {ledger.output_uids(job.job_id)[OutputKind.SR].sop_instance_uid for job in jobs}


def wait_delivered(node: NodeProcess, count: int, timeout: float = 300) -> None:
    ledger = ledger_of(node)
    try:
        wait_for(
            lambda: ledger.counts()["delivered"] == count,
            timeout,
            f"{count} jobs delivered",
            interval=1.0,
        )
    except AssertionError as exc:  # the states at the time-out, not at the start
        raise AssertionError(f"{exc} (the ledger: {ledger.counts()})") from None


def assert_each_sr_once(node: NodeProcess, pacs: Pacs, count: int) -> None:
    wanted = expected_srs(node)
    assert len(wanted) == count
    wait_for(lambda: set(pacs.sr_copies()) >= wanted, 60, "every SR at the destination")
    copies = pacs.sr_copies()
    assert set(copies) == wanted  # none lost, nothing else
    assert max(copies.values()) == 1, f"sent twice: {[u for u, n in copies.items() if n > 1]}"


def start_worker(node: NodeProcess, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dicom_node", "worker"],
            env=node.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            start_new_session=True,
        )
    node.extra.append(proc)
    return proc


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


# --- the faults --------------------------------------------------------------------------------


def inference_unacked(redis: Any) -> int:
    """Tasks of the inference queue taken and not acknowledged (kombu keeps each in the
    "unacked" hash as [message, exchange, routing key]); the node host's own workers hold
    prepare, finalize and delivery tasks there too."""
    return sum(json.loads(raw)[2] == INFER_QUEUE for raw in redis.hvals("unacked"))


@pytest.mark.integration
@pytest.mark.slow
def test_worker_killed_mid_job_is_redone_and_delivered_once(
    start_node: Callable[..., NodeProcess],
    own_redis: RedisServer,
    pacs_factory: Callable[..., Pacs],
    tmp_path: Path,
) -> None:
    """SIGKILL the inference worker while it holds unacknowledged tasks: they come back after
    the visibility time-out (kombu restores them, and the node's sweep re-enqueues the jobs),
    and each SR reaches the destination exactly once."""
    pacs = pacs_factory()
    node = start_node(
        broker_url=own_redis.url,
        destinations=pacs.address,
        produce_sc="false",
        visibility_timeout_s="15",
        recovery_interval_s="3",
    )
    log = tmp_path / "worker.log"
    worker = start_worker(node, log)
    wait_for(lambda: "ready" in log.read_text(errors="replace"), 120, "the worker to be ready")
    redis = own_redis.client()
    files = make_instances(tmp_path / "in", 24)
    sent = 0
    held = 0
    for batch in (files[:8], files[8:16], files[16:]):
        assert storescu_statuses(node.port, batch) == [dimse_status.SUCCESS] * len(batch)
        sent += len(batch)
        # freeze the worker the moment it holds a task, and look again at what it holds
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not held:
            if inference_unacked(redis):
                os.killpg(worker.pid, signal.SIGSTOP)
                held = inference_unacked(redis)
                if not held:
                    os.killpg(worker.pid, signal.SIGCONT)
            else:
                time.sleep(0.005)
        if held:
            break
    assert held, "the worker never held a task unacknowledged"
    ledger = ledger_of(node)
    unfinished = ledger.counts()["analysing"]
    kill_group(worker)
    assert unfinished >= 1  # the killed worker left jobs half done
    start_worker(node, tmp_path / "worker2.log")
    wait_delivered(node, sent, timeout=400)
    assert_each_sr_once(node, pacs, sent)
    assert all(
        d.attempts == 1
        for job in ledger.jobs_in((JobState.DELIVERED,))
        for d in ledger.deliveries(job.job_id)
    )


@pytest.mark.integration
@pytest.mark.slow
def test_redis_restart_with_queued_jobs_loses_nothing(
    start_node: Callable[..., NodeProcess],
    own_redis: RedisServer,
    pacs_factory: Callable[..., Pacs],
    tmp_path: Path,
) -> None:
    pacs = pacs_factory()
    node = start_node(
        broker_url=own_redis.url,
        destinations=pacs.address,
        produce_sc="false",
        recovery_interval_s="2",
    )
    files = make_instances(tmp_path / "in", 6)
    assert storescu_statuses(node.port, files) == [dimse_status.SUCCESS] * 6
    ledger = ledger_of(node)
    redis = own_redis.client()
    # no inference worker yet: the jobs wait in Redis's "infer" queue
    wait_for(lambda: ledger.counts()["analysing"] == 6, 120, "6 jobs prepared")
    wait_for(lambda: redis.llen("infer") == 6, 30, "6 inference tasks queued in Redis")
    own_redis.kill()
    own_redis.start()  # empty: the queued tasks are gone
    assert own_redis.client().llen("infer") == 0
    start_worker(node, tmp_path / "worker.log")
    wait_delivered(node, 6)
    assert_each_sr_once(node, pacs, 6)
    assert "the broker restarted" in node.logs()


@pytest.mark.integration
@pytest.mark.slow
def test_broker_down_at_start_and_while_instances_arrive(
    start_node: Callable[..., NodeProcess],
    own_redis: RedisServer,
    pacs_factory: Callable[..., Pacs],
    tmp_path: Path,
) -> None:
    """Redis is away when the node starts and while instances arrive: they are accepted
    (the spool is the source of truth) and analysed once Redis is back."""
    pacs = pacs_factory()
    own_redis.kill()
    node = start_node(
        broker_url=own_redis.url,
        destinations=pacs.address,
        produce_sc="false",
        recovery_interval_s="2",
    )
    files = make_instances(tmp_path / "in", 3)
    assert storescu_statuses(node.port, files) == [dimse_status.SUCCESS] * 3
    ledger = ledger_of(node)
    assert ledger.counts()["received"] == 3
    own_redis.start()
    start_worker(node, tmp_path / "worker.log")
    wait_delivered(node, 3)
    assert_each_sr_once(node, pacs, 3)


@pytest.mark.integration
@pytest.mark.slow
def test_destination_down_for_a_while(
    start_node: Callable[..., NodeProcess],
    pacs_factory: Callable[..., Pacs],
    tmp_path: Path,
) -> None:
    port = free_port()
    node = start_node(
        destinations=f"PACS@127.0.0.1:{port}",
        produce_sc="false",
        delivery_attempts="10",
        delivery_backoff_s="1",
    )
    files = make_instances(tmp_path / "in", 3)
    assert storescu_statuses(node.port, files) == [dimse_status.SUCCESS] * 3
    ledger = ledger_of(node)

    def failed_attempts() -> int:
        rows = [d for job in ledger.jobs_in(tuple(JobState)) for d in ledger.deliveries(job.job_id)]
        return sum(1 for d in rows if d.attempts >= 2 and d.state is DeliveryState.PENDING)

    wait_for(lambda: failed_attempts() == 3, 180, "two failed attempts per job (backoff)")
    assert ledger.counts()["delivered"] == 0
    pacs = pacs_factory(port)  # the PACS is back
    wait_delivered(node, 3)
    assert_each_sr_once(node, pacs, 3)
    for job in ledger.jobs_in((JobState.DELIVERED,)):
        (delivery,) = ledger.deliveries(job.job_id)
        assert delivery.attempts >= 3 and delivery.last_error is None


@pytest.mark.integration
@pytest.mark.slow
def test_dead_letter_shown_and_retried(
    start_node: Callable[..., NodeProcess],
    pacs_factory: Callable[..., Pacs],
    tmp_path: Path,
) -> None:
    port = free_port()
    node = start_node(
        destinations=f"PACS@127.0.0.1:{port}",
        produce_sc="false",
        delivery_attempts="2",
        delivery_backoff_s="1",
    )
    (path,) = make_instances(tmp_path / "in", 1)
    assert storescu_statuses(node.port, [path]) == [dimse_status.SUCCESS]
    ledger = ledger_of(node)
    wait_for(lambda: ledger.counts()["failed"] == 1, 180, "the job dead-lettered")
    (job,) = ledger.jobs_in((JobState.FAILED,))
    shown = node.cli("status")
    assert shown.returncode == 0
    assert job.job_id in shown.stdout and "delivery of the SR" in shown.stdout
    pacs = pacs_factory(port)
    retried = node.cli("retry", job.job_id)
    assert retried.returncode == 0, retried.stdout + retried.stderr
    wait_delivered(node, 1)
    assert_each_sr_once(node, pacs, 1)
    assert node.cli("retry", job.job_id).returncode == 1  # nothing left to retry


@pytest.mark.integration
@pytest.mark.slow
def test_node_killed_and_restarted_with_jobs_in_every_state(
    start_node: Callable[..., NodeProcess],
    pacs_factory: Callable[..., Pacs],
    tmp_path: Path,
) -> None:
    """Kill the whole node (SCP, queue, worker: its process group) with SIGKILL while one
    batch is delivered and the next is arriving, then start it again on the same data."""
    pacs = pacs_factory()
    settings = {"destinations": pacs.address, "produce_sc": "false", "recovery_interval_s": "2"}
    node = start_node(**settings)
    first = make_instances(tmp_path / "in", 4)
    lateral = synthetic_cr(128, seed=99)
    lateral.ViewPosition = "LL"
    first.append(write(lateral, tmp_path / "in" / "lateral.dcm"))
    assert storescu_statuses(node.port, first) == [dimse_status.SUCCESS] * 5
    wait_delivered(node, 4)
    second = make_instances(tmp_path / "in2", 8)
    ledger = ledger_of(node)
    unfinished = (JobState.RECEIVED, JobState.ANALYSING, JobState.ANALYSED)
    sender = threading.Thread(
        target=lambda: subprocess.run(
            ["storescu", "-aet", "MODALITY", "-aec", "CXRNODE", "127.0.0.1", str(node.port)]
            + [str(p) for p in second],
            capture_output=True,
            timeout=300,
        )
    )
    sender.start()

    def under_way() -> bool:
        counts = ledger.counts()
        return (
            sum(counts[s] for s in unfinished) >= 3
            and counts["analysing"] + counts["analysed"] >= 1
        )

    wait_for(under_way, 240, "jobs of the second batch under way", interval=0.02)
    kill_group(node.process)
    at_kill = ledger.counts()
    sender.join()
    print("states when the node was killed:", at_kill)
    assert at_kill["delivered"] >= 4 and at_kill["rejected"] == 1
    assert sum(at_kill[s] for s in unfinished) >= 3, at_kill

    restarted = start_node(**settings)
    assert restarted.data_dir == node.data_dir
    # the sender sends again what the dead node had not answered (duplicates: success)
    assert storescu_statuses(restarted.port, second) == [dimse_status.SUCCESS] * 8
    wait_delivered(restarted, 12)
    assert ledger.counts()["rejected"] == 1
    wanted = expected_srs(restarted)
    wait_for(lambda: set(pacs.sr_copies()) >= wanted, 60, "every SR at the destination")
    copies = pacs.sr_copies()
    assert set(copies) == wanted
    # a send cut short by the kill may be repeated (the same SOP Instance UID: the PACS
    # replaces it); no more than that
    assert max(copies.values()) <= 2, copies


@pytest.mark.integration
def test_disk_nearly_full_refuses_new_and_keeps_accepted(
    scp: Callable[..., Scp], tmp_path: Path
) -> None:
    node = scp()
    first, second = make_instances(tmp_path / "in", 2)
    assert storescu_statuses(node.port, [first]) == [dimse_status.SUCCESS]
    node.settings.min_free_disk_mb = 10**9  # a petabyte: the disk is "nearly full"
    assert storescu_statuses(node.port, [second]) == [dimse_status.OUT_OF_RESOURCES]
    spooled = list(node.settings.spool_dir.iterdir())
    assert len(spooled) == 1  # nothing half-written
    assert dcmread(spooled[0]).SOPInstanceUID == dcmread(first).SOPInstanceUID
    assert sum(node.ledger.counts().values()) == 1
    assert len(node.enqueued) == 1
    node.settings.min_free_disk_mb = 0  # space again: the sender's retry goes through
    assert storescu_statuses(node.port, [second]) == [dimse_status.SUCCESS]
    assert len(list(node.settings.spool_dir.iterdir())) == 2


@pytest.mark.integration
@pytest.mark.slow
def test_same_instance_twice_is_analysed_once(
    start_node: Callable[..., NodeProcess],
    pacs_factory: Callable[..., Pacs],
    tmp_path: Path,
) -> None:
    pacs = pacs_factory()
    node = start_node(destinations=pacs.address, produce_sc="false")
    one, two = make_instances(tmp_path / "in", 2)
    assert storescu_statuses(node.port, [one]) == [dimse_status.SUCCESS]
    assert storescu_statuses(node.port, [one]) == [dimse_status.SUCCESS]  # again: still success
    # and the other one by two senders at the same time
    results: Counter[int] = Counter()

    def send() -> None:
        results.update(storescu_statuses(node.port, [two]))

    threads = [threading.Thread(target=send) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == Counter({dimse_status.SUCCESS: 2})
    wait_delivered(node, 2)
    assert sum(ledger_of(node).counts().values()) == 2
    assert_each_sr_once(node, pacs, 2)
    assert "not analysed again" in node.logs()


def freeze_a_running_step(node: NodeProcess, timeout: float) -> tuple[int, Path]:
    """Wait for a job step to run in the worker (its crash-guard marker), SIGSTOP the worker
    and return its pid and the marker that is still there, i.e. the step frozen mid-run."""
    from worker.crash_guard import read_marker

    folder = node.data_dir / "running"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in folder.glob("*.running") if folder.is_dir() else []:
            marker = read_marker(path)
            if marker is None:
                continue
            os.kill(marker.pid, signal.SIGSTOP)
            if path.exists():
                return marker.pid, path
            os.kill(marker.pid, signal.SIGCONT)  # it ended meanwhile: look again
        time.sleep(0.002)
    raise AssertionError("no job step was seen running")


@pytest.mark.integration
@pytest.mark.slow
def test_step_that_kills_the_worker_fails_its_job_instead_of_looping(
    start_node: Callable[..., NodeProcess],
    pacs_factory: Callable[..., Pacs],
    tmp_path: Path,
) -> None:
    """SIGKILL the node's worker in the middle of a job step (as the OOM killer would): the
    node restarts the worker and the sweep sends the job again; with CXR_STEP_CRASH_LIMIT=1
    the step is not run a second time and the job fails visibly, with the reason; an
    operator's retry then analyses and delivers it, and later studies go through."""
    pacs = pacs_factory()
    node = start_node(
        destinations=pacs.address,
        produce_sc="false",
        step_crash_limit="1",
        visibility_timeout_s="10",
        recovery_interval_s="2",
    )
    first, second = make_instances(tmp_path / "in", 2)
    assert storescu_statuses(node.port, [first]) == [dimse_status.SUCCESS]
    pid, marker = freeze_a_running_step(node, 120)
    step = marker.name.split("--")[0]
    os.kill(pid, signal.SIGKILL)
    ledger = ledger_of(node)
    wait_for(lambda: ledger.counts()["failed"] == 1, 120, "the job failed, not run again")
    (job,) = ledger.jobs_in((JobState.FAILED,))
    assert f"{step} ended the worker process 1 time" in (job.reason or "")
    assert not list(marker.parent.glob("*.running"))  # the failure removed the marker
    assert f"job {job.job_id}: analysis failed: {step} ended the worker process" in node.logs()
    # the worker is back and the node goes on with the next study
    assert storescu_statuses(node.port, [second]) == [dimse_status.SUCCESS]
    wait_delivered(node, 1, timeout=120)
    # the operator retries the failed one: analysed and delivered like any other
    retried = node.cli("retry", job.job_id)
    assert retried.returncode == 0, retried.stdout + retried.stderr
    wait_delivered(node, 2, timeout=120)
    assert_each_sr_once(node, pacs, 2)
