"""The simulator runs devices without TensorFlow: ``trainer = "litert"`` on a profile makes its
devices train with the aggregator's trainable TFLite file in LiteRT, each still a real MQTT client
through the broker. (A fleet that mixes them with Keras devices: the structured-pruning test in
tests/test_federation.py.)"""

from __future__ import annotations

from federation_helpers import Spy, small_task
from fedprune.converters.protocol import Presence, Topics
from fedprune.simulation.cli import run_simulation


def test_a_fleet_without_tensorflow_trains_the_model(embedded_broker_url, tmp_path):
    task = small_task(federation={"rounds": 2}, training={"local_epochs": 2}, pruning={"end_round": 2},
                      simulation={"profiles": [{"name": "pi-zero", "trainer": "litert"}]})
    topics = Topics(task.federation.id)
    spy = Spy(embedded_broker_url, [topics.all_presence, topics.trainable_model])
    try:
        result = run_simulation(task, 3, tmp_path / "run", broker_url=embedded_broker_url, export_tflite=False)
    finally:
        spy.close()
    presences = [Presence.decode(p) for _, p in spy.on("/presence/") if p]
    assert {p.device_id for p in presences if p.online} == {"sim-000", "sim-001", "sim-002"}
    assert all(p.trainer == "litert" and p.runtime.startswith("ai-edge-litert ") for p in presences)
    assert len([p for _, p in spy.on("/model/trainable") if p]) == 1  # built once, retained
    assert [r.reported for r in result.rounds] == [3, 3]
    assert result.final_accuracy > 0.6
