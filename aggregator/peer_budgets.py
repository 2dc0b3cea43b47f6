"""Per-device budgets: what one device may make the aggregator read in a round.

Every message from a device (its update topic, its presence topic) is charged to that device in
the current window (a round; window 0 is before round 1) on the network thread, before it is
reassembled, queued or decoded: a device past its budget of messages or bytes is ignored for the
rest of the window, counted once and logged once; the aggregator stops listening to its update
topic, and what still comes costs a dictionary lookup. Updates from a device that has never
announced itself are dropped there too: no task was ever sent to it, so nothing it sends can be
counted.

Why: one device with valid credentials flooding its own update topic made the aggregator check,
log and acknowledge every message, and ended the run (issue 16).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from fedprune.converters.chunking import CHUNK_OVERHEAD
from fedprune.converters.protocol import Topics, largest_update_bytes
from fedprune.converters.text import one_line

log = logging.getLogger(__name__)

__all__ = ["Budget", "PeerBudgets", "WindowReport", "default_budget"]

# An honest device sends per attempt one update, which QoS 1 may deliver again; the rest of the
# budget is slack for presences and reconnections.
COPIES_PER_ATTEMPT = 3
SLACK_MESSAGES = 64
SLACK_BYTES = 1 << 20


@dataclass(frozen=True)
class Budget:
    """Messages and bytes one device may send the aggregator per window."""

    messages: int
    bytes: int


def default_budget(names: Sequence[str], shapes: Sequence[Sequence[int]], attempts: int, max_payload_bytes: int,
                   max_message_bytes: int) -> Budget:
    """Room for ``COPIES_PER_ATTEMPT`` of the largest valid update in every attempt of a round
    (chunked at ``max_payload_bytes``), plus slack: an honest device never comes near it."""
    update = min(largest_update_bytes(names, shapes), max_message_bytes)
    pieces = 1 if update <= max_payload_bytes else math.ceil(update / (max_payload_bytes - CHUNK_OVERHEAD))
    sent = update + (pieces * CHUNK_OVERHEAD if pieces > 1 else 0)
    return Budget(attempts * COPIES_PER_ATTEMPT * pieces + SLACK_MESSAGES,
                  attempts * COPIES_PER_ATTEMPT * sent + SLACK_BYTES)


@dataclass
class WindowReport:
    """What the budgets kept out during one window."""

    window: int
    over_budget: dict[str, list[int]] = field(default_factory=dict)  # device -> [messages, bytes] dropped
    unknown_messages: int = 0  # from topics that name no device, or updates of devices never announced
    unknown_bytes: int = 0

    @property
    def dropped_messages(self) -> int:
        return self.unknown_messages + sum(m for m, _ in self.over_budget.values())

    def log_summary(self) -> None:
        where = f"round {self.window}" if self.window else "before round 1"
        for device, (messages, size) in sorted(self.over_budget.items()):
            log.warning("%s: ignored %s after it went over its budget: %d message(s), %d bytes dropped",
                        where, device, messages, size)
        if self.unknown_messages:
            log.warning("%s: dropped %d message(s) (%d bytes) on topics of no announced device",
                        where, self.unknown_messages, self.unknown_bytes)


class PeerBudgets:
    """``admit(topic, size)``: the network thread's gate (``MqttSession(admit=...)``);
    ``start_window(n)`` closes the window before and returns what it kept out.

    ``on_over_budget(device)`` runs once per window for each device that goes over, on the
    network thread: the aggregator stops listening to it there, so the broker stops sending its
    messages at all.
    """

    def __init__(self, topics: Topics, known: Callable[[str], bool], budget: Budget,
                 on_over_budget: Callable[[str], None] | None = None) -> None:
        if budget.messages < 1 or budget.bytes < 1:
            raise ValueError(f"a budget needs at least one message and one byte, got {budget}")
        self.topics, self.known, self.budget = topics, known, budget
        self.on_over_budget = on_over_budget
        self._lock = threading.Lock()
        self._used: dict[str, list[int]] = {}  # device -> [messages, bytes] this window
        self._report = WindowReport(0)

    def admit(self, topic: str, size: int) -> bool:
        try:
            device = self.topics.device_from_topic(topic)
        except ValueError:
            return self._unknown(size)
        presence = topic == self.topics.presence(device)
        if not self.known(device):
            # A device announces itself with its first presence; its updates before that are noise.
            return True if presence else self._unknown(size)
        with self._lock:
            used = self._used.setdefault(device, [0, 0])
            used[0] += 1
            used[1] += size
            if used[0] <= self.budget.messages and used[1] <= self.budget.bytes:
                return True
            dropped = self._report.over_budget.get(device)
            first = dropped is None
            if first:
                dropped = self._report.over_budget[device] = [0, 0]
            dropped[0] += 1
            dropped[1] += size
        if first:
            log.warning("%s went over its budget of %d messages and %d bytes for this round; everything it "
                        "sends is ignored until the next round", one_line(device), self.budget.messages,
                        self.budget.bytes)
            if self.on_over_budget is not None:
                self.on_over_budget(device)
        return False

    def ignored(self, device: str) -> bool:
        """Whether ``device`` went over its budget in this window."""
        with self._lock:
            return device in self._report.over_budget

    def _unknown(self, size: int) -> bool:
        with self._lock:
            self._report.unknown_messages += 1
            self._report.unknown_bytes += size
        return False

    def so_far(self) -> tuple[int, int]:
        """This window so far: the devices over their budget, and the messages dropped because
        their topic named no announced device."""
        with self._lock:
            return len(self._report.over_budget), self._report.unknown_messages

    def over_budget_devices(self) -> set[str]:
        """The devices over their budget in this window (aggregation workers report them by name:
        a device over budget at two workers is still one device)."""
        with self._lock:
            return set(self._report.over_budget)

    def finish(self) -> WindowReport:
        """The report of the last window (the run is over)."""
        with self._lock:
            return self._report

    def start_window(self, window: int) -> WindowReport:
        """Begin window ``window`` (the round about to start) with every budget full again; the
        report of the window that ends."""
        with self._lock:
            report, self._report = self._report, WindowReport(window)
            self._used = {}
        return report
