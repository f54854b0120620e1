"""Receiving in several processes (CXR_RECEIVER_PROCESSES > 1): SO_REUSEPORT receivers that
write to file, sharing the ledger; real DCMTK storescu senders in parallel."""

from __future__ import annotations

import multiprocessing
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE

from dicom_node import dimse_status
from dicom_node.process_start import configure_libraries
from dicom_node.receiving.processes import incoming_dir, remove_abandoned, start_receiver
from dicom_node.receiving.scp import STORAGE_CLASSES
from dicom_node.records.ledger import JobState, Ledger
from dicom_node.settings import Settings
from tests.conftest import NodeProcess, Peer, free_port, require_tool, wait_for
from tests.test_e2e import assert_delivered, with_identity
from tests.test_ledger import make_job


def _add_jobs(path: str, worker: int, count: int) -> None:
    ledger = Ledger(Path(path))
    for i in range(count):
        assert ledger.add(make_job(f"w{worker}j{i}", f"1.2.826.0.1.{worker}.{i}"))


def test_ledger_takes_concurrent_writers_from_several_processes(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    Ledger(path)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_add_jobs, args=(str(path), w, 40)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    assert Ledger(path).counts()["received"] == 160


def test_file_receiver_spools_what_was_sent_and_refuses_what_the_scp_refuses(
    tmp_path: Path, chest_cr: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a receiver process switches pynetdicom to write-to-file receiving for its whole
    # process (it does nothing else); here, in the test process, undo it afterwards
    import tempfile

    from pynetdicom import _config

    monkeypatch.setattr(_config, "STORE_RECV_CHUNKED_DATASET", _config.STORE_RECV_CHUNKED_DATASET)
    monkeypatch.setattr(tempfile, "tempdir", tempfile.tempdir)
    settings = Settings(
        data_dir=tmp_path / "node", port=free_port(), bind="127.0.0.1", min_free_disk_mb=0
    )
    configure_libraries(receive_into=incoming_dir(settings))
    ledger = Ledger(settings.ledger_path)
    enqueued: list[str] = []
    server = start_receiver(settings, ledger, enqueued.append)
    try:
        ae = AE(ae_title="MODALITY")
        for sop_class in STORAGE_CLASSES:
            ae.add_requested_context(sop_class)
        source = dcmread(chest_cr)
        no_pixels = dcmread(chest_cr, stop_before_pixels=True)
        no_pixels.SOPInstanceUID = generate_uid()
        assoc = ae.associate("127.0.0.1", settings.port, ae_title=settings.ae_title)
        assert assoc.is_established
        ok = assoc.send_c_store(source)
        refused = assoc.send_c_store(no_pixels)
        assoc.release()
    finally:
        server.shutdown()
    assert ok.Status == dimse_status.SUCCESS
    assert refused.Status == dimse_status.DATASET_MISMATCH
    (job,) = ledger.jobs_in((JobState.RECEIVED,))
    assert enqueued == [job.job_id]
    assert job.spool_path is not None
    spooled = dcmread(job.spool_path)
    assert spooled.SOPInstanceUID == source.SOPInstanceUID
    np.testing.assert_array_equal(spooled.pixel_array, source.pixel_array)
    assert list(incoming_dir(settings).iterdir()) == []  # nothing left half-way


@pytest.mark.integration
@pytest.mark.slow
def test_parallel_senders_to_several_receiver_processes_all_get_an_sr(
    start_node: Callable[..., NodeProcess], storescp: Peer, chest_cr: Path, tmp_path: Path
) -> None:
    exe = require_tool("storescu")
    files = [
        with_identity(chest_cr, tmp_path / f"in{i}.dcm", "Test^Patient", f"P{i}") for i in range(6)
    ]
    sent = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    node = start_node(destinations=storescp.address, receiver_processes="3")
    results: list[int] = []

    def send(group: list[Path]) -> None:
        cmd = [exe, "-aet", "MODALITY", "-aec", "CXRNODE", "127.0.0.1", str(node.port)]
        results.append(subprocess.run([*cmd, *map(str, group)], timeout=180).returncode)

    threads = [threading.Thread(target=send, args=(files[i::3],)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [0, 0, 0]
    assert_delivered(node, storescp, sent)
    wait_for(
        lambda: len(list((node.data_dir / "logs").glob("receiver-*.log"))) == 3,
        30,
        "three receiver processes",
    )


def test_partial_files_of_a_dead_receiver_are_removed_fresh_ones_kept(tmp_path: Path) -> None:
    import os
    import time

    old, fresh = tmp_path / "old.dcm", tmp_path / "fresh.dcm"
    old.write_bytes(b"partial")
    fresh.write_bytes(b"being received")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert remove_abandoned(tmp_path) == 1
    assert not old.exists() and fresh.exists()


def test_file_receiver_refuses_an_oversized_instance(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Write-to-file receiving measures the file it wrote: over CXR_MAX_INSTANCE_MB, 0xA700."""
    import tempfile

    from pynetdicom import _config

    from tests.synthetic import synthetic_cr, write

    monkeypatch.setattr(_config, "STORE_RECV_CHUNKED_DATASET", _config.STORE_RECV_CHUNKED_DATASET)
    monkeypatch.setattr(tempfile, "tempdir", tempfile.tempdir)
    settings = Settings(
        data_dir=tmp_path / "node",
        port=free_port(),
        bind="127.0.0.1",
        min_free_disk_mb=0,
        max_instance_mb=1,
    )
    configure_libraries(receive_into=incoming_dir(settings))
    ledger = Ledger(settings.ledger_path)
    server = start_receiver(settings, ledger, lambda job_id: None)
    over = write(synthetic_cr(size=900), tmp_path / "over.dcm")  # 1.6 MB of pixel data
    try:
        ae = AE(ae_title="MODALITY")
        for sop_class in STORAGE_CLASSES:
            ae.add_requested_context(sop_class)
        assoc = ae.associate("127.0.0.1", settings.port, ae_title=settings.ae_title)
        assert assoc.is_established
        response = assoc.send_c_store(dcmread(over))
        assoc.release()
    finally:
        server.shutdown()
    assert response.Status == dimse_status.OUT_OF_RESOURCES
    assert ledger.counts()["received"] == 0
