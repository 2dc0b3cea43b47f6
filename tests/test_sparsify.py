"""Top-k sparsified updates with error feedback (issue 19): the sparsifier registry, the device's
update step, and a dense federation whose devices send 10 % of each kernel's delta."""

from __future__ import annotations

import numpy as np
import pytest

from fedprune.converters.protocol import Architecture, Encoding, TrainTask, Update, decode_task, decode_update
from fedprune.converters.protocol import encode_task
from fedprune.edge_agent.update_pipeline import OutgoingUpdate, default_steps, run_steps
from fedprune.error_feedback import ErrorFeedback
from fedprune.sparsify import SPARSIFIERS, TopK, sparsifier_from_config
from fedprune.task import TaskError, parse_task

SHAPES = [[64, 32], [32]]
NAMES = ["dense/kernel", "dense/bias"]
ARCH = Architecture(model_json="{}", digest="d1", shapes=SHAPES, names=NAMES)


def test_top_k_keeps_the_largest_magnitudes_within_the_allowed_positions():
    rng = np.random.default_rng(0)
    delta = rng.normal(size=(64, 32)).astype(np.float32)
    chosen = TopK(0.1).select(delta, None)
    assert chosen.sum() == 205  # ceil(0.1 x 2048)
    assert np.abs(delta[chosen]).min() >= np.abs(delta[~chosen]).max()
    allowed = rng.random((64, 32)) > 0.5
    chosen = TopK(0.1).select(delta, allowed)
    assert chosen.sum() == int(np.ceil(0.1 * allowed.sum())) and not np.any(chosen & ~allowed)
    assert np.abs(delta[chosen]).min() >= np.abs(delta[allowed & ~chosen]).max()
    assert TopK(0.1).select(delta[0], None) is None  # 32 values: small tensors travel whole
    assert TopK(0.01, min_size=1).select(np.zeros(10, np.float32), None).sum() == 1  # at least one
    # Ties go by position, so every party agrees.
    assert np.flatnonzero(TopK(0.5, min_size=1).select(np.ones(4, np.float32), None)).tolist() == [0, 1]


def test_sparsifier_configs_round_trip_and_bad_ones_are_named():
    for cls in SPARSIFIERS.values():
        example = cls(0.05)
        assert sparsifier_from_config(example.get_config()) == example
    for bad, message in (({"sparsifier": "top_k"}, "needs key 'fraction'"),
                         ({"sparsifier": "top_k", "fraction": 0.0}, "in \\(0, 1\\]"),
                         ({"sparsifier": "rand_k", "fraction": 0.1}, "unknown")):
        with pytest.raises(ValueError, match=message):
            sparsifier_from_config(bad)
    raw = {"model": {"factory": "fedprune.models:mlp"}, "data": {"dataset": "breast_cancer"}}
    task = parse_task({**raw, "transport": {"sparsifier": "top_k", "sparsifier_params": {"fraction": 0.01}}})
    assert task.transport.sparsifier_config() == {"sparsifier": "top_k", "fraction": 0.01}
    with pytest.raises(TaskError, match="update = \"delta\""):
        parse_task({**raw, "transport": {"sparsifier": "top_k", "sparsifier_params": {"fraction": 0.01},
                                         "update": "weights"}})


def _task(sparsifier, precision="float32") -> TrainTask:
    return TrainTask(round=1, attempt=1, architecture_digest="d1",
                     weights=[np.zeros((64, 32), np.float32), np.zeros(32, np.float32)], masks=[None, None],
                     training={"local_epochs": 1, "batch_size": 4, "optimizer": "adam", "learning_rate": 0.01},
                     uplink_precision=precision, deadline_s=60.0, uplink_sparsifier=sparsifier)


def test_the_task_carries_the_sparsifier_and_older_headers_mean_none():
    config = {"sparsifier": "top_k", "fraction": 0.01}
    payload = encode_task(_task(config), NAMES)
    assert decode_task(payload, NAMES, SHAPES, 10**6).uplink_sparsifier == config
    plain = encode_task(_task(None), NAMES)
    assert b"uplink_sparsifier" not in plain  # the header every task had before
    assert decode_task(plain, NAMES, SHAPES, 10**6).uplink_sparsifier is None


@pytest.mark.parametrize("precision", ["float32", "int8"])
def test_the_device_sends_the_top_k_and_carries_the_rest_into_the_next_round(precision):
    rng = np.random.default_rng(1)
    delta = [rng.normal(size=(64, 32)).astype(np.float32), rng.normal(size=32).astype(np.float32)]
    feedback = ErrorFeedback()
    steps = default_steps(feedback, np.random.default_rng(0))
    task = _task({"sparsifier": "top_k", "fraction": 0.1}, precision)

    def send(tensors):
        out = OutgoingUpdate(task, ARCH, Update(1, 1, "d", 10, {}, list(tensors), precision=precision), task.masks)
        payload = run_steps(steps, out)
        out.sent()
        return payload, decode_update(payload, SHAPES, task.masks, len(payload), names=NAMES)

    payload, first = send(delta)
    assert first.encoding == Encoding.SELF_DESCRIBING
    assert np.count_nonzero(first.tensors[0]) == 205 and np.count_nonzero(first.tensors[1]) == 32
    assert len(payload) < 0.25 * 64 * 32 * 4  # 10 % of the kernel, values and positions
    # What was not sent is the residual: delta = sent + residual, exactly at float32.
    tolerance = 0 if precision == "float32" else 0.02
    np.testing.assert_allclose(first.tensors[0] + feedback.residual[0], delta[0], atol=1e-6 + tolerance)
    # A round with nothing new sends the largest of what was left out.
    _, second = send([np.zeros_like(d) for d in delta])
    left = np.abs(np.where(first.tensors[0] == 0, delta[0], 0.0))
    assert set(np.flatnonzero(second.tensors[0])) == set(np.argsort(-left.reshape(-1), kind="stable")[:205])


def test_a_dense_federation_with_top_k_updates_learns_with_a_tenth_of_the_uplink(embedded_broker_url, tmp_path):
    """3 devices, digits CNN, no pruning: top-k 10 % with error feedback (float32 values) against
    plain float32 FedAvg updates."""
    from fedprune.simulation.cli import run_simulation

    from federation_helpers import small_task

    task = small_task(pruning={"final_sparsity": 0.0}, federation={"rounds": 3, "min_devices": 3},
                      transport={"uplink_precision": "float32", "sparsifier": "top_k",
                                 "sparsifier_params": {"fraction": 0.1}})
    result = run_simulation(task, 3, tmp_path / "run", broker_url=embedded_broker_url, export_tflite=False)
    dense_bytes = 4 * sum(int(np.prod(s)) for s in _digits_shapes())
    per_update = [r.bytes_up / r.reported for r in result.rounds]
    assert all(b < 0.2 * dense_bytes for b in per_update), (per_update, dense_bytes)
    assert result.final_accuracy > 0.6


def _digits_shapes():
    from fedprune.models import architecture_of, digits_cnn

    return architecture_of(digits_cnn((8, 8, 1), 10)).shapes
