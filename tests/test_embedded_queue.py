"""The embedded queue (kombu's filesystem transport, made atomic): a consumer polling while a
producer writes never sees a half-written message."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from queue import Empty

from dicom_node.jobs.queue import AtomicFilesystemTransport, make_celery
from dicom_node.settings import Settings


def test_messages_appear_whole_to_a_consumer_polling_meanwhile(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    settings.make_dirs()
    app = make_celery(settings)
    count = 300
    body = "x" * 20_000  # large enough to be written in more than one go
    with app.connection_for_write() as out_conn, app.connection_for_read() as in_conn:
        assert isinstance(out_conn.transport, AtomicFilesystemTransport)
        producer_channel, consumer_channel = out_conn.default_channel, in_conn.default_channel

        def produce() -> None:
            for i in range(count):
                producer_channel._put("race", {"i": i, "body": body})

        producer = threading.Thread(target=produce)
        producer.start()
        seen: list[int] = []
        deadline = time.monotonic() + 120
        while len(seen) < count and time.monotonic() < deadline:
            try:
                message = consumer_channel._get("race")  # raises on a truncated message
            except Empty:
                continue
            assert message["body"] == body
            seen.append(message["i"])
        producer.join()
    assert sorted(seen) == list(range(count))
    folder = settings.queue_dir / "messages"
    assert [p.name for p in folder.iterdir()] == []  # no partial file left behind
