"""FedAvg: the sample-weighted mean of the deltas."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

import numpy as np

from fedprune.aggregator.strategies.base import ClientResult, Strategy
from fedprune.aggregator.strategies.running import RunningAggregate, sums_for
from fedprune.pruning.masks import Masks, apply_masks


@dataclass(frozen=True)
class FedAvg(Strategy):
    """Federated Averaging over the unpruned positions.

    McMahan, Moore, Ramage, Hampson, Agüera y Arcas, "Communication-Efficient Learning of Deep
    Networks from Decentralized Data", AISTATS 2017. The new global model is the old one plus the
    sample-weighted mean of the devices' deltas; every device trained under the same mask, so the
    pruned positions stay exactly zero.
    """

    strategy_name: ClassVar[str] = "fedavg"
    sample_weighted: ClassVar[bool] = True

    def aggregate(
        self, global_weights: Sequence[np.ndarray], results: Sequence[ClientResult], masks: Masks
    ) -> list[np.ndarray]:
        self._require_results(results)
        total = float(sum(r.num_samples for r in results))
        if total <= 0:
            raise ValueError("FedAvg needs a positive total sample count")
        new = []
        for i, w in enumerate(global_weights):
            mean_delta = sum(r.delta[i].astype(np.float64) * (r.num_samples / total) for r in results)
            new.append((w.astype(np.float64) + mean_delta).astype(np.float32))
        return apply_masks(new, masks)

    def running(self, global_weights: Sequence[np.ndarray], masks: Masks) -> RunningAggregate:
        return RunningFedAvg(global_weights, masks)


class RunningFedAvg(RunningAggregate):
    """FedAvg streamed: the sum of ``num_samples * delta`` (exact products in float64) and of the
    sample counts, divided at the end."""

    def __init__(self, global_weights: Sequence[np.ndarray], masks: Masks) -> None:
        super().__init__()
        self.global_weights, self.masks = global_weights, masks
        self.sums = sums_for([np.shape(w) for w in global_weights])
        self.samples = 0

    def add(self, result: ClientResult) -> None:
        for total, delta in zip(self.sums, result.delta, strict=True):
            total.add(delta, scale=result.num_samples)
        self.samples += int(result.num_samples)
        self.count += 1

    def merge(self, other: RunningAggregate) -> None:
        self._merge_sums(other)
        self.samples += other.samples

    def result(self) -> list[np.ndarray]:
        self._require()
        if self.samples <= 0:
            raise ValueError("FedAvg needs a positive total sample count")
        new = [(np.asarray(w, np.float64) + total.value() / self.samples).astype(np.float32)
               for w, total in zip(self.global_weights, self.sums)]
        return apply_masks(new, self.masks)
