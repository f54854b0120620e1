"""Decoded display images kept between a job's prepare and finalize steps (node host).

prepare decodes the received pixels for preprocessing; finalize needs the same display image
for the lung outline and the summary image. Both run in the node's worker process, so
keeping the image in memory spares the second read and decode (a JPEG 2000 radiograph takes
seconds to decode on a small CPU: bench/pipeline.py). Bounded by bytes; when full, new
images are not kept (a burst's oldest jobs, finalized first, keep theirs), and an image
not taken within `ttl_s` is dropped. A miss only costs the decode: finalize decodes again.
Each image is kept with its place on the source's pixel grid (`Display`): it may have been
decoded at a reduced size.
"""

from __future__ import annotations

import threading
import time

from dicom_node.results.display import Display


class DisplayCache:
    def __init__(self, max_bytes: int, ttl_s: float = 600.0) -> None:
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._items: dict[str, tuple[float, Display]] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, key: str, display: Display) -> bool:
        """Keep `display` (its image read-only from now on); False when there is no room."""
        size = display.nbytes
        with self._lock:
            if key in self._items:
                self._drop(key)
            if self._bytes + size > self.max_bytes:
                self._expire(time.monotonic())
            if self._bytes + size > self.max_bytes:
                return False
            display.image.setflags(write=False)
            self._items[key] = (time.monotonic(), display)
            self._bytes += size
            return True

    def take(self, key: str) -> Display | None:
        """The image kept for `key`, removed from the cache; None if not kept."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._drop(key)
            return item[1]

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def _drop(self, key: str) -> None:
        _, display = self._items.pop(key)
        self._bytes -= display.nbytes

    def _expire(self, now: float) -> None:
        for key in [k for k, (t, _) in self._items.items() if now - t > self.ttl_s]:
            self._drop(key)
