"""The aggregator's checks on an update, before and after decoding (no broker needed)."""

from __future__ import annotations

import numpy as np
import pytest

from fedprune.aggregator.server import Aggregator
from codec_helpers import recrc
from fedprune.converters.protocol import Encoding, Update, encode_update
from federation_helpers import small_task
from fedprune.data import load_dataset


@pytest.fixture(scope="module")
def aggregator(tmp_path_factory):
    # Built, never started: the checks need the model layout and the registry, not a connection.
    agg = Aggregator(small_task(), load_dataset("digits"), "mqtt://127.0.0.1:1", tmp_path_factory.mktemp("run"),
                     export_tflite=False)
    agg.registry.update("dev-1", True, 50)
    return agg


def _update(agg, **kw):
    fields = dict(round=2, attempt=1, device_id="dev-1", num_samples=50, metrics={"loss": 0.1},
                  tensors=[np.zeros(s, np.float32) for s in agg.shapes], precision="int8")
    fields.update(kw)
    return encode_update(Update(**fields), agg.state.masks)


def test_a_valid_update_is_accepted(aggregator):
    result, reason, device = aggregator._check_update(aggregator.topics.update("dev-1"), _update(aggregator),
                                                      2, 1, ["dev-1"], {})
    assert reason == "" and device == "dev-1" and result.num_samples == 50


@pytest.mark.parametrize("kw,topic_device,selected,reason", [
    ({"precision": "float32"}, "dev-1", ["dev-1"], "wrong encoding"),
    ({"round": 1}, "dev-1", ["dev-1"], "wrong round"),  # a closed round
    ({"round": 3}, "dev-1", ["dev-1"], "wrong round"),  # a future one
    ({"attempt": 2}, "dev-1", ["dev-1"], "wrong round"),
    ({"device_id": "dev-2"}, "dev-1", ["dev-1"], "device mismatch"),
    ({"device_id": "ghost"}, "ghost", ["ghost"], "unknown device"),
    ({}, "dev-1", ["other"], "not selected"),
    ({"tensors": None, "error": "out of memory"}, "dev-1", ["dev-1"], "device error"),
])
def test_bad_updates_are_rejected_with_the_reason(aggregator, kw, topic_device, selected, reason):
    result, why, _ = aggregator._check_update(aggregator.topics.update(topic_device), _update(aggregator, **kw),
                                              2, 1, selected, {})
    assert result is None and why.startswith(reason), why


def test_a_duplicate_and_garbage_are_rejected(aggregator):
    topic = aggregator.topics.update("dev-1")
    first, _, _ = aggregator._check_update(topic, _update(aggregator), 2, 1, ["dev-1"], {})
    _, why, _ = aggregator._check_update(topic, _update(aggregator), 2, 1, ["dev-1"], {"dev-1": first})
    assert why.startswith("duplicate")
    _, why, _ = aggregator._check_update(topic, b"\x00" * 40, 2, 1, ["dev-1"], {})
    assert why.startswith("undecodable")


@pytest.fixture(scope="module")
def float32_aggregator(tmp_path_factory):
    task = small_task(transport={"uplink_precision": "float32", "max_message_bytes": 1_000_000})
    agg = Aggregator(task, load_dataset("digits"), "mqtt://127.0.0.1:1", tmp_path_factory.mktemp("run32"),
                     export_tflite=False)
    agg.registry.update("dev-1", True, 50)
    return agg


def _check(agg, data: bytes) -> str:
    result, why, _ = agg._check_update(agg.topics.update("dev-1"), data, 2, 1, ["dev-1"], {})
    assert (result is None) == bool(why), why
    return why


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_values_are_rejected(float32_aggregator, bad):
    agg = float32_aggregator
    tensors = [np.zeros(s, np.float32) for s in agg.shapes]
    tensors[0].flat[7] = 1.25
    good = _update(agg, precision="float32", tensors=tensors)
    assert _check(agg, good) == ""
    at = good.index(np.float32(1.25).tobytes())
    poisoned = recrc(good[:at] + np.float32(bad).tobytes() + good[at + 4:])
    assert _check(agg, poisoned).startswith("undecodable: values contain NaN or Inf")


