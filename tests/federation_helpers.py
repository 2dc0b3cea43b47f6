"""Helpers for end-to-end federation tests: a tiny task, and an MQTT spy that records traffic."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt

from fedprune.task import Task, parse_task


def small_task(**overrides) -> Task:
    """3 devices, 3 rounds, the digits CNN pruned to 80 % by round 3."""
    raw = {
        "seed": 0,
        "model": {"factory": "fedprune.models:digits_cnn"},
        "data": {"dataset": "digits", "partition": "iid"},
        "federation": {"rounds": 3, "devices_per_round": 3, "min_devices": 2,
                       "round_timeout_s": 60, "wait_for_devices_s": 60},
        "training": {"local_epochs": 3, "batch_size": 16, "learning_rate": 0.003},
        "pruning": {"final_sparsity": 0.8, "begin_round": 1, "end_round": 3, "frequency": 1,
                    "leave_dense": ["logits"]},
        "transport": {"uplink_precision": "int8"},
    }
    for section, values in overrides.items():
        if isinstance(values, dict):
            raw.setdefault(section, {}).update(values)
        else:
            raw[section] = values
    return parse_task(raw)


class Spy:
    """A plain MQTT client that records every message on the given topic filters."""

    def __init__(self, url: str, topics: list[str], on_message=None) -> None:
        from fedprune.transport import parse_broker_url

        addr = parse_broker_url(url)
        self.messages: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self._extra = on_message
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"spy-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv311)
        self.ready = threading.Event()

        def on_connect(client, userdata, flags, rc, props):
            for t in topics:
                client.subscribe(t, qos=1)
            self.ready.set()

        def on_msg(client, userdata, msg):
            with self.lock:
                self.messages.append((msg.topic, bytes(msg.payload)))
            if self._extra:
                self._extra(self, msg.topic, bytes(msg.payload))

        self.client.on_connect = on_connect
        self.client.on_message = on_msg
        self.client.connect(addr.host, addr.port)
        self.client.loop_start()
        assert self.ready.wait(10), "spy could not connect"

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(5)

    def on(self, topic_part: str) -> list[tuple[str, bytes]]:
        with self.lock:
            return [(t, p) for t, p in self.messages if topic_part in t]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def write_device_npz(path: Path, x, y) -> Path:
    import numpy as np

    np.savez(path, x_train=x, y_train=y)
    return path


def wire_updates(spy: Spy) -> list[tuple[bytes, object, object]]:
    """Every update the spy saw (it must watch the architecture, task and update topics), decoded
    against the task it answers: ``(payload, task, update)`` triples."""
    from fedprune.converters.protocol import Architecture, decode_task, decode_update, peek_update
    from signing_helpers import content

    arch = Architecture.decode(content(spy.on("/model/architecture")[0][1]))
    tasks = {}
    held: dict[str, list] = {}  # device -> the masks of its last task: what a values-only task carries values for
    for topic, payload in spy.on("/task"):
        if payload:
            device = topic.split("/")[-2]
            t = decode_task(content(payload), arch.names, arch.shapes, 10**8, held_masks=held.get(device))
            tasks[(device, t.round, t.attempt)] = t
            held[device] = t.masks
    out = []
    for topic, payload in spy.on("/update"):
        header, _ = peek_update(payload, 10**8)
        task = tasks[(topic.split("/")[-2], header.round, header.attempt)]
        out.append((payload, task, decode_update(payload, arch.shapes, task.masks, 10**8)))
    return out
