"""DP-FedAvg: clipped updates, summed, noised, divided by the devices drawn.

Its privacy accountant is in ``fedprune.aggregator.privacy``; see docs/robustness.md for what is
clipped where, what the reported epsilon means, and its limits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Sequence

import logging

import numpy as np

from fedprune.aggregator.strategies.base import ClientResult, Strategy
from fedprune.aggregator.strategies.norm_clipping import clip_results
from fedprune.aggregator.strategies.running import RunningAggregate, sums_for
from fedprune.aggregator.strategies.sparse import add_at_kept, kept_deltas
from fedprune.clipping import clip_to_norm
from fedprune.configs import check_int, check_real
from fedprune.pruning.masks import Masks, apply_masks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DPFedAvg(Strategy):
    """DP-FedAvg with a fixed denominator.

    McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent Language Models",
    ICLR 2018. Each update is clipped to L2 norm ``clip_norm`` (C), the clipped updates are summed
    unweighted (a sample count would let one device's weight, hence the sensitivity, grow),
    Gaussian noise of standard deviation ``noise_multiplier * C`` is added at every kept position,
    and the sum is divided by ``sampled``, the number of devices drawn per round. Pruned positions
    get no noise and stay exactly zero: the mask is public (every device receives it).

    ``rng`` draws the noise; it is not part of the config. Left out, it is seeded from OS entropy:
    noise drawn from a known seed could be subtracted again.
    """

    strategy_name: ClassVar[str] = "dp_fedavg"
    clip_norm: float
    noise_multiplier: float
    sampled: int
    rng: np.random.Generator | None = field(default=None, compare=False, repr=False, metadata={"config": False})

    def __post_init__(self) -> None:
        if not check_real("clip_norm", self.clip_norm) > 0:
            raise ValueError(f"clip_norm must be > 0, got {self.clip_norm}")
        if check_real("noise_multiplier", self.noise_multiplier) < 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if check_int("sampled", self.sampled) < 1:
            raise ValueError(f"sampled must be >= 1, got {self.sampled}")
        if self.rng is None:
            object.__setattr__(self, "rng", np.random.default_rng())

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise on the averaged delta, per kept position."""
        return self.noise_multiplier * self.clip_norm / self.sampled

    def aggregate(
        self, global_weights: Sequence[np.ndarray], results: Sequence[ClientResult], masks: Masks
    ) -> list[np.ndarray]:
        self._require_results(results)
        if len(results) > self.sampled:
            raise ValueError(f"DPFedAvg got {len(results)} updates but divides by {self.sampled} sampled devices")
        clipped = clip_results(results, self.clip_norm, masks)
        out = []
        for i, (w, m) in enumerate(zip(global_weights, masks, strict=True)):
            total = kept_deltas(clipped, i, m).sum(axis=0, dtype=np.float64)
            total += self.rng.normal(0.0, self.noise_multiplier * self.clip_norm, size=total.shape)
            out.append(add_at_kept(w, m, total / self.sampled))
        return out

    def running(self, global_weights: Sequence[np.ndarray], masks: Masks) -> RunningAggregate:
        return RunningDPFedAvg(self, global_weights, masks)


class RunningDPFedAvg(RunningAggregate):
    """DP-FedAvg streamed: each update clipped as it comes and added (at the kept positions); the
    noise (drawn as ``aggregate`` draws it) and the division at the end."""

    def __init__(self, strategy: DPFedAvg, global_weights: Sequence[np.ndarray], masks: Masks) -> None:
        super().__init__()
        self.strategy, self.global_weights, self.masks = strategy, global_weights, masks
        self.keep = [None if m is None else np.asarray(m, bool).ravel() for m in masks]
        self.sums = sums_for([(np.size(w) if k is None else int(k.sum()),) for w, k in zip(global_weights, self.keep)])
        self.clipped = 0

    def add(self, result: ClientResult) -> None:
        delta, norm = clip_to_norm(apply_masks(result.delta, self.masks), self.strategy.clip_norm)
        self.clipped += norm > self.strategy.clip_norm
        for total, d, keep in zip(self.sums, delta, self.keep, strict=True):
            total.add(d.ravel() if keep is None else d.ravel()[keep])
        self.count += 1

    def merge(self, other: RunningAggregate) -> None:
        """The partial's clipped sums; the noise is drawn once, by the aggregate ``result`` runs on."""
        self._merge_sums(other)
        self.clipped += other.clipped

    def result(self) -> list[np.ndarray]:
        self._require()
        s = self.strategy
        if self.count > s.sampled:
            raise ValueError(f"DPFedAvg got {self.count} updates but divides by {s.sampled} sampled devices")
        if self.clipped:
            log.info("clipped %d of %d updates to norm %g", self.clipped, self.count, s.clip_norm)
        out = []
        for w, m, total in zip(self.global_weights, self.masks, self.sums):
            value = total.value()
            value += s.rng.normal(0.0, s.noise_multiplier * s.clip_norm, size=value.shape)
            out.append(add_at_kept(w, m, value / s.sampled))
        return out
