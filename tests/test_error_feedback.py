"""Error feedback: what quantization drops in one round reaches the aggregator in later ones."""

from __future__ import annotations

import numpy as np

from fedprune.converters.codec import decode_values_only, encode_values_only
from fedprune.error_feedback import ErrorFeedback


def _send(values, masks, precision="int4"):
    shapes = [v.shape for v in values]
    return decode_values_only(encode_values_only(values, masks, precision), shapes, masks, precision)


def test_error_feedback_removes_the_bias_of_coarse_quantization():
    # One large weight sets the int4 scale; the small ones round to zero every single round.
    delta = [np.array([1.0, 0.05, -0.04, 0.03], dtype=np.float32)]
    masks = [None]
    rounds = 40
    plain = sum(_send(delta, masks)[0] for _ in range(rounds))
    ef = ErrorFeedback()
    with_ef = np.zeros(4, np.float32)
    for _ in range(rounds):
        c = ef.compensate(delta, masks)
        sent = _send(c, masks)
        ef.record(c, sent)
        with_ef += sent[0]
    target = rounds * delta[0]
    assert np.all(plain[1:] == 0.0)  # without feedback the small coordinates never arrive
    assert np.abs(with_ef - target).max() <= np.abs(ef.residual[0]).max() + 1e-5
    assert np.abs(with_ef - target).max() < 0.1  # with it, 40 rounds arrive to within one step


def test_residual_survives_a_restart_and_respects_the_mask(tmp_path):
    path = tmp_path / "state" / "error_feedback.npz"
    ef = ErrorFeedback(path)
    ef.record([np.array([0.5, 0.25], np.float32)], [np.array([0.0, 0.0], np.float32)])
    assert path.is_file()
    again = ErrorFeedback(path)  # a new agent process
    np.testing.assert_array_equal(again.residual[0], [0.5, 0.25])
    c = again.compensate([np.array([1.0, 1.0], np.float32)], [np.array([True, False])])
    np.testing.assert_array_equal(c[0], [1.5, 1.0])  # the pruned position gets no residual


def test_a_damaged_or_mismatched_state_starts_from_zero(tmp_path):
    path = tmp_path / "ef.npz"
    path.write_bytes(b"not an npz")
    ef = ErrorFeedback(path)
    assert ef.residual is None
    ef.record([np.ones(3, np.float32)], [np.zeros(3, np.float32)])
    c = ErrorFeedback(path).compensate([np.ones(5, np.float32)], [None])  # the model changed shape
    np.testing.assert_array_equal(c[0], np.ones(5))
