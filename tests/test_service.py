"""Which worker processes `cxr-node serve` supervises, and with how many threads each."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from dicom_node.operations.service import worker_children, worker_threads
from dicom_node.settings import Settings
from tests.conftest import NodeProcess


def test_embedded_queue_infers_and_delivers_in_processes_of_their_own(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, node_threads=3, worker_concurrency=2, delivery_threads=4)
    children = worker_children(settings)
    assert children == {"node": ["node"], "infer": ["infer"], "deliver": ["deliver"]}
    assert worker_threads(settings, children["node"]) == 3
    assert worker_threads(settings, children["infer"]) == 2
    assert worker_threads(settings, children["deliver"]) == 4


def test_one_embedded_worker_for_both_queues_when_asked(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, infer_process=False, node_threads=4)
    children = worker_children(settings)
    assert children == {"node": ["node", "infer", "deliver"]}
    assert worker_threads(settings, children["node"]) == 4


def test_with_redis_the_node_host_runs_its_own_queues_only(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, broker_url="redis://127.0.0.1:6379/0")
    assert worker_children(settings) == {"node": ["node"], "deliver": ["deliver"]}
    one = Settings(data_dir=tmp_path, broker_url="redis://127.0.0.1:6379/0", infer_process=False)
    assert worker_children(one) == {"node": ["node", "deliver"]}


@pytest.mark.integration
def test_a_stop_sent_to_the_whole_group_restarts_no_worker(
    start_node: Callable[..., NodeProcess],
) -> None:
    """A service manager stops the node by signalling every process of it at once (systemd's
    KillMode=control-group, Ctrl-C in a terminal): its workers end first, and `serve` must
    then stop, not start them again."""
    node = start_node()
    os.killpg(node.process.pid, signal.SIGTERM)  # as soon as it listens: workers starting
    node.process.wait(timeout=40)
    assert "restarting it" not in node.logs()
    assert "stopped" in node.logs()
