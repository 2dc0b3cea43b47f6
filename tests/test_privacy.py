"""DP-FedAvg (fedprune.aggregator.strategies.dp_fedavg) and its privacy accountant (fedprune.aggregator.privacy)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedprune.aggregator.privacy import PrivacyAccountant
from fedprune.aggregator.strategies import ClientResult, DPFedAvg


def _epsilon(z: float, rounds: int, population: int, sampled: int, delta: float = 1e-5) -> float:
    return PrivacyAccountant(z, delta).record_round(population, sampled, rounds)


def test_epsilon_grows_with_rounds_and_falls_with_more_noise_or_less_sampling():
    acc = PrivacyAccountant(1.0, 1e-5)
    assert acc.epsilon() == 0.0
    eps = [acc.record_round(100, 10), acc.record_round(100, 10, 4), acc.record_round(100, 10, 15)]
    assert eps[0] < eps[1] < eps[2] and len(acc.rounds) == 20
    assert _epsilon(2.0, 20, 100, 10) < eps[-1] < _epsilon(0.5, 20, 100, 10)
    assert _epsilon(1.0, 20, 1000, 10) < eps[-1]  # a smaller sampling rate amplifies privacy more
    assert _epsilon(1.0, 20, 100, 10, delta=1e-3) < eps[-1]


def test_replay_on_resume_gives_the_same_epsilon_as_round_by_round():
    live = PrivacyAccountant(1.0, 1e-5)
    for population in (12, 12, 11, 12):
        live.record_round(population, 5)
    resumed = PrivacyAccountant(1.0, 1e-5)
    assert resumed.replay(live.rounds) == pytest.approx(live.epsilon(), rel=1e-12)


def test_without_sampling_the_figure_is_that_of_every_round_drawing_all_it_could():
    acc = PrivacyAccountant(1.0, 1e-5)
    acc.record_round(100, 10, 5)
    assert acc.epsilon_without_sampling() == pytest.approx(_epsilon(1.0, 5, 10, 10), rel=1e-12)
    assert acc.epsilon_without_sampling() > 2 * acc.epsilon()


def test_when_most_devices_are_drawn_the_unsampled_bound_caps_epsilon():
    """Near q = 1 the subsampling bound is looser than no subsampling at all (3 of 4 drawn, 3
    rounds, z = 1: 20.1 against 19.6); both bound the mechanism, so the smaller one is reported."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    direct = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    direct.compose(dp_accounting.SampledWithoutReplacementDpEvent(4, 3, dp_accounting.GaussianDpEvent(0.5)), 3)
    acc = PrivacyAccountant(1.0, 1e-4)
    acc.record_round(4, 3, 3)
    assert acc.epsilon() == acc.epsilon_without_sampling() < direct.get_epsilon(1e-4)


def test_agrees_with_dp_accounting_for_a_known_config():
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    # 50 rounds, 10 of 200 devices, z = 1.2: each round's sum moves by 2C when a device is replaced.
    direct = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    direct.compose(dp_accounting.SampledWithoutReplacementDpEvent(200, 10, dp_accounting.GaussianDpEvent(0.6)), 50)
    assert _epsilon(1.2, 50, 200, 10) == pytest.approx(direct.get_epsilon(1e-5), rel=1e-9)


def _exact_gaussian_epsilon(mu: float, delta: float) -> float:
    """The tight epsilon of a Gaussian mechanism whose sensitivity is ``mu`` noise standard
    deviations (Balle and Wang, "Improving the Gaussian Mechanism for Differential Privacy", ICML
    2018, Theorem 8), by bisection on delta(epsilon)."""
    phi = lambda t: 0.5 * math.erfc(-t / math.sqrt(2))  # noqa: E731
    delta_of = lambda e: phi(mu / 2 - e / mu) - math.exp(e) * phi(-mu / 2 - e / mu)  # noqa: E731
    lo, hi = 0.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_of(mid) > delta else (lo, mid)
    return hi


def test_without_sampling_it_bounds_the_exact_gaussian_epsilon_closely():
    """Every online device in every round (q = 1): T rounds are one Gaussian mechanism with
    sensitivity 2C * sqrt(T) and noise z * C, whose exact epsilon is known in closed form. The
    RDP figure must be an upper bound, and not a loose one."""
    z, rounds = 4.0, 25
    exact = _exact_gaussian_epsilon(2.0 * math.sqrt(rounds) / z, 1e-5)
    rdp = _epsilon(z, rounds, 10, 10)
    assert exact < rdp < 1.25 * exact


