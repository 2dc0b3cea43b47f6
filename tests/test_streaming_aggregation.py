"""Streaming aggregation (issue 17): FedAvg, DP-FedAvg, norm clipping around them and device-mask
averaging fold each update into running sums; the result equals the buffered ``aggregate`` to
float32 rounding and does not depend on the order the updates came in."""

from __future__ import annotations

import numpy as np
import pytest

from fedprune.aggregator.strategies import strategy_from_config
from fedprune.aggregator.strategies.base import ClientResult
from fedprune.aggregator.strategies.dp_fedavg import DPFedAvg
from fedprune.aggregator.strategies.running import ExactishSum

SHAPES = [(3, 3, 1, 8), (8,), (72, 10), (10,)]


def _masks(rng):
    return [rng.random(SHAPES[0]) > 0.5, None, rng.random(SHAPES[2]) > 0.8, None]


def _results(rng, n, masks, device_masks=False):
    out = []
    for i in range(n):
        delta = [(rng.normal(size=s) * 10.0 ** rng.integers(-4, 2)).astype(np.float32) for s in SHAPES]
        own = [None if m is None else rng.random(m.shape) > 0.3 for m in masks] if device_masks else None
        if not device_masks:
            delta = [d if m is None else d * m for d, m in zip(delta, masks)]
        out.append(ClientResult(f"dev-{i:03d}", int(rng.integers(1, 500)), delta, masks=own))
    return out


STREAMING = [
    {"strategy": "fedavg"},
    {"strategy": "norm_clipping", "clip_norm": 1.0, "inner": {"strategy": "fedavg"}},
    {"strategy": "device_mask_averaging"},
]


def _fold(strategy, weights, masks, results):
    running = strategy.running(weights, masks)
    for r in results:
        running.add(r)
    return running.result()


@pytest.mark.parametrize("config", STREAMING, ids=lambda c: c["strategy"])
def test_streamed_equals_buffered_to_float32_rounding_in_any_order(config):
    rng = np.random.default_rng(7)
    masks = _masks(rng)
    weights = [rng.normal(size=s).astype(np.float32) for s in SHAPES]
    device_masks = config["strategy"] == "device_mask_averaging"
    results = _results(rng, 60, masks, device_masks)
    strategy = strategy_from_config(config)
    buffered = strategy.aggregate(weights, results, masks)
    streamed = _fold(strategy, weights, masks, results)
    for b, s in zip(buffered, streamed):
        assert s.dtype == np.float32
        np.testing.assert_allclose(s, b, rtol=2 ** -22, atol=1e-30)  # a float32 rounding or two
    for seed in range(5):  # arrival order changes nothing, to the bit
        order = np.random.default_rng(seed).permutation(len(results))
        again = _fold(strategy, weights, masks, [results[i] for i in order])
        assert all(np.array_equal(a, s) for a, s in zip(again, streamed))
    if not device_masks:  # pruned positions stay exactly zero
        assert all(np.all(s[~m] == 0) for s, m in zip(streamed, masks) if m is not None)


def test_dp_fedavg_streamed_draws_the_same_noise_as_buffered():
    rng = np.random.default_rng(3)
    masks = _masks(rng)
    weights = [rng.normal(size=s).astype(np.float32) for s in SHAPES]
    results = _results(rng, 40, masks)
    make = lambda: DPFedAvg(clip_norm=0.5, noise_multiplier=1.1, sampled=50, rng=np.random.default_rng(11))  # noqa: E731
    buffered = make().aggregate(weights, results, masks)
    streamed = _fold(make(), weights, masks, results[::-1])
    for b, s in zip(buffered, streamed):
        np.testing.assert_allclose(s, b, rtol=2 ** -22, atol=1e-7)
    with pytest.raises(ValueError, match="divides by 50"):
        _fold(make(), weights, masks, _results(rng, 51, masks))


def test_running_sums_hold_no_update_and_refuse_an_empty_round():
    rng = np.random.default_rng(0)
    masks = _masks(rng)
    weights = [np.zeros(s, np.float32) for s in SHAPES]
    running = strategy_from_config({"strategy": "fedavg"}).running(weights, masks)
    with pytest.raises(ValueError, match="at least one update"):
        running.result()
    held = sum(a.nbytes for total in running.sums for a in (total.hi, total.lo))
    for r in _results(rng, 30, masks):
        running.add(r)
    assert sum(a.nbytes for total in running.sums for a in (total.hi, total.lo)) == held  # no growth


def test_the_exactish_sum_does_not_depend_on_the_order_where_plain_float64_does():
    rng = np.random.default_rng(1)
    values = (rng.normal(size=(2000, 50)) * 10.0 ** rng.integers(-8, 8, size=(2000, 1))).astype(np.float32)
    sums, plain = [], []
    for seed in range(4):
        order = np.random.default_rng(seed).permutation(len(values))
        total = ExactishSum((50,))
        for row in values[order]:
            total.add(row)
        sums.append(total.value())
        plain.append(np.cumsum(values[order].astype(np.float64), axis=0)[-1])
    assert all(np.array_equal(s, sums[0]) for s in sums)
    assert not all(np.array_equal(p, plain[0]) for p in plain)  # why the compensation is needed


@pytest.mark.parametrize("config", [{"strategy": "median"}, {"strategy": "krum", "byzantine": 1}],
                         ids=lambda c: c["strategy"])
def test_robust_strategies_keep_their_updates(config):
    assert strategy_from_config(config).running([np.zeros(2, np.float32)], [None]) is None
