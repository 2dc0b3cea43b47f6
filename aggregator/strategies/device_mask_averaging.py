"""Averaging of models the devices pruned themselves, each weight over the devices that kept it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

import numpy as np

from fedprune.aggregator.strategies.base import ClientResult, Strategy
from fedprune.aggregator.strategies.running import RunningAggregate, sums_for
from fedprune.pruning.masks import Masks


@dataclass(frozen=True)
class DeviceMaskAveraging(Strategy):
    """Averaging of device-pruned models, each weight over the devices that kept it.

    The averaging over the devices that kept a weight is Sub-FedAvg's: Vahidian, Morafah, Lin,
    "Personalized Federated Learning by Structured and Unstructured Pruning under Data
    Heterogeneity", ICDCS Workshops 2021. With device-side pruning each device prunes by magnitude
    during local training (as in the original method's code) and sends its WEIGHTS (not deltas)
    with its own masks. Averaging a weight over every device would shrink it towards zero wherever
    some devices pruned it; averaging over those that kept it (weighted by sample count) does not.
    Positions no device kept average to 0.

    The global weights and masks are not used: each update carries its own masks, and a position
    the global mask pruned comes back if devices kept it. The aggregator then sets the global mask
    afresh by magnitude of this average.
    """

    strategy_name: ClassVar[str] = "device_mask_averaging"
    sample_weighted: ClassVar[bool] = True

    def aggregate(
        self, global_weights: Sequence[np.ndarray], results: Sequence[ClientResult], masks: Masks
    ) -> list[np.ndarray]:
        self._require_results(results)
        if any(r.masks is None for r in results):
            raise ValueError("DeviceMaskAveraging needs results that carry their masks "
                             "(device-side pruning: pruning.mask_owner = 'device')")
        out = []
        for i in range(len(results[0].delta)):
            num = np.zeros(results[0].delta[i].shape, np.float64)
            den = np.zeros_like(num)
            for r in results:
                keep = np.ones(num.shape, bool) if r.masks[i] is None else r.masks[i]
                # In double precision from the product on (a float32 product would round each term).
                num += np.where(keep, r.delta[i].astype(np.float64), 0.0) * r.num_samples
                den += keep * float(r.num_samples)
            out.append(np.divide(num, den, out=np.zeros_like(num), where=den > 0).astype(np.float32))
        return out

    def running(self, global_weights: Sequence[np.ndarray], masks: Masks) -> RunningAggregate:
        return RunningDeviceMaskAveraging([np.shape(w) for w in global_weights])


class RunningDeviceMaskAveraging(RunningAggregate):
    """Device-mask averaging streamed: per weight, the sample-weighted sum over the devices that
    kept it and their total sample count (exact integers), divided at the end."""

    def __init__(self, shapes: Sequence[tuple[int, ...]]) -> None:
        super().__init__()
        self.sums = sums_for(shapes)
        self.counts = [np.zeros(s, np.int64) for s in shapes]

    def add(self, result: ClientResult) -> None:
        if result.masks is None:
            raise ValueError("DeviceMaskAveraging needs results that carry their masks "
                             "(device-side pruning: pruning.mask_owner = 'device')")
        for total, count, tensor, mask in zip(self.sums, self.counts, result.delta, result.masks, strict=True):
            keep = np.ones(count.shape, bool) if mask is None else np.asarray(mask, bool)
            total.add(np.where(keep, np.asarray(tensor, np.float64) * result.num_samples, 0.0))
            count += keep * int(result.num_samples)
        self.count += 1

    def merge(self, other: RunningAggregate) -> None:
        self._merge_sums(other)
        for count, part_count in zip(self.counts, other.counts, strict=True):
            count += part_count  # in place: the arrays in self.counts

    def result(self) -> list[np.ndarray]:
        self._require()
        return [np.divide(total.value(), count, out=np.zeros(count.shape), where=count > 0).astype(np.float32)
                for total, count in zip(self.sums, self.counts)]


def mask_agreement(results: Sequence[ClientResult]) -> float:
    """Mean pairwise Jaccard index of the devices' kept sets over all masked positions (1 = identical)."""
    masked = [i for i, m in enumerate(results[0].masks or []) if m is not None] if results else []
    if len(results) < 2 or not masked:
        return 1.0
    kept = [np.concatenate([r.masks[i].ravel() for i in masked]) for r in results]
    scores = []
    for a in range(len(kept)):
        for b in range(a + 1, len(kept)):
            union = np.logical_or(kept[a], kept[b]).sum()
            scores.append(1.0 if union == 0 else np.logical_and(kept[a], kept[b]).sum() / union)
    return float(np.mean(scores))
