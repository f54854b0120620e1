"""Observability: /metrics counters and histograms change as studies go through, /health
turns 503 when Redis is down (node and worker), the audit log has every association,
instance and delivery, JSON logs carry no patient data, and the status page in headless
Chromium shows the jobs, the dead letter with its retry command, and the bundle."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread
from pydicom.uid import generate_uid

from dicom_node.logs import make_formatter
from dicom_node.records.audit import AuditLog
from dicom_node.records.ledger import Ledger
from dicom_node.records.metrics_store import BUCKETS, MetricsStore, NodeCollector
from dicom_node.results.sr.codes import COMPREHENSIVE_SR
from tests.conftest import (
    PLUMBING_BUNDLE,
    NodeProcess,
    Peer,
    free_port,
    require_tool,
    wait_for,
)
from tests.test_e2e import PHI_ID, PHI_NAME, of_class, storescu, with_identity

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def http_get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=20) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


def scrape(port: int) -> Samples:
    status, body = http_get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200, body
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def health(port: int) -> tuple[int, dict[str, Any]]:
    """/health's status code and its JSON report."""
    status, body = http_get(f"http://127.0.0.1:{port}/health")
    return status, (json.loads(body) if body else {})


def health_is(port: int, status: int) -> Callable[[], bool]:
    """A `wait_for` condition: /health on `port` answers `status`."""
    return lambda: health(port)[0] == status


def audit_lines(node: NodeProcess) -> list[dict[str, Any]]:
    path = node.data_dir / "logs" / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def plumbing_device_uid() -> str:
    return str(json.loads((PLUMBING_BUNDLE / "manifest.json").read_text())["device_uid"])


# --- units ------------------------------------------------------------------------------


def test_metrics_store_sums_across_instances_and_keeps_cumulative_buckets(tmp_path: Path) -> None:
    path = tmp_path / "metrics.sqlite3"
    a, b = MetricsStore(path), MetricsStore(path)  # as two processes would
    a.inc("received")
    b.inc("received")
    b.inc("delivered", kind="sr", destination="PACS@h:104")
    a.observe("infer", 0.07)
    b.observe("infer", 42.0)
    b.observe("end_to_end", 3.0, once="job1")
    a.observe("end_to_end", 9.0, once="job1")  # the same job finished twice: counted once
    with pytest.raises(ValueError):
        a.inc("delivered", kind="sr")  # a label missing
    registry_text = "\n".join(
        f"{s.name} {s.labels} {s.value}"
        for m in NodeCollector(a, lambda: [], dict).collect()
        for s in m.samples
    )
    assert "cxr_received_total {} 2.0" in registry_text
    histograms = a.histograms()
    cumulative, total = histograms["infer"]
    assert cumulative[-1] == 2 and total == pytest.approx(42.07)
    assert cumulative[BUCKETS.index(0.1)] == 1  # 0.07 s is in le=0.1, 42 s is not
    assert cumulative == sorted(cumulative)
    assert histograms["end_to_end"][0][-1] == 1 and histograms["end_to_end"][1] == 3.0


def test_audit_log_takes_identifiers_only(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "logs" / "audit.jsonl")
    audit.record("received", sop_instance_uid="1.2.3", calling_ae="CR1")
    with pytest.raises(ValueError):
        audit.record("received", patient_name="Doe^John")
    (line,) = (tmp_path / "logs" / "audit.jsonl").read_text().splitlines()
    assert json.loads(line)["sop_instance_uid"] == "1.2.3"


def test_json_log_lines_have_fixed_fields_and_no_extras() -> None:
    import logging

    record = logging.LogRecord("dicom_node.x", logging.INFO, __file__, 1, "job %s", ("j1",), None)
    record.data = {"args": "task payload"}  # what Celery attaches
    line = json.loads(make_formatter("json").format(record))
    assert line["message"] == "job j1" and line["level"] == "INFO"
    assert set(line) == {"time", "level", "process", "logger", "message"}


