"""What every registered aggregation strategy promises (fedprune.aggregator.strategies.base.Strategy):
its config round-trips, pruned positions stay exactly zero, it weights by sample count exactly
when it says so, it is deterministic, and it refuses what it cannot handle with a message.

A new strategy needs an example config in ``EXAMPLES`` (the first test fails until it has one).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from federation_helpers import small_task
from fedprune.aggregator.strategies import (
    STRATEGIES,
    ClientResult,
    DPFedAvg,
    Strategy,
    strategy_config,
    strategy_for_task,
    strategy_from_config,
)

N = 7  # updates per round in these tests: enough for Krum with byzantine = 1 (needs 5)
EXAMPLES = [
    {"strategy": "fedavg"},
    {"strategy": "median"},
    {"strategy": "trimmed_mean", "trim_fraction": 0.2},
    {"strategy": "krum", "byzantine": 1},
    {"strategy": "multi_krum", "byzantine": 1, "keep": 3},
    {"strategy": "multi_krum", "byzantine": 2, "keep": None},
    {"strategy": "norm_clipping", "clip_norm": 10.0, "inner": {"strategy": "fedavg"}},
    {"strategy": "norm_clipping", "clip_norm": 0.5, "inner": {"strategy": "krum", "byzantine": 1}},
    {"strategy": "dp_fedavg", "clip_norm": 10.0, "noise_multiplier": 0.5, "sampled": N},
    {"strategy": "device_mask_averaging"},
]
MASK = np.random.default_rng(42).random((4, 5)) > 0.4
MASKS = [MASK, None]
GLOBAL = [np.where(MASK, 1.0, 0.0).astype(np.float32), np.arange(3, dtype=np.float32)]


def _build(config: dict) -> Strategy:
    """The strategy of ``config``; a noising one with a seeded generator, so that it repeats."""
    strategy = strategy_from_config(config)
    if isinstance(strategy, DPFedAvg):
        strategy = dataclasses.replace(strategy, rng=np.random.default_rng(0))
    return strategy


def _results(counts: list[int], seed: int = 1, masks=MASKS) -> list[ClientResult]:
    """Small updates (their norms stay under the examples' clip norms of 10), nonzero at pruned
    positions too, each carrying ``masks`` as its own (what device-side pruning needs)."""
    rng = np.random.default_rng(seed)
    return [ClientResult(f"d{i}", n, [(0.1 * rng.normal(size=(4, 5))).astype(np.float32),
                                      (0.1 * rng.normal(size=3)).astype(np.float32)], masks=list(masks))
            for i, n in enumerate(counts)]


def _ids(config: dict) -> str:
    return json.dumps(config, sort_keys=True)


def test_every_registered_strategy_has_an_example():
    assert {c["strategy"] for c in EXAMPLES} == set(STRATEGIES)


@pytest.mark.parametrize("config", EXAMPLES, ids=_ids)
def test_config_round_trips_and_the_rebuilt_strategy_behaves_the_same(config):
    strategy = _build(config)
    cfg = strategy.get_config()
    assert json.loads(json.dumps(cfg)) == cfg == config
    assert strategy_from_config(cfg) == strategy
    results = _results([10] * N)
    for a, b in zip(strategy.aggregate(GLOBAL, results, MASKS), _build(cfg).aggregate(GLOBAL, results, MASKS)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("config", EXAMPLES, ids=_ids)
def test_pruned_positions_are_exactly_zero_and_the_result_is_float32(config):
    new = _build(config).aggregate(GLOBAL, _results([5, 10, 20, 40, 80, 160, 320]), MASKS)
    assert [w.shape for w in new] == [w.shape for w in GLOBAL] and all(w.dtype == np.float32 for w in new)
    assert np.all(new[0][~MASK] == 0.0)


@pytest.mark.parametrize("config", EXAMPLES, ids=_ids)
def test_sample_counts_weigh_exactly_when_the_strategy_says_so(config):
    strategy = _build(config)
    counts = [1, 2, 3, 50, 5, 6, 400]
    zeros = [np.zeros_like(w) for w in GLOBAL]  # deltas and device weights alike: the mean itself
    weighted = strategy.aggregate(zeros, _results(counts, masks=[None, None]), [None, None])
    if strategy.sample_weighted:
        results = _results(counts)
        for i, w in enumerate(weighted):
            expected = sum(r.delta[i].astype(np.float64) * r.num_samples for r in results) / sum(counts)
            unweighted = np.mean([r.delta[i] for r in results], axis=0)
            np.testing.assert_allclose(w, expected, rtol=1e-5, atol=1e-7)
            assert not np.allclose(w, unweighted, rtol=1e-3)
    else:  # the claimed counts change nothing (a hostile device could inflate its claim)
        same = _build(config).aggregate(zeros, _results([1] * N, masks=[None, None]), [None, None])
        for a, b in zip(weighted, same):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("config", EXAMPLES, ids=_ids)
def test_the_same_inputs_give_the_same_arrays(config):
    results = _results([3, 1, 4, 1, 5, 9, 2])
    first = _build(config).aggregate(GLOBAL, results, MASKS)
    second = _build(config).aggregate(GLOBAL, results, MASKS)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("config", EXAMPLES, ids=_ids)
def test_refuses_what_it_cannot_handle_naming_the_problem(config):
    strategy = _build(config)
    with pytest.raises(ValueError, match="needs at least one update"):
        strategy.aggregate(GLOBAL, [], MASKS)
    need = strategy.min_results()
    if need > 1:
        with pytest.raises(ValueError, match=f"needs at least {need} updates"):
            strategy.aggregate(GLOBAL, _results([1] * (need - 1)), MASKS)


def test_device_mask_averaging_refuses_updates_without_masks():
    strategy = strategy_from_config({"strategy": "device_mask_averaging"})
    no_masks = [dataclasses.replace(r, masks=None) for r in _results([1, 2])]
    with pytest.raises(ValueError, match="carry their masks"):
        strategy.aggregate(GLOBAL, no_masks, MASKS)


@pytest.mark.parametrize("config,key", [
    ({}, "'strategy'"),
    ({"strategy": "mean"}, "'strategy'"),
    ({"strategy": "fedavg", "clip_norm": 1.0}, "'clip_norm'"),
    ({"strategy": "trimmed_mean"}, "'trim_fraction'"),
    ({"strategy": "trimmed_mean", "trim_fraction": 0.5}, "trim_fraction"),
    ({"strategy": "trimmed_mean", "trim_fraction": "0.1"}, "trim_fraction"),
    ({"strategy": "krum", "byzantine": 1, "keep": 2}, "'keep'"),
    ({"strategy": "multi_krum", "byzantine": 1.5}, "byzantine"),
    ({"strategy": "norm_clipping", "clip_norm": 1.0}, "'inner'"),
    ({"strategy": "norm_clipping", "clip_norm": 1.0, "inner": {"strategy": "median", "f": 1}}, "inner: .*'f'"),
    ({"strategy": "dp_fedavg", "clip_norm": 1.0, "noise_multiplier": 1.0, "sampled": 5, "rng": 3}, "'rng'"),
    ({"strategy": "dp_fedavg", "clip_norm": 1.0, "noise_multiplier": -1.0, "sampled": 5}, "noise_multiplier"),
])
def test_bad_configs_are_refused_naming_the_key(config, key):
    with pytest.raises(ValueError, match=key):
        strategy_from_config(config)


@pytest.mark.parametrize("sections, expected", [
    ({}, {"strategy": "fedavg"}),
    ({"aggregation": {"method": "trimmed_mean", "trim_fraction": 0.4}},
     {"strategy": "trimmed_mean", "trim_fraction": 0.4}),
    ({"federation": {"devices_per_round": 10, "min_devices": 7},
      "aggregation": {"method": "multi_krum", "byzantine": 2, "clip_norm": 3.0}},
     {"strategy": "norm_clipping", "clip_norm": 3.0, "inner": {"strategy": "multi_krum", "byzantine": 2, "keep": None}}),
    ({"privacy": {"noise_multiplier": 1.1, "clip_norm": 0.5}},
     {"strategy": "dp_fedavg", "clip_norm": 0.5, "noise_multiplier": 1.1, "sampled": 3}),
    ({"pruning": {"mask_owner": "device"}}, {"strategy": "device_mask_averaging"}),
])
def test_the_task_names_its_strategy_by_config(sections, expected):
    task = small_task(**sections)
    assert strategy_config(task) == expected
    assert strategy_for_task(task).get_config() == expected


def test_fedavg_and_device_mask_averaging_compute_what_the_protocol_document_says():
    """docs/protocol.md, section 16: the arithmetic, bit for bit."""
    rng = np.random.default_rng(3)
    old = [rng.normal(size=(4, 5)).astype(np.float32), rng.normal(size=(5,)).astype(np.float32)]
    masks = [MASK, None]
    counts = [3, 7, 11]
    deltas = [[rng.normal(size=w.shape).astype(np.float32) * (MASK if w.ndim == 2 else 1) for w in old]
              for _ in counts]
    results = [ClientResult(f"d{i}", n, d) for i, (n, d) in enumerate(zip(counts, deltas))]
    total = float(sum(counts))
    fedavg = strategy_from_config({"strategy": "fedavg"}).aggregate(old, results, masks)
    for t, w in enumerate(old):
        mean = sum(d[t].astype(np.float64) * (n / total) for n, d in zip(counts, deltas))
        expected = (w.astype(np.float64) + mean).astype(np.float32) * (MASK if t == 0 else 1)
        np.testing.assert_array_equal(fedavg[t], expected)

    own = [[rng.random((4, 5)) > 0.5, None] for _ in counts]
    weights = [[rng.normal(size=w.shape).astype(np.float32) * (m if m is not None else 1) for w, m in zip(old, mk)]
               for mk in own]
    results = [ClientResult(f"d{i}", n, w, masks=mk) for i, (n, w, mk) in enumerate(zip(counts, weights, own))]
    averaged = strategy_from_config({"strategy": "device_mask_averaging"}).aggregate(old, results, masks)
    for t in range(len(old)):
        keep = [np.ones(old[t].shape, bool) if mk[t] is None else mk[t] for mk in own]
        num = sum(np.where(k, w[t].astype(np.float64), 0.0) * n for k, w, n in zip(keep, weights, counts))
        den = sum(k * float(n) for k, n in zip(keep, counts))
        expected = np.divide(num, den, out=np.zeros_like(num), where=den > 0).astype(np.float32)
        np.testing.assert_array_equal(averaged[t], expected)
