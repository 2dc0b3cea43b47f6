"""Regrowth: swap the weakest kept weights for the pruned ones with the largest reported gradient."""

from __future__ import annotations

import numpy as np
import pytest

from fedprune.pruning.regrowth import regrow


def test_regrow_swaps_smallest_kept_for_largest_gradient_and_keeps_sparsity():
    w = [np.array([0.9, 0.1, 0.0, 0.0, 0.5, 0.0], np.float32), np.ones(2, np.float32)]
    m = [np.array([True, True, False, False, True, False]), None]
    scores = [np.array([0, 0, 0.2, 3.0, 0, 0.0], np.float32), None]
    new_w, new_m, swapped = regrow(w, m, scores, fraction=0.34)  # round(0.34 * 3) = 1 swap
    assert swapped == 1
    np.testing.assert_array_equal(new_m[0], [True, False, False, True, True, False])  # 0.1 out, #3 in
    np.testing.assert_array_equal(new_w[0], np.array([0.9, 0, 0, 0, 0.5, 0], np.float32))  # revived: 0
    assert new_m[0].sum() == m[0].sum() and new_m[1] is None


def test_regrow_only_revives_positions_with_a_reported_gradient():
    w = [np.array([0.9, 0.1, 0.0, 0.0], np.float32)]
    m = [np.array([True, True, False, False])]
    _, new_m, swapped = regrow(w, m, [np.zeros(4, np.float32)], fraction=0.49)
    assert swapped == 0 and np.array_equal(new_m[0], m[0])
    with pytest.raises(ValueError):
        regrow(w, m, [np.zeros(4)], fraction=1.0)


def test_gradient_scores_sum_the_magnitudes_weighted_by_sample_count():
    from fedprune.pruning.regrowth import gradient_scores

    a = [np.array([1.0, -2.0], np.float32), np.zeros(3, np.float32)]
    b = [np.array([-3.0, 0.0], np.float32), np.ones(3, np.float32)]
    scores = gradient_scores([(a, 10), (None, 1000), (b, 1)])  # a device without gradients counts for nothing
    assert scores[0].tolist() == [13.0, 20.0] and scores[1].tolist() == [1.0, 1.0, 1.0]
    assert gradient_scores([(None, 5)]) is None and gradient_scores([]) is None
