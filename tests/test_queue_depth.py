"""The queue-depth gauge counts real messages through the broker's own transport."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node.jobs.queue import make_celery, send_deliver, send_prepare
from dicom_node.operations.health import queue_depths
from dicom_node.settings import Settings
from tests.peers import RedisServer
from worker.contracts import INFER


def queue_some(settings: Settings) -> None:
    """Three preparations (priority 6 on Redis), a delivery (its own queue) and an inference."""
    app = make_celery(settings)
    for n in range(3):
        send_prepare(app, f"p{n}")
    send_deliver(app, "d", "PACS@h:104")
    app.send_task(INFER, args=[{"job_id": "x"}])


def test_depth_of_the_embedded_queue(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "node")
    settings.make_dirs()
    assert queue_depths(settings) == {"node": 0, "infer": 0, "deliver": 0}
    queue_some(settings)
    assert queue_depths(settings) == {"node": 3, "infer": 1, "deliver": 1}


@pytest.mark.integration
def test_depth_of_a_redis_queue_counts_every_priority(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    settings = Settings(data_dir=tmp_path / "node", broker_url=own_redis.url)
    settings.make_dirs()
    assert queue_depths(settings) == {"node": 0, "infer": 0, "deliver": 0}  # never declared
    queue_some(settings)
    assert queue_depths(settings) == {"node": 3, "infer": 1, "deliver": 1}
    # a worker takes one off: the count follows
    with make_celery(settings).connection_for_read() as connection:
        message = connection.SimpleQueue("node", no_ack=True).get(timeout=5)
        assert message is not None
    assert queue_depths(settings) == {"node": 2, "infer": 1, "deliver": 1}
