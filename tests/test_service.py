"""Which worker processes `cxr-node serve` supervises, and with how many threads each."""

from __future__ import annotations

from pathlib import Path

from dicom_node.operations.service import worker_children, worker_threads
from dicom_node.settings import Settings


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
    assert worker_children(settings) == {"node": ["node", "deliver"]}