def test_wrong_layouts_and_oversize_updates_are_rejected(float32_aggregator):
    agg = float32_aggregator
    tensors = [np.zeros(s, np.float32) for s in agg.shapes]
    # Values for a model with one tensor less, against the masks it would have.
    short = encode_update(Update(2, 1, "dev-1", 50, tensors=tensors[:-1], precision="float32"), agg.state.masks[:-1])
    assert _check(agg, short).startswith("undecodable: values section is 605184 bytes, expected 605224")
    # Self-describing, with the right shapes under other tensor names.
    renamed = encode_update(Update(2, 1, "dev-1", 50, tensors=tensors, precision="float32",
                                   encoding=Encoding.SELF_DESCRIBING),
                            agg.state.masks, names=[f"other/{n}" for n in agg.architecture.names])
    assert "expected" in _check(agg, renamed)
    # Over the task's transport.max_message_bytes (1,000,000 here).
    assert "exceeds" in _check(agg, _update(agg, precision="float32") + b"\0" * 500_000)


def test_begin_round_0_prunes_the_initial_model_keeping_each_units_norm(tmp_path):
    from fedprune.keras_setup import keras
    from fedprune.models import build_model, get_layer_weights

    task = small_task(pruning={"schedule": "constant", "final_sparsity": 0.9, "begin_round": 0, "end_round": 0,
                               "leave_dense": ["conv1", "logits"]})
    ds = load_dataset("digits")
    agg = Aggregator(task, ds, "mqtt://127.0.0.1:1", tmp_path / "run", export_tflite=False)
    keras.utils.set_random_seed(task.seed)  # the same initialization the aggregator drew
    initial = get_layer_weights(build_model(task.model.factory, ds.input_shape, ds.num_classes))
    masked = [i for i, m in enumerate(agg.state.masks) if m is not None]
    assert [agg.layer_of[i] for i in masked] == ["conv2", "dense1"]
    for i in masked:
        w, m = agg.state.weights[i], agg.state.masks[i]
        assert abs(1 - m.mean() - 0.9) < 0.001 and np.all(w[~m] == 0)
        units = w.shape[-1]
        np.testing.assert_allclose(np.linalg.norm(w.reshape(-1, units), axis=0),
                                   np.linalg.norm(initial[i].reshape(-1, units), axis=0), rtol=1e-4)


def test_each_accepted_update_of_a_round_decodes_into_its_own_reserved_row(tmp_path):
    from fedprune.aggregator.update_buffers import UpdateBuffers

    agg = Aggregator(small_task(), load_dataset("digits"), "mqtt://127.0.0.1:1", tmp_path / "run",
                     export_tflite=False)
    agg._buffers = UpdateBuffers(agg.shapes, 2)  # as run() reserves them
    for d in ("dev-1", "dev-2"):
        agg.registry.update(d, True, 50)
    rng = np.random.default_rng(0)
    sent = {d: [rng.normal(size=s).astype(np.float32) * 0.1 for s in agg.shapes] for d in ("dev-1", "dev-2")}
    results = {}
    for d, tensors in sent.items():
        result, why, _ = agg._check_update(agg.topics.update(d), _update(agg, device_id=d, tensors=tensors),
                                           2, 1, ["dev-1", "dev-2"], results)
        assert why == ""
        results[d] = result
    for i, d in enumerate(sent):  # row i holds the i-th accepted update, and nothing else does
        row = agg._buffers.row(i)
        assert all(np.shares_memory(t, r) for t, r in zip(results[d].delta, row))
        assert all(np.allclose(t, s, atol=0.1 * 4 / 127) for t, s in zip(results[d].delta, sent[d]))
    assert not any(np.shares_memory(a, b) for a in results["dev-1"].delta for b in results["dev-2"].delta)
    # a third accepted update has no row left: it decodes into arrays of its own
    agg.registry.update("dev-3", True, 50)
    third, why, _ = agg._check_update(agg.topics.update("dev-3"), _update(agg, device_id="dev-3"), 2, 1,
                                      ["dev-1", "dev-2", "dev-3"], results)
    assert why == "" and not any(np.shares_memory(t, agg._buffers._block) for t in third.delta)
