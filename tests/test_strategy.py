"""Tests for fedprune.aggregator.strategies.fedavg.FedAvg: sample-weighted mean of deltas under a shared mask."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedprune.aggregator.strategies import ClientResult, FedAvg


def test_weighted_by_num_samples_exactly():
    g = [np.array([1.0, 2.0, 3.0, 4.0], np.float32), np.array([10.0], np.float32)]
    masks = [None, None]
    results = [
        ClientResult("a", 1, [np.array([4.0, 0.0, -8.0, 1.0], np.float32), np.array([2.0], np.float32)]),
        ClientResult("b", 3, [np.array([8.0, 4.0, 0.0, 1.0], np.float32), np.array([-2.0], np.float32)]),
    ]
    new = FedAvg().aggregate(g, results, masks)
    # 1/4 * a + 3/4 * b, every number exact in binary
    assert new[0].tolist() == [1 + 7.0, 2 + 3.0, 3 - 2.0, 4 + 1.0]
    assert new[1].tolist() == [10 - 1.0]
    assert all(w.dtype == np.float32 for w in new)
    # an unweighted mean would give different numbers: the sample count matters
    assert new[0][0] != 1 + (4.0 + 8.0) / 2


def test_single_result_adds_its_delta():
    g = [np.arange(6, dtype=np.float32).reshape(2, 3)]
    d = [np.full((2, 3), 0.5, np.float32)]
    new = FedAvg().aggregate(g, [ClientResult("x", 17, d)], [None])
    assert np.array_equal(new[0], g[0] + 0.5)


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), k=st.integers(1, 6))
def test_matches_float64_weighted_mean_and_masked_positions_stay_zero(seed, k):
    rng = np.random.default_rng(seed)
    mask = rng.random((5, 4)) > 0.5
    g = [np.where(mask, rng.normal(size=(5, 4)), 0.0).astype(np.float32),
         rng.normal(size=(4,)).astype(np.float32)]
    masks = [mask, None]
    results = []
    for i in range(k):
        # deltas are deliberately nonzero at pruned positions: FedAvg must still keep them zero
        results.append(ClientResult(f"d{i}", int(rng.integers(1, 500)),
                                    [rng.normal(size=(5, 4)).astype(np.float32),
                                     rng.normal(size=(4,)).astype(np.float32)]))
    new = FedAvg().aggregate(g, results, masks)
    total = sum(r.num_samples for r in results)
    for i, w in enumerate(g):
        expected = w.astype(np.float64) + sum(
            r.delta[i].astype(np.float64) * r.num_samples for r in results) / total
        if masks[i] is not None:
            expected = np.where(masks[i], expected, 0.0)
        np.testing.assert_allclose(new[i], expected.astype(np.float32), rtol=1e-6, atol=1e-6)
    assert np.all(new[0][~mask] == 0.0)
    assert np.array_equal(new[0] != 0, mask & (new[0] != 0))


def test_empty_results_and_zero_samples_raise():
    g = [np.zeros(3, np.float32)]
    with pytest.raises(ValueError, match="at least one"):
        FedAvg().aggregate(g, [], [None])
    with pytest.raises(ValueError, match="positive"):
        FedAvg().aggregate(g, [ClientResult("a", 0, [np.ones(3, np.float32)])], [None])
