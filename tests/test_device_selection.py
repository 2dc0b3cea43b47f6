"""Which devices the aggregator selects: only those that can train the task, each device left out
logged once per reason; the trainable TFLite file built once per architecture, or refused once."""

from __future__ import annotations

import logging

from fedprune.aggregator.registry import DeviceRegistry, take_presence
from fedprune.aggregator.selection import DeviceSelection, can_ever_train
from fedprune.aggregator.trainable_file import TrainableFile, TrainableFiles
from fedprune.converters.protocol import Presence, Topics

TOPICS = Topics("default")
BUILT = TrainableFile("a" * 32, 16, b"frame")
REFUSED = TrainableFile("a" * 32, 16, None, refusal="layer 'norm' (LayerNormalization) cannot be trained ...")


def _registry() -> DeviceRegistry:
    registry = DeviceRegistry()
    for device, trainer, runtime in (("pi-k", "keras", "ai-edge-litert 2.3.0"), ("pi-l", "litert", "tflite-runtime 2.14.0"),
                                     ("pi-n", "none", "")):
        take_presence(registry, TOPICS, TOPICS.presence(device),
                      Presence(device, True, 10, "0.1.0", trainer, runtime).encode())
    return registry


def test_the_registry_keeps_what_each_device_trains_with():
    registry = _registry()
    info = {d.device_id: d for d in registry.online_devices()}
    assert (info["pi-l"].trainer, info["pi-l"].runtime, info["pi-l"].agent_version) == \
        ("litert", "tflite-runtime 2.14.0", "0.1.0")
    assert registry.wait_for(3, 0.0, counts=can_ever_train) == 2  # pi-n has no trainer


def test_only_devices_that_can_train_are_selected_and_each_reason_is_logged_once(caplog):
    selection = DeviceSelection(_registry(), device_side_pruning=False)
    assert selection.wants_trainable_file()
    with caplog.at_level(logging.WARNING, logger="fedprune.aggregator.selection"):
        assert selection.eligible(BUILT) == ["pi-k", "pi-l"]
        for _ in range(3):  # every round
            assert selection.eligible(REFUSED) == ["pi-k"]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines  # pi-n once, pi-l once (not every round)
    assert any("pi-n" in line and "fedprune[agent-lite]" in line for line in lines)
    assert any("pi-l" in line and "'norm' (LayerNormalization)" in line for line in lines)


def test_device_side_pruning_leaves_out_devices_without_tensorflow():
    selection = DeviceSelection(_registry(), device_side_pruning=True)
    assert not selection.wants_trainable_file()  # no file is built for nobody
    assert selection.eligible(None) == ["pi-k"]


def test_an_architecture_the_builder_refuses_is_logged_once_naming_the_layer(caplog):
    from fedprune.keras_setup import keras

    model = keras.Sequential([keras.layers.Input((8,)), keras.layers.Dense(4, name="dense"),
                              keras.layers.LayerNormalization(name="norm"), keras.layers.Dense(3, name="logits")])
    files = TrainableFiles(batch_size=8)
    with caplog.at_level(logging.WARNING, logger="fedprune.aggregator.trainable_file"):
        first = files.get(model, "b" * 32, [True, False, False, False, False, False])
        again = files.get(model, "b" * 32, [True, False, False, False, False, False])
    assert first is again and first.message is None
    assert "'norm' (LayerNormalization)" in first.refusal
    assert len(caplog.records) == 1 and "'norm'" in caplog.records[0].getMessage()
