"""Aggregation strategies. One class per algorithm, as in Flower's ``flwr.server.strategy``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from fedprune.pruning.masks import Masks, apply_masks


@dataclass(frozen=True)
class ClientResult:
    device_id: str
    num_samples: int
    delta: list[np.ndarray]  # the update's tensors: deltas, or weights for DeviceMaskAveraging
    metrics: dict[str, float] = field(default_factory=dict)
    masks: list[np.ndarray | None] | None = None  # the device's own masks (device-side pruning)
    gradients: list[np.ndarray] | None = None  # regrowth: gradient at reported pruned positions


class FedAvg:
    """Federated Averaging over the unpruned positions.

    McMahan, Moore, Ramage, Hampson, Agüera y Arcas, "Communication-Efficient Learning of Deep
    Networks from Decentralized Data", AISTATS 2017. The new global model is the old one plus the
    sample-weighted mean of the devices' deltas; every device trained under the same mask, so the
    pruned positions stay exactly zero.
    """

    def aggregate(
        self, global_weights: Sequence[np.ndarray], results: Sequence[ClientResult], masks: Masks
    ) -> list[np.ndarray]:
        if not results:
            raise ValueError("FedAvg needs at least one result")
        total = float(sum(r.num_samples for r in results))
        if total <= 0:
            raise ValueError("FedAvg needs a positive total sample count")
        new = []
        for i, w in enumerate(global_weights):
            mean_delta = sum(r.delta[i].astype(np.float64) * (r.num_samples / total) for r in results)
            new.append((w.astype(np.float64) + mean_delta).astype(np.float32))
        return apply_masks(new, masks)


class DeviceMaskAveraging:
    """Averaging of device-pruned models, each weight over the devices that kept it.

    With device-side pruning each device prunes by magnitude during local training (as in the
    original method's code) and sends its weights with its own mask. Averaging a weight over every
    device would shrink it towards zero wherever some devices pruned it; averaging over those that
    kept it (weighted by sample count) does not. Positions no device kept average to 0. The
    aggregator then sets the global mask by magnitude of this average.
    """

    def aggregate(self, results: Sequence[ClientResult]) -> list[np.ndarray]:
        if not results or any(r.masks is None for r in results):
            raise ValueError("DeviceMaskAveraging needs results that carry their masks")
        out = []
        for i in range(len(results[0].delta)):
            num = np.zeros(results[0].delta[i].shape, np.float64)
            den = np.zeros_like(num)
            for r in results:
                keep = np.ones(num.shape, bool) if r.masks[i] is None else r.masks[i]
                num += np.where(keep, r.delta[i], 0.0) * r.num_samples
                den += keep * float(r.num_samples)
            out.append(np.divide(num, den, out=np.zeros_like(num), where=den > 0).astype(np.float32))
        return out


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


def gradient_scores(results: Sequence[ClientResult]) -> list[np.ndarray] | None:
    """Sample-weighted sum of the gradient magnitudes the devices reported (None if none did)."""
    reported = [r for r in results if r.gradients is not None]
    if not reported:
        return None
    return [sum(np.abs(r.gradients[i]) * r.num_samples for r in reported) for i in range(len(reported[0].gradients))]
