"""The simulated devices' shared task decoding: one decode per distinct payload, every device the
same read-only task, and never another payload's task."""

from __future__ import annotations

import numpy as np
import pytest

from fedprune.converters.protocol import Architecture, TrainTask, encode_task
from fedprune.edge_agent.device import DeviceSession, TrainJob
from fedprune.simulation.fleet.shared_tasks import SharedTasks
from signing_helpers import VERIFY_KEY

ARCH = Architecture(model_json="{}", digest="arch-1", shapes=[[4, 3], [3]], names=["dense/kernel", "dense/bias"])


def payload(round_: int, scale: float = 1.0) -> bytes:
    weights = [np.full((4, 3), scale, np.float32), np.arange(3, dtype=np.float32)]
    masks = [np.array([[True, False, True]] * 4), None]
    training = {"local_epochs": 1, "batch_size": 16, "optimizer": "adam", "learning_rate": 0.01}
    task = TrainTask(round_, 1, ARCH.digest, weights, masks, training, "int8", 30.0)
    return encode_task(task, ARCH.names)


def job(data: bytes) -> TrainJob:
    return TrainJob(ARCH, data)


def test_each_payload_is_decoded_once_and_shared_read_only():
    tasks = SharedTasks()
    sessions = [DeviceSession(f"sim-{i:03d}", 5, aggregator_key=VERIFY_KEY) for i in range(3)]
    data = payload(1)
    jobs = [job(bytes(data)) for _ in sessions]  # each device its own copy of the bytes, as from MQTT
    got = [tasks.decode(s, j) for s, j in zip(sessions, jobs)]
    assert got[0] is got[1] is got[2] and all(j.task is got[0] for j in jobs)
    assert (tasks.misses, tasks.hits) == (1, 2)
    assert got[0].round == 1 and np.array_equal(got[0].weights[0], np.where(got[0].masks[0], 1.0, 0.0))
    with pytest.raises(ValueError, match="read-only"):
        got[0].weights[0][0, 0] = 5.0  # a trainer that wrote into a shared task would change others'


def test_a_different_payload_with_the_same_key_is_not_taken_for_the_cached_one():
    tasks = SharedTasks()
    session = DeviceSession("sim-000", 5, aggregator_key=VERIFY_KEY)
    first = payload(1, scale=1.0)
    other = bytearray(payload(1, scale=2.0))
    other[-4:] = first[-4:]  # same length and last bytes (the cache's key); the bytes differ
    assert len(other) == len(first)
    tasks.decode(session, job(first))
    assert tasks.decode(session, job(bytes(other))) is None  # decoded itself: its checksum is wrong
    assert tasks.hits == 0


def test_least_recently_used_payloads_leave_first():
    tasks = SharedTasks(capacity=2)
    session = DeviceSession("sim-000", 5, aggregator_key=VERIFY_KEY)
    for r in (1, 2, 1, 3):  # round 1 used again before round 3 arrives: round 2 leaves
        tasks.decode(session, job(payload(r)))
    assert (tasks.misses, tasks.hits) == (3, 1)
    tasks.decode(session, job(payload(1)))
    tasks.decode(session, job(payload(2)))
    assert (tasks.misses, tasks.hits) == (4, 2)
    with pytest.raises(ValueError, match="capacity"):
        SharedTasks(capacity=0)
