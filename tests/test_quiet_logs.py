"""The node's log says what happened, once: no Celery banner at start-up, one line for an
expected decoder failure (its traceback only at debug level), and one warning, not a
cascade of library warnings, for an instance with a bad UID."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread

from dicom_node.records.ledger import JobState, Ledger
from tests.conftest import NodeProcess, wait_for
from tests.peers import storescu_statuses
from tests.test_bad_input import broken_jpeg2000, crafted_uid

pytestmark = pytest.mark.integration


def test_start_up_and_per_instance_logs_without_noise(
    start_node: Callable[..., NodeProcess], chest_cr_j2k: Path, tmp_path: Path
) -> None:
    node = start_node()
    broken = broken_jpeg2000(tmp_path, chest_cr_j2k)
    bad_uid = crafted_uid(tmp_path)
    assert storescu_statuses(node.port, [broken], "-xv") == [0]
    assert storescu_statuses(node.port, [bad_uid]) == [0xA900]
    ledger = Ledger(node.data_dir / "ledger.sqlite3")
    job = ledger.by_sop_instance(str(dcmread(broken, stop_before_pixels=True).SOPInstanceUID))
    assert job is not None
    wait_for(
        lambda: ledger.get(job.job_id).state is JobState.REJECTED,  # type: ignore[union-attr]
        120,
        "the undecodable image rejected",
    )
    wait_for(lambda: "not analysable" in node.logs(), 30, "the rejection in the log")
    logs = node.logs()
    # no Celery banner, no per-task Celery lines
    assert "-------------- " not in logs and "[config]" not in logs and "[tasks]" not in logs
    assert "Task cxr.prepare" not in logs
    assert "No hostname was supplied" not in logs
    # the decoder failure: one line with the reason, no traceback
    assert "Traceback" not in logs
    reason_lines = [line for line in logs.splitlines() if "pixel data not analysable" in line]
    assert len(set(reason_lines)) == 1, reason_lines  # node.logs() reads stderr and the file
    assert "pydicom.pixels.decoders" not in logs  # its per-plugin ERROR lines
    # the bad UID: the node's own refusal line, no library warnings about the value
    assert "SOPInstanceUID is not a valid UID" in logs
    assert "Invalid value for VR UI" not in logs
    assert "Non-conformant" not in logs


def test_decoder_tracebacks_are_kept_at_debug_level(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from dicom_node.logs import TracebackToDebug

    logger = logging.getLogger("test.decoder")
    logger.addFilter(TracebackToDebug())
    try:
        with caplog.at_level(logging.INFO):
            try:
                raise RuntimeError("bad stream")
            except RuntimeError:
                logger.exception("decoder failed")
            logger.error("a plain error stays an error")
        assert [r.getMessage() for r in caplog.records] == ["a plain error stays an error"]
        caplog.clear()
        with caplog.at_level(logging.DEBUG):
            try:
                raise RuntimeError("bad stream")
            except RuntimeError:
                logger.exception("decoder failed")
        (record,) = caplog.records
        assert record.levelname == "DEBUG" and record.exc_info is not None
    finally:
        logger.filters.clear()
