"""The queue between the aggregator's network thread and its round loop, bounded in bytes.

The network thread puts every update message here and the round loop takes them. Unbounded, it
held whatever peers sent faster than the round loop checked it: 2 GB of 1 MB payloads before round
1 took the aggregator from 785 MB to 2.7 GB (issue 16). Full, it drops the new message, counts it
and says so in one line per round (``take_drops``), not one per message.
"""

from __future__ import annotations

import queue
import threading
from collections import deque


class BoundedInbox:
    """``put`` (network thread) and ``get`` (round loop) of ``(topic, payload, arrival time)``;
    at most ``max_bytes`` of payloads held."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.max_bytes = max_bytes
        self._items: deque[tuple[str, bytes, float]] = deque()
        self._bytes = 0
        self._dropped = self._dropped_bytes = 0
        self._ready = threading.Condition()

    @property
    def bytes(self) -> int:
        with self._ready:
            return self._bytes

    def put(self, item: tuple[str, bytes, float]) -> bool:
        """Queue ``item``; False (counted) when its payload does not fit."""
        size = len(item[1])
        with self._ready:
            if self._bytes + size > self.max_bytes:
                self._dropped += 1
                self._dropped_bytes += size
                return False
            self._items.append(item)
            self._bytes += size
            self._ready.notify()
            return True

    def get(self, timeout: float | None = None) -> tuple[str, bytes, float]:
        """The oldest item; ``queue.Empty`` when none comes within ``timeout`` seconds."""
        with self._ready:
            if not self._ready.wait_for(lambda: self._items, timeout):
                raise queue.Empty
            item = self._items.popleft()
            self._bytes -= len(item[1])
            return item

    def take_drops(self) -> tuple[int, int]:
        """Messages and bytes dropped since the last call."""
        with self._ready:
            out = (self._dropped, self._dropped_bytes)
            self._dropped = self._dropped_bytes = 0
            return out
