"""A round's tasks go out through a window of bytes (``collect.publish_round``): each device's task
is signed for its own topic, so a thousand selected devices are a thousand copies of the model,
and the aggregator must not hold them all at once waiting for the broker (``bench_fleet.py``:
+80-180 MB at 1,000 a round, +0.4 % with the window). Real broker, real session, real signing."""

from __future__ import annotations

import time
from types import SimpleNamespace

from fedprune.aggregator import collect
from fedprune.aggregator.collect import DeviceLink, publish_round
from fedprune.aggregator.device_publisher import DevicePublisher
from fedprune.aggregator.inbox import BoundedInbox
from fedprune.aggregator.registry import DeviceRegistry
from fedprune.converters.protocol import Topics
from fedprune.transport import MqttSession
from federation_helpers import Spy
from signing_helpers import AGGREGATOR_KEY

TASK_BYTES = 300_000
DEVICES = [f"dev-{i:02d}" for i in range(24)]


def test_tasks_go_out_through_a_window_of_bytes_and_every_one_arrives(broker_url, monkeypatch):
    monkeypatch.setattr(collect, "TASKS_IN_FLIGHT_BYTES", 1_000_000)  # three tasks and a bit
    topics = Topics("fanout")
    spy = Spy(broker_url, [topics.task("+")])
    session = MqttSession(broker_url, "fanout-aggregator")
    session.start()
    try:
        publisher = DevicePublisher(session, AGGREGATOR_KEY)
        sent: list[tuple[object, int]] = []
        most_waiting = 0
        publish = publisher.publish

        def watched(topic, payload, **kwargs):
            nonlocal most_waiting
            waiting = sum(size for info, size in sent if not info.is_published())
            most_waiting = max(most_waiting, waiting)
            info = publish(topic, payload, **kwargs)
            sent.append((info, len(payload)))
            return info

        publisher.publish = watched
        link = DeviceLink(publisher, topics, DeviceRegistry(), BoundedInbox(1 << 20))
        ctx = SimpleNamespace(round=1, attempt=1, selected=DEVICES)  # all of a RoundContext it reads
        payloads = {d: bytes([i]) * TASK_BYTES for i, d in enumerate(DEVICES)}
        before = time.monotonic()
        started = publish_round(link, ctx, payloads, 30.0, name_devices=False)
        assert before <= started <= time.monotonic()  # the round's clock starts at the first task
        assert most_waiting <= 1_000_000 + TASK_BYTES  # never more unacknowledged than the window
        deadline = time.monotonic() + 20
        while len({t for t, _ in spy.on("/task")}) < len(DEVICES) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert {t for t, _ in spy.on("/task")} == {topics.task(d) for d in DEVICES}  # nothing lost
    finally:
        session.stop()
        spy.close()
