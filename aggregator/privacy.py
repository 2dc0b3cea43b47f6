"""The privacy accountant of DP-FedAvg (the strategy itself: ``strategies/dp_fedavg.py``).

See docs/robustness.md for what is clipped where, what the reported epsilon means, and its limits.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

log = logging.getLogger(__name__)

ACCOUNTANT_DESCRIPTION = ("RDP (dp_accounting), k of N online devices sampled without replacement, "
                          "replace-one neighbouring devices (sensitivity 2C)")


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
