"""The device's update steps, each alone and in their order, without a session or TensorFlow."""

from __future__ import annotations

import numpy as np
import pytest

from fedprune.clipping import global_norm
from fedprune.converters.protocol import Architecture, Encoding, TrainTask, Update, decode_update
from fedprune.edge_agent.update_pipeline import (
    ClipToNorm,
    CompensateErrors,
    Encode,
    OutgoingUpdate,
    SendWeights,
    Sparsify,
    default_steps,
    run_steps,
)
from fedprune.error_feedback import ErrorFeedback

SHAPES = [[6, 4], [4]]
NAMES = ["dense/kernel", "dense/bias"]
ARCH = Architecture(model_json="{}", digest="d1", shapes=SHAPES, names=NAMES)
MASK = np.arange(24).reshape(6, 4) % 3 != 0
WEIGHTS = [np.full((6, 4), 2.0, np.float32) * MASK, np.zeros(4, np.float32)]
DELTA = [np.linspace(0, 1, 24, dtype=np.float32).reshape(6, 4) * MASK, np.full(4, 0.5, np.float32)]


def outgoing(precision: str = "int4", clip_norm: float | None = None, **task_fields) -> OutgoingUpdate:
    training = {"local_epochs": 1, "batch_size": 4, "optimizer": "adam", "learning_rate": 0.01}
    if clip_norm is not None:
        training["clip_norm"] = clip_norm
    task = TrainTask(round=2, attempt=1, architecture_digest="d1", weights=WEIGHTS, masks=[MASK, None],
                     training=training, uplink_precision=precision, deadline_s=60.0, **task_fields)
    update = Update(2, 1, "dev-1", 10, {"loss": 0.5}, list(DELTA), precision=precision)
    return OutgoingUpdate(task, ARCH, update, task.masks)


def test_clip_to_norm_scales_the_delta_only_when_the_task_sets_a_norm():
    unclipped = outgoing()
    ClipToNorm()(unclipped)
    assert unclipped.update.tensors == DELTA  # the same arrays: nothing to do
    clipped = outgoing(clip_norm=0.5)
    ClipToNorm()(clipped)
    assert global_norm(clipped.update.tensors) == pytest.approx(0.5, rel=1e-6)
    assert global_norm(DELTA) > 1  # (the test's delta is longer than the norm)


@pytest.mark.parametrize(("task_fields", "content"), [
    ({}, "delta"), ({"update_content": "weights"}, "weights"), ({"device_sparsity": 0.5}, "weights")])
def test_send_weights_where_the_task_asks_for_them_or_the_device_prunes(task_fields, content):
    o = outgoing(**task_fields)
    SendWeights()(o)
    assert o.update.content == content
    expected = DELTA if content == "delta" else [w + d for w, d in zip(WEIGHTS, DELTA)]
    assert all(np.array_equal(t, e) for t, e in zip(o.update.tensors, expected))


@pytest.mark.parametrize("precision", ["int4", "int8", "int8-channel", "float16"])
@pytest.mark.parametrize("task_fields", [{}, {"stochastic_rounding": True},
                                         {"uplink_sparsifier": {"sparsifier": "top_k", "fraction": 0.3, "min_size": 1}}])
def test_compensate_errors_adds_the_residual_and_keeps_what_left_only_after_sending(
        tmp_path, precision, task_fields):
    feedback = ErrorFeedback(tmp_path / "ef.npz")
    feedback.residual = [np.full((6, 4), 0.01, np.float32), np.full(4, 0.01, np.float32)]
    o = outgoing(precision, **task_fields)
    CompensateErrors(feedback)(o)
    assert np.allclose(o.update.tensors[0], DELTA[0] + 0.01 * MASK)  # pruned positions get none
    compensated = o.update.tensors
    Sparsify()(o)
    assert (o.update.encoding == Encoding.SELF_DESCRIBING) == ("uplink_sparsifier" in task_fields)
    Encode(np.random.default_rng(0))(o)
    assert not (tmp_path / "ef.npz").exists()  # nothing recorded before it is published
    o.sent()
    # exactly what the aggregator decodes is taken off (decoded here from the bytes sent)
    decoded = decode_update(o.payload, SHAPES, o.masks, len(o.payload), names=NAMES).tensors
    assert all(np.array_equal(r, c - d) for r, c, d in zip(feedback.residual, compensated, decoded))
    assert (tmp_path / "ef.npz").exists() and np.abs(feedback.residual[0]).max() > 0


@pytest.mark.parametrize(("precision", "task_fields"), [
    ("float32", {}),  # exact: nothing is lost, nothing to carry
    ("int4", {"error_feedback": False}),
    ("int4", {"update_content": "weights"}),  # weights are not summed over rounds
])
def test_compensate_errors_stays_out_where_it_does_not_apply(precision, task_fields):
    feedback = ErrorFeedback()
    feedback.residual = [np.ones((6, 4), np.float32), np.ones(4, np.float32)]
    o = outgoing(precision, **task_fields)
    SendWeights()(o)
    before = o.update.tensors
    CompensateErrors(feedback)(o)
    assert o.update.tensors is before and o.after_sent == []


def test_encode_frames_the_update_at_the_task_precision():
    o = outgoing("int8", stochastic_rounding=True)
    payload = run_steps([Encode(np.random.default_rng(1))], o)
    assert payload is o.payload
    got = decode_update(payload, SHAPES, o.masks, len(payload), names=NAMES)
    assert (got.precision, got.encoding, got.content) == ("int8", Encoding.VALUES_ONLY, "delta")
    again = outgoing("int8", stochastic_rounding=True)
    assert run_steps([Encode(np.random.default_rng(1))], again) == payload  # the rng decides the rounding


def test_default_steps_clip_before_weights_and_errors_then_encode():
    feedback = ErrorFeedback()
    steps = default_steps(feedback, np.random.default_rng(0))
    # Sparsify after error feedback: what it leaves out is carried (tests/test_sparsify.py).
    assert [type(s) for s in steps] == [ClipToNorm, SendWeights, CompensateErrors, Sparsify, Encode]
    o = outgoing("float32", clip_norm=0.5, update_content="weights")
    got = decode_update(run_steps(steps, o), SHAPES, o.masks, len(o.payload), names=NAMES)
    clipped = [d * (0.5 / global_norm(DELTA)) for d in DELTA]
    assert got.content == "weights"  # the delta was clipped, then added to the weights
    assert all(np.allclose(t, w + c, atol=1e-6) for t, w, c in zip(got.tensors, WEIGHTS, clipped))


def test_a_step_inserted_before_encoding_changes_what_travels():
    def zero_the_bias(o: OutgoingUpdate) -> None:
        o.update.tensors = [o.update.tensors[0], np.zeros_like(o.update.tensors[1])]

    steps = default_steps(ErrorFeedback(), np.random.default_rng(0))
    steps.insert(-1, zero_the_bias)
    o = outgoing("float32")
    got = decode_update(run_steps(steps, o), SHAPES, o.masks, len(o.payload), names=NAMES)
    assert np.array_equal(got.tensors[1], np.zeros(4)) and np.array_equal(got.tensors[0], DELTA[0])


def test_steps_without_an_encoder_are_refused():
    with pytest.raises(ValueError, match="no step encoded"):
        run_steps([ClipToNorm()], outgoing())
    with pytest.raises(RuntimeError, match="never encoded"):
        outgoing().sent()
