"""A real federation end to end: aggregator, agents, a real broker (embedded and Mosquitto),
Keras under tfmot, values-only int8 updates, and the exported sparse TFLite model."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from fedprune.aggregator.checkpoint import load_latest_checkpoint
from fedprune.converters.errors import CodecError
from fedprune.converters.protocol import (
    Architecture,
    Topics,
    Update,
    encode_update,
    peek_update,
    update_size_bound,
)
from fedprune.converters.tflite_export import sparse_weight_stats
from signing_helpers import content
from federation_helpers import Spy, small_task, wire_updates
from fedprune.simulation.cli import run_simulation

HEADER_ALLOWANCE = 256  # frame prefix and checksum, binary update header with device id and its metrics
# (loss, accuracy, train_s, epoch_s, and a simulated device's compute_s and sim_wait_s)


def test_federation_end_to_end(broker_url, tmp_path):
    task = small_task()
    topics = Topics(task.federation.id)
    spy = Spy(broker_url, [topics.architecture, f"{topics.root}/device/+/update", f"{topics.root}/device/+/task"])
    try:
        result = run_simulation(task, 3, tmp_path / "run", broker_url=broker_url)
    finally:
        spy.close()

    # Learns: well above chance (10 classes).
    assert result.final_accuracy > 0.6
    assert [r.round for r in result.rounds] == [1, 2, 3]
    assert all(r.reported >= 2 for r in result.rounds)

    # The schedule's final sparsity is reached exactly in every pruned layer; pruned weights are 0.
    state = load_latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert state.completed_rounds == 3
    masked = [(w, m) for w, m in zip(state.weights, state.masks) if m is not None]
    assert len(masked) == 3  # conv1, conv2, dense1; logits left dense
    for w, m in masked:
        assert (~m).sum() == round(0.8 * m.size)
        assert np.all(w[~m] == 0.0)
    assert result.final_sparsity == pytest.approx(0.8, abs=1e-4)

    # Every update on the wire: decodes against the mask of its task, carries zeros at pruned
    # positions, and is no larger than kept values x 1 byte (+ scales) + a small header.
    arch = Architecture.decode(content(spy.on("/model/architecture")[0][1]))
    updates = wire_updates(spy)
    assert len(updates) >= 6
    for payload, task_of_update, u in updates:
        for d, m in zip(u.tensors, task_of_update.masks):
            if m is not None:
                assert np.all(d[~m] == 0.0)
        bound = update_size_bound(arch.shapes, task_of_update.masks, "int8")
        assert len(payload) <= bound + HEADER_ALLOWANCE
    # The last round's updates are values-only at 80 % sparsity: about 5x smaller than round 1's.
    sizes = {r.round: r.bytes_up / r.reported for r in result.rounds}
    assert sizes[3] < sizes[1] / 3

    # The exported TFLite models were run by a runtime, and store no pruned weight.
    assert {e["precision"] for e in result.exports} == {"float32", "int8"}
    for e in result.exports:
        assert e["accuracy"] > 0.6
        assert abs(e["accuracy"] - result.final_accuracy) < 0.05
    f32 = next(e for e in result.exports if e["precision"] == "float32")
    stats = {s["elements"]: s for s in sparse_weight_stats(f32["path"])}
    for w, m in masked:
        s = stats[m.size]
        assert s["sparse"], f"kernel of {m.size} weights stored dense"
        assert s["stored_values"] == int(np.count_nonzero(w))


def _round_of(payload: bytes, default: tuple[int, int] | None = None) -> tuple[int, int]:
    """(round, attempt) of an update; ``default`` for bytes that are none (else CodecError)."""
    try:
        h, _ = peek_update(payload, 10**8)
    except CodecError:
        if default is None:
            raise
        return default
    return h.round, h.attempt


def test_bad_updates_are_rejected_and_the_round_goes_on(embedded_broker_url, tmp_path, caplog):
    task = small_task(federation={"rounds": 3})
    topics = Topics(task.federation.id)
    sent = threading.Event()

    replayed = threading.Event()

    def attack(spy: Spy, topic: str, payload: bytes) -> None:
        # The first real update of round 2 comes twice (the agents train one after another, so
        # the round is still open for the others).
        if topic.endswith("/update"):
            real = topics.device_from_topic(topic).startswith("sim-")
            if real and sent.is_set() and not replayed.is_set() and _round_of(payload, default=(0, 0))[0] == 2:
                replayed.set()
                spy.client.publish(topic, payload, qos=1)
            return
        # When round 2 opens, replay a round-1 update, and send garbage and a truncated update.
        if topic != topics.round or sent.is_set() or b'"round":2' not in payload or b'"open"' not in payload:
            return
        old = [(t, p) for t, p in spy.on("/update") if p]
        assert old, "no round-1 update was seen"
        sent.set()
        threading.Thread(target=_send_bad, args=(spy, topics, *old[0]), daemon=True).start()

    spy = Spy(embedded_broker_url, [topics.round, f"{topics.root}/device/+/update"], on_message=attack)
    try:
        result = run_simulation(task, 3, tmp_path / "run", broker_url=embedded_broker_url, export_tflite=False)
    finally:
        spy.close()
    assert sent.is_set() and replayed.is_set()
    assert [r.round for r in result.rounds] == [1, 2, 3]
    rejected = result.rounds[1].rejections
    # The byte-identical copy is a redelivery (QoS 1 delivers at least once), dropped and counted
    # apart: not a rejection.
    assert rejected.get("duplicate", 0) == 0 and result.rounds[1].redelivered == 1, rejected
    assert rejected.get("undecodable", 0) >= 2, rejected
    assert rejected.get("wrong round", 0) >= 1, rejected
    # The ghost's update never reached the checks: the aggregator listens only to the update
    # topics of the devices drawn for the attempt (the budgets drop those of devices never announced).
    assert "unknown device" not in rejected, rejected
    assert result.rounds[1].reported == 3  # the real updates counted, the replayed one once
    assert result.rounds[2].reported == 3  # the device that got garbage goes on
    # The device refused the forged task, architecture and ack: none was signed.
    refusals = [r.getMessage() for r in caplog.records if "refused a message on" in r.getMessage()]
    for topic_end in ("/task:", "/model/architecture:", "/ack:"):
        assert any(topic_end in m for m in refusals), topic_end
    assert result.final_accuracy > 0.6


def _send_bad(spy: Spy, topics: Topics, old_topic: str, old_update: bytes) -> None:
    victim = topics.device_from_topic(old_topic)
    spy.publish(topics.update(victim), b"\x00garbage" * 10)
    spy.publish(topics.update(victim), old_update[: len(old_update) // 2])
    spy.publish(old_topic, old_update)  # its round-1 update replayed in round 2
    ghost = Update(round=2, attempt=1, device_id="ghost", num_samples=5, error="never announced itself")
    spy.publish(topics.update("ghost"), encode_update(ghost, []))
    # And at the device: a garbage task, architecture and ack (not retained: the real ones stay).
    spy.publish(topics.task(victim), b"FPRN\x01\x01garbage task")
    spy.publish(topics.architecture, b'{"v": 1, "type": "architecture"}')
    spy.publish(topics.ack(victim), b"{not json")


def test_federation_with_chunked_tasks_weights_uplink_int4_zstd_and_stochastic_rounding(broker_url, tmp_path):
    # The task (~600 kB of float32 weights) is far over a 64 kB payload limit: it travels in chunks.
    task = small_task(
        federation={"rounds": 2},
        pruning={"final_sparsity": 0.5, "end_round": 2},
        transport={"max_payload_bytes": 65536, "uplink_precision": "int4", "update": "weights",
                   "compression": "zstd", "stochastic_rounding": True, "downlink_precision": "float16"},
    )
    result = run_simulation(task, 3, tmp_path / "run", broker_url=broker_url, export_tflite=False)
    assert [r.reported for r in result.rounds] == [3, 3]
    assert all(r.rejected == 0 for r in result.rounds)
    assert result.final_accuracy > 0.5
    assert result.final_sparsity == pytest.approx(0.5, abs=1e-4)


def test_structured_pruning_shrinks_the_model_mid_federation(embedded_broker_url, tmp_path):
    # After round 1 the aggregator removes half the units of conv1, conv2 and dense1; the agents
    # take the new architecture from its retained message and train the smaller model: a Keras
    # device rebuilds it, the two TensorFlow-free ones get the new trainable file the aggregator
    # builds for it.
    profiles = [{"name": "keras", "trainer": "keras"}, {"name": "lite", "trainer": "litert"}]
    task = small_task(federation={"rounds": 3}, pruning={"final_sparsity": 0.0, "structured_fraction": 0.5,
                                                         "structured_round": 1}, simulation={"profiles": profiles})
    result = run_simulation(task, 3, tmp_path / "run", broker_url=embedded_broker_url, export_tflite=False)
    assert [r.reported for r in result.rounds] == [3, 3, 3]
    assert result.parameters == 38_282  # from 151,306
    assert result.rounds[2].bytes_up < result.rounds[0].bytes_up / 3.5
    assert result.final_accuracy > 0.6
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())["structured_pruning"]
    assert summary["after"]["flops"] < summary["before"]["flops"] / 3
    assert summary["kept_units"] == {"conv1": 16, "conv2": 32, "dense1": 64}


def test_device_side_masks_are_averaged_and_agreement_reported(embedded_broker_url, tmp_path):
    task = small_task(pruning={"mask_owner": "device"})
    result = run_simulation(task, 3, tmp_path / "run", broker_url=embedded_broker_url, export_tflite=False)
    assert result.final_sparsity == pytest.approx(0.8, abs=1e-4)
    agreement = [r.mask_agreement for r in result.rounds]
    assert agreement[0] == 1.0  # round 1 prunes to 0 %: every device keeps everything
    assert all(0.3 < a <= 1.0 for a in agreement[1:])
    assert result.final_accuracy > 0.6


def test_threshold_rules_per_layer_from_the_task_file(embedded_broker_url, tmp_path):
    # dense1: |w| <= 0.02 pruned; other layers: magnitude to the scheduled 80 %.
    task = small_task(federation={"rounds": 2}, pruning={"end_round": 2, "layers": {"dense1": {"rule": "absolute",
                                                                                             "threshold": 0.02}}})
    result = run_simulation(task, 3, tmp_path / "run", broker_url=embedded_broker_url, export_tflite=False)
    layer = result.rounds[-1].layer_sparsity
    assert layer["conv2/kernel"] == pytest.approx(0.8, abs=1e-4)
    assert 0.05 < layer["dense1/kernel"] < 0.8  # set by the threshold, not the schedule
    state = load_latest_checkpoint(tmp_path / "run" / "checkpoints")
    dense1 = state.weights[4]
    assert np.all(np.abs(dense1[state.masks[4]]) > 0.02) and np.all(dense1[~state.masks[4]] == 0.0)


def test_regrowth_from_device_gradients_keeps_the_sparsity(embedded_broker_url, tmp_path):
    task = small_task(pruning={"regrowth": 0.1})
    topics = Topics(task.federation.id)
    spy = Spy(embedded_broker_url, [f"{topics.root}/device/+/update"])
    try:
        result = run_simulation(task, 3, tmp_path / "run", broker_url=embedded_broker_url, export_tflite=False)
    finally:
        spy.close()
    assert result.final_sparsity == pytest.approx(0.8, abs=1e-4)  # swaps keep the count
    with_gradients = [peek_update(p, 10**8)[0].gradient_section is not None for _, p in spy.on("/update")]
    assert sum(with_gradients) >= 6  # rounds 2 and 3 (pruning turns with a mask) asked for them
    assert result.final_accuracy > 0.6
