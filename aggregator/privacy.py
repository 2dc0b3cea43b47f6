"""DP-FedAvg: differentially private federated averaging, and its privacy accountant.

See docs/robustness.md for what is clipped where, what the reported epsilon means, and its limits.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from fedprune.aggregator.robust import add_at_kept, clip_results, kept_deltas
from fedprune.aggregator.strategy import ClientResult
from fedprune.pruning.masks import Masks

log = logging.getLogger(__name__)

ACCOUNTANT_DESCRIPTION = ("RDP (dp_accounting), k of N online devices sampled without replacement, "
                          "replace-one neighbouring devices (sensitivity 2C)")


class DPFedAvg:
    """DP-FedAvg with a fixed denominator.

    McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent Language Models",
    ICLR 2018. Each update is clipped to L2 norm ``clip_norm`` (C), the clipped updates are summed
    unweighted (a sample count would let one device's weight, hence the sensitivity, grow),
    Gaussian noise of standard deviation ``noise_multiplier * C`` is added at every kept position,
    and the sum is divided by ``sampled``, the number of devices drawn per round. Pruned positions
    get no noise and stay exactly zero: the mask is public (every device receives it).
    """

    def __init__(self, clip_norm: float, noise_multiplier: float, sampled: int,
                 rng: np.random.Generator | None = None) -> None:
        if not clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
        if noise_multiplier < 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
        if sampled < 1:
            raise ValueError(f"sampled must be >= 1, got {sampled}")
        self.clip_norm = clip_norm
        self.noise_multiplier = noise_multiplier
        self.sampled = sampled
        # Fresh OS entropy by default: noise drawn from a known seed could be subtracted again.
        self.rng = rng or np.random.default_rng()

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise on the averaged delta, per kept position."""
        return self.noise_multiplier * self.clip_norm / self.sampled

    def aggregate(
        self, global_weights: Sequence[np.ndarray], results: Sequence[ClientResult], masks: Masks
    ) -> list[np.ndarray]:
        if not results:
            raise ValueError("DPFedAvg needs at least one update")
        if len(results) > self.sampled:
            raise ValueError(f"DPFedAvg got {len(results)} updates but divides by {self.sampled} sampled devices")
        clipped = clip_results(results, self.clip_norm, masks)
        out = []
        for i, (w, m) in enumerate(zip(global_weights, masks, strict=True)):
            total = kept_deltas(clipped, i, m).sum(axis=0, dtype=np.float64)
            total += self.rng.normal(0.0, self.noise_multiplier * self.clip_norm, size=total.shape)
            out.append(add_at_kept(w, m, total / self.sampled))
        return out


@dataclass(frozen=True)
class ReleasedRound:
    """One aggregated model released: ``sampled`` devices drawn from ``population`` online."""

    population: int
    sampled: int


class PrivacyAccountant:
    """Epsilon, for a given delta, of the DP-FedAvg models released so far.

    Each completed round releases one model: the Gaussian mechanism on the sum of k clipped
    updates, k devices drawn uniformly without replacement from the N online. Replacing one
    device's update by another's moves that sum by up to 2C, so the mechanism's noise multiplier
    relative to its sensitivity is z / 2. Composed over rounds with dp_accounting's RDP accountant
    for sampling without replacement (Wang, Balle, Kasiviswanathan, "Subsampled Rényi Differential
    Privacy and Analytical Moments Accountant", AISTATS 2019), then converted to (epsilon, delta).
    The same rounds are also composed without sampling (the plain Gaussian mechanism each round),
    which bounds the sampled mechanism too and is the tighter bound when most devices are drawn;
    ``epsilon`` is the smaller of the two. The unit is a device (all of its data), not one sample.
    """

    def __init__(self, noise_multiplier: float, delta: float) -> None:
        if not noise_multiplier > 0:
            raise ValueError(f"noise_multiplier must be > 0 for a finite epsilon, got {noise_multiplier}")
        if not 0.0 < delta < 1.0:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        self.noise_multiplier = noise_multiplier
        self.delta = delta
        self.rounds: list[ReleasedRound] = []
        self._sampled = self._new_accountant()
        self._unsampled = self._new_accountant()

    @staticmethod
    def _new_accountant():
        import dp_accounting
        from dp_accounting.rdp import RdpAccountant

        return RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)

    def record_round(self, population: int, sampled: int, rounds: int = 1) -> float:
        """Compose ``rounds`` released rounds of ``sampled`` of ``population`` devices; return
        epsilon after them. (One call costs about 0.3 s whatever ``rounds`` is: group rounds alike.)"""
        import dp_accounting

        if not 1 <= sampled <= population:
            raise ValueError(f"need 1 <= sampled <= population, got sampled {sampled} of {population}")
        if rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {rounds}")
        gaussian = dp_accounting.GaussianDpEvent(self.noise_multiplier / 2.0)
        self._sampled.compose(dp_accounting.SampledWithoutReplacementDpEvent(population, sampled, gaussian), rounds)
        self._unsampled.compose(gaussian, rounds)
        self.rounds.extend([ReleasedRound(population, sampled)] * rounds)
        return self.epsilon()

    def replay(self, released: Sequence[ReleasedRound]) -> float:
        """Compose rounds released earlier (on resume), alike rounds at once; return epsilon."""
        for (population, sampled), count in Counter((r.population, r.sampled) for r in released).items():
            self.record_round(population, sampled, count)
        return self.epsilon()

    def epsilon_without_sampling(self) -> float:
        """Epsilon of the same rounds for an observer who knows which devices were drawn (no
        amplification by sampling: each round is the plain Gaussian mechanism)."""
        return float(self._unsampled.get_epsilon(self.delta)) if self.rounds else 0.0

    def epsilon(self) -> float:
        """Epsilon so far at this accountant's delta (0.0 before any round)."""
        if not self.rounds:
            return 0.0
        return min(float(self._sampled.get_epsilon(self.delta)), self.epsilon_without_sampling())
