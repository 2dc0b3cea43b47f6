"""Robust aggregation (fedprune.aggregator.strategies) on hand-made updates with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from fedprune.aggregator.strategies import (
    ClientResult,
    CoordinateMedian,
    FedAvg,
    Krum,
    MultiKrum,
    NormClipping,
    TrimmedMean,
    clip_results,
    kept_deltas,
    pairwise_sq_distances,
    strategy_for_task,
)
from federation_helpers import small_task
from fedprune.clipping import clip_to_norm, global_norm

MASK = np.array([[True, False], [True, True]])  # one pruned position, three kept


def _results(values: list[list[float]], samples: list[int] | None = None) -> list[ClientResult]:
    """One update per row: a masked 2x2 tensor (kept positions in row-major order get the first three
    values, the pruned one an arbitrary nonzero) and a dense length-1 tensor (the fourth value)."""
    out = []
    for i, v in enumerate(values):
        t = np.array([[v[0], 99.0], [v[1], v[2]]], np.float32)  # 99 at the pruned position: must vanish
        out.append(ClientResult(f"d{i}", (samples or [1] * len(values))[i], [t, np.array([v[3]], np.float32)]))
    return out


GLOBAL = [np.array([[1.0, 0.0], [2.0, 3.0]], np.float32), np.array([10.0], np.float32)]
MASKS = [MASK, None]


def _new_deltas(new: list[np.ndarray]) -> list[float]:
    return [float(new[0][0, 0] - 1), float(new[0][1, 0] - 2), float(new[0][1, 1] - 3), float(new[1][0] - 10)]


def test_kept_deltas_takes_only_the_kept_positions_as_float32():
    x = kept_deltas(_results([[1, 2, 3, 4], [5, 6, 7, 8]]), 0, MASK)
    assert x.dtype == np.float32 and x.tolist() == [[1, 2, 3], [5, 6, 7]]


def test_median_of_known_values_and_pruned_position_stays_zero():
    results = _results([[1, -5, 0, 2], [3, 100, 0, -7], [2, 1, -1e6, 4], [50, 2, 0.5, 1], [-40, 3, 0.25, 3]])
    new = CoordinateMedian().aggregate(GLOBAL, results, MASKS)
    # column medians: (-40,1,2,3,50)->2, (-5,1,2,3,100)->2, (-1e6,0,0,0.25,0.5)->0, (-7,1,2,3,4)->2
    assert _new_deltas(new) == [2.0, 2.0, 0.0, 2.0]
    assert new[0][0, 1] == 0.0
    assert all(w.dtype == np.float32 for w in new)


def test_median_of_an_even_count_is_the_mean_of_the_middle_two():
    new = CoordinateMedian().aggregate(GLOBAL, _results([[1, 0, 0, 0], [2, 0, 0, 0], [4, 0, 0, 0], [1000, 0, 0, 0]]), MASKS)
    assert _new_deltas(new)[0] == 3.0


def test_trimmed_mean_drops_the_extremes_at_each_position():
    rows = [[1, 10, 0, 0], [2, 20, 0, 0], [3, 30, 0, 0], [4, 40, 0, 0], [1e6, -1e6, 0, 0]]
    new = TrimmedMean(0.2).aggregate(GLOBAL, _results(rows), MASKS)  # drop 1 largest, 1 smallest per position
    # position 0: drop 1 and 1e6 -> mean(2,3,4) = 3; position 1: drop -1e6 and 40 -> mean(10,20,30) = 20
    assert _new_deltas(new)[:2] == [3.0, 20.0]
    assert new[0][0, 1] == 0.0
    # fraction 0 is the plain mean, which the outlier ruins
    assert _new_deltas(TrimmedMean(0.0).aggregate(GLOBAL, _results(rows), MASKS))[0] == pytest.approx(200002.0)


def test_trimmed_mean_rejects_a_fraction_that_trims_everything():
    with pytest.raises(ValueError, match="trim_fraction"):
        TrimmedMean(0.5)


def _cluster(rng, n_honest: int, n_hostile: int) -> list[list[float]]:
    honest = (np.array([1.0, 1.0, 1.0, 1.0]) + 0.1 * rng.normal(size=(n_honest, 4))).tolist()
    hostile = (np.array([-10.0, -10.0, -10.0, -10.0]) + 0.1 * rng.normal(size=(n_hostile, 4))).tolist()
    return honest + hostile


def test_pairwise_distances_match_a_direct_computation_over_kept_positions():
    rng = np.random.default_rng(1)
    results = _results(rng.normal(size=(6, 4)).tolist())
    d = pairwise_sq_distances(results, MASKS)
    flat = np.array([np.concatenate([r.delta[0][MASK], r.delta[1]]) for r in results], np.float64)
    expected = ((flat[:, None, :] - flat[None, :, :]) ** 2).sum(-1)
    np.testing.assert_allclose(d, expected, rtol=1e-5, atol=1e-6)  # the 99s at the pruned position do not count


def test_krum_picks_an_update_from_the_honest_cluster():
    results = _results(_cluster(np.random.default_rng(0), 7, 2))
    krum = Krum(byzantine=2)
    chosen = krum.select(results, MASKS)
    assert len(chosen) == 1 and chosen[0] < 7
    new = krum.aggregate(GLOBAL, results, MASKS)
    assert _new_deltas(new) == pytest.approx(results[chosen[0]].delta[0][MASK].tolist() + [results[chosen[0]].delta[1][0]])
    # the hostile ones score worst
    scores = krum.scores(results, MASKS)
    assert scores[7:].min() > scores[:7].max()


def test_multi_krum_averages_the_honest_cluster_only():
    results = _results(_cluster(np.random.default_rng(2), 7, 2))
    mk = MultiKrum(byzantine=2)  # keeps n - f = 7
    assert sorted(mk.select(results, MASKS)) == list(range(7))
    new = mk.aggregate(GLOBAL, results, MASKS)
    honest_mean = np.mean([[r.delta[0][0, 0], r.delta[0][1, 0], r.delta[0][1, 1], r.delta[1][0]] for r in results[:7]], axis=0)
    assert _new_deltas(new) == pytest.approx(honest_mean.tolist(), abs=1e-6)
    assert new[0][0, 1] == 0.0
    assert len(MultiKrum(byzantine=2, keep=3).select(results, MASKS)) == 3


def test_krum_refuses_too_few_updates_with_a_message_that_says_what_to_do():
    with pytest.raises(ValueError, match=r"needs at least 7 updates.*min_devices"):
        Krum(byzantine=2).aggregate(GLOBAL, _results([[0, 0, 0, 0]] * 6), MASKS)


def test_clip_to_norm_scales_down_to_the_norm_and_leaves_small_updates_alone():
    t = [np.array([3.0, 0.0], np.float32), np.array([[4.0]], np.float32)]  # norm 5
    clipped, norm = clip_to_norm(t, 1.0)
    assert norm == 5.0
    assert global_norm(clipped) == pytest.approx(1.0, rel=1e-6)
    assert clipped[0].tolist() == pytest.approx([0.6, 0.0]) and clipped[1].shape == (1, 1) and clipped[1][0, 0] == pytest.approx(0.8)
    same, _ = clip_to_norm(t, 5.0)
    assert same[0] is t[0] and same[1] is t[1]
    with pytest.raises(ValueError, match="clip_norm"):
        clip_to_norm(t, 0.0)


def test_norm_clipping_bounds_a_boosted_update_before_fedavg():
    # Honest updates of norm 2 along +x; one hostile update of norm 1000 along -x.
    results = _results([[1, 1, 1, 1]] * 4 + [[-500, -500, -500, -500]])
    plain = FedAvg().aggregate(GLOBAL, results, MASKS)
    clipped = NormClipping(FedAvg(), clip_norm=2.0).aggregate(GLOBAL, results, MASKS)
    assert _new_deltas(plain)[0] < -90  # the hostile update dominates a plain mean
    assert _new_deltas(clipped) == pytest.approx([0.6] * 4)  # (4 * 1 - 1) / 5 at every position
    assert [global_norm(r.delta) for r in clip_results(results, 2.0, MASKS)][-1] == pytest.approx(2.0, rel=1e-6)


def test_the_strategy_follows_the_task():
    def strategy(**aggregation):
        return strategy_for_task(small_task(federation={"devices_per_round": 10, "min_devices": 7},
                                        aggregation=aggregation))

    assert isinstance(strategy(), FedAvg)
    assert isinstance(strategy(method="median"), CoordinateMedian)
    assert strategy(method="trimmed_mean", trim_fraction=0.2).trim_fraction == 0.2
    assert type(strategy(method="krum", byzantine=2)) is Krum
    mk = strategy(method="multi_krum", byzantine=2, multi_krum_keep=4)
    assert (mk.byzantine, mk.keep) == (2, 4)
    wrapped = strategy(method="median", clip_norm=3.0)
    assert isinstance(wrapped, NormClipping) and isinstance(wrapped.inner, CoordinateMedian)


def test_many_large_updates_stay_in_float32_and_match_numpy():
    """120 devices x 40k kept values: works tensor by tensor on float32 matrices."""
    rng = np.random.default_rng(3)
    mask = rng.random((200, 400)) > 0.5
    g = [np.where(mask, rng.normal(size=mask.shape), 0).astype(np.float32)]
    results = [ClientResult(f"d{i}", 1, [np.where(mask, rng.normal(size=mask.shape), 0).astype(np.float32)])
               for i in range(120)]
    new = CoordinateMedian().aggregate(g, results, [mask])
    stack = np.stack([r.delta[0][mask] for r in results])
    np.testing.assert_allclose(new[0][mask], g[0][mask] + np.median(stack, axis=0), rtol=1e-5, atol=1e-6)
    assert np.all(new[0][~mask] == 0)
    trimmed = TrimmedMean(0.1).aggregate(g, results, [mask])
    s = np.sort(stack, axis=0)[12:108]
    np.testing.assert_allclose(trimmed[0][mask], g[0][mask] + s.mean(axis=0), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("federation, aggregation, key", [
    ({}, {"clip_norm": -1.0}, "aggregation.clip_norm"),
    ({}, {"trim_fraction": 0.5}, "aggregation.trim_fraction"),
    ({"devices_per_round": 4}, {"method": "trimmed_mean", "trim_fraction": 0.2}, "aggregation.trim_fraction"),
    ({"devices_per_round": 6, "min_devices": 6}, {"method": "krum", "byzantine": 2}, "federation.min_devices"),
    ({"devices_per_round": 9, "min_devices": 7}, {"method": "multi_krum", "byzantine": 2, "multi_krum_keep": 6},
     "aggregation.multi_krum_keep"),
    ({}, {"byzantine": -1}, "aggregation.byzantine"),
    ({}, {"krum_f": 1}, "aggregation.krum_f"),
])
def test_task_refuses_bad_aggregation_settings_naming_the_key(federation, aggregation, key):
    from fedprune.task import TaskError

    with pytest.raises(TaskError, match=key.replace(".", r"\.")):
        small_task(federation=federation, aggregation=aggregation)


def test_an_unregistered_strategy_is_refused_naming_the_key():
    from fedprune.aggregator.strategies import strategy_for_task
    from fedprune.task import TaskError

    with pytest.raises(TaskError, match=r"aggregation\.method 'mean' is not a registered strategy"):
        strategy_for_task(small_task(aggregation={"method": "mean"}))


def test_task_refuses_robust_aggregation_with_device_side_masks():
    from fedprune.task import TaskError

    with pytest.raises(TaskError, match="mask_owner"):
        small_task(pruning={"mask_owner": "device"}, aggregation={"method": "median"})
    small_task(federation={"devices_per_round": 7, "min_devices": 7}, aggregation={"method": "krum", "byzantine": 2})
