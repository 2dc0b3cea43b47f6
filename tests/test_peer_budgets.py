"""The aggregator's bounds per peer: budgets per device and round, the inbox in bytes."""

from __future__ import annotations

import logging
import queue

import pytest

from fedprune.aggregator.inbox import BoundedInbox
from fedprune.aggregator.peer_budgets import Budget, PeerBudgets, default_budget
from fedprune.converters.protocol import Topics, largest_update_bytes

TOPICS = Topics("fed")


def budgets(known=("pi-01", "pi-02"), messages=3, size=1000) -> PeerBudgets:
    return PeerBudgets(TOPICS, lambda d: d in known, Budget(messages, size))


def test_a_device_past_its_budget_is_ignored_for_the_window_counted_and_logged_once(caplog):
    b = budgets()
    with caplog.at_level(logging.WARNING):
        assert [b.admit(TOPICS.update("pi-01"), 10) for _ in range(5)] == [True, True, True, False, False]
        assert b.admit(TOPICS.update("pi-02"), 10)  # another device's budget is its own
        assert not b.admit(TOPICS.presence("pi-01"), 10)  # its presence counts too
    assert b.so_far() == (1, 0)
    assert sum("went over its budget" in r.getMessage() for r in caplog.records) == 1
    report = b.start_window(1)
    assert report.over_budget == {"pi-01": [3, 30]} and report.dropped_messages == 3
    assert b.admit(TOPICS.update("pi-01"), 10)  # a new round: its budget is full again
    assert not b.admit(TOPICS.update("pi-01"), 2000)  # bytes count as well as messages


def test_updates_of_devices_never_announced_are_dropped_presences_are_not():
    b = budgets(known=())
    assert not b.admit(TOPICS.update("ghost"), 10)
    assert not b.admit("fedprune/v1/fed/device/a/b/update", 10)  # names no device
    assert b.admit(TOPICS.presence("ghost"), 10)  # how a device announces itself
    assert b.so_far() == (0, 2) and b.start_window(1).unknown_bytes == 20


def test_the_default_budget_leaves_room_for_every_honest_update_of_a_round():
    names, shapes = ["k", "b"], [(300, 100), (100,)]
    largest = largest_update_bytes(names, shapes)
    one = default_budget(names, shapes, attempts=4, max_payload_bytes=1_000_000, max_message_bytes=64_000_000)
    assert one.bytes >= 4 * 3 * largest and one.messages >= 4 * 3
    chunked = default_budget(names, shapes, attempts=1, max_payload_bytes=4096, max_message_bytes=64_000_000)
    assert chunked.messages >= 3 * -(-largest // (4096 - 78)) and chunked.bytes > 3 * largest
    with pytest.raises(ValueError, match="at least one message"):
        PeerBudgets(TOPICS, lambda d: True, Budget(0, 10))


def test_the_inbox_drops_what_does_not_fit_and_counts_it():
    inbox = BoundedInbox(100)
    assert inbox.put(("a", b"x" * 60, 0.0)) and not inbox.put(("b", b"y" * 50, 0.0))
    assert inbox.put(("c", b"z" * 40, 0.0)) and inbox.bytes == 100
    assert inbox.get(0.1)[0] == "a" and inbox.bytes == 40
    assert inbox.put(("d", b"w" * 50, 0.0))
    assert inbox.take_drops() == (1, 50) and inbox.take_drops() == (0, 0)
    assert [inbox.get(0.1)[0] for _ in range(2)] == ["c", "d"]
    with pytest.raises(queue.Empty):
        inbox.get(0.05)
