"""Round mechanics against a real broker: a selected device that never answers, and the quorum."""

from __future__ import annotations

import threading

import pytest

from fedprune.aggregator.server import Aggregator, FederationError
from fedprune.converters.protocol import Presence, Topics
from fedprune.edge_agent.agent import EdgeAgent
from fedprune.edge_agent.trainer import KerasTrainer
from federation_helpers import Spy, small_task
from fedprune.data import load_dataset, partition


def _federation(url, tmp_path, task, n_agents, silent_ids):
    """Real agents plus 'silent' devices that announce themselves and then never train."""
    ds = load_dataset("digits")
    topics = Topics(task.federation.id)
    silent = Spy(url, [])
    for d in silent_ids:
        silent.client.publish(topics.presence(d), Presence(d, True, 100).encode(), qos=1, retain=True).wait_for_publish(5)
    trainer = KerasTrainer()
    agg = Aggregator(task, ds, url, tmp_path / "run", export_tflite=False)
    agents = [EdgeAgent(url, f"dev-{i}", ds.x_train[idx], ds.y_train[idx], trainer,
                        aggregator_key=agg.verify_key).start()
              for i, idx in enumerate(partition(ds.y_train, n_agents, "iid"))]
    return agg, agents, silent


def _close(agents, silent, topics, silent_ids):
    for a in agents:
        a.stop()
    for d in silent_ids:  # clear the retained presence for the next test
        silent.client.publish(topics.presence(d), b"", qos=1, retain=True).wait_for_publish(5)
    silent.close()


def test_silent_device_is_dropped_at_the_deadline_and_the_quorum_closes_the_round(broker_url, tmp_path):
    task = small_task(federation={"rounds": 1, "devices_per_round": 3, "min_devices": 2, "round_timeout_s": 15},
                      pruning={"final_sparsity": 0.5, "end_round": 1})  # 15 s: two real trainings fit under load
    agg, agents, silent = _federation(broker_url, tmp_path, task, 2, ["mute"])
    try:
        result = agg.run()
    finally:
        _close(agents, silent, agg.topics, ["mute"])
    assert [r.reported for r in result.rounds] == [2]
    assert all(r.selected == 3 for r in result.rounds)
    assert all(r.wall_s >= 15 for r in result.rounds)  # waited for the silent one until the deadline


def test_round_without_quorum_is_retried_then_fails_clearly(embedded_broker_url, tmp_path):
    task = small_task(federation={"rounds": 1, "devices_per_round": 3, "min_devices": 3, "round_timeout_s": 4,
                                  "max_round_retries": 1},
                      pruning={"final_sparsity": 0.0})
    agg, agents, silent = _federation(embedded_broker_url, tmp_path, task, 2, ["mute"])
    try:
        with pytest.raises(FederationError, match="round 1 failed 2 times without a quorum of 3"):
            agg.run()
    finally:
        _close(agents, silent, agg.topics, ["mute"])


def test_the_run_ends_at_the_first_round_that_reaches_stop_at_accuracy(embedded_broker_url, tmp_path):
    task = small_task(federation={"rounds": 6, "devices_per_round": 2, "min_devices": 2, "stop_at_accuracy": 0.5},
                      pruning={"final_sparsity": 0.0})
    agg, agents, silent = _federation(embedded_broker_url, tmp_path, task, 2, [])
    try:
        result = agg.run()
    finally:
        _close(agents, silent, agg.topics, [])
    accuracies = [r.accuracy for r in result.rounds]
    assert len(accuracies) < 6 and accuracies[-1] >= 0.5 and all(a < 0.5 for a in accuracies[:-1])
    assert agg.state.completed_rounds == len(accuracies)
