"""Tests for fedprune.pruning: magnitude masks and round-based schedules (checked against tfmot)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedprune.pruning.masks import (
    rescale_units_to_norms,
    apply_masks,
    kept_jaccard,
    layer_sparsities,
    magnitude_mask,
    prune_to_sparsity,
    sparsity,
)
from fedprune.converters.mask_coding import mask_digest
from fedprune.pruning.schedules import AdaptiveSparsity, ConstantSparsity, PolynomialDecay, schedule_from_config

PROP = settings(max_examples=200, deadline=None)
# tfmot imports distutils.version on import; not our concern here.
pytestmark = pytest.mark.filterwarnings("ignore:distutils Version classes:DeprecationWarning")

shapes = hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=6)
finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)
sparsities = st.floats(0.0, 1.0, exclude_max=True)


# --------------------------------------------------------------------------- magnitude_mask


@PROP
@given(w=hnp.arrays(np.float32, shapes, elements=finite), s=sparsities)
def test_magnitude_mask_prunes_round_s_n_and_keeps_the_largest(w, s):
    keep = magnitude_mask(w, s)
    assert keep.shape == w.shape and keep.dtype == bool
    n_pruned = int(round(s * w.size))
    assert int((~keep).sum()) == n_pruned
    a = np.abs(w.astype(np.float64))
    if 0 < n_pruned < w.size:
        # every kept magnitude is >= every pruned magnitude
        assert a[keep].min() >= a[~keep].max()


@PROP
@given(w=hnp.arrays(np.float32, shapes, elements=finite), s=sparsities)
def test_magnitude_mask_ties_broken_by_position(w, s):
    keep = magnitude_mask(w, s)
    flat_a = np.abs(w.astype(np.float64)).ravel()
    flat_k = keep.ravel()
    # among equal magnitudes, a pruned position never comes after a kept one
    for value in np.unique(flat_a):
        tied = flat_k[flat_a == value]
        # pattern must be: some False (pruned) first, then True (kept)
        assert np.all(np.diff(tied.astype(int)) >= 0)
    # deterministic: same input, same mask
    assert np.array_equal(keep, magnitude_mask(w.copy(), s))


def test_magnitude_mask_all_equal_prunes_first_positions():
    keep = magnitude_mask(np.full((2, 3), 0.5), 0.5)
    assert keep.tolist() == [[False, False, False], [True, True, True]]
    # sign does not matter, only magnitude
    keep = magnitude_mask(np.array([-3.0, 1.0, 2.0, -0.5]), 0.5)
    assert keep.tolist() == [True, False, True, False]


def test_magnitude_mask_zero_sparsity_keeps_all():
    w = np.arange(12.0).reshape(3, 4)
    assert magnitude_mask(w, 0.0).all()


@pytest.mark.parametrize("s", [-0.1, 1.0, 1.5, float("nan"), float("inf")])
def test_magnitude_mask_rejects_sparsity_outside_unit_interval(s):
    with pytest.raises(ValueError, match="sparsity"):
        magnitude_mask(np.ones(4), s)


def test_spec_worked_case_keeps_magnitudes_above_0_4():
    w = np.array([[0.8, 0.3], [0.5, 0.7], [0.2, 0.6]])
    keep = magnitude_mask(w, 2 / 6)
    kept = {tuple(int(i) for i in ix) for ix in np.argwhere(keep)}
    assert kept == {(0, 0), (1, 0), (1, 1), (2, 1)}
    assert np.array_equal(keep, np.abs(w) > 0.4)
    # and the same through prune_to_sparsity from a fresh (all kept) mask
    new_w, new_m = prune_to_sparsity([w], [np.ones_like(w, dtype=bool)], 2 / 6)
    assert np.array_equal(new_m[0], np.abs(w) > 0.4)
    assert np.array_equal(new_w[0], np.where(np.abs(w) > 0.4, w, 0.0))


# --------------------------------------------------------------------------- prune_to_sparsity


def test_prune_to_sparsity_leaves_none_masked_tensors_alone():
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(4, 5)).astype(np.float32)
    bias = rng.normal(size=(5,)).astype(np.float32)
    new_w, new_m = prune_to_sparsity([kernel, bias], [np.ones((4, 5), bool), None], 0.6)
    assert new_m[1] is None
    assert np.array_equal(new_w[1], bias)
    assert new_w[0].dtype == np.float32
    assert int((~new_m[0]).sum()) == 12
    assert np.all(new_w[0][~new_m[0]] == 0.0)
    assert np.array_equal(new_w[0][new_m[0]], kernel[new_m[0]])


@PROP
@given(
    w=hnp.arrays(np.float32, shapes, elements=finite.filter(lambda x: x != 0.0)),
    steps=st.lists(sparsities, min_size=1, max_size=5),
)
def test_prune_along_schedule_masks_nest_and_pruned_are_exact_zeros(w, steps):
    """Successive pruning at non-decreasing sparsity only removes positions (never revives)."""
    weights = [w]
    masks = [np.ones(w.shape, bool)]
    for s in sorted(steps):
        new_w, new_m = prune_to_sparsity(weights, masks, s)
        assert np.all(new_m[0] <= masks[0]), "a pruned position came back"
        assert np.all(new_w[0][~new_m[0]] == 0.0)
        assert np.array_equal(new_w[0][new_m[0]], w[new_m[0]])
        assert int((~new_m[0]).sum()) == int(round(s * w.size))
        weights, masks = new_w, new_m


def test_prune_never_revives_a_pruned_position_when_kept_weights_are_exactly_zero():
    # position 4 was pruned earlier; positions 0 and 1 are kept but hold exact zeros
    w = [np.array([0.0, 0.0, 0.5, 0.9, 0.0, 0.7])]
    m = [np.array([True, True, True, True, False, True])]
    _, new_m = prune_to_sparsity(w, m, 2 / 6)
    assert int((~new_m[0]).sum()) == 2
    assert not new_m[0][4], "pruned position 4 was revived"


def test_apply_masks_zeroes_pruned_positions_and_keeps_dtype():
    w = [np.arange(1, 7, dtype=np.float32).reshape(2, 3), np.array([9.0, 8.0], np.float32)]
    m = [np.array([[True, False, True], [False, True, False]]), None]
    out = apply_masks(w, m)
    assert out[0].tolist() == [[1, 0, 3], [0, 5, 0]]
    assert out[0].dtype == np.float32
    assert np.array_equal(out[1], w[1])


# --------------------------------------------------------------------------- sparsity, digest


def test_kept_jaccard_counts_the_kept_positions_both_masks_share_over_either():
    before = [np.array([True, True, False, False]), None, np.array([[True, False]])]
    after = [np.array([True, False, True, False]), None, np.array([[True, False]])]
    assert kept_jaccard(before, after) == pytest.approx(2 / 4)  # kept by both: 2; by either: 4
    assert kept_jaccard(before, before) == 1.0
    assert kept_jaccard([None], [None]) is None  # nothing masked
    assert kept_jaccard(before, [before[0], None, np.ones((1, 1), bool)]) is None  # a smaller model


def test_sparsity_and_layer_sparsities():
    m = [np.array([True, False, False, False]), None, np.array([[True, True], [True, False]])]
    assert sparsity(m) == pytest.approx(4 / 8)
    assert layer_sparsities(m, ["a", "b", "c"]) == pytest.approx({"a": 0.75, "c": 0.25})
    assert sparsity([None, None]) == 0.0
    assert sparsity([]) == 0.0
    assert layer_sparsities([None], ["x"]) == {}
    assert sparsity([np.ones(5, bool)]) == 0.0


def test_mask_digest_same_masks_same_digest():
    rng = np.random.default_rng(1)
    m = [rng.random((7, 3)) > 0.5, None, rng.random((5,)) > 0.5]
    d = mask_digest(m)
    assert isinstance(d, str) and len(d) == 32
    assert mask_digest([x.copy() if x is not None else None for x in m]) == d


@PROP
@given(shape=shapes, data=st.data())
def test_mask_digest_one_flipped_bit_changes_digest(shape, data):
    bits = data.draw(hnp.arrays(np.bool_, shape))
    i = data.draw(st.integers(0, bits.size - 1))
    flipped = bits.copy().ravel()
    flipped[i] = ~flipped[i]
    assert mask_digest([None, bits]) != mask_digest([None, flipped.reshape(shape)])


def test_mask_digest_depends_on_shape_and_position():
    bits = np.array([True, False, True, True, False, False])
    assert mask_digest([bits.reshape(2, 3)]) != mask_digest([bits.reshape(3, 2)])
    assert mask_digest([bits.reshape(2, 3)]) != mask_digest([bits])
    assert mask_digest([bits, None]) != mask_digest([None, bits])
    # same bits after packbits padding but a different length
    assert mask_digest([np.ones(7, bool)]) != mask_digest([np.ones(8, bool)])
    assert mask_digest([np.zeros(7, bool)]) != mask_digest([np.zeros(8, bool)])


# --------------------------------------------------------------------------- schedules


@pytest.fixture(scope="module")
def tfmot_and_tf():
    try:
        from fedprune.keras_setup import tf  # noqa: I001  (must come before tfmot)
        import tensorflow_model_optimization as tfmot
    except ImportError as e:  # pragma: no cover - the dev install has them
        pytest.skip(f"tensorflow / tfmot not installed: {e}")
    return tfmot, tf


TFMOT_CASES = [
    # initial, final, begin, end, power, frequency
    (0.0, 0.8, 2, 10, 3, 2),  # examples/digits.toml
    (0.1, 0.8, 2, 10, 3, 3),  # frequency does not divide the range
    (0.2, 0.9, 1, 7, 1, 1),
    (0.0, 0.5, 3, 20, 2, 4),
    (0.3, 0.95, 5, 6, 3, 1),
    (0.0, 0.75, 1, 12, 1.5, 5),
    (0.5, 0.5, 1, 5, 3, 2),
]


@pytest.mark.parametrize("initial,final,begin,end,power,frequency", TFMOT_CASES)
def test_polynomial_decay_matches_tfmot(tfmot_and_tf, initial, final, begin, end, power, frequency):
    tfmot, tf = tfmot_and_tf
    ours = PolynomialDecay(initial, final, begin, end, power, frequency)
    theirs = tfmot.sparsity.keras.PolynomialDecay(
        initial_sparsity=initial, final_sparsity=final, begin_step=begin, end_step=end,
        power=power, frequency=frequency,
    )
    for r in range(1, end + 4):
        should_prune, their_s = theirs(tf.constant(r, dtype=tf.int64))
        turn, our_s = ours(r)
        assert ours.sparsity_at(r) == our_s
        if begin <= r <= end:
            assert our_s == pytest.approx(float(their_s), abs=1e-6), r
        if r == end:
            # Deliberate difference: tfmot prunes only when (step - begin) % frequency == 0, we
            # also prune at end_round so final_sparsity is always reached (schedules.py).
            assert turn is True
            assert bool(should_prune) == ((end - begin) % frequency == 0)
        else:
            assert turn == bool(should_prune), r
    assert ours(end)[1] == pytest.approx(final)
    assert ours(begin)[1] == pytest.approx(initial)


def test_polynomial_decay_clips_outside_range_and_is_monotone():
    s = PolynomialDecay(0.1, 0.9, 3, 9, 3, 2)
    assert s.sparsity_at(1) == pytest.approx(0.1)
    assert s.sparsity_at(100) == pytest.approx(0.9)
    values = [s.sparsity_at(r) for r in range(1, 15)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert [r for r in range(1, 15) if s(r)[0]] == [3, 5, 7, 9]
    single = PolynomialDecay(0.0, 0.6, 4, 4)
    assert single(4) == (True, pytest.approx(0.6))
    assert single(3)[0] is False and single(5)[0] is False


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(initial_sparsity=0.5, final_sparsity=0.4, begin_round=1, end_round=5),
        dict(initial_sparsity=0.0, final_sparsity=1.0, begin_round=1, end_round=5),
        dict(initial_sparsity=-0.1, final_sparsity=0.5, begin_round=1, end_round=5),
        dict(initial_sparsity=0.0, final_sparsity=0.5, begin_round=-1, end_round=5),
        dict(initial_sparsity=0.0, final_sparsity=0.5, begin_round=5, end_round=4),
        dict(initial_sparsity=0.0, final_sparsity=0.5, begin_round=1, end_round=5, frequency=0),
    ],
)
def test_polynomial_decay_rejects_bad_parameters(kwargs):
    with pytest.raises(ValueError):
        PolynomialDecay(**kwargs)


def test_schedules_may_prune_the_initial_model_at_round_0():
    assert ConstantSparsity(0.9, begin_round=0, end_round=10, frequency=5)(0) == (True, 0.9)
    assert [r for r in range(0, 11) if ConstantSparsity(0.9, 0, 10, 5)(r)[0]] == [0, 5, 10]
    assert PolynomialDecay(0.5, 0.9, begin_round=0, end_round=4)(0) == (True, 0.5)
    with pytest.raises(ValueError, match="begin_round must be >= 1"):
        AdaptiveSparsity(0.5, 0.9, 0.1, 0.01, begin_round=0, end_round=5)


def test_constant_sparsity_behaviour():
    c = ConstantSparsity(0.5, begin_round=2, end_round=9, frequency=3)
    assert [r for r in range(1, 13) if c(r)[0]] == [2, 5, 8, 9]  # 9 = end_round, see above
    assert all(c(r)[1] == 0.5 for r in range(1, 13))
    d = ConstantSparsity(0.3)
    assert d(1) == (True, 0.3) and d(2) == (False, 0.3)
    for bad in (dict(target_sparsity=1.0), dict(target_sparsity=-0.2),
                dict(target_sparsity=0.5, begin_round=-1),
                dict(target_sparsity=0.5, begin_round=3, end_round=2),
                dict(target_sparsity=0.5, frequency=0)):
        with pytest.raises(ValueError):
            ConstantSparsity(**bad)


def test_constant_sparsity_pruning_turns_match_tfmot(tfmot_and_tf):
    tfmot, tf = tfmot_and_tf
    theirs = tfmot.sparsity.keras.ConstantSparsity(0.5, begin_step=2, end_step=11, frequency=3)
    ours = ConstantSparsity(0.5, begin_round=2, end_round=11, frequency=3)
    for r in range(1, 15):
        should_prune, s = theirs(tf.constant(r, dtype=tf.int64))
        assert float(s) == pytest.approx(0.5)
        assert ours(r)[0] == bool(should_prune), r  # (11 - 2) % 3 == 0: end coincides here


@pytest.mark.parametrize(
    "schedule",
    [
        ConstantSparsity(0.4, begin_round=2, end_round=8, frequency=2),
        PolynomialDecay(0.1, 0.85, 2, 12, power=2.0, frequency=3),
    ],
)
def test_get_config_round_trip(schedule):
    cfg = schedule.get_config()
    assert cfg["schedule"] == type(schedule).schedule_name
    rebuilt = schedule_from_config(cfg)
    assert rebuilt == schedule
    assert [rebuilt(r) for r in range(1, 15)] == [schedule(r) for r in range(1, 15)]


def test_rescale_units_to_norms_restores_each_output_units_norm():
    rng = np.random.default_rng(0)
    ref = [rng.normal(size=(3, 3, 4, 5)).astype(np.float32), rng.normal(size=(5,)).astype(np.float32),
           rng.normal(size=(6, 2)).astype(np.float32)]
    masks = [rng.random(ref[0].shape) < 0.2, None, np.array([[1, 0]] * 6, bool)]
    pruned = [ref[0] * masks[0], ref[1], ref[2] * masks[2]]
    out = rescale_units_to_norms(ref, pruned, masks)
    np.testing.assert_allclose(np.linalg.norm(out[0].reshape(-1, 5), axis=0), np.linalg.norm(ref[0].reshape(-1, 5), axis=0),
                               rtol=1e-5)
    assert np.all(out[0][~masks[0]] == 0)  # pruned positions stay pruned
    assert out[1] is pruned[1]  # no mask: untouched
    np.testing.assert_allclose(np.linalg.norm(out[2][:, 0]), np.linalg.norm(ref[2][:, 0]), rtol=1e-5)
    assert np.all(out[2][:, 1] == 0)  # a unit with nothing kept stays zero
