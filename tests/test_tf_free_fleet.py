"""The simulator runs devices without TensorFlow: ``trainer = "litert"`` on a profile makes its
devices train with the aggregator's trainable TFLite file in LiteRT, each still a real MQTT client
through the broker, and a fleet may mix them with Keras devices."""

from __future__ import annotations

from federation_helpers import Spy, small_task
from fedprune.converters.protocol import Presence, Topics
from fedprune.simulation.cli import run_simulation


def test_a_mixed_fleet_trains_one_model(embedded_broker_url, tmp_path):
    profiles = [{"name": "pi4", "trainer": "keras"}, {"name": "pi-zero", "trainer": "litert"}]
    task = small_task(federation={"rounds": 2, "devices_per_round": 4, "min_devices": 4},
                      pruning={"end_round": 2}, simulation={"profiles": profiles})
    topics = Topics(task.federation.id)
    spy = Spy(embedded_broker_url, [topics.all_presence, topics.trainable_model])
    try:
        result = run_simulation(task, 4, tmp_path / "run", broker_url=embedded_broker_url, export_tflite=False)
    finally:
        spy.close()
    trainers = {}
    for topic, payload in spy.on("/presence/"):
        if payload:
            presence = Presence.decode(payload)
            trainers[presence.device_id] = (presence.trainer, presence.runtime)
    assert sorted(t for t, _ in trainers.values()) == ["keras", "keras", "litert", "litert"]
    assert all(runtime.startswith("ai-edge-litert") for t, runtime in trainers.values() if t == "litert")
    assert len([p for _, p in spy.on("/model/trainable") if p]) == 1  # built once, retained
    assert [r.reported for r in result.rounds] == [4, 4]  # every device, of both kinds, in every round
    assert result.final_accuracy > 0.6