# --- integration ------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.slow
def test_metrics_audit_and_json_logs_for_sent_studies(
    start_node: Callable[..., NodeProcess],
    storescp: Peer,
    chest_cr: Path,
    tmp_path: Path,
) -> None:
    port = free_port()
    node = start_node(destinations=storescp.address, http_port=str(port), log_format="json")
    wait_for(lambda: health(port)[0] == 200, 60, "/health to answer 200")
    before = scrape(port)
    assert value(before, "cxr_received_total") == 0
    assert value(before, "cxr_stage_seconds_count", stage="end_to_end") == 0
    info = {k: v for (n, labels), _ in before.items() if n == "cxr_bundle_info" for k, v in labels}
    assert info["device_uid"] == plumbing_device_uid()

    phi = with_identity(chest_cr, tmp_path / "phi.dcm", PHI_NAME, PHI_ID)
    lateral_ds = dcmread(phi)
    lateral_ds.ViewPosition = "LL"
    lateral_ds.SOPInstanceUID = generate_uid()
    lateral_ds.file_meta.MediaStorageSOPInstanceUID = lateral_ds.SOPInstanceUID
    lateral = tmp_path / "lateral.dcm"
    lateral_ds.save_as(lateral)
    empty_ds = dcmread(phi)
    del empty_ds.PixelData
    empty_ds.SOPInstanceUID = generate_uid()
    empty_ds.file_meta.MediaStorageSOPInstanceUID = empty_ds.SOPInstanceUID
    empty = tmp_path / "no-pixels.dcm"
    empty_ds.save_as(empty)

    assert storescu(node, [phi, lateral]) == 0
    storescu_args = [require_tool("storescu"), "-aet", "MODALITY", "-aec", "CXRNODE", "127.0.0.1"]
    subprocess.run(  # refused with 0xA900: storescu reports it; only the node's count matters
        [*storescu_args, str(node.port), str(empty)],
        capture_output=True,
        timeout=120,
    )
    echo = [require_tool("echoscu"), "-aet", "INTRUDER", "-aec", "NOTTHENODE", "127.0.0.1"]
    # called with the wrong AE title: the association is rejected
    subprocess.run([*echo, str(node.port)], capture_output=True, timeout=60)
    ledger = Ledger(node.data_dir / "ledger.sqlite3")
    wait_for(lambda: ledger.counts()["delivered"] == 1, 240, "the study delivered")
    wait_for(
        lambda: value(scrape(port), "cxr_stage_seconds_count", stage="end_to_end") == 1,
        30,
        "the end-to-end latency recorded",
    )
    after = scrape(port)
    assert value(after, "cxr_received_total") == 2  # the analysed and the lateral
    assert value(after, "cxr_rejected_total") == 1  # the lateral
    assert value(after, "cxr_refused_total", status="0xA900") == 1  # no pixel data
    assert value(after, "cxr_analysed_total") == 1
    assert value(after, "cxr_delivered_total", kind="sr", destination=storescp.address) == 1
    assert value(after, "cxr_delivered_total", kind="sc", destination=storescp.address) == 1
    assert value(after, "cxr_jobs", state="delivered") == 1
    assert value(after, "cxr_jobs", state="rejected") == 1
    assert ("cxr_queue_depth", frozenset({("queue", "infer")})) in after
    for stage in ("prepare", "queue_infer", "infer", "finalize", "deliver", "end_to_end"):
        count = value(after, "cxr_stage_seconds_count", stage=stage)
        assert count >= 1, stage
        assert value(after, "cxr_stage_seconds_bucket", stage=stage, le="+Inf") == count
        assert value(after, "cxr_stage_seconds_sum", stage=stage) > 0, stage
    assert value(after, "cxr_stage_seconds_sum", stage="end_to_end") >= value(
        after, "cxr_stage_seconds_sum", stage="infer"
    )

    # the audit log: the associations, each instance by UIDs, each delivered object
    lines = audit_lines(node)
    associations = [a for a in lines if a["event"] == "association"]
    accepted = [a for a in associations if a["outcome"] == "accepted"]
    assert accepted and all(a["calling_ae"] == "MODALITY" for a in accepted)
    assert all(a["address"] == "127.0.0.1" and a["called_ae"] == "CXRNODE" for a in accepted)
    (rejected,) = [a for a in associations if a["outcome"] == "rejected"]
    assert rejected["calling_ae"] == "INTRUDER" and rejected["called_ae"] == "NOTTHENODE"
    assert rejected["reason"].startswith("called AE title is not this node's")
    assert "rejected: called AE title is not this node's" in node.logs()  # and in the log
    received = {a["sop_instance_uid"]: a for a in lines if a["event"] == "received"}
    phi_uid = str(dcmread(phi, stop_before_pixels=True).SOPInstanceUID)
    assert received[phi_uid]["outcome"] == "analyse"
    assert received[str(lateral_ds.SOPInstanceUID)]["outcome"] == "not analysed"
    (refused,) = [a for a in lines if a["event"] == "refused"]
    assert refused["status"] == "0xA900"
    assert refused["sop_instance_uid"] == str(empty_ds.SOPInstanceUID)
    deliveries = [a for a in lines if a["event"] == "delivery"]
    assert {(d["kind"], d["status"], d["destination"]) for d in deliveries} == {
        ("sr", "delivered", storescp.address),
        ("sc", "delivered", storescp.address),
    }
    (sr_file,) = of_class(storescp.received(), COMPREHENSIVE_SR)
    sr_line = next(d for d in deliveries if d["kind"] == "sr")
    assert sr_line["sop_instance_uid"] == dcmread(sr_file).SOPInstanceUID
    assert sr_line["source_sop_instance_uid"] == phi_uid

    # JSON logs, one object per line, and no patient data anywhere
    for log_file in (node.data_dir / "logs").glob("*.log"):
        for line in log_file.read_text().splitlines():
            assert {"time", "level", "message"} <= set(json.loads(line)), line
    text = node.logs() + (node.data_dir / "logs" / "audit.jsonl").read_text()
    for secret in (PHI_NAME, PHI_NAME.replace("^", " "), PHI_ID, "Zyqoxwelt"):
        assert secret not in text, f"patient data in the logs: {secret}"


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Callable[[], subprocess.Popen[bytes]]]:
    """Our own redis-server on a free port (never the shared one): `start()` (re)starts it on
    the same port; the fixture stops it at the end."""
    exe = require_tool("redis-server")
    port = free_port()
    running: list[subprocess.Popen[bytes]] = []

    args = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [*args, "--dir", str(tmp_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        running.append(proc)
        import redis

        def answers() -> bool:
            try:
                return bool(redis.Redis(port=port, socket_timeout=1).ping())
            except redis.RedisError:
                return False

        wait_for(answers, 30, "redis-server to answer")
        return proc

    start.port = port  # type: ignore[attr-defined]
    yield start
    for proc in running:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=20)


@pytest.mark.integration
@pytest.mark.slow
def test_queue_depth_worker_metrics_and_health_while_redis_is_down(
    start_node: Callable[..., NodeProcess],
    redis_server: Callable[[], subprocess.Popen[bytes]],
    chest_cr: Path,
    tmp_path: Path,
) -> None:
    redis_proc = redis_server()
    url = f"redis://127.0.0.1:{redis_server.port}/0"  # type: ignore[attr-defined]
    http_port, worker_port = free_port(), free_port()
    node = start_node(broker_url=url, http_port=str(http_port), worker_http_port=str(worker_port))
    wait_for(lambda: health(http_port)[0] == 200, 90, "the node's /health to be 200")

    # no inference worker yet: the prepared job waits in the "infer" queue
    assert storescu(node, [chest_cr]) == 0
    wait_for(
        lambda: value(scrape(http_port), "cxr_queue_depth", queue="infer") == 1,
        120,
        "one message in the infer queue",
    )
    assert value(scrape(http_port), "cxr_jobs", state="analysing") == 1

    # an inference worker with its own health and metrics port takes it
    log = (tmp_path / "infer-worker.stderr").open("wb")
    node.extra.append(
        subprocess.Popen(
            [sys.executable, "-m", "dicom_node", "worker"],
            env=node.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    )
    wait_for(lambda: health(worker_port)[0] == 200, 90, "the worker's /health to be 200")
    _, report = health(worker_port)
    assert report["checks"]["bundle"]["ok"] is True
    ledger = Ledger(node.data_dir / "ledger.sqlite3")
    wait_for(lambda: ledger.counts()["delivered"] == 1, 240, "the job delivered (outbox)")
    assert value(scrape(http_port), "cxr_queue_depth", queue="infer") == 0
    worker_metrics = scrape(worker_port)
    assert value(worker_metrics, "cxr_worker_tasks_total", task="cxr.infer", state="SUCCESS") == 1
    assert value(worker_metrics, "cxr_worker_task_seconds_count", task="cxr.infer") == 1
    assert value(worker_metrics, "process_open_fds") > 0

    redis_proc.terminate()
    redis_proc.wait(timeout=20)
    for port in (http_port, worker_port):
        wait_for(health_is(port, 503), 60, f"/health on {port} to be 503")
        _status, report = health(port)
        checks = report["checks"]
        assert report["status"] == "unhealthy"
        assert checks["broker"]["ok"] is False
        assert checks["bundle"]["ok"] is True
    # the node's other checks still pass: only the broker is down
    _, report = health(http_port)
    assert [n for n, c in report["checks"].items() if not c["ok"]] == ["broker"]
    down = node.cli("health")  # what a monitoring script or HEALTHCHECK runs
    assert down.returncode == 1 and "broker unreachable" in down.stdout

    redis_server()  # back on the same port: healthy again, no restart needed
    for port in (http_port, worker_port):
        wait_for(health_is(port, 200), 60, f"/health on {port} back to 200")


@pytest.mark.integration
@pytest.mark.slow
def test_status_page_in_chromium_shows_jobs_dead_letter_refusal_and_bundle(
    start_node: Callable[..., NodeProcess],
    storescp: Peer,
    chest_cr: Path,
    tmp_path: Path,
) -> None:
    """Also a screenshot of the page (headless Chromium); with CXR_EXAMPLE_STATUS_PNG set to a
    path it is copied there (how docs/example-status.png is made)."""
    import os
    import shutil

    import cv2

    from tests.peers import storescu_statuses
    from tests.synthetic import synthetic_cr, write
    from tests.test_viewer import chromium, page_text

    port = free_port()
    dead = f"DEAD@127.0.0.1:{free_port()}"  # nothing listens there
    node = start_node(
        destinations=f"{storescp.address},{dead}", delivery_attempts="1", http_port=str(port)
    )
    assert storescu(node, [chest_cr]) == 0
    ledger = Ledger(node.data_dir / "ledger.sqlite3")
    wait_for(lambda: ledger.counts()["failed"] == 1, 240, "the dead letter")
    (job,) = ledger.recent(10)
    wait_for(lambda: len(of_class(storescp.received(), COMPREHENSIVE_SR)) == 1, 60, "the SR")
    # a modality sends an instance without its Study Instance UID: refused, and shown
    broken = synthetic_cr(size=64)
    del broken.StudyInstanceUID
    no_study = write(broken, tmp_path / "no-study.dcm")
    assert storescu_statuses(node.port, [no_study], calling="CR_ROOM1") == [0x0120]

    run = chromium("--dump-dom", f"http://127.0.0.1:{port}/", profile=tmp_path / "profile")
    assert run.returncode == 0 and "<html" in run.stdout.lower(), run.stderr[-2000:]
    text = page_text(run.stdout)
    assert "Not for diagnostic use" in text
    assert job.job_id in text and str(chest_cr.name) not in text
    assert "1 failed" in text  # jobs by state
    assert f"cxr-node retry {job.job_id}" in text  # the dead letter and how to retry it
    assert f"to {dead} failed" in text  # its reason names the destination
    assert "0.0.0-random" in text and plumbing_device_uid() in text  # the bundle in use
    assert "RANDOM WEIGHTS" in text
    refusals = text[text.index("Refused instances") : text.index("Recent jobs")]
    assert "CR_ROOM1" in refusals and "127.0.0.1" in refusals
    assert "0x0120 (Failure: Missing Attribute)" in refusals
    assert "missing StudyInstanceUID" in refusals
    assert PHI_NAME not in text and "Test^" not in text  # no patient data

    png = tmp_path / "status.png"
    shot = chromium(
        f"--screenshot={png}",
        "--window-size=1200,1500",
        f"http://127.0.0.1:{port}/",
        profile=tmp_path / "profile-shot",
    )
    assert shot.returncode == 0 and png.is_file(), shot.stderr[-2000:]
    image = cv2.imread(str(png))
    assert image is not None and image.shape[:2] == (1500, 1200)
    # red text drawn (#b00): the failed state and the refusal's status
    red = (image[:, :, 2] > 150) & (image[:, :, 1] < 60) & (image[:, :, 0] < 60)
    assert red.sum() > 50
    if os.environ.get("CXR_EXAMPLE_STATUS_PNG"):
        shutil.copyfile(png, os.environ["CXR_EXAMPLE_STATUS_PNG"])

    samples = scrape(port)
    assert value(samples, "cxr_failed_total", stage="delivery") == 2  # the SR and SC to DEAD
    assert value(samples, "cxr_delivered_total", kind="sr", destination=storescp.address) == 1
    failed_lines = [
        a for a in audit_lines(node) if a["event"] == "delivery" and a["destination"] == dead
    ]
    assert {a["kind"] for a in failed_lines} == {"sr", "sc"}
    assert all(str(a["status"]).startswith("failed") for a in failed_lines)
    # read-only: no state change over HTTP
    request = urllib.request.Request(f"http://127.0.0.1:{port}/", data=b"", method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=20)
    assert refused.value.code == 405


def test_cleanup_deletes_files_of_old_finished_jobs_only(tmp_path: Path) -> None:
    import os
    import sys
    import time

    from dicom_node.records.ledger import Job, JobState

    data = tmp_path / "data"
    ledger = Ledger(data / "ledger.sqlite3")
    old = time.time() - 40 * 86400
    files = {}
    for name, state in (("done", JobState.DELIVERED), ("dead", JobState.FAILED)):
        spool = data / "spool" / f"{name}.dcm"
        result = data / "results" / f"{name}-sr.dcm"
        for path in (spool, result):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x" * 1000)
        files[name] = (spool, result)
        job = Job.received(
            name,
            sop_instance_uid=generate_uid(),
            sop_class_uid="1.2",
            study_instance_uid="1.3",
            series_instance_uid="1.4",
            calling_ae="CR1",
            spool_path=str(spool),
            at=old,
        )
        ledger.add(replace(job, state=state))
    with ledger._connect() as db:  # make them old
        db.execute("UPDATE jobs SET updated_at = ?", (old,))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
    env.update(CXR_DATA_DIR=str(data), CXR_RETENTION_DAYS="30")
    done = subprocess.run(
        [sys.executable, "-m", "dicom_node", "cleanup"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "deleted 2 files" in done.stdout
    assert not any(p.exists() for p in files["done"])  # delivered 40 days ago: gone
    assert all(p.exists() for p in files["dead"])  # a dead letter waits for the operator
    assert ledger.get("done") is not None  # the ledger keeps its history
