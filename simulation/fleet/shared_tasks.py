"""Decoded tasks shared by the simulated devices of one process.

The aggregator sends the same task bytes to every device it selects in a round. A real device
decodes its copy on its own processor; a hundred simulated devices in one process would decode
the same bytes a hundred times on two shared threads (about 1.5 ms each for the digits model,
0.15 s of one process's CPU per round, taken from the network loop and the shared trainer).
``SharedTasks`` decodes each distinct payload once and hands every device the same read-only
``TrainTask``.

What that leaves out is said, not hidden: a device that takes a decoded task from here is
credited no decoding time (the first of a round pays it).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

from fedprune.converters.protocol import TrainTask
from fedprune.edge_agent.device import DeviceSession, TrainJob


#: payloads shorter than this are not interned (presences, announcements: nothing to save)
INTERN_MIN_BYTES = 4096


class SharedTasks:
    """``decode(session, job)``: ``session.decode(job)``, through a small cache of decoded tasks.

    A hit needs the very same bytes (compared in full) and the same architecture; the arrays of a
    cached task are read-only, so a trainer that wrote into them would fail loudly instead of
    changing another device's task. Thread-safe; two threads that miss the same payload at once
    both decode it (harmless, and rarer than a lock would be costly).
    """

    def __init__(self, capacity: int = 4) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self.hits = self.misses = 0
        self._lock = threading.Lock()
        # (architecture digest, payload length, payload's last bytes: the frame's checksum) ->
        # (payload, task): a cheap key, confirmed by comparing the whole payload.
        self._entries: OrderedDict[tuple[str, int, bytes], tuple[bytes, TrainTask]] = OrderedDict()
        self._interned: OrderedDict[int, bytes] = OrderedDict()  # length -> the last payload of that length

    def intern(self, payload: bytes) -> bytes:
        """``payload``, or an equal bytes object received before: the devices of a process that a
        round selects each receive the same task bytes (0.6 MB for the digits CNN) and hold them
        until the shared trainer takes them; with 500 selected that was 300 MB of copies."""
        if len(payload) < INTERN_MIN_BYTES:
            return payload
        with self._lock:
            seen = self._interned.get(len(payload))
            if seen is not None and seen == payload:  # lengths equal: one memcmp
                self._interned.move_to_end(len(payload))
                return seen
            self._interned[len(payload)] = payload
            self._interned.move_to_end(len(payload))
            while len(self._interned) > self.capacity:
                self._interned.popitem(last=False)
        return payload

    def decode(self, session: DeviceSession, job: TrainJob) -> TrainTask | None:
        """The job's task (set on the job, as ``session.decode`` does); None if undecodable."""
        payload = bytes(job.payload)
        key = (job.architecture.digest, len(payload), payload[-4:])
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry[0] == payload:
                self._entries.move_to_end(key)
                self.hits += 1
                cached = entry[1]
        if entry is not None and entry[0] == payload:  # the session takes it (its masks, or a refusal)
            return session.take_decoded(job, cached)
        task = session.decode(job)
        if task is None:
            return None
        _freeze(task)
        with self._lock:
            self.misses += 1
            self._entries[key] = (payload, task)
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        return task


def _freeze(task: TrainTask) -> None:
    for a in (*task.weights, *task.masks):
        if isinstance(a, np.ndarray):
            a.setflags(write=False)
