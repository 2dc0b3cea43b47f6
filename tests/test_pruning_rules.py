"""Tests for fedprune.pruning.rules, rule/global pruning in masks.py, and AdaptiveSparsity."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fedprune.pruning.masks import (
    global_magnitude_masks,
    magnitude_mask,
    prune_globally,
    prune_with_rules,
)
from fedprune.pruning.rules import (
    AbsoluteThreshold,
    LayerMagnitude,
    MaxRateThreshold,
    MByN,
    RowMeanThreshold,
    rule_from_config,
)
from fedprune.pruning.schedules import AdaptiveSparsity, Decision, schedule_from_config

T, F = True, False
WORKED = np.array([[0.8, 0.3], [0.5, 0.7], [0.2, 0.6]])  # rows: inputs 1-3, columns: outputs 1-2


# --------------------------------------------------------------------------- the worked case


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_worked_case_absolute_threshold_0_4(dtype):
    w = WORKED.astype(dtype)
    keep = AbsoluteThreshold(0.4).mask(w, np.ones(w.shape, bool), None)
    assert keep.tolist() == [[T, F], [T, T], [F, T]]
    kept_1_based = {(int(i) + 1, int(j) + 1) for i, j in np.argwhere(keep)}
    assert kept_1_based == {(1, 1), (2, 1), (2, 2), (3, 2)}
    new_w, new_m = prune_with_rules([w], [np.ones(w.shape, bool)], [AbsoluteThreshold(0.4)], None)
    assert new_m[0].tolist() == keep.tolist()
    assert new_w[0].dtype == dtype
    assert new_w[0].tolist() == np.array([[0.8, 0.0], [0.5, 0.7], [0.0, 0.6]], dtype).tolist()


# --------------------------------------------------------------------------- each rule


def test_absolute_threshold_is_strict_uses_magnitude_and_weight_precision():
    w = np.array([-0.9, 0.4, -0.4, 0.41, 0.0])
    assert AbsoluteThreshold(0.4).mask(w, None, None).tolist() == [T, F, F, T, F]
    # float32(0.4) > float64(0.4), yet compared in float32 it equals the threshold: pruned
    w32 = np.array([0.4, 0.5], np.float32)
    assert AbsoluteThreshold(0.4).mask(w32, None, None).tolist() == [F, T]
    assert AbsoluteThreshold(0.0).mask(w, None, None).tolist() == [T, T, T, T, F]
    assert not AbsoluteThreshold(1e300).mask(w32, None, None).any()


def test_max_rate_threshold_uses_max_of_kept_weights_only():
    w = np.array([[10.0, 4.0], [3.0, -2.5], [1.0, 2.0]])
    # all kept: theta = 0.5 * 10 = 5
    assert MaxRateThreshold(0.5).mask(w, None, None).tolist() == [[T, F], [F, F], [F, F]]
    # 10 already pruned: theta = 0.5 * 4 = 2 (2.0 itself is not > 2)
    cur = np.array([[F, T], [T, T], [T, T]])
    assert MaxRateThreshold(0.5).mask(w, cur, None).tolist() == [[F, T], [T, T], [F, F]]
    # rate 0 keeps every non-zero kept weight; nothing kept: unchanged
    assert MaxRateThreshold(0.0).mask(np.array([0.0, -1e-9, 3.0]), None, None).tolist() == [F, T, T]
    assert not MaxRateThreshold(0.3).mask(w, np.zeros(w.shape, bool), None).any()


def test_row_mean_threshold_per_input_row_with_pruned_counting_as_zero():
    w = WORKED
    # row means .55, .6, .4: keep .8 | .7 | .6
    assert RowMeanThreshold().mask(w, None, None).tolist() == [[T, F], [F, T], [F, T]]
    w = np.array([[4.0, 2.0, 1.0, 1.0], [1.0, 1.0, 1.0, 5.0]])
    # scale 0.5: thetas 1.0 and 1.0
    assert RowMeanThreshold(0.5).mask(w, None, None).tolist() == [[T, T, F, F], [F, F, F, T]]
    # pruned positions count as 0 in the mean, whatever value w holds there:
    # row 0 -> (0 + 2 + 1 + 1)/4 = 1.0, so 2.0 survives (averaging survivors only: 4/3, same)
    # row 1 -> (1 + 1 + 0 + 0)/4 = 0.5, so both 1.0 survive (survivors only: 1.0, both pruned)
    cur = np.array([[F, T, T, T], [T, T, F, F]])
    assert RowMeanThreshold().mask(w, cur, None).tolist() == [[F, T, F, F], [T, T, F, F]]


def test_row_mean_threshold_compares_in_the_weights_precision():
    """A float32 weight equal to its row's mean (as float32 holds it) is pruned, as in float64.

    The float32 row's mean taken in float64, 0.4999999925..., is a hair below float32 0.5:
    compared in float64, 0.5 would be kept on float32 weights and pruned on float64 ones.
    """
    rows = [[0.1, 0.5, 0.9], [0.2, 0.2, 0.2]]
    w32 = np.array(rows, np.float32)
    assert float(np.abs(w32[0].astype(np.float64)).mean()) < 0.5 == float(np.float32(w32[0].mean()))
    assert RowMeanThreshold().mask(w32, None, None).tolist() == [[F, F, T], [F, F, F]]
    assert RowMeanThreshold().mask(np.array(rows, np.float64), None, None).tolist() == [[F, F, T], [F, F, F]]
    w1, m1 = prune_with_rules([w32], [np.ones(w32.shape, bool)], [RowMeanThreshold()], None)
    assert w1[0].dtype == np.float32 and w1[0].tolist()[0] == [0.0, 0.0, pytest.approx(0.9)]


def test_row_mean_threshold_rows_of_conv_and_1d():
    # 1-D: one row (mean 2.5)
    assert RowMeanThreshold().mask(np.array([1.0, 2.0, 3.0, 4.0]), None, None).tolist() == [
        F, F, T, T,
    ]
    # conv (kh, kw, in, out): each (y, x, c) is a row averaged over the out filters
    rng = np.random.default_rng(3)
    w = rng.normal(size=(3, 3, 4, 5))
    keep = RowMeanThreshold().mask(w, None, None)
    expected = np.abs(w) > np.abs(w).mean(axis=-1, keepdims=True)
    assert np.array_equal(keep, expected)


@pytest.mark.parametrize(
    "rule", [AbsoluteThreshold(0.3), MaxRateThreshold(0.4), RowMeanThreshold(1.2)]
)
def test_threshold_rules_are_idempotent_on_pruned_weights(rule):
    rng = np.random.default_rng(4)
    w = rng.normal(size=(6, 7))
    w1, m1 = prune_with_rules([w], [np.ones(w.shape, bool)], [rule], None)
    w2, m2 = prune_with_rules(w1, m1, [rule], None)
    assert np.array_equal(m1[0], m2[0]) and np.array_equal(w1[0], w2[0])


def test_layer_magnitude_delegates_to_magnitude_mask():
    rng = np.random.default_rng(5)
    w = rng.normal(size=(5, 4))
    cur = rng.random((5, 4)) > 0.2
    assert np.array_equal(LayerMagnitude().mask(w, cur, 0.5), magnitude_mask(w, 0.5, current=cur))
    assert np.array_equal(LayerMagnitude().mask(w, None, 0.25), magnitude_mask(w, 0.25))
    with pytest.raises(ValueError, match="target sparsity"):
        LayerMagnitude().mask(w, cur, None)


# --------------------------------------------------------------------------- MByN


def _groups_along_inputs(keep: np.ndarray, n: int):
    """Yield every group of n consecutive inputs (axis -2) for each output (and kernel position)."""
    fibers = np.moveaxis(keep, -2, -1).reshape(-1, keep.shape[-2])
    for fiber in fibers:
        for g in range(0, fiber.size, n):
            yield fiber[g:g + n]


def test_m_by_n_dense_8x3_layout():
    # column j holds inputs 0..7; groups are rows 0-3 and 4-7 of each column
    w = np.array(
        [
            [0.1, 9.0, -5.0],
            [0.9, 8.0, 1.0],
            [-0.8, 1.0, 2.0],
            [0.2, 2.0, -6.0],
            [3.0, 0.5, 0.1],
            [0.0, 0.4, 0.2],
            [4.0, 0.3, 0.3],
            [-5.0, 0.6, 0.4],
        ]
    )
    keep = MByN(2, 4).mask(w, None, None)
    assert keep.T.tolist() == [
        [F, T, T, F, F, F, T, T],
        [T, T, F, F, T, F, F, T],
        [T, F, F, T, F, F, T, T],
    ]
    assert all(int(g.sum()) == 2 for g in _groups_along_inputs(keep, 4))
    # it is NOT grouped along the output axis: rows need not keep 2 of 3 / any fixed count
    assert keep.sum(axis=1).tolist() != [2] * 8


def test_m_by_n_conv_3x3x8x4_groups_along_input_channels():
    rng = np.random.default_rng(6)
    w = rng.normal(size=(3, 3, 8, 4))
    keep = MByN(2, 4).mask(w, None, None)
    assert keep.shape == w.shape and int(keep.sum()) == w.size // 2
    for y in range(3):
        for x in range(3):
            for j in range(4):
                for g in (0, 4):
                    block = np.abs(w[y, x, g:g + 4, j])
                    kept = keep[y, x, g:g + 4, j]
                    assert int(kept.sum()) == 2
                    assert block[kept].min() > block[~kept].max()


@pytest.mark.parametrize("m,n", [(1, 4), (3, 4), (4, 8), (1, 2)])
def test_m_by_n_keeps_exactly_m_per_full_group(m, n):
    rng = np.random.default_rng(m * 10 + n)
    w = rng.normal(size=(16, 5))
    keep = MByN(m, n).mask(w, None, None)
    assert all(int(g.sum()) == m for g in _groups_along_inputs(keep, n))


@pytest.mark.parametrize("length,tail_keep", [(9, 1), (10, 1), (11, 2), (12, 2)])
def test_m_by_n_tail_group_keeps_ceil_m_over_n_of_its_length(length, tail_keep):
    w = np.arange(1.0, length * 2 + 1).reshape(length, 2)
    keep = MByN(2, 4).mask(w, None, None)
    for col in keep.T:
        assert [int(col[g:g + 4].sum()) for g in range(0, length, 4)][:-1] == [2] * (
            (length - 1) // 4
        )
        assert int(col[(length - 1) // 4 * 4:].sum()) == tail_keep
    # MByN(3, 4), tail of 1 input: ceil(3/4 * 1) = 1
    assert MByN(3, 4).mask(np.ones((5, 1)), None, None)[4:].sum() == 1


def test_m_by_n_respects_current_mask_and_ties_prune_earlier_first():
    w = np.array([[9.0], [8.0], [0.0], [1.0], [5.0], [5.0], [5.0], [5.0]])
    cur = np.array([[F], [F], [T], [T], [T], [T], [T], [T]])
    keep = MByN(2, 4).mask(w, cur, None)
    # group 1: 9 and 8 pruned already -> the two kept (incl. an exact 0.0) stay; group 2: ties
    assert keep.ravel().tolist() == [F, F, T, T, F, F, T, T]
    cur2 = np.array([[F], [F], [F], [T], [T], [T], [T], [T]])
    assert MByN(2, 4).mask(w, cur2, None).ravel().tolist() == [F, F, F, T, F, F, T, T]


def test_m_by_n_1d_groups_along_the_only_axis():
    w = np.array([1.0, 4.0, 3.0, 2.0, 8.0, 7.0])
    assert MByN(2, 4).mask(w, None, None).tolist() == [F, T, T, F, T, F]


# --------------------------------------------------------------------------- invariants

ALL_RULES = [
    AbsoluteThreshold(0.5),
    MaxRateThreshold(0.3),
    RowMeanThreshold(),
    RowMeanThreshold(0.7),
    LayerMagnitude(),
    MByN(2, 4),
    MByN(1, 3),
]


@pytest.mark.parametrize("rule", ALL_RULES, ids=lambda r: repr(r))
@pytest.mark.parametrize("shape", [(7,), (8, 3), (10, 5), (3, 3, 8, 4), (2, 3, 5)])
def test_rules_never_revive_and_pruned_weights_are_zero(rule, shape):
    rng = np.random.default_rng(hash(shape) % 2**32)
    w = rng.normal(size=shape).astype(np.float32)
    cur = rng.random(shape) > 0.3
    w_in = np.where(cur, w, 7.0).astype(np.float32)  # pruned positions hold big junk: ignored
    keep = rule.mask(w_in.copy(), cur.copy(), 0.6)
    assert keep.shape == w.shape and keep.dtype == bool
    assert not (keep & ~cur).any(), "a pruned position came back"
    assert np.array_equal(keep, rule.mask(w_in, cur, 0.6)), "not deterministic"
    new_w, new_m = prune_with_rules([w_in], [cur], [rule], 0.6)
    assert np.array_equal(new_m[0], keep)
    assert np.all(new_w[0][~keep] == 0.0) and new_w[0].dtype == np.float32
    assert np.array_equal(new_w[0][keep], w_in[keep])


def test_prune_with_rules_none_rules_and_errors():
    k = np.array([[0.1, 2.0], [3.0, 0.2]])
    b = np.array([0.05, 0.01])
    k2 = np.array([1.0, 0.1, 0.2])
    m2 = np.array([T, T, F])
    new_w, new_m = prune_with_rules(
        [k, b, k2], [np.ones((2, 2), bool), None, m2], [AbsoluteThreshold(0.5), None, None], None
    )
    assert new_m[0].tolist() == [[F, T], [T, F]]
    assert new_m[1] is None and np.array_equal(new_w[1], b)
    assert new_m[2].tolist() == [T, T, F] and new_w[2].tolist() == [1.0, 0.1, 0.0]
    with pytest.raises(ValueError, match="not prunable"):
        prune_with_rules([b], [None], [AbsoluteThreshold(0.5)], None)
    with pytest.raises(ValueError, match="length"):
        prune_with_rules([k], [None, None], [None], None)

    class Reviver(AbsoluteThreshold):
        def mask(self, w, current, target_sparsity=None):
            return np.ones(np.shape(w), bool)

    _, m = prune_with_rules([k2], [m2], [Reviver(0.0)], None)
    assert m[0].tolist() == [T, T, F]


# --------------------------------------------------------------------------- global magnitude


def test_global_magnitude_prunes_exactly_round_s_total_and_prefers_small_layers():
    rng = np.random.default_rng(7)
    small = rng.normal(scale=0.01, size=(6, 5))  # 30
    large = rng.normal(scale=1.0, size=(4, 3))  # 12
    bias = np.ones(3)
    masks = [np.ones(small.shape, bool), None, np.ones(large.shape, bool)]
    for s in (0.0, 0.1, 0.25, 1 / 3, 0.5, 0.7, 0.99):
        new = global_magnitude_masks([small, bias, large], masks, s)
        assert new[1] is None
        assert int((~new[0]).sum() + (~new[2]).sum()) == round(s * 42)
    new = global_magnitude_masks([small, bias, large], masks, 0.5)
    assert (~new[0]).mean() > (~new[2]).mean()
    assert (~new[0]).sum() == 21 and new[2].all()  # 21 smallest are all in the small layer
    all_kept = np.concatenate([np.abs(small)[new[0]], np.abs(large)[new[2]]])
    all_pruned = np.abs(small)[~new[0]]
    assert all_kept.min() >= all_pruned.max()


def test_global_magnitude_respects_current_masks_and_ties():
    a = np.array([0.0, 5.0, 1.0, 1.0])
    b = np.array([[1.0, 9.0], [0.5, 1.0]])
    ma = np.array([T, F, T, T])  # 5.0 already pruned: stays pruned, not ranked
    mb = np.ones((2, 2), bool)
    new = global_magnitude_masks([a, b], [ma, mb], 0.5)  # 4 of 8 pruned: 3 more
    assert new[0].tolist() == [F, F, F, T]  # 0.0, then the first tied 1.0 (position order)
    assert new[1].tolist() == [[T, T], [F, T]]
    # already sparser than the target: unchanged
    again = global_magnitude_masks([a, b], new, 0.25)
    assert all(np.array_equal(x, y) for x, y in zip(again, new))
    # the inputs are not modified
    assert ma.tolist() == [T, F, T, T] and mb.all()


def test_a_layer_floor_keeps_a_layer_of_small_weights_from_being_emptied():
    rng = np.random.default_rng(3)
    tiny = rng.normal(scale=0.001, size=(40, 50))  # 2,000 weights, all smaller than any of `big`
    big = rng.normal(scale=1.0, size=(10, 20))  # 200
    masks = [np.ones(tiny.shape, bool), np.ones(big.shape, bool)]
    bare = global_magnitude_masks([tiny, big], masks, 0.95)  # keeps 110: all from `big`
    assert bare[0].sum() == 0 and bare[1].sum() == 110
    floored = global_magnitude_masks([tiny, big], masks, 0.95, layer_floor=0.5)
    # tiny's floor: half the overall density (110 / 2,200 = 5 %) of 2,000 = 50 kept; big keeps the other 60
    assert floored[0].sum() == 50 and floored[1].sum() == 60
    assert np.abs(tiny)[floored[0]].min() >= np.abs(tiny)[~floored[0]].max()  # its largest
    assert np.abs(big)[floored[1]].min() >= np.abs(big)[~floored[1]].max()
    # a floor the ranking already satisfies changes nothing
    assert all(np.array_equal(x, y) for x, y in
               zip(global_magnitude_masks([tiny, big], masks, 0.5, 0.5), global_magnitude_masks([tiny, big], masks, 0.5)))
    # a layer already sparser than its floor keeps what it has (pruned positions stay pruned)
    sparse_tiny = np.zeros(tiny.shape, bool)
    sparse_tiny[0, :10] = True
    again = global_magnitude_masks([tiny, big], [sparse_tiny, masks[1]], 0.95, layer_floor=1.0)
    assert again[0].sum() == 10 and again[1].sum() == 110 - 10 and not again[0][1:].any()
    with pytest.raises(ValueError, match="layer_floor"):
        global_magnitude_masks([tiny, big], masks, 0.9, layer_floor=1.5)


def test_prune_globally_zeroes_pruned_and_validates():
    w = [np.array([0.3, -0.1, 0.2], np.float32), np.array([0.05, 0.9], np.float32)]
    m = [np.ones(3, bool), np.ones(2, bool)]
    new_w, new_m = prune_globally(w, m, 0.4)
    assert new_m[0].tolist() == [T, F, T] and new_m[1].tolist() == [F, T]
    assert new_w[0].tolist() == pytest.approx([0.3, 0.0, 0.2]) and new_w[1][0] == 0.0
    assert new_w[0].dtype == np.float32
    assert global_magnitude_masks([np.ones(2)], [None], 0.5) == [None]
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match="sparsity"):
            global_magnitude_masks(w, m, bad)


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("rule", ALL_RULES, ids=lambda r: repr(r))
def test_rule_config_round_trip(rule):
    cfg = rule.get_config()
    assert json.loads(json.dumps(cfg)) == cfg
    assert rule_from_config(cfg) == rule


def test_rule_from_config_defaults():
    assert rule_from_config({"rule": "magnitude"}) == LayerMagnitude()
    assert rule_from_config({"rule": "row_mean"}) == RowMeanThreshold(1.0)
    assert rule_from_config({"rule": "m_by_n", "n": 8}) == MByN(2, 8)
    assert rule_from_config({"rule": "absolute", "threshold": 1}) == AbsoluteThreshold(1)


@pytest.mark.parametrize(
    "cfg,key",
    [
        ({}, "'rule'"),
        ({"threshold": 0.4}, "'rule'"),
        ({"rule": "magnitud"}, "'rule'"),
        ({"rule": 3}, "'rule'"),
        ({"rule": "absolute"}, "'threshold'"),
        ({"rule": "absolute", "theshold": 0.4}, "'theshold'"),
        ({"rule": "absolute", "threshold": 0.4, "rate": 0.1}, "'rate'"),
        ({"rule": "magnitude", "target_sparsity": 0.5}, "'target_sparsity'"),
        ({"rule": "max_rate"}, "'rate'"),
        ({"rule": "absolute", "threshold": -1.0}, "threshold"),
        ({"rule": "absolute", "threshold": "0.4"}, "threshold"),
        ({"rule": "absolute", "threshold": True}, "threshold"),
        ({"rule": "max_rate", "rate": 1.0}, "rate"),
        ({"rule": "row_mean", "scale": float("inf")}, "scale"),
        ({"rule": "m_by_n", "m": 4, "n": 4}, "m"),
        ({"rule": "m_by_n", "m": 0}, "m"),
        ({"rule": "m_by_n", "m": 2.0}, "m"),
        ({"rule": "m_by_n", "n": 1, "m": 1}, "n"),
    ],
)
def test_rule_from_config_errors_name_the_key(cfg, key):
    with pytest.raises(ValueError, match=key):
        rule_from_config(cfg)


def test_rule_from_config_rejects_non_mapping():
    with pytest.raises(ValueError, match="mapping"):
        rule_from_config([("rule", "absolute")])  # type: ignore[arg-type]


# --------------------------------------------------------------------------- AdaptiveSparsity


def _adaptive(**kw):
    base = dict(initial_sparsity=0.2, final_sparsity=0.5, step=0.1, tolerance=0.01,
                begin_round=2, end_round=20, frequency=1)
    return AdaptiveSparsity(**{**base, **kw})


def test_adaptive_rises_while_accuracy_holds_and_caps_at_final():
    s = _adaptive()
    s.observe(1, 0.90)
    assert s.decision(1) == Decision(False, 0.0, False)  # before begin_round
    got = []
    for r in range(2, 9):
        d = s.decision(r)
        got.append((d.prune, d.target))
        s.observe(r, 0.90 - 0.005 * (r % 2))  # wobbles within tolerance
    assert got == [(True, 0.2), (True, 0.3), (True, 0.4), (True, 0.5),
                   (False, 0.5), (False, 0.5), (False, 0.5)]
    assert s.sparsity == 0.5 and not s.wants_backoff()


def test_adaptive_backs_off_when_accuracy_drops_then_stays():
    s = _adaptive(frequency=2)  # turns: 2, 4, 6, ..., 20
    s.observe(1, 0.90)
    assert s(2) == (True, 0.2)
    s.observe(2, 0.91)
    assert s.decision(3) == Decision(False, 0.2)  # not a turn
    s.observe(3, 0.905)
    assert s.decision(4) == Decision(True, 0.3)
    s.observe(4, 0.89)  # below best (0.91) - 0.01
    assert s.wants_backoff()
    d = s.decision(5)  # the next call, turn or not
    assert d == Decision(prune=False, target=0.2, backoff=True)
    assert s.decision(5) is d  # same round: same decision, state not advanced twice
    assert s.sparsity == 0.2 and not s.wants_backoff()
    # a backoff is final: never rises again, even when accuracy recovers
    for r in range(6, 22):
        s.observe(r, 0.95)
        assert s.decision(r + 1) == Decision(False, 0.2)


def test_adaptive_holds_without_pruning_when_accuracy_is_low_and_nothing_to_undo():
    s = _adaptive(initial_sparsity=0.0)
    s.observe(1, 0.9)
    assert s.decision(2) == Decision(True, 0.0)  # first turn: initial; 0 -> 0 is no rise
    s.observe(2, 0.8)  # drop, but the last prune did not raise sparsity: nothing to undo
    assert not s.wants_backoff()
    assert s.decision(3) == Decision(False, 0.0)  # holds, does not prune
    s.observe(3, 0.895)  # back within tolerance
    assert s.decision(4) == Decision(True, 0.1)


def test_adaptive_backoff_of_the_first_prune_restores_the_unpruned_level():
    s = _adaptive(begin_round=1)
    s.observe(0, 0.9)
    assert s.decision(1) == Decision(True, 0.2)
    assert not s.wants_backoff()  # no observation since the prune yet, whatever came before
    s.observe(1, 0.5)
    assert s.decision(2) == Decision(False, 0.0, True)


def test_adaptive_needs_no_observations_to_ramp_and_has_no_float_drift():
    s = _adaptive(initial_sparsity=0.1, final_sparsity=0.8, step=0.1, begin_round=1,
                  end_round=5, frequency=2)
    seq = [s(r) for r in range(1, 9)]
    assert seq == [(True, 0.1), (False, 0.1), (True, 0.2), (False, 0.2), (True, 0.3),
                   (False, 0.3), (False, 0.3), (False, 0.3)]  # turns 1, 3, 5 (= end); 0.3 exact


def test_adaptive_round_order_is_enforced():
    s = _adaptive()
    s.decision(5)
    with pytest.raises(ValueError, match="round"):
        s.decision(4)
    s.observe(5, 0.9)
    with pytest.raises(ValueError, match="round"):
        s.observe(3, 0.9)
    with pytest.raises(ValueError, match="finite"):
        s.observe(6, float("nan"))


def test_adaptive_state_round_trips_through_json():
    s = _adaptive(frequency=2)
    s.observe(1, 0.9)
    s.decision(2)
    s.observe(2, 0.92)
    s.decision(4)
    s.observe(4, 0.85)
    snap = json.loads(json.dumps(s.state()))
    twin = schedule_from_config(s.get_config())
    assert twin == s and twin.state() != snap  # same config, fresh state
    twin.restore(snap)
    assert twin.state() == s.state()
    assert twin.decision(4) == s.decision(4)  # cached decision survives
    for r in range(5, 12):
        assert twin.decision(r) == s.decision(r)
        twin.observe(r, 0.9 + 0.001 * r)
        s.observe(r, 0.9 + 0.001 * r)
    assert twin.state() == s.state()
    with pytest.raises(ValueError, match="state keys"):
        twin.restore({"level": 1})


def test_adaptive_config_and_validation():
    s = _adaptive()
    cfg = s.get_config()
    assert cfg == {"schedule": "adaptive", "initial_sparsity": 0.2,
                   "final_sparsity": 0.5, "step": 0.1, "tolerance": 0.01, "begin_round": 2,
                   "end_round": 20, "frequency": 1}
    with pytest.raises(Exception):
        s.step = 0.2  # config is frozen
    for bad in (dict(step=0.0), dict(step=math.inf), dict(tolerance=-0.1),
                dict(initial_sparsity=0.6), dict(final_sparsity=1.0), dict(begin_round=0),
                dict(end_round=1), dict(frequency=0)):
        with pytest.raises(ValueError):
            _adaptive(**bad)
