"""The global model's BatchNormalization statistics: the devices' statistics pooled.

Every device sets each BatchNormalization layer's moving mean and variance to the exact mean and
variance of the layer's input over its own data, for the weights it trained
(``edge_agent/batchnorm_stats.py``). Averaging by sample count, as FedAvg does, gives the pooled
mean exactly, but the average of the variances is only the within-device part of the pooled
variance; the between-device part, the spread of the devices' means, is missing, and with non-IID
data (each device its own classes) it is not small. ``pool_batchnorm_variance`` adds it:

    var = sum_i w_i var_i + sum_i w_i (mean_i - mean)^2,   w_i = n_i / sum n,   mean = sum_i w_i mean_i

which is the variance of the union of the devices' data. Only for strategies that weight by sample
count (FedAvg); the robust strategies' and DP-FedAvg's statistics are left as they aggregated them.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from fedprune.aggregator.strategies.base import ClientResult


def batchnorm_pairs(names: Sequence[str]) -> list[tuple[int, int]]:
    """Indices in the weight list of each BatchNormalization layer's (moving_mean, moving_variance)."""
    index = {name: i for i, name in enumerate(names)}
    return [(index[n], index[n.removesuffix("moving_mean") + "moving_variance"]) for n in names
            if n.endswith("/moving_mean") and n.removesuffix("moving_mean") + "moving_variance" in index]


def pool_batchnorm_variance(new: list[np.ndarray], old: Sequence[np.ndarray], results: Sequence[ClientResult],
                            pairs: Sequence[tuple[int, int]], *, deltas: bool = True) -> list[np.ndarray]:
    """``new`` (the aggregated weights) with each moving variance raised by the spread of the
    devices' moving means around the aggregated mean, weighted by sample count. ``deltas``: the
    results hold deltas from ``old`` (aggregator-owned masks) rather than weights."""
    if not pairs or len(results) < 2:
        return new
    total = float(sum(r.num_samples for r in results))
    out = list(new)
    for mean_index, var_index in pairs:
        mean = np.asarray(new[mean_index], np.float64)
        spread = np.zeros_like(mean)
        for r in results:
            device_mean = np.asarray(r.delta[mean_index], np.float64)
            if deltas:
                device_mean = device_mean + np.asarray(old[mean_index], np.float64)
            spread += (r.num_samples / total) * (device_mean - mean) ** 2
        out[var_index] = (np.asarray(new[var_index], np.float64) + spread).astype(np.float32)
    return out