def _updates(rng: np.random.Generator, n: int, mask: np.ndarray, scale: float) -> list[ClientResult]:
    return [ClientResult(f"d{i}", 1000 * (i + 1), [rng.normal(scale=scale, size=mask.shape).astype(np.float32)])
            for i in range(n)]


def test_without_noise_it_is_the_unweighted_sum_of_clipped_updates_over_the_sampled_count():
    rng = np.random.default_rng(0)
    mask = rng.random((30, 20)) > 0.7
    g = [np.where(mask, 1.0, 0.0).astype(np.float32)]
    results = _updates(rng, 4, mask, scale=1.0)  # norms about 13: all clipped to 0.5
    new = DPFedAvg(clip_norm=0.5, noise_multiplier=0.0, sampled=5).aggregate(g, results, [mask])
    expected = sum(np.where(mask, r.delta[0], 0) * (0.5 / np.linalg.norm(r.delta[0][mask])) for r in results) / 5
    np.testing.assert_allclose(new[0], np.where(mask, 1.0 + expected, 0.0), rtol=1e-5, atol=1e-6)
    assert np.all(new[0][~mask] == 0)


def test_noise_has_std_z_c_over_sampled_at_kept_positions_only():
    rng = np.random.default_rng(1)
    mask = rng.random((400, 250)) > 0.5
    g = [np.zeros(mask.shape, np.float32)]
    results = [ClientResult(f"d{i}", 1, [np.zeros(mask.shape, np.float32)]) for i in range(8)]
    dp = DPFedAvg(clip_norm=2.0, noise_multiplier=1.5, sampled=10, rng=np.random.default_rng(2))
    new = dp.aggregate(g, results, [mask])
    assert dp.noise_std == pytest.approx(0.3)
    assert np.std(new[0][mask]) == pytest.approx(0.3, rel=0.02)
    assert abs(np.mean(new[0][mask])) < 0.01
    assert np.all(new[0][~mask] == 0)


def test_refuses_more_updates_than_devices_sampled_and_bad_settings():
    mask = np.ones((2,), bool)
    with pytest.raises(ValueError, match="divides by 2 sampled"):
        DPFedAvg(1.0, 1.0, sampled=2).aggregate([np.zeros(2, np.float32)], _updates(np.random.default_rng(0), 3, mask, 1), [mask])
    with pytest.raises(ValueError, match="clip_norm"):
        DPFedAvg(0.0, 1.0, 2)
    with pytest.raises(ValueError, match="noise_multiplier"):
        PrivacyAccountant(0.0, 1e-5)
    with pytest.raises(ValueError, match="sampled"):
        PrivacyAccountant(1.0, 1e-5).record_round(5, 6)


@pytest.mark.parametrize("privacy, aggregation, key", [
    ({"noise_multiplier": -1.0}, {}, "privacy.noise_multiplier"),
    ({"noise_multiplier": 1.0, "clip_norm": 0.0}, {}, "privacy.clip_norm"),
    ({"noise_multiplier": 1.0, "delta": 1.0}, {}, "privacy.delta"),
    ({"noise_multiplier": 1.0}, {"method": "median"}, r"\[privacy\]"),
    ({"noise_multiplier": 1.0}, {"clip_norm": 2.0}, "aggregation.clip_norm"),
    ({"epsilon": 1.0}, {}, "privacy.epsilon"),
    ({"noise_multiplier": 1.0}, {}, "pruning.regrowth"),
])
def test_task_refuses_bad_privacy_settings_naming_the_key(privacy, aggregation, key):
    from federation_helpers import small_task
    from fedprune.task import TaskError

    pruning = {"regrowth": 0.1} if key == "pruning.regrowth" else {}
    with pytest.raises(TaskError, match=key):
        small_task(privacy=privacy, aggregation=aggregation, pruning=pruning)


def test_the_example_task_runs_dp_fedavg_with_device_clipping():
    from pathlib import Path

    from fedprune.aggregator.strategies import strategy_for_task
    from fedprune.task import load_task

    task = load_task(Path(__file__).resolve().parents[1] / "examples" / "private.toml")
    assert task.privacy.enabled and task.privacy.clip_on_device
    strategy = strategy_for_task(task)
    assert isinstance(strategy, DPFedAvg) and strategy.sampled == task.federation.devices_per_round
    assert strategy.noise_std == pytest.approx(task.privacy.noise_multiplier * task.privacy.clip_norm / 5)
